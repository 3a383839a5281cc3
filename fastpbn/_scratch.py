"""Scratch memory for the split reductions of both GPU backends (Triton K1 / K3, CUDA C++),
and what every backend gives: a normalized output's layout (:func:`output_like`) and the
dtype of its statistics (:func:`stats_dtype`).

A reduction writes per-split partial sums into a float32 buffer and counts finished splits in
an int32 buffer that must start at zero. Each call takes a fresh pair from PyTorch's caching
allocator on the current stream, as PyTorch's own split reductions take theirs (their
semaphores are an ``at::zeros`` per call): an allocation and a zero-fill per call, for a pair
whose lifetime the allocator manages in every case --

* streams: the allocator orders reuse of the memory after the call's kernels on its stream;
  threads and streams never share a pair;
* CUDA graphs: during capture the pair comes from the graph's memory pool, like any temporary
  of the graph, so graphs replayed concurrently never share scratch;
* memory pools (``torch.cuda.MemPool``, torch.compile's CUDA graph trees, which route a
  thread's allocations into their pool while warming up): nothing is held across calls, so no
  pool ever sees a block that outlives the call that made it.

A pair kept across calls would save the zero-fill but would need stream bookkeeping on every
free and could not stay out of such pools (they route by thread on recent PyTorch).
"""

from __future__ import annotations

import torch
from torch import Tensor


def stats_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the saved statistics (mean, invstd) and the torch backend's work dtype:
    float64 for float64 x (served by the torch backend only), else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def output_like(x: Tensor, dtype: torch.dtype | None = None, device=None) -> Tensor:
    """An uninitialised tensor shaped like ``x`` in the layout PyTorch's batch-norm kernels give
    their output, x's ``suggest_memory_format``: channels_last / channels_last_3d when x's
    strides are ordered so (a sliced channels_last view too), else contiguous -- not x's own
    order when it is another permutation (a transposed (N, L, C) input of BatchNorm1d, or
    overlapping sliding windows from ``unfold`` with C outermost, say: PyTorch's CPU kernels
    leave their ``out=`` statistics unwritten for such a layout). Every backend's y and dx,
    and the ops' fake implementations. ``device="meta"`` gives the layout alone, allocating
    nothing."""
    if x.is_contiguous():
        return torch.empty_like(x, dtype=dtype, device=device,
                                memory_format=torch.contiguous_format)
    if x.dim() in (4, 5):
        last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        # dense in x's own dim order (x's strides, for a dense x)
        y = torch.empty_like(x, dtype=dtype, device=device)
        if y.is_contiguous(memory_format=last):
            return y
    return torch.empty_like(x, dtype=dtype, device=device, memory_format=torch.contiguous_format)


def workspace(device: torch.device, floats: int, counters: int) -> tuple[Tensor, Tensor]:
    """A float32 buffer of ``floats`` elements (contents undefined) and an int32 buffer of
    ``counters`` zeros on ``device``, for one call of a split reduction."""
    return (torch.empty(max(floats, 1), dtype=torch.float32, device=device),
            torch.zeros(max(counters, 1), dtype=torch.int32, device=device))
