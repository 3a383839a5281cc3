"""The ``torch`` backend: PyTorch's own batch-norm kernels plus a vectorized Welford merge.

Serves every device and dtype. Batch statistics are centred (see :func:`batch_norm_train`), so
they keep full float32 precision at any |mean|/std; batches are merged into float64 state with
Chan's formula. PyTorch's kernels are called with ``out=`` on the CPU only, where their
behaviour was checked (CUDA's differ: :func:`_kernel_stats`); every output comes back in the
layout :func:`~fastpbn._scratch.output_like` gives, whatever layout a kernel chose.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor

from ._scratch import output_like, stats_dtype


def _channel_view(v: Tensor, x: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def chan_merge_(
    count: Tensor, mean: Tensor, m2: Tensor, count_b: Tensor, mean_b: Tensor, m2_b: Tensor
) -> None:
    """Merge per-channel (count_b, mean_b, m2_b) into (count, mean, m2), in place, in delta
    form (Chan et al.): ``mean += delta·nb/n``, ``m2 += m2_b + delta²·na·nb/n``. Channels with
    n = 0 stay zero."""
    n = count + count_b
    w = count_b / n.clamp_min(1.0)  # counts are whole numbers: n = 0 only when count_b = 0
    delta = mean_b - mean
    m2.add_(m2_b).addcmul_(delta * delta, count * w)
    mean.addcmul_(delta, w)
    count.copy_(n)


_TRACING_MODES = tuple(getattr(torch._C._TorchDispatchModeKey, k)
                       for k in ("FAKE", "PROXY", "FUNCTIONAL")
                       if hasattr(torch._C._TorchDispatchModeKey, k))


def caching_allowed() -> bool:
    """Whether a buffer made now may be kept for later calls: not while a fake, proxy or
    functional mode is active, whose tensors would then poison every later real call (other
    dispatch modes, profilers and checkpointing policies, make real tensors)."""
    return all(torch._C._get_dispatch_mode(k) is None for k in _TRACING_MODES)


# Grow-only scratch for the centred copy of x: a fresh multi-MB tensor per call costs more in
# page faults than the subtraction itself (CPU has no caching allocator). One byte buffer per
# thread, whatever the dtype, capped, so a huge activation does not pin memory for the life of
# the thread.
_SCRATCH_MAX_BYTES = 1 << 28
_local = threading.local()  # one scratch per thread: concurrent callers must not share it


def _thread_scratch(dtype: torch.dtype, need: int) -> Tensor:
    """This thread's grow-only CPU scratch (one for every dtype), as ``need`` values of
    ``dtype``; made outside inference mode, so it is usable in and out of it."""
    if not caching_allowed():
        return torch.empty(need, dtype=dtype, device="cpu")
    nbytes = need * dtype.itemsize
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.numel() < nbytes:
        with torch.inference_mode(False):
            buf = _local.scratch = torch.empty(nbytes, dtype=torch.uint8, device="cpu")
    return buf[:nbytes].view(dtype)


_LAST_FORMATS = (torch.channels_last, torch.channels_last_3d)


def _scratch_like(x: Tensor) -> Tensor:
    """An uninitialised float32 (float64 for float64 x) tensor laid out as ``output_like(x)``:
    PyTorch's batch-norm kernels write an ``out=`` y in their input's layout, and leave the
    saved statistics unwritten for an input in another dense order (a transposed view), so
    the centred copy d that they read must have y's layout (contiguous or channels_last)."""
    need, dtype = x.numel(), stats_dtype(x)
    if x.is_contiguous() or any(x.is_contiguous(memory_format=f) for f in _LAST_FORMATS):
        stride = x.stride()
    else:
        stride = output_like(x, device="meta").stride()
    # CUDA's caching allocator already recycles memory (and a shared buffer would race across
    # streams): the scratch is for CPU only
    if x.device.type != "cpu" or need * dtype.itemsize > _SCRATCH_MAX_BYTES:
        return torch.empty_strided(x.shape, stride, dtype=dtype, device=x.device)
    return _thread_scratch(dtype, need).as_strided(x.shape, stride)


# The centred path's mean(d²) - mean(d)² stands while mean(d)² <= mean(d²) / CANCEL (at most
# a 1e-3 relative loss); past it, the variance takes one more pass about the mean
CANCEL = 1000.0

# CPU float tensors with at least this many values take the centred two-pass path; below it
# PyTorch's one fused kernel call beats several vectorized passes
CENTRED_MIN_NUMEL = 1 << 15


def _empty(x: Tensor) -> Tensor:
    """A size-0 tensor for the CPU eval kernel's unused outputs (one per thread and dtype; the
    CPU kernel leaves them alone, so one tensor serves as both)."""
    if x.device.type != "cpu" or not caching_allowed():
        return x.new_empty(0)
    empty = _local.__dict__.setdefault("empty", {})
    if x.dtype not in empty:
        with torch.inference_mode(False):
            empty[x.dtype] = x.new_empty(0)
    return empty[x.dtype]


def _kernel_stats(x: Tensor) -> bool:
    """Whether :func:`batch_norm_train`'s general path takes the statistics from PyTorch's
    training kernel run with eps = 0 and y from its eval kernel, both with ``out=``: on the
    CPU, where that was measured fastest and where those kernels leave an eval call's
    save_mean / save_invstd alone and report invstd = 0 for var = 0. Not elsewhere: CUDA's
    ``batch_norm_cuda_out`` in eval resizes save_mean, copies the running mean into it and then
    writes invstd into save_invstd (one scratch passed as both normalized by invstd), and
    reports invstd = rsqrt(0) = inf; there the statistics are one ``torch.var_mean`` and y one
    ``addcmul`` (:func:`_normalize`), documented ops on any device."""
    return x.device.type == "cpu"


def _normalize(d: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
               var: Tensor, eps: float, out: Tensor) -> Tensor:
    """``out = (d − mean)·weight/sqrt(var + eps) + bias`` as one pass, ``d·scale + shift``
    with per-channel scale and shift (in the statistics' dtype), written in out's own layout
    and dtype. d is centred near the mean (or |mean|/std is small), so shift = bias −
    mean·scale loses nothing."""
    scale = torch.add(var, eps).rsqrt_()
    if weight is not None:
        scale.mul_(weight)
    shift = torch.mul(mean, scale).neg_()
    if bias is not None:
        shift.add_(bias)
    return torch.addcmul(_channel_view(shift, d), d, _channel_view(scale, d), out=out)


def _in_output_layout(t: Tensor, x: Tensor) -> Tensor:
    """t (shaped like x) in the layout :func:`output_like` gives x, copied only where it is
    not (the fakes promise output_like's): CUDA's training kernel gives y ``empty_like(x)``,
    x's own strides for a dense permutation (a transposed view), where its CPU kernel gives
    x's suggested memory format; a backward kernel's dx may come in another layout too."""
    if t.stride() == output_like(x, device="meta").stride():
        return t
    return output_like(x).copy_(t)


# PyTorch's training kernel (a module attribute: a test swaps in one with CUDA's output layout)
_native_batch_norm = torch.ops.aten.native_batch_norm


def _centred_ok(x: Tensor) -> bool:
    """Large contiguous (N, C, ...) CPU float tensors with 8 or more values per sample and
    channel. Measured: below these sizes PyTorch's one fused kernel call is faster, and its
    channels_last kernel is fast (its NCHW one is 2–3x slower than the centred passes)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.numel() >= CENTRED_MIN_NUMEL and x.numel() >= 8 * x.shape[0] * x.shape[1]
            and x.is_contiguous())


def _sums_in_float32(x: Tensor) -> bool:
    """Whether PyTorch's CPU training kernel would sum x's channels in float32: its
    channels-last path, which serves channels_last 4-d / 5-d tensors and every (N, C) or
    (N, C, 1...) input. Its variance is then off by ~1e-5 at 10^5 values per channel
    (measured; its other paths sum in float64, ~1e-7), so statistics that are kept (an
    accumulator, ``batch_stats``) take the centred passes instead."""
    if x.device.type != "cpu":
        return False
    if x.numel() == x.shape[0] * x.shape[1]:
        return True
    return not x.is_contiguous() and any(x.is_contiguous(memory_format=f) for f in _LAST_FORMATS)


def _channel_mean(x: Tensor, out: Tensor) -> Tensor:
    """Per-channel mean of x (N, C, *) into ``out`` (C,). Contiguous x: small spatial extents
    reduce over N first (rows of C·HW values add with full vectors); larger ones, from 32
    samples, take each (n, c) row's mean, then add the N row means in float64. (PyTorch's
    float32 mean over (0, 2, ...) adds the samples one after another: measured 2e-6 relative
    at N = 16000, against 4e-10 this way, which is as fast or faster from HW = 64; below 32
    samples the few extra calls cost more than the precision they would buy.)"""
    n, c = x.shape[:2]
    hw = x.numel() // (n * c)
    if x.is_contiguous():
        rows = x.view(n, c, hw)
        if hw < 64:
            return torch.mean(rows.mean(0), 1, out=out)
        if n >= 32:
            return out.copy_(rows.mean(2).sum(0, dtype=torch.float64).div_(n))
    return torch.mean(x, _reduce_dims(x), out=out)


def batch_norm_train(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
    pivot: Tensor, mean_s: Tensor, var: Tensor, shift: bool = True,
) -> Tensor:
    """Training-mode batch norm of ``x``; returns y and writes a per-channel pivot K, the mean
    of x − K and the biased variance of x into the given (C,) tensors (float32; float64 for
    float64 x). Exact at any |mean|/std: every statistic is taken on data centred near the
    mean, never as E[x²] − E[x]².

    Large contiguous CPU float tensors (~2–3x faster than PyTorch's NCHW CPU training kernel),
    and the CPU layouts whose PyTorch kernel sums in float32 (:func:`_sums_in_float32`; for
    exactness; fp16 / bf16 there are converted to float32 first): a centred two-pass
    computation in vectorized PyTorch passes. K is the mean from a first
    pass; d = x − K; mean_s = mean(d) and var = mean(d²) − mean_s² (the corrected two-pass
    algorithm: mean_s is only K's rounding error, so nothing cancels); y = (d − mean_s)·w/
    sqrt(var + eps) + b by PyTorch's eval kernel on d. Everything else: d = x − K with K a
    sample of each channel; on the CPU (small NCHW tensors, where PyTorch's kernel sums in
    float64) PyTorch's training kernel run on d with eps = 0 (var = invstd⁻², exact even where
    var ≪ eps), then y by its eval kernel; on other devices (CUDA, see :func:`_kernel_stats`)
    mean_s and var by ``torch.var_mean`` on d (exact), then y by one pass
    (:func:`_normalize`).

    ``shift=False`` is for data whose |mean|/std is known to be small (see
    :func:`mean_dwarfs_std`), where K's rounding is ~1e-6 of the std at most: the large-tensor
    path skips the correction pass and d (var = mean((x − K)²), y from x); on contiguous x the
    other one runs PyTorch's kernel on x itself (K = 0). Fewer passes, same accuracy.
    """
    if _centred_ok(x) or _sums_in_float32(x):
        if x.dtype not in (torch.float32, torch.float64):
            x, out_dtype = x.float(), x.dtype
            if weight is not None:
                weight, bias = weight.float(), None if bias is None else bias.float()
        else:
            out_dtype = x.dtype
        _channel_mean(x, pivot)
        y = output_like(x)  # first holds the squared deviations
        if shift:
            src = torch.sub(x, _channel_view(pivot, x), out=_scratch_like(x))  # d
            centre = _channel_mean(src, mean_s)
            _channel_mean(torch.mul(src, src, out=y), var)  # mean(d²)
            if torch.addcmul(var, mean_s, mean_s, value=-CANCEL).min().item() >= 0:
                var.addcmul_(mean_s, mean_s, value=-1)
            else:  # K is off by a fair part of the std somewhere (|mean|/std ~1e5 and up, a
                # constant channel): mean(d²) - mean_s² would cancel, even below 0; centre d
                _channel_mean(torch.sub(src, _channel_view(mean_s, x), out=y).square_(), var)
        else:  # K's rounding is negligible against the std: no correction pass, no d
            src, centre = x, pivot
            mean_s.zero_()
            _channel_mean(torch.sub(x, _channel_view(pivot, x), out=y).square_(), var)
        empty = _empty(x)
        torch.ops.aten.native_batch_norm.out(
            src, weight, bias, centre, var, False, 0.0, eps,
            out=y, save_mean=empty, save_invstd=empty,
        )
        return y.to(out_dtype)
    if shift or not x.is_contiguous():  # other layouts' kernel accumulates in float32
        pivot.copy_(x[(0, slice(None)) + (0,) * (x.dim() - 2)])
        d = torch.sub(x, _channel_view(pivot, x), out=_scratch_like(x))
    else:
        pivot.zero_()
        d = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if weight is not None and weight.dtype != d.dtype:
        weight, bias = weight.to(d.dtype), None if bias is None else bias.to(d.dtype)
    if not _kernel_stats(d):  # (CUDA) Welford in the work dtype on d, then y in x's dtype
        v, m = torch.var_mean(d, _reduce_dims(d), correction=0)
        var.copy_(v)
        mean_s.copy_(m)
        return _normalize(d, weight, bias, mean_s, var, eps, output_like(x))
    y = output_like(x, d.dtype)  # x's layout: d may be a contiguous copy
    # the statistics with eps = the dtype's smallest normal number: var from invstd =
    # 1/sqrt(var + eps) loses ~2.4e-7 * eps/var relatively (2e-3 at std 1e-5 with the layer's
    # eps 1e-5; nothing above var ~1e-30 with this one), and unlike eps = 0, a variance that
    # overflows (invstd 0) stays apart from a zero one (invstd 1/sqrt(tiny), exactly) ...
    tiny = torch.finfo(d.dtype).tiny
    torch.ops.aten.native_batch_norm.out(
        d, None, None, None, None, True, 0.0, tiny, out=y, save_mean=mean_s, save_invstd=var
    )
    _var_from_invstd_(var, tiny)
    if eps != 0.0 or weight is not None or bias is not None:  # ... then y with eps
        empty = _empty(d)
        torch.ops.aten.native_batch_norm.out(
            d, weight, bias, mean_s, var, False, 0.0, eps,
            out=y, save_mean=empty, save_invstd=empty,
        )
    return y.to(x.dtype)


MEAN_STD_RATIO = 5.0


def mean_dwarfs_std(pivot: Tensor, mean_s: Tensor, var: Tensor) -> bool:
    """Whether some channel's |mean|/std is at least MEAN_STD_RATIO (or its variance is 0 or
    not finite), from what :func:`batch_norm_train` wrote: where it is not, a float32 mean is
    exact enough to run without the shift: within one rounding (3e-7 of the std) from
    PyTorch's NCHW kernel, within ~1e-6 of the std from a float32 ``torch.mean`` (measured
    worst 1.1e-6 at |mean|/std = 4.9). One host read (three small ops: it runs on every
    unshifted call of a recompute pass)."""
    mean = mean_s + pivot
    # var - mean²/R² > 0 everywhere; NaN (and var = 0) fail it
    return not torch.addcmul(var, mean, mean, value=-1.0 / MEAN_STD_RATIO**2).min().item() > 0


def _var_from_invstd_(invstd: Tensor, tiny: float) -> Tensor:
    """invstd = 1/sqrt(var + tiny) (the training kernel's, run with eps = ``tiny``, a power of
    two: 0 exactly for a constant channel) -> var, in place; inf where var overflowed
    (invstd 0), which the callers' finiteness checks then report."""
    return invstd.pow_(-2).sub_(tiny).clamp_min_(0.0)


def moments64(pivot: Tensor, mean_s: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 (mean, biased var) from what :func:`batch_norm_train` wrote (new tensors: for
    float64 x, ``.double()`` would alias the inputs)."""
    return mean_s.double() + pivot, var.to(torch.float64, copy=True)


def _batch_norm_train64(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, float64 mean, float64 biased var) of :func:`batch_norm_train`."""
    pivot, mean_s, var = torch.empty(3, x.shape[1], dtype=stats_dtype(x), device=x.device)
    y = batch_norm_train(x, weight, bias, eps, pivot, mean_s, var)
    return (y, *moments64(pivot, mean_s, var))


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor, int]:
    _, mean, var = _batch_norm_train64(x, None, None, 0.0)
    return mean.float(), var.float(), x.numel() // x.shape[1]


def _merge_batch(acc: tuple[Tensor, Tensor, Tensor], mean_b: Tensor, var_b: Tensor,
                 n: int) -> None:
    """Merge a batch of n values per channel (float64 mean, biased var) into acc, in place."""
    chan_merge_(*acc, torch.full_like(acc[0], n), mean_b, var_b * n)


def welford_update(x: Tensor, count: Tensor, mean: Tensor, m2: Tensor) -> None:
    _, mean_b, var_b = _batch_norm_train64(x, None, None, 0.0)
    _merge_batch((count, mean, m2), mean_b, var_b, x.numel() // x.shape[1])


def _momentum(momentum: Optional[float], num_batches_tracked: Optional[Tensor]) -> float:
    if momentum is not None:
        return momentum
    return 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0


def forward_train(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    acc: Optional[tuple[Tensor, Tensor, Tensor]],
) -> tuple[Tensor, Tensor, Tensor]:
    factor = _momentum(momentum, num_batches_tracked) if running_mean is not None else 0.0
    if acc is None and not _centred_ok(x) and _native_takes(x, weight, bias, running_mean,
                                                            running_var):
        y, save_mean, save_invstd = _native_batch_norm(
            x, weight, bias, running_mean, running_var, True, factor, eps
        )
        if not x.is_contiguous():  # CUDA's y has x's own strides (a transposed view's too)
            y = _in_output_layout(y, x)
        work = stats_dtype(x)
        return y, save_mean.to(work), save_invstd.to(work)
    # one exact statistics pass serves the normalization, the float64 state and running stats
    n = x.numel() // x.shape[1]
    # three allocations: the two returned become the op's outputs, which may not alias
    pivot, mean_s, var = (x.new_empty(x.shape[1], dtype=stats_dtype(x)) for _ in range(3))
    y = batch_norm_train(x, weight, bias, eps, pivot, mean_s, var)
    if acc is not None:
        _merge_batch(acc, *moments64(pivot, mean_s, var), n)
    mean = mean_s.add_(pivot)  # float32; float64 for float64 x (its saved statistics too)
    if running_mean is not None:  # PyTorch's rule: the unbiased variance goes into running_var
        _update_running_(running_mean, mean, factor)
        _update_running_(running_var, var.mul(n / max(n - 1, 1)), factor)
    return y, mean, var.add_(eps).rsqrt_()


def _update_running_(buf: Tensor, batch: Tensor, factor: float) -> None:
    """``buf = (1 - f)·buf + f·batch`` as PyTorch computes it: in the statistics' dtype,
    rounded once into the buffer (a float16 buffer takes a blend whose batch value alone would
    overflow it; and an infinite buffer stays infinite, where a lerp would make it NaN)."""
    buf.copy_(torch.add(batch * factor, buf, alpha=1.0 - factor))


# Below this many values an eager module call is faster through PyTorch's kernel and C++
# autograd than through the centred passes behind a Python autograd node (measured: 80K values
# 0.80x vs 1.0x, 400K values 1.8x vs 1.0x stock)
NATIVE_EAGER_MAX_NUMEL = 1 << 18


def native_train(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                 running_mean: Optional[Tensor] = None,
                 running_var: Optional[Tensor] = None) -> bool:
    """Whether an eager training call without an accumulator should be PyTorch's own kernel and
    autograd (:func:`native_forward_train`): where :func:`forward_train` would run that kernel
    anyway (it takes the per-channel tensors' dtypes), and where the centred path saves less
    than a Python autograd node costs."""
    return _native_takes(x, weight, bias, running_mean, running_var) and (
        x.numel() < NATIVE_EAGER_MAX_NUMEL or not _centred_ok(x))


def _native_takes(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> bool:
    """Whether PyTorch's training kernel takes the per-channel tensors' dtypes: its CUDA kernel
    every mix fastpbn accepts, its CPU kernel one dtype for all (bfloat16 parameters with
    float32 running statistics, which FSDP's mixed precision leaves, go to the centred path
    there). Weight and bias share a dtype, and so do the running statistics (fastpbn.ops
    checked)."""
    params = weight if weight is not None else bias
    stats = running_mean if running_mean is not None else running_var
    return params is None or stats is None or params.dtype == stats.dtype or x.is_cuda


def native_forward_train(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
) -> Tensor:
    """``torch.batch_norm`` in training mode, with PyTorch's autograd (see ops)."""
    factor = _momentum(momentum, num_batches_tracked) if running_mean is not None else 0.0
    return torch.batch_norm(x, _packed(weight), bias, running_mean, running_var, True, factor,
                            eps, torch.backends.cudnn.enabled)  # as F.batch_norm


def exported_forward_train(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
) -> Tensor:
    """:func:`native_forward_train` for ``torch.export``: PyTorch's own ops, which an exported
    program can differentiate. With ``momentum=None`` the factor 1/num_batches_tracked stays
    a tensor (stock's ``float()`` of it cannot be exported) and the running statistics (the
    unbiased variance, as PyTorch's kernel writes) are updated beside the op."""
    if momentum is not None or running_mean is None:
        return native_forward_train(x, weight, bias, running_mean, running_var,
                                    num_batches_tracked, momentum, eps)
    y = native_forward_train(x, weight, bias, None, None, None, 0.0, eps)
    if num_batches_tracked is not None:
        with torch.no_grad():
            var, mean = torch.var_mean(x.to(stats_dtype(x)), _reduce_dims(x), correction=1)
            f = num_batches_tracked.double().reciprocal().to(mean.dtype)
            for buf, batch in ((running_mean, mean), (running_var, var)):
                # as _update_running_: in the statistics' dtype, rounded once into the buffer
                # (an infinite buffer stays infinite, where a lerp would make it NaN)
                buf.copy_(batch * f + buf.to(batch.dtype) * (1 - f))
    return y


PIVOT_SAMPLES = 64


def centred_forward_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, K, mean − K, biased var, invstd) of a non-empty x as PyTorch's ops, for a graph
    being compiled (``fastpbn._function.CompiledBatchNormTrain``): centred, on d = x − K, in
    float32 (float64 for float64 x); a compiler fuses the subtraction into its passes over x.
    K is the mean of the middle position of up to PIVOT_SAMPLES samples: near the channel's
    mean, so that the var_mean of d in float32 stays exact at |mean| ≫ std, whatever one
    value (a padded border, a dead first element) holds; y does not move with K."""
    work, dims = stats_dtype(x), _reduce_dims(x)
    middle = x[(slice(None), slice(None)) + tuple(s // 2 for s in x.shape[2:])]  # (N, C)
    pivot = middle[:PIVOT_SAMPLES].detach().to(work).mean(0)
    d = x.to(work) - _channel_view(pivot, x)
    var, mean_d = torch.var_mean(d, dims, correction=0)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.to(work)
    y = (d - _channel_view(mean_d, x)) * _channel_view(scale, x)
    if bias is not None:
        y = y + _channel_view(bias.to(work), x)
    return _in_output_layout(y.to(x.dtype), x), pivot, mean_d, var, invstd


def centred_backward_train(
    grad_out: Tensor, x: Tensor, weight: Optional[Tensor], pivot: Tensor, mean_d: Tensor,
    invstd: Tensor, output_mask: tuple[bool, bool, bool],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The training backward of :func:`centred_forward_train` as PyTorch's ops: x̂ from
    (x − K) − mean(d), not from x − mean, whose float32 rounding would dominate at
    |mean| ≫ std; dx = w·invstd·(dy − mean(dy) − x̂·mean(dy·x̂)), dw = Σdy·x̂, db = Σdy."""
    work, dims = stats_dtype(x), _reduce_dims(x)
    g = grad_out.to(work)
    xhat = (x.to(work) - _channel_view(pivot, x) - _channel_view(mean_d, x)) \
        * _channel_view(invstd, x)
    sum_g, sum_gx = g.sum(dims), (g * xhat).sum(dims)
    dx = None
    if output_mask[0]:
        n = x.numel() // x.shape[1]
        a = invstd if weight is None else invstd * weight.to(work)
        dx = (g - _channel_view(sum_g / n, x) - xhat * _channel_view(sum_gx / n, x)) \
            * _channel_view(a, x)
        dx = _in_output_layout(dx.to(x.dtype), x)
    param_dtype = weight.dtype if weight is not None else work
    return (dx, sum_gx.to(param_dtype) if output_mask[1] else None,
            sum_g.to(param_dtype) if output_mask[2] else None)


def update_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                   n: int, momentum: Optional[float],
                   num_batches_tracked: Optional[Tensor]) -> None:
    """The running statistics as PyTorch's kernel updates them (the unbiased variance), from
    a batch's mean and biased variance of n values per channel; the factor ``momentum`` or
    1/num_batches_tracked (a tensor: read on the device, as a graph must)."""
    with torch.no_grad():
        if momentum is not None:
            f = momentum
        elif num_batches_tracked is not None:
            f = num_batches_tracked.double().reciprocal().to(mean.dtype)
        else:
            f = 0.0
        for buf, batch in ((running_mean, mean), (running_var, var * (n / (n - 1)))):
            # as _update_running_: in the statistics' dtype, rounded once into the buffer
            buf.copy_(batch * f + buf.to(batch.dtype) * (1 - f))


def forward_eval(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    return torch.batch_norm(x, _packed(weight), bias, _packed(running_mean),
                            _packed(running_var), False, 0.0, eps, torch.backends.cudnn.enabled)


def _packed(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` with unit stride. PyTorch's CPU backward for (N, C) inputs reads a strided
    weight (and, in eval, strided running statistics) as if packed: dx and dweight come out
    wrong (measured: off by 0.5 to 1e22). No copy for the usual packed tensor."""
    return None if t is None else t.contiguous()


def backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    output_mask: tuple[bool, bool, bool],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    if training:
        # fp16 / bf16 x with float32 statistics: PyTorch's mixed-dtype rule wants float32
        # parameters too (the gradients go back to the parameters' dtype below)
        w = _packed(weight if weight is None or weight.dtype == mean.dtype
                    else weight.to(mean.dtype))
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, w, None, None, mean, invstd, True, 0.0, list(output_mask)
        )
    else:
        dims, work = _reduce_dims(x), stats_dtype(x)
        g = grad_out.to(work)
        dx = dw = db = None
        if output_mask[0]:
            scale = invstd if weight is None else invstd * weight.to(work)
            dx = (g * _channel_view(scale, x)).to(x.dtype)
        if output_mask[1]:
            xhat = (x.to(work) - _channel_view(mean, x)) * _channel_view(invstd, x)
            dw = (g * xhat).sum(dims)
        if output_mask[2]:
            db = g.sum(dims)
    # without a weight, the gradients stay in the work dtype (float64 for float64 x)
    param_dtype = weight.dtype if weight is not None else stats_dtype(x)
    if dx is not None:  # the layout every backend gives (the fake promises it)
        dx = _in_output_layout(dx, x)
    return (
        dx if output_mask[0] else None,
        dw.to(param_dtype) if output_mask[1] and dw is not None else None,
        db.to(param_dtype) if output_mask[2] and db is not None else None,
    )
