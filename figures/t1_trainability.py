"""T1: trainability against depth. BatchNorm, Fixup, SkipInit (alpha = 0), SkipInit
(alpha = 1) and the 1/sqrt(2) rescale, trained with the same steps and learning-rate grid at
every depth; per (scheme, depth): the best learning rate by final training loss, its final
training loss and test accuracy, and at how many learning rates the run diverged.

Writes T1.md (the table), T1.csv (every run), T1.json, T1.pdf and T1.png (training curves
of the best learning rate per scheme, one panel per depth).

Usage: python figures/t1_trainability.py [--quick | --full] [--out DIR] [--device cuda]
       [--dataset cifar10 --data-root DIR] [--depths ...] [--lrs ...] [--epochs E] ...
"""
import os
import sys
import time

import numpy as np

from propagation import plot

import _common
import _training

FIGURE = "T1"

# The paper's variants: (scheme, alpha). alpha None is the scheme's default.
VARIANTS = (("batchnorm", None), ("fixup", None), ("skipinit", 0.0), ("skipinit", 1.0),
            ("sqrt_half", None))

SCALES = {
    "quick": dict(dataset="digits", depths=(10, 16), width=4, batch_size=32, epochs=0.5,
                  lrs=(0.1,), seeds=1),
    # Two CPU cores: 5 schemes x 4 depths x 3 learning rates, 90 steps of 64 digits each.
    "default": dict(dataset="digits", depths=(16, 64, 256, 1000), width=8, batch_size=64,
                    epochs=4, lrs=(0.03, 0.1, 0.3), seeds=1),
    # The paper's setting, approximately (Wide-ResNets with k = 2 on CIFAR-10; a GPU).
    "full": dict(dataset="cifar10", depths=(16, 100, 1000), width=32, batch_size=128,
                 epochs=100, lrs=(0.025, 0.05, 0.1, 0.2, 0.4, 0.8), seeds=1, augment=True),
    "flags": {"--depths": (int, "depths (6 N + 4 layers)"),
              "--batch-size": (int, "batch size")},
}


def cell_text(res, n_lrs):
    b = _training.best(res)
    div = sum(r["diverged"] for r in res)
    div_text = f", {div}/{n_lrs} lr diverged" if div else ""
    if b is None:
        return f"diverged at every lr ({n_lrs}/{n_lrs})"
    return (f"{100 * b['test_acc']:.1f}% / {b['train_loss']:.3f} "
            f"(lr {b['run']['lr']:g}{div_text})")


def main(argv=None):
    args = _training.parse_args(FIGURE, "trainability against depth", SCALES, argv)
    s = args.scale
    s["batch_size"] = s["batch_size"][0] if isinstance(s["batch_size"], tuple) else s["batch_size"]
    started = time.time()
    runs = {}
    for scheme, alpha in VARIANTS:
        for depth in s["depths"]:
            for lr in s["lrs"]:
                for seed in range(s["seeds"]):
                    runs[(scheme, alpha, depth, lr, seed)] = _training.common_run(
                        s, scheme=scheme, alpha=alpha, depth=depth, lr=lr, seed=seed,
                        batch_size=s["batch_size"])
    results = dict(zip(runs, _training.run_grid(args, list(runs.values()), FIGURE)))
    if not _training.train.is_main_process():
        return 0
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, FIGURE)
    _training.write_csv(stem + ".csv", list(results.values()))

    # Cells: best learning rate per (variant, depth), pooling seeds by the mean loss.
    def cell(scheme, alpha, depth):
        per_lr = []
        for lr in s["lrs"]:
            rs = [results[(scheme, alpha, depth, lr, seed)] for seed in range(s["seeds"])]
            per_lr.append({**rs[0], "diverged": any(r["diverged"] for r in rs),
                           "train_loss": _training.mean(r["train_loss"] for r in rs),
                           "test_acc": _training.mean(r["test_acc"] for r in rs),
                           "test_loss": _training.mean(r["test_loss"] for r in rs)})
        return per_lr

    labels = {v: results[(*v, s["depths"][0], s["lrs"][0], 0)]["label"] for v in VARIANTS}
    n_steps = results[(*VARIANTS[0], s["depths"][0], s["lrs"][0], 0)]["steps"]
    data = results[(*VARIANTS[0], s["depths"][0], s["lrs"][0], 0)]["data"]
    header = "| scheme | " + " | ".join(f"{d} layers" for d in s["depths"]) + " |"
    lines = [header, "|---|" + "---|" * len(s["depths"])]
    table = []
    for v in VARIANTS:
        row = [labels[v]]
        for depth in s["depths"]:
            c = cell(*v, depth)
            row.append(cell_text(c, len(s["lrs"])))
            b = _training.best(c)
            table.append({"scheme": labels[v], "depth": depth,
                          "best_lr": None if b is None else b["run"]["lr"],
                          "train_loss": None if b is None else b["train_loss"],
                          "test_acc": None if b is None else b["test_acc"],
                          "diverged_lrs": [r["run"]["lr"] for r in c if r["diverged"]]})
        lines.append("| " + " | ".join(row) + " |")
    caption = (f"{FIGURE}: trainability against depth ({s['scale']} scale). Network: "
               f"ResNet-V2/Wide-ResNet-style, 3 stages of (depth - 4)/6 pre-activation basic "
               f"blocks, widths {s['width']}, {2 * s['width']}, {4 * s['width']}, each "
               f"scheme's blocks; {_training.describe(s, list(results.values()))}; batch "
               f"{s['batch_size']}, {n_steps} steps for every cell; learning-rate grid "
               f"{_training.grid_text(s)}; {s['seeds']} seed(s), device "
               f"{s['device']}. Cell: test accuracy / final training loss (mean over the last "
               f"10% of steps) at the learning rate with the lowest final training loss, and "
               f"how many learning rates diverged (a loss above 10 ln 10 or non-finite).")
    # Curves: the best learning rate of each variant, one panel per depth.
    fig, axes = plot.subplots(1, len(s["depths"]), figsize=(4.2 * len(s["depths"]), 4.4),
                              sharey=True, squeeze=False)
    curves = []
    for ax, depth in zip(axes[0], s["depths"]):
        for i, v in enumerate(VARIANTS):
            c = cell(*v, depth)
            b = _training.best(c) or min(c, key=lambda r: r["steps_run"])
            r = results[(*v, depth, b["run"]["lr"], 0)]
            color = f"C{i}"
            y = np.asarray(r["curve"]["loss"], dtype=float)
            x = np.asarray(r["curve"]["step"], dtype=float)
            top = r["run"]["diverge_factor"] * np.log(10)  # the divergence threshold
            shown = np.isfinite(y) & (y <= top)
            ax.plot(x[shown], y[shown], color=color, lw=1.2,
                    label=f"{labels[v]}" + (" (diverged)" if r["diverged"] else ""))
            if r["diverged"]:  # an x on the threshold line, at the step it was crossed
                ax.plot([r["diverged_at"]], [top], "x", color=color, ms=9, mew=2, clip_on=False)
            curves.append({"scheme": labels[v], "depth": depth, "lr": r["run"]["lr"],
                           "diverged": r["diverged"], "step": r["curve"]["step"],
                           "loss": _common.jsonable(y)})
        ax.set_yscale("log")
        ax.axhline(top, color="0.6", lw=0.8, ls=":")
        ax.set_title(f"{depth} layers")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("training loss (best lr per scheme)")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    _training.write(args.out, FIGURE, "trainability against depth", caption, lines,
                    {"settings": s, "table": table, "curves": curves, "data": data}, started,
                    fig, " Curves: training loss, bin-averaged; dotted line: the divergence "
                    "threshold; x: the step at which a run diverged.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
