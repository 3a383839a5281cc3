"""Precise-BN recomputation (fastpbn.precise) against a float64 ground truth captured from each
BN layer's inputs, against fvcore and torch.optim.swa_utils, and the nothing-lost guarantees."""

import copy
import math
import sys
import warnings

import pytest
import torch
from torch import nn

from fastpbn import FastPreciseBN2d, WelfordState, convert_model
from fastpbn.models import SmallCNN, small_resnet
from fastpbn.precise import PopulationStats, recompute_bn_stats, update_bn_stats
from fastpbn.precise._collect import has_running_stats
from fastpbn.reference import batch_stats_reference


def shifted(*shape, mean=40.0, std=3.0):
    """Random data far from zero (where wrong formulas break)."""
    return torch.randn(*shape) * std + mean


def cnn(seed=0, **kw):
    torch.manual_seed(seed)
    return SmallCNN(width=4, **kw)


def ground_truth(model, batches, names=None, forward=None):
    """Per selected layer: float64 (pooled mean, pooled unbiased var, mean of per-call means,
    mean of per-call unbiased vars, count), from the layer's inputs on the same batches, with
    the selected layers in train mode and every other module in eval mode; on the CPU, where
    PopulationStats keeps its statistics (whatever the model's device)."""
    m = copy.deepcopy(model)
    if names is None:
        names = [n for n, mod in m.named_modules() if has_running_stats(mod)]
    for mod in m.modules():
        mod.training = False
    seen = {n: [] for n in names}
    for n in names:
        layer = m.get_submodule(n)
        layer.training = True
        layer.register_forward_pre_hook(
            lambda mod, args, n=n: seen[n].append(args[0].detach().to("cpu", torch.float64))
        )
    with torch.no_grad():
        for b in batches:
            (forward or (lambda mm, x: mm(x)))(m, b)
    out = {}
    for n, xs in seen.items():
        # fastpbn.reference's statistics of the pooled values and of each call: (1, C, values)
        flat = [x.transpose(0, 1).reshape(1, x.shape[1], -1) for x in xs]
        mean, var, count = batch_stats_reference(torch.cat(flat, 2))
        calls = [batch_stats_reference(f) for f in flat]
        out[n] = dict(
            mean=mean, var=var * count / (count - 1), count=count,
            bmean=torch.stack([m for m, _, _ in calls]).mean(0),
            bvar=torch.stack([v * k / (k - 1) for _, v, k in calls]).mean(0),
        )
    return out


def assert_close_to_truth(stats, truth, kind="population", rtol=1e-6):
    assert set(stats) == set(truth)
    for n, t in truth.items():
        mean, var = (t["mean"], t["var"]) if kind == "population" else (t["bmean"], t["bvar"])
        std = var.sqrt()
        assert ((stats[n].mean - mean).abs() / std).max() < rtol, n
        assert ((stats[n].var - var).abs() / var).max() < rtol, n
        assert torch.all(stats[n].count == t["count"]), n


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()])


def assert_unchanged(model, snap):
    sd, flags = snap
    now = model.state_dict()
    assert now.keys() == sd.keys()
    for k in sd:
        assert torch.equal(now[k], sd[k]), k
    assert [m.training for m in model.modules()] == flags


# ---- arithmetic ------------------------------------------------------------------------------

def test_population_matches_float64_truth_uneven_batches():
    model = cnn()
    batches = [shifted(n, 1, 8, 8) for n in (5, 17, 3, 32)]  # uneven, incl. a small one
    truth = ground_truth(model, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # batch of 5 < 32 warns
        stats = recompute_bn_stats(model, batches)
    assert_close_to_truth(stats, truth)
    assert stats.num_samples == 57 and stats.num_batches == 4
    for n, s in stats.items():
        layer = model.get_submodule(n)
        assert torch.equal(layer.running_mean, s.mean.float())
        assert torch.equal(layer.running_var, s.var.float())


def test_batch_mean_estimator_matches_truth_and_swa_update_bn():
    model = cnn(1)
    batches = [shifted(n, 1, 8, 8) for n in (8, 12, 8, 16)]
    truth = ground_truth(model, batches)
    swa = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, swa)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = recompute_bn_stats(model, batches, estimator="batch_mean")
    assert_close_to_truth(stats, truth, kind="batch_mean")
    for n in stats:
        ref = swa.get_submodule(n)
        torch.testing.assert_close(model.get_submodule(n).running_mean, ref.running_mean,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.get_submodule(n).running_var, ref.running_var,
                                   rtol=1e-4, atol=1e-6)
    # the two estimators differ on uneven batches (that is the point of "population")
    pop = recompute_bn_stats(model, batches, apply=False, batch_size=32)
    assert any(not torch.allclose(pop[n].var, stats[n].var, rtol=1e-6) for n in stats)


def test_fvcore_parity_on_benign_data():
    fvcore = pytest.importorskip("fvcore.nn.precise_bn")
    model = cnn(2).train()
    batches = [torch.randn(16, 1, 8, 8) * 2 + 1 for _ in range(6)]
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    fvcore.update_bn_stats(theirs, batches, num_iters=6)
    update_bn_stats(ours, batches, num_iters=6)
    truth = ground_truth(model, batches)
    a, b = theirs.state_dict(), ours.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=2e-4, atol=1e-5)
    for n, t in truth.items():  # fvcore's convention: running_var = M2/N
        var_n = t["var"] * (t["count"] - 1) / t["count"]
        assert ((ours.get_submodule(n).running_var.double() - var_n).abs() / var_n).max() < 1e-6


def test_progress_bars_show_when_asked_and_change_nothing(capsys):
    """progress=True / progress="tqdm" draw a tqdm bar on stderr and give the same buffers;
    without it nothing is drawn (update_bn_stats built a disabled tqdm, which still starts
    tqdm's monitor thread)."""
    model = cnn(2).train()
    batches = [torch.randn(16, 1, 8, 8) * 2 + 1 for _ in range(3)]
    runs = {}
    for name, fn in [("recompute", lambda m, p: recompute_bn_stats(m, batches, progress=p)),
                     ("update", lambda m, p: update_bn_stats(
                         m, batches, num_iters=3, progress="tqdm" if p else None)),
                     ("update-bool", lambda m, p: update_bn_stats(  # False: as fvcore's
                         m, batches, num_iters=3, progress=p))]:
        for shown in (False, True):
            m = copy.deepcopy(model)
            fn(m, shown)
            err = capsys.readouterr().err
            assert ("3/3" in err or "48.0sample" in err) == shown, (name, shown, err)
            runs[name, shown] = m.state_dict()
    for name in ("recompute", "update", "update-bool"):
        for k, v in runs[name, False].items():
            assert torch.equal(runs[name, True][k], v), (name, k)
    with pytest.raises(ValueError, match="progress"):
        update_bn_stats(model, batches, num_iters=3, progress="bar")


@pytest.mark.parametrize("ratio", [1e3, 1e4, 3e4])
def test_shifted_data_exact_where_fvcore_is_off(ratio):
    fvcore = pytest.importorskip("fvcore.nn.precise_bn")
    torch.manual_seed(3)
    model = nn.Sequential(nn.BatchNorm2d(4)).train()
    batches = [torch.randn(32, 4, 4, 4) * 2 + 2 * ratio for _ in range(10)]
    allv = torch.cat(batches).double().transpose(0, 1).reshape(4, -1)  # |mean|/std = ratio
    var_n = allv.var(1, unbiased=False)
    theirs, ours, pop = (copy.deepcopy(model) for _ in range(3))
    fvcore.update_bn_stats(theirs, batches, num_iters=10)
    update_bn_stats(ours, batches, num_iters=10)
    stats = recompute_bn_stats(pop, batches)
    err = lambda v, ref: ((v.double() - ref).abs() / ref).max().item()  # noqa: E731
    assert err(theirs[0].running_var, var_n) > 0.05
    assert err(ours[0].running_var, var_n) < 1e-6
    assert err(pop[0].running_var, allv.var(1)) < 1e-6
    assert err(stats["0"].var, allv.var(1)) < 1e-6
    # the mean is exact to float32 rounding at its own magnitude (what a running_mean can hold)
    ulp = torch.finfo(torch.float32).eps * allv.mean(1).abs()
    assert ((stats["0"].mean - allv.mean(1)).abs() <= ulp + 1e-6 * allv.std(1)).all()


def test_stock_and_fastprecisebn_layers_agree():
    model = cnn(4)
    fast = convert_model(copy.deepcopy(model))
    assert isinstance(fast.features[1], FastPreciseBN2d)
    batches = [shifted(32, 1, 8, 8) for _ in range(3)]
    a = recompute_bn_stats(model, batches)
    b = recompute_bn_stats(fast, batches)
    assert_close_to_truth(b, ground_truth(model, batches))
    for n in a:
        torch.testing.assert_close(b[n].mean, a[n].mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b[n].var, a[n].var, rtol=1e-12, atol=1e-12)
    assert fast.features[1].accumulator is None  # restored


def test_bn1d_and_syncbn_layers():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Unflatten(1, (5, 1)),
                          nn.Conv1d(5, 3, 1), nn.SyncBatchNorm(3))
    batches = [shifted(n, 6) for n in (40, 33)]
    truth = ground_truth(model, batches)
    stats = recompute_bn_stats(model, batches)
    assert_close_to_truth(stats, truth)
    assert set(stats) == {"1", "4"}


# ---- batching and stopping -------------------------------------------------------------------

def test_batch_size_regroups_like_a_loader_of_that_size():
    model = cnn(6)
    small = [shifted(8, 1, 8, 8) for _ in range(12)]
    big = [torch.cat(small[i:i + 4]) for i in range(0, 12, 4)]
    a = recompute_bn_stats(model, small, batch_size=32, apply=False)
    b = recompute_bn_stats(model, big, apply=False)
    assert a.num_batches == 3 and a.num_samples == 96
    for n in a:
        assert torch.equal(a[n].mean, b[n].mean) and torch.equal(a[n].var, b[n].var)
    # splitting a loader batch: 2 x 48 at batch_size 32 -> 32, 32, remainder 32
    c = recompute_bn_stats(model, [torch.cat(small[:6]), torch.cat(small[6:])], batch_size=32,
                           apply=False)
    for n in a:
        assert torch.equal(a[n].mean, c[n].mean) and torch.equal(a[n].var, c[n].var)


def test_batch_size_remainder_and_single_sample():
    model = cnn(7)
    data = [shifted(8, 1, 8, 8) for _ in range(5)]  # 40 = 32 + 8
    truth = ground_truth(model, [torch.cat(data[:4]), data[4]])
    stats = recompute_bn_stats(model, data, batch_size=32)
    assert_close_to_truth(stats, truth)
    assert stats.num_batches == 2
    with pytest.warns(UserWarning, match="skipped 1 sample"):
        one = recompute_bn_stats(model, data[:4] + [shifted(1, 1, 8, 8)], batch_size=32)
    assert (one.num_samples, one.num_batches) == (32, 1)


def counting(batches):
    pulled = []

    def gen():
        for b in batches:
            pulled.append(1)
            yield b
    return gen(), pulled


def test_num_samples_exact_and_lazy():
    model = cnn(8)
    data = [shifted(8, 1, 8, 8) for _ in range(10)]
    it, pulled = counting(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = recompute_bn_stats(model, it, num_samples=20)
        truth = ground_truth(model, [data[0], data[1], data[2][:4]])
    assert_close_to_truth(stats, truth)
    assert stats.num_samples == 20 and stats.num_batches == 3 and len(pulled) == 3
    snap = snapshot(model)
    with pytest.raises(ValueError, match="num_samples=100"):
        recompute_bn_stats(model, data, num_samples=100, batch_size=32)
    assert_unchanged(model, snap)



def test_limits_count_usable_samples_and_the_first_one_reached_ends_the_pass():
    """Loader batches of one sample (skipped) count towards neither limit, so they cannot make
    up for data too short for ``num_samples`` (8 usable samples passed for num_samples=10);
    with both limits the pass ends at the first reached, and only data that ends before
    either is an error (it named the limit not reached although the data held more)."""
    model = cnn(12)
    snap = snapshot(model)
    eight, one = shifted(8, 1, 8, 8), shifted(1, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="num_samples=10 but the data ended after 8 "):
            recompute_bn_stats(model, [eight, one, one], num_samples=10)
        assert_unchanged(model, snap)
        s = recompute_bn_stats(model, [eight, one, eight], num_samples=10, apply=False)
        assert (s.num_samples, s.num_batches) == (10, 2)
        assert_close_to_truth(s, ground_truth(model, [eight, eight[:2]]))
        forty = [shifted(40, 1, 8, 8)]
        for kw, used in [(dict(num_batches=2, num_samples=10), (10, 1)),
                         (dict(num_batches=1, num_samples=10), (10, 1)),
                         (dict(batch_size=3, num_batches=2, num_samples=10), (6, 2))]:
            s = recompute_bn_stats(model, forty, apply=False, **kw)
            assert (s.num_samples, s.num_batches) == used, kw
        with pytest.raises(ValueError, match="num_samples=50 and num_batches=3: the data ended "
                                             "after 40 samples and 1 batches"):
            recompute_bn_stats(model, forty, num_samples=50, num_batches=3)
        # an empty item counts towards no limit; with batch_size, data that ends inside the
        # last of num_batches batches has run them all
        empty = eight[:0]
        s = recompute_bn_stats(model, [eight, empty, eight, eight], num_batches=3, apply=False)
        assert (s.num_samples, s.num_batches) == (24, 3)
        s = recompute_bn_stats(model, [shifted(60, 1, 8, 8)], batch_size=16, num_batches=4,
                               apply=False)
        assert (s.num_samples, s.num_batches) == (60, 4)
    assert_unchanged(model, snap)

def test_num_batches_with_and_without_batch_size(capsys):
    model = cnn(9)
    data = [shifted(8, 1, 8, 8) for _ in range(10)]
    it, pulled = counting(data)
    s = recompute_bn_stats(model, it, num_batches=2, batch_size=32, apply=False, progress=True)
    assert (s.num_batches, s.num_samples, len(pulled)) == (2, 64, 8)
    assert "sample" in capsys.readouterr().err  # the tqdm bar counts samples
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = recompute_bn_stats(model, data, num_batches=3, apply=False)
        assert (s.num_batches, s.num_samples) == (3, 24)
        with pytest.raises(ValueError, match="num_batches=11"):
            recompute_bn_stats(model, data, num_batches=11)


def test_tol_stops_early_when_converged():
    model = cnn(10)
    data = [shifted(32, 1, 8, 8) for _ in range(40)]
    it, pulled = counting(data)
    s = recompute_bn_stats(model, it, tol=0.1, tol_every=4)
    assert s.converged is True
    assert s.num_batches < 40 and s.num_batches % 4 == 0 and len(pulled) <= s.num_batches + 1
    assert_close_to_truth(s, ground_truth(model, data[:s.num_batches]))
    with pytest.warns(UserWarning, match="not reached"):
        s = recompute_bn_stats(model, data[:6], tol=1e-6, apply=False)
    assert s.converged is False and s.num_batches == 6


class SharedHead(nn.Module):
    """One BN layer called on two feature maps per forward (a shared detection head)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.down = nn.Conv2d(3, 3, 3, stride=2, padding=1)
        self.head_bn = nn.BatchNorm2d(3)
        self.tail = nn.Linear(3, 2)

    def forward(self, x):
        f1 = self.stem(x)
        f2 = self.down(f1)
        y = self.head_bn(f1).mean((2, 3)) + self.head_bn(f2).mean((2, 3))
        return self.tail(y)


@pytest.mark.parametrize("stop_early", [None, True, False])
def test_reused_layer_accumulates_every_call(stop_early):
    torch.manual_seed(11)
    model = SharedHead()
    batches = [shifted(32, 1, 8, 8) for _ in range(3)]
    truth = ground_truth(model, batches)
    assert truth["head_bn"]["count"] == 3 * 32 * (64 + 16)
    stats = recompute_bn_stats(model, batches, stop_early=stop_early)
    assert_close_to_truth(stats, truth)
    ours = copy.deepcopy(model).train()
    update_bn_stats(ours, batches, num_iters=3)  # fvcore would assert here
    var_n = truth["head_bn"]["var"] * (truth["head_bn"]["count"] - 1) / truth["head_bn"]["count"]
    torch.testing.assert_close(ours.head_bn.running_var.double(), var_n, rtol=1e-6, atol=0)
    assert ours.head_bn.num_batches_tracked.item() == 6


def test_stop_early_skips_layers_after_the_last_bn():
    model = cnn(12)
    calls = []
    model.head.register_forward_hook(lambda *_: calls.append(1))
    batches = [shifted(32, 1, 8, 8) for _ in range(4)]
    a = recompute_bn_stats(model, batches, apply=False, stop_early=True)
    assert len(calls) == 1  # only the first batch, which learns the call order, runs the head
    b = recompute_bn_stats(model, batches, apply=False)
    assert len(calls) == 5  # a whole-model pass runs whole by default
    for n in a:
        assert torch.equal(a[n].mean, b[n].mean) and torch.equal(a[n].var, b[n].var)
    first = [model.features[1]]  # a subset: stopped by default ...
    c = recompute_bn_stats(model, batches, layers=first, apply=False)
    assert len(calls) == 6 and torch.equal(c["features.1"].var, a["features.1"].var)
    recompute_bn_stats(model, batches, layers=first, forward_fn=lambda m, x: m(x), apply=False)
    assert len(calls) == 10  # ... unless forward_fn is given


class _MultiCrop(nn.Module):
    """The backbone runs once per crop group, and items carry different numbers of groups."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, crops):
        return [self.body(self.stem(c)).mean((2, 3)) for c in crops]


@pytest.mark.parametrize("stop_early", [None, True])
def test_stop_early_runs_inputs_of_another_structure_to_the_end(stop_early):
    """The call pattern is learned on the first item (one crop group); items with two groups
    call the stem's BN twice, so they are not cut after its first call."""
    torch.manual_seed(15)
    model = _MultiCrop()
    data = [[shifted(8, 3, 6, 6)]] + [[shifted(8, 3, 6, 6), shifted(8, 3, 3, 3)]
                                      for _ in range(3)]
    items = lambda item: item  # noqa: E731 - the model takes the whole list
    truth = ground_truth(model, data, names=["stem.1"])
    assert truth["stem.1"]["count"] == 4 * 8 * 36 + 3 * 8 * 9
    stats = recompute_bn_stats(model, data, layers=["stem.1"], stop_early=stop_early,
                               input_fn=items)
    assert_close_to_truth(stats, truth)


def test_input_signature_sees_structure_shapes_and_scalars():
    """What decides whether a forward may be cut early (stop_early) or replay a CUDA graph."""
    import numpy as np

    from fastpbn.precise._forward import _signature

    def item(n=2, rows=3, crops=1):
        return {"x": [torch.zeros(4, 3)] * crops, "a": np.zeros((rows, 2)), "n": n}

    assert _signature(item()) == _signature(item())
    for other in (item(n=3), item(rows=4), item(crops=2), [item()]):
        assert _signature(other) != _signature(item())


class _Energy(nn.Module):
    """A forward that differentiates inside (forces = -dE/dx of an energy model)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (f,) = torch.autograd.grad(self.net(x).sum(), x)
        return -f


def test_forward_that_runs_autograd_inside():
    torch.manual_seed(16)
    model = _Energy()
    data = [torch.randn(64, 6) * 2 + 3 for _ in range(3)]
    truth = ground_truth(model, data)
    assert_close_to_truth(recompute_bn_stats(model, data), truth)
    ours = copy.deepcopy(model).train()
    update_bn_stats(ours, data, num_iters=3)
    n = truth["net.1"]["count"]
    torch.testing.assert_close(ours.net[1].running_var.double(),
                               truth["net.1"]["var"] * (n - 1) / n, rtol=1e-6, atol=0)


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_channels_with_variance_far_below_eps(eps):
    """Small activations (PyTorch's kernel path): a variance read back from
    1/sqrt(var + eps) would be 2e-3 (eps 1e-5) to 0.16 (eps 1e-3) off at std 1e-5."""
    torch.manual_seed(17)
    model = nn.Sequential(nn.BatchNorm2d(6, eps=eps))
    scale = torch.tensor([1, 1e-2, 1e-3, 1e-4, 1e-5, 0]).view(1, 6, 1, 1)
    data = [torch.randn(32, 6, 8, 8) * scale + 0.5 for _ in range(3)]
    truth = ground_truth(model, data)["0"]
    stats = recompute_bn_stats(model, data)["0"]
    assert stats.var[5] == 0 and model[0].running_var[5] == 0  # a constant channel
    assert ((stats.var[:5] - truth["var"][:5]).abs() / truth["var"][:5]).max() < 1e-6
    layer = FastPreciseBN2d(6, eps=eps)  # a training forward's accumulator: the same path
    layer.accumulator = WelfordState(6)
    layer(data[0])
    var = data[0].double().var((0, 2, 3))
    assert ((layer.accumulator.var()[:5] - var[:5]).abs() / var[:5]).max() < 1e-6


def _wrap_forward(layer, fn):
    """Replace ``layer.forward`` on the instance, as hook libraries do; returns its calls."""
    inner, calls = layer.forward, []

    def forward(x):
        calls.append(len(x))
        return inner(fn(x))

    layer.forward = forward
    return calls


@pytest.mark.parametrize("cls", [nn.BatchNorm2d, FastPreciseBN2d])
def test_layer_whose_forward_a_wrapper_replaced(cls):
    """The wrapper runs; a FastPreciseBN layer is measured on what it normalizes (the
    wrapper's transformed input), a stock one on its input."""
    torch.manual_seed(18)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          cls(4))
    data = [shifted(16, 2, 8, 8) for _ in range(3)]
    truth = ground_truth(model, data)
    first = _wrap_forward(model[1], lambda x: x)
    scale, shift = (0.5, 3.0) if cls is FastPreciseBN2d else (1.0, 0.0)
    last = _wrap_forward(model[4], lambda x: x * scale + shift)
    wrapper = model[1].forward
    stats = recompute_bn_stats(model, data)
    assert first == last == [16] * 3 and model[1].forward is wrapper
    assert_close_to_truth({"1": stats["1"]}, {"1": truth["1"]})
    t = truth["4"]
    assert_close_to_truth({"4": stats["4"]}, {"4": dict(t, mean=t["mean"] * scale + shift,
                                                        var=t["var"] * scale**2)})


class _SideEffects(nn.Module):
    """A forward with state changes after its last BN layer."""

    def __init__(self):
        super().__init__()
        self.bn1, self.bn2, self.log = nn.BatchNorm2d(2), nn.BatchNorm2d(2), []
        self.in_forward = False

    def forward(self, x):
        self.in_forward = True
        y = self.bn2(self.bn1(x))
        self.log.append(len(x))
        self.in_forward = False
        return y


def test_whole_model_pass_keeps_the_forward_side_effects():
    model = _SideEffects()
    batches = [shifted(8, 2, 4, 4) for _ in range(4)]
    recompute_bn_stats(model, batches)
    assert not model.in_forward and model.log == [8] * 4


# ---- modes, selection, inputs ----------------------------------------------------------------

def test_dropout_off_and_other_modules_eval_during_pass():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4)).train()
    batches = [shifted(16, 1, 6, 6) for _ in range(3)]
    truth = ground_truth(model, [torch.cat(batches)])
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append((m.training, torch.equal(i[0], o))))
    stats = recompute_bn_stats(model, batches, batch_size=48)
    assert_close_to_truth(stats, truth)
    assert seen == [(False, True)]
    assert all(m.training for m in model.modules())


def test_modes_momentum_hooks_restored_and_frozen_layer_untouched():
    model = cnn(14)
    model.train()
    model.features[1].eval()  # a frozen layer
    model.features[4].momentum = None
    model.features[8].momentum = 0.3
    model.features[4].register_forward_pre_hook(lambda *_: None)
    frozen = {k: v.clone() for k, v in model.features[1].state_dict().items()}
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    flags = [m.training for m in model.modules()]
    batches = [shifted(32, 1, 8, 8) for _ in range(2)]
    names = ["features.4", "features.8"]
    truth = ground_truth(model, batches, names)
    stats = recompute_bn_stats(model, batches, layers=lambda n, m: n != "features.1")
    assert_close_to_truth(stats, truth)
    assert [m.training for m in model.modules()] == flags
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks
    assert model.features[4].momentum is None and model.features[8].momentum == 0.3
    assert all(torch.equal(v, frozen[k]) for k, v in model.features[1].state_dict().items())
    assert all(m.track_running_stats for m in model.modules() if hasattr(m, "running_mean"))
    # a list of modules selects the same
    s2 = recompute_bn_stats(model, batches, layers=[model.features[8], model.features[4]],
                            apply=False)
    assert list(s2) == names


def test_data_items_input_fn_forward_fn_device():
    model = cnn(15)
    xs = [shifted(16, 1, 8, 8) for _ in range(2)]
    ref = recompute_bn_stats(model, xs, apply=False, batch_size=32)
    variants = [
        dict(data=[(x, torch.zeros(16)) for x in xs]),
        dict(data=[{"label": 0, "image": x} for x in xs]),
        dict(data=[{"pixels": x} for x in xs], input_fn=lambda d: d["pixels"]),
        dict(data=[(x,) for x in xs], forward_fn=lambda m, inp: m(inp[0]),
             input_fn=lambda item: item),
        dict(data=xs, device="cpu"),
    ]
    for kw in variants:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = recompute_bn_stats(model, apply=False, batch_size=32, **kw)
        for n in ref:
            assert torch.equal(s[n].mean, ref[n].mean) and torch.equal(s[n].var, ref[n].var)
    with pytest.raises(ValueError, match="none of"):
        recompute_bn_stats(model, [{"pixels": xs[0]}])


def test_small_batch_warning():
    """Warned whether the loader's batches or ``batch_size`` are small, at the caller's line."""
    with pytest.warns(UserWarning, match="batch of 8 samples") as caught:
        recompute_bn_stats(cnn(16), [shifted(8, 1, 8, 8)], apply=False)
    with pytest.warns(UserWarning, match="batch of 16 samples") as caught_too:
        recompute_bn_stats(cnn(16), [shifted(32, 1, 8, 8)], batch_size=16, apply=False)
    assert {w.filename for w in [*caught, *caught_too]} == {__file__}


# ---- nothing lost ----------------------------------------------------------------------------

def failing(batches, at, exc):
    for i, b in enumerate(batches):
        if i == at:
            raise exc
        yield b


@pytest.mark.parametrize("exc", [RuntimeError("loader broke"), KeyboardInterrupt()])
def test_exception_mid_loop_leaves_model_bitwise_unchanged(exc):
    model = convert_model(cnn(17))  # FastPreciseBN layers: the accumulator must be restored
    model.features[4] = nn.BatchNorm2d(8)  # and one stock layer (hooks)
    model.train()
    snap = snapshot(model)
    batches = [shifted(32, 1, 8, 8) for _ in range(4)]
    with pytest.raises(type(exc)):
        recompute_bn_stats(model, failing(batches, 2, exc))
    assert_unchanged(model, snap)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert "accumulator" not in model.features[1].__dict__
    with pytest.raises(type(exc)):
        update_bn_stats(model, failing(batches, 2, exc), num_iters=4)
    assert_unchanged(model, snap)


class AlwaysEMA(nn.BatchNorm2d):
    """A BN subclass that updates its buffers whatever track_running_stats says."""

    def forward(self, x):
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                        self.bias, True, 0.1, self.eps)


def test_buffers_restored_even_for_a_layer_ignoring_track_running_stats():
    torch.manual_seed(26)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), AlwaysEMA(3))
    snap = snapshot(model)
    batches = [shifted(32, 1, 6, 6) for _ in range(3)]
    with pytest.raises(RuntimeError, match="loader broke"):
        recompute_bn_stats(model, failing(batches, 2, RuntimeError("loader broke")))
    assert_unchanged(model, snap)
    stats = recompute_bn_stats(model, batches)
    assert_close_to_truth(stats, ground_truth(model, batches))
    assert torch.equal(model[1].running_var, stats["1"].var.float())


def test_nonfinite_data_raises_naming_layer_and_changes_nothing():
    model = cnn(18).train()
    snap = snapshot(model)
    bad = shifted(32, 1, 8, 8)
    bad[3, 0, 2, 2] = float("nan")
    data = [shifted(32, 1, 8, 8), bad]
    with pytest.raises(ValueError, match="features.1"):
        recompute_bn_stats(model, data)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="features.1"):
        update_bn_stats(model, data, num_iters=2)
    assert_unchanged(model, snap)


def test_wrong_dtype_raises_naming_layer_and_changes_nothing():
    """float64 data into a float32 model: the pass stops at the first BN layer, names it, and
    leaves the model as it was (stock BN raises a bare "mixed dtype" error there)."""
    model = nn.Sequential(nn.BatchNorm2d(1), cnn(19))
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="'0'.*float64"):
        recompute_bn_stats(model, [shifted(32, 1, 8, 8).double()])
    # integer data: refused, as the layer's own forward refuses it (the CPU pass took it)
    for convert in (lambda m: m, convert_model):
        with pytest.raises(TypeError, match="'0'.*floating-point.*int64"):
            recompute_bn_stats(convert(model), [torch.randint(0, 5, (32, 1, 8, 8))])
        assert_unchanged(model, snap)


def test_empty_data_no_bn_never_ran_and_bad_arguments():
    model = cnn(19)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="no samples"):
        recompute_bn_stats(model, [])
    with pytest.raises(ValueError, match="stopped after 0"):
        update_bn_stats(model, [], num_iters=3)
    assert_unchanged(model, snap)
    with pytest.warns(UserWarning, match="no BatchNorm"):
        s = recompute_bn_stats(nn.Sequential(nn.Linear(2, 2)), [torch.randn(4, 2)])
    assert len(s) == 0
    unused = nn.ModuleDict({"used": nn.BatchNorm1d(2), "unused": nn.BatchNorm1d(2)})
    unused.forward = lambda x: unused["used"](x)
    with pytest.raises(RuntimeError, match="unused"):  # selected by name: it must run
        recompute_bn_stats(unused, [shifted(40, 2)], layers=["used", "unused"])
    unused.forward = lambda x: x
    with pytest.raises(RuntimeError, match=r"\['used', 'unused'\] never ran"):  # none ran
        recompute_bn_stats(unused, [shifted(40, 2)])
    assert_unchanged(unused, snapshot(unused))
    for kw, match in [(dict(estimator="ema"), "estimator"), (dict(batch_size=1), "batch_size"),
                      (dict(num_samples=0), "num_samples"), (dict(tol=-1.0), "tol"),
                      (dict(tol=True), "tol"),
                      (dict(layers=[nn.ReLU()]), "layers"), (dict(cuda_graph=True), "cuda"),
                      (dict(device="gpu0"), "device='gpu0'")]:
        with pytest.raises(ValueError, match=match):
            recompute_bn_stats(model, [shifted(4, 1, 8, 8)], **kw)
    with pytest.raises(TypeError, match="model"):
        recompute_bn_stats(lambda x: x, [])
    with pytest.raises(TypeError, match="layers must be"):
        recompute_bn_stats(model, [shifted(4, 1, 8, 8)], layers=3)
    # one tensor as data: said so (it was iterated sample by sample, and a BN layer blamed)
    with pytest.raises(TypeError, match="got one tensor: pass \\[data\\]"):
        recompute_bn_stats(model, shifted(4, 1, 8, 8))
    assert_unchanged(model, snap)

    class Indexed:  # iterable through __getitem__ alone, as Python allows
        def __getitem__(self, i):
            if i >= 2:
                raise IndexError(i)
            return shifted(4, 1, 8, 8)

    assert recompute_bn_stats(model, Indexed(), apply=False).num_batches == 2


class AuxHead(nn.Module):
    """A classifier with an auxiliary head that runs only in training (GoogLeNet, Inception)."""

    def __init__(self):
        super().__init__()
        self.body = cnn(21)
        self.aux = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x):
        y = self.body(x)
        return (y, self.aux(x)) if self.training else y


@pytest.mark.parametrize("tol", [None, 1.0])
def test_default_selection_leaves_layers_the_pass_never_runs(tol):
    """The pass runs the model in eval mode, where the auxiliary head does not run: with the
    default selection its layer is left as it is, with a warning (after a pass over all the
    data, an error would lose it), and ``converged`` is judged on the layers that ran."""
    model = AuxHead()
    model.aux[1].running_mean.fill_(3.0)
    batches = [shifted(32, 1, 8, 8) for _ in range(10)]
    with pytest.warns(UserWarning, match=r"\['aux.1'\] never ran"):
        stats = recompute_bn_stats(model, batches, tol=tol)
    assert stats.num_batches == len(batches)  # with tol, the layer might have run later
    assert stats.converged is (None if tol is None else True)
    truth = ground_truth(model.body, batches)
    assert "aux.1" not in stats
    assert_close_to_truth(stats, {f"body.{n}": t for n, t in truth.items()})
    assert (model.aux[1].running_mean == 3.0).all() and (model.aux[1].running_var == 1.0).all()
    with pytest.raises(RuntimeError, match="aux.1"):  # selected explicitly: it must run
        recompute_bn_stats(model, batches, layers=lambda n, m: True)


def test_tol_waits_for_a_layer_that_runs_later():
    """A layer that the data reaches only from the fourth batch on is recomputed, not left out
    because everything that had run had converged."""
    model = nn.ModuleDict({"body": nn.BatchNorm1d(4), "rare": nn.BatchNorm1d(4)})
    model.forward = lambda item: model["rare"](item[0]) if item[1] else model["body"](item[0])
    batches = [(shifted(64, 4), k >= 3) for k in range(12)]
    stats = recompute_bn_stats(model, batches, input_fn=lambda item: item, tol=2.0,
                               tol_every=1)
    assert set(stats) == {"body", "rare"} and stats.converged
    assert stats.num_batches >= 5  # the rare layer's spread needs two of its calls


# ---- PopulationStats -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["safetensors", "torch"])
@pytest.mark.parametrize("name", ["stats.bin", "stats.safetensors"])
def test_apply_false_save_load_round_trip(tmp_path, monkeypatch, backend, name):
    """A round trip in either format, under any name: where safetensors is not installed a
    ".safetensors" name gets torch.save's format with a warning, and load reads it back
    (given the path, torch.load read it as safetensors, by its extension)."""
    model = cnn(20)
    snap = snapshot(model)
    batches = [shifted(32, 1, 8, 8) for _ in range(2)]
    stats = recompute_bn_stats(model, batches, apply=False, batch_size=64)
    assert_unchanged(model, snap)
    if backend == "torch":
        monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # force the fallback
    else:
        pytest.importorskip("safetensors")
    path = tmp_path / name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats.save(path)
    warned = sum("safetensors is not installed" in str(w.message) for w in caught)
    assert warned == (backend == "torch" and name == "stats.safetensors")
    loaded = PopulationStats.load(path)
    assert list(loaded) == list(stats)
    for n in stats:
        for a, b in zip(stats[n], loaded[n]):
            assert torch.equal(a, b)
    assert loaded == stats and not loaded != stats
    changed = PopulationStats({n: (s.mean + (n == "features.8"), s.var, s.count)
                               for n, s in stats.items()}, estimator=stats.estimator,
                              num_samples=64, num_batches=1, batch_size=64)
    assert changed != stats and changed != dict(stats)
    assert changed == PopulationStats({n: changed[n] for n in reversed(list(changed))},
                                      estimator="population", num_samples=64, num_batches=1,
                                      batch_size=64)
    assert (loaded.estimator, loaded.num_samples, loaded.num_batches, loaded.batch_size,
            loaded.converged) == ("population", 64, 1, 64, None)
    loaded.apply(model)
    applied = copy.deepcopy(model)
    fresh = cnn(20)
    recompute_bn_stats(fresh, batches, batch_size=64)
    for k, v in fresh.state_dict().items():
        assert torch.equal(applied.state_dict()[k], v), k
    assert "features.8" in repr(loaded) and "samples=64" in repr(loaded)


def test_apply_errors_change_nothing():
    model = cnn(21)
    stats = recompute_bn_stats(model, [shifted(32, 1, 8, 8)], apply=False)
    other = cnn(22)
    other.features[8] = nn.BatchNorm2d(5)  # channel mismatch in the last layer
    snap = snapshot(other)
    with pytest.raises(ValueError, match="features.8"):
        stats.apply(other)
    assert_unchanged(other, snap)
    with pytest.raises(ValueError, match="no layer 'features.1'"):
        stats.apply(nn.Sequential())
    # statistics a float16 buffer cannot hold (they were written as inf, silently)
    half = cnn(21)
    half.features[8].half()
    big = PopulationStats({n: (s.mean * 1e5, s.var * 1e10, s.count) for n, s in stats.items()})
    snap = snapshot(half)
    with pytest.raises(ValueError, match="features.8.*overflow.*float16"):
        big.apply(half)
    assert_unchanged(half, snap)
    # a write that fails (an overlapping buffer) after others were written: all put back, and
    # the error names the layer (the rollback failed on that buffer and hid it)
    other = cnn(23)
    last = other.features[8]
    last.running_var = torch.ones(1).expand(last.num_features)
    snap = snapshot(other)
    with pytest.raises(RuntimeError, match="features.8.*cannot write"):
        stats.apply(other)
    assert_unchanged(other, snap)


def test_apply_into_inference_buffers_names_the_layer_and_writes_nothing():
    """The last layer's buffers cannot be written (inference tensors): the error names it and
    nothing is written."""
    model = cnn(29)
    stats = recompute_bn_stats(model, [shifted(32, 1, 8, 8)], apply=False)
    last = model.features[8]
    with torch.inference_mode():
        rm, rv = last.running_mean.clone(), last.running_var.clone()
    last.running_mean, last.running_var = rm, rv
    snap = snapshot(model)
    with pytest.raises(ValueError, match="features.8.*inference"):
        stats.apply(model)
    assert_unchanged(model, snap)
    with torch.inference_mode():
        stats.apply(model)
    assert torch.equal(last.running_mean, stats["features.8"].mean.float())


def test_invalid_stats_are_rejected_on_construction_and_load(tmp_path):
    with pytest.raises(ValueError, match="layer 'bn'.*finite"):
        PopulationStats({"bn": ([0.0, float("nan")], [1.0, 1.0], [4, 4])})
    with pytest.raises(ValueError, match="layer 'bn'.*non-negative"):
        PopulationStats({"bn": ([0.0, 0.0], [1.0, -1.0], [4, 4])})
    with pytest.raises(ValueError, match="layer 'bn'.*count a non-negative integer"):
        PopulationStats({"bn": ([0.0], [1.0], [0.5])})
    for value in ((torch.tensor([1j]), [1.0], [4]), (torch.zeros(1, device="meta"), [1.0], [4]),
                  ([0.0], [1.0])):
        with pytest.raises(ValueError, match="layer 'bn': \\(mean, var, count\\) must be three"):
            PopulationStats({"bn": value})
    good = PopulationStats({"bn": ([0.0, 1.0], [1.0, 2.0], [4, 4])})
    path = tmp_path / "stats.safetensors"
    good.save(path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(ValueError, match="stats.safetensors: cannot read PopulationStats"):
        PopulationStats.load(path)
    foreign = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="weights.pt: cannot read PopulationStats: missing"):
        PopulationStats.load(foreign)
    with pytest.raises(FileNotFoundError):
        PopulationStats.load(tmp_path / "absent")


@pytest.mark.parametrize("kwargs, message", [
    ({"estimator": "median"}, "estimator must be one of"),
    ({"num_samples": -1}, "num_samples must be a non-negative integer"),
    ({"num_batches": 2.5}, "num_batches must be a non-negative integer"),
    ({"num_samples": float("inf")}, "num_samples must be"),
    ({"batch_size": 0}, "batch_size must be None or a positive integer"),
    ({"batch_size": "64"}, "batch_size must be a non-negative integer"),
    ({"converged": "yes"}, "converged must be None, True or False"),
])
def test_invalid_metadata_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PopulationStats({"bn": ([0.0], [1.0], [4])}, **kwargs)


@pytest.mark.parametrize("backend", ["safetensors", "torch"])
@pytest.mark.parametrize("edit, message", [
    (lambda meta, t: t.update({"bn.mean": t["bn.mean"].float()}), "'bn.mean' is torch.float32"),
    (lambda meta, t: t.update({"bn.var": t["bn.var"].reshape(1, 2)}), r"shape \(1, 2\)"),
    (lambda meta, t: t.update({"other.mean": torch.zeros(2, dtype=torch.float64)}),
     "entries no layer names: \\['other.mean'\\]"),
    (lambda meta, t: meta.update({"layers": '["bn", "bn"]'}), "not a list of distinct names"),
    (lambda meta, t: meta.update({"layers": '{"bn": 1}'}), "not a list of distinct names"),
    (lambda meta, t: meta.update({"estimator": "mode"}), "estimator must be one of"),
    (lambda meta, t: meta.update({"num_samples": "-3"}), "num_samples is '-3', not a count"),
    (lambda meta, t: meta.update({"num_batches": "8_0"}), "num_batches is '8_0', not a count"),
    (lambda meta, t: meta.update({"num_samples": " 8 "}), "num_samples is ' 8 ', not a count"),
    (lambda meta, t: meta.update({"converged": "3"}), "converged must be None, True or False"),
])
def test_load_rejects_files_save_never_writes(tmp_path, monkeypatch, backend, edit, message):
    """A file in the right format whose content :meth:`save` could not have written (edited,
    or written by other code) is refused on load, naming the file and what is wrong."""
    good = PopulationStats({"bn": ([0.0, 1.0], [1.0, 2.0], [4, 4])}, num_samples=4)
    meta = good._metadata()
    tensors = {f"bn.{f}": getattr(good["bn"], f).clone() for f in ("mean", "var", "count")}
    edit(meta, tensors)
    path = tmp_path / "edited.bin"
    if backend == "torch":
        torch.save({"metadata": meta, "tensors": tensors}, path)
    else:
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=f"edited.bin: cannot read PopulationStats: .*{message}"):
        PopulationStats.load(path)


def test_population_stats_own_their_values_and_keep_to_what_they_can_write(tmp_path):
    """Constructor: its own copies (a caller's later change cannot slip past the checks),
    string names, counts as ints; apply refuses statistics that overflow a float32 buffer
    as it did float16 ones, writing nothing; a zero-channel layer prints and drifts; drift
    reads inference-tensor buffers."""
    mean = torch.tensor([0.0, 1.0], dtype=torch.float64)
    stats = PopulationStats({"bn": (mean, [1.0, 2.0], [4, 4])}, batch_size=8.0,
                            num_samples=10**30)
    mean[0] = float("nan")
    assert stats["bn"].mean[0] == 0 and type(stats.batch_size) is int
    with pytest.raises(ValueError, match="layer names must be strings"):
        PopulationStats({0: ([0.0], [1.0], [4])})
    with pytest.raises(ValueError, match="num_samples must be a non-negative integer"):
        PopulationStats({}, num_samples=float("inf"))
    assert PopulationStats({}, num_samples=10**400).num_samples == 10**400
    model = nn.Sequential(nn.BatchNorm2d(2))
    snap = snapshot(model)
    big = PopulationStats({"0": (torch.tensor([1e300, 0.0], dtype=torch.float64), [1.0, 1.0],
                                 [4, 4])})
    with pytest.raises(ValueError, match="'0'.*overflow.*float32"):
        big.apply(model)
    assert_unchanged(model, snap)
    empty = PopulationStats({"0": ([], [], [])})
    assert "C=0" in repr(empty)
    assert empty.drift(nn.Sequential(nn.BatchNorm2d(0)))[0]["mean_err_max"] == 0.0
    with torch.inference_mode():
        frozen = nn.Sequential(nn.BatchNorm2d(2))
    rows = PopulationStats({"0": ([0.0, 0.0], [1.0, 1.0], [4, 4])}).drift(frozen)
    assert rows[0]["mean_err_max"] == 0.0


def test_a_safetensors_file_whose_header_reads_pk_loads(tmp_path):
    """A safetensors file begins with its header's length: 19280 bytes reads "PK", which load
    took for a torch.save zip archive. Layer names long enough to give that length."""
    path = tmp_path / "s.safetensors"
    pytest.importorskip("safetensors")

    def header_len(n):
        PopulationStats({"x" * n: ([0.0], [1.0], [4])}).save(path)
        return int.from_bytes(path.read_bytes()[:8], "little")

    base = header_len(0)
    n = (0x4B50 - base) // 4
    while header_len(n) < 0x4B50:
        n += 1
    assert path.read_bytes()[:2] == b"PK"
    assert list(PopulationStats.load(path)) == ["x" * n]


def test_drift_reports_how_far_the_ema_is():
    model = cnn(23)
    stats = recompute_bn_stats(model, [shifted(64, 1, 8, 8)])
    rows = stats.drift(model)
    assert [r["layer"] for r in rows] == list(stats)
    assert all(r["mean_err_max"] < 1e-6 and r["std_err_max"] < 1e-6 for r in rows)
    s = stats["features.4"]
    with torch.no_grad():
        model.features[4].running_mean.copy_(s.mean + 0.5 * s.var.sqrt())
        model.features[4].running_var.copy_(s.var * 4)
    row = stats.drift(model)[1]
    assert row["mean_err_max"] == pytest.approx(0.5, rel=1e-5)
    assert row["std_err_max"] == pytest.approx(1.0, rel=1e-5)
    assert "features.4" in PopulationStats.format_drift(stats.drift(model))
    # channels with population variance 0: agreement is 0 error, a difference infinite, a
    # NaN running statistic NaN (it was reported as 0)
    zero = PopulationStats({"0": (torch.ones(3), torch.zeros(3), torch.full((3,), 8.0))})
    for running, expected in [(1.0, 0.0), (2.0, math.inf), (math.nan, math.nan)]:
        layer = nn.Sequential(nn.BatchNorm2d(3))
        with torch.no_grad():
            layer[0].running_mean.fill_(running), layer[0].running_var.zero_()
        got = zero.drift(layer)[0]["mean_err_max"]
        assert got == expected or math.isnan(got) and math.isnan(expected), (running, got)


def test_small_resnet_with_fastprecisebn_population():
    torch.manual_seed(24)
    model = convert_model(small_resnet(width=4))
    batches = [shifted(8, 3, 16, 16, mean=5.0) for _ in range(4)]
    truth = ground_truth(model, [torch.cat(batches)])
    stats = recompute_bn_stats(model, batches, batch_size=32)
    # deep layers see activations whose float32 rounding differs from the stock model's
    assert_close_to_truth(stats, truth, rtol=1e-5)


def test_fastprecisebn_accumulator_in_the_triton_stats_kernel():
    """The accumulator path through kernel K1 (the Triton interpreter on CPU)."""
    pytest.importorskip("triton")
    import fastpbn

    if fastpbn._backend.TritonBackend().not_supported_reasons(torch.zeros(2, 2)):
        pytest.skip("the triton backend cannot run here")
    torch.manual_seed(27)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), FastPreciseBN2d(3), nn.ReLU(), FastPreciseBN2d(3))
    batches = [shifted(16, 2, 6, 6) for _ in range(3)]
    fastpbn.set_backend("triton")
    stats = recompute_bn_stats(model, batches)  # three batches: the kernel merges across them
    # float32 arithmetic in the kernel, float64 across batches
    assert_close_to_truth(stats, ground_truth(model, batches), rtol=1e-5)


# ---- CUDA ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("convert", [False, True])
def test_cuda_graph_and_pinned_prefetch_match_eager(convert):
    model = cnn(25).cuda()
    if convert:
        model = convert_model(model)
    data = [shifted(16, 1, 8, 8).pin_memory() for _ in range(9)]  # remainder batch runs eager
    eager = recompute_bn_stats(model, data, batch_size=32, apply=False)
    graph = recompute_bn_stats(model, data, batch_size=32, apply=False, cuda_graph=True)
    for n in eager:  # float32-level: cuDNN need not pick the same algorithm under capture
        # (a batch counted twice or missed is off by percents, not 1e-6)
        assert graph[n].count.equal(eager[n].count)
        torch.testing.assert_close(graph[n].mean, eager[n].mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(graph[n].var, eager[n].var, rtol=1e-6, atol=1e-7)
    truth = ground_truth(model, [torch.cat(data[i:i + 2]).cuda() for i in range(0, 9, 2)])
    assert_close_to_truth(eager, truth, rtol=1e-6)


@pytest.mark.gpu
def test_cuda_graph_with_a_pinning_dataloader():
    """A DataLoader whose pin-memory thread allocates pinned buffers while the forward is being
    captured: the capture (thread-local) neither fails nor breaks the loader."""
    from torch.utils.data import DataLoader, TensorDataset

    model = cnn(28).cuda()
    data = torch.cat([shifted(16, 1, 8, 8) for _ in range(8)])
    loader = DataLoader(TensorDataset(data), batch_size=16, num_workers=2, pin_memory=True)
    eager = recompute_bn_stats(model, loader, batch_size=32, apply=False)
    graph = recompute_bn_stats(model, loader, batch_size=32, apply=False, cuda_graph=True)
    for n in eager:
        torch.testing.assert_close(graph[n].mean, eager[n].mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(graph[n].var, eager[n].var, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("convert", [False, True])
def test_gpu_pass_does_not_synchronize_between_batches(convert):
    """No host synchronization per batch: from the second forward to the last, any
    synchronizing CUDA call (``.item()``, a device-to-host copy, ...) raises."""
    model = cnn(26).cuda()
    if convert:
        model = convert_model(model)
    data = [shifted(16, 1, 8, 8).cuda() for _ in range(6)]
    calls = []

    def forward_fn(m, x):
        calls.append(len(calls))
        torch.cuda.set_sync_debug_mode("error" if 1 <= calls[-1] < len(data) - 1 else "default")
        return m(x)

    try:
        stats = recompute_bn_stats(model, data, forward_fn=forward_fn, apply=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == len(data)
    assert_close_to_truth(stats, ground_truth(model, data), rtol=1e-6)


def test_cpu_population_pass_merges_once_per_forward_and_matches_per_call_merging():
    """On CPU the population pass stages each layer's batch and merges all layers after the
    forward (one vectorized merge); the result equals per-call merging (the path ``tol``
    takes) to float32 rounding, and nothing of the fast path outlives the pass."""
    torch.manual_seed(31)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), FastPreciseBN2d(3))
    seen = []

    def forward_fn(m, x):
        seen.append({type(getattr(layer.forward, "__self__", None)).__name__ + "."
                     + layer.forward.__func__.__qualname__ for layer in (m[1], m[3])})
        return m(x)

    batches = [shifted(n, 2, 6, 6) for n in (16, 9, 16)]
    flat = recompute_bn_stats(model, batches, forward_fn=forward_fn, apply=False)
    assert seen[0] == {"BatchNorm2d.FlatStats.forward_for.<locals>.forward",
                       "FastPreciseBN2d.FlatStats.forward_for.<locals>.forward"}
    assert "forward" not in model[1].__dict__ and "forward" not in model[3].__dict__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol is not reached: every batch is used
        per_call = recompute_bn_stats(model, batches, tol=1e-12, apply=False)
    for n in flat:
        torch.testing.assert_close(flat[n].count, per_call[n].count, rtol=0, atol=0)
        # float32 per batch (layers with small |mean|/std are not shifted on this path)
        torch.testing.assert_close(flat[n].mean, per_call[n].mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(flat[n].var, per_call[n].var, rtol=1e-6, atol=0)
    truth = ground_truth(model, batches)
    assert_close_to_truth(flat, truth)


def test_cpu_pass_keeps_the_shift_only_where_the_mean_dwarfs_the_std():
    """On small activations (PyTorch's kernel) the CPU fast path runs a layer unshifted while
    its calls show small |mean|/std, keeps the shift for a layer at |mean|/std = 1e4, and
    both stay exact."""
    from fastpbn.precise import _batched

    torch.manual_seed(37)
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    batches = [torch.randn(16, 2, 6, 6) + 1e4 for _ in range(4)]
    seen = []
    original = _batched.FlatStats.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self)

    _batched.FlatStats.__init__ = spy
    try:
        stats = recompute_bn_stats(model, batches)
    finally:
        _batched.FlatStats.__init__ = original
    assert [f.shift for f in seen] == [[True, False]]
    truth = ground_truth(model, batches)
    assert_close_to_truth({"0": stats["0"]}, {"0": truth["0"]}, rtol=1e-6)
    # layer 2 sees layer 0's output: the stock forward behind the truth normalizes data at
    # |mean|/std = 1e4 with a rounded mean (ours is shifted), so the truth itself is off there
    assert_close_to_truth({"2": stats["2"]}, {"2": truth["2"]}, rtol=1e-4)



@pytest.mark.parametrize("shape", [(16, 4, 6, 6), (16, 4, 32, 32)])  # PyTorch's kernel; centred
def test_cpu_pass_shifts_a_layer_once_a_later_batch_is_far_from_zero(shape):
    """With per-call statistics the unshifted CPU path is checked on every call, not only the
    first: a layer whose first batch is centred and whose second sits at |mean|/std = 1e4
    kept its float32-rounded mean for that batch (5e-4 std off in the per-call means of
    estimator="batch_mean"). The pooled statistics keep the first call's decision: the spread
    between the batches dwarfs that rounding."""
    gen = torch.Generator().manual_seed(38)
    centred = torch.randn(*shape, generator=gen)
    far = torch.randn(*shape, generator=gen) + 1e4
    for batches in ([centred, far], [far, centred]):
        stats = recompute_bn_stats(nn.BatchNorm2d(4), batches, estimator="batch_mean",
                                   apply=False)[""]
        per_call = [b.double().transpose(0, 1).reshape(4, -1) for b in batches]
        mean = torch.stack([v.mean(1) for v in per_call]).mean(0)
        var = torch.stack([v.var(1) for v in per_call]).mean(0)
        assert ((stats.mean - mean).abs() / var.sqrt()).max() < 1e-6
        torch.testing.assert_close(stats.var, var, rtol=1e-5, atol=0)
        pooled = recompute_bn_stats(nn.BatchNorm2d(4), batches, apply=False)[""]
        values = torch.cat(per_call, 1)
        assert ((pooled.mean - values.mean(1)).abs() / values.std(1)).max() < 1e-6
        torch.testing.assert_close(pooled.var, values.var(1), rtol=1e-6, atol=0)

class _ScaledStockBN(nn.BatchNorm2d):
    """A stock subclass whose forward normalizes something other than its input."""

    def forward(self, x):
        return super().forward(x * 10)


class _ScaledFastBN(FastPreciseBN2d):
    def forward(self, x):
        return super().forward(x * 10)


class _BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: its own forward, F.batch_norm on its buffers, then act."""

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        bn_training = self.training or self.running_mean is None
        use = not self.training or self.track_running_stats
        y = nn.functional.batch_norm(x, self.running_mean if use else None,
                                     self.running_var if use else None, self.weight, self.bias,
                                     bn_training, factor, self.eps)
        return torch.relu(y)


def _subclass_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), _ScaledStockBN(3), _ScaledFastBN(3),
                         _BatchNormAct(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))


@pytest.mark.parametrize("estimator", ["population", "batch_mean"])
def test_bn_subclasses_keep_their_own_forward(estimator):
    """Only the exact stock and FastPreciseBN classes get the pass's fast forwards (the CPU
    fast path, the borrowed forward): a subclass's own forward still runs (its activation, its
    input scaling), so every later layer sees what it sees in the model. Every layer is
    measured on what it normalizes: a stock subclass on what reaches the stock forward (its
    input x 10 here; it was measured at its input, silently wrong, before), one that calls
    F.batch_norm itself on its input; the model's classes are its own again after."""
    model = _subclass_model(40)
    classes = [type(m) for m in model]
    batches = [shifted(8, 2, 6, 6) for _ in range(4)]
    snap = snapshot(model)
    stats = recompute_bn_stats(model, batches, batch_size=8, estimator=estimator, apply=False)
    assert_unchanged(model, snap)
    assert [type(m) for m in model] == classes and "forward" not in vars(model[1])
    truth = ground_truth(model, batches)
    for name in ("1", "2"):  # _ScaledStockBN, _ScaledFastBN: they normalize 10x their input
        t = truth[name]
        t.update(mean=t["mean"] * 10, bmean=t["bmean"] * 10, var=t["var"] * 100,
                 bvar=t["bvar"] * 100)
    assert_close_to_truth(stats, truth, estimator, rtol=1e-5)


def test_update_bn_stats_on_bn_subclasses():
    """fvcore's semantics (it reads the buffers each forward wrote) for every subclass: one
    that normalizes its input, one that reaches FastPreciseBN's forward, and a stock one that
    scales its input before ``super().forward``."""
    fvcore = pytest.importorskip("fvcore.nn.precise_bn")
    model = _subclass_model(41)
    batches = [torch.randn(8, 2, 6, 6) + 1 for _ in range(3)]
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    update_bn_stats(ours, batches, num_iters=3)
    fvcore.update_bn_stats(theirs, batches, num_iters=3)
    for i in (1, 2, 3, 5):
        torch.testing.assert_close(ours[i].running_mean, theirs[i].running_mean,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[i].running_var, theirs[i].running_var,
                                   rtol=1e-4, atol=1e-5)
    truth = ground_truth(model, batches, names=["1"])["1"]  # at its input
    torch.testing.assert_close(ours[1].running_mean.double(), truth["mean"] * 10, rtol=1e-5,
                               atol=0)
    assert type(ours[1]) is _ScaledStockBN


class _SequenceBN(nn.BatchNorm1d):
    """A BatchNorm1d over (B, T, C) sequences: transposes to (B, C, T) for the stock forward."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class _SequenceSyncBN(nn.SyncBatchNorm):
    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("cls", [_SequenceBN, _SequenceSyncBN])
def test_stock_subclass_measured_on_what_its_stock_forward_normalizes(cls):
    """T == C == 6: the layer's input has the channel count in dim 1 too, so measuring it at
    its input gave wrong statistics without any error. Both recompute_bn_stats and
    update_bn_stats now measure the transposed tensor; an error inside the pass leaves the
    layer's class as it was."""
    torch.manual_seed(43)
    model = nn.Sequential(nn.Linear(4, 6), cls(6))
    batches = [torch.randn(8, 6, 4) * torch.arange(1.0, 5.0) + 3 for _ in range(3)]
    with torch.no_grad():
        seen = torch.cat([model[0](b) for b in batches]).double().reshape(-1, 6)
    stats = recompute_bn_stats(model, batches, apply=False)["1"]
    torch.testing.assert_close(stats.mean, seen.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.var, seen.var(0), rtol=1e-5, atol=0)
    assert type(model[1]) is cls
    fv = copy.deepcopy(model).train()
    update_bn_stats(fv, batches, num_iters=3)
    torch.testing.assert_close(fv[1].running_mean, seen.mean(0).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fv[1].running_var, seen.var(0, unbiased=False).float(),
                               rtol=1e-5, atol=0)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):  # the second batch, in Linear
        recompute_bn_stats(model, [torch.randn(8, 6, 4), torch.randn(8, 6, 5)])
    assert type(model[1]) is cls and "forward" not in vars(model[1])
    assert_unchanged(model, snap)


class _ByName(nn.BatchNorm2d):
    def forward(self, x):
        return nn.BatchNorm2d.forward(self, x * 3)


class _OnBase(torch.nn.modules.batchnorm._BatchNorm):
    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        return super().forward(x * 3)


class _Functional(nn.BatchNorm2d):
    def forward(self, x):
        return nn.functional.batch_norm(x * 3, None, None, self.weight, self.bias, True, 0.0,
                                        self.eps)


class _SelfType(nn.BatchNorm2d):
    def forward(self, x):
        return super(type(self), self).forward(x * 3)  # (breaks if the class is switched)


class _Nested(nn.BatchNorm2d):
    """Normalizes 3 x what a child BN layer made of its input."""

    def __init__(self, c):
        super().__init__(c)
        self.inner = nn.BatchNorm2d(c)

    def forward(self, x):
        return super().forward(self.inner(x) * 3)


@pytest.mark.parametrize("cls", [_ByName, _OnBase, _Functional, _SelfType, _Nested])
def test_stock_subclasses_measured_where_they_normalize(cls):
    """However a stock subclass's forward reaches batch norm (the stock forward by name, a
    subclass of _BatchNorm itself, F.batch_norm, super(type(self), self), after a child BN
    layer), what it normalizes is measured; with stop_early on (a subset of the layers), a
    layer whose forward calls a selected child first is not cut short."""
    torch.manual_seed(44)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), cls(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    batches = [shifted(8, 2, 5, 5) for _ in range(3)]
    names = ["1", "1.inner"] if cls is _Nested else ["1"]
    stats = recompute_bn_stats(model, batches, layers=names, apply=False)
    with torch.no_grad():
        h = torch.cat([model[0](b) for b in batches]).double()
        if cls is _Nested:  # the child normalizes each batch by its own statistics
            h = torch.cat([nn.functional.batch_norm(model[0](b).double(), None, None,
                                                    training=True, eps=1e-5)
                           for b in batches])
    seen = (h * 3).transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(stats["1"].mean, seen.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["1"].var, seen.var(1), rtol=1e-5, atol=1e-6)
    assert type(model[1]) is cls and "forward" not in vars(model[1])


class _Doubled(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x * 2)


class _NestedNoWeight(nn.BatchNorm2d):
    """Without a weight, normalizes 3 x what a child layer (also without one) made of x."""

    def __init__(self, c):
        super().__init__(c, affine=False)
        self.inner = _Doubled(c, affine=False)

    def forward(self, x):
        return super().forward(self.inner(x) * 3)


class _AlwaysRunning(nn.BatchNorm1d):
    """A BatchNorm1d over (B, T, C) that always normalizes by its running statistics."""

    def forward(self, x):
        return nn.functional.batch_norm(x.transpose(1, 2), self.running_mean, self.running_var,
                                        self.weight, self.bias, False).transpose(1, 2)


def test_layer_that_never_normalizes_by_batch_statistics_is_measured_where_it_normalizes():
    """A measured layer whose forward makes no batch-norm call by batch statistics is measured
    at its first call by running statistics with its weight (the transposed tensor), not at
    its raw input (wrong shape: an error)."""
    torch.manual_seed(48)
    model = nn.Sequential(_AlwaysRunning(4))
    batches = [torch.randn(6, 5, 4) * 2 + 1 for _ in range(2)]
    stats = recompute_bn_stats(model, batches, apply=False)["0"]
    seen = torch.cat(batches).double().reshape(-1, 4)
    torch.testing.assert_close(stats.mean, seen.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.var, seen.var(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("select_inner", [False, True])
def test_layer_without_weight_measures_only_its_own_call(select_inner):
    """A measured layer without a weight takes only its own batch-norm call, not that of a
    child without one: an unselected child (eval mode, running statistics) or a selected,
    measured one (which takes its own)."""
    torch.manual_seed(45)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), _NestedNoWeight(4))
    batches = [shifted(8, 2, 5, 5) for _ in range(3)]
    names = ["1", "1.inner"] if select_inner else ["1"]
    stats = recompute_bn_stats(model, batches, layers=names, apply=False)
    with torch.no_grad():
        h = torch.cat([model[0](b) for b in batches]).double() * 2
        inner = h.transpose(0, 1).reshape(4, -1)
        if select_inner:  # the child normalizes each batch by its own statistics
            h = torch.cat([nn.functional.batch_norm(c, None, None, training=True, eps=1e-5)
                           for c in h.split(8)])
        else:  # by its running statistics, still 0 and 1
            h = h / (1 + 1e-5) ** 0.5
    seen = (h * 3).transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(stats["1"].mean, seen.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["1"].var, seen.var(1), rtol=1e-5, atol=1e-6)
    if select_inner:
        torch.testing.assert_close(stats["1.inner"].mean, inner.mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats["1.inner"].var, inner.var(1), rtol=1e-5, atol=1e-5)


class _KeywordCall(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return self.bn(input=x)  # the parameter name of the stock forward


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, FastPreciseBN2d])
def test_layer_called_with_the_input_keyword(bn):
    torch.manual_seed(42)
    model = _KeywordCall(bn(3))
    batches = [shifted(8, 3, 4, 4) for _ in range(2)]
    assert_close_to_truth(recompute_bn_stats(model, batches, apply=False),
                          ground_truth(model, batches, forward=lambda m, x: m.bn(x)))
    update_bn_stats(model, batches, num_iters=2)


def test_argument_edge_cases():
    """Integer-like counts (numpy, 0-d tensors) are accepted; 1-sample items, which the pass
    skips, do not count towards num_batches; uninitialized lazy modules (the first forward
    would materialize them) and meta layers are refused before anything runs."""
    np = pytest.importorskip("numpy")
    torch.manual_seed(43)
    data = [shifted(8, 3, 4, 4), shifted(1, 3, 4, 4)] + [shifted(8, 3, 4, 4) for _ in range(3)]
    model = nn.Sequential(nn.BatchNorm2d(3))
    ref = recompute_bn_stats(model, data, num_samples=20, apply=False)
    for v in (np.int64(20), torch.tensor(20)):
        got = recompute_bn_stats(model, data, num_samples=v, apply=False)
        assert torch.equal(got["0"].var, ref["0"].var) and got.num_samples == 20
    with pytest.raises(ValueError, match="num_samples"):
        recompute_bn_stats(model, data, num_samples=torch.tensor(2.5))
    with pytest.warns(UserWarning, match="1 sample"):
        stats = recompute_bn_stats(model, data, num_batches=3, apply=False)
    assert stats.num_batches == 3 and stats.num_samples == 24
    lazy = nn.Sequential(nn.BatchNorm2d(3), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"uninitialized lazy module\(s\) \['1'\]"):
        recompute_bn_stats(lazy, data)
    assert type(lazy[1]) is nn.LazyBatchNorm2d
    with pytest.raises(ValueError, match="meta device"):
        recompute_bn_stats(nn.Sequential(nn.BatchNorm2d(3)).to("meta"),
                           [torch.zeros(8, 3, 4, 4, device="meta")])


def test_layers_by_name():
    torch.manual_seed(44)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1),
                          nn.BatchNorm2d(3))
    batches = [shifted(8, 1, 6, 6) for _ in range(2)]
    by_module = recompute_bn_stats(model, batches, layers=[model[3]], apply=False)
    for sel in (["3"], "3"):
        by_name = recompute_bn_stats(model, batches, layers=sel, apply=False)
        assert list(by_name) == ["3"] and torch.equal(by_name["3"].var, by_module["3"].var)
    with pytest.raises(ValueError, match="no layer named 'bn'"):
        recompute_bn_stats(model, batches, layers="bn")
    outer = nn.Module()
    outer.net, outer.head_bn = model, model[3]  # a second name: named_modules() lists one
    outer.forward = model.forward
    aliased = recompute_bn_stats(outer, batches, layers="head_bn", apply=False)
    assert list(aliased) == ["net.3"] and torch.equal(aliased["net.3"].var, by_module["3"].var)


def test_compiled_model_statistics_are_keyed_by_the_original_names():
    """Statistics of a torch.compile'd model apply to the original module and back."""
    torch._dynamo.reset()
    torch.manual_seed(45)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    compiled = torch.compile(model, backend="eager")
    batches = [shifted(8, 1, 6, 6) for _ in range(2)]
    stats = recompute_bn_stats(compiled, batches, apply=False)
    assert list(stats) == ["1"]
    stats.apply(model)
    assert torch.equal(model[1].running_var, stats["1"].var.float())
    plain = recompute_bn_stats(model, batches, apply=False)
    plain.apply(compiled)
    assert plain.drift(compiled)[0]["layer"] == "1"
    update_bn_stats(compiled.train(), batches, num_iters=2)


def _graph_counter():
    """(graphs, backend): a fresh dynamo and a compiler backend that records every graph."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, counting_backend


def test_model_compiled_in_place_runs_the_pass_eagerly():
    """``model.compile()`` sets no ``_orig_mod``: the compiler's force_eager stance keeps the
    pass from compiling graphs of its own (torch >= 2.6)."""
    if not hasattr(torch.compiler, "set_stance"):
        pytest.skip("torch < 2.6 has no compiler stance")
    torch.manual_seed(50)
    graphs, counting_backend = _graph_counter()
    model = SharedHead()
    model.compile(backend=counting_backend)
    model(shifted(8, 1, 8, 8))
    compiled = len(graphs)
    assert compiled >= 1
    batches = [shifted(8, 1, 8, 8) for _ in range(3)]
    stats = recompute_bn_stats(model, batches, apply=False, estimator="batch_mean")
    update_bn_stats(model.train(), batches, num_iters=3)
    assert len(graphs) == compiled and list(stats) == ["head_bn"]


def test_compiled_model_runs_the_pass_eagerly():
    """The pass switches modes and layer forwards: run through the compiled wrapper, it made
    the compiler trace a graph for the pass alone (and warn of graph breaks on CPU). The
    original module runs it instead, with the same statistics, stop_early included."""
    torch.manual_seed(46)
    graphs, counting_backend = _graph_counter()
    model = convert_model(nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                                        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    compiled = torch.compile(model, backend=counting_backend)
    compiled(shifted(8, 1, 8, 8))
    compiled_before = len(graphs)
    batches = [shifted(8, 1, 8, 8) for _ in range(3)]
    for kw in ({}, {"layers": ["1"]}):
        via_compiled = recompute_bn_stats(compiled, batches, apply=False, **kw)
        eager = recompute_bn_stats(model, batches, apply=False, **kw)
        assert list(via_compiled) == list(eager)
        for name in eager:
            assert torch.equal(via_compiled[name].var, eager[name].var)
    update_bn_stats(compiled.train(), batches, num_iters=2)
    assert len(graphs) == compiled_before


class _Counting(nn.Module):
    """A module that writes its buffers in forward whatever its mode."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("avg", torch.zeros(1))
        self.register_buffer("seen", torch.zeros(()))
        with torch.inference_mode():  # a cache made in inference mode: no pass can write it
            self.register_buffer("cache", torch.ones(2), persistent=False)

    def forward(self, x):
        self.calls += 1
        self.avg.mul_(0.9).add_(0.1 * x.mean())
        self.seen = self.seen + 1  # replaced, not written
        return x


def test_buffers_the_forward_writes_are_put_back():
    """The pass leaves every buffer as it was (only apply writes BN statistics): also those a
    module writes in forward whatever its mode, and also when the pass fails."""
    torch.manual_seed(47)
    model = nn.Sequential(_Counting(), nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    model(shifted(8, 1, 6, 6))
    before = snapshot(model)
    seen = model[0].seen
    batches = [shifted(8, 1, 6, 6) for _ in range(3)]
    recompute_bn_stats(model, batches, apply=False)
    assert_unchanged(model, before)
    bad = batches + [torch.full((8, 1, 6, 6), float("nan"))]
    with pytest.raises(ValueError, match="non-finite"):
        recompute_bn_stats(model, bad)
    assert_unchanged(model, before)
    stats = recompute_bn_stats(model, batches)  # applied: the BN layer's buffers change, only
    assert model[0].calls.item() == 1 and torch.equal(model[0].avg, before[0]["0.avg"])
    assert model[0].seen is seen and seen.item() == 1
    assert torch.equal(model[2].running_var, stats["2"].var.float())
    update_bn_stats(model.train(), batches, num_iters=3)
    assert model[0].calls.item() == 1


def test_namedtuple_inputs_and_batch_dims():
    """Model inputs may be namedtuples; their tensors must share dim 0 (the batch); 0-d
    tensors ride along; batches that cannot be concatenated are named as batch_size's."""
    from collections import namedtuple

    Pair = namedtuple("Pair", "x scale")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(1)

        def forward(self, p):
            return self.bn(p.x * p.scale)

    torch.manual_seed(48)
    xs = [shifted(8, 1, 4, 4) for _ in range(3)]
    plain = recompute_bn_stats(nn.Sequential(nn.BatchNorm2d(1)), xs, num_samples=20,
                               batch_size=6, apply=False)
    pairs = [Pair(x, torch.tensor(1.0)) for x in xs]
    for kw in ({}, {"num_samples": 20, "batch_size": 6}):
        stats = recompute_bn_stats(Model(), pairs, input_fn=lambda p: p, apply=False, **kw)
        if kw:
            assert torch.equal(stats["bn"].var, plain["0"].var)
            assert stats.num_samples == 20
    model = Model()
    before = snapshot(model)
    uneven = [Pair(x, torch.ones(5)) for x in xs]
    with pytest.raises(ValueError, match=r"share dim 0.*\[8, 5\]"):
        recompute_bn_stats(model, uneven, input_fn=lambda p: p)
    with pytest.raises(ValueError, match="batch_size.*cannot be concatenated"):
        recompute_bn_stats(nn.BatchNorm2d(1), [shifted(4, 1, 4, 4), shifted(4, 1, 5, 5)],
                           batch_size=8)
    assert_unchanged(model, before)


class _SubclassBN(nn.BatchNorm2d):
    """A BN subclass: the pass measures it through hooks, not the CPU fast path."""


def test_per_call_estimators_fast_path_equals_hooks():
    """batch_mean and tol need per-call statistics: the CPU fast path merges them in its
    flush (one call per layer at most), the hook path call by call; a layer called twice per
    forward counts twice in both."""
    torch.manual_seed(49)
    fast = SharedHead()
    hooked = copy.deepcopy(fast)
    hooked.head_bn.__class__ = _SubclassBN
    batches = [shifted(n, 1, 8, 8) for n in (32, 24, 32, 16, 32, 32)]
    truth = ground_truth(fast, batches)
    for model in (fast, hooked):
        s = recompute_bn_stats(model, batches, estimator="batch_mean", apply=False)
        assert_close_to_truth(s, truth, kind="batch_mean")
    for tol, stop in ((0.5, (4, True)), (1e-6, (6, False))):  # converged after 4 / never
        a = recompute_bn_stats(fast, batches, tol=tol, tol_every=2, apply=False)
        b = recompute_bn_stats(hooked, batches, tol=tol, tol_every=2, apply=False)
        assert (a.num_batches, a.converged) == (b.num_batches, b.converged) == stop
        torch.testing.assert_close(a["head_bn"].var, b["head_bn"].var, rtol=1e-6, atol=0)


def test_accumulating_forward_path_counts_calls_without_module_hooks(monkeypatch):
    """Off the CPU fast path (the GPU's path: FastPreciseBN's forward merges each batch into
    the accumulator in its statistics kernel; forced here), exact stock and FastPreciseBN
    layers count their calls and fold per-call statistics in the pass's forward, with no
    module hook: a layer called twice per forward counts twice, the per-call estimators match
    the hook path of a subclass, stock and converted layers give identical results, and
    nothing of it outlives the pass."""
    from fastpbn.precise import _collect

    monkeypatch.setattr(_collect, "_cpu_backend_is_torch", lambda: False)
    torch.manual_seed(53)
    stock = SharedHead()
    converted = convert_model(copy.deepcopy(stock))
    hooked = copy.deepcopy(stock)
    hooked.head_bn.__class__ = _SubclassBN
    batches = [shifted(n, 1, 8, 8) for n in (32, 24, 32, 16, 32, 32)]
    truth = ground_truth(stock, batches)
    seen = []

    def forward_fn(m, x):
        bn = m.head_bn
        seen.append((len(bn._forward_pre_hooks), len(bn._forward_hooks),
                     bn.forward.__func__.__qualname__))
        return m(x)

    results = {}
    for name, model in (("stock", stock), ("converted", converted)):
        seen.clear()
        pop = recompute_bn_stats(model, batches, forward_fn=forward_fn, apply=False)
        assert set(seen) == {(0, 0, "_counting_forward.<locals>.forward")}
        assert_close_to_truth(pop, truth)
        bm = recompute_bn_stats(model, batches, estimator="batch_mean", apply=False)
        assert_close_to_truth(bm, truth, kind="batch_mean")
        results[name] = pop, bm
        bn = model.head_bn
        assert "forward" not in bn.__dict__ and "accumulator" not in bn.__dict__
        assert not bn._forward_pre_hooks and not bn._forward_hooks
    for a, b in zip(results["stock"], results["converted"]):
        assert all(torch.equal(x, y) for x, y in zip(a["head_bn"], b["head_bn"]))
    for tol, stop in ((0.5, (4, True)), (1e-6, (6, False))):  # converged after 4 / never
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "tol not reached" for the second
            a = recompute_bn_stats(stock, batches, tol=tol, tol_every=2, apply=False)
            b = recompute_bn_stats(hooked, batches, tol=tol, tol_every=2, apply=False)
        assert (a.num_batches, a.converged) == (b.num_batches, b.converged) == stop
        torch.testing.assert_close(a["head_bn"].var, b["head_bn"].var, rtol=1e-6, atol=0)


def test_data_parallel_model_runs_the_pass_on_its_module():
    """An nn.DataParallel model: the pass runs its module (replicas made per call would run
    copies of the layers); names key without the wrapper's prefix and apply to either."""
    model = cnn(45)
    batches = [shifted(32, 1, 8, 8) for _ in range(2)]
    stats = recompute_bn_stats(nn.DataParallel(model), batches, apply=False)
    plain = recompute_bn_stats(copy.deepcopy(model), batches, apply=False)
    assert list(stats) == list(plain) and "features.1" in stats
    for n in stats:
        assert torch.equal(stats[n].mean, plain[n].mean) and torch.equal(stats[n].var, plain[n].var)
    wrapped = nn.DataParallel(model)
    stats.apply(wrapped)
    assert torch.equal(model.features[1].running_mean, stats["features.1"].mean.float())


class _EmptyHead(nn.Module):
    """Calls its BN layer a second time on an empty selection (a head with no proposals)."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return self.bn(x), self.bn(x[x[:, 0, 0, 0] > 1e9])


class _SubclassBN(FastPreciseBN2d):
    pass


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, FastPreciseBN2d, _ScaledStockBN, _SubclassBN])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["population", "batch_mean"])
def test_empty_batches_add_nothing(bn, dtype, estimator):
    """Stock BN runs an empty batch; the passes failed on one (a bare ZeroDivisionError on the
    CPU fast path, 'no values per channel' from an accumulator). Now it adds nothing, also as
    a call of the per-call estimators on every path (off the float32 CPU fast path it counted
    as a call with mean 0: batch_mean's mean and variance pulled towards 0)."""
    torch.manual_seed(46)
    batches = [shifted(8, 3, 4, 4).to(dtype) for _ in range(3)]
    model = _EmptyHead(bn(3)).to(dtype)
    stats = recompute_bn_stats(model, batches, apply=False, estimator=estimator)["bn"]
    plain = recompute_bn_stats(model.bn, batches, apply=False, estimator=estimator)[""]
    assert torch.equal(stats.count, plain.count)
    torch.testing.assert_close(stats.mean, plain.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.var, plain.var, rtol=1e-12, atol=0)
    if estimator == "batch_mean" or dtype == torch.float64:
        return
    fv, ref = copy.deepcopy(model).train(), copy.deepcopy(model.bn).train()
    update_bn_stats(fv, batches, num_iters=3)
    update_bn_stats(ref, batches, num_iters=3)
    torch.testing.assert_close(fv.bn.running_var, ref.running_var, rtol=1e-6, atol=0)
    if bn is FastPreciseBN2d:
        layer = FastPreciseBN2d(3)
        layer.accumulator = WelfordState(3)
        assert layer(torch.empty(0, 3, 4, 4)).shape == (0, 3, 4, 4)
        assert layer.accumulator.count.sum() == 0


def test_device_argument_that_cannot_be_used_is_named():
    """device= this process cannot use raised whatever PyTorch said deep inside the pass (a
    CUDA stream without CUDA, a missing backend); now a ValueError names it, model unchanged.
    update_bn_stats takes a numpy integer num_iters, as fvcore does."""
    np = pytest.importorskip("numpy")
    model = cnn(47)
    snap = snapshot(model)
    batches = [shifted(8, 1, 8, 8)]
    bad = ["meta", "not-a-device"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(ValueError, match="device="):
            recompute_bn_stats(model, batches, device=device)
    assert_unchanged(model, snap)
    update_bn_stats(model.train(), batches, num_iters=np.int64(1))
    assert int(model.features[1].num_batches_tracked) == 1


def test_carried_samples_survive_a_source_that_refills_its_tensor():
    """batch_size regroups loader batches: samples carried to the next batch were views of
    the loader's tensor, which a source may refill once it moves on (wrong statistics with no
    error); they are copied now."""
    g = torch.Generator().manual_seed(48)
    data = [torch.randn(12, 3, 4, 4, generator=g) * (1 + i) + i for i in range(4)]
    buffer = torch.empty(12, 3, 4, 4)

    def refilled():
        for x in data:
            buffer.copy_(x)
            yield buffer

    bn = nn.BatchNorm2d(3)
    stats = recompute_bn_stats(bn, refilled(), batch_size=16, apply=False)[""]
    truth = recompute_bn_stats(nn.BatchNorm2d(3), data, batch_size=16, apply=False)[""]
    assert torch.equal(stats.mean, truth.mean) and torch.equal(stats.var, truth.var)


class _CachingNet(nn.Module):
    """Registers a buffer in its first forward (a lazily built cache)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.empty = nn.BatchNorm2d(0)

    def forward(self, x):
        if not hasattr(self, "cache"):
            self.register_buffer("cache", x.mean(0))
        return self.bn(x)


def test_buffers_registered_during_the_pass_and_zero_channel_layers():
    """A buffer the forward registers during the pass is gone after it (the model is as it
    was, also on error); a zero-channel BN layer (nothing to recompute) is left out rather
    than failing the call, and naming it is an error that says why."""
    model = _CachingNet()
    keys = set(model.state_dict())
    stats = recompute_bn_stats(model, [shifted(8, 3, 4, 4)], apply=False)
    assert list(stats) == ["bn"] and set(model.state_dict()) == keys
    def failing():
        yield shifted(8, 3, 4, 4)
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        recompute_bn_stats(model, failing())
    assert set(model.state_dict()) == keys
    with pytest.raises(ValueError, match="'empty'.* has no channels"):
        recompute_bn_stats(model, [shifted(8, 3, 4, 4)], layers=["empty"])


class _Narrowing(nn.Module):
    """Feeds its second BN layer one channel too few."""

    def __init__(self, bn, dtype):
        super().__init__()
        self.a, self.b = bn(4).to(dtype), bn(4).to(dtype)

    def forward(self, x):
        return self.b(self.a(x)[:, :3])


@pytest.mark.parametrize("bn, dtype", [(nn.BatchNorm2d, torch.float32),  # CPU fast path
                                       (FastPreciseBN2d, torch.float64),  # FastPreciseBN's
                                       (_ScaledStockBN, torch.float32)])  # its own, measured
def test_errors_inside_a_pass_name_the_layer(bn, dtype):
    """A layer's own check (channels, dims, one value per channel) failing inside a pass
    says which layer, on every path a layer can take; the model is unchanged."""
    model = _Narrowing(bn, dtype)
    snap = snapshot(model)
    x = shifted(4, 4, 3, 3).to(dtype)
    with pytest.raises((RuntimeError, ValueError),
                       match=r"^BN layer 'b': .*(should contain 3|shape \(N, 4)"):
        recompute_bn_stats(model, [x])
    with pytest.raises(ValueError, match="^BN layer 'a': expected 4D input"):
        update_bn_stats(model, [x[:, :, 0, 0]], num_iters=1)
    assert_unchanged(model, snap)
