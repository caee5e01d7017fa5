// The btp kernels, unchanged, compiled for the host under cuda_emu.h (force-included with
// g++ -include), plus one extern "C" launcher per kernel for ctypes (btp/kernels/emu.py).
// Each launcher returns 0, or 1 after storing the exception text for emu_last_error().
#include "../fps.cu"
#include "../group.cu"
#include "../normalize.cu"
#include "../scores.cu"

#include <string>

static std::string g_last_error;

template <typename F>
static int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    g_last_error = e.what();
    return 1;
  }
}

extern "C" {
const char* emu_last_error() { return g_last_error.c_str(); }

int emu_btp_fps(int gx, int gy, int bx, const float* points, int n_points, int n_samples,
                const int* start_idx, float* min_d2, int* out_idx) {
  return guarded([&] { emu::launch(dim3(gx, gy), dim3(bx), btp_fps, points, n_points, n_samples,
                                   start_idx, min_d2, out_idx); });
}

int emu_btp_fps_wide_init(int gx, int gy, int bx, int n_points, int n_samples, int batch,
                          const int* start_idx, float* min_d2, unsigned int* done, int* out_idx) {
  return guarded([&] { emu::launch(dim3(gx, gy), dim3(bx), btp_fps_wide_init, n_points, n_samples, batch,
                                   start_idx, min_d2, done, out_idx); });
}

int emu_btp_fps_wide_step(int gx, int gy, int bx, const float* points, int n_points, int n_samples,
                          int step, float* min_d2, float* part_d, int* part_i, unsigned int* done,
                          int* out_idx) {
  return guarded([&] { emu::launch(dim3(gx, gy), dim3(bx), btp_fps_wide_step, points, n_points, n_samples,
                                   step, min_d2, part_d, part_i, done, out_idx); });
}

int emu_btp_normalize(int gx, int gy, int bx, const float* points, int n_points, float* normed,
                      float* origin_scale) {
  return guarded([&] { emu::launch(dim3(gx, gy), dim3(bx), btp_normalize, points, n_points, normed,
                                   origin_scale); });
}

int emu_btp_gather_rows(int gx, int gy, int bx, const float* src, const int* idx, int n_src,
                        int n_idx, int n_channels, float* dst) {
  return guarded([&] { emu::launch(dim3(gx, gy), dim3(bx), btp_gather_rows, src, idx, n_src, n_idx,
                                   n_channels, dst); });
}

int emu_btp_knn_group(int gx, int gy, int bx, const float* points, const float* colors,
                      const int* center_idx, int n_points, int n_groups, int k, int n_channels,
                      float rgb_fill, float* neighborhood, float* center, int* patch_idx,
                      float* patch_d2) {
  return guarded([&] { emu::launch(dim3(gx, gy), dim3(bx), btp_knn_group, points, colors, center_idx,
                                   n_points, n_groups, k, n_channels, rgb_fill, neighborhood, center,
                                   patch_idx, patch_d2); });
}

int emu_btp_scatter_patch_scores(int gx, int gy, int bx, const float* values, int per_point,
                                 const int* patch_idx, int n_groups, int k, int n_points,
                                 float* sums, int* counts) {
  return guarded([&] { emu::launch(dim3(gx, gy), dim3(bx), btp_scatter_patch_scores, values, per_point,
                                   patch_idx, n_groups, k, n_points, sums, counts); });
}

int emu_btp_finish_point_scores(int gx, int gy, int bx, const float* sums, const int* counts,
                                const float* patch_scores, const float* center,
                                const float* points, int n_points, int n_groups,
                                float* point_scores) {
  return guarded([&] { emu::launch(dim3(gx, gy), dim3(bx), btp_finish_point_scores, sums, counts,
                                   patch_scores, center, points, n_points, n_groups, point_scores); });
}

int emu_btp_interpolate_nearest(int gx, int gy, int bx, const float* sampled_xyz,
                                const float* sampled_scores, int n_sampled, const float* raw_xyz,
                                int n_raw, float* raw_scores) {
  return guarded([&] { emu::launch(dim3(gx, gy), dim3(bx), btp_interpolate_nearest, sampled_xyz,
                                   sampled_scores, n_sampled, raw_xyz, n_raw, raw_scores); });
}
}
