"""The CI gate: theory against measurement for every registered scheme, and broken networks.

Every scheme that ``propagation.nets`` builds is measured on the convolutional ResNet-V2 and
the residual MLP at depths 1, 10 and 100 (1000 on the MLP), over 3 seeds, and compared with
``predict`` for the same architecture (``model.theory``, zero padding of the convolutions,
the measured input state). ``compare`` passes a block and quantity when the log-ratio lies in
its band: the targets of issue 4 (10% second moment, 15% squared mean and variance, 25%
gradients) plus the finite-width spread derived in ``propagation/comparison.py``.

The mistakes of the last section must make the same comparison fail, and ``diagnose`` must
name them.
"""
import pytest
import torch

import propagation
from propagation import nets

pytestmark = pytest.mark.gate

SEEDS = 3
ALL_QUANTITIES = ("second_moment", "squared_mean", "variance", "grad")
SCHEMES = [("batchnorm", {}), ("none", {}), ("sqrt_half", {}), ("skipinit", {"alpha": 0.0}),
           ("skipinit", {"alpha": 0.1}), ("fixup", {}), ("nf", {}), ("nf_he", {}),
           ("layernorm", {}), ("postnorm", {}), ("relu_bn_conv", {})]


def test_the_gate_covers_every_registered_scheme():
    # A newly registered scheme must get a network (or this list) before the gate is green.
    assert {s for s, _ in SCHEMES} == set(propagation.schemes()) == set(nets.supported_schemes())


def mlp(depth, scheme, params, width):
    return lambda seed: nets.residual_mlp(depth, width=width, scheme=scheme, **params), (width, width)


def conv(depth, scheme, params, width=32, size=32, batch=8):
    stages = (depth,) if depth < 2 else (depth - depth // 2, depth // 2)
    build = lambda seed: nets.resnet_v2(stages=stages, width=width, scheme=scheme, block="basic",
                                        num_classes=None, **params)
    return build, (batch, 3, size, size)


def run_gate(build, shape, *, dtype=torch.float32, mode="train", theory=None, models=None,
             quantities=ALL_QUANTITIES):
    if models is None:
        models = []
        for seed in range(SEEDS):
            torch.manual_seed(seed)
            models.append(build(seed).to(dtype))

    def inputs(seed):
        # A generator seeded apart from the weights': torch.manual_seed(s) and a generator
        # seeded with s draw the same numbers, and a weight matrix equal to its input is
        # no random network.
        return torch.randn(shape, generator=torch.Generator().manual_seed(10_000 + seed),
                           dtype=dtype)
    measured = propagation.measure(models, inputs, seeds=SEEDS, mode=mode, progress=False)
    kwargs = dict(models[0].theory if theory is None else theory)
    predicted = propagation.predict(**kwargs, **propagation.input_state(measured),
                                    padding_factors=nets.padding_factors(models[0], shape))
    return propagation.compare(predicted, measured, quantities=quantities), measured


def ids(cases):
    return [f"{s}{'-' + '-'.join(f'{k}{v}' for k, v in p.items()) if p else ''}" for s, p in cases]


ALL = ALL_QUANTITIES
# Where the infinite-width theory is known to part from these finite networks, by more than
# the finite-width band allows: (architecture, case id, depth) -> (quantities, why). The gate
# leaves those quantities out of its verdict, and test_known_departures_still_depart checks
# that they do still depart, so a better theory shows up as a failure there.
DEEP_NARROW = ("1000 blocks at width 128 (depth / width ~ 8): corrections of order depth / width "
               "to the infinite-width maps, which the theory leaves out, move this quantity by "
               "more than the finite-width spread")
WS_PADDING = ("a Scaled-WS convolution leaks the ReLU's channel mean where zero padding cuts "
              "its taps; padding_factors models the second moment this adds to each conv, not "
              "the channel mean it leaves on the skip path for later standardised layers")
GROUPNORM = ("the conv networks normalise with GroupNorm(1, C), over channels and positions of "
             "each example, where the theory's LayerNorm is over channels; with 8 examples a "
             "batch, removing each example's mean moves the channel statistics")
KNOWN = {
    ("mlp", "batchnorm", 1000): (("squared_mean",), DEEP_NARROW),
    ("mlp", "none", 1000): (("squared_mean",), DEEP_NARROW),
    ("mlp", "skipinit-alpha0.1", 1000): (("second_moment", "variance"), DEEP_NARROW),
    ("mlp", "nf", 1000): (("second_moment",), DEEP_NARROW),
    ("mlp", "nf_he", 1000): (("second_moment",), DEEP_NARROW),
    ("mlp", "layernorm", 1000): (("second_moment", "squared_mean"), DEEP_NARROW),
    ("conv", "nf", 100): (("second_moment", "variance"), WS_PADDING),
    ("conv", "layernorm", 100): (("squared_mean", "variance"), GROUPNORM),
}


def gate_quantities(arch, case, depth):
    skip = KNOWN.get((arch, case, depth), ((), ""))[0]
    return tuple(q for q in ALL if q not in skip)


CASE_IDS = ids(SCHEMES)


@pytest.mark.parametrize("depth", [1, 10, 100])
@pytest.mark.parametrize("scheme, params", SCHEMES, ids=CASE_IDS)
def test_mlp_agrees_with_theory(scheme, params, depth):
    case = CASE_IDS[SCHEMES.index((scheme, params))]
    result, _ = run_gate(*mlp(depth, scheme, params, width=256),
                         quantities=gate_quantities("mlp", case, depth))
    assert result.ok, result.table()


@pytest.mark.parametrize("scheme, params", SCHEMES, ids=CASE_IDS)
def test_mlp_1000_blocks_agrees_with_theory(scheme, params):
    case = CASE_IDS[SCHEMES.index((scheme, params))]
    # 2^1000 does not fit in float32: the unnormalised networks are measured in float64.
    dtype = torch.float64 if scheme in ("none",) else torch.float32
    result, measured = run_gate(*mlp(1000, scheme, params, width=128), dtype=dtype,
                                quantities=gate_quantities("mlp", case, 1000))
    assert measured.meta["first_nonfinite_block"] is None
    assert result.ok, result.table()


@pytest.mark.parametrize("depth", [1, 10, 100])
@pytest.mark.parametrize("scheme, params", SCHEMES, ids=CASE_IDS)
def test_conv_resnet_agrees_with_theory(scheme, params, depth):
    case = CASE_IDS[SCHEMES.index((scheme, params))]
    result, _ = run_gate(*conv(depth, scheme, params),
                         quantities=gate_quantities("conv", case, depth))
    assert result.ok, result.table()


@pytest.mark.parametrize("key", sorted(KNOWN), ids=lambda k: "-".join(map(str, k)))
def test_known_departures_still_depart(key):
    arch, case, depth = key
    scheme, params = SCHEMES[CASE_IDS.index(case)]
    quantities, why = KNOWN[key]
    if arch == "mlp":
        build = mlp(depth, scheme, params, width=256 if depth < 1000 else 128)
    else:
        build = conv(depth, scheme, params)
    dtype = torch.float64 if scheme == "none" and depth == 1000 else torch.float32
    result, _ = run_gate(*build, dtype=dtype, quantities=quantities)
    assert not result.ok, f"{key} now agrees with the theory: remove it from KNOWN ({why})"


# --- broken networks: the gate must fail, and diagnose must say why ------------------------------

class SkipGainBlock(torch.nn.Module):
    """SkipInit's alpha put on the skip path instead of the branch: alpha x + f(x)."""

    def __init__(self, block, alpha):
        super().__init__()
        self.block, self.alpha = block, alpha

    def forward(self, x):
        return self.alpha * x + self.block.branch(self.block.pre(x))


def skip_gain_model(seed):
    model = nets.residual_mlp(20, width=256, scheme="none")
    model.blocks = torch.nn.Sequential(*[SkipGainBlock(b, 0.1) for b in model.blocks])
    return model


def fixup_not_zero(seed):
    model = nets.residual_mlp(20, width=256, scheme="fixup")
    for block in model.blocks:
        last = [m for m in block.branch if isinstance(m, torch.nn.Linear)][-1]
        torch.nn.init.kaiming_normal_(last.weight, nonlinearity="relu")
    return model


def rescaled_twice(seed):
    model = nets.residual_mlp(20, width=256, scheme="sqrt_half")
    for block in model.blocks:
        block.post.append(propagation.nets._Scale(2 ** -0.5))
    return model


BROKEN = [
    ("skip-path gain", skip_gain_model, {"scheme": "skipinit", "alpha": 0.1}, "train",
     "skip path"),
    ("batchnorm in eval mode", lambda s: nets.residual_mlp(20, width=256), None, "eval",
     "eval mode"),
    ("fixup without zero last layer", fixup_not_zero, None, "train", "zero"),
    ("1/sqrt(2) twice", rescaled_twice, None, "train", "shrinks"),
]


@pytest.mark.parametrize("name, build, theory, mode, words", BROKEN, ids=[b[0] for b in BROKEN])
def test_the_gate_fails_on_broken_networks(name, build, theory, mode, words):
    models = []
    for seed in range(SEEDS):
        torch.manual_seed(seed)
        models.append(build(seed))
    if theory is not None:
        theory = {"depth": 20, "layers": 2, **theory}
    result, measured = run_gate(None, (256, 256), mode=mode, theory=theory, models=models)
    assert not result.ok, f"{name}: the gate passed a broken network\n{result.table()}"
    assert words in str(propagation.diagnose(measured)), str(propagation.diagnose(measured))


def test_diagnose_names_the_healthy_schemes():
    cases = [("batchnorm", {}, "linear", "batchnorm"), ("none", {}, "exponential", "none"),
             ("fixup", {}, "constant", "fixup"), ("sqrt_half", {}, "constant", "sqrt_half")]
    for scheme, params, law, closest in cases:
        torch.manual_seed(0)
        model = nets.residual_mlp(30, width=256, scheme=scheme, **params)
        m = propagation.measure(model, torch.randn(256, 256, generator=torch.Generator()
                                                   .manual_seed(10_000)), progress=False)
        d = propagation.diagnose(m)
        assert (d.law, d.closest) == (law, closest), (scheme, str(d))
    torch.manual_seed(0)
    model = nets.resnet_v2(stages=(3, 4, 6, 3), width=8, scheme="batchnorm", num_classes=None)
    d = propagation.diagnose(propagation.measure(model, torch.randn(16, 3, 16, 16)))
    assert d.law == "linear" and "stage boundaries" in str(d), str(d)
