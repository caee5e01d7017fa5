// kNN grouping fused with the gather that builds the encoder's inputs (PointBERT `Group`).
//
// One thread per query (a center picked by FPS); the points stream through shared memory in
// tiles that the whole block loads together. Each thread keeps its K best (dist2, index) in a
// sorted list (K <= 64). Points are visited in index order, so a candidate that ties an entry
// has the larger index and goes after it; a candidate that ties the K-th is rejected (strict
// '<'): rows come out sorted by (dist2, index), exactly btp.geometry.knn_reference.
// Then the thread writes, straight into the engine's input buffers:
//   center[b, g, :]             = points[center_idx[b, g]]
//   neighborhood[b, g, k, 0:3]  = points[patch_idx] - center        (float32, no FMA)
//   neighborhood[b, g, k, 3:C]  = colors[patch_idx] or rgb_fill
// and patch_idx / dist2 for the score propagation (optional outputs, may be null).
#include "btp_common.cuh"

#define BTP_KNN_MAX_K 64
#define BTP_KNN_TILE 256

extern "C" __global__ void __launch_bounds__(256)
btp_knn_group(const float* __restrict__ points,      // [B, N, 3]
              const float* __restrict__ colors,      // [B, N, 3] in [0, 1], or null -> rgb_fill
              const int* __restrict__ center_idx,    // [B, G]
              int n_points, int n_groups, int k,     // N, G, K (K <= 64)
              int n_channels, float rgb_fill,        // C (3 or 6)
              float* __restrict__ neighborhood,      // [B, G, K, C]
              float* __restrict__ center,            // [B, G, 3]
              int* __restrict__ patch_idx,           // [B, G, K] or null
              float* __restrict__ patch_d2)          // [B, G, K] or null
{
  __shared__ float s_x[BTP_KNN_TILE];
  __shared__ float s_y[BTP_KNN_TILE];
  __shared__ float s_z[BTP_KNN_TILE];

  const int b = blockIdx.y;
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = g < n_groups;  // inactive threads still load tiles and meet the barriers
  const float* pts = points + (size_t)b * n_points * 3;

  float qx = 0.0f, qy = 0.0f, qz = 0.0f;
  if (active) {
    const int c = center_idx[(size_t)b * n_groups + g];
    qx = pts[3 * c];
    qy = pts[3 * c + 1];
    qz = pts[3 * c + 2];
  }
  float best_d[BTP_KNN_MAX_K];
  int best_i[BTP_KNN_MAX_K];
  int count = 0;

  for (int base = 0; base < n_points; base += BTP_KNN_TILE) {
    const int tile = n_points - base < BTP_KNN_TILE ? n_points - base : BTP_KNN_TILE;
    for (int t = threadIdx.x; t < tile; t += blockDim.x) {
      s_x[t] = pts[3 * (base + t)];
      s_y[t] = pts[3 * (base + t) + 1];
      s_z[t] = pts[3 * (base + t) + 2];
    }
    __syncthreads();  // tile loaded
    if (active) {
      for (int t = 0; t < tile; ++t) {
        const float d = btp_dist2(s_x[t], s_y[t], s_z[t], qx, qy, qz);
        if (count < k || d < best_d[k - 1]) {
          int pos = count < k ? count : k - 1;  // drop the current K-th when full
          while (pos > 0 && best_d[pos - 1] > d) {  // '>' : equal distances keep lower index first
            best_d[pos] = best_d[pos - 1];
            best_i[pos] = best_i[pos - 1];
            --pos;
          }
          best_d[pos] = d;
          best_i[pos] = base + t;
          if (count < k) ++count;
        }
      }
    }
    __syncthreads();  // everyone done with the tile before it is overwritten
  }
  if (!active) return;

  const size_t row = (size_t)b * n_groups + g;
  center[row * 3] = qx;
  center[row * 3 + 1] = qy;
  center[row * 3 + 2] = qz;
  const float* col = colors ? colors + (size_t)b * n_points * 3 : nullptr;
  for (int j = 0; j < k; ++j) {
    const int p = best_i[j];
    float* out = neighborhood + (row * k + j) * n_channels;
    out[0] = __fsub_rn(pts[3 * p], qx);
    out[1] = __fsub_rn(pts[3 * p + 1], qy);
    out[2] = __fsub_rn(pts[3 * p + 2], qz);
    for (int c = 3; c < n_channels; ++c) out[c] = col ? col[3 * p + (c - 3)] : rgb_fill;
    if (patch_idx) patch_idx[row * k + j] = p;
    if (patch_d2) patch_d2[row * k + j] = best_d[j];
  }
}
