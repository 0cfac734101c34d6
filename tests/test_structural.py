"""The structural theory: ``predict(model, inputs)`` from a model's own calls and weights.

1. The maps reproduce the scheme recursion: on every reference network, with weights of
   exactly their nominal scale, ``weights="law"`` and ``padding="mean"`` equal
   ``predict(**model.theory)``.
2. The theory of the model held agrees with measurement: reference networks, a ResNet
   initialised fan-out and fan-in, and the convolutional models of the zoo.
3. Quadrature, unsupported ops, and a model left as it came.
"""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import propagation
from propagation import nets, predict, zoo
from propagation.structural import (State, UnsupportedOpError, _elementwise, _relu,
                                    supported_ops)

needs_transformers = pytest.mark.skipif(not zoo.available(), reason="needs the zoo extra")

# The weights of a reference network, rescaled by exact_variance_, still carry float32
# rounding: each layer's scale is off by a relative ~1e-7 (a few roundings of 2^-24 in
# the rescale), and a profile multiplies at most 3 layers a block over 6 blocks plus a stem:
# 19 x 1e-7 < 2e-6 relative, i.e. 3e-6 in log2. Norm eps is set to 1e-20 (the scheme theory
# has none; torch refuses 0).
TOL_LOG2 = 3e-6
# Squared means below this share of the second moment are sums of rounding errors in both
# theories (a zero-mean input, 2^-40), not comparable values.
RESOLVED = 2.0 ** -30


def _no_eps(model):
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
            m.eps = 1e-20
    return model


def _zero_mean(x):
    return x - x.mean()  # no common mean: the scheme theory's input has none


def _assert_same(t, s, parts=("skip", "branch", "grad"), quantities=("second_moment",
                                                                      "squared_mean", "variance")):
    for part in parts:
        for q in quantities:
            if part == "grad" and q != "second_moment":
                continue
            a = getattr(getattr(t, part), f"log2_{q}")
            b = getattr(getattr(s, part), f"log2_{q}")
            if q == "squared_mean":
                with np.errstate(invalid="ignore"):
                    fa = a - getattr(t, part).log2_second_moment > math.log2(RESOLVED)
                    fb = b - getattr(s, part).log2_second_moment > math.log2(RESOLVED)
            else:
                fa, fb = np.isfinite(a), np.isfinite(b)
            np.testing.assert_array_equal(fa, fb, err_msg=f"{part} {q}")
            ok = fa & fb
            np.testing.assert_allclose(a[ok], b[ok], rtol=0, atol=TOL_LOG2, err_msg=f"{part} {q}")


@pytest.mark.parametrize("scheme", nets.supported_schemes())
def test_law_equals_the_scheme_theory_on_reference_mlps(scheme):
    torch.manual_seed(0)
    model = nets.exact_variance_(_no_eps(nets.residual_mlp(6, width=64, scheme=scheme)))
    x = _zero_mean(torch.randn(32, 64))
    theory = predict(model, x, weights="law")
    scheme_theory = predict(**model.theory, **propagation.input_state(theory))
    assert theory.depth == 6 and theory.source == "theory"
    _assert_same(theory, scheme_theory)


# GroupNorm(1, C), the conv networks' LayerNorm, keeps a share 1/C of the channel means that
# the scheme theory drops (README: finite-width corrections); Scaled-WS gradients through
# zero padding: the scheme applies its forward leak factor backwards too, which the
# measurement contradicts (test below).
_CONV_DIFFER = {"layernorm": ("skip", "branch", "grad"), "postnorm": ("skip", "branch", "grad"),
                "nf": ("grad",)}


@pytest.mark.parametrize("scheme", nets.supported_schemes())
def test_law_equals_the_scheme_theory_on_reference_convnets(scheme):
    torch.manual_seed(0)
    model = nets.exact_variance_(_no_eps(nets.resnet_v2((2, 2), width=16, scheme=scheme,
                                                        block="basic", num_classes=None)))
    x = _zero_mean(torch.randn(8, 3, 8, 8))
    theory = predict(model, x, weights="law", padding="mean")
    scheme_theory = predict(**model.theory, **propagation.input_state(theory),
                            padding_factors=nets.padding_factors(model, x.shape))
    parts = tuple(p for p in ("skip", "branch", "grad") if p not in _CONV_DIFFER.get(scheme, ()))
    _assert_same(theory, scheme_theory, parts)


def test_scaled_ws_gradients_through_padding_follow_the_measurement():
    # Where the two theories differ (nf conv gradients at 8x8), the structural one is closer.
    torch.manual_seed(0)
    models = [nets.resnet_v2((2, 2), width=64, scheme="nf", block="basic", num_classes=None,
                             alpha=0.2) for _ in range(4)]
    x = _zero_mean(torch.randn(32, 3, 8, 8))
    measured = propagation.measure(models, x, seeds=4)
    ours = predict(models[0], x, weights="law")
    scheme = predict(**models[0].theory, **propagation.input_state(ours),
                     padding_factors=nets.padding_factors(models[0], x.shape))
    g = measured.grad.log2_second_moment[:-1]
    assert (np.abs(ours.grad.log2_second_moment[:-1] - g).max()
            < np.abs(scheme.grad.log2_second_moment[:-1] - g).max())


@pytest.mark.parametrize("scheme", nets.supported_schemes())
def test_held_theory_passes_compare_on_reference_mlps(scheme):
    # The gate through this path: no theory dictionary, the model's own prediction.
    torch.manual_seed(1)
    model = nets.residual_mlp(10, width=128, scheme=scheme)
    x = torch.randn(64, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", propagation.OverflowToInfWarning)
        measured = propagation.measure(model, lambda s: torch.randn(64, 128,
                                       generator=torch.Generator().manual_seed(s)), seeds=3)
    assert propagation.compare(predict(model, x), measured).ok


def _reinit(model, mode):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
    return model


@pytest.mark.slow
def test_initialisation_changes_the_prediction_as_the_weights_say():
    # An unnormalised bottleneck ResNet (no norm hides the scale): fan-out init scales each
    # layer by fan_in / fan_out, so the two predictions differ, and each matches its own
    # measurement.
    x = torch.randn(32, 3, 16, 16)
    predicted = {}
    for mode in ("fan_in", "fan_out"):
        torch.manual_seed(0)
        model = _reinit(nets.resnet_v2((2, 2), width=16, scheme="none", num_classes=None), mode)
        measured = propagation.measure(model, lambda s: torch.randn(
            32, 3, 16, 16, generator=torch.Generator().manual_seed(s)), seeds=3)
        predicted[mode] = theory = predict(model, x)
        comparison = propagation.compare(theory, measured)
        assert comparison.ok, comparison.summary()
    gap = np.abs(predicted["fan_out"].branch.log2_second_moment
                 - predicted["fan_in"].branch.log2_second_moment)
    assert gap.max() > 1.0  # a factor 2 or more somewhere: the test can tell them apart


CONV_ZOO = ["resnet_basic", "resnet_bottleneck", "bit", "tv_resnet18", "tv_resnet50_zero_init",
            "efficientnet"]


@needs_transformers
@pytest.mark.slow
@pytest.mark.parametrize("name", CONV_ZOO)
def test_zoo_convnets_pass_compare(name):
    entry = zoo.entry(name)
    torch.manual_seed(0)
    model = entry.build()
    theory = predict(model, entry.inputs(0), channel_axis=entry.channel_axis)
    measured = propagation.measure(model, entry.inputs, seeds=3, channel_axis=entry.channel_axis)
    assert theory.names == measured.names
    # tv_resnet50_zero_init at width 8: the gradient through each stride-2 projection (1x1
    # conv + BatchNorm over 2x2 to 8x8 maps) is 9% above the theory per transition, three
    # transitions: a finite-size effect of its tiny stages (forward quantities agree).
    quantities = ("second_moment", "squared_mean", "variance") + (
        () if name == "tv_resnet50_zero_init" else ("grad",))
    comparison = propagation.compare(theory, measured, quantities=quantities)
    assert comparison.ok, comparison.table()


@needs_transformers
@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext", "mobilenet_v2"])
def test_zoo_convnets_at_a_resolvable_width(name):
    # At the zoo's sizes (ConvNeXt width 16, MobileNetV2 x0.35 at 32x32, down to 1x1 maps)
    # the finite-width spread exceeds compare's band; at width 64 / x1.0 on 64x64 it does not.
    from transformers import ConvNextConfig, ConvNextModel, MobileNetV2Config, MobileNetV2Model
    if name == "convnext":
        def build():
            return ConvNextModel(ConvNextConfig(hidden_sizes=[64, 128], depths=[2, 2],
                                                num_stages=2))
    else:
        def build():
            return MobileNetV2Model(MobileNetV2Config(image_size=64, depth_multiplier=1.0))
    torch.manual_seed(0)
    model = build()
    x = torch.randn(8, 3, 64, 64)
    measured = propagation.measure(model, lambda s: torch.randn(
        8, 3, 64, 64, generator=torch.Generator().manual_seed(s)), seeds=3)
    comparison = propagation.compare(predict(model, x), measured)
    assert comparison.ok, comparison.table()


# --- the maps ---------------------------------------------------------------------------------

def test_quadrature_matches_the_relu_closed_form():
    # The generic path (trapezoid in eps, Gauss-Hermite in mu) against kappa. The trapezoid's
    # error at ReLU's kink is O(h^2) with h = 1/256 (~1.5e-5 h^2-units of the kink's jump);
    # the midpoint rule for E f'^2 errs by at most h phi(0) / 2 = 5e-5 at the step.
    for q, v in [(1.0, 1.0), (2.0, 1.0), (1.0, 0.5)]:
        exact = _relu(State(q, v, 0.0))
        generic = _elementwise([(F.relu, (None,), {})], State(q, v, 0.0))
        np.testing.assert_allclose(generic[:3], exact[:3], rtol=2e-5)
        assert abs(generic[3] - 0.5) < 5e-5


def test_relu_with_a_common_mean_matches_direct_integration():
    from scipy import integrate
    from scipy.stats import norm
    s = State(1.0, 0.01, 0.3)  # a sharp inner scale: the hard case for a plain rule
    S, sig = math.sqrt(s.spread), math.sqrt(s.v)

    def inner_var(mu):
        t = mu / sig
        P, Q, ph = norm.cdf(t), norm.cdf(-t), norm.pdf(t)
        return s.v * (t * t * P * Q + P + t * ph * (Q - P) - ph * ph)
    ref = integrate.quad(lambda mu: norm.pdf(mu, s.nu, S) * inner_var(mu), -12, 12,
                         points=[0, -8 * sig, 8 * sig], limit=1000, epsabs=1e-18,
                         epsrel=1e-12)[0]
    q_ref = integrate.quad(lambda z: norm.pdf(z, s.nu, math.sqrt(s.q - s.nu ** 2))
                           * max(z, 0.0) ** 2, -20, 20, points=[0], epsabs=1e-15)[0]
    q, v, _, gain = _relu(s)
    # quad's own tolerance (1e-12) and Gauss-Legendre's (96 nodes on a smooth integrand)
    assert abs(v / ref - 1) < 1e-9 and abs(q / q_ref - 1) < 1e-9
    assert abs(gain - norm.cdf(0.3 / math.sqrt(1 - 0.09))) < 1e-12


def test_gelu_and_relu6_against_monte_carlo():
    # 4e6 Gaussian samples: the standard error of a second moment is sqrt(Var f^2 / N)
    # < 1e-3 relative; 5 standard errors bound the difference.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4_000_000, generator=gen, dtype=torch.float64) * 1.3
    for f, args, kw in [(F.gelu, (None,), {}), (F.hardtanh, (None, 0.0, 6.0), {}),
                        (F.silu, (None,), {})]:
        y = f(z, *args[1:], **kw)
        q, _, nu, _ = _elementwise([(f, args, kw)], State(1.69, 1.69, 0.0))
        se = float(y.pow(2).std()) / 2000.0
        assert abs(q - float(y.pow(2).mean())) < 5 * se
        assert abs(nu - float(y.mean())) < 5 * float(y.std()) / 2000.0


class _Sorted(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return x + torch.sort(self.lin(x), dim=-1).values


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(_Sorted(), _Sorted())
        self.norm = nn.BatchNorm1d(16)

    def forward(self, x):
        return self.norm(self.blocks(x))


def test_unsupported_op_is_named_with_its_module_and_the_model_is_restored():
    model = _Net()
    model.train()
    hooks_before = (len(model._forward_hooks), len(model._forward_pre_hooks))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedOpError, match=r"torch\.sort.*'blocks\.0'.*unsupported='measure'"):
        predict(model, torch.randn(8, 16))
    assert model.training and (len(model._forward_hooks), len(model._forward_pre_hooks)) == hooks_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_unsupported_measure_takes_the_measured_output_and_says_so():
    torch.manual_seed(0)
    model = _Net()
    theory = predict(model, torch.randn(64, 16), unsupported="measure")
    assert theory.depth == 2 and np.isfinite(theory.skip.log2_second_moment).all()
    assert any("torch.sort" in op and "blocks.0" in op for op in theory.meta["measured_ops"])


def test_arguments_are_checked():
    model = nets.residual_mlp(2, width=8)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weights"):
        predict(model, x, weights="nominal")
    with pytest.raises(ValueError, match="padding"):
        predict(model, x, padding="same")
    with pytest.raises(TypeError, match="stages"):
        predict(model, x, stages=(1, 1))
    assert "F.conv2d" in " ".join(supported_ops()) or "torch.conv2d" in supported_ops()


def test_meta_lists_the_maps_per_merge():
    torch.manual_seed(0)
    model = nets.residual_mlp(3, width=32, scheme="batchnorm")
    theory = predict(model, torch.randn(16, 32))
    assert len(theory.meta["maps"]) == 3
    assert all("F.batch_norm" in m and "F.linear" in m for m in theory.meta["maps"])


def test_the_readme_map_example():
    import dataclasses
    from propagation import structural

    class Neg(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32, bias=False)

        def forward(self, x):
            return x + F.softsign(-self.lin(x))

    model = nn.Sequential(Neg(), Neg())
    x = torch.randn(64, 32)
    with pytest.raises(UnsupportedOpError, match="neg"):
        predict(model, x)

    def neg_map(op):
        x = op.args[0]
        s = op.state(x)
        return dataclasses.replace(s, nu=-s.nu, chain=None), [(x, 1.0)]
    funcs = [torch.neg, torch.Tensor.neg, torch.Tensor.__neg__]
    structural.register_map(funcs, neg_map)
    structural.register_map([F.softsign], structural.elementwise_map)
    try:
        theory = predict(model, x)
        measured = propagation.measure(model, x)
        assert theory.depth == measured.depth == 2
        assert propagation.compare(theory, measured).ok
    finally:
        for f in funcs + [F.softsign]:
            structural._MAPS.pop(f, None)


def test_constant_minus_activation_and_scalar_arithmetic():
    # c - f(x), f(x) / 2 and -1 * f(x): the affine maps of rsub, div and mul with their
    # signs, against measurement.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(128, 128, bias=False)

        def forward(self, x):
            h = self.lin(torch.relu(x))
            return x + -1.0 * ((0.5 - h) / 2)

    class Rsub(Block):
        def forward(self, x):
            return x + torch.rsub(self.lin(torch.relu(x)), 0.25, alpha=2.0)  # 0.25 - 2 h

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Rsub(), Block())
    x = torch.randn(256, 128)
    theory = predict(model, x)
    measured = propagation.measure(model, x)
    assert theory.depth == measured.depth == 3
    comparison = propagation.compare(theory, measured)
    assert comparison.ok, comparison.table()
