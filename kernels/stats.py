"""K1: per-channel batch statistics in one launch, with everything that depends on them."""

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from fastpbn._scratch import workspace

from .layout import (
    NUM_WARPS,
    Plan,
    chan_combine,
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
def _k1_stats_kernel(
    x_ptr,  # [N, C, S] input (strides sxn, sxc, sxs), fp32 / fp16 / bf16
    part_ptr,  # [3, SPLITS, C] float32 workspace: per-split count, mean, M2
    counter_ptr,  # [num channel blocks] int32 arrival counters, zero between launches
    mean_ptr,  # [C] float32 out: batch mean
    kmean_ptr,  # [C] float32 out: batch mean - x[0, c, 0] (K2's centring, HAS_KMEAN)
    invstd_ptr,  # [C] float32 out: 1 / sqrt(biased var + eps)
    var_ptr,  # [C] float32 out: biased variance
    rm_ptr,  # [C] running mean, updated in place
    rv_ptr,  # [C] running (unbiased) variance, updated in place
    nbt_ptr,  # [] int64 num_batches_tracked (momentum None: factor 1 / nbt)
    acc_n_ptr,  # [C] float64 (or int64) accumulated count, updated in place
    acc_mean_ptr,  # [C] float64 accumulated mean, updated in place
    acc_m2_ptr,  # [C] float64 accumulated M2, updated in place
    C, S, tiles_s, num_tiles, tiles_per_split, n_total, sxn, sxc, sxs, momentum, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr, MERGE: tl.constexpr,
    HAS_MEAN: tl.constexpr, HAS_KMEAN: tl.constexpr, HAS_INVSTD: tl.constexpr,
    HAS_VAR: tl.constexpr,
    HAS_RUNNING: tl.constexpr, MOMENTUM_FROM_NBT: tl.constexpr, HAS_ACC: tl.constexpr,
    ALIGN: tl.constexpr, ROWS_UNIT: tl.constexpr,
):
    """Program (c, j) reduces tiles [j·T, (j+1)·T) of channel block c. All arithmetic is on
    x - K with K = x[0, c, 0] (exact for |x| ≫ std, so the mean keeps full precision however far
    it is from 0). Per tile it computes the tile's own mean m_b and M2_b = Σ(x - m_b)² (centred,
    never Σx²) and merges them into its running (n, mean, M2) with Chan's formula

        δ = m_b - m;  m += δ·n_b/(n + n_b);  M2 += M2_b + δ²·n·n_b/(n + n_b);  n += n_b.

    It stores its partial, and the last program of channel block c to arrive (atomic counter,
    reset by that program) merges the SPLITS partials, MERGE at a time in a fixed tree
    (deterministic), and writes
    mean (+ K), invstd = 1/sqrt(M2/n + eps), var = M2/n; running stats r = (1-f)·r + f·batch
    with the unbiased M2/(n-1) for the variance, f = momentum or 1/num_batches_tracked; and
    merges (n, mean, M2) into the float64 accumulator with the same formula in float64.
    The mean relative to K (kmean) also goes out: K2 centres x as (x - K) - kmean, free of
    the float32 rounding of the mean, which would otherwise dominate y where std is within a
    few orders of magnitude of ulp(mean).
    """
    C, S = true_sizes(C, S, ALIGN, ROWS_UNIT)  # (C, S and strides come divided by ALIGN)
    sxn, sxc, sxs = true_strides(sxn, sxc, sxs, ALIGN, ROWS_UNIT)
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    splits = tl.num_programs(1)
    cnt = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if IDX64:
        pivot = tl.load(x_ptr + cols.to(tl.int64) * sxc, mask=cmask, other=0.0).to(tl.float32)
    else:
        pivot = tl.load(x_ptr + cols * sxc, mask=cmask, other=0.0).to(tl.float32)
    t0 = pid_s * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, num_tiles)):
        n, rows, tcols, mask, _, nb = tile_index(t, pid_c, tiles_s, S, C, BLOCK_R, BLOCK_C, IDX64)
        offs = offsets(n, rows, tcols, sxn, sxc, sxs, IDX64)
        # keep x in L2 for the normalize pass that follows
        x = tl.load(x_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_last")
        x = tl.where(mask, x.to(tl.float32) - pivot[None, :], 0.0)
        nb = nb.to(tl.float32)
        mb = tl.sum(x, axis=0) / nb
        d = tl.where(mask, x - mb[None, :], 0.0)
        mean, m2, cnt = chan_combine(mean, m2, cnt, mb, tl.sum(d * d, axis=0), nb)
    tl.store(part_ptr + pid_s * C + cols, cnt, mask=cmask)
    tl.store(part_ptr + (splits + pid_s) * C + cols, mean, mask=cmask)
    tl.store(part_ptr + (2 * splits + pid_s) * C + cols, m2, mask=cmask)
    tl.debug_barrier()  # every thread's partial is stored before the counter moves
    arrived = tl.atomic_add(counter_ptr + pid_c, 1, sem="acq_rel")
    if arrived == splits - 1:
        tl.debug_barrier()  # the whole program reads the partials after the acquire
        tl.atomic_xchg(counter_ptr + pid_c, 0)  # ready for the next launch
        cnt = tl.zeros([BLOCK_C], dtype=tl.float32)
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for j0 in range(0, splits, MERGE):  # MERGE partials per step, merged as a tree
            po, pm = partials(part_ptr, j0, splits, C, cols, cmask, MERGE)
            nb = tl.load(part_ptr + po, mask=pm, other=0.0, volatile=True)
            mb = tl.load(part_ptr + splits * C + po, mask=pm, other=0.0, volatile=True)
            m2b = tl.load(part_ptr + 2 * splits * C + po, mask=pm, other=0.0, volatile=True)
            mb, m2b, nb = tl.reduce((mb, m2b, nb), 0, chan_combine)
            mean, m2, cnt = chan_combine(mean, m2, cnt, mb, m2b, nb)
        var = m2 / n_total.to(tl.float32)
        shifted = mean
        mean = pivot + shifted
        if HAS_MEAN:
            tl.store(mean_ptr + cols, mean, mask=cmask)
        if HAS_KMEAN:
            tl.store(kmean_ptr + cols, shifted, mask=cmask)
        if HAS_INVSTD:
            tl.store(invstd_ptr + cols, tl.rsqrt(var + eps), mask=cmask)
        if HAS_VAR:
            tl.store(var_ptr + cols, var, mask=cmask)
        if HAS_RUNNING:
            if MOMENTUM_FROM_NBT:
                f = (1.0 / tl.load(nbt_ptr).to(tl.float64)).to(tl.float32)
            else:
                f = momentum
            unbiased = m2 / (n_total - 1).to(tl.float32)
            rm = tl.load(rm_ptr + cols, mask=cmask).to(tl.float32)
            rv = tl.load(rv_ptr + cols, mask=cmask).to(tl.float32)
            tl.store(rm_ptr + cols, f * mean + (1.0 - f) * rm, mask=cmask)
            tl.store(rv_ptr + cols, f * unbiased + (1.0 - f) * rv, mask=cmask)
        if HAS_ACC:
            na = tl.load(acc_n_ptr + cols, mask=cmask).to(tl.float64)
            ma = tl.load(acc_mean_ptr + cols, mask=cmask)
            m2a = tl.load(acc_m2_ptr + cols, mask=cmask)
            nb64 = n_total.to(tl.float64)
            tot64 = na + nb64
            d64 = (pivot.to(tl.float64) - ma) + shifted.to(tl.float64)
            tl.store(acc_m2_ptr + cols, m2a + m2.to(tl.float64) + d64 * d64 * (na * nb64 / tot64),
                     mask=cmask)
            tl.store(acc_mean_ptr + cols, ma + d64 * (nb64 / tot64), mask=cmask)
            tl.store(acc_n_ptr + cols, tot64, mask=cmask)


def k1_stats(
    x: Tensor,
    p: Plan,
    *,
    mean: Optional[Tensor] = None,
    kmean: Optional[Tensor] = None,
    invstd: Optional[Tensor] = None,
    var: Optional[Tensor] = None,
    running: Optional[tuple[Optional[Tensor], Optional[Tensor]]] = None,
    num_batches_tracked: Optional[Tensor] = None,
    momentum: Optional[float] = None,
    eps: float = 0.0,
    acc: Optional[tuple[Tensor, Tensor, Tensor]] = None,
) -> None:
    """Launch K1 on ``x`` viewed by ``p``; each keyword output is written only when given.

    Args:
        mean, invstd: float32 (C,) outputs.
        kmean: float32 (C,) output, the mean minus x[0, c, 0] (see K2).
        var: float32 (C,) biased variance output.
        running: (running_mean, running_var) updated in place (both or neither).
        num_batches_tracked, momentum: the running-average factor is ``momentum``, or
            ``1/num_batches_tracked`` when momentum is None (0 without a counter).
        acc: float64 (count, mean, m2), merged in place.
    """
    c = p.c
    splits, per_split = num_splits(p, x.device)
    ws, counters = workspace(x.device, 3 * splits * c, p.num_cblocks)
    dummy = ws
    rm, rv = running if running is not None else (dummy, dummy)
    from_nbt = momentum is None and num_batches_tracked is not None
    if momentum is None and not from_nbt:
        momentum = 0.0
    acc_n, acc_m, acc_m2 = acc if acc is not None else (dummy, dummy, dummy)
    with on_device(x):
        _k1_stats_kernel[(p.num_cblocks, splits)](
            x, ws, counters, dummy if mean is None else mean, dummy if kmean is None else kmean,
            dummy if invstd is None else invstd,
            dummy if var is None else var, rm, rv,
            num_batches_tracked if from_nbt else counters, acc_n, acc_m, acc_m2,
            *p.kernel_sizes, p.tiles_s, p.num_tiles, per_split, p.count, *p.kernel_strides[0],
            float(momentum or 0.0), float(eps),
            BLOCK_R=p.block_r, BLOCK_C=p.block_c, IDX64=p.idx64,
            MERGE=merge_block(splits, p.block_c), HAS_MEAN=mean is not None,
            HAS_KMEAN=kmean is not None,
            HAS_INVSTD=invstd is not None, HAS_VAR=var is not None,
            HAS_RUNNING=running is not None, MOMENTUM_FROM_NBT=from_nbt,
            HAS_ACC=acc is not None, ALIGN=p.align, ROWS_UNIT=p.rows_unit, num_warps=NUM_WARPS,
        )

