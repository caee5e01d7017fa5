// Batched farthest point sampling with an explicit start index, one block per cloud.
//
// Rule (identical to btp.geometry.fps_reference): idx[0] = start; min_d2 = +inf; repeat:
// min_d2 = min(min_d2, dist2(p, p[last])); last = argmax(min_d2), lowest index among ties.
// Already-picked points have min_d2 == 0 and are NOT skipped specially (no |p|^2 threshold as in
// pointnet2_ops, which can never pick a point near the origin of a centered cloud).
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

// ---- wide FPS: many blocks per cloud, one launch per step ------------------------------------
// btp_fps keeps a whole cloud in one block (one SM): right for N of a few thousand, slow for raw
// scans of millions of points. The wide variant spreads a cloud over gridDim.x blocks and runs
// one launch per FPS step: each block updates its grid-strided share of min_d2 and publishes its
// arg-max; the last block to finish (atomic ticket after __threadfence, the classic
// "threadFenceReduction" pattern, CUDA 11.4-safe) reduces the partial winners with the same
// (distance, lowest index) rule and writes out_idx[step]. Same rule, same result as btp_fps.

// Block-wide arg-max of (best_d, best_i); thread 0 gets the block's winner. All threads call it.
__device__ __forceinline__ void btp_block_argmax(float& best_d, int& best_i, float* s_d, int* s_i) {
  const int lane = threadIdx.x % BTP_WARP, warp = threadIdx.x / BTP_WARP;
  const int n_warps = (blockDim.x + BTP_WARP - 1) / BTP_WARP;
  btp_warp_argmax(best_d, best_i);
  if (lane == 0) {
    s_d[warp] = best_d;
    s_i[warp] = best_i;
  }
  __syncthreads();
  if (warp == 0) {
    best_d = lane < n_warps ? s_d[lane] : -1.0f;
    best_i = lane < n_warps ? s_i[lane] : BTP_INDEX_NONE;
    btp_warp_argmax(best_d, best_i);
  }
  __syncthreads();  // s_d / s_i free again
}

// min_d2 = +inf, out_idx[b, 0] = start_idx[b], done[b] = 0. Grid-stride over B * N.
extern "C" __global__ void __launch_bounds__(256)
btp_fps_wide_init(int n_points, int n_samples, int batch,
                  const int* __restrict__ start_idx,  // [B]
                  float* __restrict__ min_d2,         // [B, N]
                  unsigned int* __restrict__ done,    // [B]
                  int* __restrict__ out_idx)          // [B, S]
{
  const long long total = (long long)batch * n_points;
  for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
       t += (long long)gridDim.x * blockDim.x)
    min_d2[t] = INFINITY;
  if (blockIdx.x == 0)
    for (int b = threadIdx.x; b < batch; b += blockDim.x) {
      out_idx[(size_t)b * n_samples] = start_idx[b];
      done[b] = 0u;
    }
}

// One FPS step (1 <= step < S) for every cloud b = blockIdx.y.
extern "C" __global__ void __launch_bounds__(256)
btp_fps_wide_step(const float* __restrict__ points,  // [B, N, 3]
                  int n_points, int n_samples, int step,
                  float* __restrict__ min_d2,        // [B, N]
                  float* part_d,                     // [B, gridDim.x] per-block winners
                  int* part_i,                       // [B, gridDim.x]
                  unsigned int* done,                // [B] tickets, 0 between steps
                  int* out_idx)                      // [B, S]
{
  __shared__ float s_d[BTP_WARP];
  __shared__ int s_i[BTP_WARP];
  __shared__ bool s_last_block;

  const int b = blockIdx.y;
  const int n_blocks = gridDim.x;
  const float* pts = points + (size_t)b * n_points * 3;
  float* md = min_d2 + (size_t)b * n_points;
  const int last = out_idx[(size_t)b * n_samples + step - 1];
  const float lx = pts[3 * last], ly = pts[3 * last + 1], lz = pts[3 * last + 2];

  float best_d = -1.0f;
  int best_i = BTP_INDEX_NONE;
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < n_points; j += n_blocks * blockDim.x) {
    const float d = btp_dist2(pts[3 * j], pts[3 * j + 1], pts[3 * j + 2], lx, ly, lz);
    const float old = md[j];
    const float m = d < old ? d : old;
    md[j] = m;
    if (m > best_d) {  // j grows: strict '>' keeps this thread's lowest index on ties
      best_d = m;
      best_i = j;
    }
  }
  btp_block_argmax(best_d, best_i, s_d, s_i);
  if (threadIdx.x == 0) {
    part_d[(size_t)b * n_blocks + blockIdx.x] = best_d;
    part_i[(size_t)b * n_blocks + blockIdx.x] = best_i;
    __threadfence();  // the partial is visible to every block before the ticket is taken
    const unsigned int ticket = atomicAdd(&done[b], 1u);
    s_last_block = ticket == (unsigned int)(n_blocks - 1);
  }
  __syncthreads();
  if (!s_last_block) return;  // block-uniform: the whole block leaves or stays

  // the last block: every partial is published; reduce them (volatile: read memory, not a cache)
  const volatile float* vd = part_d + (size_t)b * n_blocks;
  const volatile int* vi = part_i + (size_t)b * n_blocks;
  best_d = -1.0f;
  best_i = BTP_INDEX_NONE;
  for (int t = threadIdx.x; t < n_blocks; t += blockDim.x) btp_argmax_merge(vd[t], vi[t], best_d, best_i);
  btp_block_argmax(best_d, best_i, s_d, s_i);
  if (threadIdx.x == 0) {
    out_idx[(size_t)b * n_samples + step] = best_i;
    done[b] = 0u;  // ready for the next step's launch
  }
}
