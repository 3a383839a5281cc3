"""Autograd for batch norm: ``autograd.Function``s over the backends, and two
``torch.library`` custom ops for the training forward and the backward.

``fastpbn::batch_norm_train`` (mutates the running stats and the optional float64 accumulator)
and ``fastpbn::batch_norm_backward``: being custom ops with fake (meta) implementations, they
trace into ``torch.compile(fullgraph=True)`` graphs without breaks; the backend is chosen
inside the op, at run time. (A mutating custom op cannot carry its own autograd formula, hence
the Functions; and an exported program, which keeps no Function, records PyTorch's ops instead,
see ``fastpbn.ops.batch_norm_train``.) The eval forward has no op: compiled, exported and fake
calls record PyTorch's own (``fastpbn.ops.batch_norm``).
"""

# no `from __future__ import annotations`: torch < 2.6 reads the custom ops' schemas from
# evaluated annotations, and wants typing.List
from typing import List, Optional

import torch
from torch import Tensor

from . import _torch_ops
from ._backend import get_backend
from ._scratch import output_like, stats_dtype
from ._torch_ops import _in_output_layout


def through_ops() -> bool:
    """Whether a call must go through the custom ops, whose fake implementations serve a
    graph being compiled and a ``FakeTensorMode`` (memory and shape estimation), rather than
    straight to a backend's kernels."""
    return (torch.compiler.is_compiling()
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None)


def _param_grad(x: Tensor, weight: Optional[Tensor]) -> Tensor:
    """An empty (C,) weight or bias gradient: the weight's dtype, without one the statistics'
    (float64 for float64 x, which only the torch backend serves; float32 otherwise)."""
    return x.new_empty(x.shape[1], dtype=weight.dtype if weight is not None else stats_dtype(x))


@torch.library.custom_op(
    "fastpbn::batch_norm_train",
    mutates_args=("running_mean", "running_var", "acc_count", "acc_mean", "acc_m2"),
)
def batch_norm_train(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    acc_count: Optional[Tensor],
    acc_mean: Optional[Tensor],
    acc_m2: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    return _train_impl(x, weight, bias, running_mean, running_var, num_batches_tracked,
                       momentum, eps, acc_count, acc_mean, acc_m2)


def _train_impl(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                acc_count, acc_mean, acc_m2, backend=None):
    if x.numel() == 0:  # as torch.batch_norm: an empty output, no statistic touched
        stats = x.new_zeros(x.shape[1], dtype=stats_dtype(x))
        return output_like(x), stats, stats.clone()
    acc = (acc_count, acc_mean, acc_m2) if acc_count is not None else None
    return (backend or get_backend(x)).forward_train(
        x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, acc
    )


@batch_norm_train.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, *acc):
    c = x.shape[1]
    return (
        output_like(x),
        x.new_empty(c, dtype=stats_dtype(x)),
        x.new_empty(c, dtype=stats_dtype(x)),
    )


_WRITTEN = (3, 4, 8, 9, 10)  # the arguments of batch_norm_train that it writes
# only torch 2.12 and older need the copies (below); on torch 2.13 the copies themselves
# made inductor write an offset view's memory wrongly (an accumulator's mean read its count)
# (major, minor): a 2.13 pre-release ("2.13.0a0+git...") counts as 2.13
TORCH_2_13 = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 13)
_COPY_WRITTEN = not TORCH_2_13


def _train_op(*args):
    """``batch_norm_train`` (the custom op) for a graph being compiled or fake tensors, its
    written arguments passed as fresh copies and copied back after (C values each). torch
    2.11's inductor copies a written argument that is a view at a nonzero storage offset
    (running statistics kept as rows of one buffer, say) from the view's data pointer and then
    applies the offset again, so the op read and wrote the wrong memory (measured: running_var
    and an accumulator's mean and m2 wrong from the first compiled step). Dynamo cannot ask a
    tensor for its storage offset, so every written argument is copied."""
    if not _COPY_WRITTEN:
        return batch_norm_train(*args)
    args = list(args)
    written = [(i, args[i]) for i in _WRITTEN if args[i] is not None]
    for i, t in written:
        args[i] = t.clone()
    out = batch_norm_train(*args)
    for i, t in written:
        t.copy_(args[i])
    return out


def batch_norm_eval_no_grad(x, weight, bias, running_mean, running_var, eps, *, backend):
    """Eval forward on ``backend`` without an autograd node (eager calls only: compiled,
    exported and fake ones record PyTorch's op, see ``fastpbn.ops.batch_norm``)."""
    if x.numel() == 0:
        return output_like(x)
    return backend.forward_eval(x, weight, bias, running_mean, running_var, eps)


@torch.library.custom_op("fastpbn::batch_norm_backward", mutates_args=())
def batch_norm_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    output_mask: List[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _backward_impl(grad_out, x, weight, mean, invstd, training, output_mask)
    # custom ops cannot return None: unrequested gradients come back as empty tensors
    empty = x.new_empty(0)
    return (
        dx if dx is not None else empty,
        dw if dw is not None else empty.clone(),
        db if db is not None else empty.clone(),
    )


def _backward_impl(grad_out, x, weight, mean, invstd, training, output_mask, backend=None):
    if x.numel() == 0:  # zero gradients (PyTorch's CPU backward kernel crashes on it)
        zero = _param_grad(x, weight).zero_()
        return (output_like(x) if output_mask[0] else None,
                zero if output_mask[1] else None, zero.clone() if output_mask[2] else None)
    return (backend or get_backend(x)).backward(grad_out, x, weight, mean, invstd, training,
                                                tuple(output_mask))


@batch_norm_backward.register_fake
def _(grad_out, x, weight, mean, invstd, training, output_mask):
    return (
        output_like(x) if output_mask[0] else x.new_empty(0),
        _param_grad(x, weight) if output_mask[1] else x.new_empty(0),
        _param_grad(x, weight) if output_mask[2] else x.new_empty(0),
    )


def _mask(ctx, weight) -> list:
    """Which of dx, dweight, dbias the backward gives (no dweight without a weight)."""
    return [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
            ctx.needs_input_grad[2]]


def _masked(grads, mask) -> tuple:
    return tuple(g if m else None for g, m in zip(grads, mask))


def _grads(ctx, grad_out, x, weight, mean, invstd, training):
    mask = _mask(ctx, weight)
    # ctx.backend None: the forward went through the ops (under a fake mode, say), and so
    # must its backward, even when it runs after the mode has ended
    if through_ops() or ctx.backend is None:
        dx, dw, db = batch_norm_backward(grad_out, x, weight, mean, invstd, training, mask)
    elif torch.is_grad_enabled():
        # backward(create_graph=True): PyTorch's backward kernel, which has a derivative
        # (double backward); fastpbn's kernels have none
        dx, dw, db = _backward_impl(grad_out, x, weight, mean, invstd, training, mask,
                                    get_backend(x, "torch"))
    else:  # the backend the forward resolved
        dx, dw, db = _backward_impl(grad_out, x, weight, mean, invstd, training, mask,
                                    ctx.backend)
    return _masked((dx, dw, db), mask)


class BatchNormTrain(torch.autograd.Function):
    """Training forward (batch statistics) with its backward; the running stats and the
    accumulator are updated in place by the forward op."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, acc_count, acc_mean, acc_m2, backend=None):
        # eager calls skip the custom-op dispatcher (tens of microseconds a call) and use the
        # backend the caller resolved; graphs being compiled (and fake tensors) need the op
        # and its fake
        args = (x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                acc_count, acc_mean, acc_m2)
        y, mean, invstd = batch_norm_train_no_grad(*args, backend=backend)
        ctx.backend = backend
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_invstd):
        x, weight, mean, invstd = ctx.saved_tensors
        return (*_grads(ctx, grad_y, x, weight, mean, invstd, True), *([None] * 9))


class CompiledBatchNormTrain(torch.autograd.Function):
    """What a graph being compiled records for a training call under ``auto`` without an
    accumulator (see ``fastpbn.ops.batch_norm_train``): fastpbn's centred forward and backward
    as PyTorch's ops, which the compiler fuses with their neighbours (a custom op would be an
    opaque call). It saves x and per-channel statistics: no centred copy of x is written."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, pivot, mean_d, var, invstd = _torch_ops.centred_forward_train(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, pivot, mean_d, invstd)
        mean = pivot + mean_d
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_var):
        x, weight, pivot, mean_d, invstd = ctx.saved_tensors
        mask = _mask(ctx, weight)
        if torch.is_grad_enabled():  # create_graph: PyTorch's op, whose own derivative
            # follows the statistics' dependence on x (the saved ones carry no graph)
            grads = _torch_ops.backward(grad_y, x, weight, pivot + mean_d, invstd, True,
                                        tuple(mask))
        else:
            grads = _torch_ops.centred_backward_train(grad_y, x, weight, pivot, mean_d, invstd,
                                                      tuple(mask))
        return (*_masked(grads, mask), None)


def compiled_forward_train(x, weight, bias, running_mean, running_var, num_batches_tracked,
                           momentum, eps):
    """:class:`CompiledBatchNormTrain`, and the running statistics updated beside it."""
    if x.numel() == 0:  # PyTorch's op: an empty output with gradients, no statistic touched
        return _torch_ops.native_forward_train(x, weight, bias, None, None, None, 0.0, eps)
    y, mean, var = CompiledBatchNormTrain.apply(x, weight, bias, eps)
    if running_mean is not None:
        _torch_ops.update_running(running_mean, running_var, mean, var,
                                  x.numel() // x.shape[1], momentum, num_batches_tracked)
    return y


class BatchNormEval(torch.autograd.Function):
    """Eval forward (running statistics) with its backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, backend=None):
        ctx.save_for_backward(x, weight, running_mean, running_var)
        ctx.eps, ctx.backend = eps, backend
        return batch_norm_eval_no_grad(x, weight, bias, running_mean, running_var, eps,
                                       backend=backend)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, running_mean, running_var = ctx.saved_tensors
        if torch.is_grad_enabled() and (weight is None or weight.dtype == running_var.dtype):
            # backward(create_graph=True): PyTorch's eval backward, with its derivatives, as
            # stock's. dx may depend on nothing that requires grad (no weight, or a frozen one),
            # yet stock's has a graph (zero second-order gradients), which a gradient penalty
            # may differentiate. (PyTorch's op refuses a weight and running statistics of two
            # dtypes, which the path below takes.)
            mask = _mask(ctx, weight)
            dx, dw, db = torch.ops.aten.native_batch_norm_backward(
                grad_y, x, weight, running_mean, running_var, None, None, False, ctx.eps, mask)
            return (*_masked((_in_output_layout(dx, x) if mask[0] else dx, dw, db), mask),
                    None, None, None, None)
        work = stats_dtype(x)
        invstd = torch.rsqrt(running_var.to(work) + ctx.eps)
        grads = _grads(ctx, grad_y, x, weight, running_mean.to(work), invstd, False)
        return (*grads, None, None, None, None)


def batch_norm_train_no_grad(*args, backend=None):
    """Training forward without an autograd node of its own (nothing requires grad, or inside
    ``BatchNormTrain.forward``): the custom op while compiling, else a direct call on
    ``backend`` (resolved here when None)."""
    if through_ops():
        return _train_op(*args)
    return _train_impl(*args, backend=backend)

