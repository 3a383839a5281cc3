"""Float64 reference batch norm: the one ground truth shared by tests and benchmarks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _cv(v: Tensor, x: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def batch_stats_reference(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel float64 mean, biased variance and count (two-pass, on a float64 copy)."""
    xd = x.detach().double()
    mean = xd.mean(_dims(x))
    var = ((xd - _cv(mean, x)) ** 2).mean(_dims(x))
    return mean, var, x.numel() // x.shape[1]


def batch_norm_reference(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Float64 batch norm with PyTorch's semantics, differentiable (x, weight, bias may require
    grad). Returns (y, new_running_mean, new_running_var); running stats are not modified."""
    xd = x.double()
    new_rm = new_rv = None
    if training:
        mean = xd.mean(_dims(x))
        var = ((xd - _cv(mean, x)) ** 2).mean(_dims(x))
        n = x.numel() // x.shape[1]
        if running_mean is not None:
            new_rm = (1 - momentum) * running_mean.double() + momentum * mean.detach()
            new_rv = (1 - momentum) * running_var.double() + momentum * var.detach() * n / (n - 1)
    else:
        mean, var = running_mean.double(), running_var.double()
    y = (xd - _cv(mean, x)) / torch.sqrt(_cv(var, x) + eps)
    if weight is not None:
        y = y * _cv(weight.double(), x)
    if bias is not None:
        y = y + _cv(bias.double(), x)
    return y, new_rm, new_rv
