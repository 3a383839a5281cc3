"""WelfordState against float64 statistics of all data, on every backend that runs here."""

import pytest
import torch

from fastpbn import WelfordState
from fastpbn.reference import batch_stats_reference

from .conftest import DEVICE


def shifted_batches(sizes, c=3, spatial=(2, 3), mean=1e4, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, c, *spatial, generator=g) * std + mean).to(DEVICE) for n in sizes
    ]


def assert_matches_all_data(state, batches, unbiased=True):
    rmean, rvar, n = batch_stats_reference(torch.cat(batches))
    assert torch.equal(state.count, torch.full_like(state.count, n))
    assert state.mean.dtype == state.m2.dtype == torch.float64
    torch.testing.assert_close(state.mean, rmean, rtol=1e-9, atol=1e-5)
    expected_var = rvar * n / (n - 1) if unbiased else rvar
    torch.testing.assert_close(state.var(unbiased), expected_var, rtol=1e-4, atol=0)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (1e4, 1.0), (-3e3, 0.01)])
def test_uneven_batches_equal_all_data(backend, mean, std):
    batches = shifted_batches([5, 1, 8, 2, 13], mean=mean, std=std)
    state = WelfordState(3, device=DEVICE)
    for b in batches:
        state.update(b)
    assert_matches_all_data(state, batches)
    assert_matches_all_data(state, batches, unbiased=False)


def test_layouts(backend):
    base = shifted_batches([4], c=5, spatial=(3, 4))[0]
    cases = {
        "channels_last": base.to(memory_format=torch.channels_last),
        "non_contiguous": base[:, :, ::2, 1:],
        "1d": base[:, :, 0, 0].contiguous(),
        "1d_len": base.flatten(2),
        "3d": base.unsqueeze(2).expand(4, 5, 2, 3, 4),
    }
    for name, x in cases.items():
        state = WelfordState(5, device=DEVICE).update(x)
        rmean, rvar, n = batch_stats_reference(x)
        assert int(state.count[0]) == n, name
        torch.testing.assert_close(state.mean, rmean, rtol=1e-9, atol=1e-5, msg=name)
        torch.testing.assert_close(state.var(False), rvar, rtol=1e-4, atol=1e-6, msg=name)


def test_low_precision_inputs(backend):
    x = shifted_batches([6], c=2, mean=3.0, std=2.0)[0]
    for dtype in (torch.float16, torch.bfloat16):
        xl = x.to(dtype)
        state = WelfordState(2, device=DEVICE).update(xl)
        rmean, rvar, _ = batch_stats_reference(xl)  # statistics of the values as stored
        torch.testing.assert_close(state.mean, rmean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state.var(False), rvar, rtol=1e-4, atol=1e-5)


def test_merge_is_order_invariant():
    batches = shifted_batches([3, 7, 2, 9], mean=1e4)
    states = [WelfordState(3, device=DEVICE).update(b) for b in batches]
    forward, backward = WelfordState(3, device=DEVICE), WelfordState(3, device=DEVICE)
    for s in states:
        forward.merge(s)
    for s in reversed(states):
        backward.merge(s)
    tree = states[0].clone().merge(states[1]).merge(states[2].clone().merge(states[3]))
    for s in (forward, backward, tree):
        assert_matches_all_data(s, batches)
    torch.testing.assert_close(forward.mean, backward.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(forward.m2, backward.m2, rtol=1e-10, atol=0)


def test_merge_with_empty_state_is_exact():
    s = WelfordState(3, device=DEVICE).update(shifted_batches([4])[0])
    merged = WelfordState(3, device=DEVICE).merge(s)
    assert torch.equal(merged.mean, s.mean) and torch.equal(merged.m2, s.m2)
    s.merge(WelfordState(3, device=DEVICE))
    assert torch.equal(merged.mean, s.mean) and torch.equal(merged.count, s.count)


def test_bad_input_leaves_state_unchanged(backend):
    state = WelfordState(3, device=DEVICE).update(shifted_batches([4])[0])
    before = state.clone()
    bad = shifted_batches([4])[0]
    bad[1, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        state.update(bad)
    bad[1, 2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        state.update(bad)
    with pytest.raises(ValueError, match="no values"):
        state.update(torch.empty(0, 3, 2, device=DEVICE))
    with pytest.raises(ValueError, match=r"\(N, 3, \*\)"):
        state.update(torch.randn(4, 5, 2, device=DEVICE))
    with pytest.raises(TypeError, match="floating-point"):
        state.update(torch.ones(4, 3, dtype=torch.int64, device=DEVICE))
    for a, b in ((state.count, before.count), (state.mean, before.mean), (state.m2, before.m2)):
        assert torch.equal(a, b)
    # a state already made non-finite (check=False) is named, not the clean batch after it
    state.update(bad, check=False)
    with pytest.raises(ValueError, match="was not finite before x.*reset"):
        state.update(shifted_batches([4])[0])


def test_batch_stats_refuses_non_finite_statistics(backend):
    """batch_stats returned NaN / inf statistics without a word (float64 input at 1e100 too,
    whose variance a float32 result cannot hold); check=False keeps torch.var_mean's way."""
    from fastpbn import batch_stats

    x = shifted_batches([4])[0]
    x[1, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="^x: its statistics are not finite"):
        batch_stats(x)
    assert torch.isnan(batch_stats(x, check=False)[0][2])
    if backend.startswith("torch"):  # (float64: the torch backend's alone)
        with pytest.raises(ValueError, match="not finite"):
            batch_stats(torch.randn(4, 2, 3, dtype=torch.float64, device=DEVICE) * 1e100)


def test_var_undefined_and_constructor_errors():
    state = WelfordState(2)
    assert torch.isnan(state.var()).all()
    state.update(torch.tensor([[1.0, 2.0]]))  # one value per channel: unbiased is undefined
    assert torch.isnan(state.var()).all() and torch.equal(state.var(False), torch.zeros(2).double())
    with pytest.raises(ValueError, match="num_channels"):
        WelfordState(0)
    for bad in (2.5, "3", True):  # (int() took them: 2.5 made 2 channels)
        with pytest.raises(TypeError, match="num_channels must be an integer"):
            WelfordState(bad)
    assert WelfordState(torch.tensor(3)).num_channels == 3
    with pytest.raises(ValueError, match="same number of channels"):
        state.merge(WelfordState(3))
    with pytest.raises(ValueError, match="at least one state"):
        WelfordState.cat([])


def test_accumulating_forward_updates_running_stats_like_stock(backend):
    """A FastPreciseBN layer with an accumulator still follows PyTorch's running-stat rule."""
    from torch import nn

    from fastpbn import FastPreciseBN2d

    stock, ours = nn.BatchNorm2d(3).to(DEVICE), FastPreciseBN2d(3).to(DEVICE)
    ours.accumulator = WelfordState(3, device=DEVICE)
    batches = shifted_batches([4, 6], mean=20.0, std=2.0)
    for b in batches:
        torch.testing.assert_close(ours(b), stock(b), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, stock.running_mean, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ours.running_var, stock.running_var, rtol=1e-5, atol=1e-6)
    assert_matches_all_data(ours.accumulator, batches)


def _off_the_cpu(monkeypatch):
    """The torch backend's choices as on a CUDA tensor: no centred CPU passes, and the general
    path's statistics and y without PyTorch's batch-norm kernels (``_kernel_stats``)."""
    from fastpbn import _torch_ops

    for name in ("_centred_ok", "_sums_in_float32", "_kernel_stats"):
        monkeypatch.setattr(_torch_ops, name, lambda x: False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "transposed", "permuted", "2d"])
def test_accumulating_forward_off_the_cpu_kernels(monkeypatch, layout, dtype):
    """The torch backend's statistics path as it runs on CUDA tensors, forced on any device:
    mean and var by torch.var_mean on pivot-shifted data, y by one addcmul. (It ran PyTorch's
    kernels with out=, whose CUDA eval call wrote invstd over the mean when one scratch served
    as both of its unused outputs: every y normalized by invstd.) y, its dtype and stock's
    layout, the running statistics and the accumulator match float64, far from zero too."""
    import fastpbn
    from fastpbn import FastPreciseBN1d, FastPreciseBN2d
    from fastpbn._scratch import output_like
    from fastpbn.reference import batch_norm_reference

    _off_the_cpu(monkeypatch)
    fastpbn.set_backend("torch")
    g = torch.Generator().manual_seed(7)
    mean, std = (1e4, 1.0) if dtype in (torch.float32, torch.float64) else (30.0, 2.0)
    shape = {"2d": (37, 3), "transposed": (4, 9, 3)}.get(layout, (4, 3, 5, 6))
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean).to(DEVICE, dtype)
    x = {"channels_last": lambda t: t.to(memory_format=torch.channels_last),
         "transposed": lambda t: t.transpose(1, 2),
         "permuted": lambda t: t.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3),
         }.get(layout, lambda t: t)(x)
    layer = (FastPreciseBN2d if x.dim() == 4 else FastPreciseBN1d)(3).to(DEVICE, dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
        layer.running_mean.fill_(1.0), layer.running_var.fill_(2.0)
    w, b, rm, rv = (t.detach().double().clone() for t in (
        layer.weight, layer.bias, layer.running_mean, layer.running_var))
    layer.accumulator = WelfordState(3, device=DEVICE)
    y = layer(x)
    yr, rmr, rvr = batch_norm_reference(x.double(), rm, rv, w, b, True, 0.1, 1e-5)
    assert y.dtype == dtype and y.stride() == output_like(x, device="meta").stride()
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(y.double(), yr, rtol=tol, atol=tol)
    rtol = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)  # the buffers' dtype
    torch.testing.assert_close(layer.running_mean.double(), rmr, rtol=rtol, atol=0)
    torch.testing.assert_close(layer.running_var.double(), rvr, rtol=rtol, atol=0)
    rmean, rvar, n = batch_stats_reference(x)
    torch.testing.assert_close(layer.accumulator.mean, rmean, rtol=1e-9, atol=1e-6 * std)
    torch.testing.assert_close(layer.accumulator.var(False), rvar, rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "small_hw", "strided", "1d_len",
                                    "3d", "float64", "2d", "len1", "channels_last_3d",
                                    "many_samples"])
@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (1e4, 1.0), (-3e3, 0.01)])
def test_large_cpu_inputs_are_exact_on_either_path(layout, mean, std):
    """Contiguous CPU tensors of >= 32K values, and the layouts PyTorch's kernel sums in
    float32 (channels_last, (N, C), (N, C, 1)), are reduced in vectorized centred passes
    (other layouts: its kernel on pivot-shifted data): statistics and normalization match
    float64 to ~1e-7 either way, far from zero too; with many samples too (a float32 mean
    over (0, 2) added 16000 samples one after another: variance off by 2.6e-6)."""
    from fastpbn import _torch_ops
    from fastpbn.reference import batch_norm_reference

    g = torch.Generator().manual_seed(3)
    shapes = {"nchw": (8, 16, 16, 16), "channels_last": (8, 16, 16, 16),
              "small_hw": (64, 32, 4, 4), "strided": (8, 16, 16, 32), "1d_len": (16, 32, 64),
              "3d": (4, 8, 4, 16, 16), "float64": (8, 16, 16, 16), "2d": (20000, 8),
              "len1": (20000, 8, 1), "channels_last_3d": (8, 8, 4, 8, 8),
              "many_samples": (16000, 2, 100)}
    x = torch.randn(*shapes[layout], generator=g) * std + mean
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.to(memory_format=torch.channels_last_3d)
    elif layout == "strided":
        x = x[..., ::2]
    elif layout == "float64":
        x = x.double()
    assert _torch_ops._centred_ok(x) == (layout not in ("channels_last", "strided", "2d",
                                                        "len1", "channels_last_3d"))
    assert _torch_ops._sums_in_float32(x) == (layout in ("channels_last", "2d", "len1",
                                                         "channels_last_3d"))
    c = x.shape[1]
    weight = torch.rand(c, generator=g, dtype=x.dtype) + 0.5
    bias = torch.randn(c, generator=g, dtype=x.dtype)
    pivot, mean_s, var = torch.empty(3, c, dtype=x.dtype)
    y = _torch_ops.batch_norm_train(x, weight, bias, 1e-5, pivot, mean_s, var)
    rmean, rvar, n = batch_stats_reference(x)
    got_mean, got_var = _torch_ops.moments64(pivot, mean_s, var)
    # the shift keeps the error independent of |mean|/std (PyTorch's channels-last kernel
    # alone, float32 sums: ~1e-5 at 20K values per channel)
    tol = 1e-12 if x.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got_mean, rmean, rtol=0, atol=tol * 10 * rvar.sqrt().max())
    torch.testing.assert_close(got_var, rvar, rtol=tol, atol=0)
    y_ref = batch_norm_reference(x, None, None, weight, bias, training=True, eps=1e-5)[0]
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=tol * 10)
    state = WelfordState(c).update(x)  # the same path behind the torch backend's update
    torch.testing.assert_close(state.var(False), rvar, rtol=tol, atol=0)


def test_cpu_scratch_is_one_buffer_per_thread_for_every_dtype():
    """The centred path's scratch is kept per thread between calls; float32 and float64
    calls share one buffer (they held one each: 1.5x the memory, kept for the thread's
    life), and results are exact in either order."""
    import threading

    from fastpbn import _torch_ops

    g = torch.Generator().manual_seed(5)
    x32 = torch.randn(8, 16, 16, 16, generator=g) * 3 + 1e3
    x64 = torch.randn(8, 16, 16, 16, generator=g, dtype=torch.float64) * 3 + 1e3
    held, results = {}, []

    def run():
        for x in (x32, x64, x32):
            stats = torch.empty(3, 16, dtype=x.dtype)
            _torch_ops.batch_norm_train(x, None, None, 1e-5, *stats)
            results.append((x, _torch_ops.moments64(*stats)))
        held.update({k: v for k, v in vars(_torch_ops._local).items() if k != "empty"})

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert set(held) == {"scratch"} and held["scratch"].dtype == torch.uint8
    assert held["scratch"].numel() == x64.numel() * 8
    for x, (mean, var) in results:
        rmean, rvar, _ = batch_stats_reference(x)
        tol = 1e-12 if x.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(mean, rmean, rtol=0, atol=tol * 10 * rvar.sqrt().max())
        torch.testing.assert_close(var, rvar, rtol=tol, atol=0)


@pytest.mark.parametrize("shape", [(8, 16, 16, 16), (4, 6, 5, 5), (8, 16, 16, 16, 1)])
def test_unshifted_path_is_exact_where_the_mean_is_small(shape):
    """``shift=False`` (what a recompute pass uses once a layer showed |mean|/std < 5) skips
    the correction pass (large tensors) or the shift (small ones) and stays exact there."""
    from fastpbn import _torch_ops
    from fastpbn.reference import batch_norm_reference

    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape[:4], generator=g) * 2.0 + 6.0  # |mean|/std = 3
    if len(shape) == 5:
        x = x.to(memory_format=torch.channels_last)
    c = x.shape[1]
    weight, bias = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    pivot, mean_s, var = torch.empty(3, c)
    y = _torch_ops.batch_norm_train(x, weight, bias, 1e-5, pivot, mean_s, var, shift=False)
    assert not _torch_ops.mean_dwarfs_std(pivot, mean_s, var)
    rmean, rvar, _ = batch_stats_reference(x)
    got_mean, got_var = _torch_ops.moments64(pivot, mean_s, var)
    tol = 1e-6
    torch.testing.assert_close(got_mean, rmean, rtol=0, atol=tol * rvar.sqrt().max())
    torch.testing.assert_close(got_var, rvar, rtol=5 * tol, atol=0)
    y_ref = batch_norm_reference(x, None, None, weight, bias, training=True, eps=1e-5)[0]
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=1e-5)
    # far from zero the same call must be redone shifted, and the check says so
    _torch_ops.batch_norm_train(x + 1e4, weight, bias, 1e-5, pivot, mean_s, var, shift=False)
    assert _torch_ops.mean_dwarfs_std(pivot, mean_s, var)


def test_accumulator_that_does_not_fit_the_input_is_named():
    from fastpbn import FastPreciseBN2d

    layer = FastPreciseBN2d(3)
    layer.accumulator = WelfordState(4)
    with pytest.raises(ValueError, match=r"accumulator \(4 channels, cpu\): x must have shape"):
        layer(torch.randn(2, 3, 4, 4))
    assert layer.accumulator.count.sum() == 0


@pytest.mark.parametrize("scratch_cap", [None, 0])  # 0: the path above the CPU scratch's cap
@pytest.mark.parametrize("make", [
    lambda g: (torch.randn(2, 9, 40, generator=g) * 0.5 + 1.0).transpose(0, 1),  # dense, N<->C
    lambda g: (torch.randn(8, 3, 6, 6, generator=g) * 0.5 + 1.0).contiguous(
        memory_format=torch.channels_last)[::2],  # channels_last order, not dense
    # overlapping sliding windows, C outermost in memory: empty_like gave d that order
    lambda g: (torch.randn(3, 4000, generator=g) * 2 + 5).unfold(1, 64, 16).permute(1, 0, 2),
])
def test_centred_copy_takes_the_output_layout(monkeypatch, make, scratch_cap):
    """The torch backend's centred copy d is laid out as y: PyTorch's out= kernel wrote y in
    d's layout (y off by up to 5 for a sliced channels_last input with an accumulator, so a
    recompute pass fed every later layer wrong values) and left the statistics unwritten for
    a permuted d (garbage mean and var from batch_stats above the scratch's cap; for
    overlapping windows below it too, and an accumulator's mean of 3e18)."""
    from fastpbn import FastPreciseBN1d, FastPreciseBN2d, _torch_ops, batch_stats

    if scratch_cap is not None:
        monkeypatch.setattr(_torch_ops, "_SCRATCH_MAX_BYTES", scratch_cap)
    g = torch.Generator().manual_seed(7)
    x = make(g)
    rmean, rvar, _ = batch_stats_reference(x)
    mean, var, _ = batch_stats(x)
    torch.testing.assert_close(mean.double(), rmean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var.double(), rvar, rtol=1e-5, atol=0)
    state = WelfordState(x.shape[1]).update(x)
    torch.testing.assert_close(state.var(False), rvar, rtol=1e-5, atol=0)
    layer = (FastPreciseBN2d if x.dim() == 4 else FastPreciseBN1d)(x.shape[1])
    layer.accumulator = WelfordState(x.shape[1])
    expected = torch.nn.functional.batch_norm(x.contiguous(), None, None, training=True)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.accumulator.mean, rmean, rtol=1e-6, atol=1e-6)


def test_constant_and_far_shifted_channels_on_the_centred_path():
    """mean(d²) − mean(d)² cancelled where the first pass's float32 mean is off by a fair part
    of the std: a constant channel at 1e4 got a negative variance (and recompute_bn_stats
    refused a model whose zeroed conv filters leave constant channels), one quantized to an
    ulp of its mean was 27x off. Such channels now take one more centred pass."""
    from fastpbn import batch_stats, recompute_bn_stats

    g = torch.Generator().manual_seed(8)
    x = torch.randn(300, 6, 5, 25, generator=g)
    x[:, :3] = torch.tensor([1e4, -3.3e3, 7.7e5]).view(1, 3, 1, 1)  # constant channels
    x[:, 3] = 1e4 + torch.randint(0, 2, (300, 5, 25), generator=g) * 2.0 ** -3  # 1-ulp steps
    rmean, rvar, _ = batch_stats_reference(x)
    mean, var, _ = batch_stats(x)
    assert torch.equal(var[:3], torch.zeros(3))
    torch.testing.assert_close(var.double(), rvar, rtol=1e-5, atol=1e-12)
    conv = torch.nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        conv.weight[:2] = 0  # channels 0, 1: their bias only
        conv.bias[:2] = torch.tensor([1e4, -2e3])
    stats = recompute_bn_stats(torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4)),
                               [torch.randn(300, 3, 5, 25, generator=g) for _ in range(2)],
                               apply=False)
    assert torch.equal(stats["1"].var[:2], torch.zeros(2, dtype=torch.float64))


def test_statistics_of_a_tensor_that_requires_grad():
    """An activation that requires grad (a training forward's): batch_stats and
    WelfordState.update failed inside PyTorch ("out=... arguments don't support automatic
    differentiation")."""
    from fastpbn import batch_stats

    x = (torch.randn(8, 3, 4, 4) * 2 + 1).requires_grad_()
    mean, var, n = batch_stats(x)
    rmean, rvar, _ = batch_stats_reference(x.detach())
    torch.testing.assert_close(mean.double(), rmean, rtol=1e-6, atol=1e-6)
    assert not mean.requires_grad and n == 128
    state = WelfordState(3).update(x)
    torch.testing.assert_close(state.var(False), rvar, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_overflowing_variance_is_refused_and_a_constant_channel_is_exactly_zero(dtype):
    """Small inputs take PyTorch's training kernel for the statistics: its invstd was read
    back with eps = 0, where a variance that overflows and a zero one both give invstd 0, so an
    overflowing channel came back as variance 0 with no error. A constant channel's variance
    is still exactly 0."""
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[:, 2] = 7.25
    state = WelfordState(3).update(x)
    assert state.var(False)[2] == 0 and (state.var(False)[:2] > 0.5).all()
    if dtype != torch.float64:
        x[0, 1, 0, 0] = torch.finfo(dtype).max / 2  # finite; its square is not
        before = state.clone()
        with pytest.raises(ValueError, match="non-finite|overflow"):
            state.update(x)
        assert torch.equal(state.mean, before.mean) and torch.equal(state.m2, before.m2)
