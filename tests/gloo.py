"""Two-process gloo runs for the distributed tests: spawned under a deadline (a hung rank
fails the test instead of blocking the suite), torn down after gloo's worker threads have let
go of the collectives' tensors."""

import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(fn, args, nprocs: int, seconds: float = 240) -> None:
    """``mp.spawn(fn, args, nprocs)``, failing the test when a rank has not finished within
    ``seconds`` (the ranks are killed)."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + seconds
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("distributed run hung")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def destroy_process_group() -> None:
    """``dist.destroy_process_group()`` once gloo's worker threads are idle. On torch < 2.11
    (seen on 2.4.1 and 2.6) the destructor waits for them while holding the GIL, and a worker
    still freeing a finished all_gather's Python-owned tensors needs the GIL: both wait forever
    (pytorch#56297). Half a second lets the workers finish first (torch 2.6: 5 hangs in 10
    runs without it, 0 in 12 with it)."""
    time.sleep(0.5)
    dist.destroy_process_group()
