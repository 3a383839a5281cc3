"""K2: y = (x - mean[c]) · scale[c] + bias[c], in x's dtype and y's own strides."""

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from .layout import NUM_WARPS, Plan, offsets, on_device, tile_index, true_sizes, true_strides


@triton.jit
def _k2_normalize_kernel(
    x_ptr,  # [N, C, S] input (strides sxn, sxc, sxs)
    y_ptr,  # [N, C, S] output (strides syn, syc, sys), x's dtype
    mean_ptr,  # [C] batch mean - x[0, c, 0] (train, PIVOT) or running mean (eval)
    stat_ptr,  # [C] batch invstd (train) or running variance (eval, STAT_IS_VAR)
    w_ptr,  # [C] weight (HAS_W)
    b_ptr,  # [C] bias (HAS_B)
    C, S, tiles_s, sxn, sxc, sxs, syn, syc, sys, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
    STAT_IS_VAR: tl.constexpr, PIVOT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ALIGN: tl.constexpr, ROWS_UNIT: tl.constexpr,
):
    """One tile per program: y = (x - mean)·scale + bias with scale = w·invstd and
    invstd = rsqrt(var + eps) in eval. Centred rather than x·scale + shift: with |mean| ≫ std
    the shift -mean·scale would carry an absolute rounding error of ulp(mean)·scale. In training
    (PIVOT) x - mean is taken as (x - K) - kmean with K = x[0, c, 0] and kmean from K1: both
    differences are small, so not even the float32 rounding of the mean gets in."""
    C, S = true_sizes(C, S, ALIGN, ROWS_UNIT)  # (C, S and strides come divided by ALIGN)
    sxn, sxc, sxs = true_strides(sxn, sxc, sxs, ALIGN, ROWS_UNIT)
    syn, syc, sys = true_strides(syn, syc, sys, ALIGN, ROWS_UNIT)
    t = tl.program_id(0)
    pid_c = tl.program_id(1)
    n, rows, cols, mask, cmask, _ = tile_index(t, pid_c, tiles_s, S, C, BLOCK_R, BLOCK_C, IDX64)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    scale = tl.load(stat_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    if STAT_IS_VAR:
        scale = tl.rsqrt(scale + eps)
    if HAS_W:
        scale = scale * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offsets(n, rows, cols, sxn, sxc, sxs, IDX64), mask=mask, other=0.0,
                eviction_policy="evict_first")
    x = x.to(tl.float32)
    if PIVOT:
        if IDX64:
            pivot = tl.load(x_ptr + cols.to(tl.int64) * sxc, mask=cmask, other=0.0)
        else:
            pivot = tl.load(x_ptr + cols * sxc, mask=cmask, other=0.0)
        x = x - pivot.to(tl.float32)[None, :]
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_B:
        y += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    # masked lanes hold (0 - mean)·scale, which may not fit y's dtype: zero them
    tl.store(y_ptr + offsets(n, rows, cols, syn, syc, sys, IDX64), tl.where(mask, y, 0.0),
             mask=mask)


def k2_normalize(
    x: Tensor,
    y: Tensor,
    p: Plan,
    mean: Tensor,
    stat: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: Optional[float] = None,
) -> None:
    """Launch K2: write ``y`` from ``x`` (both viewed by ``p``).

    Args:
        mean, stat: training (``eps`` None): K1's kmean and invstd; eval: the running mean and
            the running variance.
    """
    with on_device(x):
        _k2_normalize_kernel[(p.num_tiles, p.num_cblocks)](
            x, y, mean, stat, weight if weight is not None else mean,
            bias if bias is not None else mean,
            *p.kernel_sizes, p.tiles_s, *p.kernel_strides[0], *p.kernel_strides[1],
            float(eps or 0.0),
            BLOCK_R=p.block_r, BLOCK_C=p.block_c, IDX64=p.idx64, STAT_IS_VAR=eps is not None,
            PIVOT=eps is None,
            HAS_W=weight is not None, HAS_B=bias is not None, ALIGN=p.align,
            ROWS_UNIT=p.rows_unit, num_warps=NUM_WARPS,
        )
