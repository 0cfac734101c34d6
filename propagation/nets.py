"""Reference PyTorch networks: every built-in scheme as a real, trainable residual network.

Each scheme of the registry (schemes.py) builds its residual block from layer maps; the
networks here are those blocks made of real layers, one block factory per scheme, named by
the scheme's registration (``network=``), so that ``propagation.predict(**model.theory)`` is
the infinite-width theory of ``model``.

Every network is ``stem -> blocks -> head``. A block is a :class:`ResidualBlock`::

    out = pre(x)                                        # shared by branch and projection
    skip = projection(out) if projection else x
    y = skip + branch(out)                              # the merge: a plain tensor addition
    return post(y)

``branch`` ends with the scheme's branch multiplier (SkipInit's alpha, NF's alpha, Fixup's
scale), so its output is exactly the merge's branch operand, and the merge is the only
addition of two activation-sized tensors in a block (Fixup's scalar biases add 0-d
parameters). Hooks on ``block`` (input x_l), ``block.branch`` (output f_l) and ``block.post``
(input: the merge output) therefore read the quantities ``predict`` describes.

Models are returned in train mode: BatchNorm in eval mode at initialisation is the identity
(running statistics 0 and 1), which silently turns a BN network into an unnormalised one.

References: He et al. 2016 (ResNet-V2), Zagoruyko & Komodakis 2016 (Wide ResNets), De & Smith
2020 (SkipInit), Zhang, Dauphin & Ma 2019 (Fixup), Brock, De & Smith 2021 (NF-ResNets, Scaled
Weight Standardisation).
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from . import _checks, kernels
from .predict import make_plan
from .schemes import get_scheme, nf_expected_variance, with_networks

__all__ = ["resnet_v2", "wide_resnet", "residual_mlp", "WSConv2d", "WSLinear",
           "ResidualBlock", "ResidualNetwork", "supported_schemes", "padding_factors",
           "conv_geometry", "exact_variance_"]

#: The fixed gain of a Scaled-WS layer after a ReLU: sqrt(2 / (1 - 1/pi)).
WS_GAIN = math.sqrt(kernels.WS_RELU_GAIN2)


# --- layers -----------------------------------------------------------------------------------

class _WSMixin:
    """Scaled Weight Standardisation (Brock, De & Smith 2021).

    The weight used is ``gain * channel_gain * (W - mean) / (std * sqrt(fan_in))`` with mean
    and population std over the fan-in of each output channel; ``W`` is initialised N(0, 1)
    and ``channel_gain`` (learnable, one per output channel) to 1. Each output channel of the
    used weight has zero mean and squared norm ``gain^2``. ``eps`` bounds ``var * fan_in``
    from below (as in the NFNet reference code) so a constant channel gives zero, not NaN.
    """

    def _init_ws(self, gain, eps):
        self.gain = float(gain)
        self.eps = float(eps)
        self.channel_gain = nn.Parameter(torch.ones(self.weight.shape[0],
                                                    dtype=self.weight.dtype,
                                                    device=self.weight.device))

    def reset_parameters(self):
        # Called by the nn.Conv2d / nn.Linear constructors, before _init_ws.
        with torch.no_grad():
            self.weight.normal_(0.0, 1.0)
            if self.bias is not None:
                self.bias.zero_()

    def standardized_weight(self):
        """The weight the layer applies: shape of ``weight``, zero mean per output channel."""
        flat = self.weight.flatten(1)
        mean = flat.mean(dim=1, keepdim=True)
        var = flat.var(dim=1, unbiased=False, keepdim=True)
        scale = torch.rsqrt(torch.clamp(var * flat.shape[1], min=self.eps))
        scale = scale * (self.gain * self.channel_gain.unsqueeze(1))
        return ((flat - mean) * scale).view_as(self.weight)


class WSConv2d(_WSMixin, nn.Conv2d):
    """A Conv2d with Scaled Weight Standardisation (see :class:`WSLinear` for the weight).

    Args: those of ``nn.Conv2d`` (``bias`` defaults to False), then ``gain`` (default
    sqrt(2 / (1 - 1/pi)), the ReLU gain) and ``eps``. Input (N, C_in, H, W).
    Reference: Brock, De & Smith 2021 (NF-ResNets); Qiao et al. 2019 (Weight Standardisation).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=False, *, gain=WS_GAIN, eps=1e-4):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=padding, dilation=dilation, groups=groups, bias=bias)
        self._init_ws(gain, eps)

    def forward(self, x):
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class WSLinear(_WSMixin, nn.Linear):
    """A Linear layer with Scaled Weight Standardisation.

    The weight applied is ``gain * channel_gain * (W - mean) / (std * sqrt(fan_in))``, mean and
    population std over the fan-in of each output unit, W ~ N(0, 1) at initialisation, so each
    output unit's weights have zero mean and squared norm gain^2. After a ReLU the default
    gain sqrt(2 / (1 - 1/pi)) keeps the variance of a unit-variance Gaussian input.

    Args: in_features, out_features, bias (default False), gain, eps. Input (N, in_features).
    Reference: Brock, De & Smith 2021 (NF-ResNets).
    """

    def __init__(self, in_features, out_features, bias=False, *, gain=WS_GAIN, eps=1e-4):
        super().__init__(in_features, out_features, bias=bias)
        self._init_ws(gain, eps)

    def forward(self, x):
        return F.linear(x, self.standardized_weight(), self.bias)


class _Scale(nn.Module):
    """Multiply by a scalar: a learnable parameter or a fixed buffer."""

    def __init__(self, value, learnable=False):
        super().__init__()
        value = torch.tensor(float(value))
        if learnable:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

    def forward(self, x):
        return x * self.scale

    def extra_repr(self):
        return f"{self.scale.item():.6g}" + (", learnable" if self.scale.requires_grad else "")


class _Bias(nn.Module):
    """Fixup's scalar bias, initialised to 0 (a 0-d parameter)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + self.bias


class ResidualBlock(nn.Module):
    """One residual block: ``post(skip + branch(pre(x)))``, skip = ``projection(pre(x))`` or x.

    Attributes: ``pre``, ``branch``, ``post`` (``nn.Sequential``, empty = identity) and
    ``projection`` (``nn.Sequential`` or None). The merge is the plain addition
    ``skip + branch`` (skip operand first), never fused with another op, so a tool that
    intercepts tensor additions sees both operands.
    """

    def __init__(self, pre=(), branch=(), projection=None, post=()):
        super().__init__()
        self.pre = nn.Sequential(*pre)
        self.branch = nn.Sequential(*branch)
        self.projection = None if projection is None else nn.Sequential(*projection)
        self.post = nn.Sequential(*post)

    def forward(self, x):
        out = self.pre(x)
        skip = x if self.projection is None else self.projection(out)
        branch = self.branch(out)
        y = skip + branch
        return self.post(y)


class ResidualNetwork(nn.Module):
    """``stem -> blocks -> head``, returned by :func:`resnet_v2`, :func:`wide_resnet` and
    :func:`residual_mlp`.

    The last block has no ``post``: its merge output is the residual stream x_D, which the
    head reads and which is ``predict``'s ``skip[-1]``. Only sqrt_half (its final 1/sqrt(2))
    and postnorm (its final norm, which the head's norm replaces) have a post to leave out.

    Attributes:
        stem: ``nn.Sequential`` (empty for the MLP).
        blocks: ``nn.Sequential`` of :class:`ResidualBlock`.
        head: ``nn.Sequential`` or None (then ``forward`` returns the residual stream x_D).
        theory: dict such that ``propagation.predict(**model.theory)`` is this network's theory.
        projection: list of bools, one per block, True where the block has a projection.
        scheme, params: the scheme name and its cleaned parameters (defaults filled in).
    """

    def __init__(self, stem, blocks, head, theory, projection):
        super().__init__()
        self.stem = nn.Sequential(*stem)
        self.blocks = nn.Sequential(*blocks)
        self.head = None if head is None else nn.Sequential(*head)
        self.theory = theory
        self.projection = projection
        self.scheme = theory["scheme"]
        self.params = {k: v for k, v in theory.items()
                       if k not in ("depth", "scheme", "stages", "project_first", "layers")}

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return x if self.head is None else self.head(x)


# --- weight layers and normalisations, for conv and dense networks ----------------------------

@dataclass(frozen=True)
class _W:
    """One weight layer of a block: channels in and out, kernel size, stride."""

    c_in: int
    c_out: int
    kernel: int = 1
    stride: int = 1


@dataclass(frozen=True)
class _Geometry:
    """A block's weight layers: the branch (in order) and the projection (or None)."""

    branch: tuple
    projection: Optional[_W] = None

    @property
    def c_in(self):
        return self.branch[0].c_in

    @property
    def c_out(self):
        return self.branch[-1].c_out


def _normal_(weight, gain2):
    # N(0, gain2 / fan_in); gain2 = 2 is nn.init.kaiming_normal_(mode="fan_in", "relu").
    fan_in = weight[0].numel()
    with torch.no_grad():
        if gain2 == 0.0:
            weight.zero_()
        else:
            weight.normal_(0.0, math.sqrt(gain2 / fan_in))
    # The nominal variance x fan-in, for exact_variance_ (an attribute: it travels with the
    # parameter, and a tensor cannot be a weak dictionary key).
    weight._nominal_gain2 = float(gain2)
    return weight


def exact_variance_(model):
    """Rescale, in place, every weight a reference network drew (stem, branches,
    projections) so that its second moment is exactly its nominal gain2 / fan_in.

    A drawn layer's realised scale differs from the law's by a relative O(1/sqrt(entries)),
    which ``predict(model, x, weights="law")`` follows; after this call it equals
    ``predict(**model.theory)`` to rounding (tests/test_structural.py). Returns ``model``.
    """
    with torch.no_grad():
        for p in model.parameters():
            gain2 = getattr(p, "_nominal_gain2", None)
            if gain2:
                p.mul_(math.sqrt(gain2 / p[0].numel() / float(p.double().pow(2).mean())))
    return model


class _ConvKit:
    """Conv2d weights (padding k // 2), BatchNorm2d, GroupNorm(1, C) as the LayerNorm."""

    def weight(self, w, gain2=2.0):
        conv = nn.Conv2d(w.c_in, w.c_out, w.kernel, stride=w.stride, padding=w.kernel // 2,
                         bias=False)
        _normal_(conv.weight, gain2)
        return conv

    def ws(self, w):
        return WSConv2d(w.c_in, w.c_out, w.kernel, stride=w.stride, padding=w.kernel // 2)

    def batchnorm(self, c):
        return nn.BatchNorm2d(c)

    def layernorm(self, c):
        # Normalises each example over (C, H, W): the per-example norm of THEORY.md.
        return nn.GroupNorm(1, c)

    def pool(self):
        return [nn.AdaptiveAvgPool2d(1), nn.Flatten()]


class _DenseKit:
    """Linear weights without bias, BatchNorm1d, LayerNorm(width)."""

    def weight(self, w, gain2=2.0):
        lin = nn.Linear(w.c_in, w.c_out, bias=False)
        _normal_(lin.weight, gain2)
        return lin

    def ws(self, w):
        return WSLinear(w.c_in, w.c_out)

    def batchnorm(self, c):
        return nn.BatchNorm1d(c)

    def layernorm(self, c):
        return nn.LayerNorm(c)

    def pool(self):
        return []


# --- the schemes: one factory per registry entry -----------------------------------------------
# A factory takes (plan, kit, **params) and returns block(l, geometry) -> ResidualBlock.
# Each mirrors the scheme's build in schemes.py; the comments name the layer maps.

def _chain(weights, make, between):
    """weight_0, between(c), weight_1, ...: the branch after the shared ``pre``."""
    layers = []
    for i, w in enumerate(weights):
        if i:
            layers += between(w.c_in)
        layers.append(make(w))
    return layers


def _pre_act(plan, kit, norm=None, branch_end=(), post=None):
    """[norm] ReLU shared, then He weights with [norm] ReLU between (``_he_branch``)."""
    weight = kit.weight

    def between(c):
        return ([norm(c)] if norm else []) + [nn.ReLU()]

    def block(l, g):
        return ResidualBlock(pre=between(g.c_in),
                             branch=_chain(g.branch, weight, between) + [m() for m in branch_end],
                             projection=[weight(g.projection)] if g.projection else None,
                             post=[m(g.c_out) for m in (post or ())])
    return block


def _batchnorm(plan, kit):
    # pre = (BatchNorm,), branch = ReLUWeight, (BatchNorm, ReLUWeight) * (layers - 1)
    return _pre_act(plan, kit, norm=kit.batchnorm)


def _none(plan, kit):
    return _pre_act(plan, kit)


def _sqrt_half(plan, kit):
    # post = (Gain(2 ** -0.5),): merge first, then scale.
    return _pre_act(plan, kit, post=[lambda c: _Scale(2 ** -0.5)])


def _skipinit(plan, kit, alpha):
    return _pre_act(plan, kit, branch_end=[lambda: _Scale(alpha, learnable=True)])


def _layernorm(plan, kit):
    return _pre_act(plan, kit, norm=kit.layernorm)


def _postnorm(plan, kit):
    # post = (LayerNorm,) after the merge, unnormalised He branch.
    return _pre_act(plan, kit, post=[kit.layernorm])


def _fixup(plan, kit):
    # Theory: He branch whose last weight layer is Zero; the down-scaling of the other
    # layers by L^(-1/(2m-2)) cannot show in the profile because the branch output is 0.
    L, m = plan.depth, plan.layers
    shrink2 = float(L) ** (-1.0 / (m - 1)) if m > 1 else 1.0  # (L^(-1/(2m-2)))^2

    def block(l, g):
        branch = []
        for i, w in enumerate(g.branch):
            if i:
                branch += [_Bias(), nn.ReLU(), _Bias()]
            last = i == len(g.branch) - 1
            branch.append(kit.weight(w, 0.0 if last else 2.0 * shrink2))
        branch.append(_Scale(1.0, learnable=True))
        # The first bias sits in ``pre`` and so also feeds the projection, as in Fixup's
        # reference code (downsample(x + bias1a)).
        return ResidualBlock(pre=[nn.ReLU(), _Bias()], branch=branch,
                             projection=[kit.weight(g.projection)] if g.projection else None)
    return block


def _nf(plan, kit, alpha, ws=True):
    # pre = BlockGain(1 / beta_l^2), branch = ReLUScaledWS * layers + Gain(alpha),
    # projection = (ReLUScaledWS,) on the same x / beta_l.
    inv_beta = (1.0 / np.sqrt(nf_expected_variance(plan, alpha))).tolist()
    weight = kit.ws if ws else kit.weight

    def block(l, g):
        return ResidualBlock(pre=[nn.ReLU(), _Scale(inv_beta[l])],
                             branch=_chain(g.branch, weight, lambda c: [nn.ReLU()])
                             + [_Scale(alpha)],
                             projection=[weight(g.projection)] if g.projection else None)
    return block


def _nf_he(plan, kit, alpha):
    return _nf(plan, kit, alpha, ws=False)


def _relu_bn_conv(plan, kit, gain2):
    # branch = (ReLU, BatchNorm, Linear(gain2)) * layers, projection = one such unit.
    def unit(w):
        return [nn.ReLU(), kit.batchnorm(w.c_in), kit.weight(w, gain2)]

    def block(l, g):
        return ResidualBlock(branch=[m for w in g.branch for m in unit(w)],
                             projection=unit(g.projection) if g.projection else None)
    return block


def supported_schemes():
    """Names of the registered schemes that have a reference network (sorted)."""
    return with_networks()


# --- checks -----------------------------------------------------------------------------------

def _scheme(scheme, params):
    """The registry entry and the cleaned parameters (defaults filled in) of ``scheme``."""
    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a str, got {scheme!r} of type {type(scheme).__name__}")
    supported = with_networks()
    if scheme not in supported:
        try:
            get_scheme(scheme)
            what = f"scheme {scheme!r} is registered but has no reference network"
        except ValueError:
            what = f"unknown scheme {scheme!r}"
        raise ValueError(f"{what}; networks exist for: {', '.join(supported)}"
                         + _checks.close_names(scheme, supported))
    spec = get_scheme(scheme)
    return spec, spec.clean_params(params)


def _stages(stages):
    try:
        stages = tuple(stages)
    except TypeError:
        raise TypeError(f"stages must be a non-empty sequence of positive ints, got {stages!r}") \
            from None
    if not stages:
        raise ValueError("stages must be a non-empty sequence of positive ints, got ()")
    for i, n in enumerate(stages):
        try:
            _checks.positive_int(f"stages[{i}]", n)
        except (TypeError, ValueError) as err:
            raise type(err)(f"stages must be a non-empty sequence of positive ints, got "
                            f"{stages!r}: {err}") from None
    return tuple(int(n) for n in stages)


def _num_classes(num_classes):
    return None if num_classes is None else _checks.positive_int("num_classes", num_classes)


# --- assembly ---------------------------------------------------------------------------------

def _assemble(net, params, scheme, kit, stem, geometries, stages, layers, c_final, num_classes):
    """Blocks from per-block geometries, the head, and the ``theory`` dict."""
    projection = [g.projection is not None for g in geometries]
    # Blocks other than the first of a stage never project; the first of a later stage
    # always does (stride 2), so the theory's plan is fixed by whether block 0 projects.
    theory = {"depth": len(geometries), "scheme": scheme, "stages": stages,
              "project_first": bool(projection[0]) if stages is not None else False,
              "layers": layers, **params}
    plan = make_plan(len(geometries), stages, theory["project_first"], layers)
    if plan.projection.tolist() != projection:
        raise AssertionError(f"internal: blocks {projection} do not match the plan "
                             f"{plan.projection.tolist()}")
    block = net.network_factory()(plan, kit, **params)
    blocks = [block(l, g) for l, g in enumerate(geometries)]
    # The last merge is the network's output x_D (predict's skip[-1], where the read-out of
    # the gradient theory sits): its post (sqrt_half's scale, postnorm's norm) is left out;
    # the head's norm plays the final norm's part.
    blocks[-1].post = nn.Sequential()
    head = None
    if num_classes is not None:
        norm = [getattr(kit, net.head_norm)(c_final)] if net.head_norm else []
        head = norm + [nn.ReLU()] + kit.pool() + [nn.Linear(c_final, num_classes)]
    return ResidualNetwork(stem, blocks, head, theory, projection)


def _stem_conv(c_in, c_out, kernel, stride):
    # Gain 1 and no ReLU before it: an i.i.d. N(0, 1) input gives block 0 an input with
    # second moment ~1 (less the zero-padding loss at the border) and channel means ~0.
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    _normal_(conv.weight, 1.0)
    return conv


def _conv_resnet(scheme, params, block, stages, widths, c_stem, stem_layers, num_classes):
    """The ResNet-V2 / WRN body: stage s has base width widths[s], stride 1 then 2."""
    net, params = _scheme(scheme, params)
    geometries = []
    c = c_stem
    for s, (n, w) in enumerate(zip(stages, widths)):
        for i in range(n):
            stride = 2 if (s > 0 and i == 0) else 1
            if block == "basic":
                branch = (_W(c, w, 3, stride), _W(w, w, 3))
            else:
                branch = (_W(c, w, 1), _W(w, w, 3, stride), _W(w, 4 * w, 1))
            c_out = branch[-1].c_out
            proj = _W(c, c_out, 1, stride) if (c != c_out or stride != 1) else None
            geometries.append(_Geometry(branch, proj))
            c = c_out
    layers = 2 if block == "basic" else 3
    return _assemble(net, params, scheme, _ConvKit(), stem_layers, geometries, stages, layers,
                     c, num_classes)


def resnet_v2(stages=(3, 4, 6, 3), width=64, scheme="batchnorm", block="bottleneck",
              stem="cifar", in_channels=3, num_classes=10, **params):
    """A pre-activation ResNet (ResNet-V2) whose blocks are those of ``scheme``.

    Args:
        stages: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50. Stage s has base width
            ``width * 2**s`` and stride 1 (s = 0) or 2 (its first block).
        width: base width of stage 0 and the stem's output channels.
        scheme: a scheme name with a network (:func:`supported_schemes`).
        block: "basic" (3x3, 3x3; output w_s channels, 2 weight layers) or "bottleneck"
            (1x1, 3x3 with the stride, 1x1; output 4 w_s channels, 3 weight layers).
        stem: "cifar" (3x3 conv) or "imagenet" (7x7 stride-2 conv, 3x3 stride-2 max-pool);
            the conv is N(0, 1/fan_in) with no bias and no ReLU.
        in_channels: input channels.
        num_classes: classes of the head (the scheme's norm, ReLU, global average pool,
            Linear); None for no head: the model then returns the residual stream x_D (the
            last merge's output; see :class:`ResidualNetwork`).
        **params: the scheme's parameters (e.g. alpha), checked by the registry.

    Input (N, in_channels, H, W); output (N, num_classes) or (N, C, H', W').
    A block has a 1x1 projection shortcut exactly when its channels or resolution change.

    Returns: a :class:`ResidualNetwork` with ``theory`` and ``projection``.
    Reference: He et al. 2016, "Identity Mappings in Deep Residual Networks".
    """
    stages = _stages(stages)
    width = _checks.positive_int("width", width)
    block = _checks.choice("block", block, ("basic", "bottleneck"))
    stem = _checks.choice("stem", stem, ("cifar", "imagenet"))
    in_channels = _checks.positive_int("in_channels", in_channels)
    num_classes = _num_classes(num_classes)
    if stem == "cifar":
        stem_layers = [_stem_conv(in_channels, width, 3, 1)]
    else:
        stem_layers = [_stem_conv(in_channels, width, 7, 2), nn.MaxPool2d(3, 2, 1)]
    widths = [width * 2 ** s for s in range(len(stages))]
    return _conv_resnet(scheme, params, block, stages, widths, width, stem_layers, num_classes)


def wide_resnet(depth=16, k=4, scheme="batchnorm", num_classes=10, **params):
    """A Wide ResNet WRN-depth-k (pre-activation basic blocks) with ``scheme``'s blocks.

    Args:
        depth: 6 N + 4 for N >= 1 basic blocks per stage (10, 16, 22, 28, 40, ...).
        k: widening factor; stage widths 16 k, 32 k, 64 k with strides 1, 2, 2.
        scheme, **params: as :func:`resnet_v2`.
        num_classes: as :func:`resnet_v2`.

    Input (N, 3, H, W): a 3x3 gain-1 stem conv to 16 channels. Block 0 has a projection
    exactly when k != 1. Returns a :class:`ResidualNetwork`.
    Reference: Zagoruyko & Komodakis 2016, "Wide Residual Networks".
    """
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"depth must be an int, got {depth!r} of type {type(depth).__name__}")
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6 N + 4 with an integer N >= 1 blocks per stage "
                         f"(10, 16, 22, 28, ...), got depth={depth!r}")
    k = _checks.positive_int("k", k)
    num_classes = _num_classes(num_classes)
    n = (depth - 4) // 6
    return _conv_resnet(scheme, params, "basic", (n, n, n), [16 * k, 32 * k, 64 * k], 16,
                        [_stem_conv(3, 16, 3, 1)], num_classes)


def residual_mlp(depth, width=256, scheme="batchnorm", num_classes=None, **params):
    """A residual MLP of ``depth`` blocks, each a ``scheme`` block of two width x width layers.

    Args:
        depth: number of residual blocks.
        width: features of the input and of every layer.
        scheme, **params: as :func:`resnet_v2`; norms are BatchNorm1d and LayerNorm(width).
        num_classes: None (default: return the residual stream x_D, (N, width)) or the
            classes of a head (the scheme's norm, ReLU, Linear(width, num_classes)).

    Input (N, width); there is no stem, so block 0 reads the input itself. Linear layers
    have no bias. Returns a :class:`ResidualNetwork` (no projection blocks).
    """
    depth = _checks.positive_int("depth", depth)
    width = _checks.positive_int("width", width)
    num_classes = _num_classes(num_classes)
    net, params = _scheme(scheme, params)
    geometry = _Geometry((_W(width, width), _W(width, width)))
    return _assemble(net, params, scheme, _DenseKit(), [], [geometry] * depth, None, 2, width,
                     num_classes)


# --- transformers -------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """Multi-head softmax self-attention, no biases, written plainly (q, k, v, o Linear layers
    and ``F.scaled_dot_product_attention``).

    Query and key weights have variance ``logit_std / width`` each, so a logit between two
    unit-norm tokens has variance logit_std^2 (the theory's g); value and output weights
    ``gain2 / width`` (DeepNorm's beta^2 x xavier's 1 / width)."""

    def __init__(self, width, heads, logit_std=0.0, causal=False, gain2=1.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width must be a multiple of heads, got width={width}, heads={heads}")
        self.heads, self.causal = heads, bool(causal)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width, bias=False) for _ in range(4))
        for lin in (self.q, self.k):
            _normal_(lin.weight, logit_std)
        for lin in (self.v, self.o):
            _normal_(lin.weight, gain2)

    def forward(self, x):
        b, t, c = x.shape
        h = self.heads

        def split(y):
            return y.view(b, t, h, c // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                             is_causal=self.causal)
        return self.o(out.transpose(1, 2).reshape(b, t, c))


class FeedForward(nn.Module):
    """Linear(width, 4 width) with variance gain2 / fan_in, ReLU, Linear(4 width, width) with
    2 gain2 / fan_in (He): the second moment passes unchanged at gain2 = 1."""

    def __init__(self, width, gain2=1.0, expansion=4):
        super().__init__()
        self.fc1 = nn.Linear(width, expansion * width, bias=False)
        self.fc2 = nn.Linear(expansion * width, width, bias=False)
        _normal_(self.fc1.weight, gain2)
        _normal_(self.fc2.weight, 2.0 * gain2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class TransformerLayer(nn.Module):
    """One transformer layer, two residual merges, in the way libraries write them:

    * ``norm="pre"``: ``x = x + alpha * attn(ln1(x)); x = x + alpha * mlp(ln2(x))``;
    * ``norm="post"``: ``x = ln1(skip_gain * x + attn(x)); x = ln2(skip_gain * x + mlp(x))``;
    * ``norm="none"``: ``x = x + alpha * attn(x); x = x + alpha * mlp(x)``.

    ``alpha`` is a learnable scalar (ReZero), a learnable per-channel vector (LayerScale,
    ``per_channel=True``), or None for no multiplier.
    """

    def __init__(self, width, heads, norm, logit_std=0.0, causal=False, alpha=None,
                 per_channel=False, skip_gain=1.0, gain2=1.0):
        super().__init__()
        self.norm = norm
        self.attn = SelfAttention(width, heads, logit_std, causal, gain2)
        self.mlp = FeedForward(width, gain2)
        if norm != "none":
            self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.skip_gain = float(skip_gain)
        if alpha is None:
            self.alpha1 = self.alpha2 = None
        else:
            shape = (width,) if per_channel else ()
            self.alpha1 = nn.Parameter(torch.full(shape, float(alpha)))
            self.alpha2 = nn.Parameter(torch.full(shape, float(alpha)))

    def _scaled(self, y, alpha):
        return y if alpha is None else alpha * y

    def forward(self, x):
        if self.norm == "pre":
            x = x + self._scaled(self.attn(self.ln1(x)), self.alpha1)
            return x + self._scaled(self.mlp(self.ln2(x)), self.alpha2)
        if self.norm == "post":
            skip = x if self.skip_gain == 1.0 else self.skip_gain * x
            x = self.ln1(skip + self.attn(x))
            skip = x if self.skip_gain == 1.0 else self.skip_gain * x
            return self.ln2(skip + self.mlp(x))
        x = x + self._scaled(self.attn(x), self.alpha1)
        return x + self._scaled(self.mlp(x), self.alpha2)


class Transformer(nn.Module):
    """A stack of :class:`TransformerLayer`, input (batch, tokens, width) (no embedding: the
    theory's input is a random sequence), then the final LayerNorm of pre-norm stacks.

    Attributes: ``layers`` (``nn.Sequential``), ``final_norm`` (or None), ``theory`` (with
    the sequence length taken from the input by ``check``), ``scheme``, ``params``."""

    def __init__(self, layers, final_norm, theory):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.final_norm = final_norm
        self.theory = theory
        self.scheme = theory["scheme"]
        self.params = {k: v for k, v in theory.items() if k not in ("depth", "scheme")}

    def forward(self, x):
        x = self.layers(x)
        return x if self.final_norm is None else self.final_norm(x)


def transformer(depth, width=256, scheme="transformer_preln", heads=4, logit_std=0.3,
                causal=False, **params):
    """The reference network of a transformer scheme (``propagation.sequence``).

    Args:
        depth: transformer layers (each two residual merges).
        width: channels of the residual stream; heads: attention heads (width % heads == 0).
        scheme: a sequence scheme: transformer_preln, transformer_postln, rezero, layerscale,
            deepnorm, depth_mup or completep.
        logit_std: the standard deviation of an attention logit between unit-norm tokens
            (query and key weights of variance logit_std / width); 0 is uniform attention.
            The default 0.3 is BERT's and GPT-2's (N(0, 0.02^2) weights at width 768).
        causal: a causal mask.
        **params: the scheme's (``alpha``; DeepNorm's ``decoder`` and ``beta_factor``).
    Input (batch, tokens, width); the output is the residual stream after the final norm.
    Use ``check(model, (batch, tokens, width), channel_axis=-1)``.
    """
    from .sequence import SEQ_SCHEMES, deepnorm_constants
    depth = _checks.positive_int("depth", depth)
    width = _checks.positive_int("width", width)
    heads = _checks.positive_int("heads", heads)
    logit_std = _checks.finite_float("logit_std", logit_std, low=0.0)
    if scheme not in SEQ_SCHEMES:
        raise ValueError(f"scheme must be a transformer scheme, one of {', '.join(SEQ_SCHEMES)}; "
                         f"got {scheme!r}" + _checks.close_names(scheme, SEQ_SCHEMES))
    clean = SEQ_SCHEMES[scheme].clean_params(params)
    kw = dict(logit_std=logit_std, causal=causal)
    if scheme == "transformer_postln":
        make = lambda: TransformerLayer(width, heads, "post", **kw)  # noqa: E731
    elif scheme == "deepnorm":
        a, b = deepnorm_constants(depth, clean["decoder"])
        b *= clean["beta_factor"]
        make = lambda: TransformerLayer(width, heads, "post", skip_gain=a, gain2=b * b, **kw)  # noqa: E731
    elif scheme == "rezero":
        make = lambda: TransformerLayer(width, heads, "none", alpha=clean["alpha"], **kw)  # noqa: E731
    else:
        alpha = {"depth_mup": (2.0 * depth) ** -0.5,
                 "completep": 1.0 / (2.0 * depth)}.get(scheme, clean.get("alpha", 1.0))
        per_channel = scheme == "layerscale"
        make = lambda: TransformerLayer(  # noqa: E731
            width, heads, "pre", alpha=None if alpha == 1.0 and not per_channel else alpha,
            per_channel=per_channel, **kw)
    final = nn.LayerNorm(width) if scheme not in ("transformer_postln", "deepnorm", "rezero") else None
    theory = {"scheme": scheme, "depth": depth, "causal": bool(causal), "logit_std": logit_std,
              **clean}
    return Transformer([make() for _ in range(depth)], final, theory)


# --- finite-size corrections for the theory ---------------------------------------------------

def _inbounds(size, kernel, stride, padding, dilation=1):
    """Per output position (1-D), the fraction of a kernel's taps inside [0, size)."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    o = np.arange(out)[:, None]
    taps = o * stride - padding + dilation * np.arange(kernel)[None, :]
    return ((taps >= 0) & (taps < size)).mean(axis=1), out


def _padding_factor(fh, fw, standardised):
    """Mean output second moment of a zero-padded conv relative to an unpadded one.

    A He conv keeps the fraction s of its taps in bounds. A Scaled-WS conv's weights sum to
    zero over the fan-in, which cancels the ReLU's channel mean mu only when every tap is in
    bounds; with a fraction s of them the weights in bounds sum to a variance of
    gain^2 s (1 - s), leaking mu^2 gain^2 s (1 - s) = q s (1 - s) / (pi - 1).
    """
    s = fh[:, None] * fw[None, :]
    if standardised:
        s = s * (1.0 + (1.0 - s) / (math.pi - 1.0))
    return float(s.mean())


def _conv_out(size, module):
    k, s, p = (module.kernel_size, module.stride, module.padding)
    k, s, p = (v if isinstance(v, int) else v[0] for v in (k, s, p))
    return (size + 2 * p - k) // s + 1


def padding_factors(model, input_shape):
    """Per block and branch weight layer, the mean fraction of a convolution's taps that fall
    inside the feature map (zero padding loses the rest), for inputs of ``input_shape``.

    Pass it to ``predict(..., padding_factors=...)``: a 3x3 He convolution keeps 0.96 of the
    second moment on a 32x32 map, 0.84 on 8x8 and 0.69 on 4x4, which the infinite-width
    theory ignores. The factor assumes the second moment is uniform over
    positions (padding also makes it smaller at the borders, a second-order effect).
    Returns an array (depth, weight layers per branch); all ones for dense networks.
    """
    if not isinstance(model, ResidualNetwork):
        raise TypeError(f"model must be a network from propagation.nets, got {type(model).__name__}")
    layers = model.theory.get("layers", 2)
    out = np.ones((len(model.blocks), layers))
    if len(input_shape) != 4:
        return out
    h, w = int(input_shape[2]), int(input_shape[3])
    for module in model.stem:
        if isinstance(module, nn.Conv2d):
            h, w = _conv_out(h, module), _conv_out(w, module)
        elif isinstance(module, nn.MaxPool2d):
            k, s, p = module.kernel_size, module.stride, module.padding
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    for l, blk in enumerate(model.blocks):
        convs = [m for m in blk.branch.modules() if isinstance(m, nn.Conv2d)]
        for j, conv in enumerate(convs[:layers]):
            k, s, p, d = (v if isinstance(v, int) else v[0] for v in
                          (conv.kernel_size, conv.stride, conv.padding, conv.dilation))
            fh, h2 = _inbounds(h, k, s, p, d)
            fw, w2 = _inbounds(w, k, s, p, d)
            out[l, j] = _padding_factor(fh, fw, isinstance(conv, WSConv2d))
            h, w = h2, w2
    return out


def _conv_spec(conv, **extra):
    def pair(v):
        return [int(v), int(v)] if isinstance(v, int) else [int(u) for u in v]
    if conv.groups != 1 or isinstance(conv.padding, str):
        raise ValueError(f"{conv}: grouped convolutions and string padding have no position map")
    return {"kernel": pair(conv.kernel_size), "stride": pair(conv.stride),
            "padding": pair(conv.padding), "dilation": pair(conv.dilation),
            "mode": conv.padding_mode, "channels": [int(conv.in_channels), int(conv.out_channels)],
            **extra}


def conv_geometry(model, input_shape):
    """The geometry of a convolutional network of this module for inputs of ``input_shape``
    (N, C, H, W), as ``predict(..., positions=...)`` reads it (JSON-ready): the input shape,
    the stem's convolutions (with their squared gain) and every block's branch and
    projection convolutions, in order.

    Raises ValueError for networks the position theory does not cover: dense networks,
    stems with more than convolutions (the ImageNet stem's max pool), grouped convolutions,
    convolutions whose padding mode is neither zeros nor circular."""
    if not isinstance(model, ResidualNetwork):
        raise TypeError(f"model must be a network from propagation.nets, got {type(model).__name__}")
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (N, C, H, W) for a convolutional network, got "
                         f"{tuple(input_shape)}")
    stem = []
    for module in model.stem:
        if isinstance(module, WSConv2d) or not isinstance(module, nn.Conv2d):
            raise ValueError(f"the stem's {module} has no position map (only He-initialised "
                             f"convolutions)")
        gain2 = getattr(module.weight, "_nominal_gain2", None)
        if gain2 is None:
            raise ValueError(f"the stem's {module} has no nominal gain")
        stem.append(_conv_spec(module, gain2=float(gain2)))
    blocks = []
    for l, blk in enumerate(model.blocks):
        if not isinstance(blk, ResidualBlock):
            raise ValueError(f"block {l} is a {type(blk).__name__}, not a ResidualBlock: its "
                             f"convolutions have no known order")
        convs = [m for m in blk.branch.modules() if isinstance(m, nn.Conv2d)]
        proj = ([] if blk.projection is None else
                [m for m in blk.projection.modules() if isinstance(m, nn.Conv2d)])
        if not convs:
            raise ValueError("a block without convolutions: not a convolutional network")
        blocks.append({"branch": [_conv_spec(c) for c in convs],
                       "projection": [_conv_spec(c) for c in proj]})
    for spec in stem + [s for b in blocks for s in b["branch"] + b["projection"]]:
        if spec["mode"] not in ("zeros", "circular"):
            raise ValueError(f"padding mode {spec['mode']!r} has no position map")
    return {"input_shape": [int(s) for s in input_shape], "stem": stem, "blocks": blocks}
