// Scores back to points: patch -> sampled point propagation and sampled -> raw-scan
// interpolation (btp.geometry.propagate_patch_scores / interpolate_to_raw(method="nearest")).
#include "btp_common.cuh"

#define BTP_NN_TILE 256

// sums[b, p] += patch_scores[b, g], counts[b, p] += 1 for every p in patch_idx[b, g, :]; with
// per_point != 0, values are the model's per-point scores [B, G, K] and sums[b, p] += values[b, g, k].
// One thread per (b, g, k) entry. sums / counts must be zero before the launch (memset).
// Float atomics add in any order: the mean may differ from the reference by rounding (~1 ulp
// per addition), never by more.
extern "C" __global__ void __launch_bounds__(256)
btp_scatter_patch_scores(const float* __restrict__ values,        // [B, G] or [B, G, K]
                         int per_point,
                         const int* __restrict__ patch_idx,       // [B, G, K]
                         int n_groups, int k, int n_points,
                         float* __restrict__ sums,                // [B, N]
                         int* __restrict__ counts)                // [B, N]
{
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // over G * K
  if (t >= (long long)n_groups * k) return;
  const int b = blockIdx.y;
  const int g = (int)(t / k);
  const int p = patch_idx[(size_t)b * n_groups * k + t];
  const float v = per_point ? values[(size_t)b * n_groups * k + t] : values[(size_t)b * n_groups + g];
  atomicAdd(&sums[(size_t)b * n_points + p], v);
  atomicAdd(&counts[(size_t)b * n_points + p], 1);
}

// point_scores[b, p] = sums / counts where the point is in some patch; otherwise the score of
// its nearest center (dist2 rule, lowest center index on ties). One thread per point.
extern "C" __global__ void __launch_bounds__(256)
btp_finish_point_scores(const float* __restrict__ sums,          // [B, N]
                        const int* __restrict__ counts,          // [B, N]
                        const float* __restrict__ patch_scores,  // [B, G]
                        const float* __restrict__ center,        // [B, G, 3]
                        const float* __restrict__ points,        // [B, N, 3]
                        int n_points, int n_groups,
                        float* __restrict__ point_scores)        // [B, N]
{
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= n_points) return;
  const int b = blockIdx.y;
  const size_t at = (size_t)b * n_points + p;
  const int n = counts[at];
  if (n > 0) {
    point_scores[at] = __fdiv_rn(sums[at], (float)n);
    return;
  }
  const float px = points[3 * at], py = points[3 * at + 1], pz = points[3 * at + 2];
  const float* cen = center + (size_t)b * n_groups * 3;
  float best_d = INFINITY;
  int best_g = 0;
  for (int g = 0; g < n_groups; ++g) {
    const float d = btp_dist2(px, py, pz, cen[3 * g], cen[3 * g + 1], cen[3 * g + 2]);
    if (d < best_d) {  // strict: the lowest center index wins ties
      best_d = d;
      best_g = g;
    }
  }
  point_scores[at] = patch_scores[(size_t)b * n_groups + best_g];
}

// raw_scores[m] = sampled_scores[nearest sampled point to raw_xyz[m]] (lowest index on ties).
// One thread per raw point; the sampled points stream through shared memory in tiles.
extern "C" __global__ void __launch_bounds__(256)
btp_interpolate_nearest(const float* __restrict__ sampled_xyz,     // [N, 3]
                        const float* __restrict__ sampled_scores,  // [N]
                        int n_sampled,
                        const float* __restrict__ raw_xyz,         // [M, 3]
                        int n_raw,
                        float* __restrict__ raw_scores)            // [M]
{
  __shared__ float s_x[BTP_NN_TILE];
  __shared__ float s_y[BTP_NN_TILE];
  __shared__ float s_z[BTP_NN_TILE];

  const long long m = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = m < n_raw;  // inactive threads still load tiles and meet the barriers
  float px = 0.0f, py = 0.0f, pz = 0.0f;
  if (active) {
    px = raw_xyz[3 * m];
    py = raw_xyz[3 * m + 1];
    pz = raw_xyz[3 * m + 2];
  }
  float best_d = INFINITY;
  int best_i = 0;
  for (int base = 0; base < n_sampled; base += BTP_NN_TILE) {
    const int tile = n_sampled - base < BTP_NN_TILE ? n_sampled - base : BTP_NN_TILE;
    for (int t = threadIdx.x; t < tile; t += blockDim.x) {
      s_x[t] = sampled_xyz[3 * (base + t)];
      s_y[t] = sampled_xyz[3 * (base + t) + 1];
      s_z[t] = sampled_xyz[3 * (base + t) + 2];
    }
    __syncthreads();
    if (active) {
      for (int t = 0; t < tile; ++t) {
        const float d = btp_dist2(px, py, pz, s_x[t], s_y[t], s_z[t]);
        if (d < best_d) {
          best_d = d;
          best_i = base + t;
        }
      }
    }
    __syncthreads();
  }
  if (active) raw_scores[m] = sampled_scores[best_i];
}
