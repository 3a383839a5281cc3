"""Backend dispatch: env knob read at call time, explicit backends never fall back silently."""

import os
import subprocess
import sys

import pytest
import torch

import fastpbn
from fastpbn._backend import BackendUnavailable, get_backend

from .conftest import HAS_CUDA, HAS_TRITON


def test_import_compiles_nothing_and_skips_triton():
    code = "import sys, fastpbn; print('triton' in sys.modules, 'fastpbn.kernels' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_auto_is_torch_on_cpu_even_with_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert get_backend(torch.ones(2, 3)).name == "torch"


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_env_is_read_at_call_time(monkeypatch):
    x = torch.randn(4, 3, 2)
    monkeypatch.setenv("FASTPBN_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="'cuda' cannot run.*not CUDA"):
        fastpbn.batch_stats(x)
    monkeypatch.setenv("FASTPBN_BACKEND", "torch")
    assert fastpbn.batch_stats(x)[2] == 8
    monkeypatch.setenv("FASTPBN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTPBN_BACKEND='bogus'"):
        fastpbn.batch_stats(x)


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_forced_backend_raises_its_reasons(monkeypatch):
    x = torch.randn(4, 3, 2)
    fastpbn.set_backend("cuda")
    with pytest.raises(BackendUnavailable, match="not CUDA"):
        fastpbn.FastPreciseBN1d(3)(x)
    fastpbn.set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        fastpbn.batch_norm(x, None, None, training=True)
    with pytest.raises(BackendUnavailable, match="dtype torch.int64"):
        get_backend(torch.ones(2, 3, dtype=torch.int64), "triton")
    with pytest.raises(ValueError, match="unknown backend"):
        fastpbn.set_backend("cudnn")


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA, reason="needs triton, CPU-only behaviour")
def test_triton_selectable_on_cpu_with_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert get_backend(torch.ones(2, 3), "triton").name == "triton"


def test_info_cli():
    out = subprocess.run(
        [sys.executable, "-m", "fastpbn", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert torch.__version__ in out
    assert "<- auto" in out and "torch" in out and "triton" in out and "cuda" in out
    # a bad FASTPBN_BACKEND is what info is for: reported, not a traceback
    env = dict(os.environ, FASTPBN_BACKEND="bogus")
    out = subprocess.run([sys.executable, "-m", "fastpbn", "info"], capture_output=True,
                         text=True, check=True, env=env).stdout
    assert "requested backend  invalid: FASTPBN_BACKEND='bogus'" in out


def test_triton_installation_is_looked_up_once(monkeypatch):
    """Dispatch asks the Triton backend on every call; whether triton is installed is looked up
    once (a ``find_spec`` miss costs ~40 µs, which the CUDA fallback would pay per BN call)."""
    import importlib.util

    from fastpbn import _backend

    calls = []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: calls.append(name) or real(name, *a))
    _backend._triton_installed.cache_clear()
    try:
        x = torch.ones(2, 3)
        for _ in range(5):
            _backend._INSTANCES["triton"].not_supported_reasons(x)
        assert calls.count("triton") == 1
    finally:
        _backend._triton_installed.cache_clear()


def test_torch_backend_keeps_every_tensor_on_a_non_cpu_device():
    """The torch backend's path for other devices (CUDA, MPS; here the meta device stands in):
    every tensor it passes to PyTorch's kernels, unused outputs included, is on x's device."""
    from fastpbn import _torch_ops

    x = torch.empty(4, 3, 5, 5, device="meta")
    w, b, rm, rv = (torch.empty(3, device="meta") for _ in range(4))
    acc = tuple(torch.empty(3, dtype=torch.float64, device="meta") for _ in range(3))
    y, mean, invstd = _torch_ops.forward_train(x, w, b, rm, rv, None, 0.1, 1e-5, acc)
    assert y.device.type == mean.device.type == "meta" and y.shape == x.shape
    dx, dw, db = _torch_ops.backward(torch.empty_like(y), x, w, mean, invstd, False,
                                     (True, True, True))
    assert dx.device.type == "meta" and dx.shape == x.shape


@pytest.mark.gpu
def test_auto_hands_eager_cuda_calls_to_stock_only_where_nothing_is_lost(monkeypatch):
    """Under auto, eager CUDA calls without an accumulator run PyTorch's kernel and autograd
    (faster there: see fastpbn.ops.STOCK_EAGER_ON_CUDA), with stock's results; fastpbn's own
    path keeps the accumulator, momentum=None, a named backend, and dtypes PyTorch refuses."""
    import fastpbn.ops

    monkeypatch.setattr(fastpbn.ops, "STOCK_EAGER_ON_CUDA", True)
    x = (torch.randn(8, 6, 5, 5, device="cuda") * 3 + 7).requires_grad_()

    def step(momentum=0.1, dtype=None, accumulator=None):
        bn = fastpbn.FastPreciseBN2d(6, momentum=momentum).cuda()
        bn.accumulator = accumulator
        ref = torch.nn.BatchNorm2d(6, momentum=momentum).cuda()
        if dtype is not None:
            bn.weight.data, bn.bias.data = bn.weight.data.to(dtype), bn.bias.data.to(dtype)
        y = bn(x.to(dtype) if dtype else x)
        torch.testing.assert_close(y.float(), ref(x), atol=2e-2 if dtype else 1e-5, rtol=1e-3)
        tol = dict(atol=1e-3, rtol=1e-3) if dtype else {}  # x rounded to bfloat16
        torch.testing.assert_close(bn.running_mean, ref.running_mean, **tol)
        return type(y.grad_fn).__name__

    assert "BatchNormTrain" not in step()  # stock (cuDNN or native) node
    acc = fastpbn.WelfordState(6, device="cuda")
    assert "BatchNormTrain" in step(accumulator=acc)
    assert acc.count[0].item() == 200
    assert "BatchNormTrain" in step(momentum=None)
    assert "BatchNormTrain" in step(dtype=torch.bfloat16)  # bf16 params, float32 stats
    # fastpbn's kernels where they beat PyTorch's: NCHW with >= 512K values per channel
    big = fastpbn.FastPreciseBN2d(1).cuda()
    x_big = torch.randn(2, 1, 512, 512, device="cuda", requires_grad=True)
    assert "BatchNormTrain" in type(big(x_big).grad_fn).__name__
    x_cl = x_big.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert "BatchNormTrain" not in type(big(x_cl[:, :, 1:]).grad_fn).__name__
    fastpbn.set_backend("triton" if HAS_TRITON else "cuda")
    assert "BatchNormTrain" in step()


def test_a_call_handed_to_stock_resolves_no_backend(monkeypatch):
    """The hand-off decision comes before backend resolution (whose checks, and a first build
    of the CUDA extension, a handed-off call does not need); calls it does not take resolve
    the backend as before. Simulated on the CPU: the rule itself is CUDA-only (GPU test
    above)."""
    import fastpbn.ops

    asked, resolved = [], []
    get_backend = fastpbn.ops.get_backend
    monkeypatch.setattr(fastpbn.ops, "_stock_serves",
                        lambda x, training, *p: asked.append(training) or True)
    monkeypatch.setattr(fastpbn.ops, "get_backend",
                        lambda x, *a: resolved.append(1) or get_backend(x, *a))
    bn = fastpbn.FastPreciseBN2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    assert "BatchNormTrain" not in type(bn(x).grad_fn).__name__
    assert (asked, resolved) == ([True], [])
    bn.eval()
    bn(x)
    assert (asked, resolved) == ([True, False], [])
    bn.train()
    bn.accumulator = fastpbn.WelfordState(3)  # never handed off
    bn(x)
    assert len(asked) == 2 and resolved == [1] and bn.accumulator.count[0] == 100
    assert int(bn.num_batches_tracked) == 2
