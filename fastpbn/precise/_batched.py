"""CPU fast path of a statistics pass: one merge per forward for all layers at once.

On the GPU a layer merges each batch into its float64 state inside its statistics kernel. On
the CPU (the ``torch`` backend) that merge is a dozen tiny tensor operations per layer and
call, which costs more than the statistics themselves on small activations. Here each
selected layer's forward only normalizes (``_torch_ops.batch_norm_train``: exact at any
|mean|/std) and leaves (pivot, mean about the pivot, biased variance) in slots of flat staging
vectors; after the forward, :meth:`FlatStats.flush` merges every layer's batch into the flat
float64 (count, mean, M2) with one vectorized Chan merge (and, for the per-call estimators,
the per-call means and variances likewise). The layers' ``WelfordState``\\ s are views of
those flat vectors, so everything downstream is unchanged. A layer called twice in
one forward flushes before its second call: every call counts.

A layer's calls run ``batch_norm_train`` with ``shift=False`` (large activations: no
correction pass and no centred copy; small ones: PyTorch's kernel on x itself) while every
channel shows |mean|/std < 5 -- a float32 mean is then exact to ~1e-6 of the std
(``_torch_ops.mean_dwarfs_std``). That is checked on the layer's first call and, where
per-call means are kept (estimator "batch_mean", ``tol``), on every call: a later batch far
from 0 carries a float32-rounded mean (5e-4 of its std at |mean|/std = 1e4), which the
pooled statistics hide under the spread between the batches but a per-call mean does not.
The first call that fails the check is redone shifted, and the layer stays shifted for the
rest of the pass.

The layers' call counting (``CallTracker``) happens inside these forwards: no module hook, so
PyTorch calls them on its hook-free fast path.
"""

from __future__ import annotations

import types
from typing import NoReturn, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._torch_ops import batch_norm_train, chan_merge_, mean_dwarfs_std, moments64
from ..ops import _needs_autograd, _verify_batch_size
from ..stats import WelfordState


class FlatStats:
    """Staging and float64 state for ``layers`` (all on one CPU device) and their
    accumulators ``accs``; ``tracker.called(i)`` is told of each call of layer ``i`` (its
    index in the pass). A flush holds at most one call of each layer, so the per-call
    statistics of the "batch_mean" estimator and of ``tol`` are merged there too."""

    def __init__(self, layers: list[nn.Module], accs: list, tracker):
        sizes = [m.num_features for m in layers]
        total, device = sum(sizes), accs[0].total.device
        self.total = torch.zeros(3, total, dtype=torch.float64, device=device)
        _bind([acc.total for acc in accs], self.total, sizes)
        self.per_call = accs[0].per_call
        if self.per_call:  # Welford over per-call means, sum of per-call unbiased variances
            self.calls = torch.zeros(3, total, dtype=torch.float64, device=device)
            _bind([acc.calls for acc in accs], self.calls, sizes)
            self.var_sum = torch.zeros(total, dtype=torch.float64, device=device)
            for acc, var_sum in zip(accs, self.var_sum.split(sizes)):
                acc.var_sum = var_sum
        # float32 staging; var 0 (not garbage) in slots never filled
        self.pivot, self.mean_s, self.var = torch.zeros(3, total, device=device)
        self.sizes = torch.tensor(sizes)
        self.staging = list(zip(*(t.split(sizes) for t in (self.pivot, self.mean_s, self.var))))
        self.n = [0] * len(layers)  # values per channel of each slot's pending batch (0: none)
        # whether a slot's input needs the pivot shift (None: not yet called)
        self.shift: list[Optional[bool]] = [None] * len(layers)
        self.tracker = tracker

    def forward_for(self, layer: nn.Module, slot: int, track: int, name: str = ""):
        """A ``forward`` for ``layer`` (slot ``slot``; layer ``track`` of the call tracker;
        ``name`` for errors): batch statistics normalize, the batch is staged for the next
        flush. Same input checks and errors as the layer's own forward."""
        pivot, mean_s, var = self.staging[slot]
        tracker = self.tracker

        def forward(module, input: Tensor) -> Tensor:  # the name stock forward takes
            x = input
            tracker.called(track)
            try:
                module._check_input_dim(x)
                if x.shape[1] != module.num_features:
                    raise RuntimeError(f"running_mean should contain {x.shape[1]} elements "
                                       f"not {module.num_features}")
                _verify_batch_size(x)
            except (ValueError, RuntimeError) as e:
                raise_named(e, name)
            if not x.is_floating_point():  # as the layer's own forward
                raise TypeError(f"BN layer {name!r} ({type(module).__name__}): input must be a "
                                f"floating-point tensor, got {x.dtype}")
            if x.numel() == 0:  # an empty batch (a head with no proposals): no values to add
                return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0,
                                    module.eps)
            if self.n[slot]:
                self.flush()
            if x.dtype == torch.float64:  # as PyTorch's own CPU kernel
                raise RuntimeError(f"BN layer {name!r} ({type(module).__name__}): float64 input "
                                   "to a float32 layer (convert the model with .double())")
            weight, bias = module.weight, module.bias
            # a forward that differentiates (an energy model's -dE/dx under enable_grad): the
            # statistics come from the detached tensors (batch_norm_train writes into
            # out= buffers, which autograd refuses), the output from PyTorch's kernel
            grad = _needs_autograd(x, weight, bias)
            with torch.no_grad():
                shift = self.shift[slot]
                y = batch_norm_train(x, weight, bias, module.eps, pivot, mean_s, var,
                                     shift=bool(shift))
                # an unshifted result is kept where it is exact (see the module's docstring)
                if not shift and (shift is None or self.per_call):
                    shift = self.shift[slot] = mean_dwarfs_std(pivot, mean_s, var)
                    if shift:
                        y = batch_norm_train(x, weight, bias, module.eps, pivot, mean_s, var)
            self.n[slot] = x.numel() // x.shape[1]
            if grad:
                return F.batch_norm(x, None, None, weight, bias, True, 0.0, module.eps)
            return y

        return types.MethodType(forward, layer)

    def flush(self) -> None:
        """Merge every staged batch into the float64 state (slots with nothing staged are
        merged with weight 0, a no-op)."""
        if not any(self.n):
            return
        n = torch.tensor(self.n, dtype=torch.float64).repeat_interleave(self.sizes)
        mean_b, var_b = moments64(self.pivot, self.mean_s, self.var)
        if self.per_call:  # equal weight per call (slots with nothing staged: weight 0)
            chan_merge_(*self.calls, (n > 0).double(), mean_b, torch.zeros_like(mean_b))
            self.var_sum.add_(var_b * n / (n - 1).clamp_min(1.0))
        chan_merge_(*self.total, n, mean_b, var_b.mul_(n))
        self.n = [0] * len(self.n)


def _bind(states: list[WelfordState], flat: Tensor, sizes: list[int]) -> None:
    """Make each state's (count, mean, m2) views of its slot in the flat (3, total) rows."""
    for state, count, mean, m2 in zip(states, *(row.split(sizes) for row in flat)):
        state.count, state.mean, state.m2 = count, mean, m2


def raise_named(e: Exception, name: str) -> NoReturn:
    """Raise ``e`` (being handled) as the same built-in exception with the layer's name in
    front, so that a pass's errors say which BN layer raised; other exception types, and
    errors that name a layer already, as they are."""
    if type(e) not in (ValueError, RuntimeError, TypeError) or str(e).startswith("BN layer"):
        raise e
    raise type(e)(f"BN layer {name!r}: {e}") from e
