"""F4: gradients at initialisation. Per-block gradient second moment under a random read-out.

For every scheme with a reference network, on the residual MLP of F2: the squared norm of
dL/dx_l at every skip-path tensor x_0 .. x_D for L = sum(g * x_D), g ~ N(0, 1), relative to
its value at the output (so 1 at l = D). Lines: ``propagation.predict``; points:
``propagation.measure`` (median over seeds, bars: min-max). De & Smith analyse only the
forward pass; this is the backward counterpart their reviewers asked for.

Usage: python figures/f4_gradients.py [--quick] [--out DIR] [--seeds N]
"""
import sys
import time

from tqdm.auto import tqdm

from propagation import nets, plot

import _common

FIGURE = "F4"


def main(argv=None):
    args = _common.parse_args(FIGURE, "gradient second moment per block, residual MLP", argv)
    _common.setup_torch(args.threads)
    started = time.time()
    s = _common.mlp_settings(args.quick, args.seeds)
    schemes = nets.supported_schemes()
    cols = 5
    rows = -(-len(schemes) // cols)
    fig, axes = plot.subplots(rows, cols, figsize=(15, 3.3 * rows + 1.0), squeeze=False)
    curves, dtypes = [], {}
    for ax, scheme in zip(axes.flat, tqdm(schemes, desc=FIGURE, unit="scheme")):
        params, kwargs, theory, measured, dtype = _common.measure_mlp(scheme, s, backward=True)
        dtypes[scheme] = dtype
        style = plot.scheme_style(scheme)
        plot.plot_grad(measured, theory, ax=ax, color=style["color"], marker=style["marker"])
        _common.widen_log_y(ax)
        ax.set_title(scheme + "".join(f" ({k}={v:.3g})" for k, v in params.items())
                     + (f", {dtype}" if dtype != "float32" else ""), fontsize=9)
        curves.append(_common.curve(f"{scheme} grad", "grad", "second_moment", measured, theory,
                                    kwargs, scheme=scheme, params=params, dtype=dtype))
    for ax in axes.flat[len(schemes):]:
        ax.set_visible(False)
    wide = sorted(k for k, v in dtypes.items() if v == "float64")
    caption = (f"{FIGURE}: gradient second moment at every skip-path tensor x_0 .. x_D at "
               f"initialisation, relative to the output's (1 at block {s['depth']}), for the "
               f"random read-out L = sum(g * x_D), g ~ N(0, 1) (seeded per sample). Network: "
               f"{s['network']}, {s['depth']} blocks of two {s['width']}x{s['width']} linear "
               f"layers (no bias), no head; input: batch of {s['batch']} {s['input']} "
               f"vectors; {s['seeds']} seeds (weights, batch and read-out); measure in "
               f"{s['mode']} mode, forward and backward. Schemes: every scheme of "
               f"propagation.nets.supported_schemes() with its default parameters, except "
               f"skipinit with alpha = 1/sqrt({s['depth']}). dtype float32, except "
               f"{', '.join(wide) or 'none'} in float64 with a float64 input (theory beyond "
               f"2^{_common.FLOAT32_LOG2_LIMIT:.0f}). Lines: propagation.predict(**model.theory), "
               f"the infinite-width mean; dotted and shaded: the predicted median and 90% band "
               f"of one network of this width and batch (predict(..., width, batch)), where "
               f"the finite-width theory holds; "
               f"points: median over seeds, bars: min-max, at most 80 evenly spaced blocks "
               f"drawn (all in F4.json). Mode: {'quick' if s['quick'] else 'full'}.")
    _common.footer(fig, caption)
    _common.write(args.out, FIGURE, fig, caption, {**s, "dtype": dtypes}, curves, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
