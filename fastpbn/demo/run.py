"""``python -m fastpbn demo``: the command line, the run, and the files it writes."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from typing import Optional

import torch

from . import data as demo_data
from .experiment import (
    Config,
    Trainer,
    build_model,
    evaluate,
    norm_batches,
    precise_grid,
    sample_counts,
)
from .report import PAPER_TABLE2, findings, summarize, tables

DESCRIPTION = """\
EMA vs precise BatchNorm statistics on real data. Trains a small CNN (FastPreciseBN2d layers,
BN momentum 0.1) with SGD at a small batch, and after every epoch evaluates the test set with
the EMA statistics training left behind and with precise statistics recomputed over
N = 10, 100, 1000, ..., all training samples at normalization batch B = the training batch and
B = 128. Writes report.md, results.json and PNG plots into --out, and prints the tables.
Default data: scikit-learn's bundled 8x8 digits (no download)."""

EPILOG = """\
reduced mode: --quick runs 1 epoch on 300 training / 200 test images with width 8 and one
repeat (N = 10, 100, all); it takes seconds and is what the test suite runs. --epochs,
--max-train and --max-test reduce a run by hand.

--data PATH: Fashion-MNIST (or any MNIST-format set) from local files: a .npz with
x_train/y_train/x_test/y_test, or a directory with train-images-idx3-ubyte,
train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (raw or .gz)."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"sample counts must be integers >= 2, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The demo's argument parser (``python -m fastpbn demo --help``)."""
    p = argparse.ArgumentParser(prog="python -m fastpbn demo", description=DESCRIPTION,
                                epilog=EPILOG, formatter_class=argparse.RawTextHelpFormatter)
    d = Config()
    p.add_argument("--out", default="./fastpbn-demo",
                   help="output directory (default: %(default)s)")
    p.add_argument("--data", metavar="PATH", help="Fashion-MNIST .npz or IDX directory")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda runs the GPU kernels (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="reduced mode for CI (see below)")
    p.add_argument("--epochs", type=_positive, help=f"training epochs (default: {d.epochs})")
    p.add_argument("--batch-size", type=_positive, default=d.batch_size,
                   help="training batch, also the small normalization batch (default: %(default)s)")
    p.add_argument("--norm-batch", type=_positive, default=d.norm_batch,
                   help="the large normalization batch (default: %(default)s)")
    p.add_argument("--num-samples", type=_counts, metavar="N,N,...",
                   help="sample counts to recompute with; the whole training set is always\n"
                        "added (default: 10, 100, 1000, ... below it)")
    p.add_argument("--repeats", type=_positive,
                   help=f"random subsets drawn for each N < all (default: {d.repeats})")
    p.add_argument("--lr", type=float, default=d.lr, help="peak SGD learning rate, cosine decay "
                   "(default: %(default)s)")
    p.add_argument("--width", type=_positive, help=f"SmallCNN width (default: {d.width})")
    p.add_argument("--max-train", type=_positive, help="use at most this many training images")
    p.add_argument("--max-test", type=_positive, help="use at most this many test images")
    p.add_argument("--seed", type=int, default=d.seed, help="seed (default: %(default)s)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="CPU threads for torch (default: %(default)s; the tensors are tiny, so\n"
                        "more threads only add synchronization, unless --data is larger)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _config(args: argparse.Namespace) -> Config:
    quick = {"epochs": 1, "width": 8, "repeats": 1, "max_train": 300, "max_test": 200}
    d = Config()
    pick = lambda name: (getattr(args, name) if getattr(args, name) is not None  # noqa: E731
                         else quick[name] if args.quick else getattr(d, name, None))
    args.max_train, args.max_test = pick("max_train"), pick("max_test")
    return Config(
        epochs=pick("epochs"), batch_size=args.batch_size, norm_batch=args.norm_batch,
        lr=args.lr, width=pick("width"), repeats=pick("repeats"), seed=args.seed,
        device=args.device, num_samples=args.num_samples, progress=not args.no_progress,
    )


def machine_info(device: str) -> dict:
    """Where the numbers come from: CPU/GPU model, threads, versions, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "device": device,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: Optional[list[str]] = None) -> int:
    """Run the demo. Returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    cfg = _config(args)
    for flag, value in (("--batch-size", cfg.batch_size), ("--norm-batch", cfg.norm_batch)):
        if value < 2:
            parser.error(f"{flag} must be at least 2 (batch norm needs two samples)")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        parser.error(f"--lr must be a positive number, got {cfg.lr}")
    try:
        split = demo_data.load_path(args.data) if args.data else demo_data.load_digits_split()
    except (OSError, ValueError, KeyError) as e:
        parser.error(str(e))
    split = demo_data.subset(split, args.max_train, args.max_test, seed=cfg.seed)
    if len(split.x_train) < cfg.batch_size:
        parser.error(f"--batch-size {cfg.batch_size} exceeds the {len(split.x_train)} "
                     "training images")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out}: {e.strerror or e}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    gpus = [torch.cuda.current_device()] if cfg.device == "cuda" else []
    try:
        # a caller in the same process keeps its thread setting and random state
        with torch.random.fork_rng(devices=gpus):
            return _run(cfg, split, args.out, argv)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config, split: demo_data.Split, out: str, argv: Optional[list[str]]) -> int:
    t_start = time.perf_counter()
    split = demo_data.Split(split.name, split.x_train.to(cfg.device), split.y_train.to(cfg.device),
                            split.x_test.to(cfg.device), split.y_test.to(cfg.device),
                            split.num_classes)
    n_train = len(split.x_train)
    results = {
        "config": cfg.to_dict(), "machine": machine_info(cfg.device),
        "data": {"name": split.name, "n_train": n_train, "n_test": len(split.x_test),
                 "image_shape": list(split.x_train.shape[1:]), "num_classes": split.num_classes},
        "num_samples": sample_counts(cfg, n_train), "norm_batches": norm_batches(cfg),
        "epochs": [],
    }
    model = build_model(cfg, split)
    trainer = Trainer(cfg, model, split)
    print(f"fastpbn demo: {split.name}, {n_train} train / {len(split.x_test)} test images, "
          f"SmallCNN width {cfg.width}, batch {cfg.batch_size}, {cfg.epochs} epoch(s), "
          f"device {cfg.device}")
    for epoch in range(1, cfg.epochs + 1):
        row = {"epoch": epoch, **trainer.epoch(epoch)}
        acc, loss, ema_correct = evaluate(model, split.x_test, split.y_test)
        row["ema"] = {"acc": acc, "loss": loss}
        grid = precise_grid(cfg, model, split, epoch)
        row["precise"], row["drift"] = grid["rows"], grid["drift"]
        # paired comparison on the same test images (McNemar): who gets which images wrong
        row["paired"] = {"ema_only_wrong": int((grid["correct"] & ~ema_correct).sum()),
                         "precise_only_wrong": int((ema_correct & ~grid["correct"]).sum())}
        results["layers"] = grid["values_per_sample"]
        results["epochs"].append(row)
        best = summarize({"epochs": [row]})[0]["precise"][(n_train, max(results["norm_batches"]))]
        print(f"epoch {epoch}: train loss {row['train_loss']:.4f} ({row['train_time_s']:.1f} s)"
              f" | test error EMA {100 * (1 - acc):.2f} %, precise (N=all, "
              f"B={max(results['norm_batches'])}) {best['err']:.2f} %", flush=True)
    results["wall_time_s"] = time.perf_counter() - t_start
    write_outputs(results, out, argv)
    return 0


def write_outputs(results: dict, out_dir: str, argv: Optional[list[str]]) -> None:
    """Print the tables and findings; write results.json, the plots and report.md."""
    from .plots import plot_all

    text, notes = tables(results), findings(results)
    print()
    print(text)
    print()
    for note in notes:
        print(f"- {note}")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    pngs = plot_all(results, out_dir)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(results, text, notes, pngs, argv))
    print(f"\nwrote {', '.join(['report.md', 'results.json', *pngs])} to {out_dir} "
          f"({results['wall_time_s']:.1f} s)")


def markdown(results: dict, text: str, notes: list[str], pngs: list[str],
             argv: Optional[list[str]]) -> str:
    """report.md: the set-up, the findings, the plots, the tables and the paper's numbers."""
    m, cfg, d = results["machine"], results["config"], results["data"]
    cmd = " ".join(["python -m fastpbn demo", *(argv if argv is not None else sys.argv[2:])])
    where = m.get("gpu") or (f"{m['cpu']} ({m['cpu_count']} cores, torch threads: "
                             f"{m['torch_threads']})")
    lines = [
        "# fastpbn demo: EMA vs precise BatchNorm statistics", "",
        f"`{cmd}` — {m['date']}, {where}, torch {m['torch']}, python {m['python']}; "
        f"wall time {results['wall_time_s']:.1f} s.", "",
        f"Data: {d['name']}, {d['n_train']} training / {d['n_test']} test images "
        f"{tuple(d['image_shape'])}, {d['num_classes']} classes. Model: SmallCNN width "
        f"{cfg['width']} with FastPreciseBN2d (BN momentum {cfg['bn_momentum']}), SGD "
        f"(lr {cfg['lr']}, momentum {cfg['momentum']}, weight decay {cfg['weight_decay']}, "
        f"cosine decay), batch {cfg['batch_size']}, {cfg['epochs']} epoch(s), seed {cfg['seed']}.",
        "",
        "Precise statistics: `recompute_bn_stats(model, loader, num_samples=N, batch_size=B, "
        "apply=False)` on the current weights, with the loader at the training batch "
        f"(batches are regrouped to B), applied to a copy; N < all draws {cfg['repeats']} "
        "random subset(s) and reports their mean. Drift compares the model's EMA buffers with "
        "the N=all statistics.", "",
        "## Findings (computed from the numbers below)", "",
        *[f"- {n}" for n in notes], "",
        "## Plots", "",
        *[f"![{p}]({p})\n" for p in pngs],
        "## Tables", "", text, "",
        "## The paper, for comparison", "",
        "Wu & Johnson, *Rethinking \"Batch\" in BatchNorm* (2021), Table 2 — ResNet-50 on "
        "ImageNet, validation error (%), precise statistics from N = 10^4 samples at "
        "normalization batch B:", "", PAPER_TABLE2, "",
    ]
    return "\n".join(lines)
