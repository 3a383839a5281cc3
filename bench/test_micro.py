"""CPU micro-benchmarks (pytest-benchmark): ``pytest bench/ --benchmark-only``
(``FASTPBN_BENCH_THREADS=1`` for steadier numbers on a shared host).

fastpbn against stock PyTorch on the same tensors, grouped so that each table compares like
with like. Not collected by the test suite (testpaths = tests). On CPU fastpbn runs its
``torch`` backend (PyTorch ops behind fastpbn's dispatch): these numbers do not measure the
Triton kernels.
"""

import copy
import warnings

import fvcore.nn
import pytest
import torch
from torch import nn

import fastpbn
from fastpbn.models import SmallCNN, resnet50
from fastpbn.precise import recompute_bn_stats
from fastpbn.reference import batch_stats_reference

SHAPES = [(8, 64, 28, 28), (4096, 32, 1, 1)]  # a ResNet-like map; BatchNorm1d-like
# warm-up calls first: one-time costs (lazy imports, allocator growth) are not what we measure
pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=3)


def _x(shape, requires_grad=False):
    return (torch.randn(shape) * 2.0 + 5.0).requires_grad_(requires_grad)  # mean far from 0


def _bn(kind, c):
    return fastpbn.FastPreciseBN2d(c) if kind == "fastpbn" else nn.BatchNorm2d(c)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", ["fastpbn", "torch-var_mean"])
def test_stats(benchmark, impl, shape):
    benchmark.group = f"stats {shape}"
    x = _x(shape)
    if impl == "fastpbn":
        mean, var, _ = benchmark(fastpbn.batch_stats, x)
    else:
        var, mean = benchmark(torch.var_mean, x, dim=[0, 2, 3], correction=0)
    ref_mean, ref_var, _ = batch_stats_reference(x)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", ["fastpbn", "torch-eager"])
def test_forward_train(benchmark, impl, shape):
    benchmark.group = f"forward train {shape}"
    x, bn = _x(shape, True), _bn(impl, shape[1])
    y = benchmark(bn, x)
    assert y.shape == x.shape


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", ["fastpbn", "torch-eager"])
def test_forward_backward_train(benchmark, impl, shape):
    benchmark.group = f"forward+backward train {shape}"
    x, bn = _x(shape, True), _bn(impl, shape[1])
    dy = torch.randn(shape)
    dx, dw, db = benchmark(lambda: torch.autograd.grad(bn(x), [x, bn.weight, bn.bias], dy))
    torch.testing.assert_close(db, dy.sum((0, 2, 3)), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("impl", ["fastpbn", "fvcore", "torch-swa-update_bn"])
def test_recompute_small_cnn(benchmark, impl):
    benchmark.group = "recompute small CNN, 16 batches of 8"
    torch.manual_seed(0)
    model = SmallCNN(3, 10, 16).eval()
    data = [torch.randn(8, 3, 32, 32) * 2.0 + 3.0 for _ in range(16)]

    def run():
        m = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # batch 8 is below the recommended 32, on purpose
            if impl == "fastpbn":
                recompute_bn_stats(m, data)
            elif impl == "fvcore":
                fvcore.nn.update_bn_stats(m.train(), data, num_iters=len(data))
            else:
                torch.optim.swa_utils.update_bn(data, m)
        return m

    m = benchmark(run)
    assert not torch.equal(m.features[1].running_mean, model.features[1].running_mean)


def _stage1(name, module):
    return name.startswith(("bn1", "layer1."))


@pytest.mark.parametrize("stop_early", [True, False], ids=["stop_early", "full forward"])
def test_recompute_stop_early(benchmark, stop_early):
    """A selection that ends early in the model (stem and stage 1 of a ResNet-50): the pass
    ends each forward after the last selected layer unless told not to."""
    benchmark.group = "recompute ResNet-50 width 16, stem + stage 1 selected, 4 batches of 16"
    torch.manual_seed(0)
    model = resnet50(10, width=16).eval()
    data = [torch.randn(16, 3, 64, 64) * 2.0 + 3.0 for _ in range(4)]
    stats = benchmark(recompute_bn_stats, model, data, layers=_stage1, stop_early=stop_early,
                      apply=False)
    assert len(stats) == 11


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_forward_context(benchmark, mode):
    """The pass runs the model under no_grad, not inference_mode (tensors a model caches must
    stay usable afterwards): what that costs on a ResNet-50 forward."""
    benchmark.group = "ResNet-50 width 16 forward, 4 batches of 16, BN on batch statistics"
    torch.manual_seed(0)
    model = resnet50(10, width=16).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    data = [torch.randn(16, 3, 64, 64) * 2.0 + 3.0 for _ in range(4)]
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode

    def run():
        with ctx():
            return [model(x) for x in data]

    out = benchmark(run)
    assert len(out) == 4 and not out[0].requires_grad
