"""CPU fast path of a population pass: one merge per forward for all layers at once.

On the GPU a layer merges each batch into its float64 state inside its statistics kernel. On
the CPU (the ``torch`` backend) that merge is a dozen tiny tensor operations per layer and
call, which costs more than the statistics themselves on small activations. Here each
selected layer's forward only normalizes (PyTorch's kernel on pivot-shifted data, see
``_torch_ops.normalize_shifted``) and leaves (pivot, shifted mean, invstd) in float32 slots of
flat staging vectors; after the forward, :meth:`FlatStats.flush` merges every layer's batch
into the flat float64 (count, mean, M2) with one vectorized Chan merge. The layers'
``WelfordState``\\ s are views of those flat vectors, so everything downstream is unchanged.
A layer called twice in one forward flushes before its second call: every call counts.

The shift by a sample of each channel (one more read and write of the input) is what keeps
the statistics exact when |mean| ≫ std. After the first batch (one host synchronization) a
float32 layer whose channels all have |mean|/std < ``UNSHIFTED_RATIO`` drops it: its mean is
then exact to one float32 rounding, below 3e-7 of its std, and its pooled variance is unchanged
to ~1e-7.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from .. import _torch_ops
from ..ops import _verify_batch_size
from ..stats import WelfordState

UNSHIFTED_RATIO = 5.0


class FlatStats:
    """Staging and float64 state for ``layers`` (all on one CPU device)."""

    def __init__(self, layers: list[nn.Module], states: list[WelfordState]):
        sizes = [m.num_features for m in layers]
        total, device = sum(sizes), states[0].device
        self.count, self.mean, self.m2 = torch.zeros(3, total, dtype=torch.float64,
                                                     device=device)
        self.pivot, self.mean_s = torch.zeros(2, total, device=device)
        self.invstd = torch.ones(total, device=device)  # finite even in slots never filled
        self.eps = torch.tensor([m.eps for m in layers], dtype=torch.float64,
                                device=device).repeat_interleave(torch.tensor(sizes))
        self.sizes = torch.tensor(sizes)
        self.slices, start = [], 0
        for c, state in zip(sizes, states):
            sl = slice(start, start + c)
            self.slices.append(sl)
            state.count, state.mean, state.m2 = self.count[sl], self.mean[sl], self.m2[sl]
            start += c
        self.n = [0] * len(layers)  # values per channel of each slot's pending batch (0: none)
        self.shift = [True] * len(layers)  # decided after the first flush
        self.decided = False

    def forward_for(self, layer: nn.Module, i: int):
        """A ``forward`` for ``layer`` (slot ``i``): batch statistics normalize, the batch is
        staged for the next flush. Same input checks and errors as the layer's own forward."""
        sl = self.slices[i]
        pivot, mean_s, invstd = self.pivot[sl], self.mean_s[sl], self.invstd[sl]

        def forward(module, x: Tensor) -> Tensor:
            module._check_input_dim(x)
            if x.shape[1] != module.num_features:
                raise RuntimeError(f"running_mean should contain {x.shape[1]} elements not "
                                   f"{module.num_features}")
            _verify_batch_size(x)
            if self.n[i]:
                self.flush()
            if self.shift[i] or x.dtype != torch.float32:
                y = _torch_ops.normalize_shifted(x, module.weight, module.bias, module.eps,
                                                 pivot, mean_s, invstd)
            else:
                pivot.zero_()
                y = _torch_ops.normalize_unshifted(x, module.weight, module.bias, module.eps,
                                                   mean_s, invstd)
            self.n[i] = x.numel() // x.shape[1]
            return y

        return types.MethodType(forward, layer)

    def flush(self) -> None:
        """Merge every staged batch into the float64 state (slots with nothing staged are
        merged with weight 0, a no-op)."""
        if not any(self.n):
            return
        n = torch.tensor(self.n, dtype=torch.float64).repeat_interleave(self.sizes)
        mean_b, var_b = _torch_ops.shifted_moments(self.pivot, self.mean_s, self.invstd, self.eps)
        _torch_ops.chan_merge_(self.count, self.mean, self.m2, n, mean_b, var_b.mul_(n))
        self.n = [0] * len(self.n)
        if not self.decided:
            self._decide_shift()

    def _decide_shift(self) -> None:
        """Keep the shift only for layers with a channel at |mean|/std >= UNSHIFTED_RATIO (or
        not yet seen, or non-finite): one host synchronization, once per pass."""
        self.decided = True
        ratio = self.mean.abs() / (self.m2 / self.count.clamp_min(1)).sqrt()
        ratio = torch.where(self.count > 0, ratio, torch.inf).nan_to_num(nan=torch.inf)
        worst = torch.stack([r.max() for r in ratio.split(self.sizes.tolist())]).tolist()
        self.shift = [not (w < UNSHIFTED_RATIO) for w in worst]
