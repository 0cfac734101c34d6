"""propagation.monitor: measure's statistics at sampled training steps, real gradients."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import propagation
from propagation import nets
from propagation.monitoring import read_log


def _setup(lr=0.1):
    torch.manual_seed(0)
    model = nets.resnet_v2((3,), width=8, scheme="batchnorm", block="basic", num_classes=10)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    return model, torch.optim.SGD(model.parameters(), lr=lr), x, y


def _train(model, opt, x, y, steps, **kw):
    with propagation.monitor(model, **kw) as mon:
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():  # an evaluation pass inside the loop is not a step
                model.eval()
                model(x)
                model.train()
    return mon


def _assert_same(a, b, atol=0.0):
    for part in ("skip", "branch", "grad"):
        for q in ("log2_second_moment", "log2_squared_mean", "log2_variance"):
            np.testing.assert_allclose(getattr(getattr(a, part), q), getattr(getattr(b, part), q),
                                       rtol=0, atol=atol, err_msg=f"{part} {q}")


def test_a_sampled_step_is_what_measure_sees_with_the_same_loss():
    model, opt, x, y = _setup()
    start = copy.deepcopy(model)
    mon = _train(model, opt, x, y, 7, every=3)
    assert sorted(mon.profiles) == [0, 3, 6] and mon.step == 7
    first = mon.profiles[0]
    assert first.readout == "loss" and first.names == ("blocks.0", "blocks.1", "blocks.2")
    ref = propagation.measure(start, x, loss=lambda out: F.cross_entropy(out, y), mode="keep",
                              search="always")
    # The same weights, input and loss: the same tensors, so the same statistics (the
    # gradients through the same kernels: bit for bit).
    _assert_same(first, ref)
    assert np.isfinite(first.grad.log2_second_moment).all()


def test_later_sampled_steps_replay_the_search_exactly():
    model, opt, x, y = _setup(lr=0.0)  # nothing changes between steps
    mon = _train(model, opt, x, y, 3, every=1)
    # Step 0 searched the call graph; steps 1 and 2 replayed it with hooks on the owners.
    _assert_same(mon.profiles[0], mon.profiles[1])
    _assert_same(mon.profiles[0], mon.profiles[2])


def test_the_training_changes_the_statistics_and_the_outputs_hold_them(tmp_path):
    model, opt, x, y = _setup(lr=0.5)
    log = tmp_path / "run.jsonl"
    mon = _train(model, opt, x, y, 11, every=5, log=str(log))
    assert sorted(read_log(log)) == [0, 5, 10]
    assert not np.array_equal(mon.profiles[0].grad.log2_second_moment,
                              mon.profiles[10].grad.log2_second_moment)
    mon.to_csv(tmp_path / "run.csv")
    rows = (tmp_path / "run.csv").read_text().splitlines()
    # header + 3 steps x 3 parts x 3 quantities x (4 skip + 3 branch + 4 grad positions)/3...
    assert rows[0] == "step,block,name,part,quantity,log2_value"
    assert len(rows) - 1 == 3 * 3 * (4 + 3 + 4)
    mon.to_json(tmp_path / "run.json")
    assert sorted(json.loads((tmp_path / "run.json").read_text())) == ["0", "10", "5"]
    ax = mon.plot("branch", "second_moment")
    assert len(ax.lines) == 3  # one per block


def test_off_steps_leave_nothing_and_the_model_keeps_no_hook():
    model, opt, x, y = _setup()
    mon = _train(model, opt, x, y, 4, every=10, first=1)
    assert sorted(mon.profiles) == [1]
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("kwargs, error, words", [
    ({"every": 0}, ValueError, ["every", "0"]),
    ({"first": -1}, ValueError, ["first", "-1"]),
    ({"log": 3}, TypeError, ["log"]),
])
def test_bad_arguments(kwargs, error, words):
    model, *_ = _setup()
    with pytest.raises(error) as err:
        propagation.monitor(model, **kwargs)
    assert all(w in str(err.value) for w in words)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, importing dynamo
def test_compiled_models_are_measured_through_their_module_and_not_monitored():
    # torch.compile(model) wraps the same module: measure reads it eagerly (nothing is
    # compiled here); monitor cannot hook generated code and says what to do instead.
    model, _, x, _ = _setup()
    compiled = torch.compile(model)
    _assert_same(propagation.measure(compiled, x), propagation.measure(model, x))
    with pytest.raises(TypeError, match="before compiling"):
        propagation.monitor(compiled)
