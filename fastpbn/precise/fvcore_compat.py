"""``update_bn_stats``: fvcore's ``fvcore.nn.precise_bn.update_bn_stats``, on exact arithmetic."""

from __future__ import annotations

import itertools
import numbers
import warnings
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ._collect import (
    CallTracker,
    LayerAccumulator,
    PassState,
    eager_stance,
    has_running_stats,
    layer_root,
)
from .population import PopulationStats

# fvcore's BN_MODULE_TYPES (FastPreciseBN layers are subclasses, so they count too)
BN_MODULE_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def update_bn_stats(
    model: nn.Module,
    data_loader: Iterable[Any],
    num_iters: int = 200,
    progress: Optional[str] = None,
) -> None:
    """Recompute the running statistics of the BN layers that are in training mode, fvcore's
    way, with exact statistics (Wu & Johnson, Sec. 3).

    Same signature and semantics as fvcore's: ``model(inputs)`` is called on each of the first
    ``num_iters`` items as they are; training modes are not changed (set the layers to
    recompute to train mode, and mind dropout and other stateful layers that are in train
    mode: they run as they are); the result is the pooled statistics of every value a layer
    saw, with ``running_var`` = M2/N (biased, as fvcore writes it); ``num_batches_tracked``
    advances by one per call, as in fvcore. fvcore reads the buffers each forward wrote, so it
    measures what a layer normalizes; so does this: FastPreciseBN layers on what
    ``FastPreciseBN.forward`` normalizes, any other on the input of the batch-norm call its
    ``forward`` makes with the layer's weight (a subclass that transposes or scales its input
    first included), or at its input where it makes none (a synchronizing
    ``nn.SyncBatchNorm``).
    ``nn.SyncBatchNorm`` layers that synchronize (``torch.distributed`` initialized, more
    than one process in the layer's group) get the statistics of every process's data, as in
    fvcore: each process measures its own, then one exact merge over the layer's group at the
    end. Every process of the group must call this (its forward already requires that).

    Differences, all fixes: the pooled variance is computed in float64 from centred per-batch
    statistics (fvcore's E[x^2] - E[x]^2 in float32 is 20-40 % off at |mean|/std = 1e3); a
    layer called several times per forward accumulates every call (fvcore asserts), also one
    called as ``bn(input=x)`` (fvcore fails); a layer that never ran is left unchanged with a
    warning (fvcore writes zeros), and one whose ``track_running_stats`` is off is not
    recomputed (fvcore fails on it or rescales its buffer); other buffers the forward writes
    (a call counter, say) are put back (fvcore leaves them changed); if the loop raises, the
    model is exactly as before. Arguments are checked (fvcore accepts ``num_iters=0``, which
    writes zeros, and ignores any ``progress`` but "tqdm"), a short loader raises
    ``ValueError`` (fvcore: ``AssertionError``), and so do non-finite statistics (fvcore
    writes them).

    Args:
        model: the model whose training-mode BN layers are recomputed (a
            ``torch.compile``d model: its original module runs, eagerly).
        data_loader: an iterable; each item is passed to ``model`` unchanged.
        num_iters: number of items to run; the loader must yield at least that many.
        progress: "tqdm" (or True) for a progress bar; None or False for none.
    Returns:
        None (the buffers are updated in place).
    Raises:
        ValueError: the loader ended before ``num_iters`` items; non-finite statistics.
    """
    if isinstance(num_iters, bool) or not isinstance(num_iters, numbers.Integral) \
            or num_iters < 1:
        raise ValueError(f"num_iters must be a positive integer, got {num_iters!r}")
    num_iters = int(num_iters)  # (a numpy integer, as fvcore accepts)
    if progress not in (None, False, True, "tqdm"):  # (fvcore's callers pass False too)
        raise ValueError(f"progress must be None, False, True or 'tqdm', got {progress!r}")
    root = layer_root(model)  # a compiled model: its original module runs the pass (eagerly)
    layers = [(n, m) for n, m in root.named_modules()
              if m.training and isinstance(m, BN_MODULE_TYPES) and has_running_stats(m)]
    if not layers:
        return
    accs = [LayerAccumulator(n, m.running_mean.numel(), m.running_mean.device, per_call=False)
            for n, m in layers]
    tracker = CallTracker(len(layers))
    calls = [0] * len(layers)
    state = PassState(model, layers)
    try:
        state.enter(set_modes=False)
        state.install(accs, tracker)
        batches = itertools.islice(data_loader, num_iters)
        if progress in ("tqdm", True):  # (a disabled tqdm would still start its monitor)
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=num_iters)
        ran = 0
        with torch.no_grad(), eager_stance():
            for inputs in batches:
                tracker.begin_forward()
                root(inputs)
                state.after_forward()
                calls = [c + k for c, k in zip(calls, tracker.counts)]
                ran += 1
        if ran < num_iters:
            raise ValueError(f"update_bn_stats is meant to run for {num_iters} iterations, but "
                             f"data_loader stopped after {ran}")
        for (_, m), acc in zip(layers, accs):
            group = _sync_group(m)
            if group is not None:
                acc.all_reduce(group)
        results, unused, bad = [], [], []
        for (name, _), acc in zip(layers, accs):
            mean, var, count = acc.estimate("population", unbiased=False)
            if not bool((count > 0).all()):
                unused.append(name)
            elif not bool(torch.isfinite(mean).all() and torch.isfinite(var).all()):
                bad.append(name)
            else:
                results.append((name, (mean, var, count)))
        if bad:
            raise ValueError(f"non-finite statistics (NaN/Inf) in BN layer(s) {bad}; the model "
                             "is unchanged")
    finally:
        state.restore()
    if unused:
        warnings.warn(f"update_bn_stats: BN layer(s) {unused} never ran; left unchanged",
                      stacklevel=2)
    PopulationStats(dict(results)).apply(model)  # checked first, all or nothing
    with torch.no_grad():
        for (_, m), c in zip(layers, calls):
            if m.num_batches_tracked is not None:  # (selected: track_running_stats, restored)
                m.num_batches_tracked.add_(c)


def _sync_group(m: nn.Module) -> Optional[Any]:
    """The process group a training ``nn.SyncBatchNorm`` synchronizes over (its own, or the
    default one), as its forward decides; None when it does not synchronize."""
    if not isinstance(m, nn.SyncBatchNorm):
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = m.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None
