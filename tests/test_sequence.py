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


def test_second_order_softmax_against_monte_carlo():
    # E[A K A^T] over Gaussian logits of covariance g K[t,u] K[s,v], by sampling: the theory's
    # g term must match the sampled excess over P K P^T to O(g) relative (the expansion's
    # remainder is O(g^2)). g = 0.05, 400k draws of 6 x 6 logits: the sampled excess has a
    # standard error of about 2% of itself, the remainder ~ g/2 = 2.5%; 10% holds both.
    rng = np.random.default_rng(0)
    T, g, N = 6, 0.05, 400_000
    K = 0.7 * np.eye(T) + 0.3  # exchangeable tokens of correlation 0.3
    cov = g * np.kron(K, K)    # index (t, s) -> t * T + s
    L = rng.multivariate_normal(np.zeros(T * T), cov, size=N, method="cholesky").reshape(N, T, T)
    A = np.exp(L - L.max(axis=2, keepdims=True))
    A /= A.sum(axis=2, keepdims=True)
    sampled = np.einsum("nts,sv,nuv->tu", A, K, A, optimize=True) / N
    a = Attention(g)
    P = a.average(T)
    base = P @ K @ P.T
    predicted, _ = a.forward(K, K * 0)
    excess_mc = sampled - base
    excess_th = predicted - base
    np.testing.assert_allclose(np.diag(excess_mc).mean(), np.diag(excess_th).mean(), rtol=0.10)


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
