// Unit-sphere normalisation of each cloud on the device (btp.geometry.normalize): move the
// centroid to the origin, divide by the max radius, accumulated in float64 like the reference:
//   origin = sum(p) / N (float64);  scale = sqrt(max((dx*dx + dy*dy) + dz*dz)) (float64, no FMA)
//   out = float32((p - origin) / scale);  origin_scale[b] = (float32 origin, float32 scale)
// One block per cloud. The float64 sum is a fixed-order tree (thread-strided partial sums, warp
// shuffles, then warp 0), numpy sums pairwise: the centroids can differ in the last float64 bit,
// which changes a float32 output only when it lies within ~1e-16 of a rounding boundary.
#include "btp_common.cuh"

__device__ __forceinline__ double btp_warp_sum(double v) {
  for (int offset = BTP_WARP / 2; offset > 0; offset >>= 1) v = __dadd_rn(v, __shfl_down_sync(BTP_FULL_MASK, v, offset));
  return v;
}

__device__ __forceinline__ double btp_warp_max(double v) {
  for (int offset = BTP_WARP / 2; offset > 0; offset >>= 1) {
    const double other = __shfl_down_sync(BTP_FULL_MASK, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

extern "C" __global__ void __launch_bounds__(1024)
btp_normalize(const float* __restrict__ points,  // [B, N, 3]
              int n_points,
              float* __restrict__ normed,        // [B, N, 3] (may not alias points)
              float* __restrict__ origin_scale)  // [B, 4]: origin xyz, scale
{
  __shared__ double s_part[3][BTP_WARP];
  __shared__ double s_origin[3];
  __shared__ double s_scale;

  const int b = blockIdx.x;
  const float* pts = points + (size_t)b * n_points * 3;
  float* out = normed + (size_t)b * n_points * 3;
  const int tid = threadIdx.x, lane = tid % BTP_WARP, warp = tid / BTP_WARP;
  const int n_warps = (blockDim.x + BTP_WARP - 1) / BTP_WARP;

  // 1. centroid
  double sx = 0.0, sy = 0.0, sz = 0.0;
  for (int j = tid; j < n_points; j += blockDim.x) {
    sx = __dadd_rn(sx, (double)pts[3 * j]);
    sy = __dadd_rn(sy, (double)pts[3 * j + 1]);
    sz = __dadd_rn(sz, (double)pts[3 * j + 2]);
  }
  sx = btp_warp_sum(sx);
  sy = btp_warp_sum(sy);
  sz = btp_warp_sum(sz);
  if (lane == 0) {
    s_part[0][warp] = sx;
    s_part[1][warp] = sy;
    s_part[2][warp] = sz;
  }
  __syncthreads();
  if (warp == 0) {
    for (int c = 0; c < 3; ++c) {
      const double v = btp_warp_sum(lane < n_warps ? s_part[c][lane] : 0.0);
      if (lane == 0) s_origin[c] = __ddiv_rn(v, (double)n_points);
    }
  }
  __syncthreads();
  const double cx = s_origin[0], cy = s_origin[1], cz = s_origin[2];

  // 2. max radius
  double r2 = 0.0;
  for (int j = tid; j < n_points; j += blockDim.x) {
    const double dx = __dsub_rn((double)pts[3 * j], cx);
    const double dy = __dsub_rn((double)pts[3 * j + 1], cy);
    const double dz = __dsub_rn((double)pts[3 * j + 2], cz);
    const double d = __dadd_rn(__dadd_rn(__dmul_rn(dx, dx), __dmul_rn(dy, dy)), __dmul_rn(dz, dz));
    r2 = d > r2 ? d : r2;
  }
  r2 = btp_warp_max(r2);
  if (lane == 0) s_part[0][warp] = r2;
  __syncthreads();
  if (warp == 0) {
    const double v = btp_warp_max(lane < n_warps ? s_part[0][lane] : 0.0);
    if (lane == 0) s_scale = sqrt(v);
  }
  __syncthreads();
  const double scale = s_scale;  // 0 for a degenerate cloud: the host checks origin_scale[3]

  // 3. write
  for (int j = tid; j < n_points; j += blockDim.x) {
    out[3 * j] = (float)__ddiv_rn(__dsub_rn((double)pts[3 * j], cx), scale);
    out[3 * j + 1] = (float)__ddiv_rn(__dsub_rn((double)pts[3 * j + 1], cy), scale);
    out[3 * j + 2] = (float)__ddiv_rn(__dsub_rn((double)pts[3 * j + 2], cz), scale);
  }
  if (tid == 0) {
    origin_scale[4 * b] = (float)cx;
    origin_scale[4 * b + 1] = (float)cy;
    origin_scale[4 * b + 2] = (float)cz;
    origin_scale[4 * b + 3] = (float)scale;
  }
}
