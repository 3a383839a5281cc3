// Torch binding of the CUDA kernels: checks tensors, turns them into (N, C, S) views and
// launches on the current stream. Outputs and the workspace are allocated by the caller
// (fastpbn/_cuda_ext.py); every function here writes into tensors it is given.

// ATen's Tensor and torch's pybind11 casters are all this file needs; torch/extension.h
// (the whole C++ frontend) would triple the build time.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <optional>
#include <string>

#include "fastpbn_cuda.h"

namespace {

using at::Tensor;
using fastpbn::DType;
using fastpbn::Geometry;
using fastpbn::Param;
using fastpbn::View;
using OptTensor = std::optional<Tensor>;

// Numbers and shapes in messages go through std::to_string, not the stream's operator<<:
// on the H100 machine every failing check whose message streamed an int64 crashed the
// process (SIGSEGV), while one streaming strings and dtypes raised. Cause not found; this
// avoids the one difference seen (to be confirmed by test_gpu_binding_rejects_bad_input).
std::string num(int64_t v) { return std::to_string(v); }
std::string num(double v) {
  char s[32];
  std::snprintf(s, sizeof s, "%g", v);  // (std::to_string prints -1e-8 as -0.000000)
  return s;
}

std::string dims(at::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}

DType dtype_of(const Tensor& t, const char* name, bool allow_double = true) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    case at::kDouble:
      if (allow_double) return DType::f64;
      break;
    default: break;
  }
  TORCH_CHECK(false, name, " must be float32, float16 or bfloat16",
              allow_double ? " (or float64)" : "", ", got ", t.scalar_type());
  return DType::f32;  // unreachable
}

int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= int(cache.size())) device = 0;
  int n = cache[device].load();
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n);
  }
  return n;
}

Geometry geometry_of(const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() >= 2, "x must have shape (N, C, *), got ", dims(x.sizes()));
  int64_t S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
  return {x.size(0), x.size(1), S};
}

// (sn, sc, ss) of t seen as (N, C, S); size-1 dims get stride 0.
View view_of(const Tensor& t, const Tensor& x, const Geometry& g, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have x's shape ", dims(x.sizes()),
              ", got ", dims(t.sizes()));
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  View v{t.data_ptr(), g.N > 1 ? t.stride(0) : 0, g.C > 1 ? t.stride(1) : 0, 0};
  int64_t span = 0;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (span == 0) {
      v.ss = t.stride(d);
      span = t.size(d);
    } else {
      TORCH_CHECK(t.stride(d) == v.ss * span, name, ": the spatial dims (strides ",
                  dims(t.strides()), ") cannot be viewed as one; pass a contiguous tensor");
      span *= t.size(d);
    }
  }
  return v;
}

void check_channel(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.numel() == x.size(1), name, " should contain ", num(x.size(1)),
              " elements not ", num(t.numel()));
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

Param param_of(const OptTensor& t, const Tensor& x, const char* name) {
  if (!t.has_value()) return {nullptr, DType::f32};
  check_channel(*t, x, name);
  return {t->data_ptr(), dtype_of(*t, name)};
}

float* float_channel(const Tensor& t, const Tensor& x, const char* name) {
  check_channel(t, x, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  return t.data_ptr<float>();
}

fastpbn::Workspace workspace_of(const Tensor& ws, const Tensor& counters, const Tensor& x,
                                const Geometry& g, const View& xv, int sms) {
  int64_t floats = 0, ints = 0;
  fastpbn::workspace_size(g, xv, sms, &floats, &ints);
  TORCH_CHECK(ws.device() == x.device() && ws.scalar_type() == at::kFloat && ws.is_contiguous() &&
                  ws.numel() >= floats,
              "workspace must be a contiguous float32 tensor of at least ", num(floats),
              " elements on ", x.device());
  TORCH_CHECK(counters.device() == x.device() && counters.scalar_type() == at::kInt &&
                  counters.is_contiguous() && counters.numel() >= ints,
              "counters must be a contiguous, zeroed int32 tensor of at least ", num(ints),
              " elements on ", x.device());
  const int64_t splits = fastpbn::plan_reduce(g, xv, sms).splits;
  float* f = ws.data_ptr<float>();
  return {f, f + splits * g.C, f + 2 * splits * g.C,
          reinterpret_cast<unsigned*>(counters.data_ptr<int32_t>())};
}

cudaStream_t stream_of(const Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
}

std::vector<int64_t> workspace_size(const Tensor& x) {
  const Geometry g = geometry_of(x);
  int64_t floats = 0, ints = 0;
  fastpbn::workspace_size(g, view_of(x, x, g, "x"), sm_count(x.get_device()), &floats, &ints);
  return {floats, ints};
}

// K1 on x with the outputs in `o`; returns the workspace it used.
fastpbn::Workspace run_stats(const Tensor& x, fastpbn::StatsOutputs o, const Tensor& ws,
                             const Tensor& counters, bool with_affine = false) {
  const Geometry g = geometry_of(x);
  TORCH_CHECK(g.N * g.S > 0, "x has no values per channel (shape ", dims(x.sizes()), ")");
  const c10::cuda::CUDAGuard guard(x.device());
  const View xv = view_of(x, x, g, "x");
  const int sms = sm_count(x.get_device());
  const auto w = workspace_of(ws, counters, x, g, xv, sms);
  if (with_affine) o.affine = w.per_channel;
  C10_CUDA_CHECK(fastpbn::launch_stats(dtype_of(x, "x", false), g, xv, o, w, sms, stream_of(x)));
  return w;
}

fastpbn::StatsOutputs no_outputs(double eps) {
  fastpbn::StatsOutputs o{};
  o.weight = o.bias = Param{nullptr, DType::f32};
  o.running_dt = o.acc_count_dt = DType::f64;
  o.eps = eps;
  return o;
}

// The float64 Welford state (count, mean, m2) the batch is merged into.
void set_acc(fastpbn::StatsOutputs& o, const Tensor& x, const Tensor& count, const Tensor& mean,
             const Tensor& m2) {
  check_channel(count, x, "acc count");
  check_channel(mean, x, "acc mean");
  check_channel(m2, x, "acc m2");
  TORCH_CHECK(mean.scalar_type() == at::kDouble && m2.scalar_type() == at::kDouble,
              "acc mean and m2 must be float64, got ", mean.scalar_type(), " and ",
              m2.scalar_type());
  TORCH_CHECK(count.scalar_type() == at::kDouble || count.scalar_type() == at::kLong,
              "acc count must be float64 or int64, got ", count.scalar_type());
  o.acc_count = count.data_ptr();
  o.acc_count_dt = count.scalar_type() == at::kLong ? DType::i64 : DType::f64;
  o.acc_mean = mean.data_ptr<double>();
  o.acc_m2 = m2.data_ptr<double>();
}

void forward_train(const Tensor& x, const Tensor& y, const OptTensor& weight,
                   const OptTensor& bias, const OptTensor& running_mean,
                   const OptTensor& running_var, const OptTensor& num_batches_tracked,
                   std::optional<double> momentum, double eps, const OptTensor& acc_count,
                   const OptTensor& acc_mean, const OptTensor& acc_m2, const Tensor& save_mean,
                   const Tensor& save_invstd, const Tensor& ws, const Tensor& counters) {
  const Geometry g = geometry_of(x);
  TORCH_CHECK(eps > 0.0, "eps must be positive in training, got ", num(eps));
  auto o = no_outputs(eps);
  o.mean = float_channel(save_mean, x, "save_mean");
  o.invstd = float_channel(save_invstd, x, "save_invstd");
  o.weight = param_of(weight, x, "weight");
  o.bias = param_of(bias, x, "bias");
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "running_mean and running_var must both be given or both be None");
  if (running_mean.has_value()) {
    const Param rm = param_of(running_mean, x, "running_mean");
    const Param rv = param_of(running_var, x, "running_var");
    TORCH_CHECK(rm.dt == rv.dt, "running_mean and running_var must have the same dtype");
    o.running_mean = running_mean->data_ptr();
    o.running_var = running_var->data_ptr();
    o.running_dt = rm.dt;
    if (momentum.has_value()) {
      o.momentum = *momentum;
    } else if (num_batches_tracked.has_value()) {
      const Tensor& nbt = *num_batches_tracked;
      TORCH_CHECK(nbt.device() == x.device() && nbt.scalar_type() == at::kLong && nbt.numel() == 1,
                  "num_batches_tracked must be a one-element int64 tensor on ", x.device());
      o.num_batches_tracked = nbt.data_ptr<int64_t>();
      o.momentum_from_counter = true;
    }  // momentum None without a counter: factor 0, as PyTorch
  }
  TORCH_CHECK(acc_count.has_value() == acc_mean.has_value() &&
                  acc_mean.has_value() == acc_m2.has_value(),
              "acc must be all of (count, mean, m2) or None");
  if (acc_mean.has_value()) set_acc(o, x, *acc_count, *acc_mean, *acc_m2);
  const View yv = view_of(y, x, g, "y");
  const auto w = run_stats(x, o, ws, counters, /*with_affine=*/true);
  fastpbn::Affine a{};
  a.table = w.per_channel;
  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(fastpbn::launch_normalize(dtype_of(x, "x", false), g, view_of(x, x, g, "x"), yv,
                                           a, sm_count(x.get_device()), stream_of(x)));
}

void forward_eval(const Tensor& x, const Tensor& y, const OptTensor& weight,
                  const OptTensor& bias, const Tensor& running_mean, const Tensor& running_var,
                  double eps) {
  const Geometry g = geometry_of(x);
  fastpbn::Affine a{};
  a.mean = param_of(running_mean, x, "running_mean");
  a.var = param_of(running_var, x, "running_var");
  a.weight = param_of(weight, x, "weight");
  a.bias = param_of(bias, x, "bias");
  a.eps = eps;
  const View yv = view_of(y, x, g, "y");
  const View xv = view_of(x, x, g, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(fastpbn::launch_normalize(dtype_of(x, "x", false), g, xv, yv, a,
                                           sm_count(x.get_device()), stream_of(x)));
}

void backward(const Tensor& grad_out, const Tensor& x, const OptTensor& weight,
              const Tensor& mean, const Tensor& invstd, bool training, const OptTensor& dx,
              const OptTensor& dw, const OptTensor& db, const Tensor& ws,
              const Tensor& counters) {
  const Geometry g = geometry_of(x);
  const DType dt = dtype_of(x, "x", false);
  const View gv = view_of(grad_out, x, g, "grad_out");
  const View xv = view_of(x, x, g, "x");
  fastpbn::GradOutputs o{};
  o.mean = float_channel(mean, x, "mean");
  o.invstd = float_channel(invstd, x, "invstd");
  o.weight = param_of(weight, x, "weight");
  o.grad_dt = DType::f32;
  TORCH_CHECK(!dw.has_value() || !db.has_value() || dw->scalar_type() == db->scalar_type(),
              "dw and db must have the same dtype");
  if (dw.has_value()) {
    o.grad_dt = param_of(dw, x, "dw").dt;
    o.dw = dw->data_ptr();
  }
  if (db.has_value()) {
    o.grad_dt = param_of(db, x, "db").dt;
    o.db = db->data_ptr();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int sms = sm_count(x.get_device());
  const cudaStream_t stream = stream_of(x);
  const auto w = workspace_of(ws, counters, x, g, xv, sms);
  if (g.N * g.S == 0) {  // no values: zero parameter gradients, empty dx
    if (dw.has_value()) dw->zero_();
    if (db.has_value()) db->zero_();
    return;
  }
  if (training && dx.has_value()) o.coef = w.per_channel;
  if (o.coef || o.dw || o.db) {
    C10_CUDA_CHECK(fastpbn::launch_grad_reduce(dt, g, gv, xv, o, w, sms, stream));
  }
  if (dx.has_value()) {
    const View dxv = view_of(*dx, x, g, "dx");
    const fastpbn::DxCoef k{o.coef, o.mean, o.invstd, o.weight};
    C10_CUDA_CHECK(fastpbn::launch_grad_input(dt, g, gv, xv, dxv, k, sms, stream));
  }
}

void batch_stats(const Tensor& x, const Tensor& mean, const Tensor& var, const Tensor& ws,
                 const Tensor& counters) {
  geometry_of(x);
  auto o = no_outputs(0.0);
  o.mean = float_channel(mean, x, "mean");
  o.var = float_channel(var, x, "var");
  run_stats(x, o, ws, counters);
}

void welford_update(const Tensor& x, const Tensor& count, const Tensor& mean, const Tensor& m2,
                    const Tensor& ws, const Tensor& counters) {
  geometry_of(x);
  auto o = no_outputs(0.0);
  set_acc(o, x, count, mean, m2);
  run_stats(x, o, ws, counters);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpbn CUDA kernels (K1 statistics, K2 normalize, K3/K4 backward)";
  m.def("workspace_size", &workspace_size, "(floats, counters) the reductions need for x");
  m.def("forward_train", &forward_train, "K1 + K2: training batch norm into y");
  m.def("forward_eval", &forward_eval, "K2 with the running statistics into y");
  m.def("backward", &backward, "K3 + K4 into dx / dw / db");
  m.def("batch_stats", &batch_stats, "K1: float32 mean and biased variance");
  m.def("welford_update", &welford_update, "K1: merge x into a float64 Welford state");
}
