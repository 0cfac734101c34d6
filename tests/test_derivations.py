"""Oracle tests: the sympy derivations of derivations/ against propagation.

The closed forms are solved from an independent sympy transcription of the layer maps
(derivations/blocks.py) and evaluated in mpmath at 40 digits (``exact=True``), so any
difference from ``predict`` beyond float64 rounding is a disagreement between the recursion
and the theory, not noise in the oracle. The kernel constants that propagation/kernels.py
hard-codes are checked against their derivations.
"""
import math

import mpmath
import numpy as np
import pytest
import sympy as sp
from scipy import integrate

import propagation
from propagation import kernels, predict
from propagation.layers import NUMPY, ReLUScaledWS
from propagation.predict import make_plan
from propagation.schemes import nf_expected_variance, registered

from derivations import blocks, closed_forms as cf, kernels as dk  # noqa: E402

EPS = 2.0 ** -53  # unit roundoff of float64
C = 1.0 - 1.0 / math.pi

# The agreement asked of closed form and recursion; where predict's own float64 rounding can
# exceed it (forward_bound, gradient_bound), the derived bound is the tolerance instead.
TARGET = 1e-12
LN2 = math.log(2.0)


def _half_ulp(x):
    """ulp(|x|)/2, the largest rounding error of a float64 result of magnitude |x| (0 at -inf)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.isfinite(x), np.spacing(np.abs(np.where(np.isfinite(x), x, 0.0))) / 2, 0.0)


def forward_bound(p):
    """Worst-case relative error of predict's skip second moments x_0 .. x_D (shape D + 1).

    predict carries x = log2 q. In block k every addition to x rounds at the magnitude of its
    result: at most two on the way to the branch's log2 q^b (a pre-branch gain and a branch
    gain: ulp(|log2 q^b|)/2 each, since the intermediate values are no larger), the exponent
    log2 q^b - log2 q of the merge weight w (ulp(|log2 q^b - log2 q|)/2, entering log2(1 + w)
    with a factor w/(1 + w) <= 1) and the merge itself (ulp(|log2 q|)/2); plus at most 4 roundings
    of order-one numbers (2^d, 1 + w, log2(1 + w), a gain whose square rounds: sqrt_half's
    (2^-0.5)^2 = 0.5 (1 + 2^-52) adds 2^-52 / ln 2 = 2.9 eps to log2 q in every block). Within a
    binade the bits a constant increment loses are the same every block, so the errors add
    linearly, not like a random walk; the relative error of 2^x is ln 2 times the error of x, and
    the final exp2 adds 4 roundings. The BatchNorm-type schemes take predict's vectorised path
    (linear cumsums, relative error <= k eps at block k), which this bound also covers.

    Sizes at D = 1000: 1.4e-12 to 2.2e-12 for the polynomial schemes (|log2 q| <= 11), 4e-13 for
    sqrt_half (measured 3.1e-13: the drift above); for exponential growth it is set by |log2 q|:
    7e-11 for skipinit alpha = 0.9 (|log2 q| up to 856), 8e-11 for none (whose increment, log2 2
    = 1, is in fact exact inside a binade).
    """
    lq = p.skip.log2_second_moment[:-1]
    lb = p.branch.log2_second_moment
    exponent = np.where(np.isfinite(lb), lb - lq, 0.0)
    per_block = _half_ulp(lq) + 2 * _half_ulp(lb) + _half_ulp(exponent) + 4 * EPS
    return LN2 * np.concatenate(([0.0], np.cumsum(per_block))) + 4 * EPS


def gradient_bound(p, chi, forward, reads_state):
    """Worst-case relative error of predict's gradients at x_0 .. x_(D-1) (shape D).

    predict sums log2 gains a_k = log2(1 + chi_k) (plus post-merge gains) from block D-1 down
    to block l: each cumsum step rounds at ulp(|log2 G_k|)/2; each a_k carries at most 8
    roundings of order-one numbers (logaddexp2, log2 of the normalised variances, the post
    gain). Where the gains read the forward state (``reads_state``: BatchNorm's v_k, LayerNorm's
    q_k, post-norm's merge), its log2 error forward_k / ln 2 enters a_k scaled by
    d a_k / d log2 chi_k = chi_k / (1 + chi_k) <= min(1, chi_k) (post gains: <= 1, chi = 1 there).
    """
    lg = p.grad.log2_second_moment[:-1]
    leak = np.minimum(1.0, chi) * forward[:-1] / LN2 if reads_state else 0.0
    per_block = _half_ulp(lg) + 8 * EPS + leak
    return LN2 * np.cumsum(per_block[::-1])[::-1] + 4 * EPS


def assert_close(actual, expected, rtol, what, scale=None):
    """|actual - expected| <= rtol * scale entrywise (scale = |expected| unless given);
    equal entries (inf at a zero branch, exact zeros) always pass."""
    actual, expected = np.broadcast_arrays(np.asarray(actual, float), np.asarray(expected, float))
    scale = np.abs(expected) if scale is None else np.broadcast_to(scale, expected.shape)
    with np.errstate(invalid="ignore"):
        err = np.where(actual == expected, 0.0, np.abs(actual - expected))
    bad = ~(err <= np.broadcast_to(rtol, err.shape) * scale)
    if bad.any():
        i = int(np.argmax(bad))
        rel = err[i] / scale[i] if scale[i] else np.inf
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} entries differ; first at index {i}: "
                             f"predict {actual[i]!r}, closed form {expected[i]!r}, relative error "
                             f"{rel:.3g} > tolerance {np.broadcast_to(rtol, err.shape)[i]:.3g}")


# --- the kernels of the ReLU ----------------------------------------------------------------

def test_relu_moments_are_derived_and_hard_coded():
    mean, second = dk.relu_moments()
    assert mean == 1 / sp.sqrt(2 * sp.pi) and second == sp.Rational(1, 2)
    m, s = kernels.relu_moments()
    # A float expression of 1/sqrt(2 pi) rounds at most twice: 2 ulps.
    assert m == pytest.approx(float(mean), rel=4 * EPS, abs=0) and s == 0.5


def test_kappa_endpoints_follow_from_the_moments():
    k0, k1 = dk.kappa_endpoints()
    assert k0 == 1 / sp.pi and k1 == 1
    # kappa evaluates sqrt, arccos and two products: a few ulps.
    assert kernels.kappa(0.0) == pytest.approx(1 / math.pi, rel=4 * EPS, abs=0)
    assert kernels.kappa(1.0) == 1.0


@pytest.mark.parametrize("rho", [-0.99, -0.9, -0.3, 0.0, 0.5, 0.9, 0.99])
def test_kappa_matches_a_two_dimensional_gaussian_quadrature(rho):
    """E[relu(z1) relu(z2)] / E[relu^2] by plain 2-D quadrature, z2 = rho z1 + sqrt(1-rho^2) w."""
    s = math.sqrt(1 - rho * rho)
    R = 12.0  # the Gaussian mass beyond 12 sigma is below 1e-32: no visible truncation

    def integrand(w, x):
        return x * (rho * x + s * w) * math.exp(-(x * x + w * w) / 2) / (2 * math.pi)

    val, _ = integrate.dblquad(integrand, 0, R, lambda x: min(max(-rho * x / s, -R), R), R,
                               epsabs=1e-14, epsrel=1e-13)
    derived = float(dk.kappa(sp.Float(rho, 30)))
    # dblquad is asked for 1e-14 absolute / 1e-13 relative per level; kappa <= 1, and the
    # factor 2 = 1/E[relu^2] doubles it: 1e-12 leaves a margin of 5 over the requested accuracy.
    assert 2 * val == pytest.approx(derived, abs=1e-12)
    # The NumPy kappa against the derived form in 30-digit arithmetic: a few ulps of kappa <= 1.
    assert kernels.kappa(rho) == pytest.approx(derived, abs=8 * EPS)


def test_h_series_constants_equal_the_sympy_coefficients():
    derived = dk.h_series(14)  # s^3 .. s^13
    assert len(derived) == len(kernels._H_SERIES) == 6
    for c_float, c_exact in zip(kernels._H_SERIES, derived):
        # Each constant is a ratio of two small integers, rounded once: <= 1 ulp (2.2e-16).
        assert c_float == pytest.approx(float(c_exact), rel=1e-15, abs=0)


def test_h_series_truncation_claim_in_kernels():
    """kernels.py: below s = 0.05 the dropped terms are < 1e-18 of the leading one."""
    c = dk.h_series(16)
    s = sp.Rational(kernels._S_SERIES).limit_denominator(1000)
    assert c[6] == sp.Rational(-77, 16640)
    assert abs(c[6]) * s ** 12 / abs(c[0]) < sp.Rational(1, 10 ** 18)


def test_scaled_ws_gain():
    assert sp.simplify(dk.ws_relu_gain2() - 2 / (1 - 1 / sp.pi)) == 0
    # 2 / (1 - 1/PI) in float64 rounds three times: 4 ulps.
    assert kernels.WS_RELU_GAIN2 == pytest.approx(float(dk.ws_relu_gain2()), rel=8 * EPS, abs=0)


def test_scaled_ws_layer_matches_the_derived_correlation_map():
    """propagation's ReLUScaledWS sends e = 1 - rho to 1 - rho', rho' derived in kernels."""
    rho = np.linspace(0.0, 0.999, 41)
    lq, e = ReLUScaledWS().forward(np.zeros_like(rho), 1.0 - rho, 0, NUMPY)
    f = sp.lambdify(dk.rho, dk.scaled_ws_correlation(), "mpmath")
    with mpmath.workdps(30):
        expected = np.array([float(1 - f(mpmath.mpf(r))) for r in rho])
    # log2 q' = log2(gain2 c / 2) = log2(1) up to the rounding of gain2 and c: a few ulps of 1.
    np.testing.assert_allclose(lq, 0.0, atol=8 * EPS)
    # e' = (1 - kappa)/c: one_minus_kappa is good to ~2e-15 relative (next test), c to 1 ulp.
    np.testing.assert_allclose(e, expected, rtol=1e-14, atol=0)


def _exact_one_minus_kappa(e):
    with mpmath.workdps(80):  # e down to 1e-30 needs 30 digits below the 16 we compare
        r = 1 - mpmath.mpf(e)
        return float(1 - (mpmath.sqrt(1 - r * r) + (mpmath.pi - mpmath.acos(r)) * r) / mpmath.pi)


# e over [1e-30, 2): log-spaced, plus a fine grid across the series cutoff s = 0.05 (e = 0.005).
E_GRID = np.unique(np.concatenate((np.logspace(-30, math.log10(1.999999), 1500),
                                   2 * np.linspace(0.045, 0.055, 201) ** 2)))


def test_one_minus_kappa_matches_high_precision():
    expected = np.array([_exact_one_minus_kappa(x) for x in E_GRID])
    # Above the cutoff s = 0.05 h = asin(s)(1 - 2s^2) - s sqrt(1 - s^2) cancels ~0.75/s^2-fold
    # and h is ~0.42 s of the result, so the result loses ~0.32 eps/s <= 1.4e-15 at s = 0.05;
    # the series below it has truncation < 1e-18 (previous test). With a few more roundings the
    # error stays below ~2e-15; 1e-14 is a margin of 5.
    np.testing.assert_allclose(kernels.one_minus_kappa(E_GRID), expected, rtol=1e-14, atol=0)
    scalar = np.array([kernels.one_minus_kappa_scalar(float(x)) for x in E_GRID])
    np.testing.assert_allclose(scalar, expected, rtol=1e-14, atol=0)
    assert kernels.one_minus_kappa(np.array([0.0, 2.0])).tolist() == [0.0, 1.0]


def test_one_minus_kappa_scalar_at_rho_minus_one():
    assert kernels.one_minus_kappa_scalar(2.0) == 1.0


def test_one_minus_kappa_accepts_scalars_below_the_cutoff():
    assert kernels.one_minus_kappa(1e-3) == pytest.approx(_exact_one_minus_kappa(1e-3), rel=1e-14)


def test_nf_expected_variance_matches_the_derivation():
    beta2 = sp.lambdify((blocks.l, blocks.alpha), blocks.nf_expected_variance(), "numpy")
    for a in (0.05, 0.2, 1.0):
        got = nf_expected_variance(make_plan(50), a)
        # 1 + alpha^2 l: two roundings.
        np.testing.assert_allclose(got, beta2(np.arange(50.0), a), rtol=4 * EPS, atol=0)


# --- closed forms against predict ---------------------------------------------------------------

# (scheme, params, input_second_moment q0, input_squared_mean m0): every registered scheme at
# each of its registered gate settings from the default input (the registry is the one list
# of schemes), then more alphas and non-default inputs wherever the closed form allows them.
EXTRA_CASES = [
    ("batchnorm", {}, 1.7, 0.5), ("none", {}, 1.7, 0.3), ("sqrt_half", {}, 1.7, 0.3),
    ("skipinit", {"alpha": 0.3}, 1.7, 0.2), ("skipinit", {"alpha": 1.0}, 1.7, 0.0),
    ("fixup", {}, 1.7, 0.5),
    ("nf", {"alpha": 0.05}, 1.0, 0.0), ("nf", {"alpha": 0.2}, 1.7, 0.0),
    ("nf", {"alpha": 0.2}, 1.7, 0.4), ("nf", {"alpha": 1.0}, 1.0, 0.0),
    ("nf_he", {"alpha": 0.2}, 1.7, 0.3), ("nf_he", {"alpha": 1.0}, 1.0, 0.0),
    ("layernorm", {}, 1.7, 0.5), ("postnorm", {}, 1.7, 0.5),
    ("relu_bn_conv", {"gain2": 1.0}, 1.7, 0.5), ("relu_bn_conv", {"gain2": 2.0}, 1.7, 0.0),
]
CASES = [(s.name, s.clean_params(p), 1.0, 0.0) for s in registered() for p in s.gate] + EXTRA_CASES


def case_id(case):
    scheme, params, q0, m0 = case
    return "-".join([scheme] + [f"{k}{v}" for k, v in params.items()] + [f"q{q0}", f"m{m0}"])


def closed(scheme, quantity, l, q0, m0, params, depth=None, layers=2):
    """The closed form in 40-digit arithmetic, or None where there is none for these inputs."""
    try:
        return cf.evaluate(scheme, quantity, l, depth, q0=q0, m0=m0, layers=layers, exact=True,
                           **params)
    except cf.NoClosedForm:
        return None


def test_every_registered_scheme_is_derived_and_in_the_oracle_table():
    missing = set(propagation.schemes()) - set(blocks.SCHEMES)
    assert not missing, f"add the block of {sorted(missing)} to derivations/blocks.py"
    assert {c[0] for c in CASES} == set(blocks.SCHEMES)


def run_predict(case, depth, layers):
    scheme, params, q0, m0 = case
    return predict(depth, scheme, layers=layers, input_second_moment=q0, input_squared_mean=m0, **params)


def check_forward(case, depth, layers=2):
    scheme, params, q0, m0 = case
    p = run_predict(case, depth, layers)
    l = np.arange(depth)

    def ev(quantity, ll):
        return closed(scheme, quantity, ll, q0, m0, params, layers=layers)

    tol = np.maximum(TARGET, forward_bound(p))
    q = p.skip.second_moment
    # x_0 .. x_(D-1), then predict's last entry: the sum at the last merge (x_D unless a
    # post-merge layer follows, as in sqrt_half and postnorm).
    expected_q = np.append(ev("skip.second_moment", l), ev("merge.second_moment", depth - 1))
    assert_close(q, expected_q, tol, f"{scheme} skip.second_moment")
    # The branch reads x_l: its error is x_l's (the branch's own roundings are in forward_bound).
    assert_close(p.branch.second_moment, ev("branch.second_moment", l), tol[:-1],
                 f"{scheme} branch.second_moment")
    # downscale = 2^((log2 q - log2 q^b)/2): half the sum of two errors each within tol.
    assert_close(p.downscale, ev("downscale", l), tol[:-1], f"{scheme} downscale")
    for quantity in ("squared_mean", "variance"):
        expected = ev(f"skip.{quantity}", l)
        if expected is not None:
            # predict keeps m = q (1 - e) with e = v/q in [0, 1], so its error is relative to q,
            # not to m (which can be 0 or tiny against q); e gathers one order-one rounding per
            # operation of the merge, within the 4 eps per block of forward_bound.
            assert_close(getattr(p.skip, quantity)[:-1], expected, tol[:-1], f"{scheme} skip.{quantity}",
                         scale=q[:-1])
    expected = ev("branch.squared_mean", l)
    if expected is not None:
        assert_close(p.branch.squared_mean, expected, tol[:-1], f"{scheme} branch.squared_mean",
                     scale=p.branch.second_moment)
    return p


def check_gradient(case, depth, layers=2):
    scheme, params, q0, m0 = case
    expected = closed(scheme, "grad.second_moment", np.arange(depth), q0, m0, params, depth, layers)
    assert expected is not None, f"{scheme}: no closed-form gradient for m0 = {m0}"
    chi = closed(scheme, "backward_gain", np.arange(depth), q0, m0, params, layers=layers)
    p = run_predict(case, depth, layers)
    assert p.grad.log2_second_moment[-1] == 0.0  # normalised at the last merge output, exactly
    reads_state = cf.backward_reads_state(scheme, layers)
    tol = np.maximum(TARGET, gradient_bound(p, chi, forward_bound(p), reads_state))
    assert_close(p.grad.second_moment[:-1], expected, tol, f"{scheme} grad.second_moment (D={depth})")


# Depth 1000 is the claim; depth 20 keeps every case in `make test-fast`.
@pytest.mark.parametrize("depth", [20, pytest.param(1000, marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_skip_and_branch_match_the_closed_forms_at_every_block(case, depth):
    check_forward(case, depth)


# relu_bn_conv's gradient has a closed form only for m0 = 0 (its BN divides by the variance of
# relu(x_l), (q_l/2)(1 - kappa(m0/q_l))); test_assumptions_of_the_closed_forms_are_enforced.
GRADIENT_CASES = [c for c in CASES if not (c[0] == "relu_bn_conv" and c[3] != 0.0)]


@pytest.mark.parametrize("depth", [1, 2, 17, 20, pytest.param(1000, marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", GRADIENT_CASES, ids=case_id)
def test_gradient_matches_the_closed_form(case, depth):
    check_gradient(case, depth)


# Three weight layers per branch (bottleneck): one case per kind of closed form.
BOTTLENECK_CASES = [("batchnorm", {}, 1.7, 0.5), ("nf", {"alpha": 0.2}, 1.7, 0.0),
                    ("relu_bn_conv", {"gain2": 2.0}, 1.7, 0.0), ("layernorm", {}, 1.7, 0.5),
                    ("skipinit", {"alpha": 0.3}, 1.7, 0.2)]


@pytest.mark.slow
@pytest.mark.parametrize("case", BOTTLENECK_CASES, ids=case_id)
def test_bottleneck_branches_match_the_closed_forms(case):
    """Three weight layers per branch (layers=3), derived separately."""
    check_forward(case, 300, layers=3)
    check_gradient(case, 300, layers=3)


@pytest.mark.slow
def test_exponential_growth_rounding():
    """skipinit with alpha in (0.3, 1) at D = 1000: predict's log2 recursion adds log2(1 +
    alpha^2) a thousand times at |log2 q| up to ~860, where one rounding is ~1e-13, and the
    roundings share their sign within a binade. It then misses the closed form by more than
    1e-12 (measured 1.2e-12 to 4.7e-12 for alpha = 0.5, 0.7, 0.9) but stays within the
    worst-case bound of forward_bound; the closed form itself is exact (mpmath)."""
    for alpha in (0.5, 0.7, 0.9):
        check_forward(("skipinit", {"alpha": alpha}, 1.0, 0.0), 1000)
        check_gradient(("skipinit", {"alpha": alpha}, 1.0, 0.0), 1000)


@pytest.mark.parametrize("scheme, params", [("batchnorm", {}), ("nf", {"alpha": 0.2}),
                                            ("relu_bn_conv", {"gain2": 2.0})])
def test_gradient_power_law(scheme, params):
    """G_l ~ (D/l)^b with b = 1/(1 - 1/pi)^2 = 2.1519 (THEORY.md: 2.15)."""
    b = cf.power_law(scheme)
    assert float(b.subs(cf.c, dk.C)) == pytest.approx(1 / C ** 2, rel=1e-15)
    assert round(1 / C ** 2, 2) == 2.15
    D, l = 10 ** 7, 10 ** 6
    G = closed(scheme, "grad.second_moment", l, 1.0, 0.0, params, depth=D)
    # Stirling: the ratio is ((D + a)/(l + a))^b (1 + O(b (2a + b - 1)/(2 l))), a <= 25 here
    # (1/alpha^2 for nf), so the correction is below 2.2 * 52 / 2e6 ~ 6e-5 at l = 1e6.
    assert G / (D / l) ** (1 / C ** 2) == pytest.approx(1.0, abs=1e-4)


def test_assumptions_of_the_closed_forms_are_enforced():
    with pytest.raises(cf.NoClosedForm, match="m0 = 0"):
        cf.skip_squared_mean("nf", 3, q0=1.0, m0=0.5, alpha=0.2)
    with pytest.raises(cf.NoClosedForm, match="kappa"):
        cf.skip_squared_mean("none", 3)
    with pytest.raises(cf.NoClosedForm, match="m0 = 0"):
        cf.grad_second_moment("relu_bn_conv", 0, 10, m0=0.5, gain2=2.0)
    with pytest.raises(TypeError, match="alpha"):
        cf.skip_second_moment("nf", 3)
    with pytest.raises(TypeError, match="depth"):
        cf.evaluate("batchnorm", "grad.second_moment", 3)


def test_numpy_and_exact_evaluations_agree():
    """The fast NumPy lambdify against the 40-digit one, on forms without gamma functions."""
    l = np.arange(1001)
    for scheme, params in (("batchnorm", {}), ("skipinit", {"alpha": 0.3}), ("nf", {"alpha": 0.2}),
                           ("postnorm", {})):
        for quantity in ("skip.second_moment", "downscale"):
            fast = cf.evaluate(scheme, quantity, l, q0=1.7, **params)
            exact = cf.evaluate(scheme, quantity, l, q0=1.7, exact=True, **params)
            # (1 + alpha^2)^l: the rounded base 1.09 carries 1.1e-16, times l = 1000 in the
            # power, plus a few roundings: 1e-13; the polynomial forms are good to a few ulps.
            np.testing.assert_allclose(fast, exact, rtol=1e-13, atol=0)
