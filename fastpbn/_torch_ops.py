"""The ``torch`` backend: PyTorch's own batch-norm kernels plus a vectorized Welford merge.

Serves every device and dtype. Batch statistics come from PyTorch's (centred, two-pass) batch
norm kernel run on the data shifted by one sample per channel, so they keep full float32
precision at any |mean|/std; batches are merged into float64 state with Chan's formula.
"""

from __future__ import annotations

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


def _shifted_batch_norm(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, biased var) with PyTorch's batch-norm kernel run on x - K, K = x[0, :, 0, ...]
    (a value of each channel). Normalization does not change under the shift, and centring on
    a sample keeps the float32 statistics exact however far the mean is from zero (the kernel
    itself is two-pass and accumulates in float64 on CPU). mean and var are float64; var comes
    from invstd, so its relative error is ~2.4e-7·(1 + eps/var)."""
    pivot = x[(0, slice(None)) + (0,) * (x.dim() - 2)].float()
    xs = x.float() - _channel_view(pivot, x)  # float32 even for half inputs: the shift is exact
    if weight is not None and weight.dtype != xs.dtype:
        weight, bias = weight.float(), None if bias is None else bias.float()
    y, mean_s, invstd = torch.ops.aten.native_batch_norm(
        xs, weight, bias, None, None, True, 0.0, eps
    )
    invstd = invstd.double()  # the kernel reports invstd = 0 for a constant channel at eps = 0
    var = torch.where(invstd > 0, invstd.pow(-2) - eps, 0.0).clamp_min(0.0)
    return y.to(x.dtype), pivot.double() + mean_s.double(), var


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor, int]:
    _, mean, var = _shifted_batch_norm(x, None, None, 0.0)
    return mean.float(), var.float(), x.numel() // x.shape[1]


def _merge_batch(acc: tuple[Tensor, Tensor, Tensor], mean: Tensor, var: Tensor, n: int) -> None:
    count = acc[0]
    chan_merge_(*acc, torch.full_like(count, n), mean.to(count), var.to(count) * n)


def welford_update(x: Tensor, count: Tensor, mean: Tensor, m2: Tensor) -> None:
    _, mean_b, var_b = _shifted_batch_norm(x, None, None, 0.0)
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
    # accumulating: one statistics pass serves the normalization and the float64 state
    n = x.numel() // x.shape[1]
    y, mean, var = _shifted_batch_norm(x, weight, bias, eps)
    _merge_batch(acc, mean, var, n)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            running_var.mul_(1 - factor).add_(var.to(running_var.dtype) * (n / max(n - 1, 1)),
                                              alpha=factor)
    return y, mean.float(), torch.rsqrt(var + eps).float()


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
