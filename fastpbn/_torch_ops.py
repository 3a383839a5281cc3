"""The ``torch`` backend: PyTorch's own batch-norm kernels plus a vectorized Welford merge.

Serves every device and dtype. Batch statistics come from PyTorch's (centred, two-pass) batch
norm kernel run on the data shifted by one sample per channel, so they keep full float32
precision at any |mean|/std; batches are merged into float64 state with Chan's formula.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor


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


# Grow-only scratch for the shifted copy of x: a fresh multi-MB tensor per call costs more in
# page faults than the subtraction itself (CPU has no caching allocator). Capped, so a huge
# activation does not pin memory for the life of the process.
_SCRATCH_MAX_BYTES = 1 << 28
_local = threading.local()  # one scratch per thread: concurrent callers must not share it


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scratch_like(x: Tensor) -> Tensor:
    """An uninitialised float32 (float64 for float64 x) tensor laid out like empty_like(x)."""
    need, dtype = x.numel(), _work_dtype(x)
    # CUDA's caching allocator already recycles memory (and a shared buffer would race across
    # streams): the scratch is for CPU only
    if x.device.type != "cpu" or need * 4 > _SCRATCH_MAX_BYTES:
        return torch.empty_like(x, dtype=dtype)
    scratch = _local.__dict__.setdefault("scratch", {})
    buf = scratch.get((x.device, dtype))
    if buf is None or buf.numel() < need:
        buf = scratch[(x.device, dtype)] = torch.empty(need, dtype=dtype, device=x.device)
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return buf.as_strided(x.shape, x.stride())  # what empty_like keeps for dense x
    return buf[:need].view(x.shape)


def normalize_shifted(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
    pivot: Tensor, mean_s: Tensor, invstd: Tensor,
) -> Tensor:
    """Training-mode batch norm of ``x`` run by PyTorch's kernel on x - K, K = x[0, :, 0, ...]
    (a value of each channel); returns y and writes K, the mean of x - K and invstd into the
    given (C,) tensors (float32; float64 for float64 x).

    Normalization does not change under the shift, and centring on a sample keeps the
    statistics exact however far the mean is from zero (the kernel's own mean is only exact to
    one rounding at the mean's magnitude, and its normalization loses as much). The kernel is
    two-pass and accumulates in float64 on CPU.
    """
    pivot.copy_(x[(0, slice(None)) + (0,) * (x.dim() - 2)])
    xs = torch.sub(x, _channel_view(pivot, x), out=_scratch_like(x))
    if weight is not None and weight.dtype != xs.dtype:
        weight, bias = weight.to(xs.dtype), None if bias is None else bias.to(xs.dtype)
    y = torch.empty_like(xs)
    torch.ops.aten.native_batch_norm.out(
        xs, weight, bias, None, None, True, 0.0, eps, out=y, save_mean=mean_s, save_invstd=invstd
    )
    return y.to(x.dtype)


def normalize_unshifted(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
    mean: Tensor, invstd: Tensor,
) -> Tensor:
    """:func:`normalize_shifted` without the shift, for float32 data whose |mean|/std is small
    (its mean is then exact to one float32 rounding, i.e. to |mean|·6e-8, a tiny fraction of the
    std): PyTorch's kernel on x itself, writing the float32 mean and invstd."""
    y = torch.empty_like(x)
    torch.ops.aten.native_batch_norm.out(
        x, weight, bias, None, None, True, 0.0, eps, out=y, save_mean=mean, save_invstd=invstd
    )
    return y


def shifted_moments(
    pivot: Tensor, mean_s: Tensor, invstd: Tensor, eps: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Float64 (mean, biased var) from what :func:`normalize_shifted` wrote; var comes from
    invstd, so its relative error is ~2.4e-7·(1 + eps/var) in float32."""
    var = invstd.double().pow_(-2).sub_(eps).clamp_min_(0.0)
    if isinstance(eps, float) and eps == 0.0:  # the kernel reports invstd = 0 for var = 0 then
        var.masked_fill_(invstd == 0, 0.0)
    return mean_s.double().add_(pivot), var


def _shifted_batch_norm(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, float32 mean, float32 invstd, float64 mean, float64 biased var) of
    :func:`normalize_shifted`."""
    pivot, mean_s, invstd = torch.empty(3, x.shape[1], dtype=_work_dtype(x), device=x.device)
    y = normalize_shifted(x, weight, bias, eps, pivot, mean_s, invstd)
    mean, var = shifted_moments(pivot, mean_s, invstd, eps)
    return y, mean_s.add_(pivot).float(), invstd.float(), mean, var


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor, int]:
    _, _, _, mean, var = _shifted_batch_norm(x, None, None, 0.0)
    return mean.float(), var.float(), x.numel() // x.shape[1]


def _merge_batch(acc: tuple[Tensor, Tensor, Tensor], mean_b: Tensor, var_b: Tensor,
                 n: int) -> None:
    """Merge a batch of n values per channel (float64 mean, biased var) into acc, in place."""
    chan_merge_(*acc, torch.full_like(acc[0], n), mean_b, var_b * n)


def welford_update(x: Tensor, count: Tensor, mean: Tensor, m2: Tensor) -> None:
    _, _, _, mean_b, var_b = _shifted_batch_norm(x, None, None, 0.0)
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
    if acc is None:
        y, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, factor, eps
        )
        return y, save_mean.float(), save_invstd.float()
    # accumulating: one (shifted) statistics pass serves the normalization and the float64 state
    n = x.numel() // x.shape[1]
    y, save_mean, save_invstd, mean, var = _shifted_batch_norm(x, weight, bias, eps)
    _merge_batch(acc, mean, var, n)
    if running_mean is not None:  # PyTorch's rule: the unbiased variance goes into running_var
        running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
        running_var.mul_(1 - factor).add_(var.mul(n / max(n - 1, 1)).to(running_var.dtype),
                                          alpha=factor)
    return y, save_mean, save_invstd


def forward_eval(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    return torch.ops.aten.native_batch_norm(
        x, weight, bias, running_mean, running_var, False, 0.0, eps
    )[0]


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
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, invstd, True, 0.0, list(output_mask)
        )
    else:
        dims = _reduce_dims(x)
        g = grad_out.float()
        dx = dw = db = None
        if output_mask[0]:
            scale = invstd if weight is None else invstd * weight.float()
            dx = (g * _channel_view(scale, x)).to(x.dtype)
        if output_mask[1]:
            xhat = (x.float() - _channel_view(mean, x)) * _channel_view(invstd, x)
            dw = (g * xhat).sum(dims)
        if output_mask[2]:
            db = g.sum(dims)
    param_dtype = weight.dtype if weight is not None else torch.float32
    return (
        dx if output_mask[0] else None,
        dw.to(param_dtype) if output_mask[1] and dw is not None else None,
        db.to(param_dtype) if output_mask[2] and db is not None else None,
    )
