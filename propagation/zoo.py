"""Third-party models at tiny sizes: the zoo the suite (and the benchmarks) measure.

Hugging Face ``transformers`` models are built from config objects (random initialisation as
the library ships it, nothing downloaded; the ``zoo`` extra installs transformers).
torchvision- and timm-style networks are written here by hand the way those libraries write
them (in-place ``out += identity``, downsample shortcuts, stochastic depth, squeeze-excite):
neither library installs beside the CPU torch this project pins.

Every :class:`Entry` records the true number of residual merges with the source lines that
show it, the channel axis, the family ``diagnose`` should name, and an *oracle*: for each
merge, where its skip operand and its branch operand (or its sum) can be read with hooks on
the model's own modules, so that a test can check that ``measure`` found every merge and
took its operands the right way round.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

#: A place to read a tensor: (module name, "in" or "out", which call of that module).
Source = Tuple[str, str, int]


@dataclass(frozen=True)
class Merge:
    """Where one merge's operands are: ``skip``, and ``branch`` or (with ``is_sum``) the
    merge's sum, from which the branch is sum - skip."""

    skip: Source
    other: Source
    is_sum: bool = False


@dataclass(frozen=True)
class Entry:
    """One zoo model.

    Attributes:
        name: a short id ("bert", "tv_resnet18", ...).
        build: ``() -> nn.Module``, randomly initialised as the library does.
        inputs: ``seed -> batch`` (a tensor, or a dict of keyword inputs).
        merges: the true number of residual merges.
        why: the source lines that show it.
        channel_axis: 1 for images, -1 for token sequences.
        family: the family ``diagnose`` should name (``Diagnosis.family``).
        oracle: ``model -> [Merge]``, one per merge in forward order.
        source: "transformers" or "hand-written".
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], Any]
    merges: int
    why: str
    channel_axis: int
    family: str
    oracle: Callable[[nn.Module], List[Merge]]
    source: str = "transformers"
    notes: str = ""
    kwargs: Dict[str, Any] = field(default_factory=dict)


def _tokens(vocab: int, batch: int = 8, length: int = 16) -> Callable[[int], Any]:
    def inputs(seed: int) -> Dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(10_000 + seed)
        return {"input_ids": torch.randint(0, vocab, (batch, length), generator=gen),
                "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    return inputs


def _images(batch: int = 8, size: int = 32, channels: int = 3) -> Callable[[int], torch.Tensor]:
    def inputs(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(10_000 + seed)
        return torch.randn(batch, channels, size, size, generator=gen)
    return inputs


# --- Hugging Face transformers ----------------------------------------------------------------

HIDDEN, LAYERS, VOCAB = 64, 4, 128


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                num_attention_heads=4, intermediate_size=4 * HIDDEN,
                                vocab_size=VOCAB, max_position_embeddings=64),
                     add_pooling_layer=False)


def _bert_oracle(model: nn.Module) -> List[Merge]:
    out = []
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        out += [Merge((p, "in", 0), (f"{p}.attention.output.dropout", "out", 0)),
                Merge((f"{p}.attention", "out", 0), (f"{p}.output.dropout", "out", 0))]
    return out


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2Model
    return GPT2Model(GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, vocab_size=VOCAB,
                                n_positions=64, bos_token_id=0, eos_token_id=0))


def _prenorm_oracle(prefix: str, attn: str, norm2: str, mlp: str) -> Callable[[nn.Module],
                                                                             List[Merge]]:
    def oracle(model: nn.Module) -> List[Merge]:
        out = []
        for i in range(LAYERS):
            p = f"{prefix}.{i}"
            out += [Merge((p, "in", 0), (f"{p}.{attn}", "out", 0)),
                    Merge((f"{p}.{norm2}", "in", 0), (f"{p}.{mlp}", "out", 0))]
        return out
    return oracle


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaModel
    return LlamaModel(LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=2 * HIDDEN, vocab_size=VOCAB,
                                  max_position_embeddings=64))


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel
    return ViTModel(ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                              intermediate_size=4 * HIDDEN, image_size=32, patch_size=4),
                    add_pooling_layer=False)


def _vit_oracle(model: nn.Module) -> List[Merge]:
    out = []
    for i in range(LAYERS):
        p = f"layers.{i}"  # one dropout module, called after the attention and after the MLP
        out += [Merge((p, "in", 0), (f"{p}.dropout", "out", 0)),
                Merge((f"{p}.layernorm_after", "in", 0), (f"{p}.dropout", "out", 1))]
    return out


def _hf_resnet(layer_type: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import ResNetConfig, ResNetModel
        sizes = [16, 32] if layer_type == "basic" else [64, 128]
        return ResNetModel(ResNetConfig(embedding_size=16, hidden_sizes=sizes, depths=[2, 2],
                                        layer_type=layer_type))
    return build


def _stage_layers(model: nn.Module, prefix: str) -> List[str]:
    """The names ``<prefix><stage>.layers.<layer>``, in order."""
    pattern = re.compile(re.escape(prefix) + r"\d+\.layers\.\d+$")
    return [n for n, _ in model.named_modules() if pattern.match(n)]


def _hf_resnet_oracle(model: nn.Module) -> List[Merge]:
    return [Merge((f"{p}.shortcut", "out", 0), (f"{p}.layer", "out", 0))
            for p in _stage_layers(model, "encoder.stages.")]


def _bit() -> nn.Module:
    from transformers import BitConfig, BitModel
    return BitModel(BitConfig(embedding_size=32, hidden_sizes=[64, 128], depths=[2, 2],
                              layer_type="preactivation", num_groups=8))


def _bit_oracle(model: nn.Module) -> List[Merge]:
    out = []
    modules = dict(model.named_modules())
    for p in _stage_layers(model, "encoder.stages."):
        skip = (f"{p}.downsample", "out", 0) if modules[p].downsample is not None else (p, "in", 0)
        out.append(Merge(skip, (f"{p}.drop_path", "out", 0)))
    return out


def _convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextModel
    return ConvNextModel(ConvNextConfig(hidden_sizes=[16, 32], depths=[2, 2], num_stages=2))


def _convnext_oracle(model: nn.Module) -> List[Merge]:
    return [Merge((p, "in", 0), (f"{p}.drop_path", "out", 0))
            for p in _stage_layers(model, "encoder.stages.")]


def _mobilenet_v2() -> nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2Model
    return MobileNetV2Model(MobileNetV2Config(image_size=32, depth_multiplier=0.35))


def _mobilenet_oracle(model: nn.Module) -> List[Merge]:
    return [Merge((n, "in", 0), (n, "out", 0), is_sum=True) for n, m in model.named_modules()
            if getattr(m, "use_residual", False)]


# --- torchvision- and timm-style, written by hand ---------------------------------------------

class TVBasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock: post-activation, ``out += identity``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVBottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (ResNet-50's block, stride on the 3x3)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    """torchvision.models.resnet.ResNet's structure at CIFAR size (3x3 stem, no max-pool),
    with its initialisation: kaiming_normal_(fan_out) convolutions, BatchNorm 1 and 0, and
    ``zero_init_residual`` zeroing each block's last BatchNorm weight."""

    def __init__(self, block: type, layers: List[int], width: int = 16,
                 zero_init_residual: bool = False):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        for i, n in enumerate(layers):
            stages.append(self._make_layer(block, width * 2 ** i, n, 1 if i == 0 else 2))
        self.layer1, self.layer2, *rest = stages
        for j, s in enumerate(rest):
            setattr(self, f"layer{j + 3}", s)
        self.n_stages = len(layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, TVBottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, TVBasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        expansion = getattr(block, "expansion", 1)
        downsample = None
        if stride != 1 or self.inplanes != planes * expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _tv_oracle(last_bn: str) -> Callable[[nn.Module], List[Merge]]:
    def oracle(model: nn.Module) -> List[Merge]:
        out = []
        for name, m in model.named_modules():
            if isinstance(m, (TVBasicBlock, TVBottleneck)):
                skip = (f"{name}.downsample", "out", 0) if m.downsample is not None else (
                    name, "in", 0)
                out.append(Merge(skip, (f"{name}.{last_bn}", "out", 0)))
        return out
    return oracle


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth, "row" mode: drops whole examples' branches in
    training and rescales the rest by 1 / (1 - p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        noise = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype,
                            device=x.device).bernoulli_(keep)
        return x * noise.div_(keep)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: x * sigmoid(fc2(silu(fc1(avgpool(x)))))."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


class MBConv(nn.Module):
    """torchvision.models.efficientnet.MBConv: expand 1x1, depthwise 3x3, squeeze-excite,
    project 1x1 (BatchNorm, no activation); stochastic depth, then ``result += input``."""

    def __init__(self, channels: int, out: int, stride: int, expand: int, drop: float):
        super().__init__()
        hidden = channels * expand
        self.use_res_connect = stride == 1 and channels == out
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.SiLU(),
            SqueezeExcitation(hidden, max(1, channels // 4)),
            nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out))
        self.stochastic_depth = StochasticDepth(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


class EfficientNetish(nn.Module):
    """An EfficientNet-B0-style stack at CIFAR size: stochastic depth rising linearly to
    ``drop`` over the blocks, as torchvision does; its initialisation (fan-out convs)."""

    def __init__(self, drop: float = 0.2):
        super().__init__()
        spec = [(16, 16, 1, 1, 1), (16, 24, 2, 6, 2), (24, 40, 2, 6, 2), (40, 40, 1, 6, 1)]
        total = sum(s[4] for s in spec)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.SiLU())
        blocks, k = [], 0
        for c_in, c_out, stride, expand, n in spec:
            for i in range(n):
                blocks.append(MBConv(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1,
                                     expand, drop * k / total))
                k += 1
        self.features = nn.Sequential(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.stem(x))


def _mbconv_oracle(model: nn.Module) -> List[Merge]:
    return [Merge((n, "in", 0), (f"{n}.stochastic_depth", "out", 0))
            for n, m in model.named_modules() if isinstance(m, MBConv) and m.use_res_connect]


def _torch_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(HIDDEN, 4, 4 * HIDDEN, dropout=0.1, batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)


def _sequence(batch: int = 8, length: int = 16) -> Callable[[int], torch.Tensor]:
    def inputs(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(10_000 + seed)
        return torch.randn(batch, length, HIDDEN, generator=gen)
    return inputs


def _torch_encoder_oracle(model: nn.Module) -> List[Merge]:
    out = []
    for i in range(LAYERS):
        p = f"layers.{i}"
        out += [Merge((p, "in", 0), (f"{p}.dropout1", "out", 0)),
                Merge((f"{p}.norm2", "in", 0), (f"{p}.dropout2", "out", 0))]
    return out


ENTRIES: List[Entry] = [
    Entry("bert", _bert, _tokens(VOCAB), 2 * LAYERS,
          "BertSelfOutput.forward: LayerNorm(dropout(dense(h)) + input_tensor); BertOutput."
          "forward: the same after the FFN; two per BertLayer (post-LN). The embeddings' sums "
          "(word + token type + position) share no input and are no merges.",
          -1, "postnorm", _bert_oracle),
    Entry("gpt2", _gpt2, _tokens(VOCAB), 2 * LAYERS,
          "GPT2Block.forward: hidden_states = attn_output + residual; then residual + "
          "feed_forward_hidden_states; two per block (pre-LN). gelu_new's x + 0.044715 x^3 is "
          "no merge (no learned layer between).",
          -1, "layernorm", _prenorm_oracle("h", "attn", "ln_2", "mlp")),
    Entry("llama", _llama, _tokens(VOCAB), 2 * LAYERS,
          "LlamaDecoderLayer.forward: hidden_states = residual + hidden_states after "
          "self_attn and after mlp (pre-RMSNorm). apply_rotary_pos_emb's q cos + "
          "rotate_half(q) sin is no merge (no learned layer between).",
          -1, "layernorm", _prenorm_oracle("layers", "self_attn", "post_attention_layernorm",
                                           "mlp")),
    Entry("vit", _vit, _images(size=32), 2 * LAYERS,
          "ViTLayer.forward: hidden_states + residual after the attention and after the MLP "
          "(pre-LN). The embeddings' + position_embeddings adds a parameter, no branch.",
          -1, "layernorm", _vit_oracle),
    Entry("resnet_basic", _hf_resnet("basic"), _images(), 4,
          "ResNetBasicLayer.forward: hidden_state += self.shortcut(residual); depths [2, 2].",
          1, "batchnorm", _hf_resnet_oracle),
    Entry("resnet_bottleneck", _hf_resnet("bottleneck"), _images(), 4,
          "ResNetBottleNeckLayer.forward: hidden_state += self.shortcut(residual); depths "
          "[2, 2]; the first layer of each stage projects.",
          1, "batchnorm", _hf_resnet_oracle),
    Entry("bit", _bit, _images(), 4,
          "BitPreActivationBottleneckLayer.forward: return hidden_states + shortcut; "
          "GroupNorm pre-activation, weight-standardised convolutions; depths [2, 2].",
          1, "layernorm", _bit_oracle),
    Entry("convnext", _convnext, _images(), 4,
          "ConvNextLayer.forward: residual + drop_path(layer_scale_parameter * x); depths "
          "[2, 2]; layer scale starts at 1e-6.",
          1, "skipinit", _convnext_oracle),
    Entry("mobilenet_v2", _mobilenet_v2, _images(), 10,
          "MobileNetV2InvertedResidual.forward: residual + features when use_residual "
          "(stride 1, same channels): (n - 1) per stage of (1, 2, 3, 4, 3, 3, 1) blocks.",
          1, "batchnorm", _mobilenet_oracle),
    Entry("tv_resnet18", lambda: TVResNet(TVBasicBlock, [2, 2, 2, 2]), _images(), 8,
          "torchvision BasicBlock.forward: out += identity, relu after; ResNet-18 layers "
          "[2, 2, 2, 2] (the stride-2 stages' first blocks downsample).",
          1, "batchnorm", _tv_oracle("bn2"), source="hand-written"),
    Entry("tv_resnet50_zero_init", lambda: TVResNet(TVBottleneck, [3, 4, 6, 3], width=8,
                                                    zero_init_residual=True),
          _images(size=16), 16,
          "torchvision Bottleneck.forward: out += identity; ResNet-50 layers [3, 4, 6, 3] with "
          "zero_init_residual=True (each block's last BatchNorm weight 0).",
          1, "skipinit", _tv_oracle("bn3"), source="hand-written"),
    Entry("efficientnet", lambda: EfficientNetish(0.2), _images(), 4,
          "torchvision MBConv.forward: result = stochastic_depth(result); result += input when "
          "stride 1 and channels equal: stages of (1, 2, 2, 1) blocks, 16->16, 16->24, 24->40, "
          "40->40: 1 + 1 + 1 + 1.",
          1, "batchnorm", _mbconv_oracle, source="hand-written",
          notes="stochastic depth up to 0.2, off at initialisation (mode='init')"),
    Entry("torch_encoder", _torch_encoder, _sequence(), 2 * LAYERS,
          "nn.TransformerEncoderLayer(norm_first=True).forward: x = x + _sa_block(norm1(x)); "
          "x = x + _ff_block(norm2(x)).",
          -1, "layernorm", _torch_encoder_oracle, source="hand-written"),
]


def entry(name: str) -> Entry:
    for e in ENTRIES:
        if e.name == name:
            return e
    raise ValueError(f"no zoo model {name!r}; models: {', '.join(e.name for e in ENTRIES)}")


def available() -> bool:
    """Whether ``transformers`` can be imported (the ``zoo`` extra)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def read_operands(model: nn.Module, batch: Any, merges: List[Merge]
                  ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model`` once (no grad) and return (skip, branch) for each merge, read with hooks
    on the named modules (copies: a block may modify its tensors in place afterwards)."""
    wanted: Dict[Tuple[str, str], List[int]] = {}
    for m in merges:
        for src in (m.skip, m.other):
            wanted.setdefault((src[0], src[1]), []).append(src[2])
    seen: Dict[Source, torch.Tensor] = {}
    calls: Dict[Tuple[str, str], int] = {}
    handles = []
    modules = dict(model.named_modules())

    def first(value: Any) -> Optional[torch.Tensor]:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (tuple, list)):
            for v in value:
                t = first(v)
                if t is not None:
                    return t
        if isinstance(value, dict):
            return first(list(value.values()))
        return None

    def keep(key: Tuple[str, str], value: Any) -> None:
        k = calls.get(key, 0)
        calls[key] = k + 1
        if k in wanted[key]:
            t = first(value)
            if t is not None:
                seen[(key[0], key[1], k)] = t.detach().clone()

    for (name, where) in wanted:
        module = modules[name]
        if where == "in":
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, kwargs, key=(name, where): keep(key, (args, kwargs)),
                with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(
                lambda mod, args, out, key=(name, where): keep(key, out)))
    try:
        with torch.no_grad():
            if isinstance(batch, dict):
                model(**batch)
            else:
                model(batch)
    finally:
        for h in handles:
            h.remove()
    out = []
    for m in merges:
        skip, other = seen[m.skip], seen[m.other]
        out.append((skip, other - skip if m.is_sum else other))
    return out


def init_mode(model: nn.Module) -> None:
    """The training flags ``measure``'s default mode uses: norms in train mode, the rest
    in eval mode (no dropout, no stochastic depth)."""
    from .empirical import _set_mode
    _set_mode(list(model.modules()), "init")


__all__ = ["Entry", "Merge", "ENTRIES", "entry", "available", "read_operands", "init_mode",
           "TVBasicBlock", "TVBottleneck", "TVResNet", "MBConv", "EfficientNetish",
           "StochasticDepth", "SqueezeExcitation"]
