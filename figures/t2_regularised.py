"""T2: Regularised SkipInit (SkipInit + a scalar bias before every branch convolution +
dropout before the classifier) against SkipInit and BatchNorm, across batch sizes.

Per batch size and variant, the best test accuracy over F5's learning-rate grid, with its
learning rate, final training loss and test loss (their gap is the generalisation gap the
regularisation is meant to narrow). The BatchNorm and SkipInit runs are F5's own (same
settings, so they come from the cache when F5 has run).

Writes T2.md (the table), T2.csv (every run), T2.json.

Usage: python figures/t2_regularised.py [--quick | --full] [--out DIR] [--batch-sizes ...]
       [--dropout P] [--lrs ...] [--epochs E] [--device cuda] ...
"""
import os
import sys
import time

import _training
import f5_batch_lr as f5

FIGURE = "T2"

# F5's scales, at a subset of its batch sizes; dropout before the classifier.
SCALES = {
    "quick": dict(f5.SCALES["quick"], batch_sizes=(16, 64), dropout=0.2),
    "default": dict(f5.SCALES["default"], batch_sizes=(8, 32, 128, 512), dropout=0.2),
    "full": dict(f5.SCALES["full"], batch_sizes=(64, 256, 1024, 4096), dropout=0.2),
    "flags": {**f5.SCALES["flags"], "--dropout": (float, "dropout before the classifier")},
}


def main(argv=None):
    args = _training.parse_args(FIGURE, "Regularised SkipInit across batch sizes", SCALES, argv)
    s = args.scale
    started = time.time()
    dropout = s["dropout"][0] if isinstance(s["dropout"], tuple) else s["dropout"]
    variants = [("batchnorm", None, False), ("skipinit", 0.0, False), ("skipinit", 0.0, True)]
    results, depth = f5.grid(args, variants, FIGURE, dropout=dropout)
    if not _training.train.is_main_process():
        return 0
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, FIGURE)
    _training.write_csv(stem + ".csv", list(results.values()))
    labels = [results[(*v, s["batch_sizes"][0], s["lrs"][0], 0)]["label"] for v in variants]
    lines = ["| batch | " + " | ".join(labels) + " |", "|---:|" + "---|" * len(variants)]
    table = []
    for b in s["batch_sizes"]:
        row = [str(b)]
        for v, label in zip(variants, labels):
            bst = _training.best(f5.per_lr(results, s, *v, b), "test_acc")
            if bst is None:
                row.append("diverged at every lr")
                table.append({"batch_size": b, "scheme": label, "best": None})
                continue
            row.append(f"{100 * bst['test_acc']:.1f}% (lr {bst['run']['lr']:g}; train "
                       f"{bst['train_loss']:.3f}, test {bst['test_loss']:.3f})")
            table.append({"batch_size": b, "scheme": label, "test_acc": bst["test_acc"],
                          "lr": bst["run"]["lr"], "train_loss": bst["train_loss"],
                          "test_loss": bst["test_loss"]})
        lines.append("| " + " | ".join(row) + " |")
    some = next(iter(results.values()))
    caption = (f"{FIGURE}: Regularised SkipInit against SkipInit and BatchNorm ({s['scale']} "
               f"scale). Network: {_training.network(depth, s)}; "
               f"{_training.describe(s, [some])}; Regularised SkipInit: SkipInit (alpha = 0) "
               f"+ a learnable scalar bias before every residual-branch convolution + dropout "
               f"{dropout:g} before the classifier. Cell: best test accuracy over the "
               f"learning-rate grid {_training.grid_text(s)}, with its "
               f"learning rate and final training and test losses; {s['seeds']} seed(s), "
               f"device {s['device']}.")
    _training.write(args.out, FIGURE, "Regularised SkipInit across batch sizes", caption,
                    lines, {"settings": s, "table": table}, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
