"""The one result type of the toolkit: what ``predict`` computes and ``measure`` observes.

Both return a :class:`Profile`, so a plot, a comparison or a test puts theory beside
measurement with one line. Quantities are stored as log2 values (``predict(5000, "none")``
has second moments near 2^5000, far beyond float64); the linear properties convert on
access and warn, never silently, when a value does not fit in float64.
"""
import json
import warnings
from dataclasses import dataclass, field, replace

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

    def _map(self, fn):
        return Stats(*(fn(a) for a in (self.log2_second_moment, self.log2_squared_mean,
                                       self.log2_variance)))


QUANTITIES = ("second_moment", "squared_mean", "variance")


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
        meta: free-form facts about how the profile was made (for captions).
    """

    skip: Stats
    branch: Stats
    grad: Stats
    depth: int
    projection: np.ndarray
    source: str = "theory"
    scheme: str = None
    params: dict = field(default_factory=dict)
    samples: tuple = ()
    meta: dict = field(default_factory=dict)

    @property
    def log2_downscale(self):
        """log2 of sqrt(skip.second_moment[:-1] / branch.second_moment), shape (depth,)."""
        with np.errstate(invalid="ignore"):
            return 0.5 * (self.skip.log2_second_moment[:-1] - self.branch.log2_second_moment)

    @property
    def downscale(self):
        """The factor by which each residual branch is downscaled relative to its skip path."""
        return _exp2("downscale", self.log2_downscale)

    def quantile(self, q):
        """Per-position quantile ``q`` in [0, 1] over ``samples`` (a Profile of the same shape)."""
        if not self.samples:
            raise ValueError("quantile needs a profile measured over several seeds "
                             "(samples is empty); pass seeds=3 or more to measure")
        skip, branch, grad = quantile_over(self.samples, q)
        return replace(self, skip=skip, branch=branch, grad=grad, samples=())

    def to_dict(self):
        """A JSON-ready dict (linear and log2 values; ``samples`` included)."""
        def stats(s):
            return {f"log2_{k}": _jsonable(getattr(s, f"log2_{k}")) for k in QUANTITIES}
        return {"source": self.source, "scheme": self.scheme, "params": self.params,
                "depth": self.depth, "projection": self.projection.astype(bool).tolist(),
                "skip": stats(self.skip), "branch": stats(self.branch), "grad": stats(self.grad),
                "log2_downscale": _jsonable(self.log2_downscale),
                "meta": {k: _jsonable(v) if isinstance(v, np.ndarray) else v
                         for k, v in self.meta.items()},
                "samples": [s.to_dict() for s in self.samples]}

    @classmethod
    def from_dict(cls, d):
        def stats(s):
            return Stats(*(np.array([float(v) for v in s[f"log2_{k}"]], dtype=np.float64)
                           for k in QUANTITIES))
        return cls(skip=stats(d["skip"]), branch=stats(d["branch"]), grad=stats(d["grad"]),
                   depth=d["depth"], projection=np.array(d["projection"], dtype=bool),
                   source=d["source"], scheme=d["scheme"], params=d["params"],
                   samples=tuple(cls.from_dict(s) for s in d.get("samples", ())),
                   meta=d.get("meta", {}))

    def to_json(self, **kw):
        return json.dumps(self.to_dict(), **kw)

    def __repr__(self):
        head = f"{self.scheme}" if self.scheme else "model"
        return (f"Profile({self.source}: {head}, depth={self.depth}, "
                f"seeds={len(self.samples) or 1}, params={self.params})")


def quantile_over(profiles, q):
    """Per-position quantile ``q`` of (skip, branch, grad) over profiles of one network,
    taken on the log2 values and ignoring NaN (a quantity a sample did not measure)."""
    def over(part):
        stats = []
        for k in QUANTITIES:
            stack = np.stack([getattr(getattr(p, part), f"log2_{k}") for p in profiles])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN positions stay NaN
                stats.append(np.nanquantile(stack, q, axis=0))
        return Stats(*stats)
    return over("skip"), over("branch"), over("grad")


def _jsonable(a):
    # JSON has no inf/nan: they travel as the strings "-inf" (an exact zero), "inf", "nan".
    return [float(v) if np.isfinite(v) else str(float(v)) for v in np.asarray(a, dtype=np.float64)]
