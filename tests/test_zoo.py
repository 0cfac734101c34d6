"""The zoo: third-party models as they ship (propagation.zoo), measured without help.

For every model: the true number of residual merges (each entry cites the source lines),
skip and branch the right way round (against hooks on the model's own modules), a name per
merge, nothing NaN, and the family diagnose names. The Hugging Face models need the `zoo`
extra (transformers).
"""
import warnings

import numpy as np
import pytest
import torch

import propagation
from propagation import zoo
from propagation.empirical import _channel_stats

HAND = [e for e in zoo.ENTRIES if e.source == "hand-written"]
HF = [e for e in zoo.ENTRIES if e.source == "transformers"]
needs_transformers = pytest.mark.skipif(not zoo.available(), reason="needs the zoo extra")


def measured(entry, seeds=1, backward=True):
    models = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        models.append(entry.build())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", propagation.OverflowToInfWarning)
        return models, propagation.measure(models, [entry.inputs(s) for s in range(seeds)],
                                           seeds=seeds, channel_axis=entry.channel_axis,
                                           backward=backward)


def check_entry(entry):
    (model,), m = measured(entry)
    assert m.depth == entry.merges, (entry.name, m.names)
    # Every merge is owned by a named module, and its operands are the oracle's tensors.
    assert m.names is not None and all(isinstance(n, str) for n in m.names)
    zoo.init_mode(model)
    operands = zoo.read_operands(model, entry.inputs(0), entry.oracle(model))
    assert len(operands) == entry.merges
    for k, (skip, branch) in enumerate(operands):
        want_skip = _channel_stats(skip, entry.channel_axis)[0]
        want_branch = _channel_stats(branch, entry.channel_axis)[0]
        # The same tensors, so equal; where the oracle reads the sum, branch = sum - skip
        # rounds once per entry in float32 (2^-24 relative of the sum), so 1e-5 relative.
        np.testing.assert_allclose(m.skip.second_moment[k], want_skip, rtol=1e-5,
                                   err_msg=f"{entry.name} merge {k} ({m.names[k]}): skip")
        np.testing.assert_allclose(m.branch.second_moment[k], want_branch, rtol=1e-5,
                                   err_msg=f"{entry.name} merge {k} ({m.names[k]}): branch")
    for part in ("skip", "branch"):
        stats = getattr(m, part)
        for q in ("second_moment", "squared_mean", "variance"):
            assert not np.isnan(getattr(stats, f"log2_{q}")).any(), (entry.name, part, q)
    assert not np.isnan(m.grad.log2_second_moment).any(), entry.name
    # diagnose names the family of the network the entry says it is, from where its
    # normalisations sit and how its statistics grow.
    d = propagation.diagnose(m)
    assert d.family == entry.family, (entry.name, d.structure, str(d))
    return m


@pytest.mark.parametrize("entry", HAND, ids=lambda e: e.name)
def test_hand_written_models(entry):
    check_entry(entry)


@pytest.mark.slow  # importing transformers and building its models: ~8 s in all
@needs_transformers
@pytest.mark.parametrize("entry", HF, ids=lambda e: e.name)
def test_hugging_face_models(entry):
    check_entry(entry)


@pytest.mark.slow
@needs_transformers
def test_the_false_merges_of_gelu_new_and_rotary_are_gone():
    # 4-layer GPT-2 and Llama: 8 merges each, none inside the MLP's activation or the
    # attention's rotary embedding.
    for name in ("gpt2", "llama"):
        _, m = measured(zoo.entry(name), backward=False)
        assert m.depth == 8
        assert not any(n.endswith(("act", "self_attn", "attn")) for n in m.names), m.names


def test_stochastic_layers_are_off_by_default_and_on_in_train_mode():
    entry = zoo.entry("efficientnet")
    torch.manual_seed(0)
    model = entry.build()
    x = entry.inputs(0)
    init = propagation.measure(model, x, backward=False)
    for m in model.modules():  # the same network without stochastic depth
        if isinstance(m, zoo.StochasticDepth):
            m.p = 0.0
    plain = propagation.measure(model, x, backward=False)
    np.testing.assert_array_equal(init.branch.log2_second_moment, plain.branch.log2_second_moment)
    for m in model.modules():
        if isinstance(m, zoo.StochasticDepth):
            m.p = 0.5
    noisy = propagation.measure(model, x, backward=False, mode="train")
    assert not np.array_equal(noisy.branch.log2_second_moment, plain.branch.log2_second_moment)
    assert init.mode == "init" and model.training  # the model's own flags are back


@pytest.mark.slow
@needs_transformers
def test_keyword_inputs_reach_the_model():
    entry = zoo.entry("bert")
    torch.manual_seed(0)
    model = entry.build()
    batch = entry.inputs(0)
    full = propagation.measure(model, batch, channel_axis=-1, backward=False)
    masked = dict(batch, attention_mask=batch["attention_mask"].clone())
    masked["attention_mask"][:, 8:] = 0
    half = propagation.measure(model, masked, channel_axis=-1, backward=False)
    assert full.depth == half.depth == 8
    # Masking changes what the attention sees, so the second block differs.
    assert half.branch.log2_second_moment[0] != full.branch.log2_second_moment[0]
