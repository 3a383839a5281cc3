"""Which BN layers a pass touches, what each one accumulates, and how the model is put into
the pass's state and back.

Statistics are gathered without writing any buffer: selected layers run with
``track_running_stats=False`` (batch statistics, no EMA update, no ``num_batches_tracked``
increment) while FastPreciseBN layers merge each batch into ``layer.accumulator`` inside their
statistics kernel (exact stock layers borrow their forward for the pass; on the CPU fast path
both kinds get a :class:`FlatStats` forward instead; either way the pass's forward counts the
calls, with no module hook) and other BN layers run their own ``forward`` under a measuring
wrapper (below). Restoring the model is
resetting a few attributes and writing back a copy of the model's buffers (which the selected
layers leave alone, but other modules may write in ``forward``). Subclasses,
and layers whose ``forward`` was replaced on the instance (a wrapper), keep their own
``forward`` (only the other exact stock and FastPreciseBN layers get the pass's fast
forwards): a FastPreciseBN layer among them accumulates whatever ``FastPreciseBN.forward``
normalizes; any other layer (a stock subclass, ``nn.SyncBatchNorm``, a stock layer whose
``forward`` a wrapper replaced) on the input of the batch-norm call by batch statistics that
its ``forward`` makes with the layer's weight (``F.batch_norm`` or ``torch.batch_norm``, seen by
a ``TorchFunctionMode`` that is active only while that ``forward`` runs), or at its input
where it makes none.
"""

from __future__ import annotations

import contextlib
import threading
import types
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedBuffer
from torch.overrides import TorchFunctionMode

from .._torch_ops import chan_merge_
from ..modules import FastPreciseBN1d, FastPreciseBN2d, FastPreciseBN3d
from ..stats import WelfordState
from ._batched import FlatStats, raise_named

FAST_TYPES = (FastPreciseBN1d, FastPreciseBN2d, FastPreciseBN3d)
# stock layers that borrow FastPreciseBN's forward for the pass: one statistics pass then serves
# both their normalization and the accumulator (a hook would read every activation twice)
BORROW_TYPES = {nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d}
EXACT_TYPES = BORROW_TYPES | set(FAST_TYPES)
LayerSelection = Union[None, str, Sequence[Union[str, nn.Module]], nn.Module,
                       Callable[[str, nn.Module], bool]]
_MISSING = object()


class StopForward(BaseException):
    """Raised from a hook once every selected layer has run, to skip the rest of the forward.
    A BaseException so that a model's own ``except Exception`` cannot swallow it."""


def has_running_stats(m: nn.Module) -> bool:
    return (
        isinstance(m, _BatchNorm)
        and m.track_running_stats
        and isinstance(m.running_mean, Tensor)
        and isinstance(m.running_var, Tensor)
        and not isinstance(m.running_mean, UninitializedBuffer)
    )


def layer_root(model: nn.Module) -> nn.Module:
    """The module whose names key the statistics and that runs the pass: a
    ``torch.compile``d model's original one, an ``nn.DataParallel``'s module (so its
    statistics apply to either; the pass runs on that module's device: replicas made per
    call would run copies of the layers, which the pass neither follows nor may merge into
    from several threads at once)."""
    while True:
        if isinstance(model, nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def eager_stance():
    """A context in which compiled code runs eagerly (the compiler's "force_eager" stance,
    torch >= 2.6): the pass switches modes and layer forwards, so a model compiled in place
    (``model.compile()``), a compiled submodule or a wrapped compiled model would otherwise
    compile graphs for the pass alone."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return contextlib.nullcontext() if set_stance is None else set_stance("force_eager")


def select_layers(model: nn.Module, layers: LayerSelection) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the BN layers with running statistics that ``layers`` selects (all of
    them when None; modules, names as in ``named_modules()``, or a predicate), in
    ``model.named_modules()`` order."""
    # (a zero-channel layer has nothing to recompute)
    eligible = [(n, m) for n, m in model.named_modules()
                if has_running_stats(m) and m.running_mean.numel() > 0]
    if layers is None:
        return eligible
    if callable(layers) and not isinstance(layers, nn.Module):
        return [(n, m) for n, m in eligible if layers(n, m)]
    if isinstance(layers, (nn.Module, str)):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise TypeError("layers must be a BN module, a name, a list of them or "
                        f"fn(name, module) -> bool, got {type(layers).__name__}") from None
    resolved = []
    for i, m in enumerate(layers):
        if isinstance(m, str):
            try:  # also a second name of a shared layer, which named_modules() lists once
                m = model.get_submodule(m)
            except AttributeError:
                raise ValueError(f"layers[{i}]: model has no layer named {m!r}") from None
        resolved.append(m)
    layers = resolved
    names = {id(m): n for n, m in model.named_modules()}
    for i, m in enumerate(layers):
        if id(m) not in names:
            raise ValueError(f"layers[{i}] ({type(m).__name__}) is not a submodule of model")
        if not has_running_stats(m):
            raise ValueError(
                f"layers[{i}] ({names[id(m)]!r}, {type(m).__name__}) is not a BatchNorm layer "
                "with running statistics"
            )
        if m.running_mean.numel() == 0:
            raise ValueError(f"layers[{i}] ({names[id(m)]!r}) has no channels")
    wanted = {id(m) for m in layers}
    return [(n, m) for n, m in eligible if id(m) in wanted]


class LayerAccumulator:
    """Everything one layer accumulates during a pass, on the layer's device.

    ``total``: (count, mean, M2) of every value the layer saw. With ``per_call``, each call is
    first gathered in ``call`` and then folded into ``total``, into ``calls`` (a Welford state
    over the per-call means: equal weight per call) and into ``var_sum`` (sum of the per-call
    unbiased variances) -- what the "batch_mean" estimator and the ``tol`` test need (on the
    CPU fast path, :class:`FlatStats` merges a call into all three directly).
    """

    def __init__(self, name: str, channels: int, device: torch.device, per_call: bool):
        self.name = name
        self.total = WelfordState(channels, device)
        self.per_call = per_call
        if per_call:
            self.call = WelfordState(channels, device)
            self.calls = WelfordState(channels, device)
            self.var_sum = torch.zeros(channels, dtype=torch.float64, device=device)

    @property
    def target(self) -> WelfordState:
        """The state a batch is merged into."""
        return self.call if self.per_call else self.total

    def fold(self) -> None:
        if not self.per_call:
            return
        c = self.call
        self.total.merge(c)
        # a call with no values (a head with no proposals) counts for nothing: weight 0, no
        # variance (no host sync to ask)
        seen = c.count > 0
        chan_merge_(self.calls.count, self.calls.mean, self.calls.m2, seen.double(),
                    c.mean, torch.zeros_like(c.m2))
        self.var_sum.add_(torch.where(seen, c.m2 / (c.count - 1), 0.0))
        c.reset()

    def converged(self, tol: float) -> Tensor:
        """Device bool: the standard error of the mean, from the spread of per-call means, is
        at most ``tol`` times the population std in every channel."""
        se2 = self.calls.var(unbiased=True) / self.calls.count
        return (se2 <= tol * tol * self.total.var(unbiased=True)).all()

    def idle(self) -> Tensor:
        """Device bool: the layer has seen no value yet."""
        return (self.total.count == 0).all()

    def all_reduce(self, group) -> None:
        self.total.all_reduce(group)
        if self.per_call:
            self.calls.all_reduce(group)
            self.var_sum.copy_(_gather_sum(self.var_sum, group))

    def estimate(self, estimator: str, unbiased: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, var, count) per channel, float64 on the layer's device."""
        if estimator == "batch_mean":
            return self.calls.mean, self.var_sum / self.calls.count, self.total.count
        return self.total.mean, self.total.var(unbiased=unbiased), self.total.count


def gather(t: Tensor, group) -> list[Tensor]:
    """``t`` from every rank of ``group``, in rank order."""
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _gather_sum(t: Tensor, group) -> Tensor:
    """Sum over ranks in rank order: bitwise the same on every rank (an all_reduce need not
    be)."""
    parts = gather(t, group)
    out = parts[0].clone()
    for p in parts[1:]:
        out.add_(p)
    return out


class CallTracker:
    """Host-side count of each layer's calls in the current forward; learns the call pattern
    of the first forward and then says when every layer has made all its calls."""

    def __init__(self, n: int):
        self.counts = [0] * n
        self.expected: Optional[list[int]] = None
        self.order: list[int] = []
        self.done = 0
        self.stoppable = True

    def begin_forward(self, stoppable: bool = True) -> None:
        """``stoppable``: this forward's input has the first one's structure and shapes, so
        it may be ended once the learned pattern is complete (see :meth:`all_done`)."""
        self.counts = [0] * len(self.counts)
        self.done = 0
        self.stoppable = stoppable

    def called(self, i: int) -> None:
        self.counts[i] += 1
        if self.expected is None:
            self.order.append(i)
        elif self.counts[i] == self.expected[i]:
            self.done += 1

    def learn(self) -> None:
        """Freeze the first forward's pattern (call after it)."""
        self.expected = list(self.counts)

    @property
    def all_done(self) -> bool:
        """Every layer has made the first forward's number of calls, in a forward whose input
        is shaped like the first one's: a forward of another shape (another number of crops,
        a remainder batch) may call a layer more often, so it always runs to the end."""
        return self.stoppable and self.done == len(self.counts)


class PassState:
    """Puts a model into the state of a statistics pass and back, exactly.

    Records every module's ``training`` flag, the selected layers' ``track_running_stats`` and
    FastPreciseBN ``accumulator`` attributes; :meth:`restore` sets them back (assigning the
    flags directly, so overridden ``train()`` methods are not triggered) and removes every
    hook this object registered, and puts back a copy of every buffer of the model: the
    selected layers do not write theirs, but a BN subclass may ignore ``track_running_stats``,
    and another module may write its own in ``forward`` whatever its mode (a call counter, an
    input average; one it replaces gets its original object back). Meta buffers and
    inference tensors, which no pass can write, are left out.
    """

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Module]]):
        self.model = model
        self.layers = layers
        self.flags = [(m, m.training) for m in model.modules()]
        self.tracking = [(m, m.track_running_stats) for _, m in layers]
        self.accumulators = [
            (m, m.__dict__.get("accumulator", _MISSING)) for _, m in layers
            if isinstance(m, FAST_TYPES) or type(m) in BORROW_TYPES
        ]
        # layers whose forward is replaced for the pass: the exact classes (FastPreciseBN's
        # forward, which stock ones borrow, counting the calls; on the CPU fast path a
        # FlatStats forward) and every other stock layer (its own forward, measured)
        self.forwards = [
            (m, m.__dict__.get("forward", _MISSING)) for _, m in layers
            if type(m) in EXACT_TYPES or not isinstance(m, FAST_TYPES)
        ]
        # layers whose forward was replaced on the instance (a wrapper may change the input,
        # or move it): their forward runs as it is
        self.wrapped = {id(m) for m, f in self.forwards if f is not _MISSING}
        self.flat: Optional[FlatStats] = None
        self.buffers = [(m, name, b, _backup(b)) for m in model.modules()
                        for name, b in m._buffers.items() if _restorable(b)]
        self.buffer_names = [(m, set(m._buffers)) for m in model.modules()]
        self.handles: list = []

    def enter(self, set_modes: bool) -> None:
        """Stop buffer updates; with ``set_modes`` every module goes to eval and the selected
        layers to train."""
        # plain attributes, set without nn.Module.__setattr__ (it costs microseconds a module)
        if set_modes:
            for m, _ in self.flags:
                object.__setattr__(m, "training", False)
            for _, m in self.layers:
                object.__setattr__(m, "training", True)
        for _, m in self.layers:
            object.__setattr__(m, "track_running_stats", False)

    def install(self, accs: list[LayerAccumulator], tracker: CallTracker) -> None:
        """Route every selected layer's batches into its accumulator."""
        flat = [i for i, ((_, m), acc) in enumerate(zip(self.layers, accs))
                if id(m) not in self.wrapped and _flat_eligible(m)
                ] if _cpu_backend_is_torch() else []
        if flat:
            self.flat = FlatStats([self.layers[i][1] for i in flat], [accs[i] for i in flat],
                                  tracker)
            for slot, i in enumerate(flat):
                m = self.layers[i][1]
                m.forward = self.flat.forward_for(m, slot, i, self.layers[i][0])
        served = set(flat)
        for i, ((name, m), acc) in enumerate(zip(self.layers, accs)):
            if i in served:  # the FlatStats forward counts the call: no hook
                continue
            exact = type(m) in EXACT_TYPES and id(m) not in self.wrapped
            fast = isinstance(m, FAST_TYPES) or exact
            if fast:
                m.accumulator = acc.target
            if exact:  # stock layers borrow FastPreciseBN's forward; it counts the call too
                m.forward = _counting_forward(m, i, name, acc, tracker)
            elif not fast:  # other stock layers: their own forward, measured
                m.forward = _measuring_forward(m, i, name, acc, tracker)
            else:  # FastPreciseBN subclasses and wrapped layers: their accumulator, and the
                # call counted once it returns (a child layer it calls first comes first)
                self.handles.append(m.register_forward_hook(_counting_hook(i, acc, tracker)))

    def after_forward(self) -> None:
        """Merge what the CPU fast path staged during the forward that just ended."""
        if self.flat is not None:
            self.flat.flush()

    def install_stop(self, tracker: CallTracker) -> None:
        """Raise :class:`StopForward` after the last call of the first forward's pattern, once
        every layer has made all its calls (a different pattern just runs to the end)."""
        last = self.layers[tracker.order[-1]][1]

        def stop(*_):
            if tracker.all_done:
                raise StopForward

        self.handles.append(last.register_forward_hook(stop))

    def restore(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.flat = None
        for m, forward in self.forwards:
            if forward is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward
        for m, flag in self.flags:
            object.__setattr__(m, "training", flag)
        for m, flag in self.tracking:
            object.__setattr__(m, "track_running_stats", flag)
        for m, acc in self.accumulators:
            if acc is _MISSING:
                m.__dict__.pop("accumulator", None)
            else:
                m.accumulator = acc
        for m, names in self.buffer_names:  # buffers a forward registered during the pass
            for name in [n for n in m._buffers if n not in names]:
                del m._buffers[name]
                m._non_persistent_buffers_set.discard(name)
        with torch.no_grad():
            for m, name, b, saved in self.buffers:
                if m._buffers.get(name) is not b:  # replaced, not written: the original back
                    m._buffers[name] = b
                b.copy_(saved)


# buffers above this size are backed up in host memory: a model's large non-BN buffer (a
# lookup table, an attention mask) must not cost a second copy on the accelerator
_BACKUP_ON_DEVICE_MAX_BYTES = 1 << 20


def _restorable(b: Optional[Tensor]) -> bool:
    """A buffer the pass can back up and write back: not an uninitialized (lazy) or meta
    one, nor an inference tensor (which no code outside inference mode can write)."""
    return (b is not None and not isinstance(b, UninitializedBuffer) and not b.is_meta
            and not b.is_inference())


def _backup(b: Tensor) -> Tensor:
    if b.numel() * b.element_size() > _BACKUP_ON_DEVICE_MAX_BYTES and b.device.type != "cpu":
        return b.detach().to("cpu", copy=True)
    return b.detach().clone()


def _flat_eligible(m: nn.Module) -> bool:
    """The CPU fast path serves float32 CPU layers (when the torch backend serves the CPU:
    not when another backend is forced)."""
    if type(m) not in EXACT_TYPES:  # subclasses keep their own forward
        return False
    return m.running_mean.device.type == "cpu" and m.running_mean.dtype == torch.float32


def _cpu_backend_is_torch() -> bool:
    from .._backend import BackendUnavailable, get_backend

    try:
        return get_backend(torch.empty(1, 1)).name == "torch"
    except BackendUnavailable:
        return False


def _counting_forward(layer: nn.Module, i: int, name: str, acc: LayerAccumulator,
                      tracker: CallTracker):
    """The pass's ``forward`` for an exact stock or FastPreciseBN layer off the CPU fast path
    (GPU layers, and CPU layers that path does not serve): ``FastPreciseBN.forward``, which
    merges the batch into ``layer.accumulator`` inside its statistics kernel, plus what module
    hooks did here before -- count the call (layer ``i`` of ``tracker``) and, for the per-call
    estimators, fold the call's statistics after it. Without hooks PyTorch calls the layer on
    its hook-free fast path: ~5 us less host time per call, ~10 with a per-call estimator
    (measured on CPU, 1 thread, a stack of 200 BN layers)."""
    normalize = FastPreciseBN2d.forward  # (the mixin's: every FastPreciseBN1d/2d/3d's)
    fold = acc.fold if acc.per_call else None

    def forward(module, input: Tensor) -> Tensor:  # the name stock forward takes
        tracker.called(i)
        try:
            y = normalize(module, input)
        except (ValueError, RuntimeError, TypeError) as e:
            raise_named(e, name)
        if fold is not None:
            fold()
        return y

    return types.MethodType(forward, layer)


def _counting_hook(i: int, acc: LayerAccumulator, tracker: CallTracker):
    """A forward hook that counts the call (layer ``i``) and, for the per-call estimators,
    folds its statistics."""
    fold = acc.fold if acc.per_call else None

    def hook(module, args, output) -> None:
        tracker.called(i)
        if fold is not None:
            fold()

    return hook


def _feeder(name: str, acc: LayerAccumulator) -> Callable[[Tensor], None]:
    """Merges one call's batch into ``acc`` (errors name the layer)."""
    def feed(x: Tensor) -> None:
        if isinstance(x, Tensor) and x.numel() == 0:  # an empty batch: no values to add
            return
        try:
            acc.target.update(x, check=False)  # no host sync: finiteness is checked at the end
        except (TypeError, ValueError) as e:
            raise type(e)(f"BN layer {name!r}: {e}") from e
        acc.fold()

    return feed


def _measuring_forward(layer: nn.Module, i: int, name: str, acc: LayerAccumulator,
                       tracker: CallTracker):
    """The pass's ``forward`` for a stock layer off the fast paths (a subclass with its own
    ``forward``, ``nn.SyncBatchNorm``, a layer whose ``forward`` a wrapper replaced): that
    ``forward``, run under :class:`_BatchNormCalls`, so that each batch is measured where it
    is normalized, however the forward gets there (``super().forward`` after a transpose or a
    scaling, the stock class's forward by name, ``F.batch_norm``); a call that makes no such
    batch-norm call (a synchronizing ``nn.SyncBatchNorm``) is measured at its input. The call
    is counted once it returns, so that a child layer it calls first comes first in the
    tracker's order (and a stop after the last layer does not cut this one short)."""
    run = layer.forward  # the instance's wrapper, or the class's forward (bound)
    feed = _feeder(name, acc)

    def forward(*args, **kwargs):
        calls = _BatchNormCalls(layer.weight, feed)
        try:
            with calls:
                y = run(*args, **kwargs)
        except (ValueError, RuntimeError, TypeError) as e:
            raise_named(e, name)
        if not calls.fed:
            feed(calls.held if calls.held is not None else
                 args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None)))
        tracker.called(i)
        return y

    return forward


# the batch-norm functions a stock forward calls, and where their weight and training arguments are
_SLOTS = {F.batch_norm: (3, 5), torch.batch_norm: (1, 5)}


class _BatchNormCalls(TorchFunctionMode):
    """Active while one measured layer's ``forward`` runs: feeds the input of each batch-norm
    call by batch statistics (``training=True``) made with that layer's weight; for a layer
    without one, each such call made with no weight while no measured layer nested in this one
    runs (an unselected child, in eval mode, normalizes by its running statistics). The input
    of the first call with the layer's weight by running statistics is ``held``: a forward that
    makes no call by batch statistics is measured there. Every other call passes through
    untouched (to an enclosing layer's mode, when layers nest)."""

    _active = threading.local()  # the measured layers' modes now active in this thread

    def __init__(self, weight: Optional[Tensor], feed: Callable[[Tensor], None]):
        super().__init__()
        self.weight, self.feed, self.fed, self.held = weight, feed, False, None

    def __enter__(self):
        self._active.__dict__.setdefault("stack", []).append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        self._active.stack.pop()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        slots = _SLOTS.get(func)
        if slots is not None:
            w, t = slots
            weight = args[w] if len(args) > w else kwargs.get("weight")
            training = args[t] if len(args) > t else kwargs.get("training", False)
            if weight is self.weight and (weight is not None or self._active.stack[-1] is self):
                x = args[0] if args else kwargs["input"]
                if training:
                    self.fed = True
                    self.feed(x)
                elif weight is not None and self.held is None:
                    self.held = x
        return func(*args, **kwargs)
