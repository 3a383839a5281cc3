"""Tables and the written findings of the demo, computed from its results (never canned)."""

from __future__ import annotations

import math
from collections import defaultdict
from statistics import mean

# Wu & Johnson (2021), Table 2: ResNet-50 on ImageNet, validation error (%), precise statistics
# from N = 10^4 samples in normalization batches of B.
PAPER_TABLE2 = (
    "| trained at batch | EMA | precise B=2 | B=10 | B=100 | B=1000 |\n"
    "|---:|---:|---:|---:|---:|---:|\n"
    "| 32 | 23.7 | 28.8 | 24.0 | 23.5 | 23.5 |\n"
    "| 2 | 35.5 | | | 32.0 (B>=100) | 32.0 |"
)


def summarize(results: dict) -> list[dict]:
    """Per epoch: EMA error/loss and, per (N, B), the mean over repeats of error (%), loss and
    recompute time, with the min/max error over repeats."""
    out = []
    for ep in results["epochs"]:
        groups = defaultdict(list)
        for row in ep["precise"]:
            groups[(row["num_samples"], row["batch_size"])].append(row)
        precise = {}
        for key, rows in groups.items():
            errs = [100 * (1 - r["acc"]) for r in rows]
            precise[key] = {"err": mean(errs), "err_min": min(errs), "err_max": max(errs),
                            "loss": mean(r["loss"] for r in rows),
                            "time_s": mean(r["time_s"] for r in rows), "repeats": len(rows)}
        out.append({"epoch": ep["epoch"], "ema_err": 100 * (1 - ep["ema"]["acc"]),
                    "ema_loss": ep["ema"]["loss"], "precise": precise,
                    "train_time_s": ep["train_time_s"], "drift": ep["drift"],
                    "paired": ep["paired"]})
    return out


def _n_label(n: int, n_train: int) -> str:
    return f"all ({n})" if n == n_train else str(n)


def tables(results: dict) -> str:
    """Markdown tables: test error and loss per epoch (EMA vs every (N, B)), recompute times and
    the per-layer EMA drift of the last epoch. Readable as plain text too."""
    summ, counts, bs = summarize(results), results["num_samples"], results["norm_batches"]
    n_train = results["data"]["n_train"]
    head = ["epoch", "EMA"] + [f"B={b} N={_n_label(n, n_train)}" for b in bs for n in counts]
    lines = ["Test error (%); precise = mean over repeats of N < all:", "",
             _row(head), _row(["---:"] * len(head))]
    for s in summ:
        lines.append(_row([s["epoch"], f"{s['ema_err']:.2f}"]
                          + [f"{s['precise'][(n, b)]['err']:.2f}" for b in bs for n in counts]))
    lines += ["", "Test loss (cross-entropy):", "", _row(head), _row(["---:"] * len(head))]
    for s in summ:
        lines.append(_row([s["epoch"], f"{s['ema_loss']:.4f}"]
                          + [f"{s['precise'][(n, b)]['loss']:.4f}" for b in bs for n in counts]))
    last = summ[-1]
    lines += ["", f"Recompute time (s, epoch {last['epoch']}; one training epoch took "
              f"{last['train_time_s']:.2f} s):", "",
              _row(["N"] + [f"B={b}" for b in bs]), _row(["---:"] * (1 + len(bs)))]
    for n in counts:
        lines.append(_row([_n_label(n, n_train)]
                          + [f"{last['precise'][(n, b)]['time_s']:.3f}" for b in bs]))
    for b in bs:
        rows = last["drift"].get(str(b)) or []
        lines += ["", f"EMA drift from precise statistics (N=all, B={b}), epoch "
                  f"{last['epoch']}:", "", _row(DRIFT_HEAD), _row(["---"] + ["---:"] * 5)]
        lines += [_row([r["layer"], r["channels"], f"{r['mean_err_avg']:.4f}",
                        f"{r['mean_err_max']:.4f}", f"{r['std_err_avg']:.4f}",
                        f"{r['std_err_max']:.4f}"]) for r in rows]
    return "\n".join(lines)


# PopulationStats.drift: mean error in population std units, relative error of the std;
# average and max over channels
DRIFT_HEAD = ["layer", "C", "mean err (avg)", "mean err (max)", "std err (avg)",
              "std err (max)"]


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def sign_test_p(a: int, b: int) -> float:
    """Exact two-sided McNemar (sign) test: the probability, if both classifiers were equally
    good, of a split of the a + b discordant test images at least as uneven as (a, b)."""
    n, k = a + b, min(a, b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def _images(k: int) -> str:
    return f"{k} image{'s' if k != 1 else ''}"


def _paired(s: dict, n_test: int) -> tuple[str, float]:
    a, b = s["paired"]["ema_only_wrong"], s["paired"]["precise_only_wrong"]
    p = sign_test_p(a, b)
    verdict = "significant" if p < 0.05 else "not significant"
    return (f"of the same {n_test} test images, {_images(a)} {'is' if a == 1 else 'are'} wrong "
            f"only with EMA and {_images(b)} only with precise statistics (exact McNemar test "
            f"p = {p:.3g}, {verdict} at 5 %)"), p


def _cmp(a: float, b: float, what_a: str, what_b: str, unit: str = " %") -> str:
    if math.isclose(a, b, abs_tol=1e-9):
        return f"{what_a} and {what_b} tie at {a:.2f}{unit}"
    word = "lower" if a < b else "higher"
    return f"{what_a} is {word} than {what_b} ({a:.2f}{unit} vs {b:.2f}{unit})"


def findings(results: dict) -> list[str]:
    """The conclusions, each computed from the numbers: final EMA vs precise, where they differ
    (epochs, normalization batch, sample count), drift, cost, and the paper beside them."""
    summ, counts, bs = summarize(results), results["num_samples"], results["norm_batches"]
    n_train, n_test = results["data"]["n_train"], results["data"]["n_test"]
    b_train, b_big = results["config"]["batch_size"], max(bs)
    first, last = summ[0], summ[-1]
    best = (n_train, b_big)
    out = []

    p_last = last["precise"][best]
    diff = last["ema_err"] - p_last["err"]
    paired, p_value = _paired(last, n_test)
    if diff > 0 and p_value < 0.05:
        verdict = "Precise statistics beat EMA at the end of training"
    elif diff > 0:
        verdict = ("Precise statistics do not clearly beat EMA at the end of training (lower "
                   "error, but within noise)")
    elif diff < 0:
        verdict = "Precise statistics do NOT beat EMA at the end of training"
    else:
        verdict = "Precise statistics and EMA give the same test error at the end of training"
    out.append(f"{verdict}, epoch {last['epoch']}: EMA {last['ema_err']:.2f} % vs precise "
               f"(N=all={n_train}, B={b_big}) {p_last['err']:.2f} % test error; {paired}. "
               f"Test loss: EMA {last['ema_loss']:.4f} vs precise {p_last['loss']:.4f}.")

    gaps = [(s["ema_err"] - s["precise"][best]["err"], s["epoch"]) for s in summ]
    better, worse = sum(g > 0 for g, _ in gaps), sum(g < 0 for g, _ in gaps)
    loss_better = sum(s["precise"][best]["loss"] < s["ema_loss"] for s in summ)
    big, big_ep = max(gaps)
    at_big = next(s for s in summ if s["epoch"] == big_ep)
    text = (f"Over {len(summ)} evaluation(s), precise (N=all, B={b_big}) had lower test error "
            f"than EMA after {better}, higher after {worse}, equal after "
            f"{len(summ) - better - worse}; lower test loss after {loss_better}.")
    if big > 0:
        text += (f" The largest error gap in EMA's disfavour came after epoch {big_ep}: "
                 f"{at_big['ema_err']:.2f} % vs {at_big['precise'][best]['err']:.2f} % "
                 f"({big:.2f} points); {_paired(at_big, n_test)[0]}.")
    ratio, r_ep = max((s["ema_loss"] / s["precise"][best]["loss"], s["epoch"]) for s in summ)
    at_r = next(s for s in summ if s["epoch"] == r_ep)
    text += (f" The largest loss ratio, EMA over precise, is {ratio:.2f}x after epoch {r_ep} "
             f"({at_r['ema_loss']:.4f} vs {at_r['precise'][best]['loss']:.4f}).")
    out.append(text)

    if b_train != b_big:
        small = [s["precise"][(n_train, b_train)] for s in summ]
        large = [s["precise"][best] for s in summ]
        d_err = mean(a["err"] - b["err"] for a, b in zip(small, large))
        d_loss = mean(a["loss"] - b["loss"] for a, b in zip(small, large))
        vps = results.get("layers", {})
        values = (f" Per batch of {b_train}, the BN layers see {b_train * max(vps.values())} "
                  f"to {b_train * min(vps.values())} values per channel (ResNet-50's last "
                  f"stage at B=2: 2x7x7 = 98)." if vps else "")
        out.append("Normalization batch (N=all): at the last epoch "
                   + _cmp(small[-1]["err"], large[-1]["err"], f"B={b_train} (the training "
                          "batch)", f"B={b_big}")
                   + f"; averaged over epochs, B={b_train} minus B={b_big} is {d_err:+.2f} "
                   f"points of error and {d_loss:+.4f} of loss." + values)

    for b in bs:
        per_n = ", ".join(f"N={_n_label(n, n_train)}: {last['precise'][(n, b)]['err']:.2f} %"
                          for n in counts)
        beat = [n for n in counts if last["precise"][(n, b)]["err"] <= last["ema_err"]]
        when = (f"the smallest N that matches or beats EMA is {_n_label(beat[0], n_train)}"
                if beat else "no N matches EMA")
        out.append(f"Sample count at B={b}, epoch {last['epoch']} (EMA {last['ema_err']:.2f} %): "
                   f"{per_n}; {when}.")

    for s in ([first, last] if len(summ) > 1 else [last]):
        rows = s["drift"].get(str(b_big)) or []
        if rows:
            worst = max(rows, key=lambda r: r["mean_err_avg"])
            out.append(f"EMA drift after epoch {s['epoch']}: the largest is in {worst['layer']}, "
                       f"whose EMA mean is off by {worst['mean_err_avg']:.3f} population std on "
                       f"average over channels (up to {worst['mean_err_max']:.3f}) and EMA std "
                       f"by {100 * worst['std_err_avg']:.1f} % (up to "
                       f"{100 * worst['std_err_max']:.1f} %).")

    t_all = last["precise"][best]["time_s"]
    t_small = last["precise"][(n_train, b_train)]["time_s"]
    out.append(f"Cost: recomputing over all {n_train} training samples took {t_all:.2f} s at "
               f"B={b_big} and {t_small:.2f} s at B={b_train}, against "
               f"{last['train_time_s']:.2f} s for one training epoch.")

    direction = "shows the same sign as" if diff > 0 else "does not show"
    out.append(f"Beside the paper (Table 2, ResNet-50 on ImageNet): a model trained at batch 2 "
               f"gains 3.5 points from precise statistics at B>=100 (EMA 35.5 % vs 32.0 %), "
               f"one trained at batch 32 gains 0.2 (23.7 % vs 23.5 %), and recomputing at B=2 "
               f"costs it 5.1 points (28.8 %). This run, trained at batch {b_train}, "
               f"{direction} that end-of-training gain ({diff:+.2f} points, EMA minus precise; "
               f"McNemar p = {p_value:.3g}).")
    return out
