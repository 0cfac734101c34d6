"""The one result type of the toolkit: what ``predict`` computes and ``measure`` observes.

Both return a :class:`Profile`, so a plot, a comparison or a test puts theory beside
measurement with one line. Quantities are stored as log2 values (``predict(5000, "none")``
has second moments near 2^5000, far beyond float64); the linear properties convert on
access and warn, never silently, when a value does not fit in float64.
"""
import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional, Tuple

import numpy as np


class OverflowToInfWarning(RuntimeWarning):
    """A log2 quantity exceeds float64; its linear value is reported as inf."""


def _exp2(name, log2_values):
    log2_values = np.asarray(log2_values, dtype=np.float64)
    big = np.isfinite(log2_values) & (log2_values >= 1024.0)
    if big.any():
        first = int(np.argmax(big))
        warnings.warn(f"{name} overflows float64 from index {first} on (log2 value "
                      f"{log2_values[first]:.1f}); it is reported as inf. Use log2_{name} for the "
                      f"exact values.", OverflowToInfWarning, stacklevel=3)
    with np.errstate(over="ignore"):
        return np.exp2(log2_values)


@dataclass(frozen=True)
class Stats:
    """Per-position statistics of one family of tensors (skip path, branch or gradient).

    For a tensor x with channel axis c, statistics run over every other axis:
    ``squared_mean = mean_c (mean x_c)^2``, ``variance = mean_c var x_c`` (population) and
    ``second_moment = squared_mean + variance = mean(x^2)``. Stored as log2; NaN means the
    quantity is not available (theory does not predict channel means of gradients).
    """

    log2_second_moment: np.ndarray
    log2_squared_mean: np.ndarray
    log2_variance: np.ndarray

    @classmethod
    def from_linear(cls, second_moment, squared_mean, variance):
        with np.errstate(divide="ignore", invalid="ignore"):
            return cls(*(np.log2(np.asarray(a, dtype=np.float64))
                         for a in (second_moment, squared_mean, variance)))

    @property
    def second_moment(self):
        return _exp2("second_moment", self.log2_second_moment)

    @property
    def squared_mean(self):
        return _exp2("squared_mean", self.log2_squared_mean)

    @property
    def variance(self):
        return _exp2("variance", self.log2_variance)

    def __len__(self):
        return len(self.log2_second_moment)



QUANTITIES = ("second_moment", "squared_mean", "variance")


@dataclass(frozen=True)
class Tokens:
    """Token geometry of a sequence model (channel axis last, tokens on the axis before it).

    Attributes:
        skip: (depth + 1,), the token correlation at each skip operand (then the last
            merge's sum): the mean cosine between two different tokens of one sequence,
            averaged over sequences. 1 is rank collapse: every token the same direction.
        branch: (depth,), the same for each residual-branch operand.
        log2_skip_sequence_mean, log2_branch_sequence_mean: log2 of the second moment of
            each sequence's token mean, (1/T^2) sum_tu E[x_t . x_u] / n: a batch of B
            sequences measures the squared channel mean plus (this - squared mean) / B,
            which ``compare`` adds to a prediction (theory only; None on measurements).
        length: tokens per sequence T.
    NaN where a tensor is not a sequence.
    """

    skip: np.ndarray
    branch: np.ndarray
    log2_skip_sequence_mean: Optional[np.ndarray] = None
    log2_branch_sequence_mean: Optional[np.ndarray] = None
    length: Optional[int] = None

    def to_dict(self) -> dict:
        return {"skip": _jsonable(self.skip), "branch": _jsonable(self.branch),
                "log2_skip_sequence_mean": _jsonable_or_none(self.log2_skip_sequence_mean),
                "log2_branch_sequence_mean": _jsonable_or_none(self.log2_branch_sequence_mean),
                "length": self.length}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["Tokens"]:
        if d is None:
            return None
        return cls(_array_or_none(d["skip"]), _array_or_none(d["branch"]),
                   _array_or_none(d.get("log2_skip_sequence_mean")),
                   _array_or_none(d.get("log2_branch_sequence_mean")), d.get("length"))


@dataclass(frozen=True)
class Normalised:
    """Where a block's normalisations sit (theory): a finite network's random drift of scale
    stops at a normalisation, so ``compare`` narrows its finite-width band there.

    Attributes:
        branch: a normalisation in the block's ``pre`` or residual branch.
        pre: a normalisation in ``pre`` (shared by the branch and the projection shortcut).
        post: a normalisation after the merge (post-LN).
    """

    branch: bool = False
    pre: bool = False
    post: bool = False


@dataclass(frozen=True)
class Profile:
    """Signal propagation through one residual network, per block.

    Attributes:
        skip: Stats of shape (depth + 1,): the skip operand of every merge, then the sum at
            the last merge (x_0 .. x_D for networks whose skip path is the identity).
        branch: Stats of shape (depth,): the residual-branch operand of every merge.
        grad: Stats of shape (depth + 1,): gradient at the same tensors as ``skip``, under a
            random N(0, 1) linear read-out, as a squared norm relative to that at the last
            merge (per entry when shapes do not change), so ``grad.second_moment[-1] == 1``.
        depth: number of residual blocks.
        projection: bool array (depth,), True where the skip operand is a projection.
        source: "theory" or "measurement".
        scheme, params: what was predicted (theory) or what the caller said (measurement).
        samples: for measurements over several seeds, one Profile per seed; the main
            fields then hold the median over seeds.

    Both (None on profiles made before these fields existed):
        branch_norm: (depth,), the normalisations on each merge's residual branch (from the
            block input, including a norm shared with a projection shortcut), as "batch",
            "layer" (LayerNorm, RMSNorm, GroupNorm: over each example's channels), other
            kinds by name, joined with "+" when there are several, "" for none.
        post_norm: (depth,), the normalisations between the previous merge's sum and each
            merge's skip operand (post-LN puts "layer" here); "" for the first merge and
            for projection shortcuts. A measurement adds "weights" when a weight layer sits
            on that path too (a block without a merge, a stage transition) and "activation"
            for an elementwise nonlinearity (post-activation ResNets: relu(x + f(x))).
        ``diagnose`` fits only the registered schemes with the same structure.

    Theory only (None on measurements):
        grad_branch_share: (depth,), the share of the gradient at each block input that came
            through the residual branch (``compare`` sizes the gradient band with it).
        normalised: where the block normalises (:class:`Normalised`).
        input_second_moment, input_squared_mean: the state of x_0 the theory started from.
        spread: for ``predict(..., width=n, batch=b)``, the predicted distribution of one
            network's statistics (:class:`propagation.finite.Spread`: median and sigma per
            position, in log2); ``quantile(p)`` reads it. None at infinite width.

    Sequence models (None elsewhere):
        tokens: :class:`Tokens`, the token correlation per position (the theory of the
            transformer schemes, and ``measure`` on tensors with channels last and a token
            axis before them).

    Measurement only (None on theory):
        block_input: Stats (depth,) of each block's input: for an identity shortcut the skip
            operand itself; for a projection shortcut the input of the module that owns the
            merge (the innermost running module whose input both operands descend from),
            before any normalisation the projection and the branch share.
            ``input_state`` starts the theory from ``block_input[0]``.
        block_input_samples_per_channel: (depth,), values per channel behind ``block_input``.
        names: (depth,), the qualified name of the module that owns each merge ("" for the
            model itself).
        channels: the smallest channel count among the merges (the width of the finite-width
            band).
        samples_per_channel: (depth + 1,), values per channel that each skip statistic
            averaged over (batch x positions); the squared channel mean of n samples carries
            a finite-sample term variance / n.
        merge_log2_second_moment: (depth,), log2 second moment of each merge's sum.
        first_nonfinite_block: the first skip position whose statistics are not finite.
        mode: "init", "train", "eval" or "keep", as measured.
        readout: where the gradients were read out: "output" (``sum(g * output)``), "last
            merge" (the output gave none, e.g. a zero-initialised head) or "loss" (the
            caller's); None for forward-only measurements.

        meta: free-form facts about how the profile was made, for captions (input shape,
            dtype, seed, ...); nothing in the toolkit reads it.
    """

    skip: Stats
    branch: Stats
    grad: Stats
    depth: int
    projection: np.ndarray
    source: str = "theory"
    scheme: Optional[str] = None
    params: dict = field(default_factory=dict)
    samples: Tuple["Profile", ...] = ()
    branch_norm: Optional[Tuple[str, ...]] = None
    post_norm: Optional[Tuple[str, ...]] = None
    grad_branch_share: Optional[np.ndarray] = None
    normalised: Optional[Normalised] = None
    input_second_moment: Optional[float] = None
    input_squared_mean: Optional[float] = None
    block_input: Optional[Stats] = None
    block_input_samples_per_channel: Optional[np.ndarray] = None
    names: Optional[Tuple[str, ...]] = None
    channels: Optional[int] = None
    samples_per_channel: Optional[np.ndarray] = None
    merge_log2_second_moment: Optional[np.ndarray] = None
    first_nonfinite_block: Optional[int] = None
    mode: Optional[str] = None
    readout: Optional[str] = None
    spread: Optional[Any] = None
    tokens: Optional[Tokens] = None
    meta: dict = field(default_factory=dict)

    @property
    def log2_downscale(self) -> np.ndarray:
        """log2 of sqrt(skip.second_moment[:-1] / branch.second_moment), shape (depth,)."""
        with np.errstate(invalid="ignore"):
            return 0.5 * (self.skip.log2_second_moment[:-1] - self.branch.log2_second_moment)

    @property
    def downscale(self) -> np.ndarray:
        """The factor by which each residual branch is downscaled relative to its skip path."""
        return _exp2("downscale", self.log2_downscale)

    def quantile(self, q: float) -> "Profile":
        """Per-position quantile ``q`` in [0, 1]: over ``samples`` for a measurement over
        several seeds; for a theory predicted at a finite width (``predict(..., width=n)``),
        the predicted quantile of a single network's statistics (``spread``). The result is a
        Profile of the same shape, with neither samples nor spread."""
        q = float(q)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be a probability in [0, 1], got {q!r}")
        if self.samples:
            skip, branch, grad = quantile_over(self.samples, q)
        elif self.spread is not None:
            from scipy.stats import norm
            z = float(norm.ppf(q))
            skip, branch, grad = (_shifted(self.spread.part(p), z)
                                  for p in ("skip", "branch", "grad"))
        else:
            raise ValueError("quantile needs a profile measured over several seeds (pass "
                             "seeds=3 or more to measure) or a theory at a finite width "
                             "(predict(..., width=n))")
        return replace(self, skip=skip, branch=branch, grad=grad, samples=(), spread=None)

    def to_dict(self) -> dict:
        """A JSON-ready dict (linear and log2 values; ``samples`` included)."""
        array = _jsonable_or_none
        return {"source": self.source, "scheme": self.scheme, "params": self.params,
                "depth": self.depth, "projection": self.projection.astype(bool).tolist(),
                "skip": _stats_dict(self.skip), "branch": _stats_dict(self.branch),
                "grad": _stats_dict(self.grad),
                "log2_downscale": _jsonable(self.log2_downscale),
                "branch_norm": None if self.branch_norm is None else list(self.branch_norm),
                "post_norm": None if self.post_norm is None else list(self.post_norm),
                "grad_branch_share": array(self.grad_branch_share),
                "normalised": None if self.normalised is None else asdict(self.normalised),
                "input_second_moment": self.input_second_moment,
                "input_squared_mean": self.input_squared_mean,
                "block_input": None if self.block_input is None else _stats_dict(self.block_input),
                "block_input_samples_per_channel": array(self.block_input_samples_per_channel),
                "names": None if self.names is None else list(self.names),
                "channels": self.channels,
                "samples_per_channel": array(self.samples_per_channel),
                "merge_log2_second_moment": array(self.merge_log2_second_moment),
                "first_nonfinite_block": self.first_nonfinite_block, "mode": self.mode,
                "readout": self.readout,
                "spread": None if self.spread is None else self.spread.to_dict(),
                "tokens": None if self.tokens is None else self.tokens.to_dict(),
                "meta": {k: _jsonable(v) if isinstance(v, np.ndarray) else v
                         for k, v in self.meta.items()},
                "samples": [s.to_dict() for s in self.samples]}

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        array = _array_or_none
        return cls(skip=_stats_from(d["skip"]), branch=_stats_from(d["branch"]),
                   grad=_stats_from(d["grad"]), depth=d["depth"],
                   projection=np.array(d["projection"], dtype=bool),
                   source=d["source"], scheme=d["scheme"], params=d["params"],
                   samples=tuple(cls.from_dict(s) for s in d.get("samples", ())),
                   branch_norm=None if d.get("branch_norm") is None else tuple(d["branch_norm"]),
                   post_norm=None if d.get("post_norm") is None else tuple(d["post_norm"]),
                   grad_branch_share=array(d.get("grad_branch_share")),
                   normalised=None if d.get("normalised") is None else Normalised(**d["normalised"]),
                   input_second_moment=d.get("input_second_moment"),
                   input_squared_mean=d.get("input_squared_mean"),
                   block_input=None if d.get("block_input") is None else _stats_from(d["block_input"]),
                   block_input_samples_per_channel=array(d.get("block_input_samples_per_channel")),
                   names=None if d.get("names") is None else tuple(d["names"]),
                   channels=d.get("channels"),
                   samples_per_channel=array(d.get("samples_per_channel")),
                   merge_log2_second_moment=array(d.get("merge_log2_second_moment")),
                   first_nonfinite_block=d.get("first_nonfinite_block"), mode=d.get("mode"),
                   readout=d.get("readout"),
                   spread=_spread_from(d.get("spread")),
                   tokens=Tokens.from_dict(d.get("tokens")),
                   meta=d.get("meta", {}))

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def __repr__(self):
        head = f"{self.scheme}" if self.scheme else "model"
        return (f"Profile({self.source}: {head}, depth={self.depth}, "
                f"seeds={len(self.samples) or 1}, params={self.params})")


def _spread_from(d):
    if d is None:
        return None
    from .finite import Spread
    return Spread.from_dict(d)


def _stats_dict(s):
    return {f"log2_{k}": _jsonable(getattr(s, f"log2_{k}")) for k in QUANTITIES}


def _stats_from(d):
    return Stats(*(np.array([float(v) for v in d[f"log2_{k}"]], dtype=np.float64)
                   for k in QUANTITIES))


def _shifted(median_sigma, z):
    """median + z sigma per quantity (log2) of a (median, sigma) pair of Stats; z = 0 keeps
    infinite values as they are."""
    median, sigma = median_sigma
    with np.errstate(invalid="ignore"):
        return Stats(*(getattr(median, f"log2_{k}") + (z * getattr(sigma, f"log2_{k}") if z else 0.0)
                       for k in QUANTITIES))


def quantile_over(profiles, q):
    """Per-position quantile ``q`` of (skip, branch, grad) over profiles of one network,
    taken on the log2 values and ignoring NaN (a quantity a sample did not measure)."""
    return tuple(quantile_stats([getattr(p, part) for p in profiles], q)
                 for part in ("skip", "branch", "grad"))


def quantile_stats(stats, q):
    """Per-position quantile ``q`` of a list of Stats of one shape, on the log2 values,
    ignoring NaN. Infinite values (an exactly-zero quantity is log2 = -inf) take part as
    values: the median of zeros is zero, not the NaN of interpolating -inf with -inf."""
    out = []
    for k in QUANTITIES:
        stack = np.stack([getattr(s, f"log2_{k}") for s in stats])
        # +-1e300 stand in for +-inf; no log2 value comes near them, and any interpolation
        # that involves one lands beyond +-1e299, where it is mapped back to +-inf.
        finite = np.clip(stack, -1e300, 1e300)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN positions stay NaN
            v = np.nanquantile(finite, q, axis=0)
        out.append(np.where(v <= -1e299, -np.inf, np.where(v >= 1e299, np.inf, v)))
    return Stats(*out)


def _jsonable_or_none(a):
    return None if a is None else _jsonable(a)


def _array_or_none(a):
    """A JSON list (with "inf"/"nan" strings) as float64, or None."""
    return None if a is None else np.array([float(v) for v in a], dtype=np.float64)


def _jsonable(a):
    # JSON has no inf/nan: they travel as the strings "-inf" (an exact zero), "inf", "nan".
    return [float(v) if np.isfinite(v) else str(float(v)) for v in np.asarray(a, dtype=np.float64)]
