"""The data side of a recompute pass: item -> model input, device moves that overlap compute,
and regrouping loader batches into normalization batches of a chosen size.

Model inputs are a tensor or a nested tuple/list/dict of tensors whose dim 0 is the batch (the
same size in all of them); other leaves (strings, ints, 0-d tensors) ride along unchanged and
are taken from the first loader batch when batches are concatenated. A list of per-sample
tensors is not a batch; one whose tensors share a shape cannot be told from one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor

INPUT_KEYS = ("input", "inputs", "image", "images", "img", "x")


def default_input(item: Any) -> Any:
    """The model input inside a data item: a tensor as is, the first element of a tuple/list,
    or the first of :data:`INPUT_KEYS` present in a dict."""
    if isinstance(item, Tensor):
        return item
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError("data yielded an empty tuple/list; pass input_fn= to build the input")
        return item[0]
    if isinstance(item, Mapping):
        for key in INPUT_KEYS:
            if key in item:
                return item[key]
        raise ValueError(
            f"data yielded a dict with keys {sorted(map(str, item))}, none of {INPUT_KEYS}; "
            "pass input_fn= to pick the model input"
        )
    raise TypeError(
        f"data yielded a {type(item).__name__}; pass input_fn= to map it to the model input"
    )


def map_tensors(fn: Callable[[Tensor], Tensor], x: Any) -> Any:
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return _rebuild(x, [map_tensors(fn, v) for v in x])
    if isinstance(x, Mapping):
        return {k: map_tensors(fn, v) for k, v in x.items()}
    return x


def _rebuild(like: tuple | list, values: list) -> Any:
    if hasattr(like, "_fields"):  # a namedtuple (PackedSequence too) takes its fields apart
        return type(like)(*values)
    return type(like)(values)


def slice_batch(x: Any, start: int, stop: int) -> Any:
    """Samples [start, stop) of a model input (leaves without a batch dim as they are)."""
    return map_tensors(lambda t: t[start:stop] if t.dim() else t, x)


def tensors(x: Any) -> list[Tensor]:
    out: list[Tensor] = []
    map_tensors(lambda t: out.append(t) or t, x)
    return out


def batch_len(x: Any) -> int:
    """Samples in a model input: dim 0 of its tensors, which must agree."""
    sizes = [t.shape[0] for t in tensors(x) if t.dim()]
    if not sizes:
        raise TypeError(
            f"the model input must be a tensor (or a structure of tensors) with a batch dim, "
            f"got {type(x).__name__}; pass input_fn= to build it"
        )
    if any(n != sizes[0] for n in sizes):
        raise ValueError(
            f"the tensors of a model input must share dim 0, the batch; got dim-0 sizes "
            f"{sizes} (a list of per-sample tensors is not a batch): pass input_fn= to build a "
            "batched input, or forward_fn= to feed the model other tensors"
        )
    return sizes[0]


def concat(parts: list[Any]) -> Any:
    """Concatenate model inputs along dim 0 (leaf by leaf)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, Tensor):
        if not first.dim():
            return first
        if any(p.shape[1:] != first.shape[1:] for p in parts):
            raise ValueError(
                "batch_size: loader batches of shapes "
                f"{sorted({tuple(p.shape) for p in parts})} cannot be concatenated into one "
                "normalization batch (they differ beyond dim 0); use batch_size=None"
            )
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return _rebuild(first, [concat([p[i] for p in parts]) for i in range(len(first))])
    if isinstance(first, Mapping):
        return {k: concat([p[k] for p in parts]) for k in first}
    return first


class HostBatches:
    """Iterable of (input, samples) per data item, stopping before pulling an item the limits
    exclude; the item that crosses ``max_samples`` is cut so that exactly ``max_samples`` are
    pulled. With ``singles_skipped`` (items are batches as they come), 1-sample items, which
    the pass skips, still go out but count towards neither limit.

    After the iteration, ``short`` says whether the data ran out before a limit was reached
    (never without limits), and ``pulled`` / ``items`` how far it got towards them."""

    def __init__(self, data: Iterable, input_fn: Callable, max_samples: Optional[int],
                 max_items: Optional[int], singles_skipped: bool = False):
        self.data, self.input_fn = data, input_fn
        self.max_samples, self.max_items = max_samples, max_items
        self.singles_skipped = singles_skipped
        self.pulled = self.items = 0
        self.short = False

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        it = iter(self.data)
        while (self.max_items is None or self.items < self.max_items) and (
            self.max_samples is None or self.pulled < self.max_samples
        ):
            try:
                item = next(it)
            except StopIteration:
                self.short = self.max_samples is not None or self.max_items is not None
                return
            x = self.input_fn(item)
            n = batch_len(x)
            if self.singles_skipped and n == 1:
                yield x, n
                continue
            if self.max_samples is not None and self.pulled + n > self.max_samples:
                n = self.max_samples - self.pulled
                x = slice_batch(x, 0, n)
            if n:  # (an empty item counts towards no limit)
                self.items += 1
                self.pulled += n
                yield x, n


def _move(x: Any, device: torch.device) -> Any:
    # non_blocking only helps (and is only safe) for pinned host memory -> accelerator
    return map_tensors(
        lambda t: t.to(device, non_blocking=t.device.type == "cpu" and t.is_pinned()), x
    )


def on_device(
    batches: Iterator[tuple[Any, int]], device: Optional[torch.device]
) -> Iterator[tuple[Any, int]]:
    """Move inputs to ``device``. On CUDA the copy of batch k+1 is issued on a side stream
    before batch k is handed out, so it overlaps batch k's forward (pinned memory needed for
    the copy to be asynchronous)."""
    if device is None:
        yield from batches
        return
    if device.type != "cuda":
        for x, n in batches:
            yield _move(x, device), n
        return
    copy_stream = torch.cuda.Stream(device)
    pending = None
    for x, n in batches:
        with torch.cuda.stream(copy_stream):
            moved = _move(x, device)
            done = torch.cuda.Event()
            done.record(copy_stream)
        if pending is not None:
            yield _ready(*pending, device)
        pending = (moved, n, done)
    if pending is not None:
        yield _ready(*pending, device)


def _ready(x: Any, n: int, done: "torch.cuda.Event", device: torch.device) -> tuple[Any, int]:
    compute = torch.cuda.current_stream(device)
    compute.wait_event(done)  # this batch's copy only, not the one issued after it
    for t in tensors(x):
        if t.device.type == "cuda":
            t.record_stream(compute)  # memory from the copy stream is used on this one
    return x, n


def regroup(
    batches: Iterator[tuple[Any, int]], batch_size: Optional[int]
) -> Iterator[tuple[Any, int]]:
    """Regroup inputs into batches of exactly ``batch_size`` samples (views when one input
    covers a batch, one ``torch.cat`` otherwise); the last batch holds the remainder. Samples
    carried over to the next input are copied first: a source may refill its tensors in
    place once it moves on."""
    if batch_size is None:
        yield from batches
        return
    parts: list[Any] = []
    have = 0
    for x, n in batches:
        start = 0
        while start < n:
            take = min(n - start, batch_size - have)
            whole = start == 0 and take == n
            parts.append(
                x if whole else slice_batch(x, start, start + take)
            )
            have += take
            start += take
            if have == batch_size:
                yield concat(parts), have
                parts, have = [], 0
        if parts:  # (only the last part can come from this input)
            parts[-1] = map_tensors(lambda t: t.clone() if t.dim() else t, parts[-1])
    if have:
        yield concat(parts), have
