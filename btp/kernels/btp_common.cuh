// Shared device helpers for the btp kernels. Plain CUDA C++ (CUDA 11.4+), no CUB, no
// cooperative groups, so JetPack's older nvcc builds it from source (Xavier, sm_72).
#pragma once

#define BTP_FULL_MASK 0xffffffffu
#define BTP_WARP 32
#define BTP_INDEX_NONE 0x7fffffff

// nvcc brings INFINITY in with math.h; NVRTC (the cuda-python path) compiles without any
// host headers, so define it from the IEEE bit pattern there.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// Squared distance by the rule of btp.geometry (fps/knn): differences rounded to float32,
// squares added left to right, (dx*dx + dy*dy) + dz*dz, NO fused multiply-add. The _rn
// intrinsics are never contracted into an FMA by nvcc, whatever -fmad says.
__device__ __forceinline__ float btp_dist2(float px, float py, float pz, float qx, float qy, float qz) {
  const float dx = __fsub_rn(px, qx);
  const float dy = __fsub_rn(py, qy);
  const float dz = __fsub_rn(pz, qz);
  return __fadd_rn(__fadd_rn(__fmul_rn(dx, dx), __fmul_rn(dy, dy)), __fmul_rn(dz, dz));
}

// (d, i) beats (best_d, best_i) for an arg-max: larger distance, or equal distance and lower
// index (the tie rule: lowest index wins).
__device__ __forceinline__ void btp_argmax_merge(float d, int i, float& best_d, int& best_i) {
  if (d > best_d || (d == best_d && i < best_i)) {
    best_d = d;
    best_i = i;
  }
}

// Warp-wide arg-max of (best_d, best_i); lane 0 ends with the warp's winner. All 32 lanes of
// the warp must call it (full mask). Lanes whose source is out of range compare with their
// own value, which changes nothing.
__device__ __forceinline__ void btp_warp_argmax(float& best_d, int& best_i) {
  for (int offset = BTP_WARP / 2; offset > 0; offset >>= 1) {
    const float other_d = __shfl_down_sync(BTP_FULL_MASK, best_d, offset);
    const int other_i = __shfl_down_sync(BTP_FULL_MASK, best_i, offset);
    btp_argmax_merge(other_d, other_i, best_d, best_i);
  }
}
