"""Exact zero padding (propagation.positions) against an independent infinite-width kernel.

tests/data/nngp_padding.json holds neural-tangents' NNGP kernels of residual ReLU conv nets
on 8x8 maps (zero, circular and pooled), made once by tests/data/nngp_padding.py with the
versions recorded in it (JAX does not install beside the pinned torch)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import propagation
from propagation import nets
from propagation.positions import PositionKernel, conv_taps, residual_relu_net

DATA = json.loads((Path(__file__).parent / "data" / "nngp_padding.json").read_text())
X = np.array(DATA["input_nhwc"]).transpose(0, 3, 1, 2)  # to PyTorch's (N, C, H, W)
NETS = {"same": ("zeros", ()), "circular": ("circular", ()), "pooled": ("zeros", (3,))}


@pytest.mark.parametrize("name", NETS)
def test_matches_the_neural_tangents_kernel(name):
    # Both sides are exact float64 sums of the same maps (a few thousand terms each):
    # rounding leaves ~1e-15 relative, seen 2e-15; 1e-9 is far inside the 1%.
    mode, pool = NETS[name]
    kernels = residual_relu_net(X, DATA["blocks"], mode, pool)
    for k, row in zip(kernels, DATA["networks"][name]["rows"]):
        assert k.q == pytest.approx(row["q"], rel=1e-9)
        assert k.m == pytest.approx(row["m"], rel=1e-9)
        np.testing.assert_allclose(k.q_per_position, np.array(row["q_per_position"]), rtol=1e-9)


def test_the_mean_padding_factor_drifts_where_positions_do_not():
    # The scheme theory's one mean factor per conv, from the same stem output: 30% low in q
    # by block 6 on 8x8 maps, which the exact kernel removes (issue 14, item 3).
    stem = PositionKernel.from_inputs(X).conv(1.0)
    fh, _ = nets._inbounds(8, 3, 1, 1)
    f = nets._padding_factor(fh, fh, False)
    p = propagation.predict(6, "none", input_second_moment=stem.q,
                            input_squared_mean=stem.m, padding_factors=[f, f])
    rows = DATA["networks"]["same"]["rows"]
    assert p.skip.second_moment[6] / rows[5]["q"] < 0.75
    # Circular padding loses nothing: there the mean factor is 1 and the scheme theory exact
    # (float64 recursion against the NNGP: 1e-9).
    stem_c = PositionKernel.from_inputs(X).conv(1.0, mode="circular")
    pc = propagation.predict(6, "none", input_second_moment=stem_c.q,
                             input_squared_mean=stem_c.m)
    rows_c = DATA["networks"]["circular"]["rows"]
    for l in range(6):
        assert pc.skip.second_moment[l + 1] == pytest.approx(rows_c[l]["q"], rel=1e-9)


@pytest.mark.parametrize("stride, padding, dilation, mode", [
    (1, 1, 1, "zeros"), (2, 1, 1, "zeros"), (2, 0, 1, "zeros"), (1, 2, 2, "zeros"),
    (1, 1, 1, "circular"), (2, 1, 1, "circular")])
def test_taps_read_positions_as_pytorch_does(stride, padding, dilation, mode):
    # S_t applied to an image equals F.conv2d with a one-hot kernel at tap t (exact: each
    # output is one input value or zero).
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(1, 1, 7, 6, generator=gen, dtype=torch.float64)
    (oh, ow), taps = conv_taps((7, 6), 3, stride, padding, dilation, mode)
    src = F.pad(img, (padding,) * 4, mode="circular") if mode == "circular" else img
    for t, S in enumerate(taps):
        w = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
        w.view(-1)[t] = 1.0
        out = F.conv2d(src, w, stride=stride, padding=0 if mode == "circular" else padding,
                       dilation=dilation)
        assert out.shape[-2:] == (oh, ow)
        np.testing.assert_array_equal(S @ img.reshape(-1).numpy(), out.reshape(-1).numpy())


@pytest.mark.slow  # 16 seeds of a 1024-channel conv: ~6 s
def test_a_wide_network_lands_on_the_kernel():
    # A real PyTorch net (strided conv, zero padding, ReLU, average pool) with 1024 channels,
    # averaged over 16 seeds: its second moment per position is the kernel's. One seed's q
    # at a position is a mean over 1024 channels of a squared Gaussian given the layer's
    # input: relative sd sqrt(2/1024) = 4.4% (measured 3.8%); the mean of 16 seeds has a
    # standard error of 1.1%, and 5% is 4.5 of them (the largest of 4 positions at 1%
    # false alarms is 3 standard errors; the finite-width bias is O(1/1024)).
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    k = (PositionKernel.from_inputs(x).conv(1.0, stride=2, padding=1).relu()
         .conv(2.0, padding=1).avg_pool(2))
    c = 1024
    qs = []
    for seed in range(16):
        torch.manual_seed(seed)
        w1 = torch.randn(c, 3, 3, 3, dtype=torch.float64) / (27 ** 0.5)
        w2 = torch.randn(c, c, 3, 3, dtype=torch.float64) * (2.0 / (9 * c)) ** 0.5
        y = F.conv2d(x, w1, stride=2, padding=1)
        y = F.avg_pool2d(F.conv2d(F.relu(y), w2, padding=1), 2)
        qs.append((y ** 2).mean(dim=(0, 1)).numpy())
    np.testing.assert_allclose(np.mean(qs, axis=0), k.q_per_position, rtol=0.05)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="mode"):
        conv_taps((8, 8), mode="reflect")
    with pytest.raises(ValueError, match="no output"):
        conv_taps((2, 2), kernel=5, padding=0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        PositionKernel.from_inputs(np.zeros((3, 8, 8)))


# --- the population form and predict(..., positions=...) ---------------------------------------

from propagation.positions import Population, tap_index  # noqa: E402


def _exchangeable(shape=(6, 5), batch=3):
    """A population after a stem, a ReLU and a conv: dense, non-uniform W and X."""
    return Population.iid(shape, batch, 1.3, 0.2).conv(1.0).relu().conv(2.0)


def _blocks(full):
    """(W, X) read off a full (N, P, N, P) kernel of exchangeable examples."""
    return full.K[0, :, 0, :], full.K[0, :, 1, :]


@pytest.mark.parametrize("args", [
    dict(), dict(stride=2), dict(stride=2, padding=0, kernel=1), dict(padding=2, dilation=2),
    dict(mode="circular"), dict(stride=2, mode="circular")])
def test_the_population_maps_are_the_full_kernels(args):
    # Population's conv (strided slices of the padded kernel), ReLU, scale and sum against
    # PositionKernel's dense tap matrices on the same exchangeable batch: the same float64
    # sums in another order, so agreement to rounding (1e-12 relative).
    pop = _exchangeable()
    out = (pop.relu().conv(2.0, **args) + pop.relu().conv(2.0, **args).scale(0.5)).relu()
    k = pop.full().relu().conv(2.0, **args)
    k = (k + k.scale(0.5)).relu()
    for a, b in zip((out.W, out.X), _blocks(k)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert out.q == pytest.approx(k.q, rel=1e-12) and out.m == pytest.approx(k.m, rel=1e-12)


def test_tap_index_reads_the_tap_matrices():
    for mode in ("zeros", "circular"):
        (oh, ow), taps = conv_taps((7, 6), 3, 2, 1, 1, mode)
        shape, index = tap_index((7, 6), 3, 2, 1, 1, mode)
        assert shape == (oh, ow)
        for S, i in zip(taps, index):
            ext = np.hstack([S, np.zeros((S.shape[0], 1))])
            ext[np.arange(len(i)), i] += ~S.any(axis=1)  # out of bounds: the extra column
            np.testing.assert_array_equal(ext.argmax(axis=1), i)


def test_batchnorm_centres_the_whole_batch():
    # BatchNorm over (examples, positions): the full kernel double-centred over every
    # (n, p) and divided by its mean diagonal; then q = 1 and the batch's squared mean is 0
    # exactly (rounding: 1e-12).
    pop = _exchangeable()
    out, v = pop.batchnorm()
    n, p = pop.batch, pop.W.shape[0]
    K = pop.full().K.reshape(n * p, n * p)
    C = np.eye(n * p) - 1.0 / (n * p)
    Kc = C @ K @ C
    assert v == pytest.approx(np.mean(np.diag(Kc)), rel=1e-12)
    W, X = _blocks(PositionKernel((Kc / v).reshape(n, p, n, p), pop.shape))
    np.testing.assert_allclose(out.W, W, atol=1e-12)
    np.testing.assert_allclose(out.X, X, atol=1e-12)
    assert out.q == pytest.approx(1.0) and abs(out.m) < 1e-12


@pytest.mark.slow  # 8 seeds of a 512-channel Scaled-WS conv: ~5 s
def test_scaled_ws_leaks_the_relu_mean_at_the_border():
    # A Scaled-WS conv after a ReLU: each row sums to zero over its fan-in, which removes
    # the ReLU's channel mean only where all 9 taps are in bounds; at a corner 4 of 9 are,
    # and W loses less of the mean there. Measured on 512 channels, 8 examples x 8 seeds,
    # averaged over the corners, the other border positions and the interior. Noise of a
    # group mean: the 3-channel input makes each example's ReLU input at a position a
    # 27-sample variance (sd 27%, ~14% after the conv's 4-9 taps), over 64 examples and 4+
    # positions <= 0.9%; the 512-channel weights add sqrt(2/512) = 6% per seed and position,
    # <= 1.1% over 8 seeds and 4 positions: 1.5% in all, and 5% is 3.3 of it. The leak to
    # resolve: the same conv without standardisation (He) differs by >10% at the corners.
    c = 512
    pop = Population.iid((8, 8), 8).conv(1.0).relu()
    ws, he = pop.conv(nets.WS_GAIN ** 2, standardised=True), pop.conv(nets.WS_GAIN ** 2)
    qs = []
    for seed in range(8):
        torch.manual_seed(seed)
        x = torch.randn((8, 3, 8, 8), generator=torch.Generator().manual_seed(100 + seed),
                        dtype=torch.float64)
        stem = torch.nn.Conv2d(3, c, 3, padding=1, bias=False).double()
        torch.nn.init.normal_(stem.weight, std=27 ** -0.5)
        conv = nets.WSConv2d(c, c, 3, padding=1).double()
        with torch.no_grad():
            qs.append((conv(F.relu(stem(x))) ** 2).mean(dim=(0, 1)).numpy().ravel())
    measured = np.mean(qs, axis=0)
    edge = np.zeros((8, 8), dtype=bool)
    edge[[0, -1], :] = edge[:, [0, -1]] = True
    corner = np.zeros((8, 8), dtype=bool)
    corner[np.ix_([0, -1], [0, -1])] = True
    for group in (corner, edge & ~corner, ~edge):
        g = group.ravel()
        assert measured[g].mean() == pytest.approx(np.diag(ws.W)[g].mean(), rel=0.05)
    g = corner.ravel()
    assert abs(np.diag(he.W)[g].mean() / np.diag(ws.W)[g].mean() - 1) > 0.1


def _geometry(depth, size=8, mode="zeros", projection_at=()):
    conv3 = {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
             "mode": mode}
    blocks = []
    for l in range(depth):
        proj = l in projection_at
        first = dict(conv3, stride=[2, 2]) if proj and l else conv3
        blocks.append({"branch": [first, conv3], "projection": [dict(
            conv3, kernel=[1, 1], padding=[0, 0], stride=first["stride"])] if proj else []})
    return {"input_shape": [4, 3, size, size], "stem": [dict(conv3, gain2=1.0)],
            "blocks": blocks}


@pytest.mark.parametrize("scheme, params", [
    ("none", {}), ("batchnorm", {}), ("skipinit", {"alpha": 0.3}), ("fixup", {}),
    ("nf", {}), ("nf_he", {}), ("layernorm", {}), ("postnorm", {}), ("sqrt_half", {}),
    ("relu_bn_conv", {})])
def test_circular_positions_reproduce_the_scheme_theory(scheme, params):
    # With circular padding every position is alike, so the position theory's second
    # moments and gradients must be the scheme theory's (the same maps, position by
    # position), projections and strides included. Its normalisations divide by the
    # variance of the batch as given, the scheme theory's by the infinite batch's; they
    # differ by the batch's share of the squared mean, mean(W) / N of the variance, so the
    # batch here is 10^6 examples (the population form costs the same at any batch): a
    # share below 1e-6 per normalisation, 12 of them, well inside 1e-5 log2.
    geo = dict(_geometry(6, mode="circular", projection_at=(0, 3)),
               input_shape=[10 ** 6, 3, 8, 8])
    pos = propagation.predict(6, scheme, stages=(3, 3), positions=geo, input_second_moment=1.7,
                              **params)
    ref = propagation.predict(6, scheme, stages=(3, 3), input_second_moment=1.7,
                              input_squared_mean=pos.input_squared_mean, **params)
    for part in ("skip", "branch", "grad"):
        np.testing.assert_allclose(getattr(pos, part).log2_second_moment,
                                   getattr(ref, part).log2_second_moment, atol=1e-5)


def test_zero_padding_moves_the_border_and_the_check_uses_it():
    # On 8x8 maps the position theory of a real `none` ResNet lands where the mean factor
    # does not (the test above this one's mirror, through predict and check).
    build = lambda: nets.resnet_v2(stages=(4,), width=16, scheme="none", block="basic",  # noqa: E731
                                   num_classes=None)
    check = propagation.check(build, (4, 3, 8, 8), seeds=1, progress=False, diagnosis=False)
    assert "positions" in check.predict_kwargs and "padding_factors" not in check.predict_kwargs
    geo = check.predict_kwargs["positions"]
    assert geo == nets.conv_geometry(build(), (4, 3, 8, 8))
    assert check.theory.meta["finite_batch"] == 4
    mean_factor = propagation.predict(4, "none", project_first=False,
                                      padding_factors=nets.padding_factors(build(), (4, 3, 8, 8)),
                                      input_second_moment=check.theory.input_second_moment)
    # 4 blocks at 8x8: the mean factor ends >10% below the exact kernel (30% by block 6).
    assert check.theory.skip.second_moment[-1] > 1.1 * mean_factor.skip.second_moment[-1]


def test_networks_without_a_position_map_fall_back_to_the_mean_factor():
    build = lambda: nets.resnet_v2(stages=(1,), width=8, scheme="none", block="basic",  # noqa: E731
                                   stem="imagenet", num_classes=None)
    with pytest.raises(ValueError, match="no position map"):
        nets.conv_geometry(build(), (2, 3, 16, 16))
    check = propagation.check(build, (2, 3, 16, 16), seeds=1, progress=False, diagnosis=False)
    assert "padding_factors" in check.predict_kwargs and "positions" not in check.predict_kwargs


def test_positions_take_no_mean_factor_or_batch():
    geo = _geometry(2)
    with pytest.raises(TypeError, match="positions"):
        propagation.predict(2, "none", project_first=False, positions=geo, padding_factors=[1, 1])
    with pytest.raises(TypeError, match="positions"):
        propagation.predict(2, "none", project_first=False, positions=geo, width=64, batch=4)
    with pytest.raises(ValueError, match="width"):
        propagation.predict(2, "none", project_first=False, positions=geo, width=0)
    with pytest.raises(ValueError, match="geometry has 2 blocks"):
        propagation.predict(3, "none", project_first=False, positions=geo)


def test_a_theory_that_does_not_fit_the_convolutions_falls_back():
    # Two stages (a strided projection at block 2) checked against a one-stage theory: the
    # position theory cannot place the projection, and check uses the mean factor, which
    # only pairs the branches' convs.
    build = lambda: nets.resnet_v2(stages=(2, 2), width=8, scheme="none", block="basic",  # noqa: E731
                                   num_classes=None)
    check = propagation.check(build, (2, 3, 8, 8), seeds=1, progress=False, diagnosis=False,
                              theory={"scheme": "none", "stages": [4], "project_first": False})
    assert "padding_factors" in check.predict_kwargs and "positions" not in check.predict_kwargs
    with pytest.raises(propagation.positions.GeometryError, match="projection"):
        propagation.predict(4, "none", stages=[4], project_first=False,
                            positions=nets.conv_geometry(build(), (2, 3, 8, 8)))
