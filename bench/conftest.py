"""Micro-benchmark set-up: ``FASTPBN_BENCH_THREADS`` pins torch's CPU threads (1 is steadier on
a shared host, where OpenMP barriers of several threads stall under contention)."""

import os

import torch

if os.environ.get("FASTPBN_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTPBN_BENCH_THREADS"]))
