"""Transformers: the sequence theory (propagation.sequence), its reference networks and the
token correlation that ``measure`` reads."""
import json
import math
import warnings

import numpy as np
import pytest
import torch

import propagation
from propagation import nets
from propagation.profile import Profile
from propagation.sequence import (MAX_LOGIT_VARIANCE, SEQ_SCHEMES, Attention, LayerNorm,
                                  ReLU, deepnorm_constants, predict_sequence, relu_kernel)


def _kernel(rng, T, n=12):
    X = rng.normal(size=(T, n))
    return X @ X.T / n


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matrix_products_equal_the_four_index_sums(causal):
    # forward and backward use closed T^3 matrix products; pair_weights is the T^4 sum they
    # stand for, E[A_ts A'_uv] written out. Random kernels (not exchangeable, so every
    # index pattern matters); float64 sums of a few hundred terms: 1e-12.
    rng = np.random.default_rng(1)
    T = 6
    K, G = _kernel(rng, T), _kernel(rng, T)
    Y = rng.normal(size=(T, 12))
    C = (rng.normal(size=(T, 12)) @ Y.T) / 12
    C = (C + C.T) / 2
    a = Attention(0.3, causal, value_gain2=1.3, out_gain2=0.8)
    P = a.average(T)
    H = a.shift(K, P)
    W, M = a.pair_weights(K, K, P, H)
    Wc, _ = a.pair_weights(C, C, P, H)
    gain = 1.3 * 0.8
    k2, c2 = a.forward(K, C)
    np.testing.assert_allclose(k2, gain * np.einsum("tsuv,sv->tu", W, K), atol=1e-12)
    np.testing.assert_allclose(c2, gain * np.einsum("tsuv,sv->tu", Wc, C), atol=1e-12)
    PP = P[:, :, None, None] * P[None, None] * M
    ref = gain * (np.einsum("tsuv,tu->sv", W, G)
                  + 0.3 * (G * np.einsum("tsuv,sv->tu", PP, K)
                           + np.einsum("tsuv,tu->sv", PP, G * K)))
    np.testing.assert_allclose(a.backward(G, K, C), ref, atol=1e-12)


def _psd(rng, T, m, scale):
    X = rng.normal(size=(T, m))
    return scale * X @ X.T / m


@pytest.mark.parametrize("causal", [False, True])
def test_second_order_softmax_against_monte_carlo(causal):
    # The whole O(g) excess of E[A K A^T] (within a sequence) and E[A C A'^T] (across two
    # sequences, whose logits correlate through C) over P K P^T, against the exact softmax
    # of jointly Gaussian logits (covariance g J[at, bu] J[as, bv], J the joint Gram of
    # both sequences), for a random non-exchangeable K. 200k draws (sign-flipped pairs
    # cancel the odd terms) at g = 0.02 and 0.04, extrapolated to g -> 0 (Richardson)
    # removes the O(g^2) remainder; the sampling noise left is ~0.5% of the excess (an
    # independent review run at 800k draws: 0.15-0.3%), so 3% in Frobenius norm.
    rng = np.random.default_rng(0)
    T = 5
    S = _psd(rng, T, 3, 0.6)
    K, C = S + _psd(rng, T, 9, 0.8), S        # [[K, C], [C, K]] is a valid Gram matrix
    J = np.block([[K, C], [C, K]])
    idx = [(a, t, s) for a in range(2) for t in range(T) for s in range(T)]
    cov = np.array([[J[a * T + t, b * T + u] * J[a * T + s, b * T + v] for (b, u, v) in idx]
                    for (a, t, s) in idx])
    chol = np.linalg.cholesky(cov + 1e-12 * np.eye(len(idx)))
    allowed = np.tril(np.ones((T, T), bool)) if causal else np.ones((T, T), bool)

    def softmax(L):
        L = np.where(allowed, L, -np.inf)
        A = np.exp(L - L.max(-1, keepdims=True))
        return A / A.sum(-1, keepdims=True)

    P = Attention(0.0, causal).average(T)
    draws = np.random.default_rng(1).normal(size=(100_000, len(idx))) @ chol.T
    excess = {}
    for g in (0.02, 0.04):
        acc_k, acc_c = np.zeros((T, T)), np.zeros((T, T))
        for sign in (1.0, -1.0):
            L = (sign * math.sqrt(g) * draws).reshape(-1, 2, T, T)
            Aa, Ab = softmax(L[:, 0]), softmax(L[:, 1])
            acc_k += np.einsum("nts,sv,nuv->tu", Aa, K, Aa, optimize=True)
            acc_c += np.einsum("nts,sv,nuv->tu", Aa, C, Ab, optimize=True)
        n = 2 * len(draws)
        excess[g] = ((acc_k / n - P @ K @ P.T) / g, (acc_c / n - P @ C @ P.T) / g)
    th_k, th_c = Attention(1.0, causal).forward(K, C)
    for i, (th, base) in enumerate(((th_k, P @ K @ P.T), (th_c, P @ C @ P.T))):
        mc = 2 * excess[0.02][i] - excess[0.04][i]
        want = th - base
        assert np.linalg.norm(mc - want) / np.linalg.norm(want) < 0.03, (i, mc, want)


@pytest.mark.slow  # 300 seeds of autograd: ~7 s each
@pytest.mark.parametrize("causal", [False, True])
def test_attention_backward_against_a_finite_network(causal):
    # Attention.backward's O(g) terms (the value path's mean shift and second-order weights,
    # and the logits' path to queries and keys) against autograd through a real one-head
    # attention layer of width 256 fed tokens of a given non-exchangeable kernel exactly,
    # with a random read-out of kernel G. Per seed the excess over the same network with
    # zero query/key weights (W_K sign-flipped pairs cancel odd terms), at g = 0.025 and
    # 0.05, extrapolated to g -> 0; 300 seeds. An independent review measured 1.3-5% error
    # (max |z| 1.9) at this size; a missing path or a wrong factor 2 is 30-100%: 15%.
    torch.set_default_dtype(torch.float64)
    try:
        T, n = 6, 256
        rng = np.random.default_rng(3)
        Y = rng.normal(size=(T, 8))
        K = Y @ Y.T / 8 + 0.3 * np.eye(T)
        Yg = rng.normal(size=(T, 8))
        G = Yg @ Yg.T / 8 + 0.2 * np.eye(T)
        Q, _ = np.linalg.qr(rng.normal(size=(n, T)))
        X = torch.tensor(np.linalg.cholesky(K) @ Q.T * math.sqrt(n))  # X X^T / n = K
        Lg = torch.tensor(np.linalg.cholesky(G))
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool)) if causal else None

        def grad_kernel(WQ, WK, WV, WO, R):
            x = X.clone().requires_grad_(True)
            logits = (x @ WQ.T) @ (x @ WK.T).T / math.sqrt(n)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            out = torch.softmax(logits, -1) @ (x @ WV.T) @ WO.T
            (gx,) = torch.autograd.grad((out * R).sum(), x)
            return (gx @ gx.T / n).numpy()

        acc = np.zeros((T, T))
        for seed in range(300):
            torch.manual_seed(seed)
            Zq, Zk, WV, WO = (torch.randn(n, n) / math.sqrt(n) for _ in range(4))
            R = Lg @ torch.randn(T, n)
            base = grad_kernel(0 * Zq, 0 * Zk, WV, WO, R)
            d = {}
            for g in (0.025, 0.05):
                s4 = g ** 0.25
                d[g] = (0.5 * (grad_kernel(s4 * Zq, s4 * Zk, WV, WO, R)
                               + grad_kernel(s4 * Zq, -s4 * Zk, WV, WO, R)) - base) / g
            acc += 2 * d[0.025] - d[0.05]
        mc = acc / 300
    finally:
        torch.set_default_dtype(torch.float32)
    want = Attention(1.0, causal).backward(G, K, K) - Attention(0.0, causal).backward(G, K, K)
    assert np.linalg.norm(mc - want) / np.linalg.norm(want) < 0.15


def test_exchangeable_tokens_closed_form():
    # derivations/attention.py: for K = k + (q - k) I and uniform attention,
    # K'_tt = k + (q - k)/T + g q (q - k)^2 (T - 1)/T^2, K'_tu the same with k for q.
    q, k, g, T = 1.3, 0.4, 0.2, 9
    K = k + (q - k) * np.eye(T)
    out, _ = Attention(g).forward(K, K * 0)
    base = k + (q - k) / T
    np.testing.assert_allclose(out[0, 0], base + g * q * (q - k) ** 2 * (T - 1) / T ** 2, rtol=1e-12)
    np.testing.assert_allclose(out[0, 1], base + g * k * (q - k) ** 2 * (T - 1) / T ** 2, rtol=1e-12)


def test_postln_collapse_closed_form():
    # Uniform attention, post-LN: an attention merge maps the token correlation r of the
    # normalised stream to (2 r + (1 - r)/T) / (1 + r + (1 - r)/T), so 1 - r halves per
    # attention merge as r -> 1 (derivations/attention.py).
    T = 16
    p = predict_sequence(6, "transformer_postln", tokens=T, logit_std=0.0)
    r = p.tokens.skip
    for l in range(0, 12, 2):  # attention merges; skip[l + 1] is after the merge's LN
        want = (2 * r[l] + (1 - r[l]) / T) / (1 + r[l] + (1 - r[l]) / T)
        # skip[l + 1] is the MLP merge's skip operand: the attention merge's normalised sum.
        np.testing.assert_allclose(r[l + 1], want, rtol=1e-12)


def test_layers_map_kernels_as_gaussians_do():
    # ReLU: E[relu(u) relu(v)] for correlation 0.5 (arc-cosine, closed form); LayerNorm: to
    # unit diagonal. 2e5 samples: standard error ~ 2e-3 of a value near 0.27; 1e-2 holds.
    rng = np.random.default_rng(2)
    rho = 0.5
    u = rng.normal(size=200_000)
    v = rho * u + math.sqrt(1 - rho ** 2) * rng.normal(size=200_000)
    assert abs(np.mean(np.maximum(u, 0) * np.maximum(v, 0)) - relu_kernel(rho)) < 1e-2
    K = np.array([[4.0, 1.0], [1.0, 1.0]])
    Kn, _ = LayerNorm().forward(K, K)
    np.testing.assert_allclose(np.diag(Kn), 1.0)
    np.testing.assert_allclose(Kn[0, 1], 0.5)
    Kr, _ = ReLU().forward(K, K)
    np.testing.assert_allclose(Kr[0, 0], 2.0)  # q/2


def test_preln_grows_linearly_and_postln_stays_normalised():
    pre = predict_sequence(50, "transformer_preln", tokens=16)
    q = pre.skip.second_moment
    inc = np.diff(q[10:])
    assert np.all(inc > 0.3) and np.all(inc < 1.1)  # each branch adds ~ alpha^2 x (0.4..1)
    post = predict_sequence(50, "transformer_postln", tokens=16)
    np.testing.assert_allclose(post.skip.second_moment[1:-1], 1.0, rtol=1e-12)
    # depth-muP and CompleteP keep the stream bounded: 1/sqrt(2D) and 1/(2D) per branch.
    for scheme, most in (("depth_mup", 2.5), ("completep", 1.2)):
        p = predict_sequence(50, scheme, tokens=16)
        assert p.skip.second_moment[-1] < most


def test_deepnorm_constants():
    a, b = deepnorm_constants(6)
    assert a == pytest.approx(12 ** 0.25) and b == pytest.approx(48 ** -0.25)
    a, b = deepnorm_constants(6, decoder=True)
    assert a == pytest.approx(18 ** 0.25) and b == pytest.approx(72 ** -0.25)


def test_predict_dispatches_and_round_trips():
    p = propagation.predict(3, "transformer_preln", tokens=8, causal=True)
    assert p.depth == 6 and p.tokens is not None and p.tokens.length == 8
    q = Profile.from_dict(json.loads(p.to_json()))
    np.testing.assert_array_equal(q.tokens.skip, p.tokens.skip)
    np.testing.assert_array_equal(q.tokens.log2_branch_sequence_mean,
                                  p.tokens.log2_branch_sequence_mean)


def test_bad_inputs_name_the_argument():
    with pytest.raises(TypeError, match="width"):
        propagation.predict(3, "transformer_preln", width=64)
    with pytest.raises(ValueError, match="tokens"):
        predict_sequence(3, "transformer_preln", tokens=1)
    with pytest.raises(ValueError, match="logit_std"):
        predict_sequence(3, "transformer_preln", logit_std=-1.0)
    with pytest.raises(TypeError, match="alpha"):
        predict_sequence(3, "transformer_postln", alpha=0.5)
    with pytest.raises(ValueError, match="scheme must be a transformer scheme"):
        nets.transformer(2, scheme="batchnorm")
    with pytest.raises(ValueError, match="multiple of heads"):
        nets.transformer(2, width=30, heads=4)


def test_large_logit_variance_warns():
    with pytest.warns(RuntimeWarning, match="logit variance"):
        predict_sequence(2, "transformer_preln", tokens=8, logit_std=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = predict_sequence(2, "transformer_preln", tokens=8, logit_std=0.5)
    assert p.meta["max_logit_variance"] <= MAX_LOGIT_VARIANCE


def test_measure_reads_the_mean_token_cosine():
    # Against the cosines computed pair by pair (float32 rounding: 1e-5).
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=gen) + 0.5 * torch.randn(3, 1, 16, generator=gen)
    from propagation.empirical import _token_cosine
    u = x / x.norm(dim=-1, keepdim=True)
    cos = torch.einsum("btc,bsc->bts", u, u)
    off = (cos.sum(dim=(1, 2)) - 5) / 20
    assert _token_cosine(x, -1) == pytest.approx(float(off.mean()), abs=1e-5)
    assert math.isnan(_token_cosine(x, 1))          # channels not last: no tokens
    assert math.isnan(_token_cosine(x[:, :, 0], -1))  # not a sequence


def test_measure_leaves_token_correlation_off_elsewhere():
    m = propagation.measure(nets.residual_mlp(2, width=16, scheme="layernorm"), torch.randn(8, 16))
    assert m.tokens is None


@pytest.mark.slow  # 64 layers x 3 seeds: ~6 s each
@pytest.mark.parametrize("scheme", ["transformer_preln", "transformer_postln"])
def test_uniform_attention_token_correlation_within_005(scheme):
    # Issue 15's target: uniform attention (logit_std 0), T = 32, width 256, up to 64
    # layers: the stream's token correlation within 0.05 of the theory at every merge
    # (median of 3 seeds).
    check = propagation.check(lambda: nets.transformer(64, width=256, scheme=scheme,
                                                       logit_std=0.0),
                              (8, 32, 256), seeds=3, channel_axis=-1, diagnosis=False,
                              quantities=("token_correlation",))
    d = np.abs(check.measured.tokens.skip - check.theory.tokens.skip)
    assert d.max() < 0.05, (d.max(), int(d.argmax()))


def test_causal_attention_is_a_prefix_mean():
    # At logit_std 0 a causal branch output at token t is the mean of tokens 0..t exactly:
    # its second moment over tokens is (1/T) sum_t 1/(t + 1) for independent unit tokens.
    T = 16
    p = predict_sequence(1, "transformer_preln", tokens=T, causal=True, logit_std=0.0)
    want = np.mean(1.0 / np.arange(1, T + 1))
    assert p.branch.second_moment[0] == pytest.approx(want, rel=1e-12)


def test_every_sequence_scheme_has_a_reference_network():
    for name in SEQ_SCHEMES:
        model = nets.transformer(2, width=32, scheme=name)
        m = propagation.measure(model, torch.randn(2, 4, 32), channel_axis=-1)
        assert m.depth == 4, name
        assert m.tokens is not None


def test_derivations_hold_and_match_the_theory():
    # derivations/attention.py raises if its index sums disagree with a closed form; the
    # closed forms it prints are then the ones sequence.py evaluates (exact to rounding).
    from derivations import attention
    import sympy as sp
    records = {r.name: r.expr for r in attention.derivations()}
    q, k, g, T = 1.3, 0.4, 0.2, 9
    K = k + (q - k) * np.eye(T)
    out, _ = Attention(g).forward(K, K * 0)
    subs = {sp.Symbol("q", positive=True): q, sp.Symbol("k", positive=True): k,
            sp.Symbol("g", positive=True): g, sp.Symbol("T", positive=True, integer=True): T}
    assert float(records["attention K'_tt"].subs(subs)) == pytest.approx(out[0, 0], rel=1e-12)
    assert float(records["attention K'_tu"].subs(subs)) == pytest.approx(out[0, 1], rel=1e-12)


# --- diagnose on transformers ---------------------------------------------------------------

def _diagnosed(scheme, depth=16, width=128, **params):
    torch.manual_seed(0)
    model = nets.transformer(depth, width=width, scheme=scheme, **params)
    m = propagation.measure(model, torch.randn(8, 32, width), channel_axis=-1)
    return propagation.diagnose(m).transformer


@pytest.mark.parametrize("scheme, family, alpha", [
    ("transformer_preln", "pre-LN", 1.0), ("layerscale", "pre-LN", 0.1),
    ("depth_mup", "pre-LN", 32 ** -0.5), ("transformer_postln", "post-LN", 1.0),
    ("rezero", "unnormalised", 0.1), ("deepnorm", "DeepNorm", (8 * 16) ** -0.5)])
def test_diagnose_names_the_transformer_family_and_alpha(scheme, family, alpha):
    # alpha: the MLP branch's scale against the reference block's (DeepNorm: beta^2, the
    # MLP branch's second moment being beta^4). The median of 16 branches at width 128: the
    # 7/n spread per branch (sigma ~ 0.23 in ln q) leaves ~0.07 in ln alpha; 15% holds it.
    params = {"alpha": 0.1} if scheme == "rezero" else {}
    t = _diagnosed(scheme, **params)
    assert t.family == family
    assert t.alpha == pytest.approx(alpha, rel=0.15)


def test_diagnose_flags_a_mis_set_deepnorm_beta():
    ok = _diagnosed("deepnorm")
    assert ok.beta_factor == pytest.approx(1.0, rel=0.1)
    assert not any("beta is" in m for m in ok.messages)
    off = _diagnosed("deepnorm", beta_factor=1.32)
    assert off.beta_factor == pytest.approx(1.32, rel=0.1)
    assert any("beta is" in m and "x the variance" in m for m in off.messages)


def test_postln_collapse_is_flagged_by_16_layers_and_preln_is_not():
    post = _diagnosed("transformer_postln", width=256)
    assert post.collapse_at is not None and post.collapse_at <= 32
    assert any("rank collapse" in m for m in post.messages)
    assert _diagnosed("transformer_preln", width=256).collapse_at is None


@pytest.mark.slow
@pytest.mark.skipif(not __import__("propagation.zoo").zoo.available(), reason="needs transformers")
@pytest.mark.parametrize("name, family", [("bert", "post-LN"), ("gpt2", "pre-LN"),
                                          ("llama", "pre-LN")])
def test_diagnose_reads_the_hugging_face_zoo(name, family):
    from propagation import zoo
    entry = zoo.entry(name)
    torch.manual_seed(0)
    model = entry.build()
    m = propagation.measure(model, entry.inputs(0), channel_axis=-1, **entry.kwargs)
    t = propagation.diagnose(m).transformer
    assert t is not None and t.family == family
    # Their N(0, 0.02^2) weights at width 64 make every branch small against the
    # reference's: an effective alpha well below 1.
    assert 0.0 < t.alpha < 0.2


def test_command_line_lists_and_checks_transformers(capsys):
    from propagation.__main__ import main
    assert main(["schemes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SEQ_SCHEMES)
    rc = main(["check", "--model", "propagation.nets:transformer", "--arg", "depth=2",
               "--arg", "width=64", "--input", "8,16,64", "--channel-axis", "-1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "tokens:skip" in out and "transformer: pre-LN" in out


@pytest.mark.gate
@pytest.mark.parametrize("built, theory", [
    ({"scheme": "deepnorm", "beta_factor": 1.1}, {"scheme": "deepnorm"}),
    ({"scheme": "transformer_preln", "alpha": 1.1}, {"scheme": "transformer_preln"}),
    ({"scheme": "transformer_preln", "logit_std": 0.6}, {"scheme": "transformer_preln"}),
    ({"scheme": "transformer_preln", "causal": True}, {"scheme": "transformer_preln"}),
], ids=["deepnorm-beta-1.1", "preln-alpha-1.1", "logit-std-0.6", "causal"])
def test_the_gate_catches_a_mis_set_transformer(built, theory):
    # The gate's comparison (10 layers, 8 x 32 x 256, 3 seeds) against the theory of the
    # network as intended: a 10% error in DeepNorm's beta or in alpha, twice the logit
    # spread, or a causal mask the theory does not know must each fail it.
    check = propagation.check(lambda: nets.transformer(10, width=256, **built), (8, 32, 256),
                              seeds=3, channel_axis=-1, diagnosis=False,
                              theory={**theory, "depth": 10, "logit_std": 0.3})
    assert not check.ok, check.table()
