"""Two-point Gaussian kernels of the ReLU, written for precision near rho = 1.

The mean-field state of an activation is (q, rho): its second moment and the correlation
between two different inputs (in the infinite-width, infinite-batch limit the average
channel squared mean is m = rho * q). Deep unnormalised networks drive rho to 1, where
``1 - rho`` carries all the information about the channel variance; so everything here is
written in ``e = 1 - rho`` and never forms ``1 - (1 - e)``.

Each function has a NumPy form (arrays, used for whole profiles at once) and a scalar form
(``math``, used inside the sequential recursion where NumPy's per-call overhead dominates).
"""
import math

import numpy as np

PI = math.pi

#: Coefficients of h(s) = asin(s) (1 - 2 s^2) - s sqrt(1 - s^2) = sum_k c_k s^(2k+3), k = 0..5.
#: Produced by ``derivations/kernels.py`` (``sympy.series(h, s, 0, 16)``) and checked by
#: tests/test_derivations.py, so they cannot drift from the derivation.
_H_SERIES = (-4 / 3, -2 / 15, -3 / 70, -5 / 252, -35 / 3168, -63 / 9152)
#: Below this s the series is used. Truncation error there, relative to the leading term:
#: (77/16640) s^12 / (4/3) < 1e-18; above it the closed form loses at most ~1e-16 / s^2
#: relative in h, i.e. < 1e-13, and h is itself a fraction ~s of the result.
_S_SERIES = 0.05


def kappa(rho):
    """Normalised arc-cosine kernel: the correlation after ReLU + He layer.

    kappa(rho) = (sqrt(1 - rho^2) + (pi - arccos rho) rho) / pi, so that a ReLU followed by
    a weight layer with variance 2 / fan_in maps (q, rho q) to (q, kappa(rho) q).
    kappa(0) = 1/pi, kappa(1) = 1. Vectorised over NumPy arrays.
    """
    rho = np.clip(np.asarray(rho, dtype=np.float64), -1.0, 1.0)
    return (np.sqrt(1.0 - rho * rho) + (PI - np.arccos(rho)) * rho) / PI


_C0, _C1, _C2, _C3, _C4, _C5 = _H_SERIES


def _h_series(s):
    # Horner, unrolled: this runs once per block per ReLU in the sequential recursion.
    s2 = s * s
    return (((((_C5 * s2 + _C4) * s2 + _C3) * s2 + _C2) * s2 + _C1) * s2 + _C0) * s2 * s


def one_minus_kappa(e):
    """1 - kappa(1 - e) for e = 1 - rho in [0, 2], accurate to ~1e-15 relative near e = 0."""
    e = np.clip(np.asarray(e, dtype=np.float64), 0.0, 2.0)
    s = np.sqrt(0.5 * e)
    small = s < _S_SERIES
    if e.ndim == 0:
        h = _h_series(s) if small else _h_closed(s)
    elif small.all():  # deep unnormalised networks: rho -> 1 in almost every block
        h = _h_series(s)
    elif not small.any():
        h = _h_closed(s)
    else:  # each form only where it is used; per entry the same operations as above
        h = np.empty_like(s)
        h[small] = _h_series(s[small])
        big = ~small
        h[big] = _h_closed(s[big])
    h *= 2.0 / PI
    h += e
    return h


def _h_closed(s):
    s2 = s * s
    return np.arcsin(s) * (1.0 - 2.0 * s2) - s * np.sqrt(1.0 - s2)


def one_minus_kappa_scalar(e):
    """Scalar (``math``) form of :func:`one_minus_kappa` for the sequential recursion."""
    # Written for speed: it runs twice per block in predict's sequential loop.
    if e <= 0.0:
        return 0.0
    if e > 2.0:
        e = 2.0
    s = _sqrt(0.5 * e)
    s2 = s * s  # not 0.5 * e: h's cancellation wants asin(s) and s^2 of the same s
    if s < _S_SERIES:  # _h_series, inlined
        return e + _2_PI * ((((((_C5 * s2 + _C4) * s2 + _C3) * s2 + _C2) * s2 + _C1) * s2
                             + _C0) * s2 * s)
    return e + _2_PI * (_asin(s) * (1.0 - 2.0 * s2) - s * _sqrt(1.0 - s2))


_sqrt, _asin = math.sqrt, math.asin
_2_PI = 2.0 / PI


def one_minus_kappa_scalar_code(x, out):
    """:func:`one_minus_kappa_scalar` as Python statements, for predict's compiled loop to
    inline (a call per ReLU per block is a fifth of that loop's time). The same operations
    in the same order, constants as exact float literals: equal to the last bit, which
    tests/test_predict.py checks. ``sqrt`` and ``asin`` must be math's."""
    c = [repr(v) for v in _H_SERIES]
    return [f"_x = {x}",
            "if _x <= 0.0:",
            f"    {out} = 0.0",
            "else:",
            "    if _x > 2.0:",
            "        _x = 2.0",
            "    _s = sqrt(0.5 * _x)",
            "    _s2 = _s * _s",
            f"    if _s < {_S_SERIES!r}:",
            f"        {out} = _x + {_2_PI!r} * (((((({c[5]} * _s2 + {c[4]}) * _s2 + {c[3]}) * _s2"
            f" + {c[2]}) * _s2 + {c[1]}) * _s2 + {c[0]}) * _s2 * _s)",
            "    else:",
            f"        {out} = _x + {_2_PI!r} * (asin(_s) * (1.0 - 2.0 * _s2) - _s * sqrt(1.0 - _s2))"]



def relu_moments():
    """(E[relu(z)], E[relu(z)^2]) for z ~ N(0, 1): (1/sqrt(2 pi), 1/2)."""
    return 1.0 / math.sqrt(2.0 * PI), 0.5


#: Squared gain of a Scaled-Weight-Standardised layer after a ReLU: 1 / Var[relu(z)],
#: z ~ N(0, 1), which is 2 / (1 - 1/pi) (Brock, De & Smith 2021).
WS_RELU_GAIN2 = 2.0 / (1.0 - 1.0 / PI)
