"""``FastPreciseBN1d/2d/3d``: drop-in replacements for ``nn.BatchNorm1d/2d/3d``.

Same constructor, state_dict keys and behaviour in every mode; the arithmetic runs on fastpbn's
backends (under ``auto``, eager CUDA calls that its kernels would slow down run PyTorch's
kernel: ``fastpbn.ops.STOCK_EAGER_ON_CUDA``). Four differences a user can rely on:

* with ``momentum=None`` the cumulative factor ``1/num_batches_tracked`` is read on the device
  by the Triton and CUDA backends (stock BatchNorm, and the torch backend, read it on the
  host: a synchronization per step on a GPU);
* ``layer.accumulator`` may hold a :class:`fastpbn.WelfordState`; while it does, every training
  forward also merges its batch statistics into it, inside the statistics kernel. This is how
  precise statistics are gathered without a second pass over the activations;
* a call refused for bad input (a wrong channel count, a dtype outside PyTorch's CUDA rule,
  a backend that refuses the input) leaves ``num_batches_tracked`` as it was; stock
  BatchNorm counts it. (A call that gets as far as the kernel counts, as in stock:
  activation checkpointing's early stop of a recomputed forward, which raises after the
  kernel, sees stock's counts.);
* on the CPU, a training call with fp16 / bf16 input whose parameters and running statistics
  differ in dtype (one float32, the other the input's, as FSDP's mixed precision leaves
  them) runs, in float32, where PyTorch's CPU kernel refuses it.

Under TorchScript (``torch.jit.script``), ``torch.jit.trace``, ``torch.func`` transforms and
forward-mode AD the layers run PyTorch's own kernel, with stock semantics (those tools record or
transform PyTorch's ops only; an ``accumulator`` is refused there). ``torch.fx.symbolic_trace``
records a layer as one module call, as it records a stock BN layer (a leaf): the graph runs the
layer itself, in the mode it is in at run time. ``torch.compile`` traces fastpbn's centred
computation as PyTorch's ops in training (fastpbn's custom op with an ``accumulator`` or a
backend named explicitly) and PyTorch's own op in eval (see ``fastpbn.ops``); ``torch.export``
(torch >= 2.13) PyTorch's own ops in both, so that an exported program trains (with an
``accumulator``: fastpbn's op, and only without autograd). An eager forward run inside a
backward (activation checkpointing's rerun) merges nothing into the accumulator.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Proxy

from . import ops
from .stats import WelfordState


class _FastPreciseBNMixin:
    accumulator: Optional[WelfordState] = None
    __jit_ignored_attributes__ = ["accumulator"]  # TorchScript cannot type a WelfordState

    def __prepare_scriptable__(self):
        if self.accumulator is not None:
            raise RuntimeError("accumulator: a layer that accumulates cannot be scripted "
                               "(TorchScript runs PyTorch's kernel); set it to None first")
        return self

    def forward(self, input: Tensor) -> Tensor:
        fx = False
        if not torch.jit.is_scripting():  # (TorchScript does not compile this block)
            if isinstance(input, Proxy):  # an FX tracer has traced into the layer
                call = _fx_module_call(self, input)
                if call is not None:
                    return call
                fx = True
        if not fx:  # FX proxies carry no shape to check
            self._check_input_dim(input)
        momentum: Optional[float] = self.momentum
        num_batches_tracked: Optional[Tensor] = None
        counter = self.num_batches_tracked
        if self.training and self.track_running_stats and counter is not None:
            num_batches_tracked = counter
            if torch.jit.is_scripting():  # (eager: the op counts the call once it accepts it;
                counter.add_(1)           # an FX graph would not record the increment)
        elif momentum is None:
            momentum = 0.0
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None
        if torch.jit.is_scripting() or fx:
            # TorchScript and FX graphs record PyTorch's kernel, with stock semantics (FX
            # records neither the counter's increment nor a factor read from it)
            if momentum is None:
                assert num_batches_tracked is not None
                if fx:
                    raise RuntimeError("an FX graph that traces into a BN layer with "
                                       "momentum=None cannot record its factor "
                                       "1/num_batches_tracked, which changes per call")
                momentum = 1.0 / float(num_batches_tracked)
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                bn_training, momentum, self.eps)
        return _normalize(self, input, running_mean, running_var, momentum,
                          num_batches_tracked, bn_training)


@torch.jit.unused
def _fx_module_call(layer: nn.Module, input: Proxy) -> Optional[Proxy]:
    """An FX tracer traces into the layer (it traces into every module outside ``torch.nn``):
    record the layer as one module call where the tracer would keep the stock class it replaces
    a leaf, as ``torch.fx.symbolic_trace`` and quantization's tracers do. None where it would
    trace into the stock layer too (a tracer that flattens every module), and for a subclass:
    the graph then records PyTorch's kernel with the trace's mode, as it would for stock, and
    cannot carry an accumulator."""
    tracer = input.tracer
    cls = type(layer)
    stock = _STOCK.get(cls)
    if stock is not None:
        name = tracer.path_of_module(layer)
        layer.__class__ = stock  # the tracer's question about the stock layer, exactly
        try:
            leaf = tracer.is_leaf_module(layer, name)
        finally:
            layer.__class__ = cls
        if leaf:
            return tracer.create_proxy("call_module", name, (input,), {})
    if getattr(layer, "accumulator", None) is not None:
        raise RuntimeError("accumulator: an FX graph that traces into the layer cannot carry "
                           "fastpbn's statistics kernels")
    return None


@torch.jit.unused
def _normalize(layer: nn.Module, input: Tensor, running_mean: Optional[Tensor],
               running_var: Optional[Tensor], momentum: Optional[float],
               num_batches_tracked: Optional[Tensor], bn_training: bool) -> Tensor:
    """The eager (and torch.compile) path: fastpbn's ops. A function, not a method: stock
    layers borrow ``forward`` during a recompute pass. ``num_batches_tracked`` is counted by
    the op, once it has accepted the input."""
    if bn_training:
        return ops.batch_norm_train(
            input, running_mean, running_var, layer.weight, layer.bias, momentum,
            layer.eps, num_batches_tracked=num_batches_tracked,
            accumulator=getattr(layer, "accumulator", None),
        )
    return ops.batch_norm(
        input, running_mean, running_var, layer.weight, layer.bias, False, 0.0, layer.eps
    )


class FastPreciseBN1d(_FastPreciseBNMixin, nn.BatchNorm1d):
    """Drop-in ``nn.BatchNorm1d`` (inputs (N, C) or (N, C, L)) on fastpbn kernels."""


class FastPreciseBN2d(_FastPreciseBNMixin, nn.BatchNorm2d):
    """Drop-in ``nn.BatchNorm2d`` (inputs (N, C, H, W), NCHW or channels_last) on fastpbn
    kernels."""


class FastPreciseBN3d(_FastPreciseBNMixin, nn.BatchNorm3d):
    """Drop-in ``nn.BatchNorm3d`` (inputs (N, C, D, H, W)) on fastpbn kernels."""


_REPLACEMENTS = {
    nn.BatchNorm1d: FastPreciseBN1d,
    nn.BatchNorm2d: FastPreciseBN2d,
    nn.BatchNorm3d: FastPreciseBN3d,
}
_STOCK = {new: old for old, new in _REPLACEMENTS.items()}


def convert_model(module: nn.Module) -> nn.Module:
    """Turn every stock ``nn.BatchNorm1d/2d/3d`` in ``module`` into its FastPreciseBN twin.

    In place: each layer's class is switched, so it stays the same object -- a layer shared by
    several parents stays shared, and its parameters and buffers (device, dtype,
    ``requires_grad``, optimizer references), hooks, ``training`` flag and any other attribute
    are kept. Subclasses such as ``nn.SyncBatchNorm``, lazy BN layers and a library's own
    (timm's ``BatchNormAct2d``) are left as they are, with a warning that counts them by class:
    they have their own semantics (cross-process statistics, deferred shapes, a fused
    activation) that a drop-in swap would change.

    Returns:
        ``module`` (converted itself when it is a stock BN layer).
    """
    left: Counter[str] = Counter()
    for m in module.modules():
        new = _REPLACEMENTS.get(type(m))
        if new is not None:
            m.__class__ = new
        elif (isinstance(m, nn.modules.batchnorm._BatchNorm)
              and not isinstance(m, _FastPreciseBNMixin)):  # (a subclass, a parametrized one)
            left[type(m).__name__] += 1
    if left:
        kinds = ", ".join(f"{n} {name}" for name, n in left.items())
        warnings.warn(f"convert_model: left {sum(left.values())} BN layer(s) that are not stock "
                      f"nn.BatchNorm1d/2d/3d as they are ({kinds}); they run their own forward "
                      "(recompute_bn_stats still recomputes their statistics)", stacklevel=2)
    return module


def revert_model(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_model`: every FastPreciseBN1d/2d/3d becomes the stock
    ``nn.BatchNorm1d/2d/3d`` again, in place and keeping everything as ``convert_model`` does
    (its statistics too, precise or not). For what expects stock layers by type -- conv-BN
    fusion (``torch.ao.quantization.fuse_modules``), an exported or pickled model that must
    load without fastpbn. A layer's ``accumulator`` attribute is dropped.

    Returns:
        ``module``.
    """
    for m in module.modules():
        old = _STOCK.get(type(m))
        if old is not None:
            m.__class__ = old
            m.__dict__.pop("accumulator", None)
    return module
