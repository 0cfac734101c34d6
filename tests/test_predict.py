"""The public contract of ``predict``, generic invariants over the registry, bad input."""
import math
import subprocess
import sys

import numpy as np
import pytest

import propagation
from propagation import predict
from propagation.layers import Block, ReLUWeight
from propagation.predict import (_block_inputs_scan, _profile, _profile_reset, _resets,
                                 _with_padding, make_plan)
from propagation.schemes import get_scheme

from conftest import scheme_cases

# Float64 round-off over a few hundred additions/log2 conversions stays below 1e-12.
TIGHT = 1e-12


@pytest.mark.parametrize("name, params", scheme_cases())
@pytest.mark.parametrize("depth", [1, 7, 64])
def test_contract_shapes_and_identities(name, params, depth):
    p = predict(depth, name, **params)
    assert p.depth == depth and p.source == "theory" and p.scheme == name
    for stats, n in ((p.skip, depth + 1), (p.branch, depth), (p.grad, depth + 1)):
        for q in ("second_moment", "squared_mean", "variance"):
            a = getattr(stats, q)
            assert a.shape == (n,) and a.dtype == np.float64
    s = p.skip
    assert s.second_moment[0] == pytest.approx(1.0) and s.squared_mean[0] == 0.0
    np.testing.assert_allclose(s.squared_mean + s.variance, s.second_moment, rtol=TIGHT)
    b = p.branch
    np.testing.assert_allclose(b.squared_mean + b.variance, b.second_moment, rtol=TIGHT, atol=0)
    assert np.all(s.squared_mean <= s.second_moment * (1 + TIGHT))
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(p.downscale, np.sqrt(s.second_moment[:-1] / b.second_moment),
                                   rtol=TIGHT)
    assert p.grad.second_moment[-1] == 1.0
    assert np.all(np.isfinite(p.grad.log2_second_moment))


def _vectorised(name, params, plan):
    spec = get_scheme(name)
    block = spec.build(plan, **{**spec.defaults(), **params})
    return block if _resets(block, plan) else None


STAGED = make_plan(40, stages=(10, 20, 10))
PLANS = {"plain": make_plan(200), "staged": STAGED, "bottleneck": make_plan(50, layers=3),
         "cifar": make_plan(30, stages=(10, 10, 10), project_first=False)}
INPUTS = [(1.0, 0.0), (1.7, 0.5), (0.3, 0.3)]  # (q0, m0): default, a mean, no variance at all


def _profile_arrays(prof):
    skip, branch, grad, share = prof
    return {f"{part}.{k}": np.asarray(getattr(stats, f"log2_{k}"))
            for part, stats in (("skip", skip), ("branch", branch), ("grad", grad))
            for k in ("second_moment", "squared_mean", "variance")} | {"share": share}


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["", "padded"])
@pytest.mark.parametrize("name, params", [c for c in scheme_cases()
                                          if _vectorised(*c.values, STAGED)])
def test_vectorised_profile_equals_the_block_recursion(name, params, plan, padded):
    """The fast path for blocks whose branch a norm or a zero resets (closed forms in l,
    constants broadcast) gives what the block-by-block recursion followed by the generic
    vectorised profile gives, for every input state, with projections and per-block gains.

    Tolerance: both sides are log2 values. The running sums over at most D = 200 positive
    terms differ in rounding by at most D eps = 4.4e-14 relative, 6.4e-14 in log2; the
    gradient sums at most D gains |a| <= 8 (log2) each off by a few eps: 200 * 8 * 4 eps =
    1.4e-12. So 1e-12 relative plus 2e-12 absolute; infinities must match exactly."""
    plan = PLANS[plan]
    block = _vectorised(name, params, plan)
    if padded:
        n = sum(layer.is_weight_layer for layer in block.branch)
        block = _with_padding(block, plan, np.linspace(0.7, 1.0, plan.depth * n).reshape(-1, n))
    for q0, m0 in INPUTS:
        fast = _profile_arrays(_profile_reset(block, plan, q0, m0))
        slow = _profile_arrays(_profile(block, plan, *_block_inputs_scan(
            block, plan, math.log2(q0), (q0 - m0) / q0)))
        for key in slow:
            np.testing.assert_allclose(fast[key], slow[key], rtol=TIGHT, atol=2 * TIGHT,
                                       err_msg=f"{key} at q0={q0}, m0={m0}")


def test_constant_profiles_are_broadcast_not_stored():
    """Fixup's and SkipInit's (alpha = 0) blocks are identities: a million blocks cost no
    more memory than one."""
    for name in ("fixup", "skipinit"):
        p = predict(10 ** 6, name)
        assert p.skip.log2_second_moment.strides == (0,) and p.grad.log2_second_moment.strides == (0,)
        assert np.all(p.skip.second_moment[[0, -1]] == 1.0) and p.grad.second_moment[0] == 1.0


def test_batchnorm_example_from_the_issue():
    p = predict(1000, "batchnorm")
    l = np.arange(1001)
    np.testing.assert_allclose(p.skip.second_moment, 1 + l, rtol=TIGHT)
    np.testing.assert_allclose(p.skip.squared_mean, l / np.pi, rtol=TIGHT)
    np.testing.assert_allclose(p.branch.second_moment, 1.0, rtol=TIGHT)
    np.testing.assert_allclose(p.downscale, np.sqrt(1 + l[:-1]), rtol=TIGHT)


def test_stages_reset_the_batchnorm_skip_path():
    p = predict(16, "batchnorm", stages=(3, 4, 6, 3))
    starts = [0, 3, 7, 13]
    assert p.projection.nonzero()[0].tolist() == starts
    q = p.skip.second_moment
    # The skip operand of a projection block is proj(relu(bn(x))): (1, 1/pi) whatever x was.
    np.testing.assert_allclose(q[starts], 1.0, rtol=TIGHT)
    np.testing.assert_allclose(q[[1, 4, 8, 14]], 2.0, rtol=TIGHT)
    np.testing.assert_allclose(q[-1], 4.0, rtol=TIGHT)
    p2 = predict(16, "batchnorm", stages=(3, 4, 6, 3), project_first=False)
    assert p2.projection.nonzero()[0].tolist() == [3, 7, 13]
    assert p2.skip.second_moment[2] == pytest.approx(3.0)


def test_projection_preserves_the_unnormalised_skip_path():
    a = predict(12, "none", stages=(4, 4, 4))
    b = predict(12, "none")
    np.testing.assert_allclose(a.skip.log2_second_moment, b.skip.log2_second_moment, atol=TIGHT)


def test_exponential_schemes_stay_finite_in_log_space():
    p = predict(5000, "none")
    assert np.all(np.isfinite(p.skip.log2_second_moment))
    np.testing.assert_allclose(p.skip.log2_second_moment[:-1], np.arange(5000), atol=1e-9)
    with pytest.warns(propagation.OverflowToInfWarning, match="log2_second_moment"):
        q = p.skip.second_moment
    assert np.isinf(q[-1]) and q[1000] == 2.0 ** 1000
    # The correlation between inputs approaches 1 but the variance stays positive.
    assert np.all(np.isfinite(p.skip.log2_variance))
    assert np.all(np.diff(p.skip.log2_variance[:-1] - p.skip.log2_second_moment[:-1]) < 0)


def test_input_state_is_settable():
    p = predict(5, "batchnorm", input_second_moment=4.0, input_squared_mean=1.0)
    np.testing.assert_allclose(p.skip.second_moment, 4.0 + np.arange(6), rtol=TIGHT)
    np.testing.assert_allclose(p.skip.squared_mean, 1.0 + np.arange(6) / np.pi, rtol=TIGHT)


def test_a_registered_scheme_is_predicted_and_listed():
    def build(plan, gain):
        return Block(branch=(ReLUWeight(gain),) * plan.layers)
    propagation.register_scheme("test_gain", "He branch with another gain", "test", build,
                                {"gain": propagation.Param(1.0, "weight gain",
                                                           lambda n, v: float(v))})
    try:
        assert "test_gain" in propagation.schemes()
        p = predict(10, "test_gain", gain=1.0)  # gain 1: branch q = q/4, skip grows 5/4
        np.testing.assert_allclose(p.skip.second_moment[:-1], 1.25 ** np.arange(10), rtol=TIGHT)
        with pytest.raises(ValueError, match="already registered"):
            propagation.register_scheme("test_gain", "", "", build)
    finally:
        propagation.unregister_scheme("test_gain")
    assert "test_gain" not in propagation.schemes()


def test_schemes_lists_descriptions_and_parameters():
    info = propagation.schemes()
    for name in ("batchnorm", "none", "sqrt_half", "skipinit", "fixup", "nf", "layernorm",
                 "postnorm"):
        assert name in info and info[name].description
    assert info["skipinit"].params["alpha"][0] == 0.0
    assert info["nf"].params["alpha"][0] == 0.2


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(depth=0), ValueError, ["depth", "0", ">= 1"]),
    (dict(depth=2.5), TypeError, ["depth", "2.5", "int"]),
    (dict(depth=True), TypeError, ["depth", "True"]),
    (dict(depth=10, scheme="batchnrom"), ValueError, ["batchnrom", "did you mean 'batchnorm'"]),
    (dict(depth=10, scheme="skipinit", alpah=0.1), TypeError, ["alpah", "skipinit", "alpha"]),
    (dict(depth=10, scheme="batchnorm", alpha=0.1), TypeError, ["alpha", "batchnorm", "none"]),
    (dict(depth=10, scheme="skipinit", alpha=-0.1), ValueError, ["alpha", "-0.1", ">= 0"]),
    (dict(depth=10, scheme="nf", alpha=float("nan")), ValueError, ["alpha", "nan", "finite"]),
    (dict(depth=10, scheme="nf", alpha=float("inf")), ValueError, ["alpha", "inf", "finite"]),
    (dict(depth=10, stages=(3, 4)), ValueError, ["stages", "(3, 4)", "sum to depth=10"]),
    (dict(depth=10, stages=(5, 0, 5)), ValueError, ["stages[1]", "0"]),
    (dict(depth=10, stages=7), TypeError, ["stages", "7"]),
    (dict(depth=10, input_second_moment=-1), ValueError, ["input_second_moment", "-1"]),
    (dict(depth=10, input_squared_mean=2.0), ValueError, ["input_squared_mean", "2.0", "<= 1.0"]),
])
def test_bad_input_names_argument_value_and_allowed(kwargs, error, words):
    with pytest.raises(error) as info:
        predict(**kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_import_loads_neither_torch_nor_matplotlib():
    code = ("import sys, propagation; propagation.predict(10, 'nf'); "
            "print(sorted(m for m in ('torch', 'matplotlib', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_padding_factors_scale_each_weight_layer():
    f1, f2 = 0.9, 0.8
    bn = predict(6, "batchnorm", padding_factors=(f1, f2))
    # BatchNorm resets the state before the last weight layer: only f2 survives.
    np.testing.assert_allclose(bn.branch.second_moment, f2, rtol=TIGHT)
    none = predict(6, "none", padding_factors=(f1, f2))
    np.testing.assert_allclose(none.skip.second_moment[:-1], (1 + f1 * f2) ** np.arange(6),
                               rtol=TIGHT)
    per_block = np.tile([f1, f2], (6, 1))
    per_block[3] = 1.0
    p = predict(6, "none", padding_factors=per_block)
    assert p.skip.second_moment[4] / p.skip.second_moment[3] == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"padding_factors must have shape \(2,\)"):
        predict(6, "none", padding_factors=(0.9, 0.8, 0.7))
    with pytest.raises(ValueError, match="padding_factors must lie in"):
        predict(6, "none", padding_factors=(0.0, 0.8))


def _reference_scan(block, plan, lq, e):
    """The block recursion written plainly with each layer's ``forward`` (no compiled code)."""
    from propagation.layers import MATH, run

    def merge(lq_s, e_s, lq_b, e_b):
        if lq_b > lq_s:
            lq_s, e_s, lq_b, e_b = lq_b, e_b, lq_s, e_s
        if lq_s == -math.inf:
            return lq_s, e_s
        w = 2.0 ** (lq_b - lq_s)
        return lq_s + math.log2(1.0 + w), (e_s + w * e_b) / (1.0 + w)
    lq_x, e_x = [], []
    for l in range(plan.depth):
        lq_x.append(lq)
        e_x.append(e)
        p = run(block.pre, lq, e, l, MATH)
        b = run(block.branch, *p, l, MATH)
        if plan.projection[l]:
            s = run(block.projection, *p, l, MATH)
        else:
            s = (lq + (2 * math.log2(block.skip_gain) if block.skip_gain else -math.inf), e)
        lq, e = run(block.post, *merge(*s, *b), l, MATH)
    return np.array(lq_x), np.array(e_x)


@pytest.mark.parametrize("name, params", scheme_cases())
def test_compiled_scan_equals_the_layers_forward(name, params):
    spec = get_scheme(name)
    block = spec.build(STAGED, **{**spec.defaults(), **params})
    n_weights = sum(layer.is_weight_layer for layer in block.branch)
    padded = _with_padding(block, STAGED, np.linspace(0.7, 1.0, n_weights))
    for b in (block, padded):
        got = _block_inputs_scan(b, STAGED, math.log2(1.7), 0.8)
        want = _reference_scan(b, STAGED, math.log2(1.7), 0.8)
        # The same operations in the same order: equal to the last bit.
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_profile_round_trips_through_json_with_array_meta():
    import json
    p = predict(20, "batchnorm")
    d = json.loads(p.to_json())
    assert d["grad_branch_share"] == pytest.approx(list(p.grad_branch_share))
    back = propagation.Profile.from_dict(d)
    np.testing.assert_array_equal(back.skip.log2_second_moment, p.skip.log2_second_moment)


def test_inlined_kernel_code_equals_the_scalar_kernel_to_the_last_bit():
    """predict's compiled loop inlines kernels.one_minus_kappa_scalar_code; it must do what
    one_minus_kappa_scalar does, on both sides of the series cut-off and at the clips."""
    from propagation import kernels
    src = "def f(x):\n" + "\n".join("    " + line for line in
                                     kernels.one_minus_kappa_scalar_code("x", "out")) + "\n    return out"
    namespace = {"sqrt": math.sqrt, "asin": math.asin}
    exec(src, namespace)
    cut = 2 * kernels._S_SERIES ** 2
    grid = [-1.0, 0.0, 5e-324, 1e-300, 1e-12, cut * (1 - 1e-15), cut, cut * (1 + 1e-15), 0.3,
            1.0, 1.9999999, 2.0, 2.5, math.inf] + list(np.geomspace(1e-9, 2.0, 997))
    for e in grid:
        want, got = kernels.one_minus_kappa_scalar(e), namespace["f"](e)
        assert got == want or (math.isnan(got) and math.isnan(want)), e


REFERENCE_CASES = [
    ({}, {}),
    ({"stages": (10, 15, 15, 10)}, {}),
    ({"stages": (20, 30), "project_first": False, "layers": 3}, {}),
    ({"input_second_moment": 2.5, "input_squared_mean": 0.7,
      "padding_factors": np.linspace(0.7, 1.0, 100).reshape(50, 2)}, {}),
    ({"branch_gain": 0.5}, {}),
]


@pytest.mark.parametrize("case", range(len(REFERENCE_CASES)))
@pytest.mark.parametrize("scheme", sorted(propagation.schemes()))
def test_fast_paths_equal_the_reference_loop(scheme, case):
    """predict's compiled loop and vectorised paths against predict_reference, the
    block-by-block loop in Python floats that reads like THEORY.md.

    Tolerance: both carry log2 q. Each block adds at most ~8 roundings of the running log2
    values (two gains, the merge weight's exponent, the merge, pre/post gains), each at most
    ulp(|log2 q|)/2; the vectorised paths instead sum second moments linearly (relative error
    <= k eps at block k, i.e. k eps / ln 2 in log2). Over D = 50 blocks with |log2 q| <= 64
    that is below 50 * 8 * 2^-53 * 64 ~ 3e-12 absolute; 1e-11 leaves a factor 3.
    """
    from propagation.predict import predict_reference
    kwargs, params = REFERENCE_CASES[case]
    if scheme == "skipinit":
        params = {"alpha": 0.3}
    if kwargs.get("layers") == 3 and "padding_factors" in kwargs:
        pytest.skip("padding factors are per branch weight layer")
    fast = predict(50, scheme, **kwargs, **params)
    slow = predict_reference(50, scheme, **kwargs, **params)
    assert np.max(np.abs(slow.skip.log2_second_moment)) <= 64
    for part in ("skip", "branch", "grad"):
        for q in ("second_moment", "squared_mean", "variance"):
            want = getattr(getattr(slow, part), f"log2_{q}")
            got = np.broadcast_to(getattr(getattr(fast, part), f"log2_{q}"), want.shape)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-11, err_msg=f"{part} {q}")
    np.testing.assert_allclose(np.broadcast_to(fast.grad_branch_share, (50,)),
                               slow.grad_branch_share, rtol=0, atol=1e-12)
