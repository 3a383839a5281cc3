"""One forward of a recompute pass: eager, or replayed from a CUDA graph for fixed shapes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn

from ._collect import CallTracker, StopForward
from ._data import map_tensors, tensors


class Forward:
    """Calls ``forward_fn(model, x)`` (default ``model(x)``), absorbing :class:`StopForward`.

    With ``graph_device`` (CUDA), the first batch runs eagerly on a side stream (warm-up:
    lazy initialization and kernel compilation must not happen during capture), the next
    batch of the same shapes is captured into a CUDA graph, and later batches of those shapes
    are copied into the graph's static input and replayed. Batches of other shapes (the
    remainder) run eagerly. Every statistic lives in device tensors updated in place, so a
    replay accumulates exactly like an eager call; only host-side bookkeeping (the call
    tracker) does not rerun, and nothing depends on it after the first batch.
    """

    def __init__(self, model: nn.Module, forward_fn: Optional[Callable], tracker: CallTracker,
                 graph_device: Optional[torch.device] = None):
        self.model = model
        self.forward_fn = forward_fn
        self.tracker = tracker
        self.graph_device = graph_device
        self.graph = None
        self.static = None
        self.key = None
        self.first = None  # the first input's signature: the call pattern was learned on it

    def eager(self, x: Any, key: tuple) -> None:
        self.tracker.begin_forward(stoppable=key == self.first)
        try:
            if self.forward_fn is None:
                self.model(x)
            else:
                self.forward_fn(self.model, x)
        except StopForward:
            pass

    def __call__(self, x: Any) -> None:
        key = _signature(x)
        if self.first is None:
            self.first = key
        if self.graph_device is None:
            self.eager(x, key)
            return
        if self.graph is not None and key == self.key:
            for dst, src in zip(tensors(self.static), tensors(x)):
                dst.copy_(src)
            self.graph.replay()
        elif self.graph is None and key == self.key:
            self._capture(x)
            self.graph.replay()
        else:
            if self.graph is None:
                self.key = key
            self._side_stream(x, key)

    def _side_stream(self, x: Any, key: tuple) -> None:
        compute = torch.cuda.current_stream(self.graph_device)
        side = torch.cuda.Stream(self.graph_device)
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            self.eager(x, key)
        compute.wait_stream(side)

    def _capture(self, x: Any) -> None:
        self.static = map_tensors(lambda t: t.clone(), x)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread-local: other threads' CUDA calls (a DataLoader's pin-memory thread
            # allocating pinned buffers) neither invalidate the capture nor fail themselves
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                # StopForward is absorbed inside: the capture ends cleanly
                self.eager(self.static, self.key)
        except RuntimeError as e:
            raise RuntimeError(
                "cuda_graph=True: the forward could not be captured as a CUDA graph (it may "
                f"synchronize with the host or change shapes); use cuda_graph=False. {e}"
            ) from e
        self.graph = graph


def _signature(x: Any) -> tuple:
    """The structure of a model input: containers and their lengths or keys, each tensor's
    shape, dtype, device and strides, an array's shape and dtype, and the other leaves' values
    (an int may steer the forward) or, when unhashable, their types."""
    if isinstance(x, torch.Tensor):
        return (x.shape, x.dtype, x.device, x.stride())
    if isinstance(x, (tuple, list)):
        return (type(x), *map(_signature, x))
    if isinstance(x, Mapping):
        return (type(x), *((k, _signature(v)) for k, v in x.items()))
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # a numpy array, say
        return (type(x), tuple(x.shape), str(x.dtype))
    try:
        hash(x)
    except TypeError:
        return (type(x),)
    return (type(x), x)
