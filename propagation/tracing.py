"""The convolutional geometry of any network, traced from one forward pass.

``nets.conv_geometry`` reads a network of this package by its classes. A network written
elsewhere (torchvision's or timm's blocks, a user's own) has no such classes; this module
finds its residual merges the way ``measure`` does and then reads, from the autograd graph of
one forward pass, which convolutions lie between each block's input and the two operands of
its merge: the branch's, the projection's (on the skip operand) and the stem's (between the
network input and block 0's input), with their strides, padding and dilation.

The position theory has a map for convolutions (zero padding), ReLU and BatchNorm only: a
path through anything that mixes positions otherwise (pooling, padding ops, interpolation,
a global mean as in squeeze-and-excitation), or a branch whose convolutions are not one
chain, has no position map, and the trace says so (``ValueError``). Elementwise and
per-channel operations pass (normalisations, activations, gains).
"""
import contextlib
from typing import Any, Dict, Optional

import torch
from torch import nn

__all__ = ["traced_conv_geometry"]

_CONV = "ConvolutionBackward0"
#: Autograd nodes that act on each position alone (or normalise per channel over all of
#: them, as the scheme's layers do): a path through them keeps its convolutions' order.
_POINTWISE = {
    "ReluBackward0", "ThresholdBackward0", "GeluBackward0", "SiluBackward0", "EluBackward0",
    "LeakyReluBackward0", "HardtanhBackward0", "SigmoidBackward0", "TanhBackward0",
    "NativeBatchNormBackward0", "CudnnBatchNormBackward0", "NativeGroupNormBackward0",
    "MulBackward0", "DivBackward0", "AddBackward0", "SubBackward0", "NegBackward0",
    "CloneBackward0", "ToCopyBackward0", "AliasBackward0", "ViewBackward0",
}
#: Stem nodes with a position map besides convolutions.
_STEM_OPS = {"ReluBackward0": "relu", "ThresholdBackward0": "relu",
             "NativeBatchNormBackward0": "batchnorm", "CudnnBatchNormBackward0": "batchnorm"}


def traced_conv_geometry(model: nn.Module, x: torch.Tensor) -> dict:
    """The geometry ``predict(..., positions=...)`` reads (as ``nets.conv_geometry`` gives
    it), for any convolutional residual network and an input batch ``x`` (N, C, H, W).

    The stem's convolutions carry their squared gain as drawn (fan_in times the mean squared
    weight); the stem may also hold ReLUs and BatchNorms. The model is left as it came
    (parameters, buffers, training flags; a forward pass with gradients enabled is run).

    Raises ValueError where the network has no position map (see the module doc) or is
    not convolutional, and ``measure``'s NoMergesError where it has no residual merges.
    """
    from .empirical import NoMergesError, _call, _Recorder, _search, _untouched
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (N, C, H, W) tensor, got "
                         f"{type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}")

    class Recorder(_Recorder):
        def __init__(self):
            super().__init__(1)
            self.operand_sets = []  # per merge: (block input, skip operand, branch operand)

        def operands(self, skip, branch, block_input):
            # The graph nodes now: an in-place merge (out += identity) gives its operand
            # the sum's node once it has run.
            self.operand_sets.append(None if block_input is None else (
                _stop(block_input), skip.grad_fn, branch.grad_fn, skip is block_input))
            return super().operands(skip, branch, block_input)

    rec = Recorder()
    leaf = x.detach().clone().requires_grad_(True)
    with _untouched(model), torch.enable_grad():
        try:
            with _search(model, rec, None):
                _call(model, leaf, None)
            if not rec.operand_sets:
                raise NoMergesError("no residual merges found: the network has no blocks")
            sets = rec.operand_sets
            stem_stop = _stop(leaf)
            blocks = []
            for k, nodes in enumerate(sets):
                if nodes is None:
                    raise ValueError(f"merge {k}: its block input was not seen")
                stop, skip, branch, identity = nodes
                branch_convs = _chain(branch, stop, where=f"block {k}'s branch")
                proj_convs = ([] if identity else
                              _chain(skip, stop, where=f"block {k}'s projection") or [])
                if not branch_convs:
                    raise ValueError(f"block {k}'s branch has no convolution: not a "
                                     f"convolutional network")
                blocks.append({"branch": [_spec(c) for c in branch_convs],
                               "projection": [_spec(c) for c in proj_convs]})
            stem_nodes = _chain(sets[0][0], stem_stop, where="the stem", stem=True) or []
            stem = [_spec(n, gain=True) if isinstance(n, torch.autograd.graph.Node) else {"op": n}
                    for n in stem_nodes]
        finally:
            rec.release()
    return {"input_shape": [int(s) for s in x.shape], "stem": stem, "blocks": blocks}


def _stop(t):
    """What the graph walk stops at for tensor ``t``: its node, or its leaf's accumulator."""
    if t.grad_fn is not None:
        return t.grad_fn
    if t.requires_grad:
        # A leaf (the network input): the accumulator node that holds it.
        return t.view_as(t).grad_fn.next_functions[0][0]
    raise ValueError("a block input that does not require grad: the trace needs the graph")


def _chain(start, stop, where, stem=False):
    """The convolution nodes (and for ``stem``, ReLU / BatchNorm names) on the paths from
    the node ``stop`` to the node ``start``, in forward order; None when ``start`` does not
    depend on ``stop``."""
    memo: dict = {}

    def walk(node):
        if node is None:
            return None
        if node is stop:
            return []
        key = id(node)
        if key in memo:
            return memo[key]
        memo[key] = None  # a cycle cannot occur in autograd graphs; guards recursion
        name = type(node).__name__
        if name == "AccumulateGrad":
            out = None  # a parameter (a leaf other than the stop): a constant here
        elif name == _CONV:
            inner = walk(node.next_functions[0][0])  # the input, not the weight or bias
            out = None if inner is None else inner + [node]
        elif name in _POINTWISE or (stem and name in _STEM_OPS):
            edges = node.next_functions
            if name in ("NativeBatchNormBackward0", "CudnnBatchNormBackward0",
                        "NativeGroupNormBackward0"):
                edges = edges[:1]  # the input; the rest are the affine parameters
            paths = [p for p in (walk(e[0]) for e in edges) if p is not None]
            if not paths:
                out = None
            elif any(p != paths[0] for p in paths[1:]):
                raise ValueError(f"{where}: convolutions on parallel paths, not one chain: "
                                 f"no position map")
            else:
                out = paths[0]
                if stem and name in _STEM_OPS:
                    out = out + [_STEM_OPS[name]]
        else:
            # Anything else might mix positions (pooling, padding, interpolation, means);
            # it only matters if it lies on a path from the stop.
            inner = [walk(e[0]) for e in node.next_functions]
            if any(p is not None for p in inner):
                raise ValueError(f"{where} passes through {name}, which has no position map "
                                 f"(convolutions, ReLU and BatchNorm have)")
            out = None
        memo[key] = out
        return out

    with _deep_recursion(10_000):
        return walk(start)


@contextlib.contextmanager
def _deep_recursion(limit):
    import sys
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def _spec(node, gain=False) -> dict:
    """A convolution node's geometry (``nets.conv_geometry``'s spec), with its squared gain as
    drawn for ``gain`` (fan_in times the mean squared weight)."""
    if node._saved_transposed:
        raise ValueError("a transposed convolution has no position map")
    if node._saved_groups != 1:
        raise ValueError("grouped convolutions have no position map")
    w: Optional[torch.Tensor] = node._saved_weight
    if w is None or w.dim() != 4:
        raise ValueError("only 2-d convolutions have a position map")
    spec: Dict[str, Any] = {
        "kernel": [int(w.shape[2]), int(w.shape[3])],
        "stride": [int(v) for v in node._saved_stride],
        "padding": [int(v) for v in node._saved_padding],
        "dilation": [int(v) for v in node._saved_dilation], "mode": "zeros",
        "channels": [int(w.shape[1]), int(w.shape[0])]}
    if gain:
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        spec["gain2"] = float(fan_in * w.detach().double().pow(2).mean())
    return spec
