"""``python -m fastpbn bench [--quick | --tiny] [--out DIR]``: fastpbn against stock PyTorch
BatchNorm, ``torch.compile`` and the precise-BN peers (method, shapes and roofline:
``bench/NOTES.md``).

Writes ``results.json`` (device stamp + one record per measurement), ``results.md`` and PNG plots
to ``--out`` (default ``bench/results/<device-slug>/``). Presets: ``full`` (the benchmark
shape set: the default on a GPU, budgeted to finish within 10 minutes on an H100), ``quick``
(a few small shapes; the default on CPU, under 2 minutes) and ``tiny`` (seconds; the test
suite's).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import os
import sys
import time
import traceback
from typing import Optional

import torch

from .._backend import requested_backend
from . import batchnorm, recompute, report
from .timing import copy_bandwidth, device_name, device_slug

# Per preset: copy-bandwidth buffer, timer settings, recompute repeats, time budgets (s).
PRESETS = {
    "full": dict(copy_bytes=2**30, timing=dict(min_run_time=0.2, warmup_ms=5, rep_ms=30),
                 repeats=3, budget_s=510, compile_budget_s=150),
    "quick": dict(copy_bytes=2**26, timing=dict(min_run_time=0.15), repeats=3, budget_s=105,
                  compile_budget_s=25),
    "tiny": dict(copy_bytes=2**22, timing=dict(min_run_time=0.01), repeats=1, budget_s=60,
                 compile_budget_s=0),
}


def _version(mod: str) -> Optional[str]:
    if importlib.util.find_spec(mod) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(mod)
    except PackageNotFoundError:
        return "installed"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastpbn bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few small shapes (CPU friendly)")
    size.add_argument("--tiny", action="store_true", help="seconds-long smoke run (tests)")
    size.add_argument("--full", action="store_true",
                      help="the full shape set (the default on CUDA; hours on a CPU)")
    p.add_argument("--out", help="output directory (default bench/results/<device-slug>/)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--only", choices=("kernels", "recompute"), help="run one half only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch (default: torch's); 1 is steadier on a busy host")
    p.add_argument("--budget", type=float,
                   help="stop starting new kernel cases after this many s, a quarter of it (or "
                        "the preset's share) for torch.compile baselines; recompute always runs")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--roofline", action="store_true",
                   help="print the MB each pass moves per shape of the full set, and exit")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmarks and write the result files.

    Args:
        argv: command-line arguments after ``bench``.
    Returns:
        0 on success, 1 when some case failed (the failures are recorded in the JSON).
    """
    args = _parser().parse_args(argv)
    if args.roofline:
        print(report.roofline_markdown(), end="")
        return 0
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise SystemExit(f"--device must be cpu or cuda, got {args.device!r}") from None
    preset = "tiny" if args.tiny else "quick" if args.quick else "full" if args.full else None
    if preset is None:
        preset = "full" if device.type == "cuda" else "quick"
        print(f"preset: {preset} (on {device.type}; choose with --quick / --full)",
              file=sys.stderr)
    cfg = PRESETS[preset]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {args.device!r}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        raise SystemExit(f"--budget must be a positive number of seconds, got {args.budget}")
    try:
        requested_backend()  # a bad FASTPBN_BACKEND fails here, not in every case
    except ValueError as e:
        raise SystemExit(str(e)) from None
    out_dir = args.out or os.path.join("bench", "results", device_slug(device))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {out_dir}: {e.strerror or e}") from None
    budget = cfg["budget_s"]
    if args.budget is not None:  # also the torch.compile baselines' share
        budget = args.budget
        cfg = dict(cfg, compile_budget_s=min(args.budget, max(cfg["compile_budget_s"],
                                                               args.budget / 4)))
    threads = torch.get_num_threads()
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        # a caller in the same process keeps its thread setting and random state
        with torch.random.fork_rng(devices=gpus):
            if args.threads is not None:
                torch.set_num_threads(args.threads)
            return _run(args, device, preset, cfg, out_dir, budget)
    finally:
        torch.set_num_threads(threads)


def _run(args, device: torch.device, preset: str, cfg: dict, out_dir: str,
         budget: float) -> int:
    t_start = time.perf_counter()
    torch.manual_seed(0)
    try:
        copy_gbps = copy_bandwidth(device, cfg["copy_bytes"], **cfg["timing"])
    except Exception as e:  # noqa: BLE001 - GB/s is still reported; % of copy is then empty
        print(f"copy bandwidth not measured: {e}", file=sys.stderr)
        copy_gbps = None
    result = {
        "device": device_name(device), "torch": torch.__version__,
        "triton": _version("triton"), "cuda": torch.version.cuda if device.type == "cuda"
        else None, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "copy_gbps": copy_gbps, "records": [], "preset": preset,
        "cuda_device": device.type == "cuda", "threads": torch.get_num_threads(),
        "skipped": [], "errors": [], "loadavg_start": _loadavg(),
    }
    cases = [] if args.only == "recompute" else batchnorm.plan(
        preset, device, compile_=not args.no_compile)
    rsetups = [] if args.only == "kernels" else recompute.setups(preset, device)
    bar = _progress(len(cases) + len(rsetups), args.no_progress)
    # recompute first: it is bounded and its rows are the ones the issue headlines
    for setup in rsetups:
        bar.set_description(f"recompute {setup.name}")
        _guard(result, f"recompute {setup.name}", recompute.run_setup,
               setup, device, cfg["repeats"], bar.set_description)
        bar.update()
    _run_kernels(cases, result, device, cfg, t_start + budget, bar)
    bar.close()

    result["runtime_s"] = time.perf_counter() - t_start
    result["loadavg_end"] = _loadavg()
    if importlib.util.find_spec("fvcore") is None and rsetups:
        result["skipped"].append("fvcore baseline: fvcore is not installed")
    paths = [report.write_json(result, out_dir), report.write_markdown(result, out_dir)]
    if not args.no_plots:
        paths += report.write_plots(result, out_dir)
    print(f"{len(result['records'])} records in {result['runtime_s']:.0f} s on "
          f"{result['device']}; wrote " + ", ".join(paths))
    for err in result["errors"]:
        print(f"FAILED {err['case']}: {err['error'].splitlines()[0]}", file=sys.stderr)
    return 1 if result["errors"] else 0


def _run_kernels(cases, result: dict, device, cfg: dict, deadline: float, bar) -> None:
    """Run the kernel cases in order until ``deadline``; ``torch.compile`` joins while its own
    budget lasts. What is not run is listed in ``result["skipped"]``."""
    compile_s = 0.0
    for case in cases:
        label = f"{'x'.join(map(str, case.shape))} {batchnorm.DTYPE_NAMES[case.dtype]} " \
                f"{case.layout}"
        bar.update()
        if time.perf_counter() > deadline:
            result["skipped"].append(f"kernels {label}: time budget spent")
            continue
        if case.compile and compile_s >= cfg["compile_budget_s"]:
            case.compile = False
            result["skipped"].append(f"torch-compile {label}: compile budget spent")
        bar.set_description(f"kernels {label}")
        t0 = time.perf_counter()
        _guard(result, f"kernels {label}", batchnorm.run_case, case, device,
               result["copy_gbps"], cfg["timing"])
        if case.compile:
            compile_s += time.perf_counter() - t0


def _guard(result: dict, label: str, fn, *args) -> None:
    """Run one case and add its records; failures of single measurements (collected by the
    case) and of the whole case (with its traceback) go to ``result["errors"]``."""
    errors: list = []
    try:
        result["records"] += fn(*args, errors=errors)
    except Exception as e:  # noqa: BLE001 - every failure is reported, none is hidden
        errors.append((label, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["errors"] += [{"case": c, "error": e} for c, e in errors]


def _loadavg() -> Optional[list[float]]:
    """1/5/15-minute load averages: other processes on the machine skew CPU timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _progress(total: int, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="case", disable=disable, file=sys.stderr)
