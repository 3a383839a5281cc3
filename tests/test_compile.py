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
        g = torch.randn_like(ye)
        (ye * g).sum().backward()
        (yc * g).sum().backward()
        for (name, pe), pc in zip(eager.named_parameters(), compiled_model.parameters()):
            close(pc.grad, pe.grad, f"grad of {name}, step {step}")
        for (name, be), bc in zip(eager.named_buffers(), compiled_model.buffers()):
            close(bc, be, f"buffer {name}, step {step}")
        eager.zero_grad(), compiled_model.zero_grad()
    eager.eval(), compiled_model.eval()
    x = torch.randn(4, 3, 8, 8, device=DEVICE) * 2 + 50
    close(compiled(x), eager(x), "eval output")
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
    # 3 BN layers x 2 steps in each of eager and compiled, then one eval call each
    assert calls.count("forward_train") == 12 and calls.count("backward") == 12
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
    g = torch.randn_like(ye)
    (ye * g).sum().backward()
    (yc * g).sum().backward()
    for (name, pe), pc in zip(eager.named_parameters(), model.parameters()):
        close(pc.grad, pe.grad, f"grad of {name}")
    for (name, be), bc in zip(eager.named_buffers(), model.buffers()):
        close(bc, be, f"buffer {name}")
    for f in ("count", "mean", "m2"):
        close(getattr(model[4].accumulator, f), getattr(eager[4].accumulator, f), f)
