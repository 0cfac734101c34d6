"""The finite-width spread of convolutional statistics (propagation/finite_positions.py): its
per-channel moments against Monte Carlo, its excess transfer, and its spread against
networks."""
import math

import numpy as np
import pytest
import torch

import propagation as P
from propagation import finite_positions as FP
from propagation import nets
from propagation.positions import Population


def _small_population(shape=(4, 4), batch=3):
    """A correlated (example, position) kernel: a batch after a conv, a ReLU and a conv
    (positions of one example correlated, examples through a weak common mean)."""
    pop = Population.iid(shape, batch, second_moment=1.0, squared_mean=0.02)
    return pop.conv(2.0).relu().conv(2.0)


def _channels(pop, draws, seed=0):
    """Monte Carlo channels: draws x (N P) Gaussian vectors with the population's full kernel."""
    K = pop.full().K
    n, p = K.shape[0], K.shape[1]
    K = K.reshape(n * p, n * p)
    L = np.linalg.cholesky(K + 1e-12 * np.eye(n * p))
    rng = np.random.default_rng(seed)
    return rng.standard_normal((draws, n * p)) @ L.T


def _mc_check(theory, x, neglected=0.0):
    """|theory - Monte Carlo| of a relative covariance matrix, within 5 standard errors of
    each Monte Carlo entry (sqrt(Var[(a - mean a)(b - mean b)] / N), relative); 5 keeps the
    entries of every case from a false alarm (two-sided: 6e-7 each). ``neglected``: the
    size of a term the theory leaves out, per entry."""
    mean = x.mean(0)
    rel = (x - mean) / mean
    mc = np.cov(rel.T)
    prod = rel[:, :, None] * rel[:, None, :]
    se = prod.std(0) / math.sqrt(len(x))
    assert np.all(np.abs(theory - mc) <= 5 * se + neglected + 1e-12), (theory, mc, se)


def test_a_gaussian_channel_s_moments_match_monte_carlo():
    pop = _small_population()
    y = _channels(pop, 200_000)
    S = y.shape[1]
    x = np.stack([(y ** 2).mean(1), y.mean(1) ** 2], axis=1)
    _mc_check(FP._gaussian_cov(pop), x)
    assert abs(x[:, 0].mean() / pop.q - 1) < 0.01 and abs(x[:, 1].mean() / pop.m - 1) < 0.02
    assert S == 48


@pytest.mark.parametrize("common_mean", [False, True])
def test_a_relu_s_joint_moments_match_monte_carlo(common_mean):
    # The ReLU's input must have no channel-mean function: a conv output is Gaussian. Its
    # output's squared mean is linearised around the ReLU mean (module docstring): exact to
    # leading order where the input's channel mean is a small share (a conv of independent
    # inputs, m / q = 0.004 here); with a large one (a conv of a ReLU output, m / q = 0.27)
    # the channel means of the output are skewed and only the other entries are checked.
    pop = Population.iid((8, 8), 4)
    pop = pop.conv(2.0).relu().conv(2.0) if common_mean else pop.conv(2.0)
    y = _channels(pop, 60_000, seed=1)
    r = np.maximum(y, 0.0)
    x = np.stack([(y ** 2).mean(1), y.mean(1) ** 2, (r ** 2).mean(1), r.mean(1) ** 2], axis=1)
    keep = slice(0, 3) if common_mean else slice(0, 4)
    C = FP._relu_pass(pop)[0]
    # The linearised m_out leaves out Cov(Z, d^2) with d = ybar - E ybar; d's part linear in
    # the input is xbar / 2 (Stein), so that term is Cov(Z, m_in) / 4 in absolute units:
    # C[Z, m_in] m_in / (4 m_out) relative (0.013 for m_in itself here, 5 standard errors
    # are 0.011).
    m_in, m_out = pop.m, pop.relu().m
    neglected = np.zeros((4, 4))
    neglected[:, 3] = neglected[3, :] = np.abs(C[:, 1]) * m_in / (4.0 * m_out)
    _mc_check(C[keep, keep], x[:, keep], neglected[keep, keep])


def test_white_excess_through_a_circular_conv_is_one_over_taps():
    # With circular padding every tap is in bounds: a white input's excess reaches the output
    # divided by the taps, (gain2 / T)^2 T q^2 / (gain2 q)^2 = 1 / T.
    pop = Population.iid((6, 6), 2)
    spec = {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
            "mode": "circular"}
    out = pop.conv(2.0, mode="circular")
    assert FP._tap_transfer(pop, out, spec, 2.0) == pytest.approx(1 / 9, rel=1e-12)


def test_the_realised_excess_adds_to_a_conv_s_noise():
    # A conv reading C i.i.d. Gaussian channels (excess nu = 1 / C): its output's squared
    # entries given the input are r2_pop + nu tau on average (tau as above, 1/9 in the
    # interior), which is what makes the next layer's spread (here for C = 2 channels, 8
    # examples on 8 x 8 maps: 2 tau / C of q's relative variance, ~ 10x r2_pop).
    rng = np.random.default_rng(0)
    n_ex, c, h = 8, 2, 8
    r2 = []
    for _ in range(200):
        x = torch.from_numpy(rng.standard_normal((n_ex, c, h, h)))
        z = torch.nn.functional.unfold(x, 3, padding=1).permute(0, 2, 1).reshape(-1, c * 9)
        G = z.T @ z
        r2.append(float((G * G).sum() / torch.trace(G) ** 2))
    pop = Population.iid((h, h), n_ex)
    out = pop.conv(1.0)
    spec = {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
            "mode": "zeros"}
    pred = FP._gaussian_cov(out)[0, 0] / 2 + FP._tap_transfer(pop, out, spec, 1.0) / c
    # 200 draws: the mean's standard error is sd / sqrt(200); 5 of them, and 3% for the
    # leading-order excess (its own 1/(C T) corrections: the diagonal's 2 q^2 / C, ~ 1/S).
    se = np.std(r2) / math.sqrt(len(r2))
    assert abs(np.mean(r2) - pred) <= 5 * se + 0.03 * pred


def _bn_conv(width=16, depth=4):
    return nets.resnet_v2(stages=(depth,), width=width, scheme="batchnorm", block="basic",
                          num_classes=None)


def test_predict_returns_the_spread_of_q_and_m_but_not_v():
    model = _bn_conv()
    geo = nets.conv_geometry(model, (4, 3, 8, 8))
    th = P.predict(**model.theory, positions=geo, width=16)
    assert th.spread is not None and th.spread.batch == 4
    med, sig = th.spread.part("branch")
    assert np.all(sig.log2_second_moment > 0) and np.all(np.isnan(sig.log2_variance))
    assert np.all(th.spread.valid_branch) and not np.any(th.spread.valid_grad)
    # The median sits sigma^2 / 2 below the mean (log-normal), in log2 units.
    s = sig.log2_second_moment * math.log(2)
    assert np.allclose(med.log2_second_moment,
                       th.branch.log2_second_moment - 0.5 * s ** 2 / math.log(2))
    q = th.quantile(0.95).branch.log2_second_moment
    assert np.all(q > th.branch.log2_second_moment)
    with pytest.raises(TypeError, match="batch"):
        P.predict(**model.theory, positions=geo, width=16, batch=4)


def test_the_spread_of_a_batchnorm_conv_net_matches_networks():
    # 48 seeds of a 4-block BatchNorm ResNet (width 16, 4 images of 8 x 8), each against the
    # theory of its own block input: the measured sd of ln q and ln m per position against
    # the predicted sigma. The sd of 48 Gaussian draws has a relative standard error of
    # 1 / sqrt(2 * 47) = 0.10; over the 9 positions' root mean square about 0.035 if they
    # were independent (they are not: the stream's positions share draws), so 0.75-1.3 is
    # about 3 standard errors of one position around the leading-order theory.
    torch.manual_seed(0)
    shape = (4, 3, 8, 8)
    build = _bn_conv
    geo = nets.conv_geometry(build(), shape)
    meas = {"skip": [], "branch": []}
    sig = None
    for seed in range(48):
        torch.manual_seed(seed)
        model = build()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + seed))
        m = P.measure(model, x, progress=False, backward=False)
        th = P.predict(**model.theory, positions=geo, width=16,
                       **P.input_state(m, finite_batch=True))
        for part in meas:
            meas[part].append([getattr(getattr(m, part), f"log2_{q}")
                               - getattr(getattr(th, part), f"log2_{q}")
                               for q in ("second_moment", "squared_mean")])
        sig = th.spread
    for part in meas:
        a = np.asarray(meas[part]) * math.log(2)   # seeds x 2 x positions
        sd = a.std(axis=0, ddof=1)
        s = np.stack([getattr(sig.part(part)[1], f"log2_{q}")
                      for q in ("second_moment", "squared_mean")]) * math.log(2)
        ok = s > 0
        ratio = math.sqrt(np.mean(sd[ok] ** 2) / np.mean(s[ok] ** 2))
        assert 0.75 <= ratio <= 1.3, (part, ratio)


def test_check_uses_the_spread_on_conv_nets():
    check = P.check(lambda: _bn_conv(8, 2), (2, 3, 8, 8), seeds=1, progress=False,
                    diagnosis=False)
    assert check.theory.spread is not None and check.predict_kwargs["width"] == 8


@pytest.mark.parametrize("standardised", [False, True])
def test_a_conv_s_slope_in_closed_form_is_the_finite_difference(standardised):
    # A conv reading a ReLU output (a channel-mean function, which Scaled WS removes where
    # every tap is in bounds): the closed form against forward differences of the map
    # itself (step 1e-5: its truncation error is 1e-5 relative, so 1e-4 absolute).
    pop = Population.iid((6, 6), 3, second_moment=1.0, squared_mean=0.1).conv(2.0).relu()
    spec = {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1],
            "mode": "zeros"}
    args = {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1), "dilation": (1, 1)}

    def fwd(s):
        return s.conv(2.0, standardised=standardised, **args), None

    out = fwd(pop)[0]
    closed = FP._conv_jacobian(pop, out, spec, 2.0, standardised)
    numeric = FP._family(fwd, pop, out, homogeneous=True)
    assert np.allclose(closed, numeric, atol=1e-4), (closed, numeric)
