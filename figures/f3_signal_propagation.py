"""F3: signal propagation plots (Brock, De & Smith 2021) of four ResNet-V2 variants.

BN-ReLU-Conv (scheme batchnorm), ReLU-BN-Conv (relu_bn_conv), and NF-ResNets x + alpha f(x /
beta) with He-initialised weights (nf_he) and with Scaled Weight Standardisation (nf), all
with 4 stages of bottleneck blocks. Panels: average channel squared mean of the skip path,
its average channel variance, and the residual branch's average channel variance, per block.
Lines: ``propagation.predict`` started from the measured state of x_0 (the stem output);
points: ``propagation.measure`` (median over seeds, bars: min-max).

Usage: python figures/f3_signal_propagation.py [--quick] [--out DIR] [--seeds N]
"""
import sys
import time

from tqdm.auto import tqdm

from propagation import nets, plot

import _common

FIGURE = "F3"
SCHEMES = (("batchnorm", "BN-ReLU-Conv (batchnorm)"),
           ("relu_bn_conv", "ReLU-BN-Conv (relu_bn_conv)"),
           ("nf_he", "NF-ResNet, He init (nf_he)"),
           ("nf", "NF-ResNet, Scaled WS (nf)"))
PANELS = (("skip", "squared_mean"), ("skip", "variance"), ("branch", "variance"))


def settings(quick, seeds):
    full = dict(stages=[3, 4, 23, 3], width=32, batch=16, image=32)
    small = dict(stages=[1, 1, 2, 1], width=8, batch=8, image=16)
    return {**(small if quick else full), "block": "bottleneck", "stem": "cifar",
            "seeds": seeds, "mode": "train", "dtype": "float32", "quick": quick}


def main(argv=None):
    args = _common.parse_args(FIGURE, "signal propagation plots, ResNet-V2", argv)
    _common.setup_torch(args.threads)
    started = time.time()
    s = settings(args.quick, args.seeds)
    shape = (s["batch"], 3, s["image"], s["image"])
    measured_all, theory_all, labels, colors, curves, inputs_state = [], [], [], [], [], {}
    for scheme, label in tqdm(SCHEMES, desc=FIGURE, unit="scheme"):
        def build():
            return nets.resnet_v2(s["stages"], s["width"], scheme, block=s["block"],
                                  stem=s["stem"], num_classes=10)
        measured, theory, kwargs, inputs_state[scheme] = _common.measure_and_predict(
            build, shape, s["seeds"], s["mode"])
        measured_all.append(measured)
        theory_all.append(theory)
        labels.append(label)
        colors.append(plot.scheme_color(scheme))
        for part, quantity in PANELS:
            curves.append(_common.curve(f"{scheme} {part} {quantity}", part, quantity,
                                        measured, theory, kwargs, scheme=scheme, params={}))

    # Top row: linear axes, as Brock et al. draw them; bottom row: the same on log axes, where
    # the small NF values and the theory-measurement gaps can be read.
    fig, axes = plot.subplots(2, 3, figsize=(15, 8.6))
    for row, logy in enumerate((False, True)):
        plot.signal_propagation_plot(measured_all, theory_all, labels=labels, colors=colors,
                                     axes=axes[row], logy=logy, legend=False)
        for ax in axes[row]:
            plot.mark_projections(ax, theory_all[0])
            if logy:
                ax.set_title(ax.get_title() + " (log scale)")
    axes[0, 0].legend(fontsize=8, title="lines: theory; points: measured\nmedian, bars: min-max "
                      "over seeds", title_fontsize=7)
    params = {sch: theory.params for (sch, _), theory in zip(SCHEMES, theory_all)}
    caption = (f"{FIGURE}: signal propagation plots at initialisation. Network: ResNet-V2 with "
               f"bottleneck blocks, stages {tuple(s['stages'])} ({sum(s['stages'])} blocks, "
               f"1x1 projection shortcuts at stage starts, dotted lines), base width "
               f"{s['width']}, 3x3 stem, 10-class head; blocks as in propagation.nets for "
               f"each scheme (nf and nf_he: alpha = {params['nf'].get('alpha')}, beta_l^2 = "
               f"expected variance of the block input). Input: batch of {s['batch']} i.i.d. "
               f"N(0, 1) images of 3x{s['image']}x{s['image']}; {s['seeds']} seeds (weights "
               f"and batch); measure in {s['mode']} mode, {s['dtype']}, forward only. Skip = "
               f"the skip operand of each merge (the projection at stage starts), then the "
               f"network output. Points: median over seeds, bars: min-max; lines: "
               f"propagation.predict(**model.theory) position by position (nets.conv_geometry), from the "
               f"measured x_0 state "
               + ", ".join(f"{k}: q0={v['input_second_moment']:.3f}, "
                           f"m0={v['input_squared_mean']:.4f}" for k, v in inputs_state.items())
               + ". Top: linear axes (Brock et al.); bottom: log axes (a zero theory, "
               f"relu_bn_conv's squared mean, is not drawn there). "
               f"Mode: {'quick' if s['quick'] else 'full'}.")
    _common.footer(fig, caption)
    _common.write(args.out, FIGURE, fig, caption, s, curves, started, input_state=inputs_state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
