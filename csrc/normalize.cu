// K2: y = (x - center[c]) * scale[c] + shift[c], elementwise.
//
// Centring before scaling (rather than x*scale + shift with shift = b - mean*scale) keeps full
// float precision when |mean| >> std; it costs one subtraction on a memory-bound kernel.
// Training reads (center, scale, shift) from the table K1 wrote; eval computes them per thread
// from the running statistics, so eval is one launch.
#include "common.cuh"

namespace fastpbn {
namespace {

using namespace dev;

__device__ __forceinline__ void affine_at(const Affine& a, int64_t C, int64_t c, float& center,
                                          float& scale, float& shift) {
  if (a.table) {
    center = a.table[c];
    scale = a.table[C + c];
    shift = a.table[2 * C + c];
  } else {
    const double invstd = 1.0 / sqrt(param_at(a.var, c, 1.0) + a.eps);
    center = float(param_at(a.mean, c, 0.0));
    scale = float(param_at(a.weight, c, 1.0) * invstd);
    shift = float(param_at(a.bias, c, 0.0));
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    normalize_planar_kernel(View x,  // [N, C, S] input
                            View y,  // [N, C, S] output, x's dtype, any dense strides
                            Tiling t, Affine a) {
  const int64_t c = blockIdx.x;
  const PlanarRange r = planar_range(t, blockIdx.y);
  float center, scale, shift;
  affine_at(a, t.C, c, center, scale, shift);
  const T* xc = static_cast<const T*>(x.p) + c * x.sc;
  T* yc = static_cast<T*>(y.p) + c * y.sc;
  const int64_t step = int64_t(blockDim.x) * V;
  for (int64_t i = r.n0 + threadIdx.y; i < r.n1; i += blockDim.y) {
    const T* xr = xc + i * x.sn;
    T* yr = yc + i * y.sn;
    for (int64_t s = r.s0 + int64_t(threadIdx.x) * V; s < r.s1; s += step) {
      float v[V];
      load<T, V>(xr + s * x.ss, v);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = (v[j] - center) * scale + shift;
      store<T, V>(yr + s * y.ss, v);
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    normalize_rows_kernel(View x,  // [N, C, S] input, channels contiguous when V > 1
                          View y,  // [N, C, S] output
                          Tiling t, Affine a) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c >= t.C) return;  // no block-wide synchronization in this kernel
  float center[V], scale[V], shift[V];
#pragma unroll
  for (int j = 0; j < V; ++j) affine_at(a, t.C, c + j, center[j], scale[j], shift[j]);
  const int64_t m0 = int64_t(blockIdx.y) * t.mps, m1 = imin(t.N * t.S, m0 + t.mps);
  const T* xc = static_cast<const T*>(x.p) + c * x.sc;
  T* yc = static_cast<T*>(y.p) + c * y.sc;
  RowCursor cur(m0 + threadIdx.y, blockDim.y, t.S);
  for (int64_t m = m0 + threadIdx.y; m < m1; m += blockDim.y) {
    float v[V];
    load<T, V>(xc + cur.offset(x), v);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = (v[j] - center[j]) * scale[j] + shift[j];
    store<T, V>(yc + cur.offset(y), v);
    cur.advance();
  }
}

template <typename T, int V>
void launch(const Tiling& t, const View& x, const View& y, const Affine& a, cudaStream_t stream) {
  int bx, by;
  block_shape(t, V, &bx, &by);
  const dim3 grid(unsigned(channel_groups(t, V)), unsigned(t.splits)), block(bx, by);
  if (t.rows) {
    normalize_rows_kernel<T, V><<<grid, block, 0, stream>>>(x, y, t, a);
  } else {
    normalize_planar_kernel<T, V><<<grid, block, 0, stream>>>(x, y, t, a);
  }
}

}  // namespace

cudaError_t launch_normalize(DType dt, const Geometry& g, const View& x, const View& y,
                             const Affine& a, int sm_count, cudaStream_t stream) {
  if (g.C == 0 || g.N * g.S == 0) return cudaSuccess;
  const Tiling t = plan_elementwise(g, x, sm_count);
  return dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int VW = vector_width<T>();
    if (vector_ok(t, VW, {&x, &y})) {
      launch<T, VW>(t, x, y, a, stream);
    } else {
      launch<T, 1>(t, x, y, a, stream);
    }
    return cudaGetLastError();
  });
}

}  // namespace fastpbn
