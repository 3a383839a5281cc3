"""K3: per-channel gradient sums (dw, db, dx coefficients); K4: dx = a·dy + b·(x - mean) + c."""

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from fastpbn._scratch import workspace

from .layout import (
    NUM_WARPS,
    Plan,
    merge_block,
    num_splits,
    offsets,
    on_device,
    partials,
    tile_index,
    true_sizes,
    true_strides,
)


@triton.jit(do_not_specialize=["n_total"])
def _k3_grad_stats_kernel(
    dy_ptr,  # [N, C, S] grad_out (strides sdn, sdc, sds; stride 0 allowed)
    x_ptr,  # [N, C, S] input (strides sxn, sxc, sxs)
    part_ptr,  # [2, SPLITS, C] float32 workspace: per-split Σdy, Σdy·(x - mean)
    counter_ptr,  # [num channel blocks] int32 arrival counters, zero between launches
    mean_ptr,  # [C] float32 mean used in the forward
    invstd_ptr,  # [C] float32 invstd used in the forward
    w_ptr,  # [C] weight (HAS_W)
    dw_ptr,  # [C] out: dγ = Σdy·x̂ (weight's dtype)
    db_ptr,  # [C] out: dβ = Σdy
    coef_ptr,  # [3, C] float32 out: K4's a, b, c (TRAINING)
    C, S, tiles_s, num_tiles, tiles_per_split, n_total, sdn, sdc, sds, sxn, sxc, sxs,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr, MERGE: tl.constexpr,
    HAS_W: tl.constexpr, TRAINING: tl.constexpr, WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr, ALIGN: tl.constexpr, ROWS_UNIT: tl.constexpr,
):
    """Split reduction as in K1 (the last program merges the partials in a fixed order) of
    Σdy and Σdy·(x - mean). With x̂ = (x - mean)·invstd and a = w·invstd, it writes
    dβ = Σdy, dγ = invstd·Σdy·(x - mean) and, for training-mode dx
    dx = a·(dy - Σdy/n - x̂·Σdy·x̂/n) = a·dy + b·(x - mean) + c, the coefficients
    b = -a·invstd·dγ/n and c = -a·dβ/n."""
    C, S = true_sizes(C, S, ALIGN, ROWS_UNIT)  # (C, S and strides come divided by ALIGN)
    sdn, sdc, sds = true_strides(sdn, sdc, sds, ALIGN, ROWS_UNIT)
    sxn, sxc, sxs = true_strides(sxn, sxc, sxs, ALIGN, ROWS_UNIT)
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    splits = tl.num_programs(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    sdy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sdyx = tl.zeros([BLOCK_C], dtype=tl.float32)
    t0 = pid_s * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, num_tiles)):
        n, rows, tcols, mask, _, _ = tile_index(t, pid_c, tiles_s, S, C, BLOCK_R, BLOCK_C, IDX64)
        dy = tl.load(dy_ptr + offsets(n, rows, tcols, sdn, sdc, sds, IDX64), mask=mask,
                     other=0.0, eviction_policy="evict_last").to(tl.float32)
        x = tl.load(x_ptr + offsets(n, rows, tcols, sxn, sxc, sxs, IDX64), mask=mask,
                    other=0.0, eviction_policy="evict_last").to(tl.float32)
        sdy += tl.sum(dy, axis=0)
        sdyx += tl.sum(dy * (x - mean[None, :]), axis=0)
    tl.store(part_ptr + pid_s * C + cols, sdy, mask=cmask)
    tl.store(part_ptr + (splits + pid_s) * C + cols, sdyx, mask=cmask)
    tl.debug_barrier()  # every thread's partial is stored before the counter moves
    arrived = tl.atomic_add(counter_ptr + pid_c, 1, sem="acq_rel")
    if arrived == splits - 1:
        tl.debug_barrier()  # the whole program reads the partials after the acquire
        tl.atomic_xchg(counter_ptr + pid_c, 0)  # ready for the next launch
        sdy = tl.zeros([BLOCK_C], dtype=tl.float32)
        sdyx = tl.zeros([BLOCK_C], dtype=tl.float32)
        for j0 in range(0, splits, MERGE):  # MERGE partials per step, summed as a tree
            po, pm = partials(part_ptr, j0, splits, C, cols, cmask, MERGE)
            sdy += tl.sum(tl.load(part_ptr + po, mask=pm, other=0.0, volatile=True), axis=0)
            sdyx += tl.sum(tl.load(part_ptr + splits * C + po, mask=pm, other=0.0,
                                   volatile=True), axis=0)
        invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = sdyx * invstd
        if WRITE_DW:
            tl.store(dw_ptr + cols, dw, mask=cmask)
        if WRITE_DB:
            tl.store(db_ptr + cols, sdy, mask=cmask)
        if TRAINING:
            a = invstd
            if HAS_W:
                a = a * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            inv_n = 1.0 / n_total.to(tl.float32)
            tl.store(coef_ptr + cols, a, mask=cmask)
            tl.store(coef_ptr + C + cols, -a * invstd * dw * inv_n, mask=cmask)
            tl.store(coef_ptr + 2 * C + cols, -a * sdy * inv_n, mask=cmask)


@triton.jit
def _k4_grad_input_kernel(
    dy_ptr,  # [N, C, S] grad_out (strides sdn, sdc, sds; stride 0 allowed)
    x_ptr,  # [N, C, S] input (strides sxn, sxc, sxs; read only when TRAINING)
    dx_ptr,  # [N, C, S] out: grad_input (strides son, soc, sos), x's dtype
    coef_ptr,  # [3, C] float32 a, b, c from K3 (TRAINING)
    mean_ptr,  # [C] float32 mean used in the forward (TRAINING)
    invstd_ptr,  # [C] float32 invstd (eval: a = w·invstd)
    w_ptr,  # [C] weight (eval, HAS_W)
    C, S, tiles_s, sdn, sdc, sds, sxn, sxc, sxs, son, soc, sos,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr, HAS_W: tl.constexpr,
    TRAINING: tl.constexpr, ALIGN: tl.constexpr, ROWS_UNIT: tl.constexpr,
):
    """One tile per program: dx = a·dy + b·(x - mean) + c (training, coefficients from K3;
    centred so that shifted x loses nothing), or dx = w·invstd·dy (eval)."""
    C, S = true_sizes(C, S, ALIGN, ROWS_UNIT)  # (C, S and strides come divided by ALIGN)
    sdn, sdc, sds = true_strides(sdn, sdc, sds, ALIGN, ROWS_UNIT)
    sxn, sxc, sxs = true_strides(sxn, sxc, sxs, ALIGN, ROWS_UNIT)
    son, soc, sos = true_strides(son, soc, sos, ALIGN, ROWS_UNIT)
    t = tl.program_id(0)
    pid_c = tl.program_id(1)
    n, rows, cols, mask, cmask, _ = tile_index(t, pid_c, tiles_s, S, C, BLOCK_R, BLOCK_C, IDX64)
    dy = tl.load(dy_ptr + offsets(n, rows, cols, sdn, sdc, sds, IDX64), mask=mask, other=0.0,
                 eviction_policy="evict_first").to(tl.float32)
    if TRAINING:
        a = tl.load(coef_ptr + cols, mask=cmask, other=0.0)
        b = tl.load(coef_ptr + C + cols, mask=cmask, other=0.0)
        c = tl.load(coef_ptr + 2 * C + cols, mask=cmask, other=0.0)
        mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets(n, rows, cols, sxn, sxc, sxs, IDX64), mask=mask,
                    other=0.0, eviction_policy="evict_first").to(tl.float32)
        dx = a[None, :] * dy + b[None, :] * (x - mean[None, :]) + c[None, :]
    else:
        a = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_W:
            a = a * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dx = a[None, :] * dy
    # masked lanes may not fit dx's dtype (b·(0 - mean)): zero them
    tl.store(dx_ptr + offsets(n, rows, cols, son, soc, sos, IDX64), tl.where(mask, dx, 0.0),
             mask=mask)


def k3_k4_backward(
    grad_out: Tensor,
    x: Tensor,
    dx: Optional[Tensor],
    p: Plan,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    dw: Optional[Tensor],
    db: Optional[Tensor],
) -> None:
    """Launch K3 (when training needs dx, or dw / db are asked for) and K4 (when ``dx`` is
    given). ``p.strides`` are those of x, grad_out, dx in that order."""
    c = p.c
    w = weight if weight is not None else mean
    with on_device(x):
        coef = mean
        if dw is not None or db is not None or (training and dx is not None):
            splits, per_split = num_splits(p, x.device)
            ws, counters = workspace(x.device, 2 * splits * c + 3 * c, p.num_cblocks)
            coef = ws[2 * splits * c:]
            _k3_grad_stats_kernel[(p.num_cblocks, splits)](
                grad_out, x, ws, counters, mean, invstd, w,
                dw if dw is not None else ws, db if db is not None else ws, coef,
                *p.kernel_sizes, p.tiles_s, p.num_tiles, per_split, p.count,
                *p.kernel_strides[1], *p.kernel_strides[0],
                BLOCK_R=p.block_r, BLOCK_C=p.block_c, IDX64=p.idx64,
                MERGE=merge_block(splits, p.block_c), HAS_W=weight is not None,
                TRAINING=training and dx is not None,
                WRITE_DW=dw is not None, WRITE_DB=db is not None, ALIGN=p.align,
                ROWS_UNIT=p.rows_unit, num_warps=NUM_WARPS,
            )
        if dx is not None:
            _k4_grad_input_kernel[(p.num_tiles, p.num_cblocks)](
                grad_out, x, dx, coef, mean, invstd, w,
                *p.kernel_sizes, p.tiles_s, *p.kernel_strides[1], *p.kernel_strides[0],
                *p.kernel_strides[2], BLOCK_R=p.block_r, BLOCK_C=p.block_c, IDX64=p.idx64,
                HAS_W=weight is not None, TRAINING=training, ALIGN=p.align,
                ROWS_UNIT=p.rows_unit, num_warps=NUM_WARPS,
            )
