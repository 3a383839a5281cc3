"""What the launchers share: viewing (N, C, *) tensors as (N', C, S') by strides, the tile and
split heuristic and the offset helper every kernel uses.

Every kernel sees its tensors as ``[N', C, S']`` with strides ``(sn, sc, ss)``: the non-channel
dims are ordered by x's strides and cut into an outer group (N') and an inner group (S'), each
collapsible into one stride for every tensor of the call. NCHW gives (N, C, H·W) with ss = 1;
channels_last and (N, C) give (1, C, N·H·W) with sc = 1; a transposed or sliced view usually
still fits. A tile is ``BLOCK_R`` positions along S' of one n times ``BLOCK_C`` channels;
``tiles_s = cdiv(S', BLOCK_R)`` tiles per n, ``N' * tiles_s`` tiles in all.

Vector loads need the compiler to know that every run along x's contiguous axis starts
aligned, i.e. that the other strides and the contiguous axis' extent (its mask bound) share a
power-of-two factor. Triton infers it from its own specialization of integer arguments
(divisible by 16 or not), which misses 14x14 maps (S' = 196, stride 196: 4 | 196): their loads
came out scalar (PTX ``ld.global.b32`` / ``.b16``). So the launchers pass those strides and that
extent divided by their common factor ``ALIGN`` (<= 16) and the kernels multiply it back
(:func:`true_sizes`, :func:`true_strides`): the same values, and ``v4.b32`` loads for float32.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_ALIGN = 16  # the largest common factor worth telling the compiler (16-byte vectors)
TILE = 4096  # elements per tile: 32 fp32 registers per thread at NUM_WARPS = 4
NUM_WARPS = 4
MAX_BLOCK_C = 128  # channels per tile when channels are the contiguous axis
CPU_PROGRAMS = 3  # interpreter: programs run one after another, a few splits suffice
IDX64_AT = 2**31  # int64 offsets once a tensor spans this many elements
MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints: ``triton.cdiv`` is a ConstexprFunction, ~2–4 µs a host call
    (measured, Triton 3.6 / 3.9), and a launch needs several."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), as ``triton.next_power_of_2``, in plain int
    arithmetic (see :func:`cdiv`)."""
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class Plan:
    """A call's launch geometry. ``strides[i]`` is (sn, sc, ss) of the i-th tensor.

    ``align`` > 1: x's positions (``rows_unit``) or channels are contiguous, and ``align``
    divides that axis' extent and every tensor's strides along the two other axes; the kernels
    get them divided by it (``kernel_sizes``, ``kernel_strides``; see the module docstring)."""

    n: int
    c: int
    s: int
    strides: tuple[tuple[int, int, int], ...]
    block_r: int
    block_c: int
    idx64: bool
    align: int = 1
    rows_unit: bool = False

    @functools.cached_property
    def kernel_sizes(self) -> tuple[int, int]:
        """(C, S') as the kernels take them."""
        if self.rows_unit:
            return self.c, self.s // self.align
        return self.c // self.align, self.s

    @functools.cached_property
    def kernel_strides(self) -> tuple[tuple[int, int, int], ...]:
        """``strides`` as the kernels take them (with ALIGN, 0 along an axis of one element,
        whose index is always 0)."""
        a = self.align
        if a == 1:
            return self.strides
        keep = [size > 1 for size in (self.n, self.c, self.s)]
        strides = [tuple(v if k else 0 for v, k in zip(t, keep)) for t in self.strides]
        if self.rows_unit:
            return tuple((sn // a, sc // a, ss) for sn, sc, ss in strides)
        return tuple((sn // a, sc, ss // a) for sn, sc, ss in strides)

    @functools.cached_property
    def tiles_s(self) -> int:
        return cdiv(self.s, self.block_r)

    @functools.cached_property
    def num_tiles(self) -> int:
        return self.n * self.tiles_s

    @functools.cached_property
    def num_cblocks(self) -> int:
        return cdiv(self.c, self.block_c)

    @functools.cached_property
    def count(self) -> int:
        return self.n * self.s


def _group(dims: list[int], shape, strides) -> Optional[tuple[int, int]]:
    """(size, stride) of ``dims`` collapsed into one (outermost first), or None."""
    for a, b in zip(dims, dims[1:]):
        if strides[a] != strides[b] * shape[b]:
            return None
    return math.prod(shape[d] for d in dims), (strides[dims[-1]] if dims else 0)


def split_dims(tensors: list[Tensor]) -> Optional[tuple[int, int, list[tuple[int, int, int]]]]:
    """(N', S', per-tensor (sn, sc, ss)) viewing every tensor as [N', C, S'], or None when the
    layouts admit no common view (the caller then copies)."""
    x = tensors[0]
    shape = x.shape
    # order by x's strides, outermost first; size-1 dims do not matter
    dims = sorted((d for d in range(x.dim()) if d != 1 and shape[d] != 1),
                  key=lambda d: -x.stride(d))
    for k in range(len(dims) + 1):
        views = []
        for t in tensors:
            outer, inner = _group(dims[:k], shape, t.stride()), _group(dims[k:], shape, t.stride())
            if outer is None or inner is None:
                break
            views.append((outer[1], t.stride(1), inner[1]))
        else:
            n_size = math.prod(shape[d] for d in dims[:k])
            return n_size, math.prod(shape[d] for d in dims[k:]), views
    return None


_PLANS: dict[tuple, Optional[Plan]] = {}


def plan(tensors: list[Tensor]) -> Optional[Plan]:
    """Launch geometry for ``tensors`` (same shape, x first), or None (no common view).
    Cached by shapes and strides: a training loop sees the same few layouts every step."""
    key = (tensors[0].shape, *(t.stride() for t in tensors), TILE, MAX_BLOCK_C, IDX64_AT,
           MAX_GRID_Y, MAX_ALIGN)
    if key not in _PLANS:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        _PLANS[key] = _make_plan(tensors)
    return _PLANS[key]


def _make_plan(tensors: list[Tensor]) -> Optional[Plan]:
    split = split_dims(tensors)
    if split is None:
        return None
    n, s, strides = split
    c = tensors[0].shape[1]
    sn, sc, ss = strides[0]
    if sc == 1 and c > 1 and ss != 1:  # channels contiguous: wide channel tiles
        block_c = min(next_pow2(c), MAX_BLOCK_C)
        block_r = min(max(TILE // block_c, 1), next_pow2(s))
    else:  # positions contiguous (or neither): long rows along S'
        block_r = min(next_pow2(s), TILE)
        # shorter rows (more channels per tile) while the last tile of a row is mostly empty:
        # S' = 56·56 fills 4096-long rows to 77 %, 256-long ones to 94 %
        while block_r > 32 and cdiv(s, block_r) * block_r * 8 > s * 9:
            block_r //= 2
        block_c = min(max(TILE // block_r, 1), next_pow2(c))
    # K2 and K4 put the channel blocks on grid axis 1, which CUDA caps at 65535: trade rows for
    # channels (same tile size) until they fit
    while cdiv(c, block_c) > MAX_GRID_Y:
        block_c *= 2
        block_r = max(block_r // 2, 1)
    max_off = max(
        (n - 1) * a + (c - 1) * b + (s - 1) * d for a, b, d in strides
    ) + 1
    idx64 = max_off >= IDX64_AT
    return Plan(n, c, s, tuple(strides), block_r, block_c, idx64,
                *(_alignment(n, c, s, strides) if not idx64 else (1, False)))


def _twos(v: int) -> int:
    """The exponent of 2 in v (0 divides by any power)."""
    return (v & -v).bit_length() - 1 if v else 64


def _alignment(n: int, c: int, s: int, strides) -> tuple[int, bool]:
    """(align, rows_unit) of :class:`Plan`: the largest power of two <= MAX_ALIGN dividing the
    extent of x's contiguous axis and every tensor's strides along the other two (those of
    more than one element), 1 when x has no contiguous axis of more than one element. Never
    less than Triton saw before the division: a value divisible by 16 whose quotient is not
    (48 / 2, where another tensor's odd stride bounds ALIGN at 2) would narrow that tensor's
    vectors, so then ALIGN drops until none is. Only for 32-bit offsets (see
    :func:`_make_plan`): a value of 2^31 or more, which Triton passes as int64, could come
    down to an int32 argument once divided, and its product with ALIGN overflow."""
    sn, sc, ss = strides[0]
    if ss == 1 and s > 1:
        rows_unit, extent, axes = True, s, ((0, n), (1, c))
    elif sc == 1 and c > 1:
        rows_unit, extent, axes = False, c, ((0, n), (2, s))
    else:
        return 1, False
    values = [extent, *(t[i] for t in strides for i, size in axes if size > 1)]
    g = functools.reduce(math.gcd, values, MAX_ALIGN)  # (gcd(0, v) = v: stride 0 divides)
    align = g & -g  # its largest power-of-two factor
    while 1 < align < MAX_ALIGN and any(4 <= _twos(v) < 4 + _twos(align) for v in values):
        align //= 2
    return align, rows_unit and align > 1


_SM_COUNT: dict[int, int] = {}


def num_splits(p: Plan, device: torch.device) -> tuple[int, int]:
    """(splits, tiles_per_split) for the split reductions: about four programs per SM in all
    (one or a few under the interpreter, where programs run one after another)."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        target = 4 * _SM_COUNT[idx]
    else:
        target = CPU_PROGRAMS
    splits = max(1, min(p.num_tiles, cdiv(target, p.num_cblocks)))
    per_split = cdiv(p.num_tiles, splits)
    return cdiv(p.num_tiles, per_split), per_split  # no empty split


def merge_block(splits: int, block_c: int) -> int:
    """Partials per step (a power of two) of the last program's merge in K1 / K3: a tree
    reduction of a block of them per step instead of one dependent L2 round trip per split
    (up to 4 per SM) while the rest of the GPU idles. A quarter tile: the registers stay
    those of the tile loop (Triton 3.6, sm_90: K1 93-96 per thread; a half tile took 128-156
    and so fewer resident programs than the 4 per SM the splits assume)."""
    return max(1, min(next_pow2(splits), (TILE // 4) // block_c))


def _on_index(device: torch.device):
    if device.type == "cuda" and device.index is not None and (
        device.index != torch.cuda.current_device()
    ):
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_device(x: Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return _on_index(x.device)


@triton.jit
def tile_index(t, pid_c, tiles_s, S, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
               IDX64: tl.constexpr):
    """Tile ``t`` of channel block ``pid_c``: (n, rows [BLOCK_R] along S', channels [BLOCK_C],
    mask [BLOCK_R, BLOCK_C], channel mask, number of valid rows). Positions are int64 when the
    tensor spans 2^31 elements or more: S' alone may then reach 2^31 (channels_last, few
    channels)."""
    if IDX64:
        t = tl.cast(t, tl.int64)  # (the interpreter passes loop indices as Python ints)
    n = t // tiles_s
    r0 = (t - n * tiles_s) * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < S)[:, None] & cmask[None, :]
    return n, rows, cols, mask, cmask, tl.minimum(S - r0, BLOCK_R)


@triton.jit
def true_sizes(C, S, ALIGN: tl.constexpr, ROWS_UNIT: tl.constexpr):
    """(C, S') from :attr:`Plan.kernel_sizes`: the compiler sees ALIGN divide the scaled one."""
    if ALIGN == 1:
        return C, S
    elif ROWS_UNIT:
        return C, S * ALIGN
    else:
        return C * ALIGN, S


@triton.jit
def true_strides(sn, sc, ss, ALIGN: tl.constexpr, ROWS_UNIT: tl.constexpr):
    """A tensor's (sn, sc, ss) from :attr:`Plan.kernel_strides` (see :func:`true_sizes`)."""
    if ALIGN == 1:
        return sn, sc, ss
    elif ROWS_UNIT:
        return sn * ALIGN, sc * ALIGN, ss
    else:
        return sn * ALIGN, sc, ss * ALIGN


@triton.jit
def offsets(n, rows, cols, sn, sc, ss, IDX64: tl.constexpr):
    """Element offsets [BLOCK_R, BLOCK_C] of a tile in a tensor with strides (sn, sc, ss);
    int64 when the tensor spans 2^31 elements or more."""
    if IDX64:
        n, rows, cols = n.to(tl.int64), rows.to(tl.int64), cols.to(tl.int64)
    return n * sn + rows[:, None] * ss + cols[None, :] * sc


@triton.jit
def chan_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan's merge of two (mean, M2, count) groups, ``tl.reduce``'s combine function too:
    δ = m_b - m_a;  m = m_a + δ·n_b/n;  M2 = M2_a + M2_b + δ²·n_a·n_b/n;  n = n_a + n_b.
    Two empty groups (masked lanes) stay empty."""
    n = n_a + n_b
    w = tl.where(n == 0.0, 0.0, n_b / n)
    delta = mean_b - mean_a
    return mean_a + delta * w, m2_a + m2_b + delta * delta * (n_a * w), n


@triton.jit
def partials(part_ptr, j0, splits, C, cols, cmask, MERGE: tl.constexpr):
    """Offsets and mask of splits [j0, j0 + MERGE) x ``cols`` in a [k, SPLITS, C] workspace
    (add k·SPLITS·C for field k)."""
    js = j0 + tl.arange(0, MERGE)
    return js[:, None] * C + cols[None, :], (js < splits)[:, None] & cmask[None, :]
