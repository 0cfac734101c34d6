"""``measure`` against independent direct computations, on networks not written for it."""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import propagation
from propagation import nets, zoo
from propagation.empirical import NoMergesError, NonFiniteWarning
from propagation.schemes import get_scheme, with_networks

# float32 activations, statistics reduced in float32 then averaged in float64: relative error
# ~ sqrt(n) * 2^-24 for a reduction over n ~ 1e4 values, i.e. < 1e-5.
FLOAT_RTOL = 1e-5


class MLPBlock(nn.Module):
    def __init__(self, width, norm=True):
        super().__init__()
        self.n1 = nn.BatchNorm1d(width) if norm else nn.Identity()
        self.l1 = nn.Linear(width, width, bias=False)
        self.n2 = nn.BatchNorm1d(width) if norm else nn.Identity()
        self.l2 = nn.Linear(width, width, bias=False)
        for layer in (self.l1, self.l2):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")

    def branch(self, x):
        return self.l2(torch.relu(self.n2(self.l1(torch.relu(self.n1(x))))))

    def forward(self, x):
        return x + self.branch(x)


def direct_stats(t, axis=1):
    """The three statistics written out plainly, in float64 NumPy."""
    a = np.moveaxis(t.detach().double().numpy(), axis, -1).reshape(-1, t.shape[axis])
    mean = a.mean(axis=0)
    var = ((a - mean) ** 2).mean(axis=0)
    return np.array([(mean ** 2 + var).mean(), (mean ** 2).mean(), var.mean()])


def profile_stats(stats, i):
    return np.array([stats.second_moment[i], stats.squared_mean[i], stats.variance[i]])


def test_forward_and_gradient_statistics_equal_direct_computation():
    torch.manual_seed(0)
    blocks = [MLPBlock(32) for _ in range(4)]
    model = nn.Sequential(*blocks)
    x = torch.randn(64, 32)
    prof = propagation.measure(model, x, seeds=1)

    # The same pass by hand, keeping every tensor.
    ref = copy.deepcopy(model).train()
    xs, bs = [x.clone().requires_grad_(True)], []
    for blk in ref:
        bs.append(blk.branch(xs[-1]))
        xs.append(xs[-1] + bs[-1])
    g = torch.randn(xs[-1].shape, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad((g * xs[-1]).sum(), xs)
    assert prof.depth == 4 and not prof.projection.any()
    for i in range(5):
        np.testing.assert_allclose(profile_stats(prof.skip, i), direct_stats(xs[i]), rtol=FLOAT_RTOL)
        expected = direct_stats(grads[i]) / direct_stats(grads[-1])[0]
        np.testing.assert_allclose(profile_stats(prof.grad, i), expected, rtol=FLOAT_RTOL)
    for i in range(4):
        np.testing.assert_allclose(profile_stats(prof.branch, i), direct_stats(bs[i]), rtol=FLOAT_RTOL)


def test_channel_axis_last_for_sequences():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)

    class Seq(nn.Module):
        def forward(self, x):
            return x + lin(x)
    x = torch.randn(4, 10, 8)
    prof = propagation.measure(Seq(), x, channel_axis=-1, backward=False)
    np.testing.assert_allclose(profile_stats(prof.skip, 0), direct_stats(x, axis=2), rtol=FLOAT_RTOL)
    np.testing.assert_allclose(profile_stats(prof.skip, 1), direct_stats(x + lin(x), axis=2),
                               rtol=FLOAT_RTOL)


def snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for m in model.modules()],
        "ids": [id(p) for p in model.parameters()] + [id(b) for b in model.buffers()],
    }


def assert_same(before, after):
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    for key in ("training", "requires_grad", "hooks", "ids"):
        assert before[key] == after[key], key
    for a, b in zip(before["grad"], after["grad"]):
        assert (a is None and b is None) or torch.equal(a, b)


def test_model_is_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(*[MLPBlock(16) for _ in range(3)]).eval()
    model[0].l1.weight.requires_grad_(False)
    model[1].l2.weight.grad = torch.ones_like(model[1].l2.weight)
    before = snapshot(model)
    x = torch.randn(32, 16)
    rng = torch.get_rng_state()
    propagation.measure(model, x, seeds=2)  # train mode would update BatchNorm's buffers
    assert_same(before, snapshot(model))
    assert torch.equal(rng, torch.get_rng_state())


def test_model_is_untouched_when_the_forward_pass_raises():
    torch.manual_seed(0)

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom in block 2")
    model = nn.Sequential(MLPBlock(16), MLPBlock(16), Boom())
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom in block 2") as info:
        propagation.measure(model, torch.randn(32, 16))
    assert "restored" in "".join(getattr(info.value, "__notes__", []))
    assert_same(before, snapshot(model))
    assert model[0].n1.num_batches_tracked.item() == 0


# --- third-party architectures, written as their libraries write them -----------------------
# (torchvision's blocks and ResNet live in propagation.zoo, which the zoo tests also use)

@pytest.mark.parametrize("block, layers, projections", [
    (zoo.TVBasicBlock, [2, 2, 2], [False, False, True, False, True, False]),
    (zoo.TVBottleneck, [1, 2], [True, True, False]),
])
def test_torchvision_style_resnets(block, layers, projections):
    torch.manual_seed(0)
    model = zoo.TVResNet(block, layers, width=8)
    prof = propagation.measure(model, torch.randn(8, 3, 16, 16))
    assert prof.depth == sum(layers)
    assert prof.projection.tolist() == projections
    # Identity blocks: the skip operand is the previous block's output, after its ReLU.
    assert np.all(np.isfinite(prof.grad.log2_second_moment))
    assert prof.grad.second_moment[-1] == pytest.approx(1.0)


def test_transformer_encoder_layers_pre_ln():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                       batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    x = torch.randn(4, 12, 32)
    for mode in ("train", "eval"):
        prof = propagation.measure(model, x, channel_axis=-1, mode=mode)
        assert prof.depth == 6  # attention and feed-forward merge per layer
        assert not prof.projection.any()
        np.testing.assert_allclose(profile_stats(prof.skip, 0), direct_stats(x, axis=2),
                                   rtol=FLOAT_RTOL)


class DataDependent(nn.Module):
    """Python control flow on tensor values: torch.fx cannot trace this."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(MLPBlock(16) for _ in range(3))

    def forward(self, x):
        for blk in self.blocks:
            if x.norm() > 0:
                x = blk(x)
        return x


def test_untraceable_model_is_measured_automatically():
    model = DataDependent()
    with pytest.raises(Exception):  # noqa: B017 (torch.fx raises several types, by version)
        torch.fx.symbolic_trace(model)
    prof = propagation.measure(model, torch.randn(32, 16))
    assert prof.depth == 3


class HiddenMerge(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return torch.stack([x, self.lin(torch.relu(x))]).sum(0)


def test_hidden_merges_need_named_blocks():
    model = nn.Sequential(HiddenMerge(), HiddenMerge())
    x = torch.randn(32, 16)
    with pytest.raises(NoMergesError, match="blocks="):
        propagation.measure(model, x)
    for blocks in ([HiddenMerge], ["0", "1"], "?"):
        prof = propagation.measure(model, x, blocks=blocks)
        assert prof.depth == 2
        np.testing.assert_allclose(profile_stats(prof.skip, 0), direct_stats(x), rtol=FLOAT_RTOL)
        np.testing.assert_allclose(profile_stats(prof.branch, 0),
                                   direct_stats(model[0].lin(torch.relu(x))), rtol=FLOAT_RTOL)


def test_several_seeds_give_median_and_samples():
    torch.manual_seed(0)
    models = [nn.Sequential(*[MLPBlock(32) for _ in range(3)]) for _ in range(3)]
    prof = propagation.measure(
        models, lambda s: torch.randn(64, 32, generator=torch.Generator().manual_seed(s)), seeds=3)
    assert len(prof.samples) == 3 and prof.meta["seeds"] == 3
    stack = np.stack([s.skip.log2_second_moment for s in prof.samples])
    np.testing.assert_allclose(prof.skip.log2_second_moment, np.median(stack, axis=0))
    lo, hi = prof.quantile(0.0), prof.quantile(1.0)
    assert np.all(lo.skip.log2_second_moment <= prof.skip.log2_second_moment)
    assert np.all(hi.skip.log2_second_moment >= prof.skip.log2_second_moment)


@pytest.mark.slow
def test_overflow_is_reported_with_the_first_block():
    torch.manual_seed(0)
    model = nn.Sequential(*[MLPBlock(128, norm=False) for _ in range(200)])
    x = torch.randn(16, 128)
    with pytest.warns(NonFiniteWarning, match="position"):
        prof = propagation.measure(model, x, backward=False)
    first = prof.first_nonfinite_block
    # Theory: q_l = 2^l passes float32's largest value (~2^128) at l = 128. At width 128,
    # log2 q_l / l spreads by ~sqrt(1/128) per block and the median grows a little slower
    # than 1 bit per block, so the first overflow lies between 110 and the last block.
    assert 110 < first < 200
    assert not np.isfinite(prof.skip.log2_second_moment[first])
    assert np.all(np.isfinite(prof.skip.log2_second_moment[:first]))
    prof64 = propagation.measure(model, x.double(), dtype=torch.float64, backward=False)
    assert prof64.first_nonfinite_block is None
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("model, inputs, kwargs, error, words", [
    ("not a model", torch.randn(4, 3), {}, TypeError, ["model", "nn.Module", "str"]),
    (nn.Linear(3, 3), torch.randn(3), {}, ValueError, ["rank", "(3,)"]),
    (nn.Linear(3, 3), torch.randn(1, 3), {}, ValueError, ["batch", "(1, 3)"]),
    (nn.Linear(3, 3), torch.randn(4, 3).double(), {}, TypeError, ["float64", "float32", "dtype="]),
    (nn.Linear(3, 3), [1, 2], {}, TypeError, ["inputs", "int"]),
    (nn.Linear(3, 3), torch.randn(4, 3), {"mode": "training"}, ValueError, ["mode", "'train'"]),
    (nn.Linear(3, 3), torch.randn(4, 3), {"seeds": 0}, ValueError, ["seeds", "0"]),
    (nn.Linear(3, 3), torch.randn(4, 3), {}, NoMergesError, ["no residual merges", "blocks="]),
])
def test_bad_input(model, inputs, kwargs, error, words):
    with pytest.raises(error) as info:
        propagation.measure(model, inputs, **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_a_model_that_changes_its_own_parameters_is_reported():
    from propagation.empirical import ModelChangedWarning

    class SelfEditing(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = MLPBlock(8)

        def forward(self, x):
            with torch.no_grad():
                self.block.l1.weight.mul_(1.0)  # an in-place write, as weight-norm hacks do
            return self.block(x)
    with pytest.warns(ModelChangedWarning, match="block.l1.weight|weight"):
        propagation.measure(SelfEditing(), torch.randn(16, 8))


def test_weak_identity_map_forgets_dead_tensors():
    """measure's graph maps tensors to nodes by identity without keeping them alive; a tensor
    that dies must take its entry with it, so that a new tensor reusing its id is unknown."""
    import gc
    from propagation.empirical import _WeakIds
    ids = _WeakIds()
    kept = torch.zeros(3)
    ids.set(kept, 1)
    for i in range(200):  # CPython reuses freed addresses: some of these share an id
        t = torch.ones(3)
        assert ids.get(t) is None and t not in ids
        ids.set(t, i)
        assert ids.get(t) == i
        ids.set(t, -i)  # an in-place op gives the same tensor a new node
        assert ids.get(t) == -i
        del t
    gc.collect()
    assert len(ids) == 1 and ids.get(kept) == 1 and ids.keys() == [kept]


def test_buffers_of_several_dtypes_are_restored_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(MLPBlock(8), MLPBlock(8))
    model.register_buffer("counter64", torch.arange(5, dtype=torch.float64))
    model.register_buffer("flag", torch.tensor(True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {k: id(v) for k, v in model.named_buffers()}
    propagation.measure(model, torch.randn(16, 8), seeds=2)  # train mode: BatchNorm writes
    after = model.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert ids == {k: id(v) for k, v in model.named_buffers()}


def test_blocks_select_the_outermost_matching_modules():
    torch.manual_seed(0)
    encoder = zoo.entry("torch_encoder").build()
    x = zoo.entry("torch_encoder").inputs(0)
    # "layers.*" matches every submodule of every layer; the outermost are the 4 layers.
    m = propagation.measure(encoder, x, channel_axis=-1, blocks=["layers.*"], backward=False)
    assert m.depth == 4 and m.names == ("layers.0", "layers.1", "layers.2", "layers.3")


def test_blocks_measure_projection_blocks_from_the_merge_inside():
    torch.manual_seed(0)
    model = zoo.TVResNet(zoo.TVBasicBlock, [2, 2], width=8)
    x = torch.randn(8, 3, 16, 16)
    auto = propagation.measure(model, x, backward=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no false overflow warning
        named = propagation.measure(model, x, blocks=[zoo.TVBasicBlock], backward=False)
    assert named.depth == auto.depth == 4 and named.projection[2]
    # The projection block's skip operand is its downsample's output, as the search finds.
    np.testing.assert_allclose(named.skip.log2_second_moment[:-1],
                               auto.skip.log2_second_moment[:-1], rtol=1e-6)
    assert np.isfinite(named.skip.log2_second_moment).all()


def test_a_zero_head_is_read_out_at_the_last_merge():
    torch.manual_seed(0)
    model = nets.residual_mlp(6, width=64, scheme="batchnorm", num_classes=10)
    nn.init.zeros_(model.head[-1].weight)
    nn.init.zeros_(model.head[-1].bias)
    with pytest.warns(propagation.empirical.ZeroGradientWarning, match="last merge"):
        m = propagation.measure(model, torch.randn(64, 64))
    assert m.readout == "last merge"
    assert np.isfinite(m.grad.log2_second_moment).all()
    assert m.grad.second_moment[-1] == 1.0


def test_the_median_of_exact_zeros_is_zero():
    torch.manual_seed(0)
    models = [nets.residual_mlp(4, width=32, scheme="skipinit", alpha=0.0) for _ in range(3)]
    m = propagation.measure(models, [torch.randn(32, 32) for _ in range(3)], seeds=3,
                            backward=False)
    assert np.all(m.branch.log2_second_moment == -np.inf)
    assert np.all(m.branch.second_moment == 0.0)


@pytest.mark.parametrize("scheme", with_networks())
@pytest.mark.parametrize("build", ["mlp", "conv"])
def test_measured_norms_sit_where_the_theory_puts_them(scheme, build):
    # Where each reference network's normalisations sit, read from the calls it makes, is
    # what its scheme's layer maps say: diagnose compares like with like through this.
    params = get_scheme(scheme).gate[0]
    torch.manual_seed(0)
    if build == "mlp":
        model, x = nets.residual_mlp(6, width=32, scheme=scheme, **params), torch.randn(16, 32)
    else:
        model = nets.resnet_v2((2, 2), width=8, scheme=scheme, block="basic", **params)
        x = torch.randn(4, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = propagation.measure(model, x, backward=False)
    theory = propagation.predict(**model.theory)
    assert m.branch_norm == theory.branch_norm, (scheme, m.branch_norm)
    ident = [l for l in range(1, m.depth) if not m.projection[l]]
    assert [m.post_norm[l] for l in ident] == [theory.post_norm[l] for l in ident], (
        scheme, m.post_norm)


def test_post_activation_and_hand_written_norms_are_named():
    # torchvision's relu(out + identity): an activation after the merge, BatchNorm in the
    # branch; a hand-written RMSNorm module (no norm call, only pow/mean/rsqrt) is a
    # "layer" norm by its class name; x.to(x.dtype) inside it is no new value.
    class RMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            x = x.to(torch.float32)
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    class PreNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.norm, self.fc = RMSNorm(d), nn.Linear(d, d)

        def forward(self, x):
            return x + self.fc(self.norm(x))

    torch.manual_seed(0)
    m = propagation.measure(nn.Sequential(*[PreNorm(16) for _ in range(3)]),
                            torch.randn(8, 4, 16), channel_axis=-1, backward=False)
    assert m.branch_norm == ("layer",) * 3 and m.post_norm == ("",) * 3
    tv = zoo.TVResNet(zoo.TVBasicBlock, (2, 2))
    m = propagation.measure(tv, torch.randn(4, 3, 32, 32), backward=False)
    assert set(m.branch_norm) == {"batch"}
    assert all(m.post_norm[l] == "activation" for l in range(1, m.depth) if not m.projection[l])


def _replay_cases():
    torch.manual_seed(0)
    yield "mlp", nets.residual_mlp(5, width=16, scheme="layernorm"), torch.randn(16, 16), 1
    yield "conv", nets.resnet_v2((2, 2), width=8, scheme="batchnorm", block="basic"), \
        torch.randn(4, 3, 16, 16), 1
    yield "tv", zoo.TVResNet(zoo.TVBottleneck, [1, 2]), torch.randn(4, 3, 16, 16), 1
    yield "mbconv", zoo.entry("efficientnet").build(), \
        zoo.entry("efficientnet").inputs(0), 1
    yield "encoder", zoo.entry("torch_encoder").build(), \
        zoo.entry("torch_encoder").inputs(0), -1


def _hf_replay_cases():
    for e in zoo.ENTRIES:
        if e.source == "transformers":
            torch.manual_seed(0)
            yield e.name, e.build(), e.inputs(0), e.channel_axis


@pytest.mark.parametrize("cases", [
    _replay_cases, pytest.param(_hf_replay_cases, marks=[pytest.mark.slow, pytest.mark.skipif(
        not zoo.available(), reason="needs the zoo extra")])], ids=["hand-written", "hugging-face"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_a_replayed_search_measures_what_the_search_does(backward, cases, monkeypatch):
    from propagation import empirical
    searches = []
    search = empirical._search

    def counted(*args):
        searches.append(1)
        return search(*args)
    monkeypatch.setattr(empirical, "_search", counted)
    for name, model, x, axis in cases():
        searches.clear()
        ref = propagation.measure(model, x, channel_axis=axis, backward=backward,
                                  search="always")
        first = propagation.measure(model, x, channel_axis=axis, backward=backward)
        again = propagation.measure(model, x, channel_axis=axis, backward=backward)
        # One search for "always", one for the first auto pass; the second is a replay.
        assert len(searches) == 2, name
        for got in (first, again):
            assert got.names == ref.names and got.branch_norm == ref.branch_norm
            assert got.post_norm == ref.post_norm
            np.testing.assert_array_equal(got.projection, ref.projection)
            for part in ("skip", "branch", "grad", "block_input"):
                for q in ("log2_second_moment", "log2_squared_mean", "log2_variance"):
                    # The same tensors: equal, up to the float32 rounding (2^-24 relative,
                    # 2e-7 in log2) of a different kernel that torch may pick for an op
                    # while a TorchFunctionMode is on (nn.MultiheadAttention's fast path).
                    np.testing.assert_allclose(getattr(getattr(got, part), q),
                                               getattr(getattr(ref, part), q), rtol=0,
                                               atol=1e-6, err_msg=f"{name} {part} {q}")
            np.testing.assert_allclose(got.merge_log2_second_moment, ref.merge_log2_second_moment,
                                       rtol=0, atol=1e-6, err_msg=f"{name} merge sums")


def test_a_changed_structure_is_searched_again():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([MLPBlock(8, norm=False) for _ in range(4)])
            self.skip_two = False

        def forward(self, x):
            for i, b in enumerate(self.blocks):
                if not (self.skip_two and i in (1, 2)):
                    x = b(x)
            return x
    torch.manual_seed(0)
    model, x = Gated(), torch.randn(16, 8)
    assert propagation.measure(model, x, backward=False).depth == 4
    model.skip_two = True  # same modules, two fewer merges: the replay sees it and searches
    got = propagation.measure(model, x, backward=False)
    ref = propagation.measure(model, x, backward=False, search="always")
    assert got.depth == ref.depth == 2 and got.names == ref.names


def test_a_replay_that_raises_leaves_no_mode_and_no_hook():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(*[MLPBlock(8, norm=False) for _ in range(3)])
            self.fail = False

        def forward(self, x):
            x = self.blocks[0](x)
            if self.fail:
                raise RuntimeError("boom")
            return self.blocks[2](self.blocks[1](x))
    torch.manual_seed(0)
    model, x = Flaky(), torch.randn(16, 8)
    propagation.measure(model, x, backward=False)
    model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        propagation.measure(model, x, backward=False)
    assert torch._C._len_torch_function_stack() == 0
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


@pytest.mark.parametrize("shape, axis", [((8, 64, 16, 16), 1), ((8, 2048, 2, 2), 1),
                                         ((8, 32, 96), -1), ((7, 13, 11), 1), ((6, 5), 1)])
@pytest.mark.parametrize("offset", [0.0, 3.0, 100.0], ids=["rho0", "rho0.9", "rho1"])
def test_channel_statistics_keep_float32_precision(shape, axis, offset):
    # Against the same float32 values reduced exactly in float64: the fast path's float32
    # row norms of <= 1024 entries err by a few roundings (<= 4 x 2^-24) relative of q, which
    # is at most 32 times that in the variance at its switch-over (variance >= 2^-5 q):
    # < 8e-6; past it (offset 100: rho = 1 - 1e-4) the centred form is exact to the float32
    # rounding of the means. 1e-5 relative covers both.
    from propagation.empirical import _channel_stats, _channel_stats_centred
    torch.manual_seed(0)
    a = axis % len(shape)
    t = torch.randn(shape) + offset * torch.randn(shape[a]).reshape(
        [-1 if i == a else 1 for i in range(len(shape))])
    exact = _channel_stats_centred(t.double(), a)
    np.testing.assert_allclose(_channel_stats(t, axis), exact, rtol=1e-5)


def test_operands_that_meet_only_at_token_ids_are_no_merge():
    # RoBERTa's embeddings: word and position embeddings both read the ids (the positions
    # are counted from them). A residual stream is a float tensor, so their sum is no merge;
    # the block after it is the only one.
    class Embedded(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(50, 16), nn.Embedding(40, 16)
            self.lin = nn.Linear(16, 16)

        def forward(self, ids):
            h = self.tok(ids) + self.pos(torch.cumsum(ids.ne(0).int(), dim=1))
            return h + self.lin(torch.relu(h))

    torch.manual_seed(0)
    model = Embedded()
    ids = torch.randint(1, 50, (4, 12))
    m = propagation.measure(model, ids, channel_axis=-1, backward=False)
    assert m.depth == 1
    with torch.no_grad():
        h = model.tok(ids) + model.pos(torch.cumsum(ids.ne(0).int(), dim=1))
    assert m.skip.second_moment[0] == pytest.approx(float((h ** 2).mean()), rel=1e-5)
