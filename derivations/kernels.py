"""Gaussian expectations of the ReLU, derived with sympy by integrating against the density.

Everything propagation/kernels.py hard-codes comes from here: the ReLU moments, the
arc-cosine kernel kappa (with kappa(0) and kappa(1)), the form ``1 - kappa(1 - e)`` that is
written without cancellation, the series coefficients ``_H_SERIES`` of its correction term,
and the Scaled-WS gain. Each result is derived, then checked against the form THEORY.md states
(a symbolic zero, not a numerical spot check) before it is returned.

Reference: Cho & Saul 2009 (arc-cosine kernels); Brock, De & Smith 2021 (Scaled WS).
"""
import functools

import sympy as sp

from ._record import Derivation

z = sp.Symbol("z", real=True)
rho = sp.Symbol("rho", real=True)          # correlation between two inputs, in [-1, 1]
s = sp.Symbol("s", positive=True)          # s = sqrt((1 - rho) / 2), in (0, 1]
q = sp.Symbol("q", positive=True)          # second moment of the pre-activation
gain2 = sp.Symbol("gain2", positive=True)  # squared gain of a weight layer

#: 1 - 1/pi = 2 Var[relu(z)]: the fraction of E[relu(z)^2] that is not channel mean.
C = 1 - 1 / sp.pi


def gaussian_density(x):
    """The N(0, 1) density at ``x``."""
    return sp.exp(-x ** 2 / 2) / sp.sqrt(2 * sp.pi)


def _require_zero(expr, what):
    if sp.simplify(expr) != 0:
        raise AssertionError(f"derivation check failed: {what} differs by {sp.simplify(expr)}")


@functools.lru_cache(maxsize=None)
def relu_moments():
    """(E[relu(z)], E[relu(z)^2]) for z ~ N(0, 1), integrated against the density on z > 0."""
    mean = sp.integrate(z * gaussian_density(z), (z, 0, sp.oo))
    second = sp.integrate(z ** 2 * gaussian_density(z), (z, 0, sp.oo))
    _require_zero(mean - 1 / sp.sqrt(2 * sp.pi), "E[relu(z)] = 1/sqrt(2 pi)")
    _require_zero(second - sp.Rational(1, 2), "E[relu(z)^2] = 1/2")
    return sp.nsimplify(mean), second


@functools.lru_cache(maxsize=None)
def relu_variance():
    """Var[relu(z)] = E[relu(z)^2] - E[relu(z)]^2 = (1 - 1/pi) / 2."""
    mean, second = relu_moments()
    var = sp.simplify(second - mean ** 2)
    _require_zero(var - C / 2, "Var[relu(z)] = (1 - 1/pi)/2")
    return var


@functools.lru_cache(maxsize=None)
def ws_relu_gain2():
    """Squared Scaled-WS gain after a ReLU: 1 / Var[relu(z)] = 2 / (1 - 1/pi).

    Scaled WS makes each output channel's weights zero-mean over the fan-in, which removes
    E[relu]^2 from the output second moment; the gain restores q' = q.
    """
    g2 = sp.simplify(1 / relu_variance())
    _require_zero(g2 - 2 / C, "gain^2 = 2/(1 - 1/pi)")
    return g2


@functools.lru_cache(maxsize=None)
def arccos_kernel():
    """kappa(rho) = E[relu(z1) relu(z2)] / E[relu(z)^2] for unit Gaussians with correlation rho.

    Derived as a 2-D Gaussian integral in polar coordinates: write (z1, z2) = (x, rho x +
    sqrt(1 - rho^2) y) with (x, y) = r (cos t, sin t) and rho = cos psi, psi in [0, pi].
    Then relu(z1) relu(z2) = r^2 cos t cos(t - psi) on the wedge t in (psi - pi/2, pi/2) where
    both are positive, and zero elsewhere; the radial and angular integrals separate.
    """
    r, t = sp.symbols("r t", positive=True)
    psi = sp.Symbol("psi", positive=True)
    radial = sp.integrate(r ** 3 * sp.exp(-r ** 2 / 2) / (2 * sp.pi), (r, 0, sp.oo))
    angular = sp.integrate(sp.cos(t) * sp.cos(t - psi), (t, psi - sp.pi / 2, sp.pi / 2))
    _, second = relu_moments()
    kappa = sp.simplify(radial * angular / second).subs(psi, sp.acos(rho))
    stated = (sp.sqrt(1 - rho ** 2) + (sp.pi - sp.acos(rho)) * rho) / sp.pi
    _require_zero(kappa - stated, "kappa(rho) equals the form in THEORY.md")
    return stated


def kappa(x):
    """The derived kappa evaluated at a sympy expression ``x``."""
    return arccos_kernel().subs(rho, x)


@functools.lru_cache(maxsize=None)
def kappa_endpoints():
    """(kappa(0), kappa(1)) from the moments, checked against the closed form.

    At rho = 0 the two ReLUs are independent: E[relu]^2 / E[relu^2] = (1/(2 pi)) / (1/2).
    At rho = 1 they are the same variable: E[relu^2] / E[relu^2] = 1.
    """
    mean, second = relu_moments()
    k0 = sp.simplify(mean ** 2 / second)
    k1 = sp.simplify(second / second)
    _require_zero(k0 - kappa(0), "kappa(0) from the moments and from the kernel")
    _require_zero(k1 - kappa(1), "kappa(1) from the moments and from the kernel")
    _require_zero(k0 - 1 / sp.pi, "kappa(0) = 1/pi")
    return k0, k1


def h(x):
    """h(s) = asin(s) (1 - 2 s^2) - s sqrt(1 - s^2), the correction term in 1 - kappa."""
    return sp.asin(x) * (1 - 2 * x ** 2) - x * sp.sqrt(1 - x ** 2)


@functools.lru_cache(maxsize=None)
def one_minus_kappa_identity():
    """1 - kappa(1 - e) = e + (2/pi) h(s) with s = sqrt(e/2), for e in [0, 2].

    With rho = 1 - 2 s^2, acos(rho) = 2 asin(s) on s in [0, 1] (both vanish at s = 0 and have
    the same derivative 2/sqrt(1 - s^2)), and sqrt(1 - rho^2) = 2 s sqrt(1 - s^2). Written so,
    1 - kappa carries no 1 - (1 - e) cancellation near rho = 1.
    """
    half_angle = sp.diff(sp.acos(1 - 2 * s ** 2), s) - sp.diff(2 * sp.asin(s), s)
    _require_zero(half_angle, "d/ds acos(1 - 2 s^2) = d/ds 2 asin(s)")
    lhs = (1 - kappa(1 - 2 * s ** 2)).subs(sp.acos(1 - 2 * s ** 2), 2 * sp.asin(s))
    rhs = 2 * s ** 2 + 2 / sp.pi * h(s)
    _require_zero(lhs - rhs, "1 - kappa(1 - 2 s^2) = 2 s^2 + (2/pi) h(s)")
    return sp.Eq(1 - kappa(1 - 2 * s ** 2), rhs)


@functools.lru_cache(maxsize=None)
def h_series(order=16):
    """Coefficients c_k of s^(2k+3) in the Taylor series of h(s) about 0, up to s^(order-1).

    h is odd and starts at s^3, so the even powers and s^1 vanish (checked). ``order=14``
    gives the six coefficients of ``propagation.kernels._H_SERIES`` (s^3 .. s^13); the default
    16 adds c_6 (s^15), which bounds the truncation error of the six-term series.
    """
    poly = sp.Poly(sp.series(h(s), s, 0, order).removeO(), s)
    coeffs = [poly.coeff_monomial(s ** n) for n in range(order)]
    if any(coeffs[n] != 0 for n in range(order) if n < 3 or n % 2 == 0):
        raise AssertionError(f"h(s) has unexpected even or low-order terms: {coeffs}")
    return tuple(coeffs[n] for n in range(3, order, 2))


@functools.lru_cache(maxsize=None)
def scaled_ws_map():
    """(q', m') of ReLU followed by a Scaled-WS layer of squared gain ``gain2``, input (q, rho q).

    Zero-mean weights over the fan-in (n inputs, entries of variance gain2/n) have covariance
    (gain2/n) (delta_jk - 1/n), so E[y_a y_b] = gain2 (E[u_a u_b] - E[u_a] E[u_b]) with
    u = relu(x): the part of the ReLU output common to all inputs is removed.
    E[u_a u_b] = (q/2) kappa(rho) and E[u] = sqrt(q) E[relu(z)].
    """
    mean, second = relu_moments()
    q_out = sp.simplify(gain2 * (second * q - mean ** 2 * q))
    m_out = sp.simplify(gain2 * (second * q * kappa(rho) - mean ** 2 * q))
    return q_out, m_out


@functools.lru_cache(maxsize=None)
def scaled_ws_correlation():
    """rho' = (kappa(rho) - 1/pi) / (1 - 1/pi) after ReLU + Scaled WS (any gain); rho'(0) = 0."""
    q_out, m_out = scaled_ws_map()
    rho_out = sp.simplify(m_out / q_out)
    _require_zero(rho_out - (kappa(rho) - 1 / sp.pi) / C, "rho' = (kappa - 1/pi)/(1 - 1/pi)")
    _require_zero(rho_out.subs(rho, 0), "rho' = 0 at rho = 0")
    _require_zero(q_out.subs(gain2, ws_relu_gain2()) - q, "q' = q at the standard gain")
    return (kappa(rho) - 1 / sp.pi) / C


def derivations():
    """Every kernel derivation, as :class:`Derivation` records, in the order they build."""
    mean, second = relu_moments()
    k0, k1 = kappa_endpoints()
    s_ = sp.Symbol("s")
    series = sum(c * s_ ** (2 * k + 3) for k, c in enumerate(h_series())) + sp.O(s_ ** 17)
    return [
        Derivation("E[relu(z)]", mean,
                   "mean of a rectified unit Gaussian: integral of z phi(z) on z > 0"),
        Derivation("E[relu(z)^2]", second,
                   "second moment of a rectified unit Gaussian: half of E[z^2]"),
        Derivation("Var[relu(z)]", relu_variance(),
                   "channel variance a ReLU leaves of a unit input: c/2, c = 1 - 1/pi"),
        Derivation("kappa(rho)", arccos_kernel(),
                   "correlation after ReLU + He layer: 2-D Gaussian integral in polar coordinates"),
        Derivation("kappa(0)", k0,
                   "independent inputs keep the squared ReLU mean: E[relu]^2 / E[relu^2]"),
        Derivation("kappa(1)", k1, "identical inputs stay identical"),
        Derivation("1 - kappa(1 - 2 s^2)", one_minus_kappa_identity().rhs,
                   "1 - kappa without cancellation near rho = 1 (s = sqrt(e/2), e = 1 - rho)"),
        Derivation("h(s) series", series,
                   "used below s = 0.05; the first six coefficients are kernels._H_SERIES"),
        Derivation("gain^2 (Scaled WS after ReLU)", ws_relu_gain2(),
                   "1 / Var[relu(z)]: keeps q' = q once weight standardisation removes the mean"),
        Derivation("rho' (ReLU + Scaled WS)", scaled_ws_correlation(),
                   "correlation after ReLU + zero-mean weights: 0 maps to 0, 1 maps to 1 "
                   "(not 'about 0' for every input, as THEORY.md's table says)"),
    ]
