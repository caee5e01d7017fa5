// cuda_emu.h - a small host emulation of the CUDA execution model, so that the SAME kernel
// source (btp/kernels/*.cu) runs on the CPU and its output can be compared with btp.geometry.
//
// Build:  g++ -std=c++20 -O1 -ffp-contract=off -pthread -x c++ -include cuda_emu.h kernels.cu
//
// Model (and why each piece is faithful for the kernels we write):
// - A launch runs the grid's blocks ONE AFTER ANOTHER. CUDA gives no ordering or concurrency
//   guarantee between blocks, so a correct kernel cannot depend on blocks running together;
//   running them in sequence is one legal schedule.
// - Inside a block every CUDA thread is a real std::thread, so threads interleave freely
//   (a legal schedule too) and __syncthreads() is a real barrier over all of them. A kernel
//   whose threads miss a barrier deadlocks here instead of silently passing.
// - threadIdx/blockIdx are thread_local; blockDim/gridDim are per launch.
// - __shared__ is `static`: one instance per kernel in the process. Because blocks run one at
//   a time, that single instance IS the current block's shared memory. Between two blocks all
//   threads meet at a barrier, so a block never sees a neighbour mid-write (CUDA does not
//   initialise shared memory either, and our kernels never read it before writing it).
//   Consequence: launches are serialised by a global mutex (one kernel at a time).
// - Warps: threads 32*w .. 32*w+31 (linear thread id) form warp w. A shuffle writes the
//   caller's value to the warp's exchange slots, waits at a barrier of the 32 lanes, reads the
//   source lane's slot, and waits again so no lane overwrites a slot before all have read it.
//   This equals the hardware result for full-mask shuffles in warp-converged code, which is the
//   only way our kernels use them (the mask is checked). Only __shfl_down_sync is provided,
//   because it is the only shuffle the kernels use.
// - atomicAdd uses std::atomic_ref (C++20): a real atomic read-modify-write on the same memory.
// - Float arithmetic: the kernels spell out __fmul_rn/__fadd_rn where rounding matters; here
//   they are the plain IEEE float ops, and -ffp-contract=off forbids g++ from fusing them.
#pragma once

#include <atomic>
#include <barrier>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct uint3 { unsigned int x = 0, y = 0, z = 0; };
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {
constexpr int kWarp = 32;

struct Block {  // the state the threads of the running block share
  std::barrier<>* block_barrier = nullptr;
  std::vector<std::barrier<>*> warp_barriers;
  std::vector<uint64_t> warp_slots;  // [n_warps * 32] shuffle exchange buffer
};
inline Block g_block;
inline std::mutex g_launch_mutex;
inline thread_local int t_linear = 0;  // linear thread id inside the block
}  // namespace emu

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

inline void __syncthreads() { emu::g_block.block_barrier->arrive_and_wait(); }

// ---- warp shuffles ------------------------------------------------------------------------
namespace emu {
template <typename T, typename SrcLane>
inline T shuffle(unsigned mask, T value, SrcLane src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  if (mask != 0xffffffffu) throw std::logic_error("cuda_emu: only full-warp shuffles are emulated");
  const int warp = t_linear / kWarp, lane = t_linear % kWarp;
  uint64_t* slots = &g_block.warp_slots[warp * kWarp];
  std::memcpy(&slots[lane], &value, sizeof(T));
  g_block.warp_barriers[warp]->arrive_and_wait();  // every lane has published its value
  T out;
  std::memcpy(&out, &slots[src_lane(lane)], sizeof(T));
  g_block.warp_barriers[warp]->arrive_and_wait();  // every lane has read; slots may be reused
  return out;
}
}  // namespace emu

// CUDA semantics (width = 32): lane reads lane+delta if that is < 32, else keeps its own value.
template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  return emu::shuffle(mask, value, [delta](int lane) {
    return lane + static_cast<int>(delta) < emu::kWarp ? lane + static_cast<int>(delta) : lane;
  });
}
// ---- atomics and intrinsics -----------------------------------------------------------------
template <typename T>
inline T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
template <typename T>
inline T __ldg(const T* p) { return *p; }
// a full fence orders this thread's earlier writes before its later ones for every observer
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---- launch ---------------------------------------------------------------------------------
namespace emu {
// Run kernel(args...) over grid x block. Block size must be a whole number of warps.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const int n_threads = static_cast<int>(block.x * block.y * block.z);
  if (n_threads <= 0 || n_threads % kWarp != 0 || n_threads > 1024)
    throw std::invalid_argument("cuda_emu: block size must be a multiple of 32 and <= 1024");
  const int n_warps = n_threads / kWarp;
  blockDim = block;
  gridDim = grid;
  std::barrier<> block_barrier(n_threads);
  std::vector<std::barrier<>*> warp_barriers;
  for (int w = 0; w < n_warps; ++w) warp_barriers.push_back(new std::barrier<>(kWarp));
  g_block.block_barrier = &block_barrier;
  g_block.warp_barriers = warp_barriers;
  g_block.warp_slots.assign(static_cast<size_t>(n_warps) * kWarp, 0);

  // The same n_threads host threads play every block in turn (blocks run one after another);
  // the barrier at the end of each block keeps blocks from overlapping.
  auto body = [&](int linear) {
    t_linear = linear;
    threadIdx = uint3{static_cast<unsigned>(linear % block.x),
                      static_cast<unsigned>((linear / block.x) % block.y),
                      static_cast<unsigned>(linear / (block.x * block.y))};
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          blockIdx = uint3{bx, by, bz};
          kernel(static_cast<Params>(args)...);
          block_barrier.arrive_and_wait();
        }
  };
  std::vector<std::thread> threads;
  threads.reserve(n_threads);
  for (int t = 0; t < n_threads; ++t) threads.emplace_back(body, t);
  for (auto& t : threads) t.join();
  for (auto* b : warp_barriers) delete b;
  g_block = Block{};
}
}  // namespace emu
