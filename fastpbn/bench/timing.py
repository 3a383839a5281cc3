"""Timers, the device stamp and the copy-bandwidth yardstick for the benchmarks.

CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call, median and
p20/p80), and a CUDA-graph timer that replays a graph of unrolled calls. CPU:
``torch.utils.benchmark`` (``do_bench`` does not run on CPU), with every thread the process
has, so that the library and its baselines are measured the way a user runs them.
"""

from __future__ import annotations

import platform
import re
import time
from dataclasses import dataclass
from typing import Callable

import torch

# Caps keep the full GPU run inside its time budget: do_bench flushes L2 (a 256 MB memset)
# before every call, so thousands of calls of a microsecond kernel would cost seconds.
_MAX_CALLS = 100
_GRAPH_UNROLL = 20
_GRAPH_REPLAYS = 10
_MIN_BLOCKS = 5  # CPU: blocks per timing, at least


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles."""

    median: float
    p20: float
    p80: float


def _quantiles(times_ms: list[float]) -> Timing:
    t = torch.tensor(times_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return Timing(*(float(v) for v in q))


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    min_run_time: float = 0.2,
    warmup_ms: float = 10.0,
    rep_ms: float = 40.0,
    graph: bool = False,
) -> Timing:
    """Time ``fn()`` on ``device``.

    Args:
        fn: the work; its inputs are already on the device (never zeros).
        device: where it runs; CUDA uses CUDA events, CPU ``torch.utils.benchmark``.
        min_run_time: CPU only, seconds of measurement (split into blocks for the quantiles).
        warmup_ms, rep_ms: CUDA only, warm-up and measurement time.
        graph: CUDA only, capture ``fn`` in a CUDA graph and time replays (launch overhead
            removed); raises ``ValueError`` on CPU.
    Returns:
        The :class:`Timing` in milliseconds per call.
    """
    fn()  # warm caches, JIT compilers and the allocator outside the measurement
    if device.type == "cuda":
        return _cuda_graph_time(fn) if graph else _cuda_time(fn, warmup_ms, rep_ms)
    if graph:
        raise ValueError("graph=True needs a CUDA device")
    from torch.utils import benchmark

    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    # at least _MIN_BLOCKS blocks of the size it chose: one block stretched by a hiccup
    # (another process on a shared core) would otherwise be the whole measurement
    while len(times) < _MIN_BLOCKS:
        times.extend(timer.timeit(m.number_per_run).times)
    return _quantiles([t * 1e3 for t in times])


def _cuda_time(fn, warmup_ms: float, rep_ms: float) -> Timing:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-4)
    # do_bench sizes its loops as rep / estimate: cap the number of calls it makes
    rep, warmup = min(rep_ms, est * _MAX_CALLS), min(warmup_ms, est * _MAX_CALLS / 4)
    try:
        from triton.testing import do_bench
    except ImportError:
        return _cuda_event_time(fn, max(1, int(rep / est)))
    return Timing(*do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8]))


def _cuda_event_time(fn, calls: int) -> Timing:
    """do_bench's method without triton: flush L2, time each call with a pair of events."""
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(calls)]
    for start, end in events:
        cache.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) for s, e in events])


def _cuda_graph_time(fn) -> Timing:
    """Capture ``_GRAPH_UNROLL`` calls in one graph, replay it; ms per call per replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(_GRAPH_UNROLL):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(_GRAPH_REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / _GRAPH_UNROLL)
    return _quantiles(times)


def wall_time(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call of ``fn``, the device synchronized before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def copy_bandwidth(device: torch.device, nbytes: int, **timing) -> float:
    """Measured device copy bandwidth in GB/s (1e9 bytes): ``dst.copy_(src)`` moves 2·nbytes.

    Args:
        device: the device to measure.
        nbytes: size of the source buffer; use far more than the last-level cache.
        timing: passed to :func:`time_fn`.
    Returns:
        GB/s of the median copy.
    """
    src = torch.rand(nbytes // 4, device=device) + 1.0
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, **timing)
    return 2 * src.nbytes / (t.median * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    """Human-readable device stamp: the GPU name, or the CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return f"{model} (CPU, {platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """Directory name for results: ``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc``."""
    name = device_name(device).split(" (CPU")[0]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
    return slug if device.type == "cuda" else f"cpu-{slug}"
