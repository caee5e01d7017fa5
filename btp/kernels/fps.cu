// Batched farthest point sampling with an explicit start index, one block per cloud.
//
// Rule (identical to btp.geometry.fps_reference): idx[0] = start; min_d2 = +inf; repeat:
// min_d2 = min(min_d2, dist2(p, p[last])); last = argmax(min_d2), lowest index among ties.
// Already-picked points have min_d2 == 0 and are NOT skipped specially (no |p|^2 threshold as in
// pointnet2_ops, which can never pick a point near the origin of a centred cloud).
//
// Per iteration: each thread updates its strided share of min_d2 (global workspace, so N can
// be millions) and keeps its local arg-max; warp shuffles reduce 32 -> 1, lane 0 of each warp
// writes shared memory, warp 0 reduces the (<= 32) warp winners. Two barriers per iteration.
#include "btp_common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
btp_fps(const float* __restrict__ points,    // [B, N, 3]
        int n_points,                        // N
        int n_samples,                       // S <= N (S > N repeats the lowest index, as the rule says)
        const int* __restrict__ start_idx,   // [B]
        float* __restrict__ min_d2,          // [B, N] workspace, no initialisation needed
        int* __restrict__ out_idx)           // [B, S]
{
  __shared__ float s_warp_d[BTP_WARP];
  __shared__ int s_warp_i[BTP_WARP];
  __shared__ int s_last;

  const int b = blockIdx.x;
  const float* pts = points + (size_t)b * n_points * 3;
  float* md = min_d2 + (size_t)b * n_points;
  int* out = out_idx + (size_t)b * n_samples;
  const int tid = threadIdx.x;
  const int lane = tid % BTP_WARP;
  const int warp = tid / BTP_WARP;
  const int n_warps = (blockDim.x + BTP_WARP - 1) / BTP_WARP;

  // each thread only ever touches its own strided entries of md, so no barrier is needed here
  for (int j = tid; j < n_points; j += blockDim.x) md[j] = INFINITY;
  int last = start_idx[b];
  if (tid == 0) out[0] = last;

  for (int i = 1; i < n_samples; ++i) {
    const float lx = pts[3 * last], ly = pts[3 * last + 1], lz = pts[3 * last + 2];
    float best_d = -1.0f;
    int best_i = BTP_INDEX_NONE;
    for (int j = tid; j < n_points; j += blockDim.x) {
      const float d = btp_dist2(pts[3 * j], pts[3 * j + 1], pts[3 * j + 2], lx, ly, lz);
      const float old = md[j];
      const float m = d < old ? d : old;
      md[j] = m;
      if (m > best_d) {  // j grows, so strict '>' keeps this thread's lowest index on ties
        best_d = m;
        best_i = j;
      }
    }
    btp_warp_argmax(best_d, best_i);
    if (lane == 0) {
      s_warp_d[warp] = best_d;
      s_warp_i[warp] = best_i;
    }
    __syncthreads();  // all warp winners written
    if (warp == 0) {
      best_d = lane < n_warps ? s_warp_d[lane] : -1.0f;
      best_i = lane < n_warps ? s_warp_i[lane] : BTP_INDEX_NONE;
      btp_warp_argmax(best_d, best_i);
      if (lane == 0) {
        s_last = best_i;
        out[i] = best_i;
      }
    }
    __syncthreads();  // s_last visible; s_warp_* reads done before the next iteration writes
    last = s_last;
  }
}

// dst[b, s, :] = src[b, idx[b, s], :] for C channels: the raw scan -> sampled points gather.
extern "C" __global__ void __launch_bounds__(256)
btp_gather_rows(const float* __restrict__ src,  // [B, M, C]
                const int* __restrict__ idx,    // [B, S]
                int n_src, int n_idx, int n_channels,
                float* __restrict__ dst)        // [B, S, C]
{
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // over S * C
  if (t >= (long long)n_idx * n_channels) return;
  const int b = blockIdx.y;
  const int s = (int)(t / n_channels), c = (int)(t % n_channels);
  const int row = idx[(size_t)b * n_idx + s];
  dst[((size_t)b * n_idx + s) * n_channels + c] = src[((size_t)b * n_src + row) * n_channels + c];
}
