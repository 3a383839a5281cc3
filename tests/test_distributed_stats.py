"""WelfordState.all_reduce with two gloo processes on CPU: every rank ends with the statistics
of the union of all ranks' data, bitwise identical across ranks."""

import pytest
import torch
import torch.distributed as dist

from fastpbn import WelfordState
from fastpbn.reference import batch_stats_reference

from . import gloo

SIZES = {0: [3, 5], 1: [8, 1, 2]}  # uneven: counts must weigh


def _data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(n, 4, 3, generator=g) * 2 + 1e4 for n in SIZES[rank]]


def _worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        state = WelfordState(4)
        for b in _data(rank):
            state.update(b)
        state.all_reduce()
        torch.save({"count": state.count, "mean": state.mean, "m2": state.m2},
                   f"{out_file}.{rank}")
    finally:
        gloo.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_all_reduce_two_ranks(tmp_path):
    gloo.spawn(_worker, (2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    results = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    for key in ("count", "mean", "m2"):
        assert torch.equal(results[0][key], results[1][key]), key
    rmean, rvar, n = batch_stats_reference(torch.cat(_data(0) + _data(1)))
    assert torch.equal(results[0]["count"], torch.full((4,), float(n), dtype=torch.float64))
    # per-batch statistics are float32-exact (~1e-7 of the std), the merge float64
    torch.testing.assert_close(results[0]["mean"], rmean, rtol=0, atol=1e-6)
    torch.testing.assert_close(results[0]["m2"] / n, rvar, rtol=1e-6, atol=0)


def _mismatched_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        _report_all_reduce(WelfordState(4 + rank).update(torch.randn(3, 4 + rank, 2)), None,
                           f"{out_file}.{rank}")
    finally:
        gloo.destroy_process_group()


def _report_all_reduce(state, group, path):
    """Writes to ``path`` whether ``state.all_reduce(group)`` left the state unchanged and what
    it raised ("returned" when it did not)."""
    before = state.clone()
    try:
        state.all_reduce(group)
        outcome = "returned"
    except ValueError as e:
        outcome = str(e)
    unchanged = all(torch.equal(getattr(state, k), getattr(before, k))
                    for k in ("count", "mean", "m2"))
    with open(path, "w") as f:
        f.write(f"{unchanged}\n{outcome}")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_all_reduce_rejects_different_channel_counts(tmp_path):
    """Ranks with 4 and 5 channels: every rank raises ValueError naming the counts, its state
    untouched (a mismatched all-gather aborts a gloo process)."""
    gloo.spawn(_mismatched_worker, (2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    for r in range(2):
        unchanged, outcome = (tmp_path / f"out.{r}").read_text().split("\n", 1)
        assert unchanged == "True"
        assert "different channel counts (per rank: [4, 5])" in outcome, outcome


def _outsider_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        group = dist.new_group([0, 1])
        _report_all_reduce(WelfordState(2).update(torch.randn(5, 2) + rank), group,
                           f"{out_file}.{rank}")
    finally:
        gloo.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_all_reduce_on_a_process_outside_the_group_raises(tmp_path):
    """A process outside ``group`` raised nothing and was left with an empty state (its
    all-gathers are no-ops); now it raises and keeps its state; the members merge."""
    gloo.spawn(_outsider_worker, (3, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=3)
    outcomes = [(tmp_path / f"out.{r}").read_text().split("\n", 1) for r in range(3)]
    assert outcomes[0][1] == outcomes[1][1] == "returned"
    assert outcomes[2] == ["True", "WelfordState.all_reduce: this process is not a member of "
                                   "group"]
