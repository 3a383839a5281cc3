"""Cross-rank recompute: 2 gloo processes must end with bitwise identical buffers, equal to one
process over the union of their data (counts weigh: the ranks hold different sample counts)."""

import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from fastpbn.models import SmallCNN
from fastpbn.precise import recompute_bn_stats

from . import gloo

WORLD = 2
BATCHES = {0: [32, 32, 20], 1: [32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32]}


def model_and_data():
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    g = torch.Generator().manual_seed(1)
    data = {r: [torch.randn(n, 1, 8, 8, generator=g) * 3 + 40 for n in sizes]
            for r, sizes in BATCHES.items()}
    return model, data


def buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def _rank(rank, body, init_file, out_dir):
    """One spawned rank: joins the gloo group, saves what ``body(rank)`` returns as
    rank{rank}.pt; a failure leaves its traceback in error{rank}.txt."""
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=WORLD, timeout=timedelta(seconds=60))
        torch.save(body(rank), os.path.join(out_dir, f"rank{rank}.pt"))
        gloo.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_ranks(body, tmp_path) -> list:
    """``body`` (a module-level function of the rank) run on WORLD gloo ranks: their results,
    in rank order (a rank's error fails the test with its traceback)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    gloo.spawn(_rank, (body, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    for r in range(WORLD):
        assert not (tmp_path / f"error{r}.txt").exists(), (tmp_path / f"error{r}.txt").read_text()
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def outcome(fn, *args, **kwargs):
    """None when ``fn`` returns, the message of the ValueError it raises otherwise."""
    try:
        fn(*args, **kwargs)
    except ValueError as e:
        return str(e)
    return None


def _union_body(rank):
    model, data = model_and_data()
    results = {}
    for name, kw in [("population", {}), ("batch_mean", {"estimator": "batch_mean"}),
                     ("tol_unmet", {"tol": 1e-9, "tol_every": 2}),  # ranks run out apart
                     ("tol_met", {"tol": 0.5, "tol_every": 2})]:
        m = SmallCNN(width=4)
        m.load_state_dict(model.state_dict())
        s = recompute_bn_stats(m, data[rank], **kw)
        results[name] = (buffers(m), s.num_samples, s.num_batches, s.converged)
    # rank 0 is short of num_samples: every rank must raise, none may hang
    results["short"] = outcome(recompute_bn_stats, model, data[rank], num_samples=200)
    # rank 1 has no data: every rank must raise, naming it
    results["empty"] = outcome(recompute_bn_stats, model, data[rank] if rank == 0 else [])
    return results


def test_two_gloo_ranks_equal_one_process_over_the_union(tmp_path):
    res = run_ranks(_union_body, tmp_path)

    model, data = model_and_data()
    union = data[0] + data[1]
    for name, kw in [("population", {}), ("batch_mean", {"estimator": "batch_mean"})]:
        single = SmallCNN(width=4)
        single.load_state_dict(model.state_dict())
        s = recompute_bn_stats(single, union, **kw)
        ref = buffers(single)
        for k in ref:  # bitwise identical across ranks, equal to the union up to rounding
            assert torch.equal(res[0][name][0][k], res[1][name][0][k]), (name, k)
            torch.testing.assert_close(res[0][name][0][k], ref[k], rtol=1e-6, atol=1e-7)
        assert res[0][name][1:3] == (s.num_samples, s.num_batches) == (468, 15)

    for name in ("tol_unmet", "tol_met"):
        for k in res[0][name][0]:
            assert torch.equal(res[0][name][0][k], res[1][name][0][k]), (name, k)
    assert res[0]["tol_unmet"][1:] == res[1]["tol_unmet"][1:] == (468, 15, False)
    assert res[0]["tol_met"][3] is True and res[0]["tol_met"][2] <= 4
    assert "rank 0" in res[0]["short"] and res[0]["short"] == res[1]["short"]
    assert "no samples on rank 1" in res[0]["empty"] and res[0]["empty"] == res[1]["empty"]


class CpuSyncBN(torch.nn.SyncBatchNorm):
    """A SyncBatchNorm whose forward runs on CPU (the stock one needs a GPU to synchronize):
    normalizes with this process's batch. What update_bn_stats measures is its input."""

    def forward(self, x):
        return torch.nn.functional.batch_norm(x, None, None, self.weight, self.bias, True, 0.0,
                                              self.eps)


def sync_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), CpuSyncBN(3), torch.nn.ReLU(),
                               torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2))


def _fvcore_body(rank):
    from fastpbn.precise import update_bn_stats

    _, data = model_and_data()
    model = sync_model().train()
    update_bn_stats(model, data[rank], num_iters=3)
    return buffers(model)


def test_update_bn_stats_merges_sync_batchnorm_over_the_ranks(tmp_path):
    """fvcore's update_bn_stats reads SyncBatchNorm's synchronized statistics: the layer ends
    with the pooled statistics of every rank's data; a plain BatchNorm2d keeps its own rank's."""
    res = run_ranks(_fvcore_body, tmp_path)
    _, data = model_and_data()
    model = sync_model().double()
    with torch.no_grad():
        seen = {r: [model[0](x.double()) for x in data[r][:3]] for r in range(WORLD)}
        pooled = torch.cat(seen[0] + seen[1]).transpose(0, 1).flatten(1)
    assert torch.equal(res[0]["1.running_mean"], res[1]["1.running_mean"])
    assert torch.equal(res[0]["1.running_var"], res[1]["1.running_var"])
    torch.testing.assert_close(res[0]["1.running_mean"], pooled.mean(1).float(), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(res[0]["1.running_var"], pooled.var(1, unbiased=False).float(),
                               rtol=1e-5, atol=1e-6)
    # the plain layer after it: per rank (its inputs differ between ranks)
    assert not torch.equal(res[0]["4.running_mean"], res[1]["4.running_mean"])


def _mismatch_body(rank):
    model, data = model_and_data()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    results = {
        "layers": outcome(recompute_bn_stats, model, data[rank],  # same width, other layer
                          layers=[names[rank]]),
        "estimator": outcome(recompute_bn_stats, model, data[rank],
                             estimator=("population", "batch_mean")[rank]),
        "buffers": buffers(model),
    }
    results["outsider"] = outcome(recompute_bn_stats, model, data[rank],
                                  process_group=dist.new_group([0]))
    return results


def test_ranks_that_would_merge_different_layers_all_raise(tmp_path):
    """Ranks selecting different layers of one width, or with different estimators, merged
    the wrong layers without a word or failed on one rank only (the merges pair layers by
    position); now every rank raises before reading data, model unchanged. A process outside
    process_group raises instead of running on its own data."""
    res = run_ranks(_mismatch_body, tmp_path)
    model, _ = model_and_data()
    for r in range(WORLD):
        for case in ("layers", "estimator"):
            assert "the ranks would recompute different BN layers" in res[r][case], (r, case)
        for k, v in buffers(model).items():
            assert torch.equal(res[r]["buffers"][k], v), k
    assert res[0]["outsider"] is None
    assert "not a member" in res[1]["outsider"]
