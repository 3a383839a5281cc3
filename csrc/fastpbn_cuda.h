// The C++ interface of the CUDA kernels: plain structs of raw pointers, sizes and strides, and
// one launcher per kernel returning cudaError_t. No torch header: the binding
// (fastpbn_cuda.cpp) translates tensors into these structs.
//
// Every tensor is seen as (N, C, S) by strides: element (n, c, s) lives at
// p[n*sn + c*sc + s*ss] (S = the product of the spatial dims, collapsed into one stride).
// Two tilings follow from x's strides:
//   planar (NCHW-like, sc != 1): a block owns one channel and a rectangle of the N x S plane;
//   rows (channels_last, (N, C); sc == 1): a block owns a group of adjacent channels and a range
//        of the N*S "rows"; threads along x walk channels (vector loads), along y walk rows.
// The reductions (K1, K3) split each channel's N*S values over grid.y; the last block of a
// channel group to finish merges the per-split partials in a fixed order, so results are
// deterministic, and needs no second launch.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#if defined(__CUDACC__)
#define FASTPBN_HD __host__ __device__
#else
#define FASTPBN_HD
#endif

namespace fastpbn {

constexpr int kBlockThreads = 256;            // every kernel runs 256-thread blocks
constexpr int64_t kMaxGridY = 65535;          // hardware limit on grid.y (the splits)
constexpr int64_t kMaxSplitValues = 1 << 22;  // keeps float counts inside a split exact

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3, i64 = 4 };

struct Geometry {
  int64_t N, C, S;
};

// One tensor's strides, in elements. A dim of size 1 gets stride 0.
struct View {
  void* p;
  int64_t sn, sc, ss;
};

// A per-channel (C,) contiguous tensor of any float dtype, or p == nullptr (absent).
struct Param {
  const void* p;
  DType dt;
};

struct Tiling {
  int64_t N, C, S;
  bool rows;        // rows tiling (see the top of this file), else planar
  int64_t splits;   // grid.y
  int64_t rps;      // planar: n per split
  int64_t cps;      // planar: s per split (a multiple of 8 unless csplits == 1)
  int64_t csplits;  // planar: splits along s
  int64_t mps;      // rows: rows (n*S + s) per split
};

// Scratch for the reductions; `partial_*` are [splits, C], `per_channel` is [3, C].
// `counters` ([C]) must be zero before the first launch; every launch leaves them zero.
struct Workspace {
  float* partial_a;
  float* partial_b;
  float* per_channel;
  unsigned* counters;
};

// K1 outputs, each optional (nullptr). Float64 arithmetic per channel.
struct StatsOutputs {
  float* mean;    // [C] batch mean
  float* var;     // [C] biased batch variance
  float* invstd;  // [C] 1 / sqrt(var + eps)
  float* affine;  // [3, C] (center, scale, shift) for K2: mean, weight*invstd, bias
  Param weight, bias;
  void* running_mean;  // [C] updated in place, PyTorch's rule (unbiased variance)
  void* running_var;
  DType running_dt;
  const int64_t* num_batches_tracked;  // device counter, read when momentum_from_counter
  double momentum;
  bool momentum_from_counter;  // factor = 1 / num_batches_tracked (cumulative average)
  double eps;
  void* acc_count;  // [C] float64 or int64 count of a multi-batch Welford state
  DType acc_count_dt;
  double* acc_mean;  // [C] merged with the batch by Chan's formula
  double* acc_m2;
};

// K2 coefficients: y = (x - center) * scale + shift.
struct Affine {
  const float* table;  // [3, C] written by K1, or nullptr: the eval formula below
  Param mean, var, weight, bias;  // eval: center = mean, scale = weight / sqrt(var + eps)
  double eps;
};

// K3 inputs and outputs. dw = sum(dy * (x - mean)) * invstd, db = sum(dy).
struct GradOutputs {
  const float* mean;    // [C] the statistics the forward normalized with
  const float* invstd;  // [C]
  Param weight;
  void* dw;  // [C] or nullptr
  void* db;  // [C] or nullptr
  DType grad_dt;
  float* coef;  // [3, C] (a, b, c) for K4 in training, or nullptr
};

// K4: dx = a * dy + b * (x - mean) + c (training: a, b, c from K3), dy * weight * invstd (eval).
struct DxCoef {
  const float* coef;  // [3, C] from K3, or nullptr for eval
  const float* mean;
  const float* invstd;
  Param weight;
};

FASTPBN_HD inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Values per channel in split k of a tiling.
FASTPBN_HD inline int64_t split_values(const Tiling& t, int64_t k) {
  if (t.rows) {
    const int64_t m0 = k * t.mps, m1 = m0 + t.mps < t.N * t.S ? m0 + t.mps : t.N * t.S;
    return m1 - m0;
  }
  const int64_t rk = k / t.csplits, ck = k % t.csplits;
  const int64_t n0 = rk * t.rps, n1 = n0 + t.rps < t.N ? n0 + t.rps : t.N;
  const int64_t s0 = ck * t.cps, s1 = s0 + t.cps < t.S ? s0 + t.cps : t.S;
  return (n1 - n0) * (s1 - s0);
}

inline bool rows_layout(const Geometry& g, const View& x) { return g.C > 1 && x.sc == 1; }

// Split each channel's N*S values so that about `target_blocks` blocks run, none with fewer
// than `min_elems` elements (unless the tensor is that small). Pure function of its inputs:
// the workspace size and the launch agree.
inline Tiling plan_tiling(const Geometry& g, bool rows, int64_t target_blocks, int64_t min_elems) {
  const int64_t R = g.N * g.S;
  Tiling t{g.N, g.C, g.S, rows, 1, g.N, g.S, 1, R};
  if (R == 0 || g.C == 0) return t;  // no values: one empty split (callers launch nothing)
  const int64_t per_block_channels = rows ? std::min<int64_t>(g.C, 64) : 1;
  const int64_t groups = ceil_div(g.C, per_block_channels);
  int64_t want = ceil_div(target_blocks, groups);
  want = std::min(want, ceil_div(R, ceil_div(min_elems, per_block_channels)));
  want = std::max(want, ceil_div(R, kMaxSplitValues));
  want = std::max<int64_t>(1, std::min(want, kMaxGridY / 2));
  if (rows) {
    t.mps = ceil_div(R, want);
    t.splits = ceil_div(R, t.mps);
  } else if (g.N >= want) {
    t.rps = ceil_div(g.N, want);
    t.splits = ceil_div(g.N, t.rps);
  } else {
    // few samples: split the spatial extent too; column chunks stay multiples of 8 so that
    // vector accesses never straddle a split
    t.rps = 1;
    t.cps = ceil_div(ceil_div(g.S, ceil_div(want, g.N)), 8) * 8;
    if (t.cps >= g.S) t.cps = g.S;
    t.csplits = ceil_div(g.S, t.cps);
    t.splits = g.N * t.csplits;  // < 2 * want <= kMaxGridY
  }
  return t;
}

inline Tiling plan_reduce(const Geometry& g, const View& x, int sm_count) {
  return plan_tiling(g, rows_layout(g, x), 4 * int64_t(sm_count), 4096);
}

inline Tiling plan_elementwise(const Geometry& g, const View& x, int sm_count) {
  return plan_tiling(g, rows_layout(g, x), 16 * int64_t(sm_count), 8192);
}

// Workspace for K1/K3 on x: floats (2 * splits * C + 3 * C) and counters (C).
inline void workspace_size(const Geometry& g, const View& x, int sm_count, int64_t* floats,
                           int64_t* counters) {
  const Tiling t = plan_reduce(g, x, sm_count);
  *floats = 2 * t.splits * g.C + 3 * g.C;
  *counters = g.C;
}

// Block shape (bx * by == kBlockThreads) for a tiling and vector width.
inline void block_shape(const Tiling& t, int vec, int* bx, int* by) {
  const int64_t want = t.rows ? ceil_div(t.C, vec) : ceil_div(t.csplits > 1 ? t.cps : t.S, vec);
  const int64_t cap = t.rows ? 32 : kBlockThreads;
  int64_t b = 1;
  while (b < want && b < cap) b *= 2;
  *bx = int(b);
  *by = kBlockThreads / int(b);
}

// Channel groups (grid.x) for a tiling and vector width.
inline int64_t channel_groups(const Tiling& t, int vec) {
  if (!t.rows) return t.C;
  int bx, by;
  block_shape(t, vec, &bx, &by);
  return ceil_div(t.C, int64_t(bx) * vec);
}

// Whether every view allows `vec`-wide (16-byte) accesses along its contiguous axis.
inline bool vector_ok(const Tiling& t, int vec, std::initializer_list<const View*> views) {
  if (vec <= 1) return false;
  if (t.rows ? t.C % vec : t.S % vec) return false;
  if (!t.rows && t.csplits > 1 && t.cps % vec) return false;
  for (const View* v : views) {
    if (reinterpret_cast<uintptr_t>(v->p) % 16 != 0) return false;
    if (t.rows && (v->sc != 1 || v->sn % vec || v->ss % vec)) return false;
    if (!t.rows && (v->ss != 1 || v->sn % vec || v->sc % vec)) return false;
  }
  return true;
}

// x: fp32 / fp16 / bf16 (dt). Launchers return immediately when C == 0 or N*S == 0.
// K1: per-channel statistics and everything StatsOutputs asks for, in one launch.
cudaError_t launch_stats(DType dt, const Geometry& g, const View& x, const StatsOutputs& out,
                         const Workspace& ws, int sm_count, cudaStream_t stream);
// K2: y = (x - center) * scale + shift.
cudaError_t launch_normalize(DType dt, const Geometry& g, const View& x, const View& y,
                             const Affine& a, int sm_count, cudaStream_t stream);
// K3: gradient sums per channel -> dw, db and the K4 coefficients, in one launch.
cudaError_t launch_grad_reduce(DType dt, const Geometry& g, const View& dy, const View& x,
                               const GradOutputs& out, const Workspace& ws, int sm_count,
                               cudaStream_t stream);
// K4: dx. x is read only in training (coef != nullptr).
cudaError_t launch_grad_input(DType dt, const Geometry& g, const View& dy, const View& x,
                              const View& dx, const DxCoef& k, int sm_count, cudaStream_t stream);

}  // namespace fastpbn
