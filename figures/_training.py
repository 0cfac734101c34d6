"""What the training figures (T1, F5, T2) share: scales, command line, run grids, tables.

Every script has three scales: ``--quick`` (seconds; the tests), the default (two CPU
cores, scikit-learn digits) and ``--full`` (the paper's setting, approximately: CIFAR-10
from ``--data-root``, meant for a GPU with ``--device cuda``). Any size flag overrides the
scale's value. Finished runs are cached in ``<out>/runs`` (see propagation.train.Cache), so an
interrupted ``make figures`` continues where it stopped.
"""
import argparse
import csv
import io
import json
import os
import time

from propagation import train

import _common


def parse_args(figure_id, description, scales, argv=None):
    """Arguments, with ``args.scale`` the chosen scale's dict updated by the size flags."""
    parser = argparse.ArgumentParser(description=f"{figure_id}: {description}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny sizes (seconds; the tests)")
    mode.add_argument("--full", action="store_true",
                      help="the paper's setting, approximately: CIFAR-10 (--data-root), "
                           "GPU-sized (use --device cuda)")
    parser.add_argument("--out", default=os.path.join("figures", "out"))
    parser.add_argument("--cache", default=None, help="finished runs (default <out>/runs)")
    parser.add_argument("--workers", type=int, default=None,
                        help="runs trained at once, one process and one thread each "
                             "(default 2 on the CPU, 1 on a GPU)")
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N")
    parser.add_argument("--dataset", choices=("digits", "cifar10"), default=None)
    parser.add_argument("--data-root", default=None, help="CIFAR-10 folder (cifar-10-batches-py)")
    parser.add_argument("--width", type=int, default=None, help="stage-0 width (16 k: WRN-d-k)")
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--seeds", type=int, default=None, help="initialisations per cell")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="learning-rate grid")
    extra = scales.get("flags", {})
    for flag, (kind, help_) in extra.items():
        parser.add_argument(flag, type=kind, nargs="+", default=None, help=help_)
    args = parser.parse_args(argv)
    name = "quick" if args.quick else "full" if args.full else "default"
    scale = dict(scales[name], scale=name)
    for key in ("device", "dataset", "width", "epochs", "seeds", "lrs"):
        if getattr(args, key) is not None:
            scale[key] = getattr(args, key)
    for flag in extra:
        key = flag.lstrip("-").replace("-", "_")
        if getattr(args, key) is not None:
            scale[key] = tuple(getattr(args, key))
    scale.setdefault("device", "cpu")
    if scale["dataset"] == "cifar10" and args.data_root is None:
        parser.error("--dataset cifar10 (and --full) read CIFAR-10 from --data-root DIR; "
                     "nothing is downloaded")
    args.scale = scale
    args.cache = args.cache or os.path.join(args.out, "runs")
    return args


def common_run(scale, **fields):
    """A Run from the scale's shared settings and the cell's own fields."""
    base = dict(width=scale["width"], epochs=scale["epochs"], dataset=scale["dataset"],
                device=scale["device"], augment=scale.get("augment", False))
    return train.Run(**{**base, **fields})


def run_grid(args, runs, desc):
    """Results of ``runs`` (cached, in ``args.workers`` processes)."""
    train.init_distributed(args.scale["device"])
    return train.run_all(runs, cache=args.cache, workers=args.workers,
                         data_root=args.data_root, desc=desc)


def best(results, key="train_loss"):
    """The best non-diverged result by ``key`` ("train_loss": lowest; "test_acc": highest,
    ties to the lower test loss), or None if every run diverged."""
    ok = [r for r in results if not r["diverged"]]
    if not ok:
        return None
    if key == "train_loss":
        return min(ok, key=lambda r: (r["train_loss"], r["run"]["lr"]))
    return max(ok, key=lambda r: (r["test_acc"], -r["test_loss"], -r["run"]["lr"]))


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def write_csv(path, results, extra_columns=()):
    """One row per run: its settings and outcome."""
    fields = ["label", "scheme", "alpha", "regularised", "depth", "width", "batch_size",
              "lr", "epochs", "seed", "steps", "steps_run", "diverged", "diverged_at",
              "train_loss", "test_loss", "test_acc", "seconds", *extra_columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in results:
        w.writerow({**r["run"], **{k: v for k, v in r.items() if k != "run"}})
    with open(path, "w") as f:
        f.write(buf.getvalue())


def describe(scale, results):
    """The data and scale, for captions."""
    data = results[0]["data"] if results else scale["dataset"]
    augment = "random crops and flips" if scale.get("augment") else "no augmentation"
    return (f"data: {data}; SGD momentum 0.9, weight decay 5e-4, cosine decay over "
            f"{scale['epochs']:g} epochs, {augment}")


def network(depth, scale):
    """The network, for captions."""
    w = scale["width"]
    return (f"{depth}-layer ResNet-V2/Wide-ResNet-style net (3 stages of {(depth - 4) // 6} "
            f"pre-activation basic blocks, widths {w}, {2 * w}, {4 * w})")


def grid_text(scale):
    return ", ".join(f"{lr:g}" for lr in scale["lrs"])


def write(out, figure_id, title, caption, table_lines, data, started, fig=None,
          fig_note=""):
    """<out>/<id>.md (caption and table), .pdf and .png (when ``fig``), then .json (the
    Makefile's target: written last, so a run that dies half-way is redone)."""
    stem = os.path.join(out, figure_id)
    with open(stem + ".md", "w") as f:
        f.write(f"# {figure_id}: {title}\n\n{caption}\n\n" + "\n".join(table_lines) + "\n")
    if fig is not None:
        _common.footer(fig, caption + fig_note)
        fig.savefig(stem + ".pdf")
        fig.savefig(stem + ".png", dpi=110)
    seconds = round(time.time() - started, 2)
    with open(stem + ".json", "w") as f:
        json.dump({"figure": figure_id, "caption": caption, **data, "seconds": seconds}, f,
                  indent=1)
    print(f"{figure_id}: wrote {stem}.md, .csv, " + (".png, " if fig else "")
          + f".json in {seconds:.1f} s")
    print("\n".join(table_lines))
