"""F5: batch size against learning rate, BatchNorm against SkipInit (alpha = 0).

For every batch size (powers of two), the same learning-rate grid at a fixed epoch budget;
per batch size: (a) the best test accuracy, (b) the learning rate that gave it (the optimal
learning rate) and the largest learning rate that did not diverge. The paper's claim: at
small batch sizes the optimal learning rates of the two are similar and well below the
largest stable one; BatchNorm's tolerance of larger learning rates pays off only at large
batch sizes.

Writes F5.csv (every run), F5.md (the optimal learning rates), F5.json, F5.pdf, F5.png.

Usage: python figures/f5_batch_lr.py [--quick | --full] [--out DIR] [--batch-sizes ...]
       [--lrs ...] [--epochs E] [--device cuda] [--dataset cifar10 --data-root DIR]
"""
import os
import sys
import time

import numpy as np

from propagation import plot

import _training

FIGURE = "F5"

VARIANTS = (("batchnorm", None), ("skipinit", 0.0))

# The learning-rate grid: powers of 2 (one grid for every batch size).
SCALES = {
    "quick": dict(dataset="digits", depth=10, width=4, batch_sizes=(16, 64), epochs=0.5,
                  lrs=(2 ** -4, 2 ** -1), seeds=1),
    # Two CPU cores: a WRN-16 of width 8 on the digits, 7 batch sizes x 10 learning rates.
    "default": dict(dataset="digits", depth=16, width=8,
                    batch_sizes=(8, 16, 32, 64, 128, 256, 512), epochs=10,
                    lrs=tuple(2.0 ** k for k in range(-8, 2)), seeds=1),
    # The paper's setting, approximately: WRN-16-4 on CIFAR-10, batch 16 to 4096.
    "full": dict(dataset="cifar10", depth=16, width=64,
                 batch_sizes=tuple(2 ** k for k in range(4, 13)), epochs=50,
                 lrs=tuple(2.0 ** k for k in range(-10, 3)), seeds=1, augment=True),
    "flags": {"--batch-sizes": (int, "batch sizes"), "--depth": (int, "depth (6 N + 4)")},
}


def grid(args, variants, figure, dropout=None):
    """Every (variant, batch size, lr, seed) run of the scale, trained or read back.
    ``variants``: (scheme, alpha, regularised); ``dropout`` (None: Run's default) applies to
    the regularised ones."""
    s = args.scale
    depth = s["depth"][0] if isinstance(s["depth"], tuple) else s["depth"]
    runs = {}
    for scheme, alpha, regularised in variants:
        for b in s["batch_sizes"]:
            for lr in s["lrs"]:
                for seed in range(s["seeds"]):
                    extra = {"dropout": dropout} if regularised and dropout is not None else {}
                    runs[(scheme, alpha, regularised, b, lr, seed)] = _training.common_run(
                        s, scheme=scheme, alpha=alpha, regularised=regularised, depth=depth,
                        batch_size=b, lr=lr, seed=seed, **extra)
    return dict(zip(runs, _training.run_grid(args, list(runs.values()), figure))), depth


def per_lr(results, s, scheme, alpha, regularised, b):
    """Seed-averaged results for each learning rate of one batch size."""
    out = []
    for lr in s["lrs"]:
        rs = [results[(scheme, alpha, regularised, b, lr, seed)] for seed in range(s["seeds"])]
        out.append({**rs[0], "diverged": any(r["diverged"] for r in rs),
                    "test_acc": _training.mean(r["test_acc"] for r in rs),
                    "test_loss": _training.mean(r["test_loss"] for r in rs),
                    "train_loss": _training.mean(r["train_loss"] for r in rs)})
    return out


def main(argv=None):
    args = _training.parse_args(FIGURE, "batch size against learning rate", SCALES, argv)
    s = args.scale
    started = time.time()
    variants = [(scheme, alpha, False) for scheme, alpha in VARIANTS]
    results, depth = grid(args, variants, FIGURE)
    if not _training.train.is_main_process():
        return 0
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, FIGURE)
    _training.write_csv(stem + ".csv", list(results.values()))
    fig, axes = plot.subplots(1, 2, figsize=(11, 4.8))
    summary, lines = [], ["| scheme | batch | best test acc | optimal lr | largest stable lr |",
                          "|---|---:|---:|---:|---:|"]
    for i, v in enumerate(variants):
        label = results[(*v, s["batch_sizes"][0], s["lrs"][0], 0)]["label"]
        acc, best_lr, stable = [], [], []
        for b in s["batch_sizes"]:
            c = per_lr(results, s, *v, b)
            bst = _training.best(c, "test_acc")
            ok = [r["run"]["lr"] for r in c if not r["diverged"]]
            acc.append(np.nan if bst is None else bst["test_acc"])
            best_lr.append(np.nan if bst is None else bst["run"]["lr"])
            stable.append(max(ok) if ok else np.nan)
            summary.append({"scheme": label, "batch_size": b, "best_test_acc": acc[-1],
                            "optimal_lr": best_lr[-1], "largest_stable_lr": stable[-1],
                            "test_acc_per_lr": {f"{r['run']['lr']:g}": (
                                None if r["diverged"] else r["test_acc"]) for r in c}})
            lines.append(f"| {label} | {b} | {100 * acc[-1]:.1f}% | {best_lr[-1]:g} | "
                         f"{stable[-1]:g} |")
        color = f"C{i}"
        axes[0].plot(s["batch_sizes"], 100 * np.asarray(acc), "o-", color=color, label=label)
        axes[1].plot(s["batch_sizes"], best_lr, "o-", color=color, label=f"{label}: optimal")
        axes[1].plot(s["batch_sizes"], stable, "v--", color=color, alpha=0.7,
                     label=f"{label}: largest stable")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("best test accuracy (%)")
    axes[1].set_yscale("log", base=2)
    axes[1].set_ylabel("learning rate")
    axes[0].set_title("(a) best test accuracy over the lr grid")
    axes[1].set_title("(b) optimal and largest non-diverging lr")
    some = next(iter(results.values()))
    caption = (f"{FIGURE}: batch size against learning rate ({s['scale']} scale). Network: "
               f"{_training.network(depth, s)}; {_training.describe(s, [some])}, the same "
               f"epoch budget at every batch size; learning-rate grid "
               f"{_training.grid_text(s)}; {s['seeds']} seed(s), device "
               f"{s['device']}. Optimal lr: the grid point with the best test accuracy; "
               f"largest stable lr: the largest that did not diverge (a loss above 10 ln 10 "
               f"or non-finite). A point at the grid's edge means the optimum may lie beyond.")
    _training.write(args.out, FIGURE, "batch size against learning rate", caption, lines,
                    {"settings": s, "summary": summary}, started, fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
