"""The finite-width theory (propagation/finite.py): its one-channel moments, its distribution
as ``predict(..., width=n)`` returns it, and what ``compare`` does with it."""
import json
import math

import numpy as np
import pytest
import torch

import propagation as P
from propagation import finite, nets


def _mc_channel_stats(rho, b, draws, seed=0):
    """Monte Carlo of one channel's (Y_z, Z_z, Y_r, Z_r) for exchangeable N(0, 1) values."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((draws, 1))
    z = math.sqrt(rho) * g + math.sqrt(1 - rho) * rng.standard_normal((draws, b))
    r = np.maximum(z, 0.0)
    return np.stack([(z ** 2).mean(1), z.mean(1) ** 2, (r ** 2).mean(1), r.mean(1) ** 2], axis=1)


@pytest.mark.parametrize("rho, b", [(0.0, 4), (0.3, 8), (0.9, 16)])
def test_channel_covariance_matches_monte_carlo(rho, b):
    draws = 400_000
    x = _mc_channel_stats(rho, b, draws)
    mean, cov = finite.channel_covariance(rho, b)
    mc_mean, mc_cov = x.mean(0), np.cov(x.T)
    # Standard errors of the Monte Carlo: of a mean sd / sqrt(N); of a covariance entry
    # sqrt(Var[(x_i - mu_i)(x_j - mu_j)] / N). 5 of them keeps the 20 entries x 3 cases from
    # a false alarm (two-sided 5.0 sigma: 6e-7 each); the theory's quadrature is exact to ~1e-9.
    se_mean = x.std(0) / math.sqrt(draws)
    assert np.all(np.abs(mean - mc_mean) <= 5 * se_mean + 1e-9)
    c = x - mc_mean
    prod = c[:, :, None] * c[:, None, :]
    se_cov = prod.std(0) / math.sqrt(draws)
    assert np.all(np.abs(cov - mc_cov) <= 5 * se_cov + 1e-9)


@pytest.mark.parametrize("rho, b", [(0.0, 2), (0.5, 8), (0.99, 64)])
def test_wishart_closed_form_is_the_gaussian_part_of_the_quadrature(rho, b):
    _, cov = finite.channel_covariance(rho, b)
    # The quadrature over the common factor (8001 points on [-10, 10]) against the exact
    # trace formula: agreement to ~1e-9 relative; 1e-7 leaves room for rounding.
    np.testing.assert_allclose(cov[:2, :2], finite._wishart(rho, b), rtol=1e-7, atol=1e-12)


def test_quantiles_of_a_finite_width_prediction():
    p = P.predict(30, "batchnorm", width=128, batch=64)
    assert p.spread is not None and p.spread.width == 128 and p.spread.batch == 64
    lo, med, hi = p.quantile(0.05), p.quantile(0.5), p.quantile(0.95)
    for part in ("skip", "branch", "grad"):
        a, m, c = (getattr(x, part).log2_second_moment for x in (lo, med, hi))
        assert np.all(a <= m) and np.all(m <= c)
        assert np.array_equal(m, p.spread.part(part)[0].log2_second_moment)
    # The median of q sits sigma^2 / 2 below the infinite-width mean (log-normal).
    s = p.spread.skip_sigma.log2_second_moment * math.log(2)
    shift = (p.spread.skip_median.log2_second_moment - p.skip.log2_second_moment) * math.log(2)
    assert np.allclose(shift, -0.5 * s ** 2, atol=1e-3)
    with pytest.raises(ValueError, match="q must be a probability"):
        p.quantile(1.5)


def test_spread_scales_as_one_over_width():
    # Every noise term is (1/n) x a one-channel covariance, except the Wishart draw's
    # realised-Gram term, (1/n) x (1/n_in): Var = A/n + B/n^2, and the fluctuations
    # propagate linearly. So f(n) = n Var(n) = A + B/n: f(64) - f(128) = 2 (f(128) - f(256)),
    # exactly up to rounding (1e-6 relative of values ~1e-2 leaves room for float64 sums).
    f = {}
    for n in (64, 128, 256):
        sp = P.predict(20, "layernorm", width=n, batch=32).spread
        f[n] = {part: n * sp.part(part)[1].log2_second_moment ** 2 for part in ("skip", "branch", "grad")}
    for part in ("skip", "branch", "grad"):
        np.testing.assert_allclose(f[64][part] - f[128][part], 2 * (f[128][part] - f[256][part]),
                                   rtol=1e-6, atol=1e-12)


def test_arguments_and_round_trip():
    with pytest.raises(TypeError, match="batch is only used with width"):
        P.predict(5, "none", batch=8)
    with pytest.raises(ValueError, match="batch must be at least 2"):
        P.predict(5, "none", width=8, batch=1)
    with pytest.raises(ValueError, match="width"):
        P.predict(5, "none", width=0)
    with pytest.raises(ValueError, match="measured over several seeds.*finite width"):
        P.predict(5, "none").quantile(0.5)
    p = P.predict(12, "skipinit", alpha=0.3, width=64, batch=16)
    back = P.Profile.from_dict(json.loads(p.to_json()))
    for q in (0.05, 0.5, 0.95):
        for part in ("skip", "branch", "grad"):
            np.testing.assert_array_equal(getattr(back.quantile(q), part).log2_second_moment,
                                          getattr(p.quantile(q), part).log2_second_moment)


def test_batchnorm_zero_means_are_exact():
    # After BatchNorm and a weight layer the batch mean of every channel is exactly zero: the
    # branch's squared mean has no spread and no floor, and the relu_bn_conv stream keeps
    # the input's squared mean (not q / b).
    p = P.predict(10, "relu_bn_conv", width=64, batch=32, input_squared_mean=0.0)
    med, sig = p.spread.part("branch")
    assert np.all(np.isneginf(med.log2_squared_mean)) and np.all(sig.log2_squared_mean == 0)
    skip_m = p.spread.skip_median.log2_squared_mean
    assert np.allclose(skip_m, skip_m[0], atol=1e-9)


def _measured_std(scheme, depth, width, seeds, **params):
    torch.manual_seed(0)
    out = []
    for s in range(seeds):
        torch.manual_seed(s)
        model = nets.residual_mlp(depth, width=width, scheme=scheme, **params)
        x = torch.randn(width, width, generator=torch.Generator().manual_seed(500 + s))
        m = P.measure(model, x, backward=False, progress=False)
        out.append(m.skip.log2_second_moment * math.log(2))
    return np.std(np.stack(out), axis=0, ddof=1)


@pytest.mark.parametrize("scheme", ["batchnorm", "none", "layernorm"])
def test_predicted_spread_of_the_second_moment_matches_networks(scheme):
    depth, width, seeds = 8, 64, 48
    std = _measured_std(scheme, depth, width, seeds)
    p = P.predict(depth, scheme, width=width, batch=width)
    sig = p.spread.skip_sigma.log2_second_moment * math.log(2)
    # Positions 2..depth (the input's own spread is tiny and dominated by rounding). The
    # sample sd of 48 seeds has relative standard error 1/sqrt(2 x 47) = 10%; the theory is
    # leading order in 1/n (corrections ~ depth / n = 12%). 40% is 3 standard errors plus that.
    ratio = std[2:] / sig[2:]
    assert np.all((ratio > 1 / 1.4) & (ratio < 1.4)), ratio


def test_compare_centres_on_the_predicted_median_and_uses_its_band():
    model = lambda: nets.residual_mlp(30, width=128, scheme="batchnorm")  # noqa: E731
    ch = P.check(model, (128, 128), seeds=3, progress=False, diagnosis=False)
    assert ch.theory.spread is not None and ch.theory.spread.batch == 128
    assert ch.ok, ch.table()
    rows = [r for r in ch.comparison.rows if r.part == "skip" and r.quantity == "second_moment"]
    old = P.compare(P.predict(**{k: v for k, v in ch.predict_kwargs.items()
                                 if k not in ("width", "batch")}),
                    ch.measured)
    # Centred on the predicted median (not on the theory), sized by the predicted sigma:
    # band = log(1 + 5%) + z 1.25 sigma / sqrt(3), z the Bonferroni quantile of compare.
    sig = ch.theory.spread.skip_sigma.log2_second_moment * math.log(2)
    from scipy.stats import norm
    from propagation.comparison import SPREAD_TOLERANCE
    z = norm.isf(0.01 / (2 * 4 * (2 * 30 + 1)))  # compare: 4 quantities x (2 D + 1) checks
    for r in rows:
        band = math.log1p(SPREAD_TOLERANCE["second_moment"]) + z * 1.2533 * sig[r.block] / math.sqrt(3)
        assert abs(r.band - band) < 1e-9
    # The gradient band of the old 7/n rule (7/n per layer x share^2, plus 25%) was too wide
    # to catch a 2x error near the input; the predicted one is narrower there.
    g_new = [r for r in ch.comparison.rows if r.part == "grad"][0].band
    g_old = [r for r in old.rows if r.part == "grad"][0].band
    assert g_new < g_old
    med = (ch.theory.spread.skip_median.log2_second_moment
           - ch.theory.skip.log2_second_moment) * math.log(2)
    assert all(abs(r.centre - med[r.block]) < 1e-12 for r in rows)
    assert np.all(med[1:] < 0) and np.allclose(med[1:], -0.5 * sig[1:] ** 2, atol=1e-3)


def test_a_ten_percent_branch_gain_fails_the_check():
    def build():
        model = nets.residual_mlp(100, width=256, scheme="batchnorm")
        with torch.no_grad():
            for block in model.blocks:
                [m for m in block.branch if isinstance(m, torch.nn.Linear)][-1].weight.mul_(1.1)
        return model
    ch = P.check(build, (256, 256), seeds=3, theory={"scheme": "batchnorm"}, progress=False,
                 diagnosis=False)
    assert not ch.ok


def test_compare_checks_the_spread_over_many_seeds():
    # 24 seeds of a width-64 LayerNorm MLP: against its own finite-width theory the spread
    # rows pass; against the theory of a width-1024 network (sigma 4x too small) they fail.
    build = lambda: nets.residual_mlp(6, width=64, scheme="layernorm")  # noqa: E731
    ch = P.check(build, (64, 64), seeds=24, progress=False, diagnosis=False,
                 quantities=("second_moment", "squared_mean", "variance"))
    rows = [r for r in ch.comparison.rows if r.part.startswith("spread:")]
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
    narrow = P.predict(**{**ch.predict_kwargs, "width": 1024})
    with pytest.warns(RuntimeWarning, match="spread is for width 1024"):
        cmp = P.compare(narrow, ch.measured,
                        quantities=("second_moment", "squared_mean", "variance"))
    bad = [r for r in cmp.rows if r.part.startswith("spread:") and not r.ok]
    assert len(bad) > 0


def test_the_derivations_hold_and_match_the_constants():
    # derivations/finite_width.py raises if a count, a truncated moment or the Wishart
    # covariance differs from its derivation; the kurtosis it derives is finite.py's.
    from derivations import finite_width
    records = {r.name: r for r in finite_width.derivations()}
    assert float(records["kurtosis of relu(z)"].expr) == pytest.approx(finite._RELU_KURTOSIS,
                                                                       rel=1e-15)
    # Fixed-norm rows raise two channels' product of ReLU means by 1/(2n): in q (relative to
    # q_in, E[relu]^2 = 1 / (2 pi)) that is what _ws_shift takes off, whatever else moves.
    import sympy as sp
    n = 100
    raised = float(records["fixed-norm rows: E[relu(w.x)]^2 / E_gauss[relu(g.x)]^2 - 1"].expr
                   .subs(sp.Symbol("n", positive=True), n))
    q_out = (1.0 - 1.0 / math.pi) / 2.0
    taken = -finite._ws_shift(0.0, 2.0, 1.0, 1.0, n)[0] * q_out
    assert taken == pytest.approx(raised / (2.0 * math.pi), rel=1e-12)


# --- realised Grams: the pair mode and the merge's cross term ------------------------------

@pytest.mark.parametrize("chain", ["linear", "relu-weight", "2x relu-weight"])
def test_merge_cross_term_counts_the_realised_gram_entries(chain):
    # y = x + f(x) for Gaussian x (b x n) and a fresh branch f: the q part of the cross term
    # 2 x.f / (n b) has variance 4 tr(K_x K_f) / (n b^2), and at b = n the b(b - 1) entries'
    # covariance (kappa) is as large as the mean Grams' part.
    from propagation.layers import Linear, ReLUWeight
    layers = {"linear": [Linear(1.0)], "relu-weight": [ReLUWeight(2.0)],
              "2x relu-weight": [ReLUWeight(2.0), ReLUWeight(2.0)]}[chain]
    n = b = 48
    draws = 2000
    gen = torch.Generator().manual_seed(7)
    y = []
    for _ in range(draws):
        x = torch.randn(b, n, generator=gen, dtype=torch.float64)
        h = x
        for layer in layers:
            if isinstance(layer, ReLUWeight):
                h = torch.relu(h)
            h = h @ (torch.randn(n, n, generator=gen, dtype=torch.float64) * math.sqrt(layer.gain2 / n))
        y.append(float((x * h).sum()) / (n * b))  # 2 x.f / (n b), relative to q_y = 2
    mc = np.var(y, ddof=1)
    e_f = 1.0
    for layer in layers:
        e_f = layer.forward(0.0, e_f, 0, finite.MATH)[1]
    pair, rest = finite._entry_factors(layers, 0.0, 1.0, 0)
    walker = finite._Walker(n, b, 1)
    # x's Gram: Gaussian channels of rho = 0, all of its entry noise in the pair mode (1).
    theory = walker.cross(-1.0, 1.0, -1.0, e_f, 1.0, kappa=pair * 1.0)[0, 0]
    without = walker.cross(-1.0, 1.0, -1.0, e_f, 1.0, kappa=0.0)[0, 0]
    # The sample variance of 2000 draws has relative standard error sqrt(2 / 1999) = 3.2%;
    # 4 of them (13%) plus 2% for the theory's next order in 1/n (measured 0-2% at n = 64
    # with 3000 draws). Without the entries' covariance the variance is 30-100% short.
    assert abs(mc / theory - 1) < 0.15, (mc, theory)
    assert mc / without > 1.25


def _stream_pair_mode(scheme, depth, width, seed, blocks):
    """n Var / v^2 of the double-centred Gram entries of each block's input (one network)."""
    torch.manual_seed(seed)
    model = nets.residual_mlp(depth, width=width, scheme=scheme)
    xs = []
    hooks = [blk.register_forward_hook(lambda m, i, o: xs.append(i[0].detach().double()))
             for blk in model.blocks]
    with torch.no_grad():
        model(torch.randn(width, width, generator=torch.Generator().manual_seed(900 + seed)))
    for h in hooks:
        h.remove()
    out = []
    for j in blocks:
        z = xs[j] - xs[j].mean(0)            # centre each channel over the batch
        K = z @ z.T / width                  # b x b, double centred
        off = K[~torch.eye(width, dtype=torch.bool)] / K.diagonal().mean()
        out.append(float(width * off.var()))
    return np.array(out)


@pytest.mark.parametrize("scheme", ["batchnorm", "layernorm", "nf_he"])
def test_the_pair_mode_of_a_deep_stream_matches_networks(scheme, monkeypatch):
    # A realised Gram's own entry noise compounds through the layers: 1 for Gaussian
    # channels, about 2 after ten BatchNorm blocks. The walk must carry it (the weight layers'
    # Wishart noise and the merges' cross terms depend on it).
    depth, width, seeds, blocks = 12, 128, 6, [1, 3, 6, 11]
    seen = {}
    merge_kappa = finite._merge_kappa

    def spy(block, plan, l, lq, e, kp):
        seen[l] = kp / e ** 2  # relative to the variance, as measured
        return merge_kappa(block, plan, l, lq, e, kp)
    monkeypatch.setattr(finite, "_merge_kappa", spy)
    P.predict(depth, scheme, width=width, batch=width, input_second_moment=1.0,
              input_squared_mean=0.0)
    theory = np.array([seen[j] for j in blocks])
    meas = np.stack([_stream_pair_mode(scheme, depth, width, s, blocks) for s in range(seeds)])
    se = meas.std(0, ddof=1) / math.sqrt(seeds)
    # 4 standard errors of the 6-seed mean (two-sided 4 sigma); the Gaussian-channel value
    # the walk assumed before (1) is many standard errors off from block 3 on.
    assert np.all(np.abs(meas.mean(0) - theory) <= 4 * se), (meas.mean(0), theory, se)


def test_gain_slope_is_the_normalisations_division():
    # A BatchNorm branch divides the gradient by the realised variance of the stream:
    # d ln(1 + chi) = -s d ln v, s the branch's share, v = q - c; a branch without
    # normalisation is positively homogeneous: no coupling.
    from propagation.predict import _setup
    for scheme, coupled in (("batchnorm", True), ("none", False), ("nf_he", False)):
        st = _setup(4, scheme, None, True, 2, 1.0, 0.0, None, 1.0, {})
        lq, e = 1.0, 0.7
        lg_skip = 2.0 * math.log2(st.block.skip_gain)
        slope = finite._gain_slope(st.block, st.plan, 0, lq, e, lg_skip)
        if not coupled:
            assert np.allclose(slope, 0.0, atol=1e-6), (scheme, slope)
            continue
        # Block 0 of a network whose input has q = 2^lq and 1 - rho = e.
        p = P.predict(4, scheme, input_second_moment=2.0, input_squared_mean=2.0 * 0.3)
        s = p.grad_branch_share[0]
        # d ln v = (dq/q - dc/q) / e; the slope is per unit of (dq/q, dc/q), in log2 units
        # of the gain: -s / (e ln 2) (1, -1). Finite differences: ~1e-9.
        assert np.allclose(slope, -s / (e * math.log(2)) * np.array([1.0, -1.0]), rtol=1e-4)


@pytest.mark.parametrize("scheme", ["batchnorm", "layernorm"])
def test_predicted_gradient_spread_matches_networks(scheme):
    # The gradient of a normalised network: each branch's share fluctuates with the
    # stream it normalises (the forward pass's own spread), and the merge's cross term has
    # a part every input shares (tr J / n). Without them the measured spread is 1.4-2.2x
    # the prediction here.
    depth, width, seeds = 20, 128, 48
    out = []
    for s in range(seeds):
        torch.manual_seed(s)
        model = nets.residual_mlp(depth, width=width, scheme=scheme)
        x = torch.randn(width, width, generator=torch.Generator().manual_seed(500 + s))
        out.append(P.measure(model, x, progress=False).grad.log2_second_moment * math.log(2))
    std = np.std(np.stack(out), axis=0, ddof=1)
    p = P.predict(depth, scheme, width=width, batch=width)
    sig = p.spread.grad_sigma.log2_second_moment * math.log(2)
    ok = p.spread.valid_grad & (sig > 0)
    # The sample sd of 48 seeds has relative standard error 1/sqrt(2 x 47) = 10%; 3 of them
    # plus the theory's next order (depth / width = 16%) gives 1.45.
    ratio = std[ok] / sig[ok]
    assert ok.sum() >= depth // 2 and np.all((ratio > 1 / 1.45) & (ratio < 1.45)), ratio


@pytest.mark.parametrize("mixes", [0, 2])
def test_a_transposed_weight_layers_noise_grows_with_the_gradients_gram(mixes):
    # |W^T g|^2 over b gradients: relative variance 2/(n b) + 2 kappa_g / n^2, kappa_g the
    # entry noise of the gradients' Gram (1 for i.i.d. Gaussian gradients; each further
    # random mixing adds 1). The walk counts 2 kappa_g / n^2 per weight layer.
    n = b = 48
    draws = 3000
    gen = torch.Generator().manual_seed(11)
    ratios = []
    for _ in range(draws):
        g = torch.randn(b, n, generator=gen, dtype=torch.float64)
        for _ in range(mixes):
            g = g @ torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
        w = torch.randn(n, n, generator=gen, dtype=torch.float64) * math.sqrt(2.0 / n)
        ratios.append(float((g @ w.T).pow(2).sum() / g.pow(2).sum()))
    r = np.asarray(ratios)
    measured = r.var(ddof=1) / r.mean() ** 2
    kappa = 1.0 + mixes
    theory = 2.0 / (n * b) + 2.0 * kappa / n ** 2
    # Sample variance of 3000 draws: relative standard error sqrt(2 / 2999) = 2.6%; 4 of
    # them plus 5% for the next order in 1/n (the mixed gradients' Gram is not exactly
    # Gaussian: measured 3-6% above at n = 64) is 15%.
    assert abs(measured / theory - 1) < 0.15, (measured, theory)
    # The walk's own count for one block of two weight layers read out directly (kappa 1).
    own_w, kappa_y = finite._gradient_pair_walk([[("relu", 0.0), ("weight",)] * 2], [0.5], [0.5], n)
    assert kappa_y[0] == 1.0
    # Backwards: the last weight sees kappa 1, then +1 and a mask at rho = 0 (d = 1/2,
    # 4 P2 (1 - P2) = 3/4): 2/4 + 3/4 = 1.25 at the first weight.
    assert own_w[0] == pytest.approx(2.0 * (1.0 + 1.25) / n ** 2)


# --- each input's own deviation (the row mode) ----------------------------------------------

def test_the_relu_row_map_is_the_derived_one():
    # At rho = 0 the quadrature reproduces derivations/finite_width.py's closed forms (the
    # g grid's trapezoid rule is exact to ~1e-12 here; 1e-6 leaves room); at any rho a
    # relative size passes with slope 1: positive homogeneity, exactly, whatever the split
    # of a scaled input into (a, m, u) = (2 d, 0, rho d).
    B, R = finite._relu_row(0.0)
    assert B[0] == pytest.approx([1.0, 4.0 / math.sqrt(2.0 * math.pi), 0.0], abs=1e-6)
    assert B[1, :2] == pytest.approx([1.0 / (2.0 * math.sqrt(math.pi)), math.sqrt(0.5)], abs=1e-6)
    assert R[0, 0] == pytest.approx(3.0 - 8.0 / math.pi, abs=1e-6)
    for rho in (0.2, 0.5, 0.8):
        B, _ = finite._relu_row(rho)
        assert float(B[0] @ np.array([2.0, 0.0, rho])) == pytest.approx(2.0, abs=1e-6)


def _block_inputs(scheme, depth, width, seed, **params):
    """Every block input of one residual MLP (seeded weights and inputs), then its output."""
    torch.manual_seed(seed)
    model = nets.residual_mlp(depth, width=width, scheme=scheme, **params)
    xs = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().double()))
    x = torch.randn(width, width, generator=torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        xs.append(model(x).double())
    return xs


def _row_stats(scheme, depth, width, seed, **params):
    """n Var[a_i], n Var[m_i], n Cov[a_i, m_i] of every block input of one network."""
    out = []
    for t in _block_inputs(scheme, depth, width, seed, **params)[:-1]:
        q = (t ** 2).mean()
        a = (t ** 2).mean(1) / q - 1.0
        m = t.mean(1) / q.sqrt()
        a, m = a - a.mean(), m - m.mean()
        out.append([width * float((a * a).mean()), width * float((m * m).mean()),
                    width * float((a * m).mean())])
    return np.array(out)


@pytest.mark.parametrize("scheme", ["batchnorm", "none", "layernorm"])
def test_each_inputs_own_deviation_matches_networks(scheme):
    # The spread of the inputs' own second moments grows block by block (merges' cross
    # terms, and each branch's scale following its input's ReLU mass, which a shift of the
    # input's channel mean moves: 1.596 per unit). At block 5 (width 128, 24 seeds) the
    # walk's (a, m) covariance must match the networks'. Tolerance: a variance estimated
    # from b = 128 inputs has relative standard error sqrt(2 / b) = 0.125 per seed, 0.026
    # over 24 seeds; 4 of those (10%), and 0.1 absolute for the covariance (its own
    # standard error is ~0.02). Without the channel mean's share the `none` net's spread
    # comes out 30% low (13.5 against 19.5).
    from propagation.predict import _setup
    depth, width, seeds = 6, 128, 24
    meas = np.mean([_row_stats(scheme, depth, width, s) for s in range(seeds)], axis=0)
    st = _setup(depth, scheme, None, True, 2, 1.0, 0.0, None, 1.0, {})
    rows = []
    finite.spread(st.block, st.plan, st.q0, st.m0, width, width, _inputs=rows)
    theory = np.array([[r[0, 0], r[1, 1], r[0, 1]] for r, *_ in rows])
    assert theory[-1, 0] == pytest.approx(meas[-1, 0], rel=0.10), (theory[-1], meas[-1])
    assert theory[-1, 1] == pytest.approx(meas[-1, 1], rel=0.10), (theory[-1], meas[-1])
    assert abs(theory[-1, 2] - meas[-1, 2]) <= 0.1 + 0.1 * abs(meas[-1, 2]), (theory[-1], meas[-1])


def test_the_row_mode_moves_the_batchnorm_branch_mean():
    # In a BatchNorm stream the inputs' sizes drift apart (n Var 2 -> ~30 over 100 blocks),
    # and a ReLU reading inputs of unequal sizes has a smaller channel mean: the branch's
    # channel variance sits above the infinite-width value by ~2.5/n. Measured over blocks
    # 10-29 of a width-128 net (32 seeds), the mean of ln v must be within 3 standard errors
    # of the predicted median, and more than 3 from the infinite-width mean (so that the
    # effect is resolved and the test can fail).
    depth, width, seeds = 30, 128, 32
    th = P.predict(depth, "batchnorm", width=width, batch=width, input_second_moment=1.0,
                   input_squared_mean=0.0)
    blocks = slice(10, 30)
    pred = float(np.mean(th.quantile(0.5).branch.log2_variance[blocks])) * math.log(2)
    inf = float(np.mean(th.branch.log2_variance[blocks])) * math.log(2)
    vals = []
    for s in range(seeds):
        torch.manual_seed(s)
        model = nets.residual_mlp(depth, width=width, scheme="batchnorm")
        x = torch.randn(width, width, generator=torch.Generator().manual_seed(10_000 + s))
        m = P.measure(model, x, progress=False)
        vals.append(float(np.mean(m.branch.log2_variance[blocks])) * math.log(2))
    vals = np.array(vals)
    se = vals.std(ddof=1) / math.sqrt(seeds)
    assert abs(vals.mean() - pred) <= 3 * se, (vals.mean(), pred, inf, se)
    assert abs(vals.mean() - inf) > 3 * se, (vals.mean(), pred, inf, se)


def _channel_mean_stats(scheme, depth, width, seed, **params):
    """Per block input: the channel means' mean over the channels over sqrt(q), and ln v."""
    out = []
    for t in _block_inputs(scheme, depth, width, seed, **params):
        q, mean = (t ** 2).mean(), t.mean(0)
        out.append([float(mean.mean() / q.sqrt()), math.log(float(q - (mean ** 2).mean()))])
    return np.array(out)


@pytest.mark.parametrize("scheme, params", [("nf_he", {}), ("skipinit", {"alpha": 0.2})])
def test_the_channel_means_common_part_drives_the_unnormalised_spread(scheme, params):
    # Each weight layer draws its output's channel means (its mean row times the input's
    # batch mean); their mean over the channels persists along an unnormalised stream, and
    # every later ReLU reads it as a shift of all inputs (its mass moves by 1.596 per unit):
    # the stream's channel variance then drifts coherently from block to block. The walk
    # must carry both: (1) the spread of that mean (over 48 seeds its sd is estimated to
    # 1 / sqrt(2 x 47) = 10%: tolerance 30%, 3 standard errors), (2) the spread of ln v at
    # the last block (the same 30%). Without the channel means' form the predicted sd of
    # ln v is 0.61 (skipinit) and 0.71 (nf_he) of the measured: outside the tolerance.
    from propagation.predict import _setup
    depth, width, seeds = 30, 128, 48
    meas = np.stack([_channel_mean_stats(scheme, depth, width, s, **params) for s in range(seeds)])
    st = _setup(depth, scheme, None, True, 2, 1.0, 0.0, None, 1.0, params)
    rows = []
    finite.spread(st.block, st.plan, st.q0, st.m0, width, width, _inputs=rows)
    mu_sd = np.array([math.sqrt(cx[2, 2]) for _, cx, _ in rows])
    for blk in (10, 20, 29):
        sd = meas[:, blk, 0].std(ddof=1)
        assert sd == pytest.approx(mu_sd[blk], rel=0.3), (blk, sd, mu_sd[blk])
    th = P.predict(depth, scheme, width=width, batch=width, input_second_moment=1.0,
                   input_squared_mean=0.0, **params)
    sig = th.spread.skip_sigma.log2_variance[depth] * math.log(2)
    assert meas[:, depth, 1].std(ddof=1) == pytest.approx(sig, rel=0.3), (meas[:, depth, 1].std(), sig)


# --- realised Grams in every mode: the channel variance near rho = 1 ----------------------

@pytest.mark.parametrize("rho", [0.5, 0.99])
def test_a_realised_gram_enters_all_three_traces(rho):
    # A weight layer reading a realised Gram K (Gaussian channels, n_in of them): its (Y, Z)
    # covariance is 2 (tr(AKAK), tr(AKBK), tr(BKBK)), averaged over K. The entries' noise
    # enters all three; adding it to Var Y alone (as before) gave the channel variance a
    # relative noise of 4 rho / (1 - rho)^2 per layer, which exploded along post-LN streams.
    b, n_in, draws = 16, 32, 4000
    gen = np.random.default_rng(3)
    L = np.linalg.cholesky((1 - rho) * np.eye(b) + rho * np.ones((b, b)))
    A, B, C = np.eye(b) / b, np.ones((b, b)) / b ** 2, np.eye(b) - np.ones((b, b)) / b
    s = []
    for _ in range(draws):
        X = L @ gen.standard_normal((b, n_in))
        K = X @ X.T / n_in
        s.append([2 * np.trace(A @ K @ A @ K), 2 * np.trace(A @ K @ B @ K), 2 * np.trace(B @ K @ B @ K),
                  2 * np.trace(C @ K @ C @ K) / b ** 2 / (1 - rho) ** 2])
    s = np.array(s)
    mc, se = s.mean(0), s.std(0) / math.sqrt(draws)
    w = finite._wishart(rho, b, n_in)
    theory = [w[0, 0], w[0, 1], w[1, 1], (w[0, 0] - 2 * w[0, 1] + w[1, 1]) / (1 - rho) ** 2]
    # The closed form is exact for Gaussian channels: 5 standard errors of the Monte Carlo
    # mean (a 1-in-10^6 miss for a normal estimate).
    assert np.all(np.abs(mc - theory) <= 5 * se), (mc, theory, se)


def test_the_scaled_ws_row_map_is_derived_and_matches_a_layer():
    # Scaled WS reads each input's ReLU output less its own channel mean: a -> (pi a -
    # 2 sqrt(pi) m) / (pi - 1). The walk's n Var[a_i] after one ReLU + Scaled-WS layer on
    # Gaussian channels must match the layer's. Tolerance: n Var over b = 128 inputs has
    # relative standard error sqrt(2 / b) = 12.5% per draw, 1.8% over 48 draws; 4 of those
    # (7%) plus 1% for the walk's own O(1/n). Taking Scaled WS as a plain weight layer
    # predicts 7.0 at rho = 0, 12% above.
    from derivations import finite_width
    from propagation.layers import ReLUScaledWS
    want_a, want_u = finite_width.scaled_ws_row_mode().expr
    import sympy as sp
    a, m, u = sp.symbols("a m u")
    for row, expr in ((0, want_a), (2, want_u)):
        coeffs = [float(expr.diff(v)) for v in (a, m, u)]
        assert finite._WS_ROW[row] == pytest.approx(coeffs, abs=1e-12)
    n = b = 128
    gen = torch.Generator().manual_seed(11)
    for rho in (0.0, 0.5):
        got = []
        for _ in range(48):
            g = torch.randn(1, n, generator=gen, dtype=torch.float64)
            e = torch.randn(b, n, generator=gen, dtype=torch.float64)
            x = math.sqrt(rho) * g + math.sqrt(1 - rho) * e
            W = torch.randn(n, n, generator=gen, dtype=torch.float64)
            W = W - W.mean(1, keepdim=True)
            y = torch.relu(x) @ (W / W.norm(dim=1, keepdim=True)).T
            q = (y ** 2).mean()
            got.append(n * float(((y ** 2).mean(1) / q).var()))
        layer = ReLUScaledWS()
        e_o = layer.forward(0.0, 1.0 - rho, 0, finite.MATH)[1]
        A, F = finite._row_after(layer, np.eye(3), np.zeros((3, 3)), 1.0 - rho, e_o)
        theory = float((A @ finite._row_gauss(rho) @ A.T + F)[0, 0])
        assert np.mean(got) == pytest.approx(theory, rel=0.08), (rho, np.mean(got), theory)


def _measured_over_seeds(scheme, depth, width, seeds, part, quantity):
    """log2 of one statistic of a residual MLP over seeded draws (weights and inputs):
    (seeds, positions)."""
    vals = []
    for s in range(seeds):
        torch.manual_seed(s)
        model = nets.residual_mlp(depth, width=width, scheme=scheme)
        x = torch.randn(width, width, generator=torch.Generator().manual_seed(10_000 + s))
        vals.append(getattr(getattr(P.measure(model, x, progress=False), part), f"log2_{quantity}"))
    return np.array(vals)


def test_the_channel_variance_of_a_post_ln_stream_spreads_as_networks_do():
    # Along a post-LN stream rho -> 1 and the channel variance is a small difference: its
    # log spreads like a random walk, ~0.75 nats by block 30 at width 64. Before the
    # realised Gram's noise entered all three traces, the predicted spread grew
    # exponentially (2.1 nats at block 30, 1.75x the measured at block 20). Tolerance: the sd
    # of 32 seeds has relative standard error 1 / sqrt(2 * 31) = 12.7%; two of them (25%).
    depth, width, seeds = 30, 64, 32
    vals = _measured_over_seeds("postnorm", depth, width, seeds, "skip", "variance")
    sd = np.std(vals, axis=0, ddof=1) * math.log(2)
    th = P.predict(depth, "postnorm", width=width, batch=width, input_second_moment=1.0,
                   input_squared_mean=0.0)
    sig = th.spread.skip_sigma.log2_variance * math.log(2)
    for blk in (10, 20, 30):
        assert sd[blk] == pytest.approx(sig[blk], rel=0.25), (blk, sd[blk], sig[blk])


def test_a_relu_scaled_ws_layer_spreads_as_the_walk_says():
    # One ReLU + Scaled-WS layer on Gaussian data (rho = 0, n = b = 64): the spread of ln q
    # over draws. The walk's three parts are the ReLU output less its mean over everything
    # (what zero-sum rows read; scaling the plain ReLU's residual by (1 - 1/pi)^-2 instead
    # gave 1.9x the measured variance), the realised Gram's Wishart noise, and the fixed
    # row norm, which takes each channel's scale fluctuation out (without it, 1.26x).
    # Tolerance: the variance of 2000 draws has relative standard error sqrt(2 / 1999) =
    # 3.2%; four of them (13%) and 2% for the walk's next order in 1/n.
    from propagation.layers import ReLUScaledWS
    n = b = 64
    gen = torch.Generator().manual_seed(5)
    lq = []
    for _ in range(2000):
        x = torch.randn(b, n, generator=gen, dtype=torch.float64)
        W = torch.randn(n, n, generator=gen, dtype=torch.float64)
        W = W - W.mean(1, keepdim=True)
        y = torch.relu(x) @ (W / W.norm(dim=1, keepdim=True)).T
        lq.append(math.log(float((y ** 2).mean())))
    walker = finite._Walker(n, b, 1)
    cx = np.zeros((3, 3))
    cx[:2, :2] = finite._noise(0.0, b, "wishart") / n
    walker.kp, walker.row_x = 1.0, finite._row_gauss(0.0)
    out, _, _ = walker.layer(ReLUScaledWS(), finite._Form({"x": np.eye(2, 3)}, np.zeros(2)), 0.0, 1.0, 0, cx)
    assert np.var(lq, ddof=1) == pytest.approx(out.cov(cx)[0, 0], rel=0.15)


@pytest.mark.parametrize("before", ["data", "gaussian", "scaled_ws"])
def test_the_scaled_ws_mean_shift_matches_one_layer(before):
    # A ReLU + Scaled-WS layer reads the ReLU output less each input's own channel mean:
    # its correlation at rho = 0 moves by +0.234 / n after a Gaussian weight layer (the
    # input's realised Gram beyond a draw), by nothing on data (a draw) and by nothing after
    # a Scaled-WS layer, whose fixed-norm rows raise E[relu(w.x)] by 1/(4n) and take q and c
    # down by 0.234 / n each. Tolerance: 5 standard errors of the Monte Carlo means (one in
    # 10^6 for normal estimates) plus 0.05 / n for the theory's next order.
    def standardised(n, gen):
        W = torch.randn(n, n, generator=gen, dtype=torch.float64)
        W = W - W.mean(1, keepdim=True)
        return W / W.norm(dim=1, keepdim=True)
    n = b = 64
    gen = torch.Generator().manual_seed(17)
    dq, drho = [], []
    for _ in range(3000):
        x = torch.randn(b, n, generator=gen, dtype=torch.float64)
        if before == "gaussian":
            x = x @ torch.randn(n, n, generator=gen, dtype=torch.float64).T / math.sqrt(n)
        elif before == "scaled_ws":
            x = torch.relu(x) @ standardised(n, gen).T * math.sqrt(2.0 / (1.0 - 1.0 / math.pi))
        y = torch.relu(x) @ standardised(n, gen).T
        G = y @ y.T / n
        q = float(G.diagonal().mean())
        dq.append(n * (q / (float((x ** 2).mean()) * (1.0 - 1.0 / math.pi) / 2.0) - 1.0))
        drho.append(n * float((G.sum() - G.diagonal().sum()) / (b * (b - 1))) / q)
    walker = finite._Walker(n, b, 1)
    walker.sphere = 1.0 if before == "scaled_ws" else 0.0
    # The ReLU's input Gram: a draw from data (Gaussian channels, its own pair and rows),
    # or a weight layer's output (the data's realised Gram plus its own draw).
    kp, tau = (1.0, 2.0) if before == "data" else (2.0, 4.0)
    shift = n * finite._ws_shift(0.0, tau, kp, walker.sphere, n)
    for got, want in ((dq, shift[0]), (drho, shift[1])):
        se = np.std(got) / math.sqrt(len(got))
        assert abs(np.mean(got) - want) <= 5 * se + 0.05, (before, np.mean(got), want, se)


def test_the_squared_mean_of_an_nf_stream_follows_its_median():
    # NF's Scaled-WS branches: their squared mean sits at the batch's own floor at block 1
    # and climbs 0.3-0.5 log2 by block 30, as the stream's realised Gram drifts from a draw
    # (measured at width 128 over 32 seeds). Before the Scaled-WS noise and mean shift,
    # the predicted median was 1.6 log2 low with a spread of 2.2 log2 (measured 0.3).
    # Tolerance: 4 standard errors (1.25 sigma / sqrt(32)) of the median at each of four
    # blocks, and the spread within 30% (3 standard errors of a 32-seed sd).
    depth, width, seeds = 30, 128, 32
    vals = _measured_over_seeds("nf", depth, width, seeds, "branch", "squared_mean")
    th = P.predict(depth, "nf", width=width, batch=width, input_second_moment=1.0,
                   input_squared_mean=0.0)
    med = th.quantile(0.5).branch.log2_squared_mean
    sig = th.spread.branch_sigma.log2_squared_mean
    for blk in (1, 10, 20, 29):
        se = 1.2533 * sig[blk] / math.sqrt(seeds)
        assert abs(np.median(vals[:, blk]) - med[blk]) <= 4 * se, (blk, np.median(vals[:, blk]), med[blk], se)
        assert vals[:, blk].std(ddof=1) == pytest.approx(sig[blk], rel=0.3)
