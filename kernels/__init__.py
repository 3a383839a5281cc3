"""Triton kernels for fastpbn (installed as fastpbn.kernels): the ``triton`` backend.

The five functions below are the backend contract (see ``fastpbn._backend.Backend``); the
arithmetic lives in four kernels:

* K1 ``stats.py`` — split per-channel statistics; its last program also writes the saved
  statistics, updates running stats and merges into a float64 accumulator (one launch);
* K2 ``normalize.py`` — y = (x - mean)·w·invstd + b (centred on x[0, c, 0] in training);
* K3 / K4 ``gradients.py`` — gradient sums (dγ, dβ, dx coefficients), then dx.

Tensors are read by their strides (NCHW, channels_last, 1d, 3d, most sliced or transposed views,
stride-0 gradients). A layout whose non-channel dims cannot be viewed as one (N', S') pair for
every tensor of the call (say, x[..., :-1] of an NCHW tensor) is copied to contiguous first.
Needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before triton is imported.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastpbn._scratch import output_like

from .gradients import k3_k4_backward
from .layout import plan
from .normalize import k2_normalize
from .stats import k1_stats

_F32 = torch.float32


def _viewed(inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...] = ()):
    """(plan, inputs + outputs): as given when they all share one strided view (x first: its
    strides pick the tiling), else contiguous copies of the inputs and fresh contiguous
    outputs, which the caller writes back."""
    tensors = (*inputs, *outputs)
    p = plan(list(tensors))
    if p is not None:
        return p, tensors
    copies = (*(t.contiguous() for t in inputs),
              *(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in outputs))
    return plan(list(copies)), copies


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _write_back(dst: Optional[Tensor], src: Optional[Tensor]) -> None:
    if dst is not None and src is not dst:
        dst.copy_(src)


def _stats_input(x: Tensor, what: str) -> None:
    if x.numel() == 0:
        raise ValueError(f"{what}: x has no values per channel (shape {tuple(x.shape)})")


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
    """Training batch norm: K1 (statistics, running stats, accumulator) then K2.

    Args:
        x: (N, C, *) fp32 / fp16 / bf16, any strides.
        weight, bias: (C,) or None.
        running_mean, running_var: (C,) or None (both or neither), updated in place.
        num_batches_tracked: int64 counter, already incremented; read on the device when
            ``momentum`` is None.
        momentum: running-average factor, or None for the cumulative average.
        eps: added to the variance.
        acc: None or float64 (count, mean, m2) (C,) tensors; the batch is merged in place.
    Returns:
        (y laid out as ``output_like(x)``, float32 save_mean, float32 save_invstd).
    """
    _stats_input(x, "forward_train")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    c = x.shape[1]
    y = output_like(x)
    save = (x.new_empty(c, dtype=_F32), x.new_empty(c, dtype=_F32))
    p, (xk, yk) = _viewed((x,), (y,))
    running = acc_k = None
    if running_mean is not None:
        running = (_contig(running_mean), _contig(running_var))
    if acc is not None:
        acc_k = tuple(_contig(t) for t in acc)
    kmean = x.new_empty(c, dtype=_F32)
    k1_stats(xk, p, mean=save[0], kmean=kmean, invstd=save[1], running=running,
             num_batches_tracked=num_batches_tracked, momentum=momentum, eps=eps, acc=acc_k)
    k2_normalize(xk, yk, p, kmean, save[1], _contig(weight), _contig(bias))
    _write_back(y, yk)
    if running is not None:
        _write_back(running_mean, running[0]), _write_back(running_var, running[1])
    for dst, src in zip(acc or (), acc_k or ()):
        _write_back(dst, src)
    return y, save[0], save[1]


def forward_eval(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    """Eval batch norm with the running statistics (K2 only).

    Returns:
        y laid out as ``output_like(x)``, x's dtype.
    """
    y = output_like(x)
    if x.numel() == 0:
        return y
    p, (xk, yk) = _viewed((x,), (y,))
    k2_normalize(xk, yk, p, _contig(running_mean), _contig(running_var), _contig(weight),
                 _contig(bias), eps=eps)
    _write_back(y, yk)
    return y


def backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    output_mask: tuple[bool, bool, bool],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Batch-norm backward (K3 then K4, each only when ``output_mask`` needs it).

    Args:
        grad_out: like x, any strides (stride 0 too).
        mean, invstd: the statistics the forward normalized with (batch or running).
        training: the forward used batch statistics (dx then flows through them).
        output_mask: which of (dx, dw, db) to compute.
    Returns:
        (dx laid out as ``output_like(x)``, dw, db in the weight's dtype (float32 without
        weight)); None where the mask is False.
    """
    c = x.shape[1]
    pdtype = weight.dtype if weight is not None else _F32
    dx = output_like(x) if output_mask[0] else None
    dw = x.new_empty(c, dtype=pdtype) if output_mask[1] else None
    db = x.new_empty(c, dtype=pdtype) if output_mask[2] else None
    if x.numel() == 0:
        return dx, None if dw is None else dw.zero_(), None if db is None else db.zero_()
    p, views = _viewed((x, grad_out), () if dx is None else (dx,))
    dxk = views[2] if dx is not None else None
    k3_k4_backward(views[1], views[0], dxk, p, _contig(weight), _contig(mean).float(),
                   _contig(invstd).float(), training, dw, db)
    _write_back(dx, dxk)
    return dx, dw, db


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel statistics (K1 in statistics-only mode).

    Returns:
        (float32 mean, float32 biased variance, values per channel).
    """
    _stats_input(x, "batch_stats")
    c = x.shape[1]
    mean, var = x.new_empty(c, dtype=_F32), x.new_empty(c, dtype=_F32)
    p, (xk,) = _viewed((x,))
    k1_stats(xk, p, mean=mean, var=var)
    return mean, var, p.count


def welford_update(x: Tensor, count: Tensor, mean: Tensor, m2: Tensor) -> None:
    """Merge x's per-channel (n, mean, M2) into the float64 state in place (K1 accumulate-only:
    no normalized output, no running stats)."""
    _stats_input(x, "welford_update")
    p, (xk,) = _viewed((x,))
    state = tuple(_contig(t) for t in (count, mean, m2))
    k1_stats(xk, p, acc=state)
    for dst, src in zip((count, mean, m2), state):
        _write_back(dst, src)


__all__ = ["forward_train", "forward_eval", "backward", "batch_stats", "welford_update"]
