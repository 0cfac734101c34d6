"""``compare`` theory with measurement, and ``diagnose`` a measured profile.

The band
--------
A measured statistic of a finite network is random: its weights are. For block l the
log-ratio of measurement to the infinite-width prediction has, to first order,

    Var[ln q_l] = (7 L / n) * sum_{k < l} f_k^2 * share_k,

where n is the width (channels), L the weight layers per branch and f_k the fraction of the
merge output's second moment that branch k contributed (from the prediction). A ReLU followed
by a weight layer changes the squared norm of a fixed direction by a factor whose relative
variance is 5/n (the ReLU: Var[relu(z)^2] / E[relu(z)^2]^2 = (3/2 - 1/4) / (1/4) over n
units) plus 2/n (the Gaussian weights): 7/n. The same count holds backwards (a Bernoulli(1/2)
mask times a chi-square, then the transposed weights). That variance is shared by every
input only along their common direction: ``share`` is 1 for the squared mean, and rho^2 for
the second moment and the variance (the differences between inputs average over many
directions while the inputs are spread out, and follow the common one as they collapse). Normalised networks
(f_k ~ 1/k) keep the sum bounded; unnormalised ones (f_k = 1/2) add 7 L D / (4 n): the band
widens with depth over width. (Checked: `none`, width 128, 1000 blocks predicts
Var[ln q] = 27, and the measured median sits 13.3 = 27/2 below the theory's mean.) The
median over S seeds has standard error about 1.25 sigma / sqrt(S), and the median of a
log-normal lies sigma^2/2 below the log of the mean, which is what the theory predicts; the
band of second moments and gradients is centred there.

A block and quantity pass when |log-ratio - centre| <= tolerance + z * 1.25 sigma / sqrt(S),
where tolerance is the stated target (10% for second moments, 15% for squared means and
variances, 25% for gradients) and z the two-sided normal quantile that keeps the chance of
any false alarm among the N checks of one comparison below 1% (Bonferroni: z = 4.0 for
N = 700). The z term is zero in the infinite-width limit.
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from . import _checks
from .profile import Normalised, Profile

#: Target relative tolerances (ln(1 + t) in log space) per quantity, from issue 4.
TOLERANCE = {"second_moment": 0.10, "squared_mean": 0.15, "variance": 0.15, "grad": 0.25}
#: Relative variance, times the width, of the squared-norm gain of one ReLU + weight layer.
_PER_LAYER = 7.0
_FALSE_ALARM = 0.01  # chance that a healthy network fails somewhere in one comparison
_MEDIAN_SE = 1.2533  # standard error of a median over that of a mean, Gaussian: sqrt(pi/2)


@dataclass(frozen=True)
class Row:
    part: str        # "skip", "branch" or "grad"
    quantity: str
    block: int
    predicted: float
    measured: float
    log_ratio: float  # ln(measured / predicted)
    centre: float
    band: float
    ok: bool
    resolved: bool = True  # False: the prediction lies below what the network can resolve,
    #                        and only an upper limit (the floor's 3-sigma level) is checked


@dataclass(frozen=True)
class Comparison:
    """Per block and quantity: predicted, measured, log-ratio and band. ``ok`` if all pass."""

    rows: tuple
    width: int
    seeds: int

    @property
    def ok(self):
        return all(r.ok for r in self.rows)

    @property
    def failures(self):
        return tuple(r for r in self.rows if not r.ok)

    @property
    def worst(self):
        """The row furthest outside (or least inside) its band, relative to the band."""
        rows = [r for r in self.rows if r.resolved] or self.rows
        return max(rows, key=lambda r: abs(r.log_ratio - r.centre) / r.band)

    def summary(self):
        """Worst |log-ratio - centre| and its band per (part, quantity)."""
        out = {}
        for r in self.rows:
            if not r.resolved and r.ok:
                continue
            key = (r.part, r.quantity)
            dev = abs(r.log_ratio - r.centre)
            if key not in out or dev / r.band > out[key][0] / out[key][1]:
                out[key] = (dev, r.band, r.block)
        return out

    def table(self, *, every=False):
        """A text table: per (part, quantity) the worst block, or every row with every=True."""
        lines = [f"{'part':7} {'quantity':14} {'block':>5} {'predicted':>12} {'measured':>12} "
                 f"{'ln ratio':>9} {'band':>7}  ok"]
        rows = self.rows if every else [
            next(r for r in self.rows if (r.part, r.quantity, r.block) == (p, q, b))
            for (p, q), (_, _, b) in self.summary().items()]
        for r in rows:
            lines.append(f"{r.part:7} {r.quantity:14} {r.block:5d} {r.predicted:12.5g} "
                         f"{r.measured:12.5g} {r.log_ratio:+9.4f} {r.band:7.4f}  "
                         f"{'yes' if r.ok else 'NO'}")
        verdict = "agree" if self.ok else f"DISAGREE in {len(self.failures)} of {len(self.rows)} checks"
        lines.append(f"theory and measurement {verdict} (width {self.width}, seeds {self.seeds})")
        return "\n".join(lines)

    def to_dict(self):
        return {"ok": self.ok, "width": self.width, "seeds": self.seeds,
                "rows": [r.__dict__ for r in self.rows]}


def finite_width_sigma(theory, width, layers=2, quantity="second_moment"):
    """Standard deviation of ln(quantity) at each skip position (depth + 1,), and at each
    branch (depth,), from the prediction (see the module docstring)."""
    part = {"second_moment": "second_moment", "squared_mean": "squared_mean",
            "variance": "variance"}[quantity]
    lb = getattr(theory.branch, f"log2_{part}")
    lnext = getattr(theory.skip, f"log2_{part}")[1:]
    with np.errstate(invalid="ignore", over="ignore"):
        f = np.minimum(np.nan_to_num(np.exp2(lb - lnext), nan=0.0, posinf=1.0), 1.0)
        # The common direction of the inputs carries the full per-layer spread: all of the
        # squared mean, rho^2 of the second moment. The variance (differences between inputs)
        # averages over many directions when inputs are spread out, but follows the common
        # direction's fluctuations as they collapse onto it: rho^2 as well.
        rho_b = np.nan_to_num(np.exp2(theory.branch.log2_squared_mean
                                      - theory.branch.log2_second_moment), nan=0.0)
    share = {"second_moment": rho_b ** 2, "squared_mean": np.ones_like(f),
             "variance": rho_b ** 2}[quantity]
    var_branch = _PER_LAYER * layers / width * share
    var_inc = var_branch * f ** 2
    with np.errstate(invalid="ignore"):
        rho_s = np.nan_to_num(np.exp2(theory.skip.log2_squared_mean[:-1]
                                      - theory.skip.log2_second_moment[:-1]), nan=0.0)
    # A projection shortcut is one more random weight layer, on the skip path.
    proj_share = {"squared_mean": np.ones_like(rho_s)}.get(quantity, rho_s ** 2)
    proj_own = np.where(theory.projection, _PER_LAYER / width * proj_share, 0.0)
    # How much of the spread at a block's input reaches its operands: all of it unless a
    # normalisation sits in between (predict records where; other profiles are assumed
    # unnormalised, the wider band). A norm after the merge fixes the second moment exactly.
    norm = theory.normalised or Normalised()
    carry_b = 0.0 if norm.branch else 1.0
    carry_p = 0.0 if norm.pre else 1.0
    post_reset = norm.post and quantity == "second_moment"
    var = np.zeros(theory.depth + 1)
    inherited = np.zeros(theory.depth)
    v = 0.0
    for l in range(theory.depth):
        inherited[l] = carry_b ** 2 * v
        if theory.projection[l]:
            v = carry_p ** 2 * v + proj_own[l]
        var[l] = v
        v = ((1.0 - f[l]) + f[l] * carry_b) ** 2 * v + var_inc[l]
        if post_reset and l < theory.depth - 1:
            v = 0.0
    var[theory.depth] = v
    return np.sqrt(var), np.sqrt(inherited + var_branch)


def grad_sigma(theory, width, layers=2):
    """As :func:`finite_width_sigma` for ln G, accumulated from the output backwards: the
    branch of block k carries the share chi_k / (1 + chi_k) of the gradient reaching its
    input, and each of its weight layers multiplies that share by a gain of relative variance
    7/n. ``predict`` records the shares; for other profiles they are inferred from G."""
    share = theory.grad_branch_share
    if share is None:
        g = theory.grad.log2_second_moment
        with np.errstate(over="ignore", invalid="ignore"):
            share = np.clip(1.0 - np.exp2(-(g[:-1] - g[1:])), 0.0, 1.0)
    share = np.nan_to_num(np.asarray(share, dtype=np.float64))
    var_inc = _PER_LAYER * layers / width * share ** 2
    var = np.concatenate((np.cumsum(var_inc[::-1])[::-1], [0.0]))
    return np.sqrt(var)


def compare(theory: Profile, measured: Profile, *, width: Optional[int] = None,
            quantities: Sequence[str] = ("second_moment", "squared_mean", "variance", "grad"),
            skip_first: bool = False) -> "Comparison":
    """Compare a prediction with a measurement, per block and quantity.

    Args:
        theory: a Profile from ``predict`` (use the measured x_0 as its input state, e.g.
            ``predict(..., input_second_moment=m.skip.second_moment[0], ...)``).
        measured: a Profile from ``measure`` with the same number of merges.
        width: channels of the residual stream, for the finite-width band (default: the
            smallest channel count that ``measure`` recorded).
        quantities: any of "second_moment", "squared_mean", "variance" and "grad".
    Returns: a :class:`Comparison` (``ok``, ``worst``, ``failures``, ``table()``).
    """
    for name, p in (("theory", theory), ("measured", measured)):
        if not isinstance(p, Profile):
            raise TypeError(f"{name} must be a propagation.Profile, got {type(p).__name__}")
    if theory.depth != measured.depth:
        raise ValueError(f"theory has {theory.depth} blocks but the measurement found "
                         f"{measured.depth} residual merges; predict with depth={measured.depth}")
    for q in quantities:
        _checks.choice("quantities entry", q, tuple(TOLERANCE))
    if width is None:
        width = measured.channels
        if width is None:
            raise ValueError("width is needed for the finite-width band: pass width=<channels>")
    width = _checks.positive_int("width", width)
    seeds = max(1, len(measured.samples))
    layers = int(theory.params.get("layers", 2))
    n_skip, n_branch = _samples_per_channel(measured)
    rows = []

    from scipy.stats import norm
    n_checks = len(quantities) * (2 * theory.depth + 1)
    z = float(norm.isf(_FALSE_ALARM / (2 * n_checks)))

    def add(part, quantity, pred_log2, meas_log2, sig, tol, floor_log2=None):
        half = z * _MEDIAN_SE * sig / math.sqrt(seeds)
        for l, (p2, m2) in enumerate(zip(pred_log2, meas_log2)):
            if not np.isfinite(p2) and not np.isfinite(m2):
                continue  # both exactly zero (e.g. a zero branch): nothing to compare
            if np.isnan(p2):
                continue  # not predicted
            if floor_log2 is not None and p2 < floor_log2[l]:
                # Below what a finite network can resolve: only require the measurement to
                # stay under the floor's 3-sigma level (9x for a chi-square with 1 dof).
                limit = floor_log2[l] + math.log2(9.0)
                ok = bool(m2 <= limit)
                rows.append(Row(part, quantity, l, float(np.exp2(floor_log2[l])), float(np.exp2(m2)),
                                float((m2 - floor_log2[l]) * math.log(2.0)), 0.0,
                                math.log(9.0), ok, resolved=False))
                continue
            lr = (m2 - p2) * math.log(2.0)
            # The theory is the mean of the second moment (and of G); the median of a
            # log-normal lies sigma^2 / 2 below it. How the mean splits into squared mean and
            # variance has no such simple law, so those are centred on the theory itself.
            centre = -0.5 * sig[l] ** 2 if quantity == "second_moment" else 0.0
            band = math.log1p(tol) + half[l]
            ok = bool(np.isfinite(lr) and abs(lr - centre) <= band)
            rows.append(Row(part, quantity, l, float(np.exp2(p2)), float(np.exp2(m2)),
                            float(lr), float(centre), float(band), ok))

    for q in quantities:
        if q == "grad":
            add("grad", "second_moment", theory.grad.log2_second_moment,
                measured.grad.log2_second_moment, grad_sigma(theory, width, layers),
                TOLERANCE["grad"])
            continue
        sig_skip, sig_branch = finite_width_sigma(theory, width, layers, q)
        for part, n_s, sig in (("skip", n_skip, sig_skip), ("branch", n_branch, sig_branch)):
            stats = getattr(theory, part)
            floor = None
            if q == "squared_mean":
                # A channel mean smaller than what n samples per channel (variance / n) or
                # `width` channels (second moment / width) resolve is noise, not signal.
                with np.errstate(divide="ignore"):
                    floor = np.logaddexp2(stats.log2_variance - np.log2(n_s),
                                          stats.log2_second_moment - math.log2(width))
            add(part, q, _finite_batch(stats, q, n_s),
                getattr(getattr(measured, part), f"log2_{q}"), sig, TOLERANCE[q], floor)
    if skip_first:
        rows = [r for r in rows if not (r.part == "skip" and r.block == 0)]
    return Comparison(rows=tuple(rows), width=width, seeds=seeds)


def input_state(measured: Profile) -> Dict[str, float]:
    """``predict`` keyword arguments for the measured state of x_0, the first block's input.

    x_0 is the input of the module that owns the first merge (``measured.block_input[0]``):
    for a block with an identity shortcut, its skip operand; for a block with a projection
    shortcut, the tensor both the projection and the branch start from, before any
    normalisation they share, which ``predict`` applies itself. (The skip operand of a
    projection-first network is the projection's output: starting there would apply the
    projection twice.) Profiles without ``block_input`` fall back to ``skip[0]``.

    The squared channel mean of n samples per channel overestimates the population one by
    variance / n, and the sample variance is (1 - 1/n) of it; that term is removed here
    (compare adds it back to every prediction).
    """
    if not isinstance(measured, Profile):
        raise TypeError(f"measured must be a propagation.Profile, got {type(measured).__name__}")
    stats, n0 = measured.skip, float(_samples_per_channel(measured)[0][0])
    if (measured.block_input is not None
            and np.isfinite(measured.block_input.log2_second_moment[0])
            and measured.block_input_samples_per_channel is not None):
        stats, n0 = measured.block_input, float(measured.block_input_samples_per_channel[0])
    q0 = float(stats.second_moment[0])
    m0 = float(stats.squared_mean[0])
    v0 = float(stats.variance[0])
    return {"input_second_moment": q0,
            "input_squared_mean": min(max(m0 - v0 / (n0 - 1.0), 0.0), q0)}


def _samples_per_channel(measured):
    n = measured.samples_per_channel
    if n is None:
        return np.full(measured.depth + 1, np.inf), np.full(measured.depth, np.inf)
    n = np.asarray(n, dtype=np.float64)
    return n, n[:-1]


def _finite_batch(stats, quantity, n):
    """The prediction as a finite sample measures it: the squared mean of n samples per
    channel includes variance / n, and the population variance loses that much."""
    if quantity == "second_moment":
        return stats.log2_second_moment
    with np.errstate(divide="ignore", invalid="ignore"):
        if quantity == "squared_mean":
            return np.logaddexp2(stats.log2_squared_mean, stats.log2_variance - np.log2(n))
        return stats.log2_variance + np.log2(1.0 - 1.0 / n)


# --- diagnose ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Diagnosis:
    law: str            # "linear", "exponential", "constant"
    rate: float         # per-block increment (linear, relative to q_0) or factor (exponential)
    closest: str        # the closest registered scheme
    messages: tuple     # sentences for people

    def __str__(self):
        return "\n".join(self.messages)


def _segments(profile):
    """Index ranges of the skip path between projection blocks (each >= 3 positions)."""
    starts = [0] + [int(i) for i in np.nonzero(profile.projection)[0] if i > 0] + [profile.depth + 1]
    return [(a, b) for a, b in zip(starts[:-1], starts[1:]) if b - a >= 3]


def _fit(q):
    """Fit the three laws to one segment; return {law: (rms of ln residuals, parameter)}."""
    l = np.arange(len(q), dtype=np.float64)
    lnq = np.log(q)
    fits = {}
    b, a = np.polyfit(l, q, 1)
    lin = np.maximum(a + b * l, 1e-300)
    fits["linear"] = (float(np.sqrt(np.mean((lnq - np.log(lin)) ** 2))), float(b / q[0]))
    d, c = np.polyfit(l, lnq, 1)
    fits["exponential"] = (float(np.sqrt(np.mean((lnq - (c + d * l)) ** 2))), float(np.exp(d)))
    fits["constant"] = (float(np.sqrt(np.mean((lnq - lnq.mean()) ** 2))), 1.0)
    return fits


def diagnose(measured: Profile) -> "Diagnosis":
    """Name the growth law of the skip path and what it means for the residual branches.

    Returns a :class:`Diagnosis`; ``str()`` of it is a few sentences, e.g.
    "skip path grows linearly, +0.97 per block: consistent with batchnorm ...".
    """
    if not isinstance(measured, Profile):
        raise TypeError(f"measured must be a propagation.Profile, got {type(measured).__name__}")
    if measured.depth < 2:
        raise ValueError(f"diagnose needs at least 2 blocks, got depth={measured.depth}")
    # The skip operands only: the last entry is the last merge's sum, before any rescale or
    # norm that follows it (sqrt_half, postnorm), and would read as growth.
    q = measured.skip.second_moment[:-1]
    segments = [(a, min(b, measured.depth)) for a, b in _segments(measured)]
    segments = [(a, b) for a, b in segments if b - a >= 3] or [(0, measured.depth)]
    votes = []
    for a, b in segments:
        seg = q[a:b]
        if not np.all(np.isfinite(seg)) or np.any(seg <= 0):
            continue
        fits = _fit(seg)
        rate_exp = fits["exponential"][1]
        # Less than ~28% change over the whole segment is no growth law: finite networks
        # fluctuate by that much.
        if abs(math.log(rate_exp)) * (len(seg) - 1) < 0.25:
            law = "constant"
        elif fits["exponential"][0] < 0.5 * fits["linear"][0]:
            law = "exponential"
        else:
            law = "linear"
        votes.append((law, fits, b - a))
    msgs = []
    if not votes:
        return Diagnosis("non-finite", math.nan, "none",
                         ("the skip path is not finite: it overflowed; an unnormalised network "
                          "doubles its signal every block (measure with dtype=torch.float64)",))
    law = max(("constant", "linear", "exponential"), key=lambda k: sum(n for v, _, n in votes if v == k))
    fits = next(f for v, f, _ in votes if v == law)
    down = measured.downscale
    branch_zero = not np.any(np.isfinite(down))
    if law == "exponential":
        rate = fits["exponential"][1]
        if rate > 1:
            alpha = math.sqrt(max(rate - 1.0, 0.0))
            closest = "none" if abs(rate - 2.0) < 0.3 else "skipinit"
            ratio = float(np.nanmedian(down))
            if closest == "none":
                msgs.append(f"skip path grows x{rate:.2f} per block: unnormalised; residual "
                            f"branches are not downscaled (downscale ~ {ratio:.2f})")
            else:
                msgs.append(f"skip path grows x{rate:.2f} per block: residual branches are "
                            f"downscaled by a constant ~ {ratio:.1f}, as by skipinit with alpha ~ "
                            f"{alpha:.2f}; the growth compounds with depth (keep alpha below "
                            f"1/sqrt(depth)). If this is a Fixup network, its last branch layers "
                            f"should be zero at initialisation")
        else:
            closest = "sqrt_half"
            msgs.append(f"skip path shrinks x{rate:.2f} per block: every block scales its signal down "
                        f"(a rescale applied twice, or a gain below 1 on the skip path); deep blocks "
                        f"see a vanishing signal")
    elif law == "linear":
        rate = fits["linear"][1]
        closest = "batchnorm" if rate > 0.5 else "nf"
        msgs.append(f"skip path grows linearly, {rate:+.2f} per block relative to its start: "
                    f"consistent with {closest} (downscale ~ sqrt(l)"
                    + (")" if closest == "batchnorm"
                       else f" / alpha, alpha ~ {math.sqrt(max(rate, 0.0)):.2f})"))
    else:
        rate = 1.0
        if branch_zero:
            closest = "fixup"
            msgs.append("skip path constant and every residual branch is exactly zero: each block "
                        "is the identity at initialisation (fixup, or skipinit with alpha = 0)")
        else:
            ratio = float(np.nanmedian(down))
            if ratio < 3:
                closest = "sqrt_half"
                msgs.append(f"skip path constant but branches are as large as the skip path "
                            f"(downscale ~ {ratio:.2f}): the variance is controlled by a rescale, "
                            f"with no bias towards the identity (sqrt_half or postnorm)")
            else:
                closest = "fixup"
                msgs.append(f"skip path nearly constant with small non-zero branches (downscale "
                            f"~ {ratio:.1f}): biased towards the identity; if this is a Fixup network, "
                            f"its last branch layers should be exactly zero at initialisation")
    if len(segments) > 1 and law == "linear":
        msgs.append(f"the growth restarts at {len(segments) - 1} stage boundaries (projection "
                    f"shortcuts reset the skip path)")
    if measured.mode == "eval" and law == "exponential":
        msgs.append("measured in eval mode: BatchNorm at initialisation then uses running statistics "
                    "(0, 1) and is the identity, so a BatchNorm network looks unnormalised; measure "
                    "with mode='train'")
    sums = measured.merge_log2_second_moment
    if sums is not None and measured.depth > 1:
        skip_l2 = measured.skip.log2_second_moment[1:-1]
        prev = np.asarray(sums[:-1], dtype=np.float64)
        ident = ~np.asarray(measured.projection[1:], dtype=bool)
        gap = (skip_l2 - prev)[~ident] if (~ident).any() else np.array([])
        scaled = (~ident).mean() > 0.5 and gap.size and np.nanmedian(gap) < -0.5
        if scaled:
            msgs.append(f"the skip operand is {2 ** (-np.nanmedian(gap) / 2):.1f}x smaller than the "
                        f"previous block's output in most blocks: a gain is applied to the skip path "
                        f"(SkipInit's alpha belongs at the end of the residual branch)")
    return Diagnosis(law, float(rate), closest, tuple(msgs))
