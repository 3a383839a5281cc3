"""Recompute benchmarks: ``recompute_bn_stats`` against fvcore's ``update_bn_stats`` and
``torch.optim.swa_utils.update_bn``.

Every method gets a fresh copy of the same model, the same batches (already on the device),
the same sample count and the same normalization batch size; a larger ``batch_size`` is its own
row. Each method is run once untimed (JIT compilers, allocator), then timed ``repeats`` times,
the methods taking turns (round-robin: a drift of the machine during the setup — clocks, other
load, the allocator after the float64 ground truth — falls on every method alike, not on
whichever ran first).
Two errors per method, both against float64 statistics merged exactly (Chan's formula):
``err`` against the very inputs its BN layers saw (forward pre-hooks reduce each input in
float64 with ``fastpbn.reference``, in one more untimed run) — the estimation arithmetic
alone; ``err_f64`` against the frozen model run entirely in float64 — the true population
statistics, so float32 rounding in the forward counts too. Each method is compared in the
variance convention it promises: M2/(N−1) (PyTorch's ``running_var``), or M2/N for fvcore and
its compatible twin.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import models, precise
from ..reference import batch_stats_reference
from .timing import _quantiles, wall_time


@dataclass
class Setup:
    """A model, its input batches and the name under which it is reported."""

    name: str
    make_model: Callable[[], nn.Module]
    batch: int  # the loader's batch size: the normalization batch size of every headline row
    chw: tuple[int, int, int]
    batches: int
    data_mean: float = 3.0
    data_std: float = 2.0

    @property
    def samples(self) -> int:
        return self.batch * self.batches


def setups(preset: str, device: torch.device) -> list[Setup]:
    """The models of a preset. ``full``: ResNet-50 (torchvision when installed, else the local
    definition) at 224² and the small CNN at batch 8; ``quick``: a reduced-width ResNet-50 and
    a small ResNet at 64², and the small CNN; ``tiny``: the smallest models that still exercise
    every method.
    Every preset ends with a stress row: a BN layer on raw inputs with |mean|/std = 1e4, where
    float32 E[x²] − E[x]² (fvcore) breaks down."""
    stress = Setup("input_bn+small_cnn", _input_bn_cnn, 8, (3, 16, 16), 16,
                   data_mean=1e4, data_std=1.0)
    if preset == "full":
        return [Setup("resnet50", _resnet50, 32, (3, 224, 224), 16),
                Setup("small_cnn", lambda: models.SmallCNN(3, 10, 16), 8, (3, 32, 32), 128),
                stress]
    if preset == "quick":
        return [Setup("resnet50-w16", lambda: models.resnet50(10, width=16), 16, (3, 64, 64), 4),
                Setup("small_resnet-w16", lambda: models.small_resnet(10, width=16), 32,
                      (3, 64, 64), 4),
                Setup("small_cnn", lambda: models.SmallCNN(3, 10, 16), 8, (3, 32, 32), 32),
                stress]
    if preset == "tiny":
        return [Setup("small_cnn-w4", lambda: models.SmallCNN(3, 10, 4), 8, (3, 16, 16), 4),
                Setup("input_bn+small_cnn-w4", lambda: _input_bn_cnn(4), 8, (3, 8, 8), 4,
                      data_mean=1e4, data_std=1.0)]
    raise ValueError(f"unknown preset {preset!r}")


def _input_bn_cnn(width: int = 16) -> nn.Module:
    """A BN layer normalizing raw inputs, then the small CNN."""
    return nn.Sequential(nn.BatchNorm2d(3), models.SmallCNN(3, 10, width))


def _resnet50() -> nn.Module:
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision

        return torchvision.models.resnet50()
    return models.resnet50()


def prepare(setup: Setup, device: torch.device, seed: int = 0) -> tuple[nn.Module, list[Tensor]]:
    """The "trained" model (eval mode, BN affine parameters and running stats perturbed so
    that they are not the identity) and the input batches on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = setup.make_model()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    model = model.to(device).eval()
    batches = [
        (torch.randn(setup.batch, *setup.chw, generator=gen) * setup.data_std
         + setup.data_mean).to(device)
        for _ in range(setup.batches)
    ]
    return model, batches


def bn_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats}


def _regroup(batches: list[Tensor], batch_size: Optional[int]) -> list[Tensor]:
    if batch_size is None:
        return batches
    flat = torch.cat(batches)
    return [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)
            if len(flat[i:i + batch_size]) > 1]


class Float64Capture:
    """Forward pre-hooks on every BN layer of a model that reduce each input in float64
    (``batch_stats_reference``) and merge the calls exactly (Chan's formula in float64).
    Modes are not touched. ``truth()``: layer name -> (mean, M2, count)."""

    def __init__(self, model: nn.Module):
        self.acc: dict[str, tuple[int, Tensor, Tensor]] = {}
        self.handles = [bn.register_forward_pre_hook(functools.partial(self._hook, name))
                        for name, bn in bn_layers(model).items()]

    def _hook(self, name, module, args):
        mean_b, var_b, n_b = batch_stats_reference(args[0])
        n, mean, m2 = self.acc.get(name, (0, torch.zeros_like(mean_b), torch.zeros_like(var_b)))
        total = n + n_b
        delta = mean_b - mean
        self.acc[name] = (total, mean + delta * n_b / total,
                          m2 + var_b * n_b + delta * delta * n * n_b / total)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def truth(self) -> dict[str, tuple[Tensor, Tensor, int]]:
        return {name: (mean, m2, n) for name, (n, mean, m2) in self.acc.items()}


@torch.no_grad()
def ground_truth(model: nn.Module, batches: list[Tensor],
                 batch_size: Optional[int] = None) -> dict[str, tuple[Tensor, Tensor, int]]:
    """Float64 population statistics of every BN layer's input, the model itself run in
    float64: the exact statistics of the frozen model (BN layers normalizing by batch
    statistics, everything else in eval mode), free of any float32 rounding.

    Args:
        model: the frozen model (not modified: a copy is run).
        batches: the input batches.
        batch_size: normalization batch size (batches concatenated then split), None for the
            batches as they are.
    Returns:
        layer name -> (mean, M2, count), float64 on the model's device.
    """
    m = copy.deepcopy(model).double().eval()
    for bn in bn_layers(m).values():
        bn.train()
    capture = Float64Capture(m)
    for b in _regroup(batches, batch_size):
        m(b.double())
    capture.remove()
    return capture.truth()


def stats_error(model: nn.Module, truth: dict[str, tuple[Tensor, Tensor, int]],
                biased: bool = False) -> dict[str, float]:
    """Worst error over all layers and channels of the model's running stats against
    ``truth`` (every layer must be in it): ``var`` is
    |v − v*|/v*, ``mean`` is |m − m*|/(|m*| + σ*) (relative to the data's magnitude: m* may be
    near 0, and a float32 buffer cannot hold m* closer than |m*|·6e-8).

    Args:
        biased: compare the variance with M2/N (fvcore's convention) instead of M2/(N−1).
    """
    err_v = err_m = 0.0
    layers = bn_layers(model)
    for name, bn in layers.items():
        if name not in truth:
            raise RuntimeError(f"no float64 ground truth for BN layer {name!r} (did it run?)")
        mean, m2, n = truth[name]
        var = m2 / (n if biased else n - 1)
        err_v = max(err_v, float(((bn.running_var.double() - var).abs() / var).max()))
        scale = mean.abs() + var.sqrt()
        err_m = max(err_m, float(((bn.running_mean.double() - mean).abs() / scale).max()))
    return {"var": err_v, "mean": err_m, "max": max(err_v, err_m)}


@dataclass
class Method:
    """How to run one recompute method: ``prep`` (untimed, e.g. converting the model) returns
    the model that ``run(model, batches)`` updates; ``batch_size`` None means the loader's;
    ``biased``: the method promises the variance M2/N (fvcore) rather than M2/(N−1), and its
    error is measured against that."""

    run: Callable[[nn.Module, list[Tensor]], object]
    batch_size: Optional[int] = None
    prep: Callable[[nn.Module], nn.Module] = lambda m: m
    biased: bool = False
    # how the batches (on the device) reach the method, untimed: e.g. moved to host memory
    data: Callable[[list[Tensor]], list[Tensor]] = lambda batches: batches
    # Python hooks do not run when a captured CUDA graph replays: no ``err`` for such methods
    hookable: bool = True


def methods(device: torch.device, batch: int) -> dict[str, Method]:
    """The methods by name; fvcore's when fvcore is installed."""
    from ..modules import convert_model

    out: dict[str, Method] = {}

    def ours(model, data, **kw):
        precise.recompute_bn_stats(model, data, num_samples=sum(len(b) for b in data), **kw)

    out["fastpbn"] = Method(ours)
    # the same statistics path as stock layers (which borrow FastPreciseBN's forward in
    # the pass): what, if anything, converting costs
    out["fastpbn-converted"] = Method(ours, prep=convert_model)
    if device.type == "cuda":
        out["fastpbn+cuda_graph"] = Method(lambda m, d: ours(m, d, cuda_graph=True),
                                           hookable=False)
    # the throughput features, one at a time (rows of their own)
    out["fastpbn(stop_early=True)"] = Method(lambda m, d: ours(m, d, stop_early=True))
    if device.type == "cuda":  # copies overlapped with the forward (pinned) or not
        out["fastpbn(pinned host batches)"] = Method(
            lambda m, d: ours(m, d, device=device),
            data=lambda batches: [b.cpu().pin_memory() for b in batches])
        out["fastpbn(pageable host batches)"] = Method(
            lambda m, d: ours(m, d, device=device),
            data=lambda batches: [b.cpu() for b in batches])
    big = 4 * batch
    out[f"fastpbn(batch_size={big})"] = Method(lambda m, d: ours(m, d, batch_size=big), big)
    out["fastpbn.update_bn_stats"] = Method(
        lambda m, d: precise.update_bn_stats(m, d, num_iters=len(d)), prep=_train,
        biased=True)
    if importlib.util.find_spec("fvcore") is not None:
        import fvcore.nn

        # fvcore updates the BN layers that are in training mode: its users call model.train()
        out["fvcore"] = Method(lambda m, d: fvcore.nn.update_bn_stats(m, d, num_iters=len(d)),
                               prep=_train, biased=True)
    out["torch-swa-update_bn"] = Method(lambda m, d: torch.optim.swa_utils.update_bn(d, m))
    return out


def _train(model: nn.Module) -> nn.Module:
    return model.train()


BASELINES = ("fvcore", "torch-swa-update_bn")


def run_setup(setup: Setup, device: torch.device, repeats: int,
              progress: Optional[Callable[[str], None]] = None,
              errors: Optional[list] = None) -> list[dict]:
    """Time and check every method on one setup; one record per (fastpbn method, baseline).

    A method that fails is appended to ``errors`` (label, message) and the others go on;
    without ``errors`` it raises.
    """
    model, batches = prepare(setup, device)
    todo = methods(device, setup.batch)
    # the float64 ground truths first: none of them runs between two timed runs
    truths = {bs: ground_truth(model, batches, bs)
              for bs in dict.fromkeys(m.batch_size for m in todo.values())}
    data, times = {}, {name: [] for name in todo}
    last = {}  # the last timed model of each method without hooks: its statistics are checked

    def failed(name, e):
        if errors is None:
            raise e
        errors.append((f"recompute {setup.name} {name}", f"{type(e).__name__}: {e}"))
        del todo[name]

    with warnings.catch_warnings():  # e.g. "batch below 32": the setups are deliberate
        warnings.simplefilter("ignore")
        for i in range(repeats + 1):  # round 0 warms compilers and the allocator
            for name, method in list(todo.items()):
                if progress and i == 0:
                    progress(f"recompute {setup.name} {name}")
                try:
                    if name not in data:
                        data[name] = method.data(batches)
                    m = method.prep(copy.deepcopy(model))
                    t = wall_time(functools.partial(method.run, m, data[name]), device)
                except Exception as e:
                    failed(name, e)
                    continue
                if i:
                    times[name].append(t * 1e3)
                if not method.hookable:
                    last[name] = m
        results = {}
        for name, method in list(todo.items()):
            try:
                err = _errors(method, last.pop(name, model), data.pop(name),
                              truths[method.batch_size])
            except Exception as e:
                failed(name, e)
                continue
            results[name] = _quantiles(times[name]), err, method.batch_size
    records = []
    shape = [setup.batch, *setup.chw]
    data = f"mean {setup.data_mean:g}, std {setup.data_std:g}"
    for name, (t, err, bs) in results.items():
        if name in BASELINES:
            continue
        for base in (b for b in BASELINES if b in results):
            tb, errb, _ = results[base]
            records.append({
                "bench": "recompute", "shape": shape, "dtype": "float32", "layout": "NCHW",
                "pass": "stats", "impl": name, "baseline": base, "ms": t.median,
                "baseline_ms": tb.median, "speedup": tb.median / t.median, "gbps": None,
                "median": t.median, "p20": t.p20, "p80": t.p80, "baseline_p20": tb.p20,
                "baseline_p80": tb.p80, "model": setup.name, "data": data,
                "samples": setup.samples, "batch_size": bs or setup.batch,
                "headline": bs is None and name == "fastpbn",
                "samples_per_s": setup.samples / (t.median * 1e-3),
                "baseline_samples_per_s": setup.samples / (tb.median * 1e-3),
                "err": err["max"], "err_var": err["var"], "err_mean": err["mean"],
                "err_f64": err["f64"], "baseline_err": errb["max"],
                "baseline_err_var": errb["var"], "baseline_err_mean": errb["mean"],
                "baseline_err_f64": errb["f64"],
            })
    return records


def _errors(method: Method, model, data, truth) -> dict:
    """The statistics' errors. A method with hooks runs once more, untimed, on a copy of
    ``model`` with float64 capture hooks: ``err`` against the float64 statistics of exactly
    the inputs its layers saw (the estimation arithmetic alone); without hooks ``model`` is
    its last timed model and ``err`` is None. ``err_f64``: against the float64 model's
    ``truth`` (also counts the float32 rounding of the forward that produced them, and on CUDA
    the TF32 rounding of cuDNN convolutions, PyTorch's default)."""
    if method.hookable:
        model = method.prep(copy.deepcopy(model))
        capture = Float64Capture(model)
        method.run(model, data)
        capture.remove()
        err = stats_error(model, capture.truth(), method.biased)
    else:
        err = {"max": None, "var": None, "mean": None}
    err["f64"] = stats_error(model, truth, method.biased)["max"]
    return err
