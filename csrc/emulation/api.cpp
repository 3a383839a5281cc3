// extern "C" entry points over the real launchers (fastpbn_cuda.h), for the tests' ctypes
// driver. Arrays keep the signatures short: g = (N, C, S), strides = (sn, sc, ss) in elements,
// dts = DType codes, p = pointers (nullptr for absent optional tensors).
#include "fastpbn_cuda.h"

using namespace fastpbn;

namespace emu {
extern int block_order;
}

namespace {

Geometry geo(const int64_t* g) { return Geometry{g[0], g[1], g[2]}; }
View view(void* p, const int64_t* s) { return View{p, s[0], s[1], s[2]}; }
Param param(const void* p, int dt) { return Param{p, DType(dt)}; }
Workspace workspace(const int64_t* g, const View& x, int sm, float* ws, unsigned* counters) {
  const int64_t splits = plan_reduce(geo(g), x, sm).splits;
  return Workspace{ws, ws + splits * g[1], ws + 2 * splits * g[1], counters};
}

}  // namespace

extern "C" {

void emu_set_block_order(int order) { emu::block_order = order; }

// out = (floats, counters) of the workspace.
void emu_workspace_size(const int64_t* g, const int64_t* xs, int sm, int64_t* out) {
  workspace_size(geo(g), view(nullptr, xs), sm, &out[0], &out[1]);
}

// out = (rows tiling, splits, column splits, vector access for x alone) of the reductions.
void emu_plan(const int64_t* g, void* x, const int64_t* xs, int vec, int sm, int64_t* out) {
  const View xv = view(x, xs);
  const Tiling t = plan_reduce(geo(g), xv, sm);
  out[0] = t.rows;
  out[1] = t.splits;
  out[2] = t.csplits;
  out[3] = vector_ok(t, vec, {&xv});
}

// p: mean, var, invstd, affine, weight, bias, running_mean, running_var, num_batches_tracked,
//    acc_count, acc_mean, acc_m2. dts: x, weight, bias, running stats, acc_count.
int emu_stats(const int* dts, const int64_t* g, void* x, const int64_t* xs, void** p,
              double momentum, int from_counter, double eps, float* ws, unsigned* counters,
              int sm) {
  StatsOutputs o{};
  o.mean = static_cast<float*>(p[0]);
  o.var = static_cast<float*>(p[1]);
  o.invstd = static_cast<float*>(p[2]);
  o.affine = static_cast<float*>(p[3]);
  o.weight = param(p[4], dts[1]);
  o.bias = param(p[5], dts[2]);
  o.running_mean = p[6];
  o.running_var = p[7];
  o.running_dt = DType(dts[3]);
  o.num_batches_tracked = static_cast<const int64_t*>(p[8]);
  o.momentum = momentum;
  o.momentum_from_counter = from_counter != 0;
  o.eps = eps;
  o.acc_count = p[9];
  o.acc_count_dt = DType(dts[4]);
  o.acc_mean = static_cast<double*>(p[10]);
  o.acc_m2 = static_cast<double*>(p[11]);
  const View xv = view(x, xs);
  return launch_stats(DType(dts[0]), geo(g), xv, o, workspace(g, xv, sm, ws, counters), sm,
                      nullptr);
}

// p: table, mean, var, weight, bias. dts: x, mean, var, weight, bias.
int emu_normalize(const int* dts, const int64_t* g, void* x, const int64_t* xs, void* y,
                  const int64_t* ys, void** p, double eps, int sm) {
  Affine a{};
  a.table = static_cast<const float*>(p[0]);
  a.mean = param(p[1], dts[1]);
  a.var = param(p[2], dts[2]);
  a.weight = param(p[3], dts[3]);
  a.bias = param(p[4], dts[4]);
  a.eps = eps;
  return launch_normalize(DType(dts[0]), geo(g), view(x, xs), view(y, ys), a, sm, nullptr);
}

// p: mean, invstd, weight, dw, db, coef. dts: x, weight, dw/db.
int emu_grad_reduce(const int* dts, const int64_t* g, void* dy, const int64_t* dys, void* x,
                    const int64_t* xs, void** p, float* ws, unsigned* counters, int sm) {
  GradOutputs o{};
  o.mean = static_cast<const float*>(p[0]);
  o.invstd = static_cast<const float*>(p[1]);
  o.weight = param(p[2], dts[1]);
  o.dw = p[3];
  o.db = p[4];
  o.grad_dt = DType(dts[2]);
  o.coef = static_cast<float*>(p[5]);
  const View xv = view(x, xs);
  return launch_grad_reduce(DType(dts[0]), geo(g), view(dy, dys), xv, o,
                            workspace(g, xv, sm, ws, counters), sm, nullptr);
}

// p: coef, mean, invstd, weight. dts: x, weight.
int emu_grad_input(const int* dts, const int64_t* g, void* dy, const int64_t* dys, void* x,
                   const int64_t* xs, void* dx, const int64_t* dxs, void** p, int sm) {
  const DxCoef k{static_cast<const float*>(p[0]), static_cast<const float*>(p[1]),
                 static_cast<const float*>(p[2]), param(p[3], dts[1])};
  return launch_grad_input(DType(dts[0]), geo(g), view(dy, dys), view(x, xs), view(dx, dxs), k,
                           sm, nullptr);
}

}  // extern "C"
