"""Scratch memory for the split reductions of both GPU backends (Triton K1 / K3, CUDA C++),
and the layout every backend gives a normalized output (:func:`output_like`).

A reduction writes per-split partial sums into a float32 buffer and counts finished splits in
an int32 buffer that must start at zero; every kernel leaves the counters it increments at zero
again, so eager calls reuse one buffer pair instead of allocating and zero-filling per call.

Who may share a pair:

* eager calls of one thread on one stream: launches on a stream run in order, and a call's
  launches (K1 then K2, K3 then K4, which pass per-channel values through the buffer) are not
  interleaved with another call's. Two threads launching on the same stream would interleave,
  so each thread has pairs of its own.
* nobody while a CUDA graph is captured: each call gets fresh buffers from the graph's memory
  pool, like any temporary of the graph. Graphs then never share scratch (they may replay
  concurrently on different streams), and pools that track every live block (torch.compile's
  CUDA graph trees) see nothing held across calls.

Each thread keeps its pairs in thread-local storage, so a thread's pairs are freed when it
exits. Cached pairs are allocated with a private stream current, so that they never land in a
pool that takes the current stream's allocations (CUDA graph trees' warm-up runs do that), and
are marked as used by the stream they serve: whenever a pair is freed (outgrown, or its thread
gone), its memory is reused only after the work queued on that stream has finished.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor


def output_like(x: Tensor, dtype: torch.dtype | None = None, device=None) -> Tensor:
    """An uninitialised tensor shaped like ``x`` in the layout PyTorch's batch-norm kernels give
    their output, x's ``suggest_memory_format``: channels_last / channels_last_3d when x's
    strides are ordered so (a sliced channels_last view too), else contiguous -- not x's own
    strides when x is another dense permutation (a transposed (N, L, C) input of
    BatchNorm1d, say). Every backend's y and dx, and the ops' fake implementations.
    ``device="meta"`` gives the layout alone, allocating nothing."""
    if x.is_contiguous():
        return torch.empty_like(x, dtype=dtype, device=device,
                                memory_format=torch.contiguous_format)
    if not _dense(x):  # empty_like then follows suggest_memory_format itself
        return torch.empty_like(x, dtype=dtype, device=device)
    fmt = torch.contiguous_format
    if x.dim() in (4, 5):
        last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=last):
            fmt = last
    return torch.empty_like(x, dtype=dtype, device=device, memory_format=fmt)


def _dense(x: Tensor) -> bool:
    """Whether x's elements fill its storage span without gaps or overlaps (some order of its
    dims is contiguous)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(x.shape, x.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


_TRACING_MODES = tuple(getattr(torch._C._TorchDispatchModeKey, k)
                       for k in ("FAKE", "PROXY", "FUNCTIONAL")
                       if hasattr(torch._C._TorchDispatchModeKey, k))


def caching_allowed() -> bool:
    """Whether a buffer made now may be kept for later calls: not while a fake, proxy or
    functional mode is active, whose tensors would then poison every later real call (other
    dispatch modes, profilers and checkpointing policies, make real tensors)."""
    return all(torch._C._get_dispatch_mode(k) is None for k in _TRACING_MODES)


_local = threading.local()  # .pairs: this thread's {(device, stream): (floats, counters)}
_alloc_streams: dict[torch.device, torch.cuda.Stream] = {}
_MIN_FLOATS, _MIN_COUNTERS = 1 << 16, 1024


def workspace(device: torch.device, floats: int, counters: int) -> tuple[Tensor, Tensor]:
    """A float32 buffer of at least ``floats`` elements and an int32 buffer of at least
    ``counters`` zeros on ``device`` (with its index), for the calling thread's current stream."""
    if not caching_allowed():
        return _fresh(device, floats, counters)
    if device.type != "cuda":  # the Triton interpreter and the CPU emulation: no streams
        return _cached((device,), device, floats, counters, None)
    switch = device.index is not None and device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if switch else contextlib.nullcontext():
        if torch.cuda.is_current_stream_capturing():
            return _fresh(device, floats, counters)
        stream = torch.cuda.current_stream()
    return _cached((device, stream.cuda_stream), device, floats, counters, stream)


def _fresh(device: torch.device, floats: int, counters: int) -> tuple[Tensor, Tensor]:
    return (torch.empty(max(floats, 1), dtype=torch.float32, device=device),
            torch.zeros(max(counters, 1), dtype=torch.int32, device=device))


def _cached(key: tuple, device: torch.device, floats: int, counters: int,
            stream: torch.cuda.Stream | None) -> tuple[Tensor, Tensor]:
    cache = _local.__dict__.setdefault("pairs", {})
    ws, cnt = cache.get(key, (None, None))
    if ws is not None and ws.numel() >= floats and cnt.numel() >= counters:
        return ws, cnt
    if ws is not None:
        floats, counters = max(floats, ws.numel()), max(counters, cnt.numel())
    floats, counters = max(floats, _MIN_FLOATS), max(counters, _MIN_COUNTERS)
    if stream is None:
        ws, cnt = _fresh(device, floats, counters)
    else:
        if device not in _alloc_streams:
            _alloc_streams[device] = torch.cuda.Stream(device)
        with torch.cuda.stream(_alloc_streams[device]):
            ws = torch.empty(floats, dtype=torch.float32, device=device)
            cnt = torch.empty(counters, dtype=torch.int32, device=device)
        ws.record_stream(stream)  # freed, the memory waits for the kernels queued on stream
        cnt.record_stream(stream)
        cnt.zero_()  # on the stream the kernels run on, so it is ordered before them
    cache[key] = (ws, cnt)
    return ws, cnt
