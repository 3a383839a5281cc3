"""The experiment: train a small CNN at a small batch, and after every epoch compare the EMA
statistics training left behind with precise statistics recomputed over N samples at
normalization batch B (Wu & Johnson, 2021, Sec. 3 and Table 2)."""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models import SmallCNN
from ..modules import FastPreciseBN2d
from .data import Split


@dataclass
class Config:
    """What the demo runs. ``num_samples=None`` means 10, 100, 1000, ... below the training set
    size, plus the whole training set."""

    epochs: int = 8
    batch_size: int = 8
    norm_batch: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    width: int = 16
    bn_momentum: float = 0.1
    repeats: int = 5
    seed: int = 0
    device: str = "cpu"
    num_samples: Optional[list[int]] = None
    progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def sample_counts(cfg: Config, n_train: int) -> list[int]:
    """The N values to recompute with, ascending; the last is always the whole training set."""
    if cfg.num_samples:
        counts = [n for n in cfg.num_samples if n < n_train]
    else:
        counts = [10**k for k in range(1, 10) if 10**k < n_train]
    return sorted(set(counts)) + [n_train]


def norm_batches(cfg: Config) -> list[int]:
    """Normalization batch sizes to recompute at: the training batch and ``norm_batch``."""
    return sorted({cfg.batch_size, cfg.norm_batch})


class Batches:
    """Re-iterable (x, y) mini-batches from tensors already on the device.

    Args:
        x, y: inputs and labels.
        batch_size: batch size; the last, smaller batch is dropped when ``drop_last``.
        seed: seeds the shuffle; each pass draws a fresh order from the same generator, so two
            objects built with the same seed yield the same batches.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int = 0,
                 drop_last: bool = False):
        self.x, self.y, self.batch_size, self.drop_last = x, y, batch_size, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.x), generator=self.generator).to(self.x.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def build_model(cfg: Config, split: Split) -> nn.Module:
    """SmallCNN with FastPreciseBN2d layers at the configured BN momentum."""
    torch.manual_seed(cfg.seed)
    norm = lambda c: FastPreciseBN2d(c, momentum=cfg.bn_momentum)  # noqa: E731
    model = SmallCNN(split.in_channels, split.num_classes, width=cfg.width, norm=norm)
    return model.to(cfg.device)


def evaluate(model: nn.Module, x: Tensor, y: Tensor,
             batch: int = 1000) -> tuple[float, float, Tensor]:
    """Test accuracy and mean cross-entropy with the model's running statistics (eval mode).

    Returns:
        (accuracy in [0, 1], loss, per-image correctness as a bool CPU tensor).
    """
    was_training = model.training
    model.eval()
    correct, loss = [], 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch])
            correct.append((out.argmax(1) == y[i:i + batch]).cpu())
            loss += float(F.cross_entropy(out.float(), y[i:i + batch], reduction="sum"))
    model.train(was_training)
    hits = torch.cat(correct)
    return int(hits.sum()) / len(x), loss / len(x), hits


@dataclass
class Trainer:
    """SGD with momentum and a per-step cosine learning-rate schedule."""

    cfg: Config
    model: nn.Module
    split: Split
    steps_per_epoch: int = field(init=False)

    def __post_init__(self):
        cfg = self.cfg
        self.batches = Batches(self.split.x_train, self.split.y_train, cfg.batch_size,
                               seed=cfg.seed, drop_last=True)
        self.steps_per_epoch = len(self.batches)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        total = cfg.epochs * self.steps_per_epoch
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))

    def epoch(self, epoch: int) -> dict:
        """One pass over the training set. Returns train loss, accuracy, time and final lr."""
        self.model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.cfg.device)
        correct = torch.zeros((), device=self.cfg.device, dtype=torch.long)
        seen = 0
        bar = tqdm(self.batches, desc=f"train epoch {epoch}/{self.cfg.epochs}", leave=False,
                   disable=not self.cfg.progress, unit="batch")
        for x, y in bar:
            out = self.model(x)
            loss = F.cross_entropy(out, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            # accumulate on the device: no host synchronization per step
            loss_sum += loss.detach() * len(y)
            correct += (out.argmax(1) == y).sum()
            seen += len(y)
        _sync(self.cfg.device)
        return {
            "train_loss": float(loss_sum) / seen,
            "train_acc": int(correct) / seen,
            "train_time_s": time.perf_counter() - t0,
            "lr": self.opt.param_groups[0]["lr"],
        }


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def precise_grid(cfg: Config, model: nn.Module, split: Split, epoch: int) -> dict:
    """Recompute precise statistics for every (N, B) of the grid and evaluate each.

    The model keeps its EMA statistics: each recompute runs with ``apply=False`` and the result
    is applied to a deep copy, so training continues from the EMA model. Subsets of N < all are
    drawn ``cfg.repeats`` times; the two batch sizes see the same samples in the same order.

    Returns:
        ``rows``: one per recompute (N, B, repeat, accuracy, loss, seconds, samples used);
        ``drift``: per B, ``PopulationStats.drift`` of the EMA against the N=all statistics;
        ``correct``: per-image correctness with the N=all statistics at the largest B;
        ``values_per_sample``: per layer, values per channel that one sample contributes.
    """
    from ..precise import recompute_bn_stats

    n_train = len(split.x_train)
    counts, batches = sample_counts(cfg, n_train), norm_batches(cfg)
    jobs = [(n, r, b) for n in counts for r in range(1 if n >= n_train else cfg.repeats)
            for b in batches]
    out = {"rows": [], "drift": {}, "correct": None, "values_per_sample": {}}
    bar = tqdm(jobs, desc=f"precise BN epoch {epoch}/{cfg.epochs}", leave=False,
               disable=not cfg.progress, unit="recompute")
    for n, r, b in bar:
        bar.set_postfix(N=n, B=b)
        # the loader keeps the training batch; recompute_bn_stats regroups it into batches of B
        data = Batches(split.x_train, split.y_train, cfg.batch_size,
                       seed=cfg.seed * 1_000_003 + epoch * 1009 + r)
        _sync(cfg.device)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # small normalization batches are recomputed on purpose, to show their bias
            warnings.filterwarnings("ignore", message=".*normalization batch of")
            warnings.filterwarnings("ignore", message=".*in batches of one sample")
            stats = recompute_bn_stats(model, data, num_samples=n, batch_size=b, apply=False)
        _sync(cfg.device)
        seconds = time.perf_counter() - t0
        precise = copy.deepcopy(model)
        stats.apply(precise)
        acc, loss, correct = evaluate(precise, split.x_test, split.y_test)
        # samples_used < num_samples when a last batch of one sample was skipped
        out["rows"].append({"num_samples": n, "batch_size": b, "repeat": r, "acc": acc,
                            "loss": loss, "time_s": seconds, "samples_used": stats.num_samples,
                            "batches": stats.num_batches})
        if n == n_train:
            out["drift"][str(b)] = stats.drift(model)
            if b == max(batches):
                out["correct"] = correct
                out["values_per_sample"] = {
                    name: int(s.count.max()) // stats.num_samples for name, s in stats.items()}
    return out

