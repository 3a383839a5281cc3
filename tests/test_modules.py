"""FastPreciseBN1d/2d/3d against stock nn.BatchNorm* and the float64 reference, on every
backend that can run here (torch always; triton through its interpreter on CPU)."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fastpbn
from fastpbn import FastPreciseBN1d, FastPreciseBN2d, FastPreciseBN3d
from fastpbn.reference import batch_norm_reference, batch_stats_reference

from .conftest import DEVICE

STOCK = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
OURS = {1: FastPreciseBN1d, 2: FastPreciseBN2d, 3: FastPreciseBN3d}


def shifted(*shape, mean=50.0, std=3.0, channels_last=False):
    """Random data far from zero (where wrong formulas break), fresh per call."""
    x = torch.randn(*shape, device=DEVICE) * std + mean
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x


def make_pair(dims, c, **kw):
    torch.manual_seed(1)
    stock = STOCK[dims](c, **kw).to(DEVICE)
    if stock.affine:  # non-trivial affine parameters
        with torch.no_grad():
            stock.weight.uniform_(0.5, 1.5)
            stock.bias.uniform_(-1, 1)
    ours = OURS[dims](c, **kw).to(DEVICE)
    ours.load_state_dict(stock.state_dict())
    return stock, ours


def assert_close(a, b, tol, what):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, msg=what)


def check_step(stock, ours, x, grad_mode="sum"):
    """One forward+backward through both modules; compare outputs, gradients and buffers with
    stock and the output and gradients with the float64 reference."""
    xs = x.detach().clone().requires_grad_()
    xo = x.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    bn_training = stock.training or stock.running_mean is None
    use_buf = not stock.training or stock.track_running_stats
    rm0 = stock.running_mean.clone() if stock.running_mean is not None else None
    rv0 = stock.running_var.clone() if stock.running_var is not None else None
    w = stock.weight.detach().clone().requires_grad_() if stock.affine else None
    b = stock.bias.detach().clone().requires_grad_() if stock.affine else None
    momentum = stock.momentum
    if momentum is None and stock.training and stock.track_running_stats:
        momentum = 1.0 / (float(stock.num_batches_tracked) + 1)
    ys, yo = stock(xs), ours(xo)
    yr, rm, rv = batch_norm_reference(
        xr, rm0 if use_buf else None, rv0 if use_buf else None, w, b, bn_training,
        momentum or 0.0, stock.eps,
    )
    assert yo.shape == ys.shape and yo.dtype == ys.dtype
    assert yo.is_contiguous(memory_format=torch.channels_last) == ys.is_contiguous(
        memory_format=torch.channels_last
    ) or x.dim() != 4
    g = torch.randn_like(yr) if grad_mode == "randn" else None
    for y in (ys, yo, yr):
        (y.sum() if g is None else (y * g.to(y.dtype)).sum()).backward()
    assert_close(yo, yr, 1e-4, "output vs float64 reference")
    assert_close(yo, ys, 1e-4, "output vs stock")
    assert_close(xo.grad, xr.grad, 1e-3, "input grad vs float64 reference")
    assert_close(xo.grad, xs.grad, 1e-3, "input grad vs stock")
    if stock.affine:
        assert_close(ours.weight.grad, w.grad, 1e-3, "weight grad vs reference")
        assert_close(ours.bias.grad, b.grad, 1e-3, "bias grad vs reference")
        assert_close(ours.weight.grad, stock.weight.grad, 1e-3, "weight grad vs stock")
    if stock.track_running_stats:
        assert torch.equal(ours.num_batches_tracked, stock.num_batches_tracked)
        assert_close(ours.running_mean, stock.running_mean, 1e-5, "running_mean vs stock")
        assert_close(ours.running_var, stock.running_var, 1e-5, "running_var vs stock")
        if rm is not None:
            assert_close(ours.running_mean, rm, 1e-5, "running_mean vs reference")
            assert_close(ours.running_var, rv, 1e-5, "running_var vs reference")
    else:
        assert ours.running_mean is None and ours.num_batches_tracked is None
    for m in (stock, ours):
        m.zero_grad(set_to_none=True)


SHAPES = {
    1: [(6, 3), (5, 3, 7)],
    2: [(4, 3, 5, 6)],
    3: [(2, 3, 3, 4, 2)],
}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_steps_then_eval(backend, dims, affine, track, momentum):
    stock, ours = make_pair(dims, 3, affine=affine, track_running_stats=track, momentum=momentum)
    for shape in SHAPES[dims]:
        for step in range(2):  # several steps: running buffers and num_batches_tracked
            check_step(stock, ours, shifted(*shape), "randn" if step else "sum")
    stock.eval(), ours.eval()
    check_step(stock, ours, shifted(*SHAPES[dims][0]), "randn")


@pytest.mark.parametrize(
    "shape, channels_last",
    [
        ((1, 3, 4, 5), False),  # N = 1: statistics over spatial only
        ((7, 3, 1, 1), False),  # 1x1 spatial: statistics over the batch only
        ((3, 5, 7, 3), False),  # odd sizes
        ((3, 4, 5, 3), True),  # channels_last
        ((2, 4, 1, 1), True),  # channels_last with 1x1 spatial (ambiguous strides)
        ((2, 1, 3, 3), False),  # a single channel
    ],
)
def test_shapes_and_layouts(backend, shape, channels_last):
    stock, ours = make_pair(2, shape[1])
    check_step(stock, ours, shifted(*shape, channels_last=channels_last), "randn")
    stock.eval(), ours.eval()
    check_step(stock, ours, shifted(*shape, channels_last=channels_last), "sum")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_large_cpu_training_steps(channels_last, momentum):
    """Large NCHW activations take the torch backend's centred path on CPU (training forward
    without PyTorch's kernel; channels_last keeps it): outputs, gradients and running stats
    still match."""
    import fastpbn
    from fastpbn import _torch_ops

    fastpbn.set_backend("torch")
    shape = (16, 16, 32, 32)
    # pinned to the CPU (the centred path is CPU-only; on CUDA tensors native_train is True)
    assert _torch_ops.native_train(shifted(*shape, channels_last=True).cpu())
    assert not _torch_ops.native_train(shifted(*shape).cpu())
    stock, ours = (m.cpu() for m in make_pair(2, 16, momentum=momentum))
    for _ in range(2):
        check_step(stock, ours, shifted(*shape, channels_last=channels_last).cpu(), "randn")
    # the eval reference uses stock's buffers, and stock's channels_last kernel rounds the mean
    # to ~5e-7 of its value (ours: 1e-8 vs float64): compare eval math on equal buffers
    ours.load_state_dict(stock.state_dict())
    stock.eval(), ours.eval()
    check_step(stock, ours, shifted(*shape, channels_last=channels_last).cpu(), "sum")


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (4, 4, 130, 130)])  # small; centred path
@pytest.mark.parametrize("accumulate", [False, True])
def test_float64_matches_stock_float64(shape, accumulate):
    """float64 layers (torch backend) keep float64 statistics for backward and the running
    stats, with and without an accumulator: outputs, gradients and buffers equal stock float64
    to ~1e-12."""
    fastpbn.set_backend("torch")
    torch.manual_seed(0)
    stock = nn.BatchNorm2d(shape[1]).double()
    ours = FastPreciseBN2d(shape[1]).double()
    if accumulate:
        ours.accumulator = fastpbn.WelfordState(shape[1])
    x = (torch.randn(*shape, dtype=torch.float64) * 1e-3 + 1.0).requires_grad_()
    g = torch.randn(*shape, dtype=torch.float64)
    ys, yo = stock(x), ours(x)
    (gs,), (go,) = (torch.autograd.grad(y, x, g) for y in (ys, yo))
    torch.testing.assert_close(yo, ys, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(go, gs, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.running_mean, stock.running_mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(ours.running_var, stock.running_var, rtol=1e-12, atol=0)
    if shape[2] < 10:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(ours, (x,))


def test_inference_mode_then_normal_mode():
    """Buffers the torch backend reuses across calls (CPU scratch) must not become inference
    tensors: a training forward under ``torch.inference_mode`` and then outside it both work."""
    import fastpbn

    fastpbn.set_backend("torch")
    ours = make_pair(2, 16)[1].cpu()  # pinned to the CPU: the scratch buffers are CPU-only
    x = shifted(16, 16, 32, 32).cpu()  # large enough for the centred CPU path (scratch buffers)
    assert not fastpbn._torch_ops.native_train(x)
    with torch.inference_mode():
        y_inf = ours(x)
    y = ours(x)
    assert_close(y, y_inf, 0, "same output in and out of inference mode")
    assert int(ours.num_batches_tracked) == 2


def test_non_contiguous_input(backend):
    stock, ours = make_pair(2, 3)
    x = shifted(4, 6, 5, 8)[:, ::2, :, 1:7]  # strided channels and a cropped width
    assert not x.is_contiguous()
    check_step(stock, ours, x, "sum")


def test_expanded_gradient(backend):
    """The gradient of y.sum() has stride 0 everywhere."""
    _, ours = make_pair(2, 3)
    x = shifted(3, 3, 4, 4).requires_grad_()
    ours(x).sum().backward()
    # d(sum y)/dx is exactly zero for batch norm in training (the mean absorbs it)
    assert x.grad.abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input(backend, dtype):
    """fp16/bf16 input with fp32 parameters: error at most 2x stock's own error (+ atol)."""
    stock, ours = make_pair(2, 4)
    x = shifted(4, 4, 5, 5, mean=5.0, std=2.0).to(dtype)
    yr, _, _ = batch_norm_reference(
        x, stock.running_mean, stock.running_var, stock.weight, stock.bias, True, 0.1, 1e-5
    )
    try:
        ys = stock(x)
    except RuntimeError as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"stock BatchNorm2d does not run {dtype} here: {e}")
    yo = ours(x)
    assert yo.dtype == dtype
    stock_err = (ys.double() - yr).abs().max().item()
    our_err = (yo.double() - yr).abs().max().item()
    assert our_err <= 2 * stock_err + 1e-2, (our_err, stock_err)
    assert_close(ours.running_mean, stock.running_mean, 1e-2, "running_mean")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_model_with_accumulator(backend, dtype, channels_last):
    """A model cast to fp16/bf16 whole (parameters too) with an accumulator attached: forward
    and backward run, match the float64 reference like stock does, and the accumulated
    statistics are those of the low-precision input to ~1e-7."""
    torch.manual_seed(2)
    ours = FastPreciseBN2d(4).to(DEVICE, dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-1, 1)
    ours.accumulator = fastpbn.WelfordState(4, device=DEVICE)
    x = shifted(16, 4, 16, 16, mean=30.0, std=2.0, channels_last=channels_last).to(dtype)
    xo, xr = x.detach().requires_grad_(), x.detach().double().requires_grad_()
    w, b = (p.detach().double().requires_grad_() for p in (ours.weight, ours.bias))
    g = torch.randn(x.shape, device=DEVICE)
    yo = ours(xo)
    yr = batch_norm_reference(xr, None, None, w, b, True, 0.1, 1e-5)[0]
    (yo * g.to(dtype)).sum().backward()
    (yr * g.double()).sum().backward()
    assert yo.dtype == dtype and xo.grad.dtype == dtype and ours.weight.grad.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    assert_close(yo, yr, tol, "output vs float64 reference")
    assert_close(xo.grad, xr.grad, tol, "input grad vs float64 reference")
    assert_close(ours.weight.grad, w.grad, tol * 50, "weight grad vs float64 reference")
    assert_close(ours.bias.grad, b.grad, tol * 50, "bias grad vs float64 reference")
    _, var, _ = batch_stats_reference(xr)
    # Triton's interpreter sums a tile's rows one by one in float32 (numpy reduces a tile's
    # leading axis naively; a GPU sums in a tree): coarse bf16 data in long channels_last
    # tiles then reaches ~3e-6
    rtol = 1e-6 if backend == "torch" else 1e-5
    torch.testing.assert_close(ours.accumulator.var(False), var, rtol=rtol, atol=0)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("small", [False, True])
def test_checkpointed_layer_merges_each_batch_once(backend, use_reentrant, small):
    """Activation checkpointing reruns the forward inside the backward: the accumulator takes
    the batch once (it took it twice), while the running statistics update twice, as stock's
    do under checkpointing; the rerun takes the first run's path, so the gradients are stock's
    (a small input's rerun, without the merge, once went to PyTorch's kernel, whose saved
    tensors the first run's backward then read: dx off by 3.4)."""
    from torch.utils.checkpoint import checkpoint

    stock, ours = make_pair(2, 8)
    ours.accumulator = fastpbn.WelfordState(8, device=DEVICE)
    x = shifted(*((4, 8, 8, 8) if small else _served_shape(backend)), mean=3.0, std=2.0)
    g = torch.randn_like(x)
    grads = []
    for m in (stock, ours):
        xx = x.clone().requires_grad_()
        (checkpoint(m, xx, use_reentrant=use_reentrant) * g).sum().backward()
        grads.append((xx.grad, m.weight.grad, m.bias.grad))
    for a, b, what in zip(*grads, ("dx", "dweight", "dbias")):
        assert_close(b, a, 1e-4, what)
    mean, var, count = batch_stats_reference(x)
    assert ours.accumulator.count.tolist() == [count] * 8
    torch.testing.assert_close(ours.accumulator.mean, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.accumulator.var(False), var, rtol=1e-5, atol=1e-6)
    assert_close(ours.running_mean, stock.running_mean, 1e-5, "running_mean")
    assert_close(ours.running_var, stock.running_var, 1e-5, "running_var")
    assert ours.num_batches_tracked.item() == stock.num_batches_tracked.item() == 2


def test_state_dict_both_ways():
    stock, ours = make_pair(2, 5, momentum=None)
    stock.train()(shifted(4, 5, 3, 3))
    assert list(ours.state_dict()) == list(stock.state_dict())
    ours.load_state_dict(stock.state_dict())
    back = nn.BatchNorm2d(5, momentum=None).to(DEVICE)
    back.load_state_dict(ours.state_dict())
    for k, v in stock.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    fresh = FastPreciseBN2d(5, momentum=None).to(DEVICE)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh.num_batches_tracked, stock.num_batches_tracked)


def test_errors_match_stock():
    for dims in (1, 2, 3):
        stock, ours = make_pair(dims, 3)
        bad_dim = torch.randn(*(2,) * (dims + 3), device=DEVICE)  # one dim too many
        for m in (stock, ours):
            with pytest.raises(ValueError, match="expected"):
                m(bad_dim)
    stock, ours = make_pair(2, 3)
    wrong_c = shifted(2, 4, 3, 3)
    for m in (stock, ours):
        with pytest.raises(RuntimeError, match="should contain 4 elements not 3|3 elements"):
            m(wrong_c)
    one_value = shifted(1, 3, 1, 1)
    for m in (stock, ours):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            m(one_value)
    # stock counts the two failed calls; a failed call here takes back its increment
    assert stock.num_batches_tracked.item() == 2 and ours.num_batches_tracked.item() == 0


def test_functional_batch_norm_matches_torch(backend):
    x = shifted(4, 3, 5, 5)
    rm, rv = torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5
    w, b = torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)
    for training in (True, False):
        rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
        y1 = fastpbn.batch_norm(x, rm1, rv1, w, b, training, 0.3, 1e-3)
        y2 = torch.nn.functional.batch_norm(x, rm2, rv2, w, b, training, 0.3, 1e-3)
        assert_close(y1, y2, 1e-4, f"F.batch_norm training={training}")
        assert_close(rm1, rm2, 1e-5, "running_mean")
        assert_close(rv1, rv2, 1e-5, "running_var")
    with pytest.raises(ValueError, match="eps"):
        fastpbn.batch_norm(x, None, None, training=True, eps=0.0)
    for fn in (fastpbn.batch_norm, torch.nn.functional.batch_norm):  # the same error type
        with pytest.raises(RuntimeError, match="running_mean"):
            fn(x, None, None, training=False)
        no_channels = fn(torch.randn(4, 0, 3, device=DEVICE), None, None, training=True)
        assert no_channels.shape == (4, 0, 3)
        with pytest.raises(TypeError, match="momentum"):
            fn(x, None, None, training=True, momentum=None)


@pytest.mark.parametrize("numel", ["small", "large"])  # large: the torch backend's own path
def test_functional_one_running_statistic_is_refused(backend, numel):
    """Running stats are both given or both None, as F.batch_norm checks: nothing written."""
    x = shifted(*((4, 3, 5, 5) if numel == "small" else (16, 4, 64, 64)))
    c = x.shape[1]
    for rm, rv in ((None, torch.ones(c, device=DEVICE)), (torch.zeros(c, device=DEVICE), None)):
        kept = [t.clone() for t in (rm, rv) if t is not None]
        for fn in (fastpbn.batch_norm, torch.nn.functional.batch_norm):
            with pytest.raises(ValueError, match="both be None or neither"):
                fn(x, rm, rv, training=True)
        assert torch.equal(next(t for t in (rm, rv) if t is not None), kept[0])


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (8, 4, 130, 130)])
def test_float64_bias_gradient_without_weight(shape):
    """A float64 bias without a weight gets its gradient in float64 (it was rounded through
    float32 on fastpbn's own path: 4e-8 off where stock is at 1e-16)."""
    fastpbn.set_backend("torch")
    x = torch.randn(*shape, dtype=torch.float64)
    g = torch.randn_like(x) + 1 / 3
    grads = []
    for fn in (fastpbn.batch_norm, torch.nn.functional.batch_norm):
        b = torch.zeros(shape[1], dtype=torch.float64, requires_grad=True)
        fn(x, None, None, None, b, training=True).backward(g)
        grads.append(b.grad)
    torch.testing.assert_close(grads[0], g.sum((0, 2, 3)), rtol=1e-13, atol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-13, atol=1e-10)


def test_batch_stats_against_reference(backend):
    from fastpbn.reference import batch_stats_reference

    x = shifted(5, 4, 3, 7, mean=1e4, std=1.0)
    mean, var, n = fastpbn.batch_stats(x)
    rmean, rvar, rn = batch_stats_reference(x)
    assert n == rn == 5 * 3 * 7
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), rmean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), rvar, rtol=1e-3, atol=0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, momentum=None)
        self.seq = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False))
        self.bn3 = nn.BatchNorm3d(2, track_running_stats=False)
        self.sync = nn.SyncBatchNorm(4)

    def forward(self, x):
        return self.seq(self.bn(self.conv(x)).mean((2, 3)))


def test_convert_model():
    model = Net().to(DEVICE)
    model.bn.weight.requires_grad_(False)
    model.seq.train(False)
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    x = shifted(4, 3, 6, 6)
    expected = copy.deepcopy(model)(x)
    with pytest.warns(UserWarning, match=r"left 1 BN layer.*\(1 SyncBatchNorm\)"):
        converted = fastpbn.convert_model(model)
    assert converted is model
    assert type(model.bn) is FastPreciseBN2d
    assert type(model.seq[1]) is FastPreciseBN1d
    assert type(model.bn3) is FastPreciseBN3d
    assert type(model.sync) is nn.SyncBatchNorm  # documented: left alone
    assert model.bn.weight is params["bn.weight"] and not model.bn.weight.requires_grad
    assert model.seq[1].training is False and model.bn.training is True
    assert model.bn.momentum is None and model.seq[1].affine is False
    assert model.bn3.track_running_stats is False and model.bn3.running_mean is None
    for n, b in model.named_buffers():
        assert b is buffers[n], n
    assert_close(model(x), expected, 1e-4, "converted model output")
    root = fastpbn.convert_model(nn.BatchNorm2d(3).double())
    assert type(root) is FastPreciseBN2d and root.weight.dtype == torch.float64


def test_convert_model_counts_the_bn_layers_it_leaves():
    """BN subclasses with a forward of their own (timm's BatchNormAct2d fuses an activation)
    and lazy layers stay as they are: a model made of them would otherwise be converted
    without a word and run none of fastpbn."""

    class BatchNormAct2d(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    class Mine(FastPreciseBN2d):  # runs fastpbn already, as a parametrized layer does
        pass

    model = nn.Sequential(BatchNormAct2d(3), BatchNormAct2d(3), nn.LazyBatchNorm2d(),
                          nn.BatchNorm2d(3), FastPreciseBN2d(3), Mine(3))
    with pytest.warns(UserWarning, match=r"left 3 BN layer.*\(2 BatchNormAct2d, 1 "
                                         r"LazyBatchNorm2d\)"):
        fastpbn.convert_model(model)
    assert [type(m) for m in model] == [BatchNormAct2d, BatchNormAct2d, nn.LazyBatchNorm2d,
                                        FastPreciseBN2d, FastPreciseBN2d, Mine]
    parametrized = fastpbn.convert_model(nn.Sequential(nn.BatchNorm1d(3), nn.Conv2d(1, 1, 1)))
    torch.nn.utils.parametrize.register_parametrization(parametrized[0], "weight", nn.Identity())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpbn.convert_model(parametrized)


def test_revert_model_for_fusion_and_pickling():
    """revert_model switches the layers back to stock in place: conv-BN fusion, which looks
    layers up by exact type, accepts them, and a pickled model names no fastpbn class."""
    torch.manual_seed(5)
    stock = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).to(DEVICE)
    stock(shifted(8, 3, 6, 6))  # running statistics worth keeping
    model = fastpbn.convert_model(copy.deepcopy(stock)).eval()
    model[1].accumulator = fastpbn.WelfordState(4, DEVICE)
    bn = model[1]
    assert fastpbn.revert_model(model) is model and model[1] is bn
    assert type(bn) is nn.BatchNorm2d and "accumulator" not in bn.__dict__
    buf = io.BytesIO()
    torch.save(model, buf)
    assert b"fastpbn" not in buf.getvalue()
    x = shifted(2, 3, 6, 6)
    fused = torch.ao.quantization.fuse_modules(copy.deepcopy(model), [["0", "1"]])
    torch.testing.assert_close(fused(x), stock.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_torchscript_runs_the_stock_kernel(momentum):
    """A converted model still scripts (as stock BatchNorm does); under TorchScript the layer
    runs PyTorch's own kernel: outputs and buffers equal stock's, in training and eval."""
    torch.manual_seed(3)
    stock = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum),
                          nn.ReLU()).to(DEVICE)
    scripted = torch.jit.script(fastpbn.convert_model(copy.deepcopy(stock)))
    for train in (True, True, False):
        stock.train(train), scripted.train(train)
        x = shifted(4, 3, 8, 8)
        torch.testing.assert_close(scripted(x), stock(x))
    for name, buf in stock.named_buffers():
        torch.testing.assert_close(getattr(scripted[1], name.split(".")[1]), buf)
    layer = FastPreciseBN2d(4)
    layer.accumulator = None  # an instance attribute TorchScript cannot type: ignored
    torch.jit.script(layer)
    layer.accumulator = fastpbn.WelfordState(4)
    with pytest.raises(RuntimeError, match="accumulator"):
        torch.jit.script(layer)


def test_convert_model_keeps_shared_layers_and_hooks():
    """Conversion switches each layer's class in place: a layer shared by two parents stays
    one layer, and its hooks and extra attributes stay with it."""
    bn = nn.BatchNorm2d(3).to(DEVICE)
    seen = []
    bn.register_forward_hook(lambda m, args, out: seen.append(type(m)))
    bn.tag = "stem"
    model = nn.ModuleDict({"a": bn, "b": nn.Sequential(bn)})
    fastpbn.convert_model(model)
    assert model["a"] is model["b"][0] is bn and type(bn) is FastPreciseBN2d
    assert bn.tag == "stem"
    model["b"](shifted(4, 3, 5, 5))
    assert seen == [FastPreciseBN2d]
    assert bn.num_batches_tracked.item() == 1


def _served_shape(backend):
    """A shape fastpbn's own path serves: the torch backend hands smaller eager inputs to
    PyTorch's kernel (and C++ autograd) itself; the interpreted Triton kernels are slow."""
    return (8, 8, 64, 64) if backend == "torch" else (4, 8, 5, 6)


def test_jit_trace_records_the_stock_kernel(backend):
    """torch.jit.trace sees PyTorch's own ops only: a converted model records PyTorch's
    kernel, so the graph updates the running stats once a call and matches stock (it used to
    update them twice), and traces without warnings, as stock does (fastpbn's size checks
    raised TracerWarnings)."""
    torch.manual_seed(4)
    stock = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU()).to(DEVICE)
    ours = fastpbn.convert_model(copy.deepcopy(stock))
    xs = [shifted(*_served_shape(backend)) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        graph = torch.jit.trace(ours, xs[0], check_trace=False)
        eval_graph = torch.jit.trace(copy.deepcopy(ours).eval(), xs[0], check_trace=False)
    stock(xs[0])  # tracing ran the forward once
    stock_after_first = copy.deepcopy(stock).eval()
    for x in xs[1:]:
        torch.testing.assert_close(graph(x), stock(x))
    state = graph.state_dict()
    for name, buf in stock.state_dict().items():
        torch.testing.assert_close(state[name], buf, msg=name)
    torch.testing.assert_close(eval_graph(xs[1]), stock_after_first(xs[1]))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fx_records_the_layer_as_a_module_call(backend, momentum):
    """torch.fx.symbolic_trace keeps a stock BN layer a leaf (one call_module node); it traced
    into FastPreciseBN layers and baked the trace's mode into the graph, so a graph traced in
    training kept normalizing with batch statistics after .eval() (FX quantization-aware
    training shipped such graphs). Now the graph calls the layer: the mode is the layer's at
    run time, the state_dict is stock's, momentum=None and an accumulator work."""
    torch.manual_seed(4)
    stock = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, momentum=momentum),
                          nn.ReLU()).to(DEVICE)
    ours = fastpbn.convert_model(copy.deepcopy(stock))
    graphs = [torch.fx.symbolic_trace(m.train()) for m in (stock, ours)]
    assert [(n.op, n.target) for n in graphs[1].graph.nodes] == \
        [(n.op, n.target) for n in graphs[0].graph.nodes]
    assert ("call_module", "1") in [(n.op, n.target) for n in graphs[1].graph.nodes]
    ours[1].accumulator = fastpbn.WelfordState(8, DEVICE)
    xs = [shifted(*_served_shape(backend)) for _ in range(3)]
    for x in xs:
        torch.testing.assert_close(graphs[1](x), graphs[0](x))
    assert ours[1].accumulator.count[0].item() == 3 * xs[0].numel() // 8
    for g in graphs:
        g.eval()
    torch.testing.assert_close(graphs[1](xs[0][:2] + 5), graphs[0](xs[0][:2] + 5))
    ref, got = graphs[0].state_dict(), graphs[1].state_dict()
    assert list(got) == list(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], msg=name)


def test_fx_tracer_that_traces_into_every_module(backend):
    """A tracer that flattens every module (no leaves; stock BN's input checks stop it) gets
    F.batch_norm with the trace's mode from FastPreciseBN layers, which then cannot carry an
    accumulator or momentum=None (the graph could not update them)."""

    class Flat(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return False

    torch.manual_seed(4)
    stock = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU()).to(DEVICE)
    ours = fastpbn.convert_model(copy.deepcopy(stock))
    graph = torch.fx.GraphModule(ours, Flat().trace(ours))
    assert torch.nn.functional.batch_norm in [n.target for n in graph.graph.nodes]
    for x in [shifted(*_served_shape(backend)) for _ in range(2)]:
        torch.testing.assert_close(graph(x), stock(x))
    torch.testing.assert_close(ours[1].running_var, stock[1].running_var)
    with pytest.raises(RuntimeError, match="momentum=None"):
        Flat().trace(FastPreciseBN2d(8, momentum=None))
    ours[1].accumulator = fastpbn.WelfordState(8, DEVICE)
    with pytest.raises(RuntimeError, match="accumulator"):
        Flat().trace(ours)


def test_fx_quantization_aware_training_gives_batch_independent_int8_model():
    """FX quantization-aware training (prepare_qat_fx then convert_fx) of a converted model:
    its int8 model's output for a sample does not depend on the rest of the batch (the BN
    graph traced in training mode used to keep normalizing with batch statistics)."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping, quantize_fx

    engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "qnnpack"
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip("no quantized engine")
    torch.manual_seed(0)
    model = fastpbn.convert_model(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).train()
    data = [torch.randn(16, 3, 10, 10) * 2 + 1 for _ in range(4)]
    prepared = quantize_fx.prepare_qat_fx(model, get_default_qat_qconfig_mapping(engine),
                                          (data[0],))
    for x in data:
        prepared(x)
    int8 = quantize_fx.convert_fx(prepared.eval())
    x = data[0][:4] + 5
    torch.testing.assert_close(int8(x)[:1], int8(x[:1]), rtol=0, atol=0)


def test_torch_func_transforms_and_forward_ad(backend):
    """torch.func (vmap / grad / jvp) and forward-mode AD run through PyTorch's kernel, as with
    stock BN (a Python autograd.Function has no batching or forward-derivative rule)."""
    from torch.func import functional_call, grad, jvp, replace_all_batch_norm_modules_, vmap

    shape = _served_shape(backend)
    for track in (True, False):
        stock, ours = make_pair(2, 8, track_running_stats=track)
        if track:  # per-sample gradients need the stats off, as stock documents
            replace_all_batch_norm_modules_(stock), replace_all_batch_norm_modules_(ours)
        xb, tangent_in = shifted(2, *shape), torch.randn(shape, device=DEVICE)
        params = {k: v.detach() for k, v in stock.named_parameters()}
        outs = []
        for m in (stock, ours):
            per_sample = vmap(grad(lambda p, x, m=m: functional_call(m, p, (x,)).square().sum()),
                              in_dims=(None, 0))(params, xb)
            y, t = jvp(m, (xb[0],), (torch.ones_like(xb[0]),))
            with torch.autograd.forward_ad.dual_level():
                dual = torch.autograd.forward_ad.make_dual(xb[1], tangent_in)
                tangent = torch.autograd.forward_ad.unpack_dual(m(dual)).tangent
            outs.append([per_sample["weight"], per_sample["bias"], y, t, tangent])
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("affine", [True, False, "frozen"])
def test_double_backward(backend, train, affine):
    """backward(create_graph=True) (a gradient penalty): the second-order gradients equal
    stock's, on every backend; without a weight or with a frozen one too, where in eval dx
    depends on nothing that requires grad (stock's still has a graph, zero derivatives)."""
    stock, ours = make_pair(2, 8, affine=bool(affine))
    stock.train(train), ours.train(train)
    if affine == "frozen":
        for m in (stock, ours):
            m.requires_grad_(False)
        affine = False
    x = shifted(*_served_shape(backend), mean=1.0, std=2.0)
    v = torch.randn_like(x)
    grads = []
    for m in (stock, ours):
        xx = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad((m(xx) * v).sum(), xx, create_graph=True)
        # in eval dx does not depend on x: its second-order gradient is None, as stock's
        wrt = (xx, m.weight) if affine else (xx,)
        grads.append(torch.autograd.grad(gx.square().sum(), wrt, allow_unused=True))
    for i, (a, b) in enumerate(zip(*grads)):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    assert (grads[0][0] is None) == (not train)  # in eval dx does not depend on x


def test_empty_batch_and_output_layout(backend):
    """An empty batch returns an empty output as stock does; a permuted input gets stock's
    output layout (contiguous, or channels_last when the input is), not its own strides."""
    stock, ours = make_pair(2, 3)
    for m in (stock, ours):
        assert m(torch.randn(0, 3, 4, 4, device=DEVICE)).shape == (0, 3, 4, 4)
    torch.testing.assert_close(ours.running_mean, stock.running_mean)
    assert ours.num_batches_tracked.item() == stock.num_batches_tracked.item()
    sliced_last = shifted(2, 3, 4, 6, channels_last=True)[..., :5]
    for x in (shifted(2, 4, 5, 3).permute(0, 3, 2, 1), shifted(2, 5, 4, 3).permute(0, 3, 1, 2),
              sliced_last):
        for train in (True, False):
            stock.train(train), ours.train(train)
            ys, yo = stock(x), ours(x)
            assert yo.stride() == ys.stride(), (x.stride(), train)
            torch.testing.assert_close(yo, ys, rtol=1e-4, atol=1e-4)


def test_forward_ad_elsewhere_leaves_other_layers_on_fastpbn():
    """An open dual level routes only calls that carry dual tensors to PyTorch's kernel: a
    layer with an accumulator still accumulates a plain input meanwhile."""
    layer = FastPreciseBN2d(3).to(DEVICE)
    layer.accumulator = fastpbn.WelfordState(3, DEVICE)
    x = shifted(4, 3, 5, 5)
    with torch.autograd.forward_ad.dual_level():
        layer(x)
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="accumulator"):
            layer(dual)
    assert (layer.accumulator.count == 4 * 25).all()
    assert layer.num_batches_tracked.item() == 1  # the refused call is not counted


def test_a_refused_call_is_not_counted(backend):
    layer = FastPreciseBN2d(3).to(DEVICE).double()
    x = shifted(4, 3, 5, 5).double()
    if backend == "triton":  # float64 is refused by name
        with pytest.raises(fastpbn.BackendUnavailable):
            layer(x)
        assert layer.num_batches_tracked.item() == 0
    with pytest.raises(RuntimeError, match="should contain 4 elements not 3"):
        layer(shifted(4, 4, 5, 5).double())
    assert layer.num_batches_tracked.item() == 0 and (layer.running_mean == 0).all()


@pytest.mark.parametrize("accumulate", [False, True])
def test_parameter_dtypes_follow_stock(backend, accumulate):
    """Weight, bias and running stats share one dtype: the input's, or float32 for a
    float16/bfloat16 input. What stock refuses is refused by name, and leaves the layer as it
    was (the accumulating path used to cast the parameters silently)."""
    cases = [(torch.float64, torch.float32), (torch.float32, torch.float64),
             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)]
    for x_dtype, p_dtype in cases:
        stock = nn.BatchNorm2d(3).to(DEVICE, p_dtype)
        ours = FastPreciseBN2d(3).to(DEVICE, p_dtype)
        if accumulate:
            ours.accumulator = fastpbn.WelfordState(3, DEVICE)
        x = shifted(4, 3, 5, 5).to(x_dtype)
        with pytest.raises(RuntimeError):
            stock(x)
        with pytest.raises(RuntimeError, match=f"but input is {x_dtype}"):
            ours(x)
        assert ours.num_batches_tracked.item() == 0 and (ours.running_mean == 0).all()
        if accumulate:
            assert (ours.accumulator.count == 0).all()
    mixed = FastPreciseBN2d(3).to(DEVICE)
    mixed.bias.data = mixed.bias.double()
    with pytest.raises(RuntimeError, match="bias is torch.float64 but weight is"):
        mixed(shifted(4, 3, 5, 5))
    mixed = FastPreciseBN2d(3).to(DEVICE)
    mixed.running_var.data = mixed.running_var.double()
    with pytest.raises(RuntimeError, match="running_var is torch.float64 but running_mean is"):
        mixed(shifted(4, 3, 5, 5))
    with pytest.raises(RuntimeError, match="weight is torch.float16 but input is"):
        fastpbn.batch_norm(shifted(4, 3, 5, 5), None, None, torch.ones(3, device=DEVICE).half(),
                           training=True)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_activation_checkpointing_counts_as_stock(backend, momentum):
    """Non-reentrant checkpointing recomputes the forward in the backward and stops it by
    raising once the kernel has run: stock counts that call (and updates its running stats
    twice per step), and so must a drop-in (momentum None reads the count)."""
    from torch.utils.checkpoint import checkpoint

    stock, ours = make_pair(2, 3, momentum=momentum)
    # a random projection of y: with y.sum() weight.grad = sum(x_hat) is 0 in exact arithmetic,
    # a float32 residue that differs between any two kernels (cuDNN's and PyTorch's CUDA
    # kernel: 1e-4 apart at |mean|/std ~7), no measure of agreement
    g = torch.randn(4, 3, 5, 5, device=DEVICE)
    for step in range(3):
        x = shifted(4, 3, 5, 5, mean=step * 10.0)
        for m in (stock, ours):
            (checkpoint(m, x.clone().requires_grad_(), use_reentrant=False) * g).sum().backward()
    assert stock.num_batches_tracked.item() == ours.num_batches_tracked.item() == 6
    assert_close(ours.running_mean, stock.running_mean, 1e-5, "running_mean")
    assert_close(ours.running_var, stock.running_var, 1e-5, "running_var")
    assert_close(ours.weight.grad, stock.weight.grad, 1e-4, "weight.grad")


@pytest.mark.parametrize("accumulate", [False, True])
def test_float16_running_var_takes_what_stock_takes(backend, accumulate):
    """Batch variances above float16's max (65504) in a .half() layer: stock blends in float32
    and rounds once (16384, then 28640...). Rounding the batch variance into the buffer first
    gave Inf, and the next blend made it NaN for good."""
    torch.manual_seed(3)
    stock, ours = nn.BatchNorm2d(2).to(DEVICE).half(), FastPreciseBN2d(2).to(DEVICE).half()
    if accumulate:
        ours.accumulator = fastpbn.WelfordState(2, DEVICE)
    for _ in range(3):
        x = (torch.randn(4, 2, 3, 3, device=DEVICE) * 400).half()
        stock(x), ours(x)
        if not torch.isfinite(stock.running_var).all():
            pytest.skip("this torch's own CPU kernel rounds the batch variance into the "
                        "float16 buffer (Inf; torch < 2.6)")
        assert torch.isfinite(ours.running_var).all()
        assert_close(ours.running_var, stock.running_var, 2e-3, "running_var")
        assert_close(ours.running_mean, stock.running_mean, 2e-3, "running_mean")


@pytest.mark.parametrize("training", [True, False])
def test_strided_parameters_on_features(backend, training):
    """(N, C) input with every per-channel tensor a strided view (x[::2] of a packed buffer):
    PyTorch's own CPU backward reads them as packed and returns garbage dx / dweight (0.5 to
    1e22 off); fastpbn must match the float64 reference and update the views in place."""
    torch.manual_seed(4)
    x = shifted(6, 3).requires_grad_()
    bufs = [torch.rand(6, device=DEVICE) + 0.5 for _ in range(4)]
    w, b, rm, rv = (t[::2] for t in bufs)
    w.requires_grad_(), b.requires_grad_()
    rm_ref, rv_ref = rm.detach().clone(), rv.detach().clone()
    y = fastpbn.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    g = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), g)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr, rm_r, rv_r = batch_norm_reference(xr, rm_ref.double(), rv_ref.double(), wr, br,
                                          training, 0.1, 1e-5)
    dxr, dwr, dbr = torch.autograd.grad(yr, (xr, wr, br), g.double())
    if not training:  # eval leaves them as they were
        rm_r, rv_r = rm_ref, rv_ref
    for what, ours, ref in [("y", y, yr), ("dx", dx, dxr), ("dw", dw, dwr), ("db", db, dbr),
                            ("running_mean", rm, rm_r), ("running_var", rv, rv_r)]:
        assert_close(ours.detach(), ref.detach(), 1e-4, what)
    assert rm.data_ptr() == bufs[2].data_ptr()  # still the view, updated in place


@pytest.mark.parametrize("numel", ["small", "large"])
def test_fake_tensor_mode_then_real_steps(backend, numel):
    """A forward and backward under FakeTensorMode (memory / shape estimation) go through the
    custom ops' fake implementations, and leave no fake tensor in a cache: the real steps
    after it match stock (a fake scratch buffer or workspace, cached, broke every later call;
    Triton's fake forward itself failed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = (4, 4, 5, 5) if numel == "small" or backend == "triton" else (16, 4, 64, 64)
    with FakeTensorMode():
        fake = FastPreciseBN2d(4, device=DEVICE)
        x = torch.empty(*shape, device=DEVICE, requires_grad=True)
        y = fake(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
        fake.accumulator = fastpbn.WelfordState(4, DEVICE)
        fake(x)
        fake.accumulator = None
        y = fake(x)
    y.sum().backward()  # the fake forward's backward, run after the mode: still fake
    stock, ours = make_pair(2, 4)
    check_step(stock, ours, shifted(*shape), "randn")


def test_bfloat16_parameters_with_float32_running_stats(backend):
    """What FSDP's mixed precision leaves: bfloat16 input, weight and bias, float32 running
    statistics. PyTorch's CPU kernels refuse it; its CUDA forward takes it but its CUDA
    backward of an NCHW input refuses it (the weight's dtype makes the call not "mixed", and
    the fused backward then wants bfloat16 running statistics: "Expected running_mean to have
    type BFloat16", torch 2.11).
    fastpbn's own kernels take it; so does the torch backend on the CPU (its centred path: the
    mix no longer reaches PyTorch's CPU kernel, which refused it after the call was counted).
    On CUDA the torch backend runs PyTorch's kernel, whose backward verdict stands."""
    torch.manual_seed(5)
    stock, ours = make_pair(2, 3)
    for m in (stock, ours):
        m.weight.data, m.bias.data = m.weight.data.bfloat16(), m.bias.data.bfloat16()
    x = shifted(4, 3, 5, 5).bfloat16()
    backward_ok = False
    try:
        ys = stock(x.clone().requires_grad_())
        ys.float().sum().backward()
        backward_ok = True
    except RuntimeError:
        pass
    refuses = backend == "torch" and x.is_cuda and not backward_ok
    if refuses:
        with pytest.raises(RuntimeError):
            ours(x.clone().requires_grad_()).float().sum().backward()
        return
    xr = x.double().requires_grad_()
    w, b = (t.detach().double().requires_grad_() for t in (stock.weight, stock.bias))
    rm0, rv0 = ours.running_mean.double(), ours.running_var.double()
    yr, rm, rv = batch_norm_reference(xr, rm0, rv0, w, b, True, 0.1, 1e-5)
    xo = x.clone().requires_grad_()
    yo = ours(xo)
    yo.float().sum().backward()
    yr.sum().backward()
    assert yo.dtype == torch.bfloat16 and ours.weight.grad.dtype == torch.bfloat16
    assert_close(yo, yr, 2e-2, "y")
    assert_close(ours.running_mean, rm, 1e-5, "running_mean")
    assert_close(ours.running_var, rv, 1e-5, "running_var")
    assert_close(ours.bias.grad, b.grad, 2e-2, "bias grad")


def test_quantized_input_names_revert_model():
    """Eager quantization (prepare / convert) swaps stock BN layers by their exact class and
    leaves FastPreciseBN ones, which then get quantized tensors: the error says why and what
    to do, instead of a bare dtype complaint."""
    import torch.ao.quantization as tq

    model = nn.Sequential(tq.QuantStub(), nn.Conv2d(3, 8, 3), FastPreciseBN2d(8),
                          tq.DeQuantStub()).eval()
    model.qconfig = tq.get_default_qconfig()
    tq.prepare(model, inplace=True)
    model(torch.randn(4, 3, 8, 8))
    tq.convert(model, inplace=True)
    with pytest.raises(TypeError, match=r"quantized tensor .*fastpbn\.revert_model"):
        model(torch.randn(4, 3, 8, 8))
    # what the error says to do, done before quantizing, works
    stock = nn.Sequential(tq.QuantStub(), nn.Conv2d(3, 8, 3),
                          fastpbn.revert_model(FastPreciseBN2d(8)), tq.DeQuantStub()).eval()
    stock.qconfig = tq.get_default_qconfig()
    tq.prepare(stock, inplace=True)
    stock(torch.randn(4, 3, 8, 8))
    tq.convert(stock, inplace=True)
    assert stock(torch.randn(4, 3, 8, 8)).dtype == torch.float32


def test_inference_tensor_input_is_refused_before_anything_is_updated():
    """Autograd refuses to save an inference tensor only after the forward ran: fastpbn's own
    path (an accumulator, or a large input) had updated the running statistics and the
    accumulator by then. Now the call is refused first, naming the input."""
    with torch.inference_mode():
        x = torch.randn(4, 3, 5, 5) + 3
    layer = fastpbn.FastPreciseBN2d(3)
    layer.accumulator = fastpbn.WelfordState(3)
    with pytest.raises(RuntimeError, match="input is an inference tensor"):
        layer(x)
    assert (layer.running_mean == 0).all() and layer.accumulator.count.sum() == 0
    assert int(layer.num_batches_tracked) == 0
    with torch.no_grad():  # nothing to save: fine
        layer(x)
    assert layer.accumulator.count[0] == 100


@pytest.mark.parametrize("weight_dtype, stats_dtype", [(torch.bfloat16, torch.float32),
                                                       (torch.float32, torch.bfloat16)])
def test_mixed_parameter_dtypes_on_cpu(weight_dtype, stats_dtype):
    """Mixes that PyTorch's CUDA rule allows (bf16 parameters with float32 running statistics,
    as FSDP's mixed precision leaves them) were accepted, counted, then refused by PyTorch's
    CPU kernel; they run fastpbn's own path there now, matching stock with float32
    parameters."""
    torch.manual_seed(5)
    fast, stock = fastpbn.FastPreciseBN2d(3), nn.BatchNorm2d(3)
    with torch.no_grad():
        fast.weight.uniform_(0.5, 2)
        fast.bias.uniform_(-1, 1)
    fast.weight.data, fast.bias.data = (p.data.to(weight_dtype) for p in (fast.weight, fast.bias))
    stock.weight.data, stock.bias.data = (p.data.float() for p in (fast.weight, fast.bias))
    fast.running_mean, fast.running_var = (b.to(stats_dtype) for b in (fast.running_mean,
                                                                       fast.running_var))
    x = (torch.randn(4, 3, 5, 5) * 2 + 3).bfloat16()
    xf, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, ys = fast(xf), stock(xs)
    assert torch.equal(yf, ys)
    g = torch.randn_like(yf)
    yf.backward(g), ys.backward(g)
    assert torch.equal(xf.grad, xs.grad)
    torch.testing.assert_close(fast.running_mean.float(), stock.running_mean, rtol=1e-2, atol=1e-3)
    assert int(fast.num_batches_tracked) == 1
