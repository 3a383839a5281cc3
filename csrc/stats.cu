// K1: per-channel batch statistics, one launch.
//
// Values are taken relative to a pivot, the channel's first value (near the mean in real
// data), so float sums keep the precision of the spread rather than of |mean| (|mean|/std of
// 1e4 and more). Each thread folds chunks of its values into a float (count, mean, M2): a
// chunk's own mean and centred M2 are computed in registers, then merged with Chan's delta
// formula; threads merge in a fixed tree, and every block writes one (mean, M2) partial per
// channel (its count follows from the tiling). The last block of a channel group merges the
// partials in float64 (shifted sums about the first split's mean, lanes combined in a fixed
// tree) and writes what StatsOutputs asks for: mean / var / invstd, K2's affine table
// (centred on the pivot), running stats (PyTorch's rule, unbiased variance, momentum or
// 1 / num_batches_tracked read on the device) and the merge into a float64 multi-batch Welford
// state. No host sync.
#include "common.cuh"

namespace fastpbn {
namespace {

using namespace dev;

struct Partials {
  float* mean;  // [splits, C]
  float* m2;    // [splits, C]
  unsigned* counters;
};

// `pivot` is the channel's first value; `shifted` its mean relative to it (what the partials
// hold), so mean = pivot + shifted.
__device__ void write_channel(const StatsOutputs& o, int64_t C, int64_t c, double n, float pivot,
                              double shifted, double m2) {
  const double mean = double(pivot) + shifted;
  const double var = m2 / n;
  const double invstd = 1.0 / sqrt(var + o.eps);
  if (o.mean) o.mean[c] = float(mean);
  if (o.var) o.var[c] = float(var);
  if (o.invstd) o.invstd[c] = float(invstd);
  if (o.affine) {  // K2 centres on the pivot, a value of x: x - pivot is exact near the mean
    const double scale = param_at(o.weight, c, 1.0) * invstd;
    o.affine[c] = pivot;
    o.affine[C + c] = float(scale);
    o.affine[2 * C + c] = float(param_at(o.bias, c, 0.0) - shifted * scale);
  }
  if (o.running_mean) {
    const double f =
        o.momentum_from_counter ? 1.0 / double(*o.num_batches_tracked) : o.momentum;
    const Param rm{o.running_mean, o.running_dt}, rv{o.running_var, o.running_dt};
    param_store(o.running_mean, o.running_dt, c, (1.0 - f) * param_at(rm, c, 0.0) + f * mean);
    param_store(o.running_var, o.running_dt, c,
                (1.0 - f) * param_at(rv, c, 0.0) + f * var * n / (n - 1.0));
  }
  if (o.acc_mean) {
    double count = param_at(Param{o.acc_count, o.acc_count_dt}, c, 0.0);
    double am = o.acc_mean[c], am2 = o.acc_m2[c];
    chan_merge<double>(count, am, am2, n, mean, m2);
    param_store(o.acc_count, o.acc_count_dt, c, count);
    o.acc_mean[c] = am;
    o.acc_m2[c] = am2;
  }
}

// The first value of channel c (n = 0, s = 0): every block of the channel pivots on it.
template <typename T>
__device__ __forceinline__ float pivot_of(const View& x, int64_t c) {
  return to_float(static_cast<const T*>(x.p)[c * x.sc]);
}

// Run by the last block of a group: channels c0 .. c0 + G - 1.
template <typename T>
__device__ void finalize(const View& x, const Tiling& t, const Partials& p,
                         const StatsOutputs& out, int64_t c0, int G) {
  __shared__ double sn[kThreads], smean[kThreads], sm2[kThreads];
  const int tid = flat_tid();
  const int P = lanes_per_channel(G);
  const int g = tid / P, lane = tid % P;
  double n = 0.0, mean = 0.0, m2 = 0.0;
  if (g < G) {
    // Shifted sums about split 0's mean rather than a Chan merge per split: no division and
    // no dependent chain through the running mean, so up to 4 * SMs splits cost a few FMAs
    // each (a lane may own all of a channel's splits when the group is wide). In float64,
    // with the pivot inside the data, s2 - s1^2 / n does not cancel.
    const int64_t c = c0 + g;
    const double pivot = __ldcg(p.mean + c);
    double s1 = 0.0, s2 = 0.0;
    for (int64_t k = lane; k < t.splits; k += P) {
      const double nk = double(split_values(t, k));
      const double d = double(__ldcg(p.mean + k * t.C + c)) - pivot;
      n += nk;
      s1 += nk * d;
      s2 += double(__ldcg(p.m2 + k * t.C + c)) + nk * d * d;
    }
    if (n > 0.0) {
      mean = pivot + s1 / n;
      m2 = s2 - s1 * s1 / n;
      if (m2 < 0.0) m2 = 0.0;  // (not fmax: a NaN must come through)
    }
  }
  sn[tid] = n;
  smean[tid] = mean;
  sm2[tid] = m2;
  __syncthreads();
  tree_moments<double>(sn, smean, sm2, tid, lane, P, 1);
  if (g < G && lane == 0) {
    write_channel(out, t.C, c0 + g, sn[tid], pivot_of<T>(x, c0 + g), smean[tid], sm2[tid]);
  }
}

// Planar: block (c, k) reduces channel c over split k's rectangle; U vectors per chunk.
template <typename T, int V, int U>
__global__ void __launch_bounds__(kThreads)
    stats_planar_kernel(View x,  // [N, C, S] input, planar strides
                        Tiling t, Partials p, StatsOutputs out) {
  __shared__ float sn[kThreads], smean[kThreads], sm2[kThreads];
  const int tid = flat_tid();
  const int64_t c = blockIdx.x, k = blockIdx.y;
  const PlanarRange r = planar_range(t, k);
  const int64_t step = int64_t(blockDim.x) * V;
  const T* xc = static_cast<const T*>(x.p) + c * x.sc;
  const float pivot = pivot_of<T>(x, c);
  float n = 0.f, mean = 0.f, m2 = 0.f;  // of x - pivot
  for (int64_t i = r.n0 + threadIdx.y; i < r.n1; i += blockDim.y) {
    const T* row = xc + i * x.sn;
    for (int64_t s = r.s0 + int64_t(threadIdx.x) * V; s < r.s1; s += step * U) {
      float v[U][V];
      float cnt = 0.f, sum = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t su = s + u * step;
        if (su < r.s1) {
          load<T, V>(row + su * x.ss, v[u]);
          cnt += float(V);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            v[u][j] -= pivot;
            sum += v[u][j];
          }
        }
      }
      const float cm = sum / cnt;
      float cm2 = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (s + u * step < r.s1) {
#pragma unroll
          for (int j = 0; j < V; ++j) cm2 += (v[u][j] - cm) * (v[u][j] - cm);
        }
      }
      chan_merge<float>(n, mean, m2, cnt, cm, cm2);
    }
  }
  sn[tid] = n;
  smean[tid] = mean;
  sm2[tid] = m2;
  __syncthreads();
  tree_moments<float>(sn, smean, sm2, tid, tid, kThreads, 1);
  if (tid == 0) {
    p.mean[k * t.C + c] = smean[0];
    p.m2[k * t.C + c] = sm2[0];
  }
  if (!last_block_to_arrive(p.counters + c, gridDim.y)) return;
  finalize<T>(x, t, p, out, c, 1);
}

// Rows: block (group, k) reduces bx*V adjacent channels over split k's rows; each thread holds
// V channels and folds U rows per chunk.
template <typename T, int V, int U>
__global__ void __launch_bounds__(kThreads)
    stats_rows_kernel(View x,  // [N, C, S] input, channels contiguous (sc == 1 when V > 1)
                      Tiling t, Partials p, StatsOutputs out) {
  __shared__ float sn[kThreads], smean[kThreads], sm2[kThreads];
  const int bx = blockDim.x, by = blockDim.y, ty = threadIdx.y, tid = flat_tid();
  const int64_t c0 = int64_t(blockIdx.x) * bx * V, c = c0 + int64_t(threadIdx.x) * V;
  const int64_t k = blockIdx.y;
  const bool active = c < t.C;
  const int64_t m0 = k * t.mps, m1 = imin(t.N * t.S, m0 + t.mps);
  const T* xc = static_cast<const T*>(x.p) + (active ? c * x.sc : 0);
  float n = 0.f, mean[V], m2[V], pivot[V];  // moments of x - pivot
#pragma unroll
  for (int j = 0; j < V; ++j) {
    mean[j] = m2[j] = 0.f;
    pivot[j] = active ? pivot_of<T>(x, c + j) : 0.f;
  }
  RowCursor cur(m0 + ty, by, t.S);
  for (int64_t m = m0 + ty; m < m1; m += int64_t(by) * U) {
    float v[U][V];
    float cnt = 0.f, sum[V];
#pragma unroll
    for (int j = 0; j < V; ++j) sum[j] = 0.f;
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int j = 0; j < V; ++j) v[u][j] = 0.f;
      if (m + int64_t(u) * by < m1) {
        cnt += 1.f;
        if (active) {
          load<T, V>(xc + cur.offset(x), v[u]);
#pragma unroll
          for (int j = 0; j < V; ++j) v[u][j] -= pivot[j];
        }
#pragma unroll
        for (int j = 0; j < V; ++j) sum[j] += v[u][j];
      }
      cur.advance();
    }
    const float w = cnt / (n + cnt);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float cm = sum[j] / cnt;
      float cm2 = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (m + int64_t(u) * by < m1) cm2 += (v[u][j] - cm) * (v[u][j] - cm);
      }
      const float delta = cm - mean[j];
      m2[j] += cm2 + delta * delta * n * w;
      mean[j] += delta * w;
    }
    n += cnt;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    sn[tid] = n;
    smean[tid] = mean[j];
    sm2[tid] = m2[j];
    __syncthreads();
    tree_moments<float>(sn, smean, sm2, tid, ty, by, bx);
    if (ty == 0 && c + j < t.C) {
      p.mean[k * t.C + c + j] = smean[tid];
      p.m2[k * t.C + c + j] = sm2[tid];
    }
    __syncthreads();
  }
  if (!last_block_to_arrive(p.counters + blockIdx.x, gridDim.y)) return;
  finalize<T>(x, t, p, out, c0, int(imin(int64_t(bx) * V, t.C - c0)));
}

template <typename T, int V>
void launch(const Tiling& t, const View& x, const Partials& p, const StatsOutputs& out,
            cudaStream_t stream) {
  int bx, by;
  block_shape(t, V, &bx, &by);
  const dim3 grid(unsigned(channel_groups(t, V)), unsigned(t.splits)), block(bx, by);
  if (t.rows) {
    stats_rows_kernel<T, V, (V >= 8 ? 2 : 4)><<<grid, block, 0, stream>>>(x, t, p, out);
  } else {
    stats_planar_kernel<T, V, (V == 1 ? 4 : (8 / V > 1 ? 8 / V : 1))>
        <<<grid, block, 0, stream>>>(x, t, p, out);
  }
}

}  // namespace

cudaError_t launch_stats(DType dt, const Geometry& g, const View& x, const StatsOutputs& out,
                         const Workspace& ws, int sm_count, cudaStream_t stream) {
  if (g.C == 0 || g.N * g.S == 0) return cudaSuccess;
  const Tiling t = plan_reduce(g, x, sm_count);
  const Partials p{ws.partial_a, ws.partial_b, ws.counters};
  return dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int VW = vector_width<T>();
    if (vector_ok(t, VW, {&x})) {
      launch<T, VW>(t, x, p, out, stream);
    } else {
      launch<T, 1>(t, x, p, out, stream);
    }
    return cudaGetLastError();
  });
}

}  // namespace fastpbn
