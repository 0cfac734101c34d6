"""F2: the sqrt(depth) law. Downscale factor of every residual branch against block index.

For every scheme with a reference network, on a residual MLP: (a) the downscale factor
sqrt(q_skip / q_branch), (b) its inverse square q_branch / q_skip, against the block number
(log-log). Lines: ``propagation.predict``; points: ``propagation.measure`` (median over
seeds, bars: min-max). BatchNorm's factor grows like sqrt(l); unnormalised He blocks keep it
at 1.

Usage: python figures/f2_sqrt_depth.py [--quick] [--out DIR] [--seeds N]
"""
import sys
import time

import numpy as np
from tqdm.auto import tqdm

from propagation import nets, plot

import _common

FIGURE = "F2"


def main(argv=None):
    args = _common.parse_args(FIGURE, "the sqrt(depth) law on a residual MLP", argv)
    _common.setup_torch(args.threads)
    started = time.time()
    s = _common.mlp_settings(args.quick, args.seeds)
    fig, axes = plot.subplots(1, 2, figsize=(13, 5.8))
    curves, dtypes, zero_branch, handles = [], {}, [], []
    for scheme in tqdm(nets.supported_schemes(), desc=FIGURE, unit="scheme"):
        params, kwargs, theory, measured, dtype = _common.measure_mlp(scheme, s, backward=False)
        dtypes[scheme] = dtype
        label = scheme + "".join(f" ({k}={v:.3g})" for k, v in params.items())
        style = plot.scheme_style(scheme)
        if np.all(np.isneginf(theory.branch.log2_second_moment)):
            zero_branch.append(scheme)
        else:
            handles.append(plot.legend_handle(label=label, **style))
            for ax, part in zip(axes, ("downscale", "ratio")):
                plot.plot_downscale(measured, theory, ax=ax, inverse=part == "ratio", **style)
        for part in ("downscale", "ratio"):
            curves.append(_common.curve(f"{scheme} {part}", part, "second_moment", measured,
                                        theory, kwargs, scheme=scheme, params=params,
                                        dtype=dtype))
    axes[0].set_title("(a) downscale factor sqrt(q_skip / q_branch)")
    axes[1].set_title("(b) q_branch / q_skip")
    axes[0].set_ylabel("sqrt(q_skip / q_branch)")
    axes[1].set_ylabel("q_branch / q_skip")
    note = (", ".join(zero_branch) + ": branch exactly 0 at init (infinite downscale), not drawn"
            if zero_branch else None)
    fig.legend(handles=handles, loc="outside right upper", fontsize=8,
               title="lines: theory\npoints: measured median\nbars: min-max over seeds"
               + ("\n\n" + note.replace(": ", ":\n", 1).replace(", not", ",\nnot")
                  if note else ""), title_fontsize=7)
    wide = sorted(k for k, v in dtypes.items() if v == "float64")
    caption = (f"{FIGURE}: downscale factor per residual block at initialisation. Network: "
               f"{s['network']}, {s['depth']} blocks of two {s['width']}x{s['width']} linear "
               f"layers (no bias) with each scheme's normalisation and multipliers, no head; "
               f"input: batch of {s['batch']} {s['input']} vectors; {s['seeds']} seeds "
               f"(weights and batch); measure in {s['mode']} mode, forward only. Schemes: "
               f"every scheme of propagation.nets.supported_schemes() with its default "
               f"parameters, except skipinit with alpha = 1/sqrt({s['depth']}) "
               f"(alpha = 0 makes the branch 0). dtype float32, except "
               f"{', '.join(wide) or 'none'} measured in float64 with a float64 input "
               f"(their theory exceeds 2^{_common.FLOAT32_LOG2_LIMIT:.0f}, beyond float32). "
               f"x: block number l + 1. Points: median over seeds, bars: min-max, at most 40 "
               f"log-spaced blocks drawn (all blocks in F2.json); lines: "
               f"propagation.predict(**model.theory). "
               + (f"{note}. " if note else "")
               + f"Mode: {'quick' if s['quick'] else 'full'}.")
    _common.footer(fig, caption)
    _common.write(args.out, FIGURE, fig, caption, {**s, "dtype": dtypes}, curves, started,
                  zero_branch=zero_branch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
