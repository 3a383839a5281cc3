// K3: per-channel gradient sums, one launch.
//
// Sum(dy) and Sum(dy * (x - mean)) per channel (centred by the saved mean, so the sums stay
// small when |mean| >> std), split like K1; the last block of a channel group adds the
// partials in split order in float64 and writes dw = Sum(dy*(x-mean)) * invstd, db = Sum(dy),
// and, for training, K4's coefficients
//   a = invstd * w,  b = -a * invstd^2 * Sum(dy*(x-mean)) / n,  c = -a * Sum(dy) / n
// so that dx = a * dy + b * (x - mean) + c.
#include "common.cuh"

namespace fastpbn {
namespace {

using namespace dev;

struct Partials {
  float* sdy;   // [splits, C] Sum(dy)
  float* sdyx;  // [splits, C] Sum(dy * (x - mean))
  unsigned* counters;
};

__device__ void write_channel(const GradOutputs& o, const Tiling& t, int64_t c, double sdy,
                              double sdyx) {
  const double invstd = o.invstd[c];
  if (o.dw) param_store(o.dw, o.grad_dt, c, sdyx * invstd);
  if (o.db) param_store(o.db, o.grad_dt, c, sdy);
  if (o.coef) {
    const double n = double(t.N) * double(t.S);
    const double a = invstd * param_at(o.weight, c, 1.0);
    o.coef[c] = float(a);
    o.coef[t.C + c] = float(-a * invstd * invstd * sdyx / n);
    o.coef[2 * t.C + c] = float(-a * sdy / n);
  }
}

__device__ void finalize(const Tiling& t, const Partials& p, const GradOutputs& out, int64_t c0,
                         int G) {
  __shared__ double sa[kThreads], sb[kThreads];
  const int tid = flat_tid();
  const int P = lanes_per_channel(G);
  const int g = tid / P, lane = tid % P;
  double a = 0.0, b = 0.0;
  if (g < G) {
    for (int64_t k = lane; k < t.splits; k += P) {
      a += __ldcg(p.sdy + k * t.C + c0 + g);
      b += __ldcg(p.sdyx + k * t.C + c0 + g);
    }
  }
  sa[tid] = a;
  sb[tid] = b;
  __syncthreads();
  tree_sums<double>(sa, sb, tid, lane, P, 1);
  if (g < G && lane == 0) write_channel(out, t, c0 + g, sa[tid], sb[tid]);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    grad_reduce_planar_kernel(View dy,  // [N, C, S] grad_output, any strides (stride 0 too)
                              View x,   // [N, C, S] input
                              Tiling t, Partials p, GradOutputs out) {
  __shared__ float sa[kThreads], sb[kThreads];
  const int tid = flat_tid();
  const int64_t c = blockIdx.x, k = blockIdx.y;
  const PlanarRange r = planar_range(t, k);
  const float mu = out.mean[c];
  const T* gc = static_cast<const T*>(dy.p) + c * dy.sc;
  const T* xc = static_cast<const T*>(x.p) + c * x.sc;
  const int64_t step = int64_t(blockDim.x) * V;
  float sdy = 0.f, sdyx = 0.f;
  for (int64_t i = r.n0 + threadIdx.y; i < r.n1; i += blockDim.y) {
    const T* gr = gc + i * dy.sn;
    const T* xr = xc + i * x.sn;
#pragma unroll 2
    for (int64_t s = r.s0 + int64_t(threadIdx.x) * V; s < r.s1; s += step) {
      float gv[V], xv[V];
      load<T, V>(gr + s * dy.ss, gv);
      load<T, V>(xr + s * x.ss, xv);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        sdy += gv[j];
        sdyx += gv[j] * (xv[j] - mu);
      }
    }
  }
  sa[tid] = sdy;
  sb[tid] = sdyx;
  __syncthreads();
  tree_sums<float>(sa, sb, tid, tid, kThreads, 1);
  if (tid == 0) {
    p.sdy[k * t.C + c] = sa[0];
    p.sdyx[k * t.C + c] = sb[0];
  }
  if (!last_block_to_arrive(p.counters + c, gridDim.y)) return;
  finalize(t, p, out, c, 1);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    grad_reduce_rows_kernel(View dy,  // [N, C, S] grad_output, any strides
                            View x,   // [N, C, S] input, channels contiguous when V > 1
                            Tiling t, Partials p, GradOutputs out) {
  __shared__ float sa[kThreads], sb[kThreads];
  const int bx = blockDim.x, by = blockDim.y, ty = threadIdx.y, tid = flat_tid();
  const int64_t c0 = int64_t(blockIdx.x) * bx * V, c = c0 + int64_t(threadIdx.x) * V;
  const int64_t k = blockIdx.y;
  const bool active = c < t.C;
  const int64_t m0 = k * t.mps, m1 = imin(t.N * t.S, m0 + t.mps);
  float mu[V], sdy[V], sdyx[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    mu[j] = c + j < t.C ? out.mean[c + j] : 0.f;
    sdy[j] = sdyx[j] = 0.f;
  }
  if (active) {
    const T* gc = static_cast<const T*>(dy.p) + c * dy.sc;
    const T* xc = static_cast<const T*>(x.p) + c * x.sc;
    RowCursor cur(m0 + ty, by, t.S);
#pragma unroll 2
    for (int64_t m = m0 + ty; m < m1; m += by) {
      float gv[V], xv[V];
      load<T, V>(gc + cur.offset(dy), gv);
      load<T, V>(xc + cur.offset(x), xv);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        sdy[j] += gv[j];
        sdyx[j] += gv[j] * (xv[j] - mu[j]);
      }
      cur.advance();
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    sa[tid] = sdy[j];
    sb[tid] = sdyx[j];
    __syncthreads();
    tree_sums<float>(sa, sb, tid, ty, by, bx);
    if (ty == 0 && c + j < t.C) {
      p.sdy[k * t.C + c + j] = sa[tid];
      p.sdyx[k * t.C + c + j] = sb[tid];
    }
    __syncthreads();
  }
  if (!last_block_to_arrive(p.counters + blockIdx.x, gridDim.y)) return;
  finalize(t, p, out, c0, int(imin(int64_t(bx) * V, t.C - c0)));
}

template <typename T, int V>
void launch(const Tiling& t, const View& dy, const View& x, const Partials& p,
            const GradOutputs& out, cudaStream_t stream) {
  int bx, by;
  block_shape(t, V, &bx, &by);
  const dim3 grid(unsigned(channel_groups(t, V)), unsigned(t.splits)), block(bx, by);
  if (t.rows) {
    grad_reduce_rows_kernel<T, V><<<grid, block, 0, stream>>>(dy, x, t, p, out);
  } else {
    grad_reduce_planar_kernel<T, V><<<grid, block, 0, stream>>>(dy, x, t, p, out);
  }
}

}  // namespace

cudaError_t launch_grad_reduce(DType dt, const Geometry& g, const View& dy, const View& x,
                               const GradOutputs& out, const Workspace& ws, int sm_count,
                               cudaStream_t stream) {
  if (g.C == 0 || g.N * g.S == 0) return cudaSuccess;
  const Tiling t = plan_reduce(g, x, sm_count);
  const Partials p{ws.partial_a, ws.partial_b, ws.counters};
  return dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int VW = vector_width<T>();
    if (vector_ok(t, VW, {&dy, &x})) {
      launch<T, VW>(t, dy, x, p, out, stream);
    } else {
      launch<T, 1>(t, dy, x, p, out, stream);
    }
    return cudaGetLastError();
  });
}

}  // namespace fastpbn
