"""Calibration and sharpness of the finite-width theory (``make calibrate``).

Calibration: for every scheme of the gate on the residual MLP, at widths 64, 128 and 256 and
depths 10 and 100, SEEDS initialisations (each with its own N(0, 1) batch of `width`
inputs) are measured; for each part (skip, branch, gradient) and quantity the table gives
the share of (seed, block) values inside the predicted 90% band (``predict(...,
width=n, batch=b).quantile(0.05)`` to ``.quantile(0.95)``), which should be 85-95%, and the
worst distance between the measured and the predicted median at width 256, against the
5% target where 64 seeds resolve it (the standard error of a median is 1.25 sigma / sqrt(S)).
Positions where the theory marks itself invalid (sigma above 0.5 nats) are counted apart, and
positions it predicts without spread (a normalisation's own output) are checked as exact.

Conv nets: every gate scheme on the gate's convolutional ResNet-V2 (width 32, two stages)
at 10 and 30 blocks on 8 x 3 x 16 x 16 batches, the same 64 seeds: the position theory's
profile with the 7/n band that ``compare`` uses for convolutional statistics (the
finite-width theory covers statistics over the batch alone), as coverage of centre +- 1.645
sigma and the worst distance of the measured median from the centre.

Sharpness: for each normalised scheme at 100 blocks and width 256, the gate's check (3
seeds, as in CI) of networks whose every branch, or every skip connection, carries an
extra gain: the smallest gain it catches.

The MLP and conv tasks share one pool of workers, largest first, and each is scored as it
arrives, so that no core idles while another finishes a part.

Writes <out>/calibration.md and calibration.json; prints the tables.
"""
import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

QUANT = (("skip", "second_moment"), ("skip", "squared_mean"), ("skip", "variance"),
         ("branch", "second_moment"), ("branch", "squared_mean"), ("branch", "variance"),
         ("grad", "second_moment"))
SHORT = {"second_moment": "q", "squared_mean": "m", "variance": "v"}


def _settings():
    from propagation import gate
    return gate.settings()


def _measure(task):
    """log2 statistics of one (scheme, params, width, depth) over seeds: (seeds, positions)."""
    import torch
    import propagation as P
    from propagation import nets
    torch.set_num_threads(1)
    scheme, params, width, depth, seeds = task
    out = {k: [] for k in QUANT}
    torch.manual_seed(0)
    model = nets.residual_mlp(depth, width=width, scheme=scheme, **params)
    for seed in range(seeds):
        if seed:
            # A new draw of the same network in place: measure's merge search is cached per
            # model, and building a 100-block network costs as much as measuring it.
            torch.manual_seed(seed)
            _redraw(model)
        x = torch.randn(width, width, generator=torch.Generator().manual_seed(10_000 + seed))
        m = P.measure(model, x, progress=False)
        for part, q in QUANT:
            out[(part, q)].append(getattr(getattr(m, part), f"log2_{q}"))
    return task, {f"{p}/{q}": np.stack(v).tolist() for (p, q), v in out.items()}


def _measure_conv(task):
    """As _measure, for the gate's convolutional ResNet-V2 (basic blocks, two stages) on
    CONV_SHAPE batches: log2(measured / predicted), each seed against the position theory
    started from its own block-0 input."""
    import torch
    import propagation as P
    from propagation import nets
    torch.set_num_threads(1)
    scheme, params, width, depth, seeds = task
    out = {k: [] for k in QUANT}
    torch.manual_seed(0)
    model = _conv_net(scheme, params, width, depth)
    geo = nets.conv_geometry(model, CONV_SHAPE)
    for seed in range(seeds):
        if seed:
            torch.manual_seed(seed)
            _redraw(model)
        x = torch.randn(CONV_SHAPE, generator=torch.Generator().manual_seed(10_000 + seed))
        m = P.measure(model, x, progress=False)
        # As check: the theory from this network's own block-0 input (the stem's draw).
        th = P.predict(**model.theory, positions=geo, **P.input_state(m, finite_batch=True))
        with np.errstate(invalid="ignore"):  # -inf - -inf: an exactly zero branch
            for part, q in QUANT:
                out[(part, q)].append(getattr(getattr(m, part), f"log2_{q}")
                                      - getattr(getattr(th, part), f"log2_{q}"))
    return task, {f"{p}/{q}": np.stack(v).tolist() for (p, q), v in out.items()}


#: The conv calibration's width (the gate's conv nets' width).
CONV_WIDTH = 32

#: The conv calibration's batches: 8 images of 3 x 16 x 16 (the gate's are 32 x 32; 16 x 16
#: keeps 64 seeds of every scheme within the ten minutes).
CONV_SHAPE = (8, 3, 16, 16)


def _conv_net(scheme, params, width, depth):
    from propagation import nets
    return nets.resnet_v2(stages=(depth - depth // 2, depth // 2), width=width, scheme=scheme,
                          block="basic", num_classes=None, **params)


def conv_score(task, data):
    """Calibration rows of one conv task's measurements (``_measure_conv``), scored as
    ``compare`` scores them: where the position theory's finite-width spread is valid
    (``predict(..., positions=..., width=n)``, propagation/finite_positions.py: second
    moments and squared means), its median and sigma; elsewhere (channel variances,
    gradients, paths its walk marks as led by the realised kernel's excess) the 7/n band.
    Per quantity: the share of (seed, block) values within centre +- 1.645 sigma (and
    apart, over the spread's positions), and the worst |measured median - centre| in nats
    and in standard errors (1.25 sigma / sqrt(S))."""
    import propagation as P
    from propagation import comparison, nets
    from propagation.positions import Population, _conv_args
    scheme, params, width, depth, _ = task
    rows = []
    # The band's sigma from the theory of the stem's mean draw (it moves little with
    # the input state; each seed's centre is its own theory, in the deltas).
    model = _conv_net(scheme, params, width, depth)
    geo = nets.conv_geometry(model, CONV_SHAPE)
    stem = Population.iid(CONV_SHAPE[2:], CONV_SHAPE[0])
    for spec in geo["stem"]:
        stem = stem.conv(spec["gain2"], **_conv_args(spec))
    th = P.predict(**model.theory, positions=geo, input_second_moment=stem.q,
                   input_squared_mean=stem.m, width=width)
    for part, q in QUANT:
        meas = np.asarray(data[f"{part}/{q}"]) * math.log(2)  # ln(measured / theory)
        if part == "grad":
            sig = comparison.grad_sigma(th, width)
            pred = th.grad.log2_second_moment * math.log(2)
        else:
            s_skip, s_branch = comparison.finite_width_sigma(th, width, 2, q)
            sig = s_skip if part == "skip" else s_branch
            pred = getattr(getattr(th, part), f"log2_{q}") * math.log(2)
        # Centred as compare centres (a second moment's median sits sigma^2 / 2 below
        # its mean); where the theory is not finite (an exactly zero branch), nothing.
        centre = np.where(np.isfinite(pred),
                          -0.5 * sig ** 2 if q == "second_moment" else 0.0, np.nan)
        spread = np.zeros(len(sig), dtype=bool)
        if part != "grad":
            med, sg = th.spread.part(part)
            s_sig = getattr(sg, f"log2_{q}") * math.log(2)
            spread = (getattr(th.spread, f"valid_{part}") & np.isfinite(s_sig)
                      & np.isfinite(pred))
            with np.errstate(invalid="ignore"):  # -inf - -inf: an exactly zero branch
                centre = np.where(spread, getattr(med, f"log2_{q}") * math.log(2) - pred,
                                  centre)
            sig = np.where(spread, s_sig, sig)
        ok = np.isfinite(centre) & np.isfinite(meas).all(axis=0) & (sig > 0)
        if q == "squared_mean":
            # As compare: a squared mean below what `width` channels resolve
            # (q / n) is checked only against that floor, not covered.
            q_pred = getattr(th, part).log2_second_moment * math.log(2)
            ok &= pred >= q_pred - math.log(width)
        n_ok = int(ok.sum())
        inside = np.abs(meas - centre) <= 1.645 * sig
        cover = float(inside[:, ok].mean()) if n_ok else math.nan
        on_spread = ok & spread
        dm = np.abs(np.median(meas, axis=0) - centre)
        se = 1.2533 * sig / math.sqrt(meas.shape[0])
        rows.append({"scheme": scheme + "".join(f"-{k}{v}" for k, v in params.items()),
                     "width": width, "depth": depth, "part": part, "quantity": q,
                     "coverage": cover, "positions": n_ok,
                     "spread_positions": int(on_spread.sum()),
                     "coverage_spread": float(inside[:, on_spread].mean())
                     if on_spread.any() else math.nan,
                     "median_worst": float(np.max(dm[ok])) if n_ok else math.nan,
                     "median_worst_in_se": float(np.max(dm[ok] / se[ok])) if n_ok
                     else math.nan})
    return rows


def _redraw(model):
    """Draw every weight of a reference network again from its initialisation law."""
    import torch
    from propagation import nets
    with torch.no_grad():
        for module in model.modules():
            w = getattr(module, "weight", None)
            if w is None:
                continue
            gain2 = getattr(w, "_nominal_gain2", None)
            if gain2 is not None:
                nets._normal_(w, gain2)
            elif isinstance(module, (nets.WSLinear, nets.WSConv2d)):
                w.normal_()  # standardised in forward: any N(0, s^2) draw is the same law


def _theory(scheme, params, width, depth):
    import propagation as P
    return P.predict(depth, scheme, width=width, batch=width, input_second_moment=1.0,
                     input_squared_mean=0.0, **params)


def _cost(kind, task):
    """A rough relative cost of one task (seconds per seed on one core, measured once):
    the pool takes the largest first, so that no worker idles at the end."""
    _, _, width, depth, seeds = task
    if kind == "conv":
        return seeds * depth * 0.017  # a measure and a position theory per seed
    return seeds * depth * (0.0015 + 0.0075 * (width / 256) ** 2)


def calibration(seeds, widths, depths, conv_width, conv_depths, workers):
    """Measure every MLP and conv task (one pool, largest first) and score each as it
    arrives: (MLP rows, conv rows, wall seconds)."""
    from concurrent.futures import as_completed
    settings = _settings()
    jobs = ([("mlp", (s, p, w, d, seeds)) for s, p in settings for w in widths for d in depths]
            + [("conv", (s, p, conv_width, d, seeds)) for s, p in settings for d in conv_depths])
    jobs.sort(key=lambda j: -_cost(*j))
    rows, conv_rows = [], []
    t0 = time.time()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    with ProcessPoolExecutor(workers) as ex:
        futures = {ex.submit(_measure if kind == "mlp" else _measure_conv, task): kind
                   for kind, task in jobs}
        done = as_completed(futures)
        if tqdm is not None:
            done = tqdm(done, total=len(futures), desc="calibrate", file=sys.stderr)
        for fut in done:
            task, data = fut.result()
            if futures[fut] == "mlp":
                rows += score(task, data)
            else:
                conv_rows += conv_score(task, data)
    # Tables in a fixed order, whatever order the tasks finished in.
    order = {(s + "".join(f"-{k}{v}" for k, v in p.items())): i for i, (s, p) in enumerate(settings)}
    key = lambda r: (order[r["scheme"]], r["width"], r["depth"])  # noqa: E731
    return sorted(rows, key=key), sorted(conv_rows, key=key), time.time() - t0


def score(task, data):
    """Calibration rows of one MLP task's measurements (``_measure``) against the theory."""
    scheme, params, width, depth, _ = task
    rows = []
    th = _theory(scheme, params, width, depth)
    lo, hi, med = th.quantile(0.05), th.quantile(0.95), th.quantile(0.5)
    for part, q in QUANT:
        meas = np.asarray(data[f"{part}/{q}"])

        def get(prof, part=part, q=q):
            return getattr(getattr(prof, part), f"log2_{q}")
        valid = getattr(th.spread, f"valid_{part}")
        a, b, c = get(lo), get(hi), get(med)
        sig = getattr(th.spread.part(part)[1], f"log2_{q}") * math.log(2)
        ok = np.isfinite(a) & np.isfinite(b) & valid & np.isfinite(meas).all(axis=0)
        # A prediction without spread (a normalisation's own output, LayerNorm's q = 1) has
        # no band to cover: it is checked as exact instead, to LayerNorm's eps (1e-5 of a
        # variance of order one) and float32 sums over a few hundred channels (~1e-6):
        # 1e-4 in log2 leaves ten times that.
        exact = ok & (sig == 0)
        ok &= sig > 0
        with np.errstate(invalid="ignore"):
            exact_within = (np.abs(meas - c) <= 1e-4)[:, exact]
        # float32 sums over a few hundred channels: ~1e-6 relative; 1e-5 in log2.
        inside = (meas >= a - 1e-5) & (meas <= b + 1e-5)
        n_ok = int(ok.sum())
        cover = float(inside[:, ok].mean()) if n_ok else math.nan
        # Median: measured over seeds vs predicted, in nats, and the standard error.
        with np.errstate(invalid="ignore"):  # -inf - -inf: an exactly zero quantity
            dm = (np.median(meas, axis=0) - c) * math.log(2)
        se = 1.2533 * sig / math.sqrt(meas.shape[0])
        worst = float(np.max(np.abs(dm[ok]))) if n_ok else math.nan
        # Resolvable: 2 standard errors below the 5% target.
        res = ok & (2 * se < math.log(1.05))
        worst_res = float(np.max(np.abs(dm[res]))) if res.any() else math.nan
        excess = float(np.max(np.abs(dm[ok]) / np.maximum(se[ok], 1e-12))) if n_ok else math.nan
        rows.append({"scheme": scheme + "".join(f"-{k}{v}" for k, v in params.items()),
                     "width": width, "depth": depth, "part": part, "quantity": q,
                     "coverage": cover, "positions": n_ok, "invalid": int((~valid).sum()),
                     "exact": int(exact.sum()),
                     "exact_within": float(exact_within.mean()) if exact.any() else math.nan,
                     "median_worst": worst, "median_worst_resolved": worst_res,
                     "median_worst_in_se": excess})
    return rows


def _scale(g):
    """A module multiplying by the constant g."""
    from torch import nn

    class Scale(nn.Module):
        def forward(self, x):
            return x * g
    return Scale()


def _sharp_net(scheme, where, g):
    """The gate's 100-block width-256 MLP with every branch (or skip) carrying gain g."""
    import torch
    from torch import nn
    from propagation import nets
    model = nets.residual_mlp(100, width=256, scheme=scheme)
    with torch.no_grad():
        for block in model.blocks:
            last = [m for m in block.branch if isinstance(m, nn.Linear)][-1]
            if where == "branch":
                last.weight.mul_(g)
            else:  # y = g x + f = g (x + f / g): a post gain and the branch over g
                last.weight.div_(g)
                block.post.append(_scale(g))
    return model


def _sharp_task(task):
    """One sharpness row: (scheme, where, gains, seeds) -> the first gain the check fails,
    or for where="healthy" the healthy network's result and widest bands."""
    import functools
    import torch
    import propagation as P
    torch.set_num_threads(1)
    scheme, where, gains, seeds = task

    def check(w, g):
        return P.check(functools.partial(_sharp_net, scheme, w, g), (256, 256), seeds=seeds,
                       theory={"scheme": scheme}, progress=False, diagnosis=False)
    if where == "healthy":
        base = check("branch", 1.0)
        bands = {}
        for r in base.comparison.rows:
            if r.resolved:
                k = f"{r.part}/{SHORT.get(r.quantity, r.quantity)}"
                bands[k] = max(bands.get(k, 0.0), r.band)
        return task, (base.ok, bands)
    for g in gains:
        if not check(where, g).ok:
            return task, g
    return task, None


def sharpness(gains, seeds=3, workers=2):
    """Smallest branch / skip gain error the gate's check catches, per normalised scheme
    (each scheme's healthy network checked once; the schemes in parallel)."""
    schemes = ("batchnorm", "layernorm", "relu_bn_conv", "postnorm")
    tasks = [(s, w, tuple(gains), seeds) for s in schemes for w in ("healthy", "branch", "skip")]
    with ProcessPoolExecutor(workers) as ex:
        done = dict(ex.map(_sharp_task, tasks))
    out = []
    for s in schemes:
        ok, bands = done[(s, "healthy", tuple(gains), seeds)]
        for where in ("branch", "skip"):
            out.append({"scheme": s, "error": where,
                        "caught_at": done[(s, where, tuple(gains), seeds)],
                        "healthy_passes": ok, "widest_band": bands})
    return out


def _name(r):
    return f"{r['scheme']} {r['part']}/{SHORT[r['quantity']]}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--seeds", type=int, default=64)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--depths", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-sharpness", action="store_true")
    ap.add_argument("--conv-depths", type=int, nargs="+", default=[10, 30])
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows, conv_rows, secs = calibration(args.seeds, args.widths, args.depths, CONV_WIDTH,
                                        args.conv_depths, args.workers)
    t_sharp = time.time()
    sharp = [] if args.no_sharpness else sharpness((1.02, 1.05, 1.1, 1.2, 1.5),
                                                   workers=args.workers)
    secs_sharp = time.time() - t_sharp
    lines = [f"# Calibration of the finite-width theory ({args.seeds} seeds; MLP and conv nets "
             f"{secs:.0f} s, sharpness {secs_sharp:.0f} s, on {args.workers} workers)", "",
             "Share of measured values inside the predicted 90% band (target 85-95%); "
             "`n` positions per seed where the theory is valid.", ""]
    keys = [f"{p}/{SHORT.get(q, 'G')}" for p, q in QUANT]
    lines.append("| scheme | width | depth | " + " | ".join(keys) + " |")
    lines.append("|---|---:|---:|" + "---:|" * len(keys))
    by = {}
    for r in rows:
        by.setdefault((r["scheme"], r["width"], r["depth"]), {})[(r["part"], r["quantity"])] = r
    for (s, w, d), rs in by.items():
        cells = []
        for p, q in QUANT:
            r = rs[(p, q)]
            cells.append("–" if not r["positions"] else f"{100 * r['coverage']:.0f}%")
        lines.append(f"| {s} | {w} | {d} | " + " | ".join(cells) + " |")
    exact = [r for r in rows if r["exact"]]
    if exact:
        worst = min(r["exact_within"] for r in exact)
        lines += ["", f"Positions predicted without spread (a normalisation's own output): "
                  f"{sum(r['exact'] for r in exact)} (scheme, width, depth, quantity, block) "
                  f"checked as exact instead of covered; the share within 1e-4 log2 of the "
                  f"prediction is {100 * worst:.0f}% at worst "
                  f"({', '.join(sorted({_name(r) for r in exact}))})."]
    lines += ["", "Worst |measured median - predicted median| (nats) at width 256, over positions "
              "where 2 standard errors resolve 5% (in brackets: over all valid positions, and "
              "the worst in standard errors).", ""]
    lines.append("| scheme | depth | " + " | ".join(keys) + " |")
    lines.append("|---|---:|" + "---:|" * len(keys))
    for (s, w, d), rs in by.items():
        if w != max(args.widths):
            continue
        cells = []
        for p, q in QUANT:
            r = rs[(p, q)]
            a, b, e = r["median_worst_resolved"], r["median_worst"], r["median_worst_in_se"]
            cells.append("–" if not r["positions"] else
                         f"{'–' if math.isnan(a) else f'{a:.3f}'} ({b:.3f}, {e:.1f} se)")
        lines.append(f"| {s} | {d} | " + " | ".join(cells) + " |")
    if sharp:
        lines += ["", "Sharpness at 100 blocks, width 256, 3 seeds: the smallest gain on every "
                  "branch (or every skip) that the gate's check fails; the widest band of the "
                  "healthy network per quantity (nats).", "",
                  "| scheme | error | caught at | healthy passes | widest bands |", "|---|---|---:|---|---|"]
        for r in sharp:
            bands = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["widest_band"].items()))
            lines.append(f"| {r['scheme']} | {r['error']} gain | {r['caught_at'] or '> 1.5'} | "
                         f"{r['healthy_passes']} | {bands} |")
    lines += ["", f"Conv nets (ResNet-V2 basic blocks, two stages, width 32, batches "
              f"{'x'.join(map(str, CONV_SHAPE))}, {args.seeds} seeds), scored as compare "
              "scores them: the position theory's finite-width spread where it is valid (q "
              "and m; propagation/finite_positions.py), compare's 7/n band elsewhere. Share "
              "of values within centre +- 1.645 sigma; in brackets the share over the "
              "spread's positions (k of n positions per seed), then the worst "
              "|median - centre| in nats and in standard errors.", ""]
    lines.append("| scheme | depth | " + " | ".join(keys) + " |")
    lines.append("|---|---:|" + "---:|" * len(keys))
    conv_by = {}
    for r in conv_rows:
        conv_by.setdefault((r["scheme"], r["depth"]), {})[(r["part"], r["quantity"])] = r
    for (s, d), rs in conv_by.items():
        cells = []
        for p, q in QUANT:
            r = rs[(p, q)]
            spread = (f"spread {100 * r['coverage_spread']:.0f}% on "
                      f"{r['spread_positions']}/{r['positions']}; " if r["spread_positions"]
                      else "")
            cells.append("–" if not r["positions"] else
                         f"{100 * r['coverage']:.0f}% ({spread}{r['median_worst']:.2f}, "
                         f"{r['median_worst_in_se']:.1f} se)")
        lines.append(f"| {s} | {d} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "calibration.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "calibration.json"), "w") as f:
        json.dump({"rows": rows, "sharpness": sharp, "seconds": secs, "conv_rows": conv_rows,
                   "sharpness_seconds": secs_sharp}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
