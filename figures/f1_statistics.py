"""F1: per-block statistics at initialisation of a ResNet-50-V2-style bottleneck network.

Rows: (a) BatchNorm, (b) no normalisation, (c) SkipInit (alpha = 0). Columns: second moment,
average channel squared mean, average channel variance of the skip path and of the residual
branch, measured on i.i.d. N(0, 1) images (points: median over seeds, bars: min-max) with
the infinite-width theory drawn over them. The theory starts from the measured state of x_0,
the stem's output (a zero-padded conv of the images, so not exactly N(0, 1)).

Usage: python figures/f1_statistics.py [--quick] [--out DIR] [--seeds N]
"""
import sys
import time

import numpy as np
from tqdm.auto import tqdm

from propagation import nets, plot

import _common

FIGURE = "F1"
SCHEMES = (("batchnorm", {}, "(a) BatchNorm (BN-ReLU-Conv)"),
           ("none", {}, "(b) no normalisation, He init"),
           ("skipinit", {"alpha": 0.0}, "(c) SkipInit, alpha = 0"))
QUANTITIES = ("second_moment", "squared_mean", "variance")
TITLES = {"second_moment": "second moment", "squared_mean": "avg. channel squared mean",
          "variance": "avg. channel variance"}


def settings(quick, seeds):
    full = dict(stages=[3, 4, 6, 3], width=64, batch=16, image=32)
    small = dict(stages=[3, 4, 6, 3], width=8, batch=8, image=16)
    return {**(small if quick else full), "block": "bottleneck", "stem": "cifar",
            "seeds": seeds, "mode": "train", "dtype": "float32",
            "quick": quick}


def main(argv=None):
    args = _common.parse_args(FIGURE, "statistics at initialisation, ResNet-50-V2", argv)
    _common.setup_torch(args.threads)
    started = time.time()
    s = settings(args.quick, args.seeds)
    shape = (s["batch"], 3, s["image"], s["image"])

    fig, axes = plot.subplots(len(SCHEMES), len(QUANTITIES), figsize=(13, 10.5))
    curves, inputs_state = [], {}
    for row, (scheme, params, title) in enumerate(tqdm(SCHEMES, desc=FIGURE, unit="scheme")):
        def build():
            return nets.resnet_v2(s["stages"], s["width"], scheme, block=s["block"],
                                  stem=s["stem"], num_classes=10, **params)
        measured, theory, kwargs, inputs_state[scheme] = _common.measure_and_predict(
            build, shape, s["seeds"], s["mode"])
        for col, quantity in enumerate(QUANTITIES):
            ax = axes[row, col]
            for part, color, name in (("skip", "C0", "skip path"),
                                      ("branch", "C3", "residual branch")):
                plot.plot_profile(measured, theory, part, quantity, ax=ax, color=color,
                                  label=name)
                curves.append(_common.curve(f"{scheme} {part} {quantity}", part, quantity,
                                            measured, theory, kwargs, scheme=scheme,
                                            params=params))
            plot.mark_projections(ax, theory)
            ax.set_title(f"{title}: {TITLES[quantity]}", fontsize=9)
            ax.set_ylabel(TITLES[quantity])
            _common.widen_log_y(ax)
            if np.all(np.isneginf(theory.branch.log2_second_moment)):
                ax.text(0.5, 0.05, "branch = 0 at init (alpha = 0): not drawn on log axes",
                        transform=ax.transAxes, ha="center", fontsize=7, color="C3")
    axes[0, 0].legend(fontsize=7, title="lines: theory; points: measured\nmedian, bars: min-max "
                      "over seeds",
                      title_fontsize=7)
    caption = (f"{FIGURE}: statistics per residual block at initialisation. Network: "
               f"ResNet-V2 with bottleneck blocks, stages {tuple(s['stages'])} "
               f"({sum(s['stages'])} blocks, 1x1 projection shortcuts at stage starts, dotted "
               f"lines), base width {s['width']}, 3x3 stem, 10-class head. Input: batch of "
               f"{s['batch']} i.i.d. N(0, 1) images of 3x{s['image']}x{s['image']}; "
               f"{s['seeds']} seeds (weights and batch); measure in {s['mode']} mode "
               f"(batch statistics), {s['dtype']}, forward only. Points: median over seeds, "
               f"bars: min-max; lines: propagation.predict(**model.theory) with its convolutions "
               f"followed position by position (positions=nets.conv_geometry), started from the "
               f"measured x_0 (stem output) state "
               + ", ".join(f"{k}: q0={v['input_second_moment']:.3f}, "
                           f"m0={v['input_squared_mean']:.4f}" for k, v in inputs_state.items())
               + ". Skip = the skip operand of each merge (the projection at stage starts), "
               f"then the network output. Mode: {'quick' if s['quick'] else 'full'}.")
    _common.footer(fig, caption)
    _common.write(args.out, FIGURE, fig, caption, s, curves, started,
                  input_state=inputs_state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
