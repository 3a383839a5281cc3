"""Where an eager FastPreciseBN2d call spends its time on a GPU: host microseconds per call for
stock ``nn.BatchNorm2d`` and each fastpbn backend (training forward with autograd recording,
forward+backward, no-grad training forward, eval), then ``torch.profiler`` and ``cProfile``
tables of the Triton path.

``python bench/gpu_host_profile.py [N,C,H,W]`` (CUDA only; default 32,128,28,28). The per-call
figures are wall time over 300 back-to-back calls: where they exceed the kernels' GPU time the
call is host-bound (bench/NOTES.md). The backends are forced by name here, so fastpbn's own path
is timed (``auto`` hands eager CUDA calls without an accumulator to PyTorch's kernel).
"""

import cProfile
import io
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fastpbn


def _fns(module, x, dy):
    def fwd():
        return module(x)

    def fwd_bwd():
        return torch.autograd.grad(module(x), [x, *module.parameters()], dy)

    def no_grad():
        with torch.no_grad():
            return module(x)

    def eval_():
        module.eval()
        with torch.no_grad():
            out = module(x)
        module.train()
        return out

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "no_grad": no_grad, "eval": eval_}


def _us_per_call(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


def main(shape=(32, 128, 28, 28)) -> None:
    x = torch.randn(shape, device="cuda").mul(2).add(5).requires_grad_()
    dy = torch.randn(shape, device="cuda")
    c = shape[1]
    print(f"shape {shape}: µs per call (wall time of back-to-back calls)")
    for name in ("stock", "triton", "cuda"):
        fastpbn.set_backend(None if name == "stock" else name)
        module = (torch.nn.BatchNorm2d(c) if name == "stock" else fastpbn.FastPreciseBN2d(c))
        fns = _fns(module.cuda(), x, dy)
        print(f"  {name:7s}", {k: round(_us_per_call(f), 1) for k, f in fns.items()}, flush=True)
    fastpbn.set_backend("triton")
    fns = _fns(fastpbn.FastPreciseBN2d(c).cuda(), x, dy)
    for key in ("fwd", "fwd+bwd"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(50):
                fns[key]()
            torch.cuda.synchronize()
        print(f"== torch.profiler, triton {key} (50 calls)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22,
                                        max_name_column_width=60))
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            fns[key]()
        torch.cuda.synchronize()
        pr.disable()
        out = io.StringIO()
        pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(25)
        print(f"== cProfile, triton {key} (200 calls)\n{out.getvalue()}")


if __name__ == "__main__":
    main(tuple(int(s) for s in sys.argv[1].split(",")) if len(sys.argv) > 1 else (32, 128, 28, 28))
