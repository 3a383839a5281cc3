// Host emulation of the CUDA features the kernels use, so that the test suite can run the real
// kernels (and launchers) on a machine without a GPU. Force-included (g++ -include) before each
// csrc/*.cu, whose `kernel<<<grid, block, 0, stream>>>(args)` launches the test rewrites into
// `::emu::launch(grid, block, [&] { kernel(args); })`. Not part of the shipped extension.
//
// Semantics: blocks run one after another (in an order the test picks); the threads of a block
// run as cooperative fibers that switch at __syncthreads, so shared memory and barriers behave
// as on the GPU, but cross-block races cannot show (compute-sanitizer covers those on a GPU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#define __syncthreads() ::emu::sync()
#define __threadfence() std::atomic_thread_fence(std::memory_order_seq_cst)
#define threadIdx ::emu::thread_idx
#define blockIdx ::emu::block_idx
#define blockDim ::emu::block_dim
#define gridDim ::emu::grid_dim
#define cudaGetLastError() ::emu::launch_status()

namespace emu {

extern uint3 thread_idx, block_idx;
extern dim3 block_dim, grid_dim;

void sync();
cudaError_t launch_status();
void run(dim3 grid, dim3 block, void (*body)(void*), void* ctx);

template <class F>
void launch(dim3 grid, dim3 block, F&& f) {
  using L = std::remove_reference_t<F>;
  run(grid, block, [](void* c) { (*static_cast<L*>(c))(); }, &f);
}

}  // namespace emu

template <typename T>
T __ldcg(const T* p) {
  return *p;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned atomicExch(unsigned* p, unsigned v) {
  return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
