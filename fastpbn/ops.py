"""Functional batch norm: ``batch_norm`` (the signature and semantics of
``torch.nn.functional.batch_norm``) and ``batch_stats``, served by the selected backend."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import _function, _torch_ops
from ._backend import get_backend, requested_backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HALF = (torch.float16, torch.bfloat16)


def _check_input(x: Tensor, name: str = "input") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (N, C, *), got {tuple(x.shape)}")
    if x.is_quantized:  # a quantized model whose fastpbn layers quantization did not swap
        raise TypeError(
            f"{name} is a quantized tensor ({x.dtype}): fastpbn normalizes floating-point "
            "tensors. torch.ao.quantization knows BN layers by their exact class; call "
            "fastpbn.revert_model(model) before preparing the model for quantization")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_channel_args(x: Tensor, running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], weight: Optional[Tensor],
                        bias: Optional[Tensor]) -> None:
    """Size, device and dtype of the per-channel tensors. Dtypes by PyTorch's CUDA rule:
    weight and bias share one, and so do the running statistics, each the input's or (for a
    float16/bfloat16 input) float32 -- e.g. bfloat16 parameters with float32 running stats, as
    FSDP's mixed precision leaves them (PyTorch's CPU kernels also want weight/bias and the
    running stats to share one dtype, and refuse the rest themselves where they serve the
    call). Runs on every call: one pass, no per-call containers."""
    c, device, dtype = x.shape[1], x.device, x.dtype
    for group, a, b, ta, tb in (
            ("running statistics", "running_mean", "running_var", running_mean, running_var),
            ("weight and bias", "weight", "bias", weight, bias)):
        first = None
        for name, t in ((a, ta), (b, tb)):
            if t is None:
                continue
            if t.numel() != c:
                # the same wording as PyTorch's native kernels
                raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
            if t.device != device:
                raise RuntimeError(f"{name} is on {t.device} but input is on {device}")
            if first is None:
                first = name
                if t.dtype != dtype and not (t.dtype == torch.float32 and dtype in _HALF):
                    raise RuntimeError(f"{name} is {t.dtype} but input is {dtype}: {group} "
                                       "take the input's dtype (or float32 for a "
                                       "float16/bfloat16 input)")
            elif t.dtype != ta.dtype:
                raise RuntimeError(f"{name} is {t.dtype} but {first} is {ta.dtype}: {group} "
                                   "share one dtype")


def _verify_batch_size(x: Tensor) -> None:
    if x.shape[0] * math.prod(x.shape[2:]) == 1:  # as PyTorch's (also right for C = 0)
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}"
        )


_UNTRACED = contextlib.nullcontext()


@contextlib.contextmanager
def _quiet_tracer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _size_checks():
    """The context of the checks on sizes. Under ``torch.jit.trace`` sizes are traced tensors
    and each check's outcome a constant of the trace, as in PyTorch's own checks, whose
    TracerWarnings the tracer filters: so are these checks'."""
    return _quiet_tracer() if torch.jit.is_tracing() else _UNTRACED


def _stock_only(x: Tensor, *params: Optional[Tensor]) -> bool:
    """Where PyTorch's own kernel serves the call, with stock semantics: ``torch.jit.trace``,
    ``torch.func`` transforms and forward-mode AD (a dual tensor among x and ``params``)
    record or transform PyTorch's ops only (a Python kernel behind an ``autograd.Function``
    has no batching or forward-derivative rule)."""
    return (torch.jit.is_tracing()
            or torch._C._are_functorch_transforms_active()
            or forward_ad._current_level >= 0 and any(  # a dual level is open somewhere
                t is not None and forward_ad.unpack_dual(t).tangent is not None
                for t in (x, *params)))


# Eager calls on CUDA under ``auto`` where fastpbn's kernels lose run PyTorch's own kernel
# (cuDNN or native) with its C++ autograd node. Measured on an H100 (bench/NOTES.md,
# bench/results/nvidia-h100-80gb-hbm3/kernels-triton): an eager call through a Python autograd
# node and fastpbn's launches costs 0.35 ms (training forward) to 1.1 ms (forward+backward) of
# host time against 0.04 / 0.17 ms for stock, so stock wins below ~100 MB; above that fastpbn's
# kernels win on contiguous (NCHW) inputs with many values per channel, where PyTorch's NCHW
# kernel is slow (forward+backward 1.2-7x from 512K values per channel: ResNet's first stages
# at batch >= 128, few-channel images), and in eval without autograd from 32M values (1.1-1.9x,
# either layout); channels_last training stays with stock (0.5-1.0x at 200 MB). Never handed
# off: calls with an accumulator (statistics fused into the pass), momentum=None (fastpbn reads
# 1/num_batches_tracked on the device; stock synchronizes), a backend named by set_backend /
# FASTPBN_BACKEND, and compiled graphs (fastpbn's computation, traced). Tests set it to False.
STOCK_EAGER_ON_CUDA = True
_OWN_MIN_PER_CHANNEL = 1 << 19  # contiguous inputs: fastpbn's kernels from this many per channel
_OWN_MIN_EVAL_NUMEL = 1 << 25  # eval without autograd: fastpbn's kernel from this many values


def _stock_serves(x: Tensor, training: bool, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> bool:
    """Whether an eager CUDA call without an accumulator goes to PyTorch's kernel (see
    ``STOCK_EAGER_ON_CUDA``), where PyTorch's CUDA kernel accepts the dtypes: every per-channel
    tensor in one dtype, the input's or float32 (fastpbn also takes float16 / bfloat16
    parameters with float32 running statistics, which PyTorch refuses). Decided before any
    backend is resolved; False at once for other devices."""
    if not (STOCK_EAGER_ON_CUDA and x.is_cuda):
        return False
    dtypes = {t.dtype for t in (weight, bias, running_mean, running_var) if t is not None}
    if len(dtypes) > 1 or not dtypes <= {x.dtype, torch.float32}:
        return False
    n = x.numel()
    if x.is_contiguous() and n >= _OWN_MIN_PER_CHANNEL * x.shape[1]:
        return False
    if not training and n >= _OWN_MIN_EVAL_NUMEL and not _needs_autograd(x, weight, bias):
        return False
    return requested_backend() == "auto"  # (an environment read: last)


# Exports record PyTorch's training op on torch >= 2.13: before it (pytorch#176347), dynamo
# folds torch.compiler.is_exporting() to True under torch.compile too, which would take
# every compiled training graph off fastpbn's path. Older exports take torch.compile's path:
# the traced computation under ``auto``, else fastpbn's op, which an exported program cannot
# differentiate.
_is_exporting = torch.compiler.is_exporting if _function.TORCH_2_13 else lambda: False
# torch >= 2.1: the id of the backward pass running in this thread, -1 outside one
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _needs_autograd(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def batch_norm_train(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Optional[Tensor] = None,
    accumulator=None,
) -> Tensor:
    """Training-mode batch norm with the extras the modules need.

    Args:
        momentum: the running-average factor; None means the cumulative average
            ``1 / num_batches_tracked`` (read on the device by the GPU backends: no host
            synchronization).
        num_batches_tracked: the layer's counter, incremented here once the arguments have
            passed their checks (a refused call leaves it as it was) and before the running
            statistics are updated; with momentum None the factor is 1 / its new value.
        accumulator: a :class:`fastpbn.WelfordState` into which this batch's statistics are
            merged (in float64, inside the statistics kernel where the backend has one).
    Returns:
        The normalized tensor.
    """
    _check_input(input)
    with _size_checks():
        _check_channel_args(input, running_mean, running_var, weight, bias)
        if (running_mean is None) != (running_var is None):  # as F.batch_norm
            raise ValueError(
                "running_mean and running_var must either both be None or neither be None")
        _verify_batch_size(input)
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if momentum is not None:
        # a constant of the graph, as eps is (the comparison above specializes it): under
        # torch.compile(dynamic=True) an unspecialized float reaching two calls of one layer
        # made dynamo fail ("lift_tracked_freevar_to_input should not be called on root
        # SubgraphTracer"). Eager: a float stays itself.
        momentum = float(momentum)
    acc = (None, None, None)
    compiling = _function.through_ops()
    # an empty batch adds nothing; an eager forward run inside a backward (activation
    # checkpointing recomputing it) takes the path it took the first time, without merging
    # the batch a second time (the running statistics do update twice, as stock's)
    if (accumulator is not None and input.numel() > 0
            and (compiling or _graph_task_id() == -1)):
        try:
            accumulator._check_input(input)
        except (TypeError, ValueError) as e:
            raise type(e)(f"accumulator ({accumulator.num_channels} channels, "
                          f"{accumulator.device}): {e}") from e
        acc = (accumulator.count, accumulator.mean, accumulator.m2)
    args = (input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
            *acc)
    # The backend of an eager call is resolved once and handed down to the autograd Function,
    # which keeps it for the backward. None while a graph is being compiled or tensors are
    # fake: the custom ops then resolve it at run time; and for a call handed to PyTorch's
    # kernel (which resolves, or builds, nothing). Where the torch backend would run PyTorch's
    # own kernel anyway, that kernel is called directly: PyTorch's C++ autograd node costs
    # less than a Python autograd.Function (~17 µs a call on CPU).
    handed_off = (not compiling and accumulator is None and momentum is not None
                  and _stock_serves(input, True, weight, bias, running_mean, running_var))
    backend = None if compiling or handed_off else get_backend(input)
    # (compiled too: a graph of torch.func.grad runs the transform on what it records)
    stock_only = not handed_off and _stock_only(input, weight, bias)
    if stock_only and accumulator is not None:
        raise RuntimeError("accumulator: fastpbn's statistics kernels cannot run under "
                           "torch.jit.trace, torch.func transforms or forward-mode AD")
    # torch.export records PyTorch's op: an exported program is trained through its ops'
    # autograd formulas, which fastpbn's mutating op cannot have (its autograd.Function is
    # not kept); with an accumulator, fastpbn's op, for a forward without autograd
    exported = compiling and _is_exporting()
    if exported and accumulator is not None and _needs_autograd(input, weight, bias):
        raise RuntimeError("accumulator: an exported program cannot differentiate fastpbn's "
                           "accumulating op; export under torch.no_grad() to gather "
                           "statistics, or without the accumulator to train")
    exported = exported and accumulator is None
    # under ``auto``, a compiled graph without an accumulator records fastpbn's centred
    # computation as PyTorch's ops, which the compiler fuses with its neighbours (and
    # differentiates); with one, or a backend named, fastpbn's op (the backend's kernels).
    # (Decided when the graph is compiled: dynamo guards set_backend's name, and
    # FASTPBN_BACKEND only where it was set then.)
    traced = (compiling and accumulator is None and not (exported or stock_only)
              and requested_backend() == "auto")
    native = handed_off or stock_only or exported or traced or (
        backend is not None and accumulator is None and backend.name == "torch"
        and backend.native_train(input, weight, bias, running_mean, running_var))
    grad = not native and _needs_autograd(input, weight, bias)
    if grad and backend is not None:
        # autograd refuses to save an inference tensor only after the forward ran, which
        # would have updated the running statistics and the accumulator (stock's kernel
        # checks first)
        for name, t in (("input", input), ("weight", weight)):
            if t is not None and t.is_inference():
                raise RuntimeError(f"{name} is an inference tensor (made under "
                                   "torch.inference_mode), which autograd cannot save for "
                                   "backward; clone it outside inference mode, or call under "
                                   "torch.no_grad() (nothing was updated)")
    if num_batches_tracked is not None:  # the call is accepted: count it, as stock does
        num_batches_tracked.add_(1)
    if exported:
        return _torch_ops.exported_forward_train(*args[:8])
    if traced:
        return _function.compiled_forward_train(*args[:8])
    if native:
        return _torch_ops.native_forward_train(*args[:8])
    if grad:
        return _function.BatchNormTrain.apply(*args, backend)[0]
    return _function.batch_norm_train_no_grad(*args, backend=backend)[0]


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.batch_norm`` served by fastpbn's backends.

    Args and semantics are PyTorch's: in training the batch statistics normalize and, when
    given, ``running_mean``/``running_var`` are updated in place with ``momentum`` (the unbiased
    variance goes into ``running_var``); in eval the running statistics normalize.
    Returns:
        The normalized tensor, differentiable with respect to input, weight and bias.
    """
    if training:
        if momentum is None:  # as F.batch_norm (batch_norm_train reads None as cumulative)
            raise TypeError("batch_norm(): momentum must be a float, not None")
        return batch_norm_train(input, running_mean, running_var, weight, bias, momentum, eps)
    _check_input(input)
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if running_mean is None or running_var is None:
        raise RuntimeError("running_mean and running_var must be given when training=False")
    with _size_checks():
        _check_channel_args(input, running_mean, running_var, weight, bias)
    args = (input, weight, bias, running_mean, running_var, eps)
    # compiled, exported and fake calls record PyTorch's op: the compiler folds it into a
    # preceding convolution or fuses it with its neighbours, and exporters (ONNX,
    # AOTInductor) and programs loaded without fastpbn know it; fastpbn's eval kernel would
    # add nothing there. A call handed to PyTorch's kernel resolves no backend.
    if _function.through_ops():
        return _torch_ops.forward_eval(*args)
    if _stock_serves(input, False, weight, bias, running_mean, running_var):
        return _torch_ops.forward_eval(*args)
    backend = get_backend(input)
    if backend.name == "torch" or _stock_only(input, weight, bias):
        return _torch_ops.forward_eval(*args)
    if _needs_autograd(input, weight, bias):
        return _function.BatchNormEval.apply(*args, backend)
    return _function.batch_norm_eval_no_grad(*args, backend=backend)


def batch_stats(x: Tensor, check: bool = True) -> tuple[Tensor, Tensor, int]:
    """Per-channel statistics of ``x`` (N, C, *): float32 mean and biased variance, computed
    centred (never sum / sum-of-squares), and the number of values per channel.

    Args:
        check: raise ``ValueError`` where a statistic is not finite (one host
            synchronization); False returns them as they are (NaN for NaN input, as
            ``torch.var_mean``).
    """
    _check_input(x, "x")
    if x.numel() == 0:
        raise ValueError(f"x has no values per channel (shape {tuple(x.shape)})")
    x = x.detach()  # statistics have no gradient (an activation may require one)
    mean, var, count = get_backend(x).batch_stats(x)
    if check and not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
        raise ValueError("x: its statistics are not finite (NaN or Inf values, or squared "
                         "deviations beyond float32's range)")
    return mean, var, count
