"""The ``torch`` backend: PyTorch's own batch-norm kernels plus a vectorized Welford merge.

Serves every device and dtype. Batch statistics for the float64 accumulator are computed in
float64 on CPU (exact reference behaviour) and with PyTorch's Welford ``var_mean`` in float32
elsewhere; both are centred, never sum / sum-of-squares.
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
    inv_n = torch.where(n > 0, 1.0 / torch.where(n > 0, n, 1.0), 0.0)
    delta = mean_b - mean
    m2.add_(m2_b + delta * delta * count * count_b * inv_n)
    mean.add_(delta * count_b * inv_n)
    count.copy_(n)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor, int]:
    xs = x.double() if x.device.type == "cpu" else x.float()
    var, mean = torch.var_mean(xs, dim=_reduce_dims(x), correction=0)
    return mean.float(), var.float(), x.numel() // x.shape[1]


def welford_update(x: Tensor, count: Tensor, mean: Tensor, m2: Tensor) -> None:
    xs = x.double() if x.device.type == "cpu" else x.float()
    var_b, mean_b = torch.var_mean(xs, dim=_reduce_dims(x), correction=0)
    n_b = x.numel() // x.shape[1]
    chan_merge_(count, mean, m2, torch.full_like(count, n_b), mean_b.double(), var_b.double() * n_b)


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
    y, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        x, weight, bias, running_mean, running_var, True, factor, eps
    )
    if acc is not None:
        welford_update(x, *acc)
    return y, save_mean.float(), save_invstd.float()


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
