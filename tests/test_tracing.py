"""The convolutional geometry of networks written elsewhere, traced from a forward pass
(propagation/tracing.py), and check's use of it."""
import math

import pytest
import torch
from torch import nn

import propagation
from propagation import nets, pipeline, zoo
from propagation.tracing import traced_conv_geometry


class PreActBasic(nn.Module):
    """timm's ResNetV2 PreActBasic as timm writes it: norm1 -> act -> conv1 -> norm2 -> act ->
    conv2, the downsample conv reading the pre-activated input."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.norm1, self.norm2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.downsample = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                           if stride != 1 or cin != cout else None)
        for c in (self.conv1, self.conv2, self.downsample):
            if c is not None:
                nn.init.kaiming_normal_(c.weight, nonlinearity="relu")

    def forward(self, x):
        x_pre = torch.relu(self.norm1(x))
        shortcut = self.downsample(x_pre) if self.downsample is not None else x
        x = self.conv1(x_pre)
        x = self.conv2(torch.relu(self.norm2(x)))
        return x + shortcut


class PreActNet(nn.Module):
    def __init__(self, width=16, stages=(2, 2)):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(self.stem.weight, nonlinearity="linear")
        blocks, cin = [], width
        for i, n in enumerate(stages):
            for j in range(n):
                cout = width * 2 ** i
                blocks.append(PreActBasic(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(self.stem(x))


@pytest.mark.parametrize("block, scheme", [("basic", "batchnorm"), ("bottleneck", "batchnorm"),
                                           ("basic", "nf")])
def test_the_trace_reads_reference_networks_as_their_classes_do(block, scheme):
    torch.manual_seed(0)
    model = nets.resnet_v2(stages=(2, 2), width=16, scheme=scheme, block=block, num_classes=None)
    shape = (4, 3, 16, 16)
    traced = traced_conv_geometry(model, torch.randn(shape))
    known = nets.conv_geometry(model, shape)
    assert traced["blocks"] == known["blocks"] and traced["input_shape"] == known["input_shape"]
    [t], [k] = traced["stem"], known["stem"]
    # The stem's gain as drawn: fan_in mean(w^2) over 16 x 27 He weights has relative sd
    # sqrt(2 / 432) = 6.8%; 4 of them is 27%.
    assert abs(t.pop("gain2") / k.pop("gain2") - 1) < 0.27
    assert t == k


def test_the_trace_of_a_torchvision_style_net():
    # Post-activation blocks (conv-BN-ReLU-conv-BN, out += identity, ReLU), a 1x1 strided
    # downsample with its BatchNorm, and the CIFAR stem conv-BN-ReLU.
    model = zoo.TVResNet(zoo.TVBasicBlock, [2, 2], width=8)
    geo = traced_conv_geometry(model, torch.randn(2, 3, 16, 16))
    assert [s.get("op", "conv") for s in geo["stem"]] == ["conv", "batchnorm", "relu"]
    assert [len(b["branch"]) for b in geo["blocks"]] == [2, 2, 2, 2]
    assert [len(b["projection"]) for b in geo["blocks"]] == [0, 0, 1, 0]
    assert geo["blocks"][2]["projection"][0]["stride"] == [2, 2]
    assert geo["blocks"][2]["branch"][0]["stride"] == [2, 2]
    # kaiming_normal_(fan_out): gain2 = fan_in 2 / fan_out = 27 x 2 / 72 for the 3x3 stem.
    assert geo["stem"][0]["gain2"] == pytest.approx(27 * 2 / 72, rel=0.3)


def test_the_trace_leaves_the_model_as_it_came():
    model = zoo.TVResNet(zoo.TVBasicBlock, [1, 1], width=8).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    traced_conv_geometry(model, torch.randn(2, 3, 8, 8))
    assert not model.training and not any(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_what_has_no_position_map_is_refused():
    stem_pool = nets.resnet_v2(stages=(1,), width=8, scheme="none", block="basic",
                               stem="imagenet", num_classes=None)
    with pytest.raises(ValueError, match="MaxPool"):
        traced_conv_geometry(stem_pool, torch.randn(2, 3, 32, 32))
    se = zoo.EfficientNetish()  # squeeze-and-excitation: a mean over positions in the branch
    with pytest.raises(ValueError, match="no position map"):
        traced_conv_geometry(se, torch.randn(2, 3, 32, 32))
    dense = nets.residual_mlp(2, width=8)
    with pytest.raises(ValueError, match="N, C, H, W"):
        traced_conv_geometry(dense, torch.randn(4, 8))


def _worst(check, part, quantity):
    return max(abs(r.log_ratio - r.centre) for r in check.comparison.rows
               if r.part == part and r.quantity == quantity and r.resolved)


def test_check_gives_a_net_written_elsewhere_the_position_theory(monkeypatch):
    # A timm-style ResNetV2 on 8x8 maps against the batchnorm scheme: with its traced
    # geometry the theory has exact zero padding; before, such a network got no padding
    # correction at all (only propagation.nets networks had a geometry).
    shape = (8, 3, 8, 8)
    kw = dict(seeds=3, theory={"scheme": "batchnorm"}, progress=False, diagnosis=False)
    check = propagation.check(lambda: PreActNet(), shape, **kw)
    assert "positions" in check.predict_kwargs and check.ok, check.table()
    assert check.predict_kwargs["positions"]["blocks"][2]["projection"]
    monkeypatch.setattr(pipeline, "_conv_geometry", lambda model, shape: None)
    blind = propagation.check(lambda: PreActNet(), shape, **kw)
    assert "positions" not in blind.predict_kwargs
    # The skip path's second moment: 3 3x3 convs per block on 8x8 maps lose ~16% each
    # at the borders (nets.padding_factors), which the blind theory misses by over 0.15
    # nats by block 4; the position theory is within the 3-seed noise (~0.05 nats).
    assert _worst(check, "skip", "second_moment") < 0.1
    assert _worst(blind, "skip", "second_moment") > 0.15
    assert _worst(check, "skip", "second_moment") < _worst(blind, "skip", "second_moment") / 2
    assert math.isfinite(_worst(check, "grad", "second_moment"))
