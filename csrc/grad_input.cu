// K4: dx, elementwise.
//   training: dx = a * dy + b * (x - mean) + c, with (a, b, c) from K3's table;
//   eval:     dx = dy * weight * invstd (x is not read).
#include "common.cuh"

namespace fastpbn {
namespace {

using namespace dev;

template <bool TRAIN>
__device__ __forceinline__ void coef_at(const DxCoef& k, int64_t C, int64_t c, float& a, float& b,
                                        float& cc, float& mu) {
  if constexpr (TRAIN) {
    a = k.coef[c];
    b = k.coef[C + c];
    cc = k.coef[2 * C + c];
    mu = k.mean[c];
  } else {
    a = float(param_at(k.weight, c, 1.0) * double(k.invstd[c]));
    b = cc = mu = 0.f;
  }
}

template <typename T, int V, bool TRAIN>
__global__ void __launch_bounds__(kThreads)
    grad_input_planar_kernel(View dy,  // [N, C, S] grad_output, any strides
                             View x,   // [N, C, S] input (read in training only)
                             View dx,  // [N, C, S] output, x's dtype
                             Tiling t, DxCoef k) {
  const int64_t c = blockIdx.x;
  const PlanarRange r = planar_range(t, blockIdx.y);
  float a, b, cc, mu;
  coef_at<TRAIN>(k, t.C, c, a, b, cc, mu);
  const T* gc = static_cast<const T*>(dy.p) + c * dy.sc;
  const T* xc = static_cast<const T*>(x.p) + c * x.sc;
  T* dc = static_cast<T*>(dx.p) + c * dx.sc;
  const int64_t step = int64_t(blockDim.x) * V;
  for (int64_t i = r.n0 + threadIdx.y; i < r.n1; i += blockDim.y) {
    for (int64_t s = r.s0 + int64_t(threadIdx.x) * V; s < r.s1; s += step) {
      float gv[V], xv[V];
      load<T, V>(gc + i * dy.sn + s * dy.ss, gv);
      if constexpr (TRAIN) load<T, V>(xc + i * x.sn + s * x.ss, xv);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if constexpr (TRAIN) {
          gv[j] = a * gv[j] + (b * (xv[j] - mu) + cc);
        } else {
          gv[j] = a * gv[j];
        }
      }
      store<T, V>(dc + i * dx.sn + s * dx.ss, gv);
    }
  }
}

template <typename T, int V, bool TRAIN>
__global__ void __launch_bounds__(kThreads)
    grad_input_rows_kernel(View dy,  // [N, C, S] grad_output, any strides
                           View x,   // [N, C, S] input (read in training only)
                           View dx,  // [N, C, S] output
                           Tiling t, DxCoef k) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c >= t.C) return;  // no block-wide synchronization in this kernel
  float a[V], b[V], cc[V], mu[V];
#pragma unroll
  for (int j = 0; j < V; ++j) coef_at<TRAIN>(k, t.C, c + j, a[j], b[j], cc[j], mu[j]);
  const int64_t m0 = int64_t(blockIdx.y) * t.mps, m1 = imin(t.N * t.S, m0 + t.mps);
  const T* gc = static_cast<const T*>(dy.p) + c * dy.sc;
  const T* xc = static_cast<const T*>(x.p) + c * x.sc;
  T* dc = static_cast<T*>(dx.p) + c * dx.sc;
  RowCursor cur(m0 + threadIdx.y, blockDim.y, t.S);
  for (int64_t m = m0 + threadIdx.y; m < m1; m += blockDim.y) {
    float gv[V], xv[V];
    load<T, V>(gc + cur.offset(dy), gv);
    if constexpr (TRAIN) load<T, V>(xc + cur.offset(x), xv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if constexpr (TRAIN) {
        gv[j] = a[j] * gv[j] + (b[j] * (xv[j] - mu[j]) + cc[j]);
      } else {
        gv[j] = a[j] * gv[j];
      }
    }
    store<T, V>(dc + cur.offset(dx), gv);
    cur.advance();
  }
}

template <typename T, int V, bool TRAIN>
void launch(const Tiling& t, const View& dy, const View& x, const View& dx, const DxCoef& k,
            cudaStream_t stream) {
  int bx, by;
  block_shape(t, V, &bx, &by);
  const dim3 grid(unsigned(channel_groups(t, V)), unsigned(t.splits)), block(bx, by);
  if (t.rows) {
    grad_input_rows_kernel<T, V, TRAIN><<<grid, block, 0, stream>>>(dy, x, dx, t, k);
  } else {
    grad_input_planar_kernel<T, V, TRAIN><<<grid, block, 0, stream>>>(dy, x, dx, t, k);
  }
}

template <typename T, bool TRAIN>
void launch_typed(const Tiling& t, const View& dy, const View& x, const View& dx,
                  const DxCoef& k, cudaStream_t stream) {
  constexpr int VW = vector_width<T>();
  const bool vec = TRAIN ? vector_ok(t, VW, {&dy, &x, &dx}) : vector_ok(t, VW, {&dy, &dx});
  if (vec) {
    launch<T, VW, TRAIN>(t, dy, x, dx, k, stream);
  } else {
    launch<T, 1, TRAIN>(t, dy, x, dx, k, stream);
  }
}

}  // namespace

cudaError_t launch_grad_input(DType dt, const Geometry& g, const View& dy, const View& x,
                              const View& dx, const DxCoef& k, int sm_count, cudaStream_t stream) {
  if (g.C == 0 || g.N * g.S == 0) return cudaSuccess;
  const Tiling t = plan_elementwise(g, x, sm_count);
  return dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    if (k.coef) {
      launch_typed<T, true>(t, dy, x, dx, k, stream);
    } else {
      launch_typed<T, false>(t, dy, x, dx, k, stream);
    }
    return cudaGetLastError();
  });
}

}  // namespace fastpbn
