"""Kernel benchmarks: ``FastPreciseBN2d`` against stock ``nn.BatchNorm2d`` (eager and
``torch.compile``) and ``fastpbn.batch_stats`` against PyTorch's statistics ops.

One :class:`Case` is a shape, dtype and layout; every pass of it is timed for fastpbn once and
for each baseline in the same process, and becomes one record per (pass, baseline). Parameters
are float32 whatever the input dtype (the mixed-precision convention); inputs are shifted and
scaled random data.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .. import FastPreciseBN2d, batch_stats
from .._backend import get_backend
from ..ops import _stock_serves
from .timing import Timing, time_fn

# BENCH.md: ResNet-50 BN shapes (C, H, W) at N = 32, 128, 256, plus stock BN's bad cases.
RESNET50_CHW = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28),
                (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7)]
BAD_SHAPES = [
    (20, 6, 256, 256),  # few channels, large spatial
    (1, 3, 1024, 1024),  # one image, three channels
    (4096, 32, 1, 1),  # BatchNorm1d-like: no spatial extent
    (17, 33, 13, 11),  # odd sizes everywhere
]
FULL_SHAPES = [(n, *chw) for n in (32, 128, 256) for chw in RESNET50_CHW] + BAD_SHAPES
QUICK_SHAPES = [(8, 64, 56, 56), (8, 256, 14, 14), (4096, 32, 1, 1), (17, 33, 13, 11)]
TINY_SHAPES = [(4, 16, 8, 8)]

# Bytes moved per pass, in units of x's size (the design's yardstick): statistics read x
# once; the training forward reads it twice and writes y; the training backward reads three
# tensors-worth and writes dx. Eval forward is one read + one write, eval backward reads dy
# and x (for dw) and writes dx. The two-pass training backward (fastpbn's K3 + K4, and
# PyTorch's) reads dy and x twice: 5, not 4, unless the second reads hit in cache, so its
# GB/s and % of copy bandwidth are those of the yardstick's 4 (x 1.25 for the bytes moved).
TRAFFIC = {
    ("stats", "train"): 1,
    ("forward", "train"): 3,
    ("backward", "train"): 4,
    ("forward_backward", "train"): 7,
    ("forward", "eval"): 2,
    ("backward", "eval"): 3,
    ("forward_backward", "eval"): 5,
}

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def bytes_moved(shape: tuple[int, ...], dtype: torch.dtype, pass_: str, mode: str) -> int:
    """Minimum bytes a pass moves through memory (the roofline numerator)."""
    numel = 1
    for s in shape:
        numel *= s
    return numel * torch.empty((), dtype=dtype).element_size() * TRAFFIC[(pass_, mode)]


@dataclass
class Case:
    """One benchmark point and which baselines and passes it gets."""

    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    channels_last: bool
    passes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # mode -> passes
    compile: bool = False
    graph: bool = False

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "NCHW"


COMPILED = "fastpbn[compiled]"  # the impl of torch.compile'd FastPreciseBN2d's records


def _no_donated_buffers():
    """A compiled backward that donates its saved buffers refuses ``retain_graph``, which the
    backward pass's timing needs (compiled stock BN's graph donates none)."""
    config = torch._functorch.config
    if hasattr(config, "donated_buffer"):
        return config.patch(donated_buffer=False)
    return contextlib.nullcontext()


def make_record(case: Case, pass_: str, mode: str, impl: str, baseline: str, t: Timing,
                tb: Timing, copy_gbps: Optional[float], graph: bool = False) -> dict:
    """One result record (BENCH.md / the result JSON): medians, p20/p80, GB/s, speedup."""
    nbytes = bytes_moved(case.shape, case.dtype, pass_, mode)
    gbps = nbytes / t.median / 1e6
    return {
        "bench": "batch_norm", "shape": list(case.shape), "dtype": DTYPE_NAMES[case.dtype],
        "layout": case.layout, "pass": pass_, "mode": mode, "impl": impl, "baseline": baseline,
        "ms": t.median, "baseline_ms": tb.median, "speedup": tb.median / t.median,
        "gbps": gbps, "median": t.median, "p20": t.p20, "p80": t.p80,
        "baseline_p20": tb.p20, "baseline_p80": tb.p80,
        "baseline_gbps": nbytes / tb.median / 1e6, "bytes": nbytes, "graph": graph,
        "pct_copy": 100 * gbps / copy_gbps if copy_gbps else None,
    }


def _inputs(case: Case, device: torch.device, copies: int = 1):
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    out = []
    for _ in range(copies):
        x = torch.randn(case.shape, device=device) * 2.0 + 5.0  # mean far from 0
        x = x.to(case.dtype).contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn(case.shape, device=device).to(case.dtype).contiguous(memory_format=fmt)
        out.append((x, dy))
    return out


def _modules(c: int, device: torch.device):
    stock = nn.BatchNorm2d(c).to(device)
    with torch.no_grad():
        stock.weight.uniform_(0.5, 1.5)
        stock.bias.normal_(0.0, 0.5)
    fast = FastPreciseBN2d(c).to(device)
    fast.load_state_dict(stock.state_dict())
    return fast, stock


def _pass_fn(module, pass_: str, mode: str, sets) -> Callable[[], object]:
    """The callable for one pass; rotates through ``sets`` of (x, dy) when given several."""
    module.train(mode == "train")
    params = [p for p in module.parameters()]
    state = {"i": 0}

    def pick():
        x, dy = sets[state["i"] % len(sets)]
        state["i"] += 1
        return x, dy

    if pass_ == "forward" and mode == "eval":
        def fn():
            with torch.no_grad():
                return module(pick()[0])
    elif pass_ == "forward":  # the training forward runs with autograd recording, as in training
        def fn():
            return module(pick()[0])
    elif pass_ == "forward_backward":
        def fn():
            x, dy = pick()
            return torch.autograd.grad(module(x), [x, *params], dy)
    elif pass_ == "backward":
        if len(sets) != 1:
            raise ValueError("the backward pass is timed on one input set")
        x, dy = sets[0]
        y = module(x)

        def fn():
            return torch.autograd.grad(y, [x, *params], dy, retain_graph=True)
    else:
        raise ValueError(f"unknown pass {pass_!r}")
    return fn


def _stats_fns(x: torch.Tensor) -> dict[str, Callable[[], object]]:
    dims = [0, 2, 3]
    fns = {"torch-var_mean": lambda: torch.var_mean(x.detach(), dim=dims, correction=0)}
    if x.is_cuda:
        fns["torch-batch_norm_stats"] = lambda: torch.batch_norm_stats(x.detach(), 1e-5)
    return fns


def run_case(case: Case, device: torch.device, copy_gbps: Optional[float], timing: dict,
             errors: Optional[list] = None) -> list[dict]:
    """Time every pass of ``case`` for fastpbn and its baselines; one record per pair.

    A measurement that fails is appended to ``errors`` (label, message) and the others go on;
    without ``errors`` it raises.
    """
    records = []
    sets = _inputs(case, device)
    x = sets[0][0]
    backend = get_backend(x).name
    fast, stock = _modules(case.shape[1], device)
    # what serves the module's passes: under auto, eager CUDA calls go to PyTorch's kernel
    # where it is faster (fastpbn.ops.STOCK_EAGER_ON_CUDA); FASTPBN_BACKEND=triton times
    # fastpbn's kernels everywhere
    def served(pass_, mode):
        if pass_ == "stats":
            return backend
        # (eval forward is timed under no_grad)
        no_grad = mode == "eval" and pass_ == "forward"
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            stock_ = _stock_serves(x, mode == "train", fast.weight, fast.bias,
                                   fast.running_mean, fast.running_var)
        return "stock-kernel" if stock_ else backend

    compiled = compiled_fast = None
    if case.compile:
        torch._dynamo.reset()  # each case compiles afresh: no recompile limit, no dynamic shapes
        compiled = torch.compile(stock, dynamic=False)
        compiled_fast = torch.compile(fast, dynamic=False)  # what a user who compiles gets

    def measure(label, build, **kw) -> Optional[Timing]:
        """Time ``build()`` (building runs the model for the backward pass, so it is inside
        the failure net too)."""
        try:
            return time_fn(build(), device, **timing, **kw)
        except Exception as e:
            if errors is None:
                raise
            errors.append((f"{case.shape} {DTYPE_NAMES[case.dtype]} {case.layout} {label}",
                           f"{type(e).__name__}: {e}"))
            return None

    def record(pass_, mode, baseline, t, tb, graph=False, impl=None):
        if t is not None and tb is not None:
            records.append(make_record(case, pass_, mode,
                                       impl or f"fastpbn[{served(pass_, mode)}]", baseline, t,
                                       tb, copy_gbps, graph))

    if "stats" in case.passes.get("train", ()):
        t = measure("stats fastpbn", lambda: lambda: batch_stats(x.detach(), check=False))
        for name, fn in _stats_fns(x).items():
            record("stats", "train", name, t, measure(f"stats {name}", lambda f=fn: f))
    for mode, passes in case.passes.items():
        for pass_ in passes:
            if pass_ == "stats":
                continue
            def build(module, p=pass_, m=mode):
                return lambda: _pass_fn(module, p, m, sets)

            t = measure(f"{mode} {pass_} fastpbn", build(fast))
            record(pass_, mode, "torch-eager", t,
                   measure(f"{mode} {pass_} eager", build(stock)))
            # compiled: training passes and the eval forward (one graph each, no eval backward)
            if compiled is not None and (mode == "train" or pass_ == "forward"):
                tb = measure(f"{mode} {pass_} compile", build(compiled))
                record(pass_, mode, "torch-compile", t, tb)
                with _no_donated_buffers():
                    record(pass_, mode, "torch-compile", tb=tb, impl=COMPILED, t=measure(
                        f"{mode} {pass_} fastpbn compiled", build(compiled_fast)))
    if case.graph and device.type == "cuda":
        # small shapes under CUDA graphs (launch overhead removed), inputs rotated over up to
        # 16 sets, 2x L2 where 16 reach it: an input below ~L2/8 (6.5 MB on an H100) stays in
        # L2 across the rotation, as a layer's input does just after the layer that wrote it
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        x_bytes = bytes_moved(case.shape, case.dtype, "stats", "train")
        gsets = _inputs(case, device, copies=max(1, min(16, -(-2 * l2 // x_bytes))))
        for pass_ in ("forward", "forward_backward"):
            t = measure(f"graph {pass_} fastpbn",
                        lambda p=pass_: _pass_fn(fast, p, "train", gsets), graph=True)
            tb = measure(f"graph {pass_} eager",
                         lambda p=pass_: _pass_fn(stock, p, "train", gsets), graph=True)
            record(pass_, "train", "torch-eager", t, tb, graph=True)
    return records


def plan(preset: str, device: torch.device, compile_: bool) -> list[Case]:
    """The cases of a preset (``tiny``, ``quick`` or ``full``), most important first.

    ``full`` is BENCH.md's set; ``torch.compile`` joins the N=128 ResNet-50 shapes and the bad
    cases in float32/bfloat16 (compiling every point would not fit the 10-minute budget). On
    CUDA, graphs join the shapes of at most 16 MB in ``full`` and ``quick``.
    """
    if preset == "full":
        shapes, dtypes = FULL_SHAPES, (torch.float32, torch.bfloat16, torch.float16)
        train, evals = ("stats", "forward", "backward", "forward_backward"), \
            ("forward", "forward_backward")
    elif preset == "quick":
        shapes, dtypes = QUICK_SHAPES, (torch.float32, torch.bfloat16)
        train, evals = ("stats", "forward", "backward", "forward_backward"), ("forward",)
    elif preset == "tiny":
        shapes, dtypes = TINY_SHAPES, (torch.float32,)
        train, evals = ("stats", "forward", "forward_backward"), ("forward",)
    else:
        raise ValueError(f"unknown preset {preset!r}")
    layouts = (False,) if preset == "tiny" else (False, True)
    cases = []
    for dtype in dtypes:
        for cl in layouts:
            for shape in shapes:
                case = Case(shape, dtype, cl, {"train": train, "eval": evals})
                small = bytes_moved(shape, dtype, "stats", "train") <= 16 * 2**20
                case.graph = (device.type == "cuda" and preset != "tiny" and small
                              and dtype != torch.float16)
                if preset == "full":
                    case.compile = compile_ and dtype != torch.float16 and (
                        shape[0] == 128 or shape in BAD_SHAPES)
                elif preset == "quick":  # a CPU compile costs seconds: two float32 NCHW shapes
                    case.compile = compile_ and dtype == torch.float32 and not cl and \
                        shape in shapes[:2]
                cases.append(case)
    return cases
