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


def _worker(rank, init_file, out_dir):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=WORLD, timeout=timedelta(seconds=60))
        model, data = model_and_data()
        results = {}
        for name, kw in [("population", {}), ("batch_mean", {"estimator": "batch_mean"}),
                         ("tol_unmet", {"tol": 1e-9, "tol_every": 2}),  # ranks run out apart
                         ("tol_met", {"tol": 0.5, "tol_every": 2})]:
            m = SmallCNN(width=4)
            m.load_state_dict(model.state_dict())
            s = recompute_bn_stats(m, data[rank], **kw)
            results[name] = (buffers(m), s.num_samples, s.num_batches, s.converged)
        try:  # rank 0 is short of num_samples: every rank must raise, none may hang
            recompute_bn_stats(model, data[rank], num_samples=200)
            results["short"] = None
        except ValueError as e:
            results["short"] = str(e)
        try:  # rank 1 has no data: every rank must raise, naming it
            recompute_bn_stats(model, data[rank] if rank == 0 else [])
            results["empty"] = None
        except ValueError as e:
            results["empty"] = str(e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        gloo.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_two_gloo_ranks_equal_one_process_over_the_union(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    gloo.spawn(_worker, (str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    for r in range(WORLD):
        assert not (tmp_path / f"error{r}.txt").exists(), (tmp_path / f"error{r}.txt").read_text()
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

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
