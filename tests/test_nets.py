"""Reference networks: every registered scheme is a real network matching its layer maps."""
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

import propagation
from propagation import kernels, nets, predict
from propagation.layers import BatchNorm, Gain, LayerNorm, ReLU, ReLUScaledWS, ReLUWeight
from propagation.predict import make_plan
from propagation.schemes import get_scheme, nf_expected_variance

from conftest import scheme_cases

# Small networks, one per architecture: (builder, input shape, head-less output shape).
ARCHS = {
    "resnet_v2-bottleneck": (lambda **kw: nets.resnet_v2(stages=(1, 2), width=4, **kw),
                             (4, 3, 16, 16), (4, 32, 8, 8)),
    "resnet_v2-basic-imagenet": (lambda **kw: nets.resnet_v2(
        stages=(2, 1), width=4, block="basic", stem="imagenet", in_channels=1, **kw),
        (4, 1, 32, 32), (4, 8, 4, 4)),
    "wide_resnet": (lambda **kw: nets.wide_resnet(10, k=2, **kw), (4, 3, 8, 8), (4, 128, 2, 2)),
    "residual_mlp": (lambda **kw: nets.residual_mlp(3, width=16, **kw), (8, 16), (8, 16)),
}


def _build(arch, name, params, num_classes):
    return ARCHS[arch][0](scheme=name, num_classes=num_classes, **params)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: a second intra-op thread buys nothing, and on a busy two-core
    # machine its spin-waiting made the forward passes up to 100 times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- every scheme in every architecture ------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name, params", scheme_cases())
def test_builds_runs_forward_and_backward(name, params, arch):
    _, shape, headless = ARCHS[arch]
    model = _build(arch, name, params, num_classes=5)
    assert model.training
    x = torch.randn(shape)
    out = model(x)
    assert out.shape == (shape[0], 5)
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname

    bare = _build(arch, name, params, num_classes=None)
    assert bare.head is None
    assert bare(x).shape == headless


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name, params", scheme_cases())
def test_theory_describes_the_network(name, params, arch):
    model = _build(arch, name, params, num_classes=None)
    p = predict(**model.theory)
    assert p.scheme == name and p.depth == len(model.blocks)
    assert model.projection == [b.projection is not None for b in model.blocks]
    assert p.projection.tolist() == model.projection
    for k, v in params.items():
        assert model.theory[k] == v and model.params[k] == v
    assert set(model.params) == set(get_scheme(name).params)


@pytest.mark.parametrize("name, params", scheme_cases())
def test_headless_output_is_the_last_merge(name, params):
    model = nets.residual_mlp(3, width=8, scheme=name, **params)
    merges = []
    for b in model.blocks:
        b.post.register_forward_pre_hook(lambda m, a: merges.append(a[0]))
    out = model(torch.randn(4, 8))
    assert out is merges[-1]
    assert len(model.blocks[-1].post) == 0
    # Earlier blocks keep their post (sqrt_half's scale, postnorm's norm).
    maps = get_scheme(name).build(make_plan(3), **model.params)
    assert len(model.blocks[0].post) == len(maps.post)


def test_project_first_follows_the_channels():
    assert nets.resnet_v2(stages=(1, 1), width=4).theory["project_first"]  # 4 -> 16 channels
    basic = nets.resnet_v2(stages=(2, 2), width=4, block="basic")
    assert not basic.theory["project_first"] and basic.projection == [False, False, True, False]
    assert not nets.wide_resnet(10, k=1).theory["project_first"]  # 16 -> 16 channels
    assert nets.wide_resnet(10, k=2).theory["project_first"]
    mlp = nets.residual_mlp(4, width=8)
    assert mlp.theory["stages"] is None and mlp.projection == [False] * 4
    assert nets.wide_resnet(16).theory["stages"] == (2, 2, 2)
    assert nets.resnet_v2(stages=(1,), width=2).theory["layers"] == 3
    assert basic.theory["layers"] == 2


def test_heads():
    bn = nets.resnet_v2(stages=(1,), width=4)
    assert isinstance(bn.head[0], nn.BatchNorm2d) and isinstance(bn.head[-1], nn.Linear)
    assert isinstance(nets.resnet_v2(stages=(1,), width=4, scheme="layernorm").head[0],
                      nn.GroupNorm)
    assert isinstance(nets.resnet_v2(stages=(1,), width=4, scheme="none").head[0], nn.ReLU)
    mlp = nets.residual_mlp(2, width=8, scheme="layernorm", num_classes=3)
    assert isinstance(mlp.head[0], nn.LayerNorm) and mlp(torch.randn(2, 8)).shape == (2, 3)


# --- structure against the registry's layer maps ---------------------------------------------

def _theory_counts(layers):
    c = Counter()
    for layer in layers:
        c["relu"] += isinstance(layer, (ReLU, ReLUWeight, ReLUScaledWS))
        c["ws"] += isinstance(layer, ReLUScaledWS)
        c["batchnorm"] += isinstance(layer, BatchNorm)
        c["layernorm"] += isinstance(layer, LayerNorm)
    return +c


def _net_counts(modules):
    c = Counter()
    for m in modules:
        c["relu"] += isinstance(m, nn.ReLU)
        c["ws"] += isinstance(m, (nets.WSConv2d, nets.WSLinear))
        c["batchnorm"] += isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
        c["layernorm"] += isinstance(m, (nn.GroupNorm, nn.LayerNorm))
    return +c


def _weights(modules):
    return [m for m in modules if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("name, params", scheme_cases())
def test_blocks_have_the_layers_of_the_scheme(name, params, block):
    """ReLUs, norms and WS layers of pre+branch, pre+projection and post, block by block."""
    model = nets.resnet_v2(stages=(1, 1), width=4, block=block, scheme=name, **params)
    spec = get_scheme(name)
    theory = model.theory
    plan = make_plan(theory["depth"], theory["stages"], theory["project_first"],
                     theory["layers"])
    maps = spec.build(plan, **model.params)
    # A zero layer (Fixup's last layer, alpha = 0) stands for "ReLU, zero weights" in the
    # maps, whose ReLU then does not show: compare the ReLUs only where no gain is zero.
    zero = any(isinstance(layer, Gain) and layer.a == 0.0 for layer in maps.branch)
    for b in model.blocks:
        net, theory_ = _net_counts([*b.pre, *b.branch]), _theory_counts(maps.pre + maps.branch)
        if zero:
            del net["relu"], theory_["relu"]
        assert net == theory_
        # The last block's post is left out: its merge output is x_D.
        last = b is model.blocks[-1]
        assert _net_counts(b.post) == (Counter() if last else _theory_counts(maps.post))
        assert len(_weights(b.branch)) == theory["layers"]
        if b.projection is not None:
            assert (_net_counts([*b.pre, *b.projection])
                    == _theory_counts(maps.pre + maps.projection))
            assert len(_weights(b.projection)) == 1


# --- initialisation ---------------------------------------------------------------------------

# A sample variance of n i.i.d. Gaussian weights has relative std sqrt(2 / n); with
# n = 512 * 512 that is 0.28 %, so 2 % is 7 standard deviations.
INIT_RTOL = 0.02


@pytest.mark.parametrize("name, params, gain2", [
    ("batchnorm", {}, 2.0), ("none", {}, 2.0), ("nf_he", {}, 2.0),
    ("relu_bn_conv", {"gain2": 0.5}, 0.5),
    ("fixup", {}, 2.0 / 4),  # first of m = 2 layers: (L^(-1/(2m-2)))^2 = 1/L with L = 4
])
def test_weight_variance(name, params, gain2):
    model = nets.residual_mlp(4, width=512, scheme=name, **params)
    w = _weights(model.blocks[0].branch)[0].weight.detach()
    assert w.var().item() == pytest.approx(gain2 / 512, rel=INIT_RTOL)


def test_stem_has_gain_one():
    model = nets.resnet_v2(stages=(1,), width=64, in_channels=64, block="basic")
    w = model.stem[0].weight.detach()
    # 64 * 64 * 9 = 36864 weights: relative std of the sample variance 0.74 %, 5 % is 7 sigma.
    assert w.var().item() == pytest.approx(1.0 / (64 * 9), rel=0.05)
    assert model.stem[0].bias is None


@pytest.mark.parametrize("make", [lambda: nets.WSConv2d(16, 32, 3),
                                  lambda: nets.WSLinear(100, 7)], ids=["conv", "linear"])
def test_ws_weights_have_zero_mean_and_unit_gain_norm(make):
    layer = make()
    w = layer.standardized_weight().detach().flatten(1)
    # float32 sums of <= 144 terms of size ~0.1: round-off ~1e-8, so 1e-6 is ample.
    np.testing.assert_allclose(w.mean(1).numpy(), 0.0, atol=1e-6)
    # The norm is exact by construction up to float32 round-off (~1e-7 relative).
    np.testing.assert_allclose(w.square().sum(1).numpy(), kernels.WS_RELU_GAIN2, rtol=1e-5)
    assert w.shape[1] == layer.weight[0].numel()
    # N(0, 1) underneath: >= 700 samples give a sample std within ~3 % (1 / sqrt(2 n)); 30 %
    # only has to tell N(0, 1) from a He init (std sqrt(2 / fan_in) <= 0.17 here).
    assert layer.weight.std().item() == pytest.approx(1.0, rel=0.3)


def test_nf_uses_ws_and_nf_he_does_not():
    for name, ws in (("nf", True), ("nf_he", False)):
        model = nets.resnet_v2(stages=(1, 1), width=4, scheme=name)
        layers = [m for b in model.blocks for m in b.modules() if isinstance(m, nn.Conv2d)]
        assert all(isinstance(m, nets.WSConv2d) == ws for m in layers)


@pytest.mark.parametrize("name", ["nf", "nf_he"])
def test_nf_betas_match_expected_variance(name):
    model = nets.resnet_v2(stages=(2, 3, 2), width=4, block="basic", scheme=name, alpha=0.3)
    t = model.theory
    beta2 = nf_expected_variance(make_plan(t["depth"], t["stages"], t["project_first"],
                                           t["layers"]), 0.3)
    # Blocks 2 and 5 project: beta^2 grows by alpha^2 per block and restarts after them.
    np.testing.assert_allclose(beta2, 1 + 0.09 * np.array([0, 1, 2, 1, 2, 3, 1]), rtol=1e-12)
    inv_beta = [float(m.scale) for b in model.blocks for m in b.pre if hasattr(m, "scale")]
    # float32 storage of 1/beta: 6e-8 relative.
    np.testing.assert_allclose(inv_beta, 1.0 / np.sqrt(beta2), rtol=1e-6)
    for b in model.blocks:
        alpha = b.branch[-1].scale
        assert float(alpha) == pytest.approx(0.3) and not isinstance(alpha, nn.Parameter)


def test_skipinit_alpha_is_learnable():
    model = nets.residual_mlp(3, width=8, scheme="skipinit", alpha=0.1)
    alphas = [b.branch[-1].scale for b in model.blocks]
    assert all(isinstance(a, nn.Parameter) and a.item() == pytest.approx(0.1) for a in alphas)
    x = torch.randn(4, 8)  # alpha = 0 (the default) makes every block the identity
    assert torch.equal(nets.residual_mlp(3, width=8, scheme="skipinit")(x), x)


def test_fixup_last_layers_are_zero_and_the_net_is_the_identity():
    model = nets.resnet_v2(stages=(2, 2), width=4, block="bottleneck", scheme="fixup")
    for b in model.blocks:
        weights = _weights(b.branch)
        assert torch.count_nonzero(weights[-1].weight) == 0
        assert all(torch.count_nonzero(w.weight) > 0 for w in weights[:-1])
        if b.projection is not None:
            assert torch.count_nonzero(b.projection[0].weight) > 0

    # Without projections every block returns x + 0 exactly, whatever the input.
    conv = nets.resnet_v2(stages=(3,), width=8, block="basic", scheme="fixup", num_classes=None)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(conv(x), conv.stem(x))
    mlp = nets.residual_mlp(5, width=16, scheme="fixup")
    x = torch.randn(4, 16)
    assert torch.equal(mlp(x), x)


@pytest.mark.slow
def test_a_thousand_blocks_build_and_run():
    conv = nets.resnet_v2(stages=(1000,), width=16, block="basic", scheme="batchnorm")
    assert len(conv.blocks) == 1000 and not any(conv.projection)
    assert predict(**conv.theory).depth == 1000
    mlp = nets.residual_mlp(1000, width=128, scheme="nf")
    with torch.no_grad():
        q = mlp(torch.randn(64, 128)).square().mean().item()
    # q_D = 1 + alpha^2 D = 41. Over 12 seeds q_D / 41 had a relative std of 5.9 % at batch
    # 64 (10 % at batch 16, 4 % at 128: it shrinks like 1 / sqrt(batch), the examples'
    # own norms drifting over 1000 blocks); 25 % is 4 sigma.
    assert q == pytest.approx(1.0 + 0.04 * 1000, rel=0.25)


# --- statistics against the theory (forward hooks) --------------------------------------------

WIDTH = BATCH = 512


def _final_second_moment(model, x):
    with torch.no_grad():
        return model(x).square().mean().item()


def test_batchnorm_mlp_final_second_moment():
    # q_D = q_0 + D = 9. Each branch output is (1, 1/pi) with fluctuations set by its last
    # weight matrix: the channel-mean part 1/pi carries a chi-square(1) per channel
    # (sum_i W_ci)^2, i.e. relative std sqrt(2 / WIDTH) = 6 % over WIDTH channels, so
    # ~0.02 per branch; the 28 cross terms between the branches' channel means add
    # ~0.15 in all. Relative std of q_D ~ 2 % (measured: 1.9 % over 40 seeds); 10 % is 5 sigma.
    depth = 8
    model = nets.residual_mlp(depth, width=WIDTH, scheme="batchnorm")
    q = _final_second_moment(model, torch.randn(BATCH, WIDTH))
    assert q == pytest.approx(depth + 1, rel=0.10)
    assert predict(**model.theory).skip.second_moment[-1] == pytest.approx(depth + 1)


def test_unnormalised_mlp_doubles_every_block():
    # q_D = 2^D in expectation. Once inputs are correlated, each He layer scales the common
    # direction by chi-square(n) / n and the merge adds a cross term <x, f(x)> of relative
    # size 2 / sqrt(n): the per-block log std is about sqrt(2 / n), so log q_D has std
    # sqrt(2 D / n) = 0.18 at D = 8, n = 512 (measured 0.19 over 40 seeds). A factor 2
    # (|log| < 0.69) is ~4 sigma.
    depth = 8
    model = nets.residual_mlp(depth, width=WIDTH, scheme="none")
    q = _final_second_moment(model, torch.randn(BATCH, WIDTH))
    assert 2.0 ** depth / 2 < q < 2.0 ** depth * 2


def _profile_hooks(model):
    """Second moments of every block input, the last merge output and every branch output."""
    skip, branch, handles = [], [], []
    for b in model.blocks:
        handles.append(b.register_forward_pre_hook(
            lambda m, a: skip.append(a[0].square().mean().item())))
        handles.append(b.branch.register_forward_hook(
            lambda m, a, o: branch.append(o.square().mean().item())))
    handles.append(model.blocks[-1].post.register_forward_pre_hook(
        lambda m, a: skip.append(a[0].square().mean().item())))
    return skip, branch, handles


@pytest.mark.parametrize("name, params", scheme_cases())
def test_every_scheme_follows_its_theory_block_by_block(name, params):
    n, depth = 256, 6
    model = nets.residual_mlp(depth, width=n, scheme=name, **params)
    x = torch.randn(n, n)
    skip, branch, handles = _profile_hooks(model)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    p = predict(**model.theory, input_second_moment=x.square().mean().item(),
                input_squared_mean=x.mean(0).square().mean().item())
    # The worst case is an unnormalised branch on correlated inputs: log q at block l has
    # std about sqrt(2 (l + 2) / n) (l blocks of sqrt(2 / n) each, as above, plus the two
    # layers of the branch itself). 4 such sigmas; over 20 seeds the largest deviation of
    # any scheme was 2.75 sigma (none, sqrt_half), normalised schemes stay below 1.6.
    for measured, theory in ((skip, p.skip.second_moment), (branch, p.branch.second_moment)):
        measured = np.array(measured)
        l = np.arange(len(measured))
        zero = theory == 0.0  # skipinit alpha = 0 and fixup: branches are exactly zero
        assert np.all(measured[zero] == 0.0)
        tol = 4 * np.sqrt(2 * (l[~zero] + 2) / n)
        assert np.all(np.abs(np.log(measured[~zero] / theory[~zero])) < tol), (measured, theory)


@pytest.mark.parametrize("name, params", scheme_cases())
def test_measure_finds_every_merge_and_projection(name, params):
    """The automatic merge search of ``measure`` sees the blocks the theory describes."""
    measure = pytest.importorskip("propagation.empirical").measure
    for model, x in ((nets.resnet_v2(stages=(1, 2), width=4, scheme=name, **params),
                      torch.randn(4, 3, 8, 8)),
                     (nets.residual_mlp(3, width=8, scheme=name, **params), torch.randn(4, 8))):
        m = measure(model, x, backward=False)
        assert m.depth == len(model.blocks)
        assert m.projection.tolist() == model.projection


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("make, error, words", [
    (lambda: nets.resnet_v2(width=0), ValueError, ["width", "0", ">= 1"]),
    (lambda: nets.resnet_v2(width=2.5), TypeError, ["width", "2.5", "int"]),
    (lambda: nets.resnet_v2(block="bottlenek"), ValueError,
     ["block", "'bottlenek'", "'basic'", "did you mean 'bottleneck'"]),
    (lambda: nets.resnet_v2(stem="tiny"), ValueError, ["stem", "'tiny'", "'cifar'", "'imagenet'"]),
    (lambda: nets.resnet_v2(stages=(3, 0)), ValueError, ["stages", "(3, 0)", ">= 1"]),
    (lambda: nets.resnet_v2(stages=()), ValueError, ["stages", "()", "non-empty"]),
    (lambda: nets.resnet_v2(stages=3), TypeError, ["stages", "3"]),
    (lambda: nets.resnet_v2(stages=(2.0,)), TypeError, ["stages", "2.0", "int"]),
    (lambda: nets.resnet_v2(in_channels=0), ValueError, ["in_channels", "0"]),
    (lambda: nets.resnet_v2(num_classes=0), ValueError, ["num_classes", "0"]),
    (lambda: nets.resnet_v2(scheme="batchnrom"), ValueError,
     ["'batchnrom'", "relu_bn_conv", "did you mean 'batchnorm'"]),
    (lambda: nets.resnet_v2(scheme=3), TypeError, ["scheme", "3", "str"]),
    (lambda: nets.resnet_v2(scheme="skipinit", alpha=-1), ValueError, ["alpha", "-1", ">= 0"]),
    (lambda: nets.resnet_v2(scheme="skipinit", alhpa=0.1), TypeError,
     ["'alhpa'", "skipinit", "did you mean 'alpha'"]),
    (lambda: nets.resnet_v2(alpha=0.1), TypeError, ["'alpha'", "'batchnorm'", "none"]),
    (lambda: nets.resnet_v2(scheme="relu_bn_conv", gain2=math.inf), ValueError, ["gain2", "inf"]),
    (lambda: nets.wide_resnet(depth=12), ValueError, ["depth", "12", "6 N + 4"]),
    (lambda: nets.wide_resnet(depth=4), ValueError, ["depth", "4", "N >= 1"]),
    (lambda: nets.wide_resnet(depth=16.0), TypeError, ["depth", "16.0", "int"]),
    (lambda: nets.wide_resnet(k=0), ValueError, ["k", "0"]),
    (lambda: nets.wide_resnet(scheme="nff"), ValueError, ["'nff'", "did you mean 'nf'"]),
    (lambda: nets.residual_mlp(0), ValueError, ["depth", "0"]),
    (lambda: nets.residual_mlp(3, width=-2), ValueError, ["width", "-2"]),
    (lambda: nets.residual_mlp(3, scheme="nf", alpha="big"), TypeError, ["alpha", "'big'"]),
])
def test_bad_input_names_argument_value_and_allowed(make, error, words):
    with pytest.raises(error) as info:
        make()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_a_registered_scheme_without_a_network_is_refused():
    build = get_scheme("none").build
    propagation.register_scheme("test_custom_net", "no network", "test", build)
    try:
        with pytest.raises(ValueError) as info:
            nets.residual_mlp(3, scheme="test_custom_net")
        message = str(info.value)
        assert "'test_custom_net'" in message and "no reference network" in message
        assert all(s in message for s in nets.supported_schemes())
    finally:
        propagation.unregister_scheme("test_custom_net")


def test_every_registered_builtin_has_a_network():
    assert set(nets.supported_schemes()) >= set(propagation.schemes())


def _restore(spec):
    propagation.register_scheme(spec.name, spec.description, spec.reference, spec.build,
                                spec.params, network=spec.network, head_norm=spec.head_norm,
                                zero_head=spec.zero_head, gate=spec.gate, replace=True)


def test_a_scheme_re_registered_without_a_network_has_none():
    # A scheme is one registration: a new build without a network must not keep building
    # the old network, whose theory it no longer is.
    original = get_scheme("none")
    propagation.register_scheme("none", "changed", "test", lambda plan: original.build(plan),
                                replace=True)
    try:
        with pytest.raises(ValueError, match="'none' is registered but has no reference network"):
            nets.residual_mlp(3, scheme="none")
        assert "none" not in nets.supported_schemes()
        assert "none" not in {s for s, _ in propagation.gate.settings()}
    finally:
        _restore(original)
    assert nets.residual_mlp(3, width=4, scheme="none").scheme == "none"


def test_a_registered_scheme_with_a_network_is_built_and_gated():
    # One call registers the maps, the parameters, the network and the gate settings.
    base = get_scheme("skipinit")
    propagation.register_scheme("half_skipinit", "skipinit, gated at alpha 0.5", "test",
                                base.build, base.params, network=base.network,
                                gate=({"alpha": 0.5},))
    try:
        model = nets.residual_mlp(4, width=16, scheme="half_skipinit", alpha=0.5)
        assert model.theory == {"depth": 4, "scheme": "half_skipinit", "stages": None,
                                "project_first": False, "layers": 2, "alpha": 0.5}
        assert ("half_skipinit", {"alpha": 0.5}) in propagation.gate.settings()
        with pytest.raises(TypeError, match="takes no parameter 'beta'"):
            propagation.register_scheme("bad_gate", "x", "x", base.build, base.params,
                                        network=base.network, gate=({"beta": 1.0},))
    finally:
        propagation.unregister_scheme("half_skipinit")
        propagation.unregister_scheme("bad_gate")


def test_padding_factors_count_in_bounds_taps():
    from propagation.nets import padding_factors
    model = nets.resnet_v2(stages=(1, 1), width=4, block="basic", scheme="none", num_classes=None)
    f = padding_factors(model, (2, 3, 8, 8))
    # 3x3, padding 1 on 8 positions: the 2 edge outputs see 2 of 3 taps, the other 6 all 3:
    # (6 * 3 + 2 * 2) / (8 * 3) = 22/24 per axis. Stage 2's stride-2 conv on 8: outputs 0..3
    # read taps 2o-1..2o+1, only o = 0 loses one: 11/12 per axis; then 3x3 on 4: 10/12.
    np.testing.assert_allclose(f[0], [(22 / 24) ** 2] * 2)
    np.testing.assert_allclose(f[1], [(11 / 12) ** 2, (10 / 12) ** 2])
    mlp = nets.residual_mlp(3, width=8, scheme="none")
    np.testing.assert_array_equal(padding_factors(mlp, (4, 8)), np.ones((3, 2)))
