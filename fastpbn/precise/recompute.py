"""``recompute_bn_stats``: PreciseBN (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", Sec. 3).

Freeze the model, run samples through it with the selected BN layers normalizing by batch
statistics, and pool each layer's inputs with equal weight per sample into exact float64
(count, mean, M2) per channel. Nothing is written to the model until the pass has succeeded.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..stats import WelfordState
from ._collect import (
    CallTracker,
    LayerAccumulator,
    LayerSelection,
    PassState,
    eager_stance,
    gather,
    layer_root,
    select_layers,
)
from ._data import HostBatches, default_input, on_device, regroup
from ._forward import Forward
from .population import ESTIMATORS, PopulationStats

SMALL_BATCH = 32  # below this the recomputed statistics are visibly off (paper, Table 2)


def recompute_bn_stats(
    model: nn.Module,
    data: Iterable,
    *,
    num_samples: Optional[int] = None,
    num_batches: Optional[int] = None,
    batch_size: Optional[int] = None,
    estimator: str = "population",
    layers: LayerSelection = None,
    input_fn: Optional[Callable[[Any], Any]] = None,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    device: Optional[torch.device | str] = None,
    tol: Optional[float] = None,
    progress: bool = False,
    process_group=None,
    apply: bool = True,
    stop_early: Optional[bool] = None,
    cuda_graph: bool = False,
    tol_every: int = 8,
) -> PopulationStats:
    """Recompute the population statistics of a model's BN layers ("PreciseBN").

    During the pass the selected layers normalize with batch statistics and every other module
    is in eval mode (no dropout; BN layers left out of ``layers`` normalize with, and keep,
    their running statistics). The default selects every BN layer, also those a model keeps
    in eval mode (frozen, e.g. by a ``train()`` override): leave them out with ``layers=``,
    e.g. ``layers=lambda name, m: m.training`` called on the model in train mode (the
    selection happens before the pass sets any mode). Afterwards
    every ``training`` flag, momentum, buffer and hook is as before -- also when the pass
    raises or is interrupted, in which case nothing is written. No host synchronization
    happens per batch (only every ``tol_every`` batches with ``tol``).

    Args:
        model: the model; its BN layers' names in ``named_modules()`` key the result. A
            ``torch.compile``d model's original module and an ``nn.DataParallel``'s
            ``module`` run the pass and key the result (names without the wrapper's
            ``_orig_mod.`` / ``module.``, so the statistics apply to either; hooks registered
            on the wrapper itself do not run);
            compiled code runs eagerly during the pass (torch >= 2.6 for a model compiled in
            place or a compiled submodule): the pass switches modes and layer forwards, and
            the compiler would trace and compile graphs for the pass alone.
        data: an iterable of items (tensor; tuple/list: first element; dict: the first of
            "input", "inputs", "image", "images", "img", "x").
        num_samples: use exactly this many samples (the item that crosses it is cut; a cut
            that leaves one sample is skipped, with a warning, as below); the data must hold
            them (loader batches of one sample, skipped when ``batch_size`` is None, do not
            count). Per rank when distributed.
        num_batches: number of normalization batches (forward calls) to run. With
            ``num_samples`` too, the pass ends at whichever is reached first.
        batch_size: the normalization batch size. Loader batches are concatenated or split on
            the device to reach it (the paper's Table 2: use >= ~100). The last batch holds
            the remainder and is used when it has at least 2 samples; a batch of 1 sample is
            skipped (with a warning): it gives the noisiest normalization and 1-D BN cannot
            normalize it. None: the loader's batches as they come.
        estimator: "population" (default): the pooled statistics of every value a layer saw,
            ``running_var`` = M2/(N-1), exact under uneven batches. "batch_mean": the equal-
            weight average of per-call means and unbiased variances (``swa_utils.update_bn``,
            pycls, mmpretrain). A call is one normalization: each batch-norm call a stock
            subclass's ``forward`` makes, but one call of a FastPreciseBN subclass however
            many it makes (a "ghost BN" normalizing chunks of its input: their means pool
            into one call; known limitation), and an empty one counts for nothing.
        layers: which BN layers to recompute: modules or names (as in ``named_modules()``),
            one or a list, or ``fn(name, module) -> bool``; None: every BN layer with running
            statistics that the pass's forward runs (one that never runs, such as an auxiliary
            head that runs only in training, is left unchanged with a warning). Subclasses,
            and layers whose ``forward`` was replaced on the instance, keep their own
            ``forward``. A FastPreciseBN layer is measured on what ``FastPreciseBN.forward``
            normalizes; any other on the input of the batch-norm call by batch statistics
            that its ``forward`` makes with the layer's weight (``F.batch_norm`` or
            ``torch.batch_norm``, however it gets there: after a transpose or a scaling,
            through ``super()`` or by name), or at its
            input where it makes none (a synchronizing ``nn.SyncBatchNorm``).
        input_fn: ``input_fn(item)`` -> model input: a tensor or a structure (tuples,
            namedtuples, lists, dicts) of tensors whose dim 0 is the batch, the same in all
            of them; 0-d tensors and other leaves ride along, taken from the first loader
            batch when batches are joined. A list of per-sample images is not a batch, and
            one whose images share their first dim cannot be told from one (it would be
            counted by that dim): stack it in ``input_fn``.
        forward_fn: ``forward_fn(model, inputs)`` runs the model (a compiled model's
            original module); default ``model(inputs)``.
        device: where inputs go (non-blocking copies from pinned memory, overlapped with the
            previous batch's forward on CUDA; so a loader must not refill a pinned tensor it
            has already handed out, as ``DataLoader(pin_memory=True)`` never does). None: the
            selected layers' device when they share one.
        tol: stop once, in every selected layer and channel, the standard error of the mean
            (from the spread of per-call means) is at most ``tol`` x the population std;
            ``num_samples``/``num_batches`` are then upper limits. Distributed: every rank
            must converge on its own data (conservative). A layer that has not run yet holds
            the pass up, since it may run later: with an auxiliary head that never runs, leave
            it out with ``layers=`` to stop early.
        progress: show a tqdm bar (samples/s).
        process_group: merge per-rank statistics over this group (default: the default group
            when torch.distributed is initialized), exactly, weighted by counts; every rank
            ends with identical buffers. Every rank must call this function; a rank that
            raises inside its loop leaves the others waiting at the merge (as any collective).
        apply: write the result into the model's running buffers (else only return it).
        stop_early: end each forward after the last call of a selected layer (learned on the
            first batch) once every selected layer has made its calls, by raising through the
            model's forward: whatever follows that layer does not run (so nor do side effects
            the forward has after it). Only inputs with the first one's structure (containers,
            tensor shapes, dtypes, strides and devices, array shapes, other leaves' values)
            are cut; others run to the end. It
            assumes such inputs call each selected layer equally often (no value-dependent
            branching). None (default): on when ``layers`` selects only some
            of the model's BN layers (where it saves real time: 34 % with a ResNet-50's stem
            and first stage) and no ``forward_fn`` is given (it may call the model more than
            once or need outputs) and no layer is called more than once per forward; off
            for a whole-model pass, whose last BN layer
            usually comes just before the head (measured: no gain).
        cuda_graph: capture the forward as a CUDA graph (fixed input shapes; batches of
            another shape run eagerly). CUDA only; the forward must be capturable.
        tol_every: with ``tol``, check convergence every this many batches (one sync each).
    Returns:
        The :class:`PopulationStats` (also applied to the model unless ``apply=False``).
    Raises:
        TypeError: a model that is not an ``nn.Module``, data that is not iterable, a
            ``input_fn``/``forward_fn`` that is not callable, ``layers`` of another kind, a
            data item that is no model input.
        ValueError: bad arguments (a ``device`` that is none), empty data, a data item with
            nothing in it to feed (an empty tuple, a dict without an input key), data too
            short for ``num_samples``/``num_batches``, non-finite statistics (naming the
            layers).
        RuntimeError: a layer selected by ``layers`` never ran, or with ``layers=None`` no
            BN layer ran.
    """
    num_samples, num_batches, batch_size, tol_every = _check_args(
        model, data, num_samples, num_batches, batch_size, estimator, tol, tol_every, input_fn,
        forward_fn)
    root = layer_root(model)
    selected = select_layers(root, layers)
    group, distributed = _resolve_group(process_group)
    per_call = estimator == "batch_mean" or tol is not None
    if distributed:
        _check_ranks_agree(selected, estimator, per_call, group)
    if not selected:
        warnings.warn("recompute_bn_stats: the model has no BatchNorm layer with running "
                      "statistics (or none is selected); nothing to recompute", stacklevel=2)
        return PopulationStats({}, estimator=estimator, batch_size=batch_size)
    device = _resolve_device(device, selected)
    if cuda_graph and (device is None or device.type != "cuda"):
        raise ValueError(f"cuda_graph=True needs a CUDA device, got device={device}")
    accs = [LayerAccumulator(n, m.running_mean.numel(), m.running_mean.device, per_call)
            for n, m in selected]
    required = layers is not None  # else a layer that never runs is left as it is
    if stop_early is None:
        subset = layers is not None and len(selected) < len(select_layers(root, None))
        stop_early = subset and forward_fn is None
        auto_stop = True
    else:
        auto_stop = False
    if batch_size is not None and batch_size < SMALL_BATCH:
        _warn_small(batch_size, stacklevel=3)

    tracker = CallTracker(len(selected))
    state = PassState(model, selected)
    try:
        state.enter(set_modes=True)
        state.install(accs, tracker)
        max_samples = num_samples
        max_items = num_batches if batch_size is None else None
        if num_batches is not None and batch_size is not None:
            cap = num_batches * batch_size
            max_samples = cap if max_samples is None else min(max_samples, cap)
        feed = HostBatches(data, input_fn or default_input, max_samples, max_items,
                           singles_skipped=batch_size is None)
        source = regroup(on_device(iter(feed), device), batch_size)
        forward = Forward(root, forward_fn, tracker, device if cuda_graph else None)
        # not inference_mode: tensors a model caches must stay usable
        with torch.no_grad(), eager_stance():
            run = _run(source, forward, accs, tracker, state, tol, tol_every, progress,
                       max_samples, stop_early, auto_stop, batch_size, group, distributed,
                       required)
        samples, batches, converged = _check_run(run, feed, accs, num_samples, num_batches,
                                                 tol, group, distributed)
        if distributed:
            for acc in accs:
                acc.all_reduce(group)
        stats = _estimates(accs, estimator, required)
    finally:
        state.restore()
    result = PopulationStats(stats, estimator=estimator, num_samples=samples,
                             num_batches=batches, batch_size=batch_size, converged=converged)
    if apply:
        result.apply(model)
    return result


def _run(source, forward, accs, tracker, state, tol, tol_every, progress, total, stop_early,
         auto_stop, batch_size, group, distributed, required) -> dict:
    bar = _progress_bar(progress, total)
    samples = batches = skipped = 0
    converged = None
    try:
        for x, n in source:
            if n < 2:
                skipped += n
                continue
            forward(x)
            state.after_forward()
            samples += n
            batches += 1
            bar.update(n)
            if batches == 1:
                if batch_size is None and n < SMALL_BATCH:
                    _warn_small(n, stacklevel=4)
                tracker.learn()
                reused = any(c > 1 for c in tracker.counts)
                if stop_early and tracker.order and not (auto_stop and reused):
                    state.install_stop(tracker)
            if tol is not None and batches >= 2 and batches % tol_every == 0:
                done, converged = _converged(accs, tol, group, distributed, required,
                                             exhausted=False)
                if done:
                    break
        else:
            if tol is not None:
                # out of data: when distributed, keep answering the other ranks' checks
                done = False
                while not done:
                    done, converged = _converged(accs, tol, group, distributed, required,
                                                 exhausted=True)
    finally:
        bar.close()
    if skipped:
        warnings.warn(f"recompute_bn_stats: skipped {skipped} sample(s) in batches of one "
                      "sample (BN cannot normalize them reliably)", stacklevel=3)
    if tol is not None and not converged:
        warnings.warn(f"recompute_bn_stats: tol={tol} not reached after {batches} batches "
                      "(data or num_samples/num_batches ran out)", stacklevel=3)
    return {"samples": samples, "batches": batches, "converged": converged}


def _converged(accs, tol, group, distributed, required: bool,
               exhausted: bool) -> tuple[bool, bool]:
    """(stop, converged); one host sync (and one collective when distributed). A layer that
    has not run holds the pass up (it may run later) until the data is exhausted; then, unless
    ``required``, it is left out of ``converged`` (it is left out of the result too)."""
    idle_ok = exhausted and not required
    conv = torch.stack([(a.converged(tol) | (idle_ok and a.idle()))
                        .to(accs[0].total.device) for a in accs]).all()
    flags = torch.stack([conv | exhausted, conv]).double()
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    done, conv = flags.tolist()
    return bool(done), bool(conv)


def _check_run(run, feed, accs, num_samples, num_batches, tol, group, distributed):
    """Totals over ranks and the errors every rank must raise together (before any merge):
    without ``tol``, data that ran out before ``num_samples`` / ``num_batches`` (the first
    reached, when both are given) was reached."""
    local = torch.tensor(
        [run["samples"], run["batches"], tol is None and feed.short, feed.pulled],
        dtype=torch.float64, device=accs[0].total.device,
    )
    ranks = [local]
    if distributed:
        ranks = gather(local, group)
    rows = [r.tolist() for r in ranks]
    where = lambda r: f" on rank {r}" if distributed else ""  # noqa: E731
    for r, (_, b, short, pulled) in enumerate(rows):
        # (with batch_size, num_batches is a cap on samples: data that ends inside the last
        # batch has still run them all)
        if not short or (num_batches is not None and b >= num_batches):
            continue
        if num_batches is None:
            raise ValueError(f"num_samples={num_samples} but the data ended after "
                             f"{int(pulled)} samples{where(r)}")
        if num_samples is None:
            raise ValueError(f"num_batches={num_batches} but the data ended after "
                             f"{int(b)} batches{where(r)}")
        raise ValueError(f"num_samples={num_samples} and num_batches={num_batches}: the data "
                         f"ended after {int(pulled)} samples and {int(b)} batches{where(r)}, "
                         "before either was reached")
    for r, row in enumerate(rows):  # distributed: every rank must contribute
        if row[0] == 0:
            raise ValueError(f"data yielded no samples{where(r)} (empty data, or only batches "
                             "of one sample)")
    samples = int(sum(r[0] for r in rows))
    return samples, int(sum(r[1] for r in rows)), run["converged"]


def _estimates(accs, estimator, required: bool) -> dict:
    """name -> (mean, var, count), float64 on the CPU, computed and checked for all layers at
    once (names only when something is wrong). Layers that never ran raise if ``required``,
    else are left out with a warning (all of them: an error)."""
    names = [acc.name for acc in accs]
    sizes = [acc.total.num_channels for acc in accs]
    if estimator == "population":
        total = WelfordState.cat([acc.total for acc in accs], "cpu")
        mean, var, count = total.mean, total.var(unbiased=True), total.count
    else:
        parts = [acc.estimate(estimator) for acc in accs]
        mean, var, count = (torch.cat([p[k].to("cpu", torch.float64) for p in parts])
                            for k in range(3))
    ran = count > 0
    never = []
    if not bool(ran.all()):
        never = [n for n, r in zip(names, ran.split(sizes)) if not bool(r.all())]
        if required or len(never) == len(names):
            raise RuntimeError(f"BN layer(s) {never} never ran during the pass (not reached by "
                               "the forward?); select only layers the forward uses")
        warnings.warn(f"recompute_bn_stats: BN layer(s) {never} never ran during the pass "
                      "(e.g. auxiliary heads that run only in training); left unchanged",
                      stacklevel=3)
    finite = (torch.isfinite(mean) & torch.isfinite(var)) | ~ran
    if not bool(finite.all()):
        bad = [n for n, f in zip(names, finite.split(sizes)) if not bool(f.all())]
        raise ValueError(f"non-finite statistics (NaN/Inf) in BN layer(s) {bad}; the model is "
                         "unchanged")
    stats = zip(names, zip(mean.split(sizes), var.split(sizes), count.split(sizes)))
    return {n: s for n, s in stats if n not in never}


def _check_args(model, data, num_samples, num_batches, batch_size, estimator, tol, tol_every,
                input_fn, forward_fn) -> list[Optional[int]]:
    """Check every argument before anything runs; returns the four counts as Python ints
    (numpy integers and 0-d integer tensors are accepted)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(data, torch.Tensor):  # iterating it would give single samples
        raise TypeError("data must be an iterable of batches, got one tensor: pass [data] for "
                        "one batch, or a DataLoader / list of batches")
    if data is None or not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
        raise TypeError(f"data must be an iterable of batches, got {type(data).__name__}")
    counts = []
    for name, v, low in (("num_samples", num_samples, 1), ("num_batches", num_batches, 1),
                         ("batch_size", batch_size, 2), ("tol_every", tol_every, 1)):
        if v is not None:
            try:
                n = None if isinstance(v, bool) else operator.index(v)
            except TypeError:
                n = None
            if n is None or n < low:
                raise ValueError(f"{name} must be an integer >= {low} or None, got {v!r}")
            v = n
        counts.append(v)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if tol is not None and (isinstance(tol, bool) or not (isinstance(tol, (int, float))
                                                           and tol > 0)):
        raise ValueError(f"tol must be a positive number or None, got {tol!r}")
    for name, fn in (("input_fn", input_fn), ("forward_fn", forward_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    lazy = [n or "<model>" for n, m in model.named_modules()
            if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:  # the pass's first forward would materialize them: the model would change
        raise ValueError(f"model has uninitialized lazy module(s) {lazy}; run one forward "
                         "before recomputing BN statistics")
    return counts


def _resolve_device(device, selected) -> Optional[torch.device]:
    meta = [n for n, m in selected if m.running_mean.device.type == "meta"]
    if meta:
        raise ValueError(f"BN layer(s) {meta} are on the meta device (no data): move the model "
                         "to a real device first")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device={device!r} is not a device: {e}") from None
        if device.type == "meta":
            raise ValueError("device='meta' holds no data")
        try:  # one this process can use (a GPU that is there, a backend built in)
            torch.empty(0, device=device)
        except Exception as e:  # (RuntimeError, AssertionError "not compiled with CUDA", ...)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"device={str(device)!r} cannot be used here: {first}") from None
        return device
    devices = {m.running_mean.device for _, m in selected}
    return devices.pop() if len(devices) == 1 else None


def _resolve_group(process_group):
    import torch.distributed as dist

    if process_group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group given but torch.distributed is not initialized")
    elif not (dist.is_available() and dist.is_initialized()):
        return None, False
    world = dist.get_world_size(process_group)
    if world < 1:  # (torch.distributed only warns; the pass would run on this rank's data)
        raise ValueError("process_group: this process is not a member of it")
    return process_group, world > 1


def _check_ranks_agree(selected, estimator: str, per_call: bool, group) -> None:
    """Every rank must recompute the same layers (names, channel counts, order) the same way:
    the merges pair them up by position. One small all-gather before any data is read; every
    rank raises together (a mismatch found later would hang a rank or merge the wrong
    layers)."""
    import zlib

    import torch.distributed as dist

    text = "\n".join(f"{n}:{m.running_mean.numel()}" for n, m in selected)
    fingerprint = zlib.crc32(f"{text}\n{estimator}:{per_call}".encode())
    if selected:
        device = selected[0][1].running_mean.device
    elif dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    local = torch.tensor([len(selected), fingerprint], dtype=torch.int64, device=device)
    rows = [tuple(r.tolist()) for r in gather(local, group)]
    if len(set(rows)) > 1:
        raise ValueError("process_group: the ranks would recompute different BN layers (names, "
                         "channel counts) or use different estimators; (layers, fingerprint) "
                         f"per rank: {rows}. Every rank must pass the same model, layers= and "
                         "estimator= / tol=")


def _warn_small(n: int, stacklevel: int) -> None:
    """The small-batch warning, pointed at the caller of ``recompute_bn_stats`` (``stacklevel``
    counts from the function that calls this one)."""
    warnings.warn(f"recompute_bn_stats: normalization batch of {n} samples; below "
                  f"{SMALL_BATCH} the recomputed statistics are biased (Wu & Johnson, Table 2: "
                  "use batch_size >= 100)", stacklevel=stacklevel)


def _progress_bar(progress: bool, total: Optional[int]):
    if not progress:  # a disabled tqdm still costs ~0.1 ms to build, per call
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", unit_scale=True, desc="precise BN",
                dynamic_ncols=True)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
