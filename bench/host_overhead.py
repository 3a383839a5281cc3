"""Host-side cost of one FastPreciseBN2d call on the Triton path, kernel launches stubbed out.

``python bench/host_overhead.py`` (CPU: runs through Triton's interpreter entry points with every
kernel launch replaced by a no-op, so only fastpbn's Python — checks, dispatch, planning,
scratch, argument marshalling — and PyTorch's autograd are timed). On a small GPU shape the
kernels take a few microseconds, so this is what decides whether a call keeps up with stock
BatchNorm there. Stock ``nn.BatchNorm2d`` on the same CPU tensor (its real CPU kernel) is
printed for scale.
"""

import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
from fastpbn.kernels import gradients, normalize, stats  # noqa: E402

import fastpbn  # noqa: E402


class _NoLaunch:
    """Stands in for a JIT kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _us_per_call(fn, n: int) -> float:
    for _ in range(n // 10):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main(shape=(8, 64, 7, 7), n: int = 2000) -> None:
    torch.set_num_threads(1)
    for module, name in ((stats, "_k1_stats_kernel"), (normalize, "_k2_normalize_kernel"),
                         (gradients, "_k3_grad_stats_kernel"),
                         (gradients, "_k4_grad_input_kernel")):
        setattr(module, name, _NoLaunch())
    fastpbn.set_backend("triton")
    ours, stock = fastpbn.FastPreciseBN2d(shape[1]), torch.nn.BatchNorm2d(shape[1])
    x = torch.randn(*shape, requires_grad=True)
    g = torch.ones(shape)
    print(f"shape {shape}, µs per call (fastpbn: launches stubbed; stock: its CPU kernel)")
    with torch.no_grad():
        print(f"  training forward, no grad : fastpbn {_us_per_call(lambda: ours(x), n):6.1f}"
              f"   stock {_us_per_call(lambda: stock(x), n):6.1f}")
    print(f"  training forward+backward : fastpbn "
          f"{_us_per_call(lambda: ours(x).backward(g), n // 2):6.1f}"
          f"   stock {_us_per_call(lambda: stock(x).backward(g), n // 2):6.1f}")
    ours.eval(), stock.eval()
    with torch.no_grad():
        print(f"  eval forward, no grad     : fastpbn {_us_per_call(lambda: ours(x), n):6.1f}"
              f"   stock {_us_per_call(lambda: stock(x), n):6.1f}")


if __name__ == "__main__":
    main(n=int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
