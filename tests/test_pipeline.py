"""propagation.check, the one pipeline (measure -> input_state -> predict -> compare ->
diagnose), and the state it starts the theory from."""
import json
import numpy as np
import pytest
import torch
from torch import nn

import propagation
from propagation import nets


def small_mlp():
    return nets.residual_mlp(6, width=64, scheme="batchnorm")


def test_check_on_a_reference_network_is_its_theory_and_agrees():
    c = propagation.check(small_mlp, (64, 64), seeds=2, progress=False)
    assert isinstance(c, propagation.Check) and c.ok, c.table()
    assert c.measured.depth == c.theory.depth == 6 and len(c.measured.samples) == 2
    # predict_kwargs is JSON and reproduces the theory exactly.
    again = propagation.predict(**json.loads(json.dumps(c.predict_kwargs)))
    np.testing.assert_array_equal(again.skip.log2_second_moment, c.theory.skip.log2_second_moment)
    assert c.predict_kwargs["scheme"] == "batchnorm"
    assert c.diagnosis is not None and "theory and measurement agree" in c.table()


def test_check_seeds_the_builder_and_the_inputs_as_documented():
    c = propagation.check(small_mlp, (64, 64), seeds=2, backward=False, progress=False)
    torch.manual_seed(1)
    model = small_mlp()
    x = propagation.gaussian_inputs((64, 64))(1)
    m = propagation.measure(model, x, backward=False)
    np.testing.assert_array_equal(c.measured.samples[1].skip.log2_second_moment,
                                  m.skip.log2_second_moment)
    assert "grad" not in {r.part for r in c.comparison.rows}


def test_another_scheme_keeps_only_the_structure():
    # A batchnorm network checked against "none": the theory is none's, with the network's
    # depth; batchnorm's linear growth parts from none's doubling.
    c = propagation.check(small_mlp, (64, 64), seeds=1, scheme="none", progress=False)
    assert c.predict_kwargs["scheme"] == "none" and c.theory.depth == 6
    assert not c.ok


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(32, 32)

    def forward(self, x):
        return x + self.f(torch.relu(x))


def test_a_model_without_theory_is_checked_against_its_own():
    # No .theory dict: the structural theory of the model (predict(model, inputs)).
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block())
    c = propagation.check(model, (64, 32), seeds=3, progress=False, diagnosis=False)
    assert c.theory.scheme == "model:Sequential" and c.predict_kwargs["weights"] == "held"
    assert c.ok, c.table()
    # A builder gives one model per seed: the theory of their initialisation law.
    c = propagation.check(lambda: nn.Sequential(_Block(), _Block()), (64, 32), seeds=3,
                          progress=False, diagnosis=False)
    assert c.predict_kwargs["weights"] == "law" and c.ok, c.table()


def test_theory_model_takes_no_predict_arguments():
    model = nn.Sequential(_Block(), _Block())
    with pytest.raises(TypeError, match="theory='model' takes no predict keyword"):
        propagation.check(model, (16, 32), theory="model", scheme="none", progress=False)
    with pytest.raises(ValueError, match="theory"):
        propagation.check(model, (16, 32), theory="schema", progress=False)


def test_a_single_block_is_checked_without_a_diagnosis():
    c = propagation.check(lambda: nets.residual_mlp(1, width=64), (64, 64), progress=False)
    assert c.diagnosis is None and "at least 2 blocks" in c.diagnosis_note
    assert c.ok and c.diagnosis_note in c.table()


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="quantities entry"):
        propagation.check(small_mlp, (64, 64), quantities=("mean",))
    with pytest.raises(TypeError, match="builder must return a torch.nn.Module"):
        propagation.check(lambda: 3, (64, 64))
    with pytest.raises(ValueError, match="seeds must be"):
        propagation.check(small_mlp, (64, 64), seeds=0)


def test_measured_merges_carry_the_owning_module_and_its_input():
    torch.manual_seed(0)
    model = nets.resnet_v2(stages=(2, 1), width=8, block="basic", num_classes=None)
    x = torch.randn(4, 3, 8, 8)
    m = propagation.measure(model, x)
    assert m.names == ("blocks.0", "blocks.1", "blocks.2")
    # Identity blocks: the block input is the skip operand itself.
    for l in (0, 1):
        assert not m.projection[l]
        assert m.block_input.log2_second_moment[l] == m.skip.log2_second_moment[l]
    # The projection block's input is the previous block's output.
    assert m.projection[2]
    assert m.block_input.log2_second_moment[2] == pytest.approx(
        m.merge_log2_second_moment[1], abs=1e-12)


def test_input_state_is_the_first_block_input_of_a_projection_first_network():
    """Issue 17: with a projection in block 0, the theory starts from the stem output (the
    block's input), not from the projection's output, which predict projects itself.

    Measured against theory, the first stage's skip squared mean (the projection's output,
    blocks 0-2). Tolerance: one initialisation's squared mean after the projection averages
    (w_c . mu)^2 over its 128 output channels, a chi-square with 128 degrees of freedom:
    sd of ln = sqrt(2 / 128) = 0.125 nats = 0.18 log2 (measured over seeds: 0.11). The median
    of 16 seeds has standard error 1.25 x 0.18 / 4 = 0.056 log2 at most; 0.1 log2 (the
    issue's target) is 1.8 such errors, 3 at the measured spread. Started from the
    projection's own output, the theory is 0.6 log2 off (the bug this guards against).
    """
    def build():
        return nets.resnet_v2(stages=(3, 1), width=32, scheme="skipinit", num_classes=None)
    c = propagation.check(build, (16, 3, 16, 16), seeds=16, backward=False, progress=False)
    assert c.measured.projection[0]
    stem_out = c.measured.block_input
    assert stem_out.log2_second_moment[0] != c.measured.skip.log2_second_moment[0]
    error = c.measured.skip.log2_squared_mean[:3] - c.theory.skip.log2_squared_mean[:3]
    assert np.all(np.abs(error) < 0.1), error


def test_cli_check_reports_a_failing_builder_in_one_line(capsys):
    from propagation.__main__ import main
    code = main(["check", "--model", "propagation.nets:residual_mlp", "--arg", "depth=3",
                 "--arg", "scheme=nonexistent", "--input", "8,8"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "unknown scheme 'nonexistent'" in err, err


def test_cli_check_on_one_block_exits_by_the_comparison_alone():
    from propagation.__main__ import main
    code = main(["check", "--model", "propagation.nets:residual_mlp", "--arg", "depth=1",
                 "--arg", "width=64", "--input", "64,64"])
    assert code == 0


def test_check_takes_the_stage_layout_from_the_measured_projections():
    # A torchvision-style ResNet has no .theory: with only a scheme named, the theory's
    # projections sit where the measurement found them (before, it had none: ResNet-18's
    # skip q was predicted 9.5 where 1.0 was measured).
    from propagation import zoo
    model = zoo.TVResNet(zoo.TVBasicBlock, [2, 2, 2], width=8)
    c = propagation.check(model, (8, 3, 16, 16), scheme="batchnorm", backward=False,
                          diagnosis=False, progress=False)
    assert c.predict_kwargs["stages"] == [2, 2, 2] and not c.predict_kwargs["project_first"]
    np.testing.assert_array_equal(c.theory.projection, c.measured.projection)
    # No projection in stage 1 unless asked: --project-first makes block 0 project.
    forced = propagation.check(model, (8, 3, 16, 16), scheme="batchnorm", backward=False,
                               diagnosis=False, progress=False, project_first=True)
    assert forced.theory.projection[0]
