// Device helpers shared by the kernels: dtype conversion, vector access, Chan merges, block
// tree reductions in a fixed order, and the last-block-to-arrive handshake.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fastpbn_cuda.h"

namespace fastpbn {
namespace dev {

constexpr int kThreads = kBlockThreads;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// V consecutive elements at p (V > 1: one 16-byte access; the launcher checked alignment).
template <typename T, int V>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_float(*p);
  } else {
    const Pack<T, V> r = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = to_float(r.v[j]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  if constexpr (V == 1) {
    *p = from_float<T>(in[0]);
  } else {
    Pack<T, V> r;
#pragma unroll
    for (int j = 0; j < V; ++j) r.v[j] = from_float<T>(in[j]);
    *reinterpret_cast<Pack<T, V>*>(p) = r;
  }
}

__device__ __forceinline__ double param_at(const Param& p, int64_t i, double absent) {
  if (p.p == nullptr) return absent;
  switch (p.dt) {
    case DType::f32: return static_cast<const float*>(p.p)[i];
    case DType::f16: return __half2float(static_cast<const __half*>(p.p)[i]);
    case DType::bf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p.p)[i]);
    case DType::f64: return static_cast<const double*>(p.p)[i];
    case DType::i64: return double(static_cast<const int64_t*>(p.p)[i]);
  }
  return absent;
}

__device__ __forceinline__ void param_store(void* p, DType dt, int64_t i, double v) {
  switch (dt) {
    case DType::f32: static_cast<float*>(p)[i] = float(v); break;
    case DType::f16: static_cast<__half*>(p)[i] = __float2half_rn(float(v)); break;
    case DType::bf16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(float(v)); break;
    case DType::f64: static_cast<double*>(p)[i] = v; break;
    case DType::i64: static_cast<int64_t*>(p)[i] = int64_t(llrint(v)); break;
  }
}

// Chan et al.: merge (nb, mb, m2b) into (n, mean, m2) in delta form, never sum / sum of squares.
template <typename A>
__device__ __forceinline__ void chan_merge(A& n, A& mean, A& m2, A nb, A mb, A m2b) {
  if (nb == A(0)) return;
  const A nt = n + nb;
  const A w = nb / nt;
  const A delta = mb - mean;
  m2 += m2b + delta * (n * w) * delta;  // (n = 0: 0, not inf * 0, where delta² overflows)
  mean += delta * w;
  n = nt;
}

// Merge `lanes` (a power of 2) shared entries self + l*stride, l < lanes, into lane 0 in a
// fixed tree order. Every thread of the block calls it (it synchronizes).
template <typename A>
__device__ __forceinline__ void tree_moments(A* n, A* mean, A* m2, int self, int lane, int lanes,
                                             int stride) {
  for (int h = lanes >> 1; h > 0; h >>= 1) {
    if (lane < h) {
      const int o = self + h * stride;
      chan_merge<A>(n[self], mean[self], m2[self], n[o], mean[o], m2[o]);
    }
    __syncthreads();
  }
}

template <typename A>
__device__ __forceinline__ void tree_sums(A* a, A* b, int self, int lane, int lanes, int stride) {
  for (int h = lanes >> 1; h > 0; h >>= 1) {
    if (lane < h) {
      a[self] += a[self + h * stride];
      b[self] += b[self + h * stride];
    }
    __syncthreads();
  }
}

// True in the last block of this channel group to get here. Every block's partials were written
// before the call; the fence makes them visible device-wide before the block is counted, and
// the winner resets the counter for the next launch (nobody else touches it in this one).
__device__ __forceinline__ bool last_block_to_arrive(unsigned* counter, unsigned blocks) {
  __shared__ unsigned is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const unsigned prev = atomicAdd(counter, 1u);
    is_last = prev == blocks - 1 ? 1u : 0u;
    if (is_last) atomicExch(counter, 0u);
  }
  __syncthreads();
  const bool last = is_last != 0u;
  if (last) __threadfence();  // order the partial reads after the counter observation
  return last;
}

// Lanes per channel when one block merges the partials of G channels (a power of 2).
__device__ __forceinline__ int lanes_per_channel(int G) {
  int P = kThreads;
  while (P > 1 && P * G > kThreads) P >>= 1;
  return P;
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// The rectangle [n0, n1) x [s0, s1) of the N x S plane that planar split k covers.
struct PlanarRange {
  int64_t n0, n1, s0, s1;
};

__device__ __forceinline__ PlanarRange planar_range(const Tiling& t, int64_t k) {
  const int64_t rk = k / t.csplits, ck = k % t.csplits;
  PlanarRange r;
  r.n0 = rk * t.rps;
  r.n1 = imin(t.N, r.n0 + t.rps);
  r.s0 = ck * t.cps;
  r.s1 = imin(t.S, r.s0 + t.cps);
  return r;
}

// (n, s) of a row m = n*S + s, stepped by a fixed stride without a division per step.
struct RowCursor {
  int64_t n, s, dn, ds, S;
  __device__ __forceinline__ RowCursor(int64_t m, int64_t step, int64_t S_)
      : n(m / S_), s(m % S_), dn(step / S_), ds(step % S_), S(S_) {}
  __device__ __forceinline__ void advance() {
    s += ds;
    n += dn;
    if (s >= S) {
      s -= S;
      ++n;
    }
  }
  __device__ __forceinline__ int64_t offset(const View& v) const { return n * v.sn + s * v.ss; }
};

__device__ __forceinline__ int flat_tid() { return threadIdx.y * blockDim.x + threadIdx.x; }

}  // namespace dev

// Elements per 16-byte vector access.
template <typename T>
constexpr int vector_width() {
  return 16 / int(sizeof(T));
}

// Call f(T{}) with T the element type named by dt (fp32 / fp16 / bf16).
template <typename F>
cudaError_t dispatch_float(DType dt, F&& f) {
  switch (dt) {
    case DType::f32: return f(float{});
    case DType::f16: return f(__half{});
    case DType::bf16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastpbn
