"""The CI gate: theory against measurement for every registered scheme, and broken networks.

The cases (every scheme with a reference network, on the residual MLP at depths 1, 10, 100,
1000 and the conv ResNet-V2 at 1, 10, 100, over 3 seeds) and the known departures live in
``propagation.gate``; each is run through ``propagation.check``, which compares ``predict``
for the same finite network (``model.theory``, zero padding of the convolutions, the
measured input state) with the measurement. ``compare`` passes a block and quantity when the
log-ratio lies in its band: the targets of issue 4 (10% second moment, 15% squared mean and
variance, 25% gradients) plus the finite-width spread derived in propagation/comparison.py.

The mistakes of the last section must make the same comparison fail, and ``diagnose`` must
name them.
"""
import pytest
import torch

import propagation
from propagation import gate, nets

pytestmark = pytest.mark.gate

SEEDS = gate.SEEDS


def test_the_gate_covers_every_scheme_with_a_network():
    # The gate's settings come from the registry: a scheme registered with a network is
    # gated at each of its ``gate`` settings, at least once.
    assert {s for s, _ in gate.settings()} == set(nets.supported_schemes())
    assert set(nets.supported_schemes()) <= set(propagation.schemes())
    # Every transformer scheme too, on its reference transformer.
    from propagation.sequence import SEQ_SCHEMES
    assert {s for s, _ in gate.transformer_settings()} == set(SEQ_SCHEMES)
    assert {c.scheme for c in gate.cases("transformer")} == set(SEQ_SCHEMES)


def test_every_known_departure_names_a_case():
    ids = {(c.arch, c.id, c.depth) for c in gate.cases()}
    assert set(gate.KNOWN) <= ids and set(gate.STRUCTURAL_KNOWN) <= ids


_MEASURED = {}


def compared(case, quantities=None):
    """case.run(), measured once per case: the known-departure test compares other
    quantities of the same three networks (the comparison is what differs, and it is cheap).
    Only the profiles are kept, not the models (a 1000-block MLP is 130 MB a seed)."""
    key = str(case)
    if key not in _MEASURED:
        result = case.run(gate.ALL_QUANTITIES)
        _MEASURED[key] = (result.theory, result.measured)
    theory, measured = _MEASURED[key]
    if quantities is None:
        quantities = tuple(q for q in gate.ALL_QUANTITIES if q not in case.known[0])
    return propagation.compare(theory, measured, quantities=quantities), measured


@pytest.mark.parametrize("case", [c for c in gate.cases() if c.depth < 1000], ids=str)
def test_agrees_with_theory(case):
    result, _ = compared(case)
    assert result.ok, result.table()


@pytest.mark.parametrize("case", [c for c in gate.cases("mlp") if c.depth == 1000], ids=str)
def test_mlp_1000_blocks_agrees_with_theory(case):
    result, measured = compared(case)
    assert measured.first_nonfinite_block is None
    assert result.ok, result.table()


@pytest.mark.parametrize("case", [c for c in gate.cases() if c.depth < 1000
                                  and c.arch != "transformer"], ids=str)
def test_agrees_with_the_structural_theory(case):
    # (The structural theory has no attention yet: transformers are checked against their
    # scheme's theory only.)
    # The same measurements against predict(model, inputs) of the first seed's network
    # (weights="law": the theory of the initialisation the three seeds share), read from
    # its calls and weights: no theory dictionary, and exact zero padding.
    result, measured = compared(case)
    torch.manual_seed(0)
    model = case.builder()()
    x = propagation.gaussian_inputs(case.shape, case.dtype)(0)
    theory = propagation.predict(model, x, weights="law")
    left_out = case.known[0] + case.structural_known[0]
    quantities = tuple(q for q in gate.ALL_QUANTITIES if q not in left_out)
    comparison = propagation.compare(theory, measured, quantities=quantities)
    assert comparison.ok, comparison.table()


@pytest.mark.parametrize("case", [c for c in gate.cases() if c.structural_known[0]], ids=str)
def test_known_structural_departures_still_depart(case):
    quantities, why = case.structural_known
    _, measured = compared(case)
    torch.manual_seed(0)
    x = propagation.gaussian_inputs(case.shape, case.dtype)(0)
    theory = propagation.predict(case.builder()(), x, weights="law")
    comparison = propagation.compare(theory, measured, quantities=quantities)
    assert not comparison.ok, f"{case}: the structural theory now agrees; remove it from " \
                              f"STRUCTURAL_KNOWN ({why})"


@pytest.mark.parametrize("case", gate.known_cases(), ids=str)
def test_known_departures_still_depart(case):
    quantities, why = case.known
    result, _ = compared(case, quantities)
    assert not result.ok, f"{case} now agrees with the theory: remove it from KNOWN ({why})"


def test_comparing_a_subset_is_checking_it():
    # compared() reuses one measurement for several subsets of quantities: the same as
    # running the case on that subset.
    case = gate.Case("mlp", "batchnorm", {}, 10)
    subset = ("squared_mean", "grad")
    direct = case.run(subset).comparison
    reused, _ = compared(case, subset)
    assert [(r.part, r.quantity, r.block, r.log_ratio, r.band) for r in direct.rows] == [
        (r.part, r.quantity, r.block, r.log_ratio, r.band) for r in reused.rows]


# --- broken networks: the gate must fail, and diagnose must say why ------------------------------

class SkipGainBlock(torch.nn.Module):
    """SkipInit's alpha put on the skip path instead of the branch: alpha x + f(x)."""

    def __init__(self, block, alpha):
        super().__init__()
        self.block, self.alpha = block, alpha

    def forward(self, x):
        return self.alpha * x + self.block.branch(self.block.pre(x))


def skip_gain_model():
    model = nets.residual_mlp(20, width=256, scheme="none")
    model.blocks = torch.nn.Sequential(*[SkipGainBlock(b, 0.1) for b in model.blocks])
    return model


def fixup_not_zero():
    model = nets.residual_mlp(20, width=256, scheme="fixup")
    for block in model.blocks:
        last = [m for m in block.branch if isinstance(m, torch.nn.Linear)][-1]
        torch.nn.init.kaiming_normal_(last.weight, nonlinearity="relu")
    return model


def rescaled_twice():
    model = nets.residual_mlp(20, width=256, scheme="sqrt_half")
    for block in model.blocks:
        block.post.append(propagation.nets._Scale(2 ** -0.5))
    return model


BROKEN = [
    ("skip-path gain", skip_gain_model, {"scheme": "skipinit", "alpha": 0.1}, "train",
     "skip path"),
    ("batchnorm in eval mode", lambda: nets.residual_mlp(20, width=256), None, "eval",
     "eval mode"),
    ("fixup without zero last layer", fixup_not_zero, None, "train", "zero"),
    ("1/sqrt(2) twice", rescaled_twice, None, "train", "shrinks"),
]


@pytest.mark.parametrize("name, build, theory, mode, words", BROKEN, ids=[b[0] for b in BROKEN])
def test_the_gate_fails_on_broken_networks(name, build, theory, mode, words):
    if theory is not None:
        theory = {"depth": 20, "layers": 2, **theory}
    result = propagation.check(build, (256, 256), seeds=SEEDS, mode=mode,
                               theory=theory, progress=False)
    assert not result.ok, f"{name}: the gate passed a broken network\n{result.table()}"
    assert words in str(result.diagnosis), str(result.diagnosis)


def test_diagnose_names_the_healthy_schemes():
    # Schemes whose theories coincide here are accepted together: Fixup and SkipInit at
    # alpha = 0 (zero branches), sqrt_half and postnorm from a unit input (both halve the
    # merge's second moment back to 1); batchnorm and layernorm (equal second moments).
    cases = [("batchnorm", {}, "linear", {"batchnorm", "layernorm"}),
             ("none", {}, "exponential", {"none"}),
             ("fixup", {}, "constant", {"skipinit", "fixup"}),
             ("sqrt_half", {}, "constant", {"sqrt_half", "postnorm"})]
    for scheme, params, law, closest in cases:
        torch.manual_seed(0)
        model = nets.residual_mlp(30, width=256, scheme=scheme, **params)
        m = propagation.measure(model, torch.randn(256, 256, generator=torch.Generator()
                                                   .manual_seed(10_000)), progress=False)
        d = propagation.diagnose(m)
        assert d.law == law and d.closest in closest, (scheme, str(d))
    torch.manual_seed(0)
    model = nets.resnet_v2(stages=(3, 4, 6, 3), width=8, scheme="batchnorm", num_classes=None)
    d = propagation.diagnose(propagation.measure(model, torch.randn(16, 3, 16, 16)))
    assert d.law == "linear" and "stage boundaries" in str(d), str(d)
