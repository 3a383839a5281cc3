"""PNG plots of the demo (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os

from .report import summarize


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(results: dict, out_dir: str) -> list[str]:
    """Write the three plots into ``out_dir``.

    Returns:
        The file names written: per-epoch curves, error vs N, per-layer EMA drift.
    """
    plt = _pyplot()
    summ, counts, bs = summarize(results), results["num_samples"], results["norm_batches"]
    n_train, b_train = results["data"]["n_train"], results["config"]["batch_size"]
    title = f"{results['data']['name']}, SmallCNN trained at batch {b_train}"
    epochs = [s["epoch"] for s in summ]
    names = []

    # 1. test error and loss per epoch: EMA vs precise over all training samples
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "err", "test error (%)"), (axes[1], "loss", "test loss")):
        ax.plot(epochs, [s[f"ema_{key}"] for s in summ], "o-", color="k", label="EMA")
        for b in bs:
            ax.plot(epochs, [s["precise"][(n_train, b)][key] for s in summ], "s--",
                    label=f"precise, N=all, B={b}")
        small = [n for n in counts if n < n_train]
        if small:
            n = small[-1]
            ax.plot(epochs, [s["precise"][(n, max(bs))][key] for s in summ], "^:",
                    label=f"precise, N={n}, B={max(bs)}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].set_yscale("log")  # error stays linear: it can be exactly 0
    axes[0].set_ylim(bottom=0)
    axes[0].legend()
    fig.suptitle(f"EMA vs precise BN statistics per epoch — {title}")
    names.append(_save(fig, out_dir, "curves.png"))

    # 2. error vs N (log axis) for each B, first and last epoch; bars span the repeats
    shown = [summ[0], summ[-1]] if len(summ) > 1 else [summ[-1]]
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4), squeeze=False)
    for ax, s in zip(axes[0], shown):
        for i, b in enumerate(bs):
            p = [s["precise"][(n, b)] for n in counts]
            err = [q["err"] for q in p]
            lo = [q["err"] - q["err_min"] for q in p]
            hi = [q["err_max"] - q["err"] for q in p]
            # open markers and a small horizontal offset keep coinciding curves visible
            x = [n * (1.06 ** i) for n in counts]
            ax.errorbar(x, err, yerr=[lo, hi], fmt=("o-", "s--")[i % 2], capsize=3, mfc="none",
                        label=f"precise, B={b} (bars: min-max over subsets)")
        ax.axhline(s["ema_err"], color="k", ls="--", label=f"EMA ({s['ema_err']:.2f} %)")
        ax.set_xscale("log")
        ax.set_xlabel("N, samples used for precise statistics")
        ax.set_ylabel("test error (%)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"after epoch {s['epoch']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Test error vs sample count — {title}")
    names.append(_save(fig, out_dir, "error_vs_samples.png"))

    # 3. per-layer drift of the EMA from precise statistics (N=all, largest B), per epoch
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    layers = [r["layer"] for r in _drift(summ[0], max(bs))]
    for layer in layers:
        rows = [next(r for r in _drift(s, max(bs)) if r["layer"] == layer) for s in summ]
        axes[0].plot(epochs, [r["mean_err_avg"] for r in rows], "o-", label=layer)
        axes[1].plot(epochs, [r["std_err_avg"] for r in rows], "o-", label=layer)
    axes[0].set_ylabel("|EMA mean - precise mean| / precise std\n(average over channels)")
    axes[1].set_ylabel("|EMA std - precise std| / precise std\n(average over channels)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Per-layer EMA drift from precise statistics (N=all, B={max(bs)}) — {title}")
    names.append(_save(fig, out_dir, "ema_drift.png"))
    return names


def _drift(s: dict, b: int) -> list[dict]:
    return s["drift"].get(str(b)) or []


def _save(fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    _pyplot().close(fig)
    return name
