"""torch.compile(fullgraph=True) of a model built from FastPreciseBN layers: no graph breaks,
and the compiled model matches eager in training (forward, backward, running stats) and eval.
The custom ops of fastpbn/_function.py carry the kernels into the graph; the backend is chosen
inside them at run time, so the same test covers the torch backend and (through its CPU
interpreter, or compiled on a GPU) the triton backend."""

import copy
import importlib.util

import pytest
import torch
from torch import nn

import fastpbn
from fastpbn import FastPreciseBN1d, FastPreciseBN2d

from .conftest import DEVICE, HAS_CUDA

HAS_TRITON = importlib.util.find_spec("triton") is not None


def small_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        FastPreciseBN2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, bias=False),
        FastPreciseBN2d(6, momentum=None),  # cumulative average: counter read on the device
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5, bias=False),  # a bias before BN gets an exactly-zero gradient
        FastPreciseBN1d(5, affine=False),
    ).to(DEVICE)


def close(a, b, what):
    """Inductor fuses and reorders the float32 arithmetic around the ops: equal up to rounding
    relative to the tensor's magnitude (a gradient that cancels to ~0 keeps its noise)."""
    atol = 1e-4 * max(b.abs().max().item(), 1.0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=what)


def backward_and_compare(eager: nn.Module, compiled_model: nn.Module, ye, yc, what: str):
    """Backpropagate one random output gradient through both models; their parameter
    gradients must agree."""
    g = torch.randn_like(ye)
    (ye * g).sum().backward()
    (yc * g).sum().backward()
    for (name, pe), pc in zip(eager.named_parameters(), compiled_model.parameters()):
        close(pc.grad, pe.grad, what.format(name))


def buffers_agree(eager: nn.Module, compiled_model: nn.Module, what: str):
    for (name, be), bc in zip(eager.named_buffers(), compiled_model.buffers()):
        close(bc, be, what.format(name))


def run_and_compare(backend_name: str, compiler: str, channels_last: bool) -> None:
    fastpbn.set_backend(backend_name)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = small_model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    for step in range(2):
        x = torch.randn(6, 3, 8, 8, device=DEVICE) * 2 + 50  # shifted input
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        ye, yc = eager(x), compiled(x)
        close(yc, ye, f"train output, step {step}")
        backward_and_compare(eager, compiled_model, ye, yc, f"grad of {{}}, step {step}")
        buffers_agree(eager, compiled_model, f"buffer {{}}, step {step}")
        eager.zero_grad(), compiled_model.zero_grad()
    eager.eval(), compiled_model.eval()
    x = torch.randn(4, 3, 8, 8, device=DEVICE) * 2 + 50
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = eager(xe), compiled(xc)
    close(yc, ye, "eval output")
    # the eval backward op (running statistics)
    backward_and_compare(eager, compiled_model, ye, yc, "eval grad of {}")
    close(xc.grad, xe.grad, "eval input grad")
    assert int(compiled_model[4].num_batches_tracked) == 2


@pytest.mark.parametrize("channels_last", [False, True])
def test_compile_torch_backend(channels_last):
    run_and_compare("torch", "inductor", channels_last)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.skipif(HAS_CUDA, reason="the gpu variant below runs it compiled")
def test_compile_triton_backend_interpreted(monkeypatch):
    """Inductor compiles the graph around the ops; the ops run the interpreted kernels."""
    from fastpbn import kernels

    calls = []
    for op in ("forward_train", "forward_eval", "backward"):
        fn = getattr(kernels, op)
        monkeypatch.setattr(kernels, op, lambda *a, _fn=fn, _op=op: calls.append(_op) or _fn(*a))
    run_and_compare("triton", "inductor", channels_last=True)
    # 3 BN layers x 2 steps in each of eager and compiled, then one eval step each
    assert calls.count("forward_train") == 12 and calls.count("backward") == 12 + 6
    assert calls.count("forward_eval") == 6
    assert calls.count("forward_eval") == 6


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compile_gpu(backend_name, channels_last):
    run_and_compare(backend_name, "inductor", channels_last)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_centred_path_and_accumulator(compiler):
    """The torch backend's centred path (>= 32K values on CPU) and an attached accumulator run
    inside compiled graphs through the custom op, whose outputs may not alias one another:
    outputs, gradients, buffers and the accumulator equal eager."""
    fastpbn.set_backend("torch")
    torch._dynamo.reset()
    torch.manual_seed(1)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), FastPreciseBN2d(8),
                          nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False), FastPreciseBN2d(4)).to(DEVICE)
    model = copy.deepcopy(eager)
    for m in (eager, model):
        m[4].accumulator = fastpbn.WelfordState(4, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    x = torch.randn(8, 3, 24, 24, device=DEVICE) * 2 + 50  # 8·8·24·24 values at layer 1
    ye, yc = eager(x), compiled(x)
    close(yc, ye, "output")
    backward_and_compare(eager, model, ye, yc, "grad of {}")
    buffers_agree(eager, model, "buffer {}")
    for f in ("count", "mean", "m2"):
        close(getattr(model[4].accumulator, f), getattr(eager[4].accumulator, f), f)


def _odd_layouts():
    """Inputs whose own strides differ from the layout PyTorch's kernels give y: a transposed
    (N, L, C) sequence, a sliced channels_last view, a dense NCHW permutation."""
    return {
        "transposed NCL": torch.randn(4, 9, 8, device=DEVICE).transpose(1, 2),
        "sliced channels_last": torch.randn(4, 8, 5, 7, device=DEVICE).to(
            memory_format=torch.channels_last)[..., :6],
        "permuted NCHW": torch.randn(4, 5, 8, 6, device=DEVICE).permute(0, 2, 1, 3),
    }


@pytest.mark.parametrize("training", [True, False])
def test_custom_ops_fake_strides_match_every_layout(backend, training):
    """torch.compile trusts the fake implementations' strides: the real ops (every backend,
    forward and backward) must return exactly those, for any input layout."""
    from fastpbn import _function

    for x in _odd_layouts().values():
        c = x.shape[1]
        w, b = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
        rm, rv = torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
        if training:
            args = (x, w, b, rm, rv, None, 0.1, 1e-5, None, None, None)
            torch.library.opcheck(_function.batch_norm_train, args,
                                  test_utils=("test_schema", "test_faketensor"))
            _, mean, invstd = _function.batch_norm_train(*args)
        else:
            torch.library.opcheck(_function.batch_norm_eval, (x, w, b, rm, rv, 1e-5),
                                  test_utils=("test_schema", "test_faketensor"))
            mean, invstd = rm, rv.rsqrt()
        bwd = (torch.randn_like(x), x, w, mean, invstd, training, [True, True, True])
        torch.library.opcheck(_function.batch_norm_backward, bwd,
                              test_utils=("test_schema", "test_faketensor"))


def test_compiled_backward_on_a_transposed_sequence():
    """BatchNorm1d on a transposed (N, L, C) sequence, compiled with inductor through the
    backward: the graph's stride assertions hold (they failed on the fakes' strides)."""
    torch._dynamo.reset()
    x0 = torch.randn(4, 9, 8, device=DEVICE)
    w = (torch.rand(8, device=DEVICE) + 0.5).requires_grad_()

    def f(x):
        y = fastpbn.batch_norm(x, None, None, w, None, training=True)
        return (y * torch.arange(9.0, device=DEVICE)).sum()

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="inductor")):
        x = x0.clone().requires_grad_()
        fn(x.transpose(1, 2)).backward()
        grads.append((x.grad, w.grad.clone()))
        w.grad = None
    for a, b in zip(*grads):
        close(b, a, "compiled gradient")


@pytest.mark.parametrize("old_torch", [False, True])
def test_export_keeps_fastpbn_ops(monkeypatch, old_torch):
    """torch.export (non-strict) records fastpbn's custom op, also where torch (< 2.9) has no
    is_fx_symbolic_tracing and is_fx_tracing is set by export as well as by FX."""
    from fastpbn import modules

    if old_torch:  # what modules found at import on such a torch
        monkeypatch.setattr(modules, "_is_fx_symbolic_tracing", None)
    model = fastpbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).to(DEVICE)
    program = torch.export.export(model, (torch.randn(2, 3, 5, 5, device=DEVICE),), strict=False)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "fastpbn.batch_norm_train.default" in ops, ops


def test_compiled_empty_batch(backend):
    """An empty batch through a compiled layer, forward and backward: an empty output and
    gradients, the running statistics untouched (as stock eager; the custom ops used to
    reach kernels that refuse, or crash on, empty tensors)."""
    torch._dynamo.reset()
    layer = FastPreciseBN2d(3).to(DEVICE)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(0, 3, 4, 4, device=DEVICE, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert (layer.running_mean == 0).all() and (layer.running_var == 1).all()
    assert (layer.weight.grad == 0).all() and (layer.bias.grad == 0).all()
