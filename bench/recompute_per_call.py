"""Cost of a recompute pass per BN call on small CPU activations, against fvcore.

``python bench/recompute_per_call.py`` times ``recompute_bn_stats`` (population and
"batch_mean" estimators), fvcore's ``update_bn_stats`` (when installed) and a plain training
forward of stock ``nn.BatchNorm2d`` on a stack of BN layers, where the per-call overhead of a
pass is all there is to measure. Best of 5 passes over 10 batches, 1 thread, microseconds per
BN call.
"""

import sys
import time
import warnings

import torch
from torch import nn

from fastpbn.precise import recompute_bn_stats


def _us_per_call(fn, calls: int, reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best / calls * 1e6


def _row(shape, layers: int, batches: int, fvcore_update) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.BatchNorm2d(shape[1]) for _ in range(layers)])
    data = [torch.randn(*shape) * 3 + 1 for _ in range(batches)]
    calls = layers * batches

    def stock():
        with torch.no_grad():
            for x in data:
                model.train()(x)

    row = {"stock forward": _us_per_call(stock, calls),
           "fastpbn": _us_per_call(lambda: recompute_bn_stats(model, data), calls),
           "fastpbn batch_mean": _us_per_call(
               lambda: recompute_bn_stats(model, data, estimator="batch_mean"), calls)}
    if fvcore_update is not None:
        row["fvcore"] = _us_per_call(
            lambda: fvcore_update(model.train(), data, num_iters=batches), calls)
    return row


def main(layers: int = 200, batches: int = 10) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # small normalization batches warn by design
    try:
        from fvcore.nn.precise_bn import update_bn_stats as fvcore_update
    except ImportError:
        fvcore_update = None
    print(f"{layers} BN layers, {batches} batches, torch {torch.__version__}, 1 thread; "
          "us per BN call")
    for shape in [(16, 8, 2, 2), (16, 8, 8, 8), (32, 64, 8, 8)]:
        row = _row(shape, layers, batches, fvcore_update)
        print(f"{'x'.join(map(str, shape)):>10}  " +
              "  ".join(f"{k} {v:.1f}" for k, v in row.items()))


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
