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
