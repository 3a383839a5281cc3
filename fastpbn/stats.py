"""``WelfordState``: exact per-channel statistics accumulated over many batches.

Per channel, ``count``, ``mean`` and ``m2`` (sum of squared deviations from the mean) in float64
on the data's device. Batches and states are merged with Chan's delta formula, never with sums of
squares, so shifted data (|mean|/std = 1e4) keeps full precision. ``all_reduce`` merges every
rank's state in rank order: every rank ends bitwise identical.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor

from ._backend import get_backend
from ._torch_ops import chan_merge_

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class WelfordState:
    """Running per-channel (count, mean, M2) in float64.

    Args:
        num_channels: channels (dim 1 of the tensors passed to :meth:`update`).
        device: where the state lives; batches must be on the same device.
    """

    def __init__(self, num_channels: int, device: Optional[torch.device | str] = None):
        try:  # an integer (numpy's too), not a float, string or bool
            if isinstance(num_channels, bool):
                raise TypeError
            channels = operator.index(num_channels)
        except TypeError:
            raise TypeError("num_channels must be an integer, got "
                            f"{type(num_channels).__name__} {num_channels!r}") from None
        if channels <= 0:
            raise ValueError(f"num_channels must be positive, got {num_channels}")
        z = torch.zeros(3, channels, dtype=torch.float64, device=device)
        self.count, self.mean, self.m2 = z.unbind(0)

    @property
    def num_channels(self) -> int:
        return self.count.numel()

    @property
    def device(self) -> torch.device:
        return self.count.device

    def __repr__(self) -> str:
        return f"WelfordState(num_channels={self.num_channels}, device={self.device})"

    def var(self, unbiased: bool = True) -> Tensor:
        """Per-channel variance: M2/(n-1) if unbiased else M2/n (NaN where undefined)."""
        denom = self.count - 1 if unbiased else self.count
        return self.m2 / denom.where(denom > 0, torch.nan)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"x must have shape (N, {self.num_channels}, *), got {tuple(x.shape)}"
            )
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but this WelfordState is on {self.device}")
        if x.numel() == 0:
            raise ValueError(f"x has no values per channel (shape {tuple(x.shape)})")

    def update(self, x: Tensor, check: bool = True) -> "WelfordState":
        """Merge the batch ``x`` (N, C, *) (any strides) into the state.

        Args:
            check: verify the result is finite (one host synchronization); on failure the state
                is restored and ``ValueError`` raised. Pass False in hot loops and check once
                at the end with :meth:`is_finite`.
        Returns:
            self
        """
        self._check_input(x)
        x = x.detach()  # statistics have no gradient (an activation may require one)
        saved = self._snapshot() if check else None
        get_backend(x).welford_update(x, self.count, self.mean, self.m2)
        if saved is not None and not self.is_finite():
            self._restore(saved)
            if not self.is_finite():  # x is not to blame
                raise ValueError("this WelfordState was not finite before x (a batch merged "
                                 "with check=False?); reset() it. x was not merged")
            raise ValueError("x contains non-finite values (NaN or Inf), or values whose "
                             "squares overflow float32; state left unchanged")
        return self

    def merge(self, other: "WelfordState") -> "WelfordState":
        """Merge another state into this one (exact, order-independent up to rounding)."""
        if not isinstance(other, WelfordState) or other.num_channels != self.num_channels:
            raise ValueError("other must be a WelfordState with the same number of channels")
        chan_merge_(
            self.count, self.mean, self.m2,
            other.count.to(self.device), other.mean.to(self.device), other.m2.to(self.device),
        )
        return self

    def all_reduce(self, group=None) -> "WelfordState":
        """Merge the states of every rank of ``group`` (all-gather, then Chan merge in rank
        order), so that every rank holds the same, bitwise identical, result.

        Raises:
            ValueError: on a process outside ``group``; on every rank, when the ranks'
                states have different channel counts (left unchanged), checked with one small
                collective first: a mismatched all-gather would abort the process (gloo) or
                hang (NCCL) instead.
        """
        import torch.distributed as dist

        world = dist.get_world_size(group)
        if world < 1:  # (torch.distributed only warns, and the merge would wipe the state)
            raise ValueError("WelfordState.all_reduce: this process is not a member of group")
        local = torch.stack([self.count, self.mean, self.m2])
        sizes = [torch.empty(1, dtype=torch.int64, device=local.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([self.mean.numel()], device=local.device),
                        group=group)
        sizes = [int(s) for s in sizes]
        if len(set(sizes)) > 1:
            raise ValueError(f"WelfordState.all_reduce: the ranks' states have different "
                             f"channel counts (per rank: {sizes})")
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        self.count.zero_(), self.mean.zero_(), self.m2.zero_()
        for g in gathered:
            chan_merge_(self.count, self.mean, self.m2, g[0], g[1], g[2])
        return self

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.mean).all() and torch.isfinite(self.m2).all())

    def reset(self) -> "WelfordState":
        for t in (self.count, self.mean, self.m2):
            t.zero_()
        return self

    @classmethod
    def cat(cls, states: "list[WelfordState]",
            device: Optional[torch.device | str] = None) -> "WelfordState":
        """The channels of ``states`` side by side, in order, as one new state (on ``device``,
        default the first state's): lets per-layer results be computed in one go."""
        states = list(states)
        if not states:
            raise ValueError("WelfordState.cat needs at least one state")
        device = states[0].device if device is None else device
        new = cls.__new__(cls)
        new.count, new.mean, new.m2 = (torch.cat([getattr(s, f).to(device) for s in states])
                                       for f in ("count", "mean", "m2"))
        return new

    def clone(self) -> "WelfordState":
        new = WelfordState.__new__(WelfordState)
        new.count, new.mean, new.m2 = self.count.clone(), self.mean.clone(), self.m2.clone()
        return new

    def _snapshot(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.count.clone(), self.mean.clone(), self.m2.clone()

    def _restore(self, saved: tuple[Tensor, Tensor, Tensor]) -> None:
        for dst, src in zip((self.count, self.mean, self.m2), saved):
            dst.copy_(src)
