"""F6: transformers at initialisation, the paper's argument on the residual stream of deep
transformers. (a) the stream's second moment, (b) the downscale factor of every residual
branch, (c) the token correlation (mean cosine between two tokens of a sequence), against
the residual merge, for pre-LN, post-LN, DeepNorm, LayerScale, ReZero, depth-muP and
CompleteP reference transformers. Lines: ``propagation.predict`` (the sequence theory);
points: ``propagation.measure`` (median over seeds, bars: min-max). Grey dashes: the
BatchNorm ResNet's theory at the same number of merges, for the side-by-side: pre-LN grows
linearly like it, post-LN holds the stream and collapses its tokens.

Usage: python figures/f6_transformers.py [--quick] [--out DIR] [--seeds N]
"""
import sys
import time

import numpy as np
from tqdm.auto import tqdm

import propagation
from propagation import nets, plot

import _common

FIGURE = "F6"
SCHEMES = (("transformer_preln", {}), ("transformer_postln", {}), ("deepnorm", {}),
           ("layerscale", {}), ("rezero", {"alpha": 0.1}), ("depth_mup", {}),
           ("completep", {}))


def settings(quick, seeds):
    full = dict(layers=64, width=256, tokens=32, batch=8)
    small = dict(layers=6, width=64, tokens=16, batch=4)
    return {**(small if quick else full), "network": "reference transformer (nets.transformer)",
            "heads": 4, "logit_std": 0.3, "input": "i.i.d. N(0, 1)", "seeds": seeds,
            "mode": "init", "quick": quick}


def _tokens_curve(label, part, measured, theory, kwargs, **extra):
    t = getattr(theory.tokens, part)
    m = getattr(measured.tokens, part)
    stack = np.stack([getattr(s.tokens, part) for s in measured.samples]) if measured.samples \
        else m[None]
    both = np.isfinite(t) & np.isfinite(m)
    return {"label": label, "part": part, "quantity": "token_correlation", "predict": kwargs,
            "x": _common.jsonable(np.arange(len(t))), "theory": _common.jsonable(t),
            "measured_median": _common.jsonable(m),
            "measured_low": _common.jsonable(np.nanmin(stack, axis=0)),
            "measured_high": _common.jsonable(np.nanmax(stack, axis=0)),
            "spread": "min-max over seeds",
            "worst_abs_difference": float(np.max(np.abs(t[both] - m[both]))) if both.any() else None,
            **extra}


def main(argv=None):
    args = _common.parse_args(FIGURE, "transformers at initialisation", argv)
    _common.setup_torch(args.threads)
    started = time.time()
    s = settings(args.quick, args.seeds)
    shape = (s["batch"], s["tokens"], s["width"])
    fig, axes = plot.subplots(1, 3, figsize=(17, 5.6))
    curves, handles, collapse = [], [], {}
    for scheme, params in tqdm(SCHEMES, desc=FIGURE, unit="scheme"):
        def build(scheme=scheme, params=params):
            return nets.transformer(s["layers"], width=s["width"], scheme=scheme,
                                    heads=s["heads"], logit_std=s["logit_std"], **params)
        result = propagation.check(build, shape, seeds=s["seeds"], backward=False,
                                   channel_axis=-1, mode=s["mode"], progress=False,
                                   quantities=("second_moment", "token_correlation"))
        theory, measured, kwargs = result.theory, result.measured, result.predict_kwargs
        label = scheme + "".join(f" ({k}={v:.3g})" for k, v in params.items())
        style = plot.scheme_style(scheme)
        handles.append(plot.legend_handle(label=label, **style))
        plot.plot_profile(measured, theory, "skip", "second_moment", ax=axes[0], **style)
        if np.isfinite(theory.log2_downscale).any():
            plot.plot_downscale(measured, theory, ax=axes[1], **style)
        plot.plot_tokens(measured, theory, "skip", ax=axes[2], **style)
        extra = dict(scheme=scheme, params=params)
        curves += [_common.curve(f"{scheme} skip", "skip", "second_moment", measured, theory,
                                 kwargs, **extra),
                   _common.curve(f"{scheme} downscale", "downscale", "second_moment", measured,
                                 theory, kwargs, **extra),
                   _tokens_curve(f"{scheme} tokens", "skip", measured, theory, kwargs, **extra)]
        diag = propagation.diagnose(measured).transformer
        collapse[scheme] = None if diag is None else diag.collapse_at
    # The ResNet beside them: BatchNorm's theory at as many merges (its q_l = q_0 + l).
    merges = 2 * s["layers"]
    bn = propagation.predict(merges, "batchnorm")
    x = np.arange(merges + 1)
    axes[0].plot(x, bn.skip.second_moment, color="0.5", linestyle="--", lw=1.2)
    axes[1].plot(np.arange(1, merges + 1), bn.downscale, color="0.5", linestyle="--", lw=1.2)
    handles.append(plot.legend_handle(color="0.5", marker="", linestyle="--",
                                      label="BatchNorm ResNet (theory)"))
    curves.append({"label": "batchnorm resnet skip", "part": "skip", "quantity": "second_moment",
                   "predict": {"depth": merges, "scheme": "batchnorm"},
                   "x": _common.jsonable(x), "theory": _common.jsonable(bn.skip.second_moment),
                   "scheme": "batchnorm", "theory_only": True})
    axes[0].set_title("(a) residual stream second moment")
    axes[0].set_xlabel("residual merge (two per transformer layer)")
    axes[1].set_title("(b) downscale sqrt(q_skip / q_branch)")
    axes[2].set_title("(c) token correlation of the stream")
    fig.legend(handles=handles, loc="outside right upper", fontsize=8,
               title="lines: theory\npoints: measured median\nbars: min-max over seeds",
               title_fontsize=7)
    worst_tok = max((c["worst_abs_difference"] or 0.0) for c in curves
                    if c.get("quantity") == "token_correlation")
    caption = (f"{FIGURE}: transformers at initialisation. Network: {s['network']}, "
               f"{s['layers']} layers (two residual merges each: attention, then a ReLU MLP "
               f"4x wide), width {s['width']}, {s['heads']} heads, attention logits of std "
               f"{s['logit_std']} between unit-norm tokens, no embedding; input: batch of "
               f"{s['batch']} {s['input']} sequences of {s['tokens']} tokens; {s['seeds']} "
               f"seeds (weights and batch); measure in {s['mode']} mode, forward only, float32. "
               f"Lines: propagation.predict (the sequence theory, attention to second order in "
               f"the logits) from the measured input state; points: median over seeds, bars: "
               f"min-max. Grey dashes: the BatchNorm ResNet's theory at as many merges. "
               f"(b) zigzags because an attention branch under near-uniform attention carries "
               f"only the token mean of its input, r + (1 - r)/T of the MLP's second moment "
               f"for token correlation r, until the tokens correlate. "
               f"Worst |measured - predicted| token correlation over every scheme and merge: "
               f"{worst_tok:.3f}. Rank collapse (token correlation >= 0.9) first at merge: "
               + ", ".join(f"{k} {v}" for k, v in collapse.items() if v is not None)
               + (" (none)" if all(v is None for v in collapse.values()) else "")
               + f". Mode: {'quick' if s['quick'] else 'full'}.")
    _common.footer(fig, caption)
    _common.write(args.out, FIGURE, fig, caption, s, curves, started, collapse=collapse)
    return 0


if __name__ == "__main__":
    sys.exit(main())
