"""Result files: ``results.json``, ``results.md`` and three PNG plots."""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from typing import Optional


def write_json(result: dict, out_dir: str) -> str:
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return path


def _shape(rec: dict) -> str:
    return "x".join(str(s) for s in rec["shape"])


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{digits}g}"
    return str(v)


def _fastpbn(r: dict) -> str:
    """How fastpbn ran in a kernel record: ``compiled`` (torch.compile'd) or ``eager``."""
    return "compiled" if r["impl"] == "fastpbn[compiled]" else "eager"


def summary(records: list[dict]) -> list[dict]:
    """Per (pass, mode, baseline, fastpbn eager / compiled, dtype, graph): median and worst
    speedup over shapes/layouts."""
    groups = defaultdict(list)
    for r in records:
        if r["bench"] == "batch_norm":
            groups[(r["pass"], r["mode"], r["baseline"], _fastpbn(r), r["dtype"],
                    r["graph"])].append(r["speedup"])
    rows = []
    for (pass_, mode, base, fast, dtype, graph), s in sorted(groups.items()):
        rows.append({"pass": pass_, "mode": mode, "baseline": base, "fastpbn": fast,
                     "dtype": dtype, "graph": graph, "n": len(s),
                     "median": statistics.median(s), "min": min(s)})
    return rows


def targets(records: list[dict]) -> list[dict]:
    """The issue's GPU targets, evaluated on a run's records (None where nothing measured).

    fwd+bwd >= 1.5x stock eager (median), none below 1.0x; >= 1.1x torch.compile (median);
    stats >= 90 % of copy bandwidth on tensors of >= 64 MB; recompute >= 1.5x fvcore on
    ResNet-50 and >= 3x on the small CNN with CUDA graphs. The kernel targets read eager
    FastPreciseBN2d's rows (compiled stock being the baseline of the torch.compile one); the
    summary shows compiled FastPreciseBN2d against compiled stock beside them.
    """
    def median(v):
        return statistics.median(v) if v else None

    def speedups(base):
        return sorted(r["speedup"] for r in records if r["bench"] == "batch_norm" and
                      r["pass"] == "forward_backward" and r["mode"] == "train" and
                      r["baseline"] == base and not r["graph"] and _fastpbn(r) == "eager")

    eager, comp = speedups("torch-eager"), speedups("torch-compile")
    big = [r["pct_copy"] for r in records if r["bench"] == "batch_norm" and
           r["pass"] == "stats" and r["bytes"] >= 64e6 and r["pct_copy"] is not None]
    rec = {(r["model"], r["impl"]): r["speedup"] for r in records
           if r["bench"] == "recompute" and r["baseline"] == "fvcore"}
    rn50 = [v for (m, i), v in rec.items() if m.startswith("resnet50") and i == "fastpbn"]
    cnn = [v for (m, i), v in rec.items() if m == "small_cnn" and i == "fastpbn+cuda_graph"]
    rows = [
        ("fwd+bwd vs stock eager, median", ">= 1.5x", median(eager), 1.5),
        ("fwd+bwd vs stock eager, worst", ">= 1.0x", eager[0] if eager else None, 1.0),
        ("fwd+bwd vs torch.compile, median", ">= 1.1x", median(comp), 1.1),
        ("stats on >= 64 MB, worst % of copy BW", ">= 90 %", min(big) if big else None, 90.0),
        ("recompute ResNet-50 vs fvcore", ">= 1.5x", rn50[0] if rn50 else None, 1.5),
        ("recompute small CNN + CUDA graphs vs fvcore", ">= 3x", cnn[0] if cnn else None, 3.0),
    ]
    return [{"target": t, "goal": g, "measured": v, "met": None if v is None else v >= lim}
            for t, g, v, lim in rows]


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def write_markdown(result: dict, out_dir: str) -> str:
    """A Markdown report: the stamp, the speedup summary, the kernel and recompute tables."""
    cpu = not result.get("cuda_device")
    lines = [f"# fastpbn benchmark — {result['device']}", ""]
    if cpu:
        lines += ["**CPU results.** These are not GPU numbers: on CPU fastpbn runs its `torch` "
                  "backend (PyTorch ops: its CPU batch-norm kernels, or centred vectorized "
                  "passes for large contiguous activations, behind fastpbn's dispatch), so the "
                  "kernel rows do not measure the Triton kernels. `% copy BW` compares with a "
                  "copy through main memory; inputs that fit in the CPU's caches (the quick "
                  "shapes, reused call after call) can exceed 100 %.", ""]
    lines += [f"- date: {result['date']}", f"- torch {result['torch']}, triton "
              f"{result['triton']}, CUDA {result['cuda']}", f"- preset: {result['preset']}, "
              f"wall time {result['runtime_s']:.0f} s",
              f"- measured copy bandwidth: {_fmt(result['copy_gbps'])} GB/s",
              f"- load average (1/5/15 min) at start {result.get('loadavg_start')}, "
              f"at end {result.get('loadavg_end')}", ""]
    bn = [r for r in result["records"] if r["bench"] == "batch_norm"]
    if bn:
        lines += ["## Speedup summary (baseline median / fastpbn median)", ""]
        lines += _table(["pass", "mode", "baseline", "fastpbn", "dtype", "CUDA graph",
                         "points", "median speedup", "worst"],
                        [[s["pass"], s["mode"], s["baseline"], s["fastpbn"], s["dtype"],
                          s["graph"], s["n"], s["median"], s["min"]] for s in summary(bn)])
        lines += ["", "## Kernels (ms are medians; p20–p80 in the JSON)", ""]
        lines += _table(
            ["shape", "dtype", "layout", "pass", "mode", "graph", "impl", "baseline", "ms",
             "baseline ms", "speedup", "GB/s", "% copy BW"],
            [[_shape(r), r["dtype"], r["layout"], r["pass"], r["mode"], r["graph"], r["impl"],
              r["baseline"], r["ms"], r["baseline_ms"], r["speedup"], r["gbps"], r["pct_copy"]]
             for r in bn])
    lines += ["", "## GPU targets (issue)", ""]
    if cpu:
        lines += ["Evaluated on CUDA runs only: this is a CPU run, so none is measured."]
    else:
        lines += _table(["target", "goal", "measured", "met"],
                        [[t["target"], t["goal"], t["measured"], t["met"]]
                         for t in targets(result["records"])])
    rc = [r for r in result["records"] if r["bench"] == "recompute"]
    if rc:
        lines += ["", "## Recompute (same model, data, sample count; wall time medians)", "",
                  "Errors are the worst over layers and channels of |var − var\\*|/var\\* and "
                  "|mean − mean\\*|/(|mean\\*| + std\\*). `err`: against the float64 statistics "
                  "of exactly the inputs the method's layers saw (its estimation arithmetic). "
                  "`err f64`: against the model run in float64 (also counts the float32 rounding "
                  "of the forward, and on CUDA the TF32 of cuDNN convolutions, PyTorch's "
                  "default). Variance as M2/N for the methods that promise it (fvcore, "
                  "fastpbn.update_bn_stats), M2/(N−1) otherwise.", ""]
        lines += _table(
            ["model", "data", "input", "samples", "norm. batch", "impl", "baseline", "ms",
             "baseline ms", "speedup", "samples/s", "err", "err f64", "baseline err",
             "baseline err f64"],
            [[r["model"], r["data"], _shape(r), r["samples"], r["batch_size"], r["impl"],
              r["baseline"], r["ms"], r["baseline_ms"], r["speedup"], r["samples_per_s"],
              r["err"], r["err_f64"], r["baseline_err"], r["baseline_err_f64"]] for r in rc])
    if result.get("skipped"):
        lines += ["", "## Not measured", ""] + [f"- {s}" for s in result["skipped"]]
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_plots(result: dict, out_dir: str) -> list[str]:
    """``speedup.png``, ``roofline.png`` and ``recompute.png`` (those with data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    bn = [r for r in result["records"] if r["bench"] == "batch_norm"]
    rc = [r for r in result["records"] if r["bench"] == "recompute"]
    stamp = f"{result['device']} — {result['date'][:10]}"
    if bn:
        paths.append(_plot_speedup(plt, bn, stamp, out_dir))
        paths.append(_plot_roofline(plt, bn, result["copy_gbps"], stamp, out_dir))
    if rc:
        paths.append(_plot_recompute(plt, rc, stamp, out_dir))
    return paths


def _plot_speedup(plt, bn, stamp, out_dir) -> str:
    passes = [p for p in ("forward_backward", "forward", "backward", "stats")
              if any(r["pass"] == p and r["mode"] == "train" for r in bn)]
    fig, axes = plt.subplots(len(passes), 1, figsize=(12, 2.8 * len(passes)), squeeze=False)
    for ax, pass_ in zip(axes[:, 0], passes):
        rows = [r for r in bn if r["pass"] == pass_ and r["mode"] == "train" and not r["graph"]]
        shapes = list(dict.fromkeys(_shape(r) for r in rows))
        series = list(dict.fromkeys((r["dtype"], r["layout"], r["baseline"]) for r in rows))
        width = 0.8 / max(1, len(series))
        for i, key in enumerate(series):
            by_shape = {_shape(r): r["speedup"] for r in rows
                        if (r["dtype"], r["layout"], r["baseline"]) == key}
            xs = [j + i * width for j, s in enumerate(shapes) if s in by_shape]
            ys = [by_shape[s] for s in shapes if s in by_shape]
            # bars grow from 1x: up where fastpbn is faster, down where it is slower
            ax.bar(xs, [y - 1.0 for y in ys], width, bottom=1.0, label=" ".join(key))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes,
                      rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("speedup ×")
        ax.set_title(f"training {pass_}: baseline time / fastpbn time (> 1: fastpbn faster)",
                     fontsize=9)
        ax.legend(fontsize=6, ncol=4)
    fig.suptitle(stamp, fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, out_dir, "speedup.png")


def _plot_roofline(plt, bn, copy_gbps: Optional[float], stamp, out_dir) -> str:
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {("stats", "train"): "o", ("forward", "train"): "s", ("backward", "train"): "v",
               ("forward_backward", "train"): "D", ("forward", "eval"): "^",
               ("backward", "eval"): "<", ("forward_backward", "eval"): ">"}
    seen = set()
    for r in bn:
        if r["graph"] or r["baseline"] not in ("torch-eager", "torch-var_mean"):
            continue
        for who, gbps, color in (("fastpbn", r["gbps"], "C0"), ("stock", r["baseline_gbps"], "C1")):
            label = f"{who} {r['pass']}" + (" (eval)" if r["mode"] == "eval" else "")
            ax.scatter(r["bytes"] / 1e6, gbps, marker=markers[(r["pass"], r["mode"])],
                       color=color, s=18, alpha=0.7, label=None if label in seen else label)
            seen.add(label)
    if copy_gbps:
        ax.axhline(copy_gbps, color="k", ls="--", lw=1,
                   label=f"copy bandwidth, measured ({copy_gbps:.0f} GB/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes moved per pass (MB, traffic model in bench/NOTES.md)")
    ax.set_ylabel("effective GB/s")
    ax.set_title(f"Bandwidth vs roofline — {stamp}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, out_dir, "roofline.png")


def _plot_recompute(plt, rc, stamp, out_dir) -> str:
    groups = list(dict.fromkeys((r["model"], r["data"]) for r in rc))
    fig, axes = plt.subplots(2, len(groups), figsize=(4.5 * len(groups), 6.5), squeeze=False)
    for col, (model, data) in enumerate(groups):
        rows = [r for r in rc if (r["model"], r["data"]) == (model, data)]
        per = {}
        for r in rows:
            per[r["impl"]] = (r["ms"], r["err"], r["err_f64"])
            per[r["baseline"]] = (r["baseline_ms"], r["baseline_err"], r["baseline_err_f64"])
        names = list(per)
        colors = ["C0" if n.startswith("fastpbn") else "C1" for n in names]
        axes[0, col].barh(names, [per[n][0] for n in names], color=colors)
        axes[0, col].set_xlabel("wall time, ms (median)")
        axes[0, col].set_title(f"{model}, {rows[0]['samples']} samples\ndata {data}",
                               fontsize=8)
        ys = range(len(names))
        axes[1, col].barh([y + 0.2 for y in ys], [_bar(per[n][1]) for n in names],
                          0.4, color=colors, label="vs float64 stats of its own inputs")
        axes[1, col].barh([y - 0.2 for y in ys], [_bar(per[n][2]) for n in names], 0.4,
                          color=colors, alpha=0.45, hatch="//",
                          label="vs the model run in float64")
        axes[1, col].set_yticks(list(ys), names)
        axes[1, col].set_xscale("log")
        axes[1, col].set_xlabel("max relative error")
        axes[1, col].legend(fontsize=6)
        for ax in axes[:, col]:
            ax.tick_params(labelsize=7)
    fig.suptitle(f"Precise BN recompute — {stamp}", fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, out_dir, "recompute.png")


def _bar(err: Optional[float]) -> float:
    """Bar length on a log axis: an exact result (0) still shows, a missing one (None) not."""
    return float("nan") if err is None else max(err, 1e-17)


def _save(fig, plt, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def roofline_markdown() -> str:
    """The bytes each pass must move for every BENCH.md shape (the roofline numerators), as
    a Markdown table: divide by the measured copy bandwidth for the ideal time."""
    import torch

    from .batchnorm import FULL_SHAPES, bytes_moved

    rows = []
    for shape in FULL_SHAPES:
        mb = {(p, d): bytes_moved(shape, d, p, "train") / 1e6
              for p in ("stats", "forward", "backward", "forward_backward")
              for d in (torch.float32, torch.bfloat16)}
        rows.append(["x".join(map(str, shape)), *(f"{mb[(p, d)]:.1f}" for d in
                     (torch.float32, torch.bfloat16) for p in
                     ("stats", "forward", "backward", "forward_backward"))])
    header = ["shape", *(f"{p} {d}" for d in ("fp32", "bf16/fp16")
                         for p in ("stats", "fwd", "bwd", "fwd+bwd"))]
    return "\n".join(_table(header, rows)) + "\n"
