"""What every figure script shares: its command line, seeding, agreement numbers and output.

Each script writes ``<out>/<ID>.json`` (the plotted data and the caption), ``<ID>.pdf`` and,
last, ``<ID>.png``: the png is the Makefile's target, so a run that dies half-way is redone.
"""
import argparse
import json
import os
import platform
import textwrap
import time

import numpy as np

import propagation
from propagation import plot
from propagation.pipeline import build_models, jsonable_kwargs


def parse_args(figure_id, description, argv=None):
    parser = argparse.ArgumentParser(description=f"{figure_id}: {description}")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (seconds; for tests and CI) instead of the full figure")
    parser.add_argument("--out", default=os.path.join("figures", "out"),
                        help="output folder (default figures/out)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="initialisations per network (default 3, quick 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1, see setup_torch)")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.quick else 3
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    return args


def setup_torch(threads):
    import torch
    # One thread: these layers are small (widths 8 to 512), so intra-op threads buy little,
    # and when two scripts share two cores (make -j2) OpenMP spin-waits made a 1000-block
    # measurement 10-50x slower in our tests. --threads raises it on a bigger machine.
    torch.set_num_threads(max(1, threads))
    return torch


def gaussian_input(seed, shape, dtype=None):
    """An i.i.d. N(0, 1) batch from its own generator (independent of the weights' seed),
    drawn in float32 and then cast: the MLP figures' numbers rest on these draws
    (propagation.gaussian_inputs draws in the dtype itself, as the gate does)."""
    import torch
    gen = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(shape, generator=gen).to(dtype or torch.float32)


def measure_and_predict(build, shape, seeds, mode):
    """Measure ``seeds`` seeded initialisations of ``build()`` on their own N(0, 1) batches
    (forward only) and predict the same finite network with ``propagation.check``:
    ``model.theory`` with its convolutions followed position by position (exact zero
    padding), started from the measured state of the first block's input.

    Returns (measured, theory, predict kwargs as JSON, input state).
    """
    result = propagation.check(build, shape, seeds=seeds, backward=False, mode=mode,
                               progress=False, diagnosis=False)
    kwargs = result.predict_kwargs
    state = {k: kwargs[k] for k in ("input_second_moment", "input_squared_mean")}
    return result.measured, result.theory, kwargs, state


def jsonable(a):
    """A list of floats; JSON has no inf/nan, so they travel as "inf", "-inf", "nan" (as in
    ``Profile.to_json``)."""
    return [float(v) if np.isfinite(v) else str(float(v)) for v in np.asarray(a, dtype=float)]


def worst_log2_ratio(measured, theory, part, quantity="second_moment"):
    """max |log2(measured median / theory)| over the blocks where both are finite and > 0."""
    _, m = plot.values(measured, part, quantity)
    _, t = plot.values(theory, part, quantity)
    ok = np.isfinite(m) & np.isfinite(t) & (m > 0) & (t > 0)
    if not ok.any():
        return None
    return float(np.max(np.abs(np.log2(m[ok]) - np.log2(t[ok]))))


def curve(label, part, quantity, measured, theory, predict_kwargs, **extra):
    """One plotted curve as data: the theory, and the measured median and seed spread."""
    x, t = plot.values(theory, part, quantity)
    _, m = plot.values(measured, part, quantity)
    lo, hi = plot.spread(measured, part, quantity) or (m, m)
    return {"label": label, "part": part, "quantity": quantity,
            "predict": predict_kwargs, "x": jsonable(x), "theory": jsonable(t),
            "measured_median": jsonable(m), "measured_low": jsonable(lo),
            "measured_high": jsonable(hi), "spread": "min-max over seeds",
            "worst_abs_log2_ratio": worst_log2_ratio(measured, theory, part, quantity),
            **extra}


def footer(fig, caption, fontsize=6.5):
    """The caption, wrapped, under the panels (a figure says what was run); the panels'
    constrained layout is shrunk to leave it room."""
    # About 0.5 em per character of the sans-serif font.
    lines = textwrap.wrap(caption, int(fig.get_figwidth() * 72 / (0.52 * fontsize)))
    fig.text(0.005, 0.004, "\n".join(lines), fontsize=fontsize, va="bottom", ha="left",
             color="0.25")
    height = (len(lines) * 1.3 + 1.0) * fontsize / 72.0 / fig.get_figheight()
    fig.get_layout_engine().set(rect=(0, height, 1, 1 - height))


def write(out_dir, figure_id, fig, caption, settings, curves, started, **extra):
    """Write <out>/<id>.json, .pdf and then .png; print the worst disagreement per curve."""
    os.makedirs(out_dir, exist_ok=True)
    data = {"figure": figure_id, "caption": caption, "settings": settings, "curves": curves,
            "propagation_version": propagation.__version__, "python": platform.python_version(),
            "seconds": round(time.time() - started, 2), **extra}
    stem = os.path.join(out_dir, figure_id)
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=1)
    fig.savefig(stem + ".pdf")
    fig.savefig(stem + ".png", dpi=110)
    print(f"{figure_id}: wrote {stem}.png, .pdf, .json in {data['seconds']:.1f} s")
    for c in curves:
        if c.get("theory_only"):
            continue
        # Token correlations (in [-1, 1]) are compared as a difference, the rest as a ratio.
        what, w = (("|measured - theory|", c["worst_abs_difference"])
                   if "worst_abs_difference" in c
                   else ("|log2 measured/theory|", c["worst_abs_log2_ratio"]))
        print(f"  {c['label']:55s} worst {what} = "
              + ("n/a (nothing finite to compare)" if w is None else f"{w:.3f}"))
    return data


def widen_log_y(ax, factor=16.0):
    """Let a log y axis span at least ``factor``, so that a flat curve reads as flat."""
    lo, hi = ax.get_ylim()
    if ax.get_yscale() == "log" and lo > 0 and hi / lo < factor:
        mid = (lo * hi) ** 0.5
        ax.set_ylim(mid / factor ** 0.5, mid * factor ** 0.5)


# --- the residual MLP of F2 and F4 ------------------------------------------------------------

def mlp_settings(quick, seeds):
    full = dict(depth=1000, width=128, batch=128)
    small = dict(depth=24, width=32, batch=32)
    return {**(small if quick else full), "network": "residual MLP (nets.residual_mlp)",
            "input": "i.i.d. N(0, 1)", "seeds": seeds, "mode": "train", "quick": quick}


def mlp_params(scheme, depth):
    """Scheme parameters for the MLP figures: the defaults, except SkipInit's alpha.

    SkipInit's default alpha = 0 makes every branch exactly 0 (an infinite downscale, nothing
    to draw); its paper's other choice, alpha = 1 / sqrt(depth), is drawn instead.
    """
    return {"alpha": depth ** -0.5} if scheme == "skipinit" else {}


# float32 holds about 2^128; the sums behind a second moment add log2(batch x width) ~ 14,
# so a network whose theory exceeds 2^100 anywhere is measured in float64.
FLOAT32_LOG2_LIMIT = 100.0


def measure_mlp(scheme, s, backward):
    """Theory kwargs, theory, measurement and dtype name of one scheme's residual MLP."""
    import torch
    from propagation import nets
    params = mlp_params(scheme, s["depth"])

    def build():
        return nets.residual_mlp(s["depth"], s["width"], scheme, **params)
    models = build_models(build, s["seeds"])  # build() under torch.manual_seed(seed)
    # The finite-width theory of one network of this width and batch: its median and 90% band
    # are drawn with the infinite-width line.
    kwargs = {**jsonable_kwargs(models[0].theory), "width": s["width"], "batch": s["batch"]}
    theory = propagation.predict(**kwargs)
    peak = max(np.nanmax(theory.skip.log2_second_moment), np.nanmax(theory.grad.log2_second_moment))
    dtype = torch.float64 if peak > FLOAT32_LOG2_LIMIT else torch.float32
    xs = [gaussian_input(seed, (s["batch"], s["width"]), dtype) for seed in range(s["seeds"])]
    measured = propagation.measure(models, xs, seeds=s["seeds"], backward=backward,
                                   mode=s["mode"], dtype=dtype, progress=False)
    return params, kwargs, theory, measured, str(dtype).replace("torch.", "")
