"""``measure``: the same Profile as ``predict``, observed in a real PyTorch network.

How residual merges are found
-----------------------------
The forward pass runs under a :class:`torch.overrides.TorchFunctionMode` that sees every
torch call the model makes, whatever its Python control flow (so models that torch.fx cannot
trace are covered too). It keeps a small graph of which call produced which tensor (integers
only, never the tensors) and treats as a residual merge every addition (``+``, ``+=``,
``torch.add``, ``Tensor.add_``) of two floating tensors of the same shape that share an
ancestor. The operand with the shorter path from their latest common ancestor is the skip
path: the block input itself for an identity shortcut (distance 0), the projection for a
projection shortcut. Statistics are computed inside the interception and the tensors are
dropped, so memory is O(blocks x channels).

Merges hidden inside fused kernels or custom ops cannot be seen this way; name the blocks
instead (``blocks=[MyBlock]`` or ``blocks=["layer*"]``): their input is taken as the skip
path, their output as the merge and output - input as the branch.
"""
import array
import contextlib
import copy
import fnmatch
import heapq
import math
import numbers
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import _checks
from .profile import Profile, Stats, Tokens, quantile_over, quantile_stats

#: Normalisations, as bits of a node's kind: what Profile.branch_norm and post_norm name;
#: post_norm also names "weights" (a weight layer: the skip operand passed through a whole
#: block without a merge, or a transition, since the last merge) and "activation" (an
#: elementwise nonlinearity: relu(x + f(x)) of post-activation ResNets).
_NORM_KINDS = ("batch", "layer", "instance", "weights", "activation")
_WEIGHTS, _ACTIVATION = 8, 16
_F = torch.nn.functional
_NORM_FUNCS: "dict[Any, int]" = {
    **dict.fromkeys((torch.nn.functional.batch_norm, torch.batch_norm), 1),
    **dict.fromkeys((torch.nn.functional.layer_norm, torch.layer_norm, torch.nn.functional.group_norm,
                     torch.group_norm, torch.nn.functional.rms_norm, torch.rms_norm), 2),
    **dict.fromkeys((torch.nn.functional.instance_norm, torch.instance_norm), 4),
    **dict.fromkeys((torch.nn.functional.linear, torch.nn.functional.bilinear,
                     torch.nn.functional.conv1d, torch.nn.functional.conv2d,
                     torch.nn.functional.conv3d, torch.nn.functional.conv_transpose1d,
                     torch.nn.functional.conv_transpose2d, torch.nn.functional.conv_transpose3d,
                     torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
                     torch.bmm, torch.addmm, torch.baddbmm, torch.einsum), _WEIGHTS),
    **dict.fromkeys((_F.relu, _F.relu_, torch.relu, torch.relu_, torch.Tensor.relu,
                     torch.Tensor.relu_, _F.relu6, _F.gelu, _F.silu, _F.hardswish, _F.elu,
                     _F.leaky_relu, _F.mish, _F.softplus, _F.hardtanh, _F.tanh, torch.tanh,
                     torch.Tensor.tanh, torch.sigmoid, torch.Tensor.sigmoid, _F.sigmoid),
                    _ACTIVATION),
}


def _module_norm(module):
    """The norm bit of a module whose own calls normalise (hand-written RMSNorms and
    LayerNorms: LlamaRMSNorm, T5LayerNorm), by class name; 0 for other modules."""
    for cls in type(module).__mro__:
        name = cls.__name__.lower()
        if "batchnorm" in name:
            return 1
        if any(k in name for k in ("layernorm", "rmsnorm", "groupnorm")):
            return 2
        if "instancenorm" in name:
            return 4
    return 0


def _in_place(func, kwargs):
    """Whether a call writes into its input (add_, __iadd__, relu(inplace=True), out=)."""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS \
        or bool(kwargs.get("inplace")) or kwargs.get("out") is not None


_IN_PLACE_DUNDERS = frozenset(f"__i{op}__" for op in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
    "lshift", "rshift"))


def _candidate(func, args, kwargs):
    """Whether a call is an addition of two same-shape floating tensors: a merge if its
    branch holds a learned layer (the search decides), counted by the replay."""
    if func not in _ADDS or len(args) < 2 or (kwargs and kwargs.get("alpha", 1) != 1):
        return False
    a, b = args[0], args[1]
    return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
            and a.dim() >= 1 and a.is_floating_point() and b.is_floating_point())


def _norm_names(bits):
    return "+".join(k for i, k in enumerate(_NORM_KINDS) if bits >> i & 1)


_ADDS = frozenset({torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__,
                   torch.Tensor.__iadd__, torch.Tensor.__radd__})
_MODES = ("init", "train", "eval", "keep")


class NonFiniteWarning(RuntimeWarning):
    """Activations overflowed (or became NaN) during a measurement."""


class NoMergesError(ValueError):
    """The model has no residual merge that ``measure`` can see."""


def measure(model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
            inputs: Union[Tensor, Sequence[Tensor], Callable[[int], Tensor]], *, seeds: int = 1,
            loss: Optional[Callable[[Any], Tensor]] = None, backward: bool = True,
            channel_axis: int = 1, mode: str = "init", dtype: Optional[torch.dtype] = None,
            blocks: Any = None, progress: Optional[bool] = None, search: str = "auto") -> Profile:
    """Measure per-block signal propagation in a PyTorch network at its current weights.

    Args:
        model: an ``nn.Module``, or a list of modules (e.g. one initialisation per seed).
        inputs: a tensor (batch first), a dict of keyword inputs (``model(**inputs)``, e.g.
            ``input_ids`` and ``attention_mask``; the first tensor is the batch), a list of
            either (one batch per sample), or a callable ``seed -> batch``.
        seeds: number of samples. Sample i uses model i, input batch i (cycling through the
            lists) and read-out seed i. The profile holds the median over samples, and
            ``samples`` one profile each (see ``Profile.quantile``).
        loss: ``loss(output) -> scalar`` for the backward pass; default ``sum(g * output)``
            with g ~ N(0, 1) drawn from a generator seeded with the sample index. Where that
            read-out gives no gradient at the merges (a zero-initialised head), the default
            reads out at the last merge's sum instead, warns, and says so in ``readout``.
        backward: also measure gradients at the skip-path tensors (forward-only runs under
            ``torch.no_grad`` and keeps no activations).
        channel_axis: the axis of channels (1 for (N, C, ...) tensors, -1 for sequences).
        mode: "init" (default): the network as at its first training step without
            noise: normalisation layers (BatchNorm, InstanceNorm) use batch statistics and
            every other module is in eval mode, so Dropout, attention dropout and stochastic
            depth (DropPath, StochasticDepth) are off. "train": everything in train mode,
            stochastic layers on. "eval": running statistics (at initialisation BatchNorm is
            then the identity and the network is measured as unnormalised). "keep": the
            modules' own flags.
        dtype: e.g. ``torch.float64`` to measure a float64 copy of the model (the model
            itself is not converted); use it when float32 overflows.
        blocks: module classes or name patterns (fnmatch) whose input and output are the skip
            path and the merge; used instead of the automatic search.
        progress: show a progress bar over samples (default: when there are several and
            stderr is a terminal).
        search: "auto" (default): the first pass over a model (per mode, input shape and
            dtype) searches for merges under the call graph; later passes (the other seeds,
            the next call on the same model, models with the same module names) replay that
            search with hooks on the merges' owner modules only, at close to the cost of a
            bare forward, and search again when the merges they see differ. "always":
            search every pass (the reference the replay is tested against).

    Returns:
        A :class:`Profile` with ``source="measurement"``: ``skip`` (merges + 1,), ``branch``,
        ``grad`` (squared gradient norm at each skip tensor relative to the last merge's sum)
        and ``projection`` (True where the skip operand is not the block input itself).
        ``meta`` records shapes, mode, dtype, seeds and the first non-finite block, if any.

    The model leaves exactly as it came: parameters, buffers (BatchNorm running statistics),
    ``training`` flags, ``requires_grad``, ``.grad``, hooks and the global RNG state are
    restored, also when its forward pass raises.
    """
    models = _check_models(model)
    seeds = _checks.positive_int("seeds", seeds)
    _checks.choice("mode", mode, _MODES)
    if not isinstance(channel_axis, numbers.Integral) or isinstance(channel_axis, bool):
        raise TypeError(f"channel_axis must be an int, got {channel_axis!r}")
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be a callable output -> scalar tensor, got {loss!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float64, got {dtype!r}")
    matcher = _block_matcher(blocks)
    _checks.choice("search", search, ("auto", "always"))
    get_input = _input_source(inputs)
    n = max(seeds, len(models), len(inputs) if isinstance(inputs, (list, tuple)) else 1)

    samples = []
    iterator = range(n)
    if progress is None:
        progress = n > 1 and _stderr_is_tty()
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc="measure", unit="seed")
    plans: dict = {}  # one search per kind of pass, replayed on every sample
    for i in iterator:
        samples.append(_measure_one(models[i % len(models)], get_input(i), i, loss, backward,
                                    channel_axis, mode, dtype, matcher, plans, search))
    depths = {s.depth for s in samples}
    if len(depths) > 1:
        raise ValueError(f"the number of residual merges differs between samples: "
                         f"{[s.depth for s in samples]}; measure one architecture at a time")
    if n == 1:
        return samples[0]
    median = quantile_over(samples, 0.5)
    first = samples[0]
    bad = [s.first_nonfinite_block for s in samples if s.first_nonfinite_block is not None]
    tokens = first.tokens
    if tokens is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN positions stay NaN
            tokens = replace(tokens, **{part: np.nanmedian(np.stack(
                [getattr(s.tokens, part) for s in samples if s.tokens is not None]), axis=0)
                for part in ("skip", "branch")})
    return replace(first, skip=median[0], branch=median[1], grad=median[2], tokens=tokens,
                   block_input=quantile_stats([s.block_input for s in samples], 0.5),
                   samples=tuple(samples), first_nonfinite_block=min(bad) if bad else None,
                   meta={**first.meta, "seeds": n})


# --- one forward (+ backward) pass -----------------------------------------------------------

def _measure_one(model, x, seed, loss, backward, channel_axis, mode, dtype, matcher,
                 plans, search):
    work = model
    param = next(iter(model.parameters()), None)
    if dtype is not None and param is not None and param.dtype != dtype:
        work = copy.deepcopy(model).to(dtype)  # the caller's model is never converted
    x, kwargs = _check_input(x, work, channel_axis)
    with _untouched(model) as modules, (_untouched(work) if work is not model
                                        else contextlib.nullcontext(modules)) as modules:
        _set_mode(modules, mode)  # the modules of work (the dtype copy, or the model)
        grad_ctx = torch.enable_grad() if backward else torch.no_grad()
        if backward and x.is_floating_point():
            x = x.detach().requires_grad_(True)
        readouts = ["loss"] if loss is not None else ["output", "last merge"] if backward else [None]
        # A search found earlier for this kind of pass (in this call, or on this model) is
        # replayed, and searched again if the merges it sees differ.
        key = (mode, backward, str(dtype), tuple(x.shape), x.dtype,
               None if kwargs is None else (kwargs[0], tuple(sorted(kwargs[1]))))
        replays = matcher is None and search == "auto"
        sites = (plans.get(key) or _PLANS.get(model, {}).get(key)) if replays else None
        for readout in readouts:
            recorder = _Recorder(channel_axis)
            with grad_ctx:
                try:
                    if sites is not None:
                        with _replay(work, recorder, sites) as replay:
                            out = _call(work, x, kwargs)
                        if not replay.complete:  # the structure changed
                            recorder.release()
                            sites, recorder, out = None, _Recorder(channel_axis), None
                    if sites is None:
                        with _search(work, recorder, matcher) as finder:
                            out = _call(work, x, kwargs)
                        sites = finder.plan() if replays else None
                        if sites is not None:
                            plans[key] = _PLANS.setdefault(model, {})[key] = sites
                        del finder
                except Exception as err:
                    err.add_note(f"(raised by the model's forward pass inside propagation.measure, "
                                 f"on inputs of shape {tuple(x.shape)} and dtype {x.dtype}; the "
                                 f"model was restored)")
                    raise
                if not recorder.merges:
                    raise NoMergesError(_NO_MERGES if matcher is None else
                                        "none of the modules named by blocks= ran in the forward "
                                        "pass; check the classes or name patterns")
                if backward:
                    _backward(out, x, recorder, seed, loss, readout)
                    if readout == "output" and not recorder.has_gradient():
                        warnings.warn("the output's gradient is zero at every residual merge (a "
                                      "zero-initialised head?); gradients are read out at the last "
                                      "merge's sum instead (Profile.readout says so)",
                                      ZeroGradientWarning, stacklevel=4)
                        continue
                break
    return recorder.profile(mode=mode, readout=readout, dtype=str(dtype or x.dtype),
                            input_shape=tuple(x.shape), backward=backward, seed=seed)


class ZeroGradientWarning(RuntimeWarning):
    """The default read-out gave no gradient at the merges; measure read out elsewhere."""


def _set_mode(modules, mode):
    """Training flags for ``mode`` (see measure); _untouched restores the caller's."""
    if mode == "keep":
        return
    norm = torch.nn.modules.batchnorm._NormBase  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    for m in modules:
        want = mode == "train" or (mode == "init" and isinstance(m, norm))
        if m.training != want:
            # What Module.train() sets, without nn.Module.__setattr__'s checks (a third of
            # the cost of measuring a small network at a thousand modules).
            m.__dict__["training"] = want


def _call(model, x, kwargs):
    """``model(x)``, or for keyword inputs ``model(**rest, key=x)`` (kwargs = (key, rest))."""
    if kwargs is None:
        return model(x)
    key, rest = kwargs
    return model(**rest, **{key: x})


_NO_MERGES = ("no residual merges found: looked for additions (+, +=, torch.add, Tensor.add_) of "
              "two floating tensors of the same shape computed from a common input. If the model "
              "merges inside a fused kernel or custom op (e.g. a TransformerEncoderLayer on its "
              "inference fast path, taken under no_grad in eval mode), name the residual blocks: "
              "measure(model, x, blocks=[MyBlock]) or blocks=['encoder.layers.*']")


def _backward(out, x, recorder, seed, loss, readout="output"):
    if loss is None:
        out_t = recorder.last_sum if readout == "last merge" else _first_tensor(out)
        if out_t is None or not out_t.is_floating_point():
            raise TypeError(f"the model returned {type(out).__name__}, not a floating tensor; pass "
                            f"loss=callable(output) -> scalar to measure gradients")
        gen = torch.Generator(device=out_t.device).manual_seed(seed)
        g = torch.randn(out_t.shape, generator=gen, device=out_t.device, dtype=out_t.dtype)
        value = (g * out_t).sum()
    else:
        value = loss(out)
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            raise TypeError(f"loss must return a scalar tensor, got {value!r}")
    targets = [x] if x.requires_grad else [t for t in recorder.grad_targets() if t.requires_grad][:1]
    if not targets or not value.requires_grad:
        raise ValueError("cannot measure gradients: neither the inputs nor the skip path require "
                         "grad (are all parameters frozen and the inputs integers?); pass "
                         "backward=False")
    # autograd.grad (not .backward) so that no parameter's .grad is touched.
    torch.autograd.grad(value, targets, allow_unused=True)
    recorder.release()


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


# --- statistics --------------------------------------------------------------------------------

class _Ref(weakref.ref):
    """A weak reference that carries its dict key and value (no dict of tuples, no closure
    per entry: about 100 bytes an entry, which at a thousand blocks is a megabyte)."""

    __slots__ = ("key", "value")


class _WeakIds:
    """tensor -> value by identity, keeping no tensor alive.

    A dict on ``id(t)`` whose entries a weak reference removes when the tensor dies, so that
    a later tensor with the same id never finds a stale entry. It does what torch's
    WeakIdKeyDictionary does at a fraction of its cost per access (that one builds a Python
    weak-reference object per look-up), which matters at one access per torch call.
    """

    __slots__ = ("_d", "_gone", "__weakref__")

    def __init__(self):
        self._d = {}
        d = self._d

        def gone(ref):  # the tensor died: drop its entry, unless a new one took the key
            if d.get(ref.key) is ref:
                del d[ref.key]
        self._gone = gone

    def get(self, t, default=None):
        ref = self._d.get(id(t))
        return ref.value if ref is not None and ref() is t else default

    def __contains__(self, t):
        ref = self._d.get(id(t))
        return ref is not None and ref() is t

    def set(self, t, value):
        key = id(t)
        ref = self._d.get(key)
        if ref is None or ref() is not t:
            ref = _Ref(t, self._gone)
            ref.key = key
            self._d[key] = ref
        ref.value = value

    def keys(self):
        return [t for t in (ref() for ref in list(self._d.values())) if t is not None]

    def __len__(self):
        return len(self._d)


def _channel_stats(t, channel_axis):
    """[second moment, squared mean, variance] averaged over channels, as Python floats.

    Two reading passes without a temporary: the channel means, and the norms of rows of
    256 to 1024 contiguous entries (_second_moment); several times faster on CPU than
    torch.var_mean over (0, 2, 3), and few calls (a few microseconds each), which is what
    small tensors cost. The small results are reduced in float64 with numpy. The variance is
    then q - m^2: q carries a relative error of a few float32 roundings (<= 4 x 2^-24) from
    its float32 rows, which is q / variance times larger in the variance; where the variance
    is less than 2^-5 of the second moment (correlations rho -> 1) the exact centred
    two-pass form is used instead (_channel_stats_centred), so that the variance stays
    within 32 x 4 x 2^-24 < 1e-5 relative. Other layouts (a channel
    axis inside a sequence, non-contiguous tensors) take the centred form too.
    """
    t = t.detach()
    if t.dim() < 2:
        t = t.reshape(-1, 1)
        axis = 1
    else:
        axis = channel_axis % t.dim()
    if not t.is_contiguous() or (axis != t.dim() - 1 and (axis != 1 or t.dim() < 3)):
        return _channel_stats_centred(t, axis)
    if axis == 1:  # channel means along positions, then examples
        mean = t.reshape(t.shape[0], t.shape[1], -1).mean(dim=-1)
        mean = np.add.reduce(_numpy(mean), axis=0) / t.shape[0]
    else:  # channels last: the channel means reduce the rows
        mean = _numpy(t.reshape(-1, t.shape[-1]).mean(dim=0))
    q = _second_moment(t)
    sq = float(np.dot(mean, mean)) / mean.size
    var = q - sq
    if not var >= q * 2.0 ** -5:  # cancellation (or not finite): the exact form
        return _channel_stats_centred(t, axis)
    return [q, sq, var]


_NUMPY_DTYPES = (torch.float32, torch.float64)


def _token_cosine(t, channel_axis):
    """The mean cosine between two different tokens of one sequence, for a (batch, tokens,
    channels) tensor with channels last; NaN for other tensors, or where a token is zero.

    Per sequence, with u_t the unit tokens, sum_{t != s} u_t . u_s = |sum_t u_t|^2 - T; the
    sum of unit tokens is one batched product, with no full-size temporary."""
    if t.dim() != 3 or channel_axis % 3 != 2 or t.shape[1] < 2:
        return math.nan
    t = t.detach()
    norms = torch.linalg.vector_norm(t, dim=-1)  # (B, T)
    if not bool((norms > 0).all()):
        return math.nan
    s = torch.bmm((1.0 / norms).unsqueeze(1).to(t.dtype), t).squeeze(1)  # (B, C)
    T = t.shape[1]
    per_seq = (_numpy(torch.linalg.vector_norm(s, dim=-1)) ** 2 - T) / (T * (T - 1))
    return float(per_seq.mean())


def _numpy(t):
    """A small torch tensor (already detached) as a float64 numpy array."""
    if t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES:
        return t.numpy().astype(np.float64, copy=False)
    return t.to(torch.float64).cpu().numpy()


_ROWS: dict = {}  # numel -> row length for _second_moment


def _second_moment(t):
    """The mean of t^2 (a float), in one pass: norms of rows of 256 to 1024 contiguous
    entries (each off by a few float32 roundings), summed in float64, so that the error does
    not grow with the tensor's size (one float32 norm of 3e7 entries was off by 2e-4). Rows
    that long are also the fastest on CPU."""
    t = t.detach().reshape(-1)
    n = t.numel()
    length = _ROWS.get(n)
    if length is None:
        length = math.gcd(n, 1024)
        if length < 256:  # sizes with few factors of 2: the largest divisor up to 1024
            length = next((k for k in range(1024, 0, -1) if n % k == 0), 1)
        _ROWS[n] = length
    norms = _numpy(torch.linalg.vector_norm(t.reshape(-1, length), dim=-1))
    return float(np.dot(norms, norms)) / n


def _channel_stats_centred(t, axis):
    """_channel_stats in two passes: the channel means, then the mean squared deviation from
    them; exact when the variance is a small remainder of the second moment."""
    if axis != 1:
        t = t.movedim(axis, 1)
    v = t.reshape(t.shape[0], t.shape[1], -1)
    mean = v.mean(dim=-1).mean(dim=0)  # equal group sizes: the exact channel mean
    var = float(_numpy((v - mean[None, :, None]).square_().mean(dim=-1).mean(dim=0)).mean())
    m = _numpy(mean)
    sq = float(np.dot(m, m)) / m.size
    return [sq + var, sq, var]


def _channels(t, channel_axis):
    return int(t.shape[channel_axis % t.dim()]) if t.dim() >= 2 else 1


class _Recorder:
    """Holds per-merge statistics (Python floats, not tensors: the many small allocations
    of kept tensors would sit between the activations in the heap and make peak memory grow
    with depth) and the gradient hooks of one pass."""

    #: How many recently measured tensors ``stats`` remembers (by identity and version).
    RECENT = 4

    def __init__(self, channel_axis):
        self.channel_axis = channel_axis
        # per merge, in flat arrays (some 100 bytes a merge): the statistics [second
        # moment, squared mean, variance] of skip, branch and sum, and (projection, entries
        # of skip, entries of sum, channels)
        self.merges = 0
        self.names = []       # per merge, the name of the module that owns it
        self.norms = []       # per merge, (branch_norm, post_norm)
        self._inputs = array.array("d")  # per merge, statistics of the block input
        self._stats = array.array("d")
        self._tokens = array.array("d")  # per merge, token correlations of skip, branch, sum
        self.tokens_per_sequence = None
        self._info = array.array("q")
        self.grads = {}       # merge index -> grad stats at the skip operand; -1: last sum
        self._hooked = _WeakIds()
        self._recent = []     # [(weak ref, version, statistics)], newest last
        self._handles = []
        self._last_sum = None
        self.last_sum = None

    def stats(self, t):
        """Channel statistics of ``t``, reused when the same unmodified tensor comes again
        (in a chain of identity blocks each merge's sum is the next merge's skip operand)."""
        version = t._version
        for ref, v, out in self._recent:
            if v == version and ref() is t:
                return out
        out = _channel_stats(t, self.channel_axis) + [_token_cosine(t, self.channel_axis)]
        if not math.isnan(out[3]):  # a sequence: its length, for compare's finite batch
            self.tokens_per_sequence = int(t.shape[1])
        self._recent.append((weakref.ref(t), version, out))
        if len(self._recent) > self.RECENT:
            del self._recent[0]
        return out

    def input_stats(self, x):
        """Statistics of a block input and its values per channel (batch x positions)."""
        return self.stats(x)[:3] + [x.numel() / _channels(x, self.channel_axis)]

    def operands(self, skip, branch, x):
        """Statistics of a merge's operands and of its block input ``x`` (None: unknown), read
        before the addition runs: an in-place add overwrites one of them."""
        return (self.stats(skip), self.stats(branch),
                None if x is None else self.input_stats(x))

    def record(self, skip, skip_stats, branch_stats, total, projection, name="",
               input_stats=None, norms=("", ""), full_sum=True):
        """Record one merge; ``total`` is the sum tensor or, already measured, a tuple
        (statistics, the tensor). ``full_sum=False``: only the sum's second moment is needed
        (it is not the next skip operand, nor the last merge): one pass instead of two."""
        k = self.merges
        if isinstance(total, tuple):
            total_stats, total = total
        elif full_sum:
            total_stats = self.stats(total)
        else:
            total_stats = [_second_moment(total), math.nan, math.nan, math.nan]
        self._append(skip_stats, branch_stats, total_stats, projection, skip.numel(),
                     total.numel(), _channels(total, self.channel_axis), name,
                     [math.nan] * 4 if input_stats is None else input_stats, norms)
        self._hook(skip, k)
        self._last_sum = total
        return k

    def record_missing_skip(self, total, name=""):
        nan = [math.nan] * 4
        self._append(nan, nan, self.stats(total), True,
                     total.numel(), total.numel(), _channels(total, self.channel_axis), name,
                     nan + [math.nan], ("", ""))
        self._last_sum = total

    def _append(self, skip, branch, total, projection, numel_skip, numel_sum, channels, name,
                block_input, norms):
        self.names.append(name)
        self.norms.append(norms)
        self._inputs.extend(block_input)
        self._stats.extend(skip[:3])
        self._stats.extend(branch[:3])
        self._stats.extend(total[:3])
        # (subclasses that record theory give three statistics: no token correlation)
        self._tokens.extend(v[3] if len(v) > 3 else math.nan for v in (skip, branch, total))
        self._info.extend((projection, numel_skip, numel_sum, channels))
        self.merges += 1

    def _hook(self, t, k):
        if not (torch.is_grad_enabled() and t.requires_grad):
            return
        if t in self._hooked:  # one tensor can be a skip operand once; keep the first index
            return
        self._hooked.set(t, k)

        def hook(grad, k=k):
            self.grads[k] = _channel_stats(grad, self.channel_axis)
        self._handles.append(t.register_hook(hook))

    def grad_targets(self):
        return self._hooked.keys()

    def finish_forward(self):
        t = self._last_sum
        if t is not None and torch.is_grad_enabled() and t.requires_grad:
            def hook(grad):
                self.grads[-1] = _channel_stats(grad, self.channel_axis)
            self._handles.append(t.register_hook(hook))
            self.last_sum = t  # the read-out of last resort, until release()
        self._last_sum = None

    def has_gradient(self):
        """Whether the backward pass reached the last merge with a non-zero gradient."""
        g = self.grads.get(-1)
        return g is not None and g[0] > 0.0

    def release(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.last_sum = None

    def profile(self, mode, readout=None, **meta):
        D = self.merges
        stats = np.frombuffer(self._stats, dtype=np.float64).reshape(D, 3, 3).copy()
        inputs = np.frombuffer(self._inputs, dtype=np.float64).reshape(D, 4).copy()
        info = np.frombuffer(self._info, dtype=np.int64).reshape(D, 4).copy()
        skip = np.concatenate((stats[:, 0], stats[-1:, 2]))
        branch = stats[:, 1]
        numel = np.append(info[:, 1], info[-1, 2]).astype(np.float64)
        channels = info[:, 3]
        grad = np.full((D + 1, 3), np.nan)
        for k, g in self.grads.items():
            grad[k] = g
        if -1 in self.grads:
            grad[D] = self.grads[-1]
            # squared norm relative to the last merge's sum: per entry x entries / entries there
            with np.errstate(divide="ignore", invalid="ignore"):  # no gradient: NaN
                grad = grad * (numel / numel[-1])[:, None] / grad[D, 0]
        # A skip operand that blocks= could not see is NaN on purpose, not an overflow: the
        # merge sums tell (the sum of merge l is skip position l + 1).
        missing = np.append(np.isnan(stats[:, 0]).all(axis=1), False)
        finite = np.isfinite(skip).all(axis=1) | missing
        finite[1:] &= np.isfinite(stats[:, 2, 0])  # the sums' second moments (all a replay has)
        first_bad = None if finite.all() else int(np.argmin(finite))
        if first_bad is not None:
            warnings.warn(f"activations are not finite from skip-path position {first_bad} on "
                          f"(dtype {meta['dtype']}): the signal overflowed. Measure with "
                          f"dtype=torch.float64, or fewer blocks.", NonFiniteWarning, stacklevel=4)
        # Values per channel that each statistic averaged over (batch x positions): the
        # squared channel mean of n such samples carries a finite-sample term variance / n.
        per_channel = np.append(info[:, 1] / channels, info[-1, 2] / channels[-1])
        tok = np.frombuffer(self._tokens, dtype=np.float64).reshape(D, 3)
        tokens = None
        if np.isfinite(tok).any():
            tokens = Tokens(skip=np.append(tok[:, 0], tok[-1, 2]), branch=tok[:, 1].copy(),
                            length=self.tokens_per_sequence)
        with np.errstate(divide="ignore"):
            merge_log2 = np.log2(stats[:, 2, 0])
        return Profile(skip=Stats.from_linear(*skip.T), branch=Stats.from_linear(*branch.T),
                       grad=Stats.from_linear(*grad.T), depth=D,
                       projection=info[:, 0].astype(bool), source="measurement",
                       block_input=Stats.from_linear(*inputs[:, :3].T),
                       block_input_samples_per_channel=inputs[:, 3], names=tuple(self.names),
                       branch_norm=tuple(b for b, _ in self.norms),
                       post_norm=tuple(p for _, p in self.norms),
                       channels=int(channels.min()), samples_per_channel=per_channel,
                       merge_log2_second_moment=merge_log2, first_nonfinite_block=first_bad,
                       mode=mode, readout=readout, tokens=tokens, meta=meta)


# --- finding merges ----------------------------------------------------------------------------

class _MergeFinder(TorchFunctionMode):
    """Tracks which call produced which tensor and records residual merges as they run.

    The graph is two flat integer arrays (each node's parents: ``edges[offsets[n]:
    offsets[n + 1]]``), 8 bytes per edge, so that its memory stays small against the
    activations however deep the network."""

    def __init__(self, recorder, modules=()):
        super().__init__()
        self.recorder = recorder
        self.node_of = _WeakIds()         # tensor -> node id
        # The model's parameters and buffers (alive throughout, so their ids cannot be
        # reused): id -> node (-1: not seen yet) in a plain dict, a third of the memory of
        # a weak entry. ``modules``: the model's modules (one walk of the model per pass).
        params = [id(p) for m in modules for p in m._parameters.values() if p is not None]
        buffers = [id(b) for m in modules for b in m._buffers.values() if b is not None]
        self.owned = dict.fromkeys(params + buffers, -1)
        self.parameters = set(params)
        self.offsets = array.array("i", [0])
        self.edges = array.array("i")
        # Per node, 1 when it depends on a parameter (the model's, or any nn.Parameter it
        # uses); buffers do not count: a rotary table or a BatchNorm statistic is no
        # learned layer.
        self.param_dep = bytearray()
        # Per node, the bits of the normalisations it is part of (_NORM_KINDS), and the node
        # of the last merge's sum (where the next skip operand's post_norm path starts).
        self.norm = bytearray()
        # Per node, 1 when it is a floating-point tensor: a residual stream is one, so two
        # operands that meet only at integer token ids (RoBERTa's word and position
        # embeddings, positions counted from the ids) are no merge.
        self.floating = bytearray()
        self.last_sum = -1
        # The modules whose forward is running, outermost first: (name, node of the first
        # tensor input or -1, that tensor or None).
        self.stack = []
        # Where a found merge goes: the recorder, or (blocks=) the innermost selected
        # block's list in ``held``, to be chosen from when the block exits.
        self.sink = recorder.record
        self.held = []
        # Where each merge sat, for replays without the call graph (_replay): per merge a
        # Site; per module name, how many times it has been called in this pass.
        self.sites = []
        self.calls = {}
        self.chained = []     # per merge: its sum is the next merge's skip operand, unchanged
        self._prev_sum = None  # (weak ref, version) of the last merge's sum

    def plan(self):
        """The sites of the merges found, for replays (_replay); None when a merge had no
        owner module a replay could hook."""
        if not self.sites or None in self.sites or len(self.sites) != self.recorder.merges:
            return None
        return tuple(replace(site, chained=chained)
                     for site, chained in zip(self.sites, self.chained))

    def hold(self, skip, skip_stats, branch_stats, total, projection, name, input_stats,
             norms):
        if self.held:  # merges outside every selected block are not measured
            # The sum's statistics now: the block may modify it in place (out += x; relu_).
            self.held[-1].append((skip, skip_stats, branch_stats,
                                  (self.recorder.stats(total), total), projection, name,
                                  input_stats, norms))

    def enter(self, name, args, kwargs, norm=0):
        x = _first_tensor_arg(args, kwargs)
        call = self.calls.get(name, 0)
        self.calls[name] = call + 1
        # [name, node of x, x, norm bit, call index, candidate adds so far in this call,
        #  of those the ones made by its own code (no submodule running)]
        if x is None:
            self.stack.append([name, -1, None, norm, call, 0, 0])
        else:  # the module's own arguments keep x alive until it returns and leaves
            self.stack.append([name, self._node(x), x, norm, call, 0, 0])

    def leave(self):
        if self.stack:
            self.stack.pop()

    def owner(self, ancestor):
        """The stack entry of the innermost running module whose input is ``ancestor`` or
        one of its ancestors: the residual block that contains the merge whose operands
        meet at ``ancestor``; None when no running module's input qualifies."""
        for entry in reversed(self.stack):
            if entry[1] >= 0 and self._descends(ancestor, entry[1]):
                return entry
        return None

    def _descends(self, node, ancestor, limit=10_000):
        """Whether ``ancestor`` is ``node`` or one of its ancestors (parents are older, so
        only nodes at least as new as ``ancestor`` are searched)."""
        todo, seen = [node], set()
        while todo and len(seen) < limit:
            n = todo.pop()
            if n == ancestor:
                return True
            if n < ancestor or n in seen:
                continue
            seen.add(n)
            todo.extend(self.parents(n))
        return False

    def _node(self, t):
        node = self.owned.get(id(t))
        if node is None:
            node = self.node_of.get(t)
        if node is None or node < 0:  # made outside the pass (the input, a parameter): a root
            node = len(self.offsets) - 1
            self.offsets.append(len(self.edges))
            self.param_dep.append(isinstance(t, torch.nn.Parameter) or id(t) in self.parameters)
            self.norm.append(0)
            self.floating.append(t.is_floating_point())
            self._assign(t, node)
        return node

    def _assign(self, t, node):
        if id(t) in self.owned:
            self.owned[id(t)] = node
        else:
            self.node_of.set(t, node)

    def parents(self, node):
        return self.edges[self.offsets[node]:self.offsets[node + 1]]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        merge = None
        if _candidate(func, args, kwargs):
            for entry in self.stack:
                entry[5] += 1
            if self.stack:
                self.stack[-1][6] += 1
            merge = self._merge_operands(args[0], args[1])
            if merge is not None:
                skip, branch, projection, ancestor, norms = merge
                prev = self._prev_sum
                if self.chained:
                    self.chained[-1] = (prev is not None and prev[0]() is skip
                                        and prev[1] == skip._version)
                entry = self.owner(ancestor)
                name, x = ("", None) if entry is None else (entry[0], entry[2])
                direct = entry is not None and entry is self.stack[-1]
                self.sites.append(None if entry is None else _Site(
                    entry[0], entry[4], entry[6 if direct else 5] - 1, skip is args[0],
                    projection, norms, direct=direct))
                # An identity shortcut: the block input is the skip operand.
                pre = self.recorder.operands(skip, branch, x if projection else skip)
        out = func(*args, **kwargs)
        if isinstance(out, Tensor):
            outs = (out,)
        elif isinstance(out, (list, tuple)):
            outs = [o for o in out if isinstance(o, Tensor)]
        else:  # an int, a shape, a dtype: nothing that a later merge can descend from
            outs = ()
        if outs:
            node = self._node
            # The inputs' nodes first: a tensor seen for the first time (a parameter, a
            # constant made in the forward pass) becomes a root, which must not take edges
            # of this call.
            parents = []
            for a in (args if not kwargs else (*args, *kwargs.values())):
                if isinstance(a, Tensor):
                    parents.append(node(a))
                elif isinstance(a, (list, tuple)):
                    for b in a:
                        if isinstance(b, Tensor):
                            parents.append(node(b))
            self.edges.extend(parents)
            new = len(self.offsets) - 1
            self.offsets.append(len(self.edges))
            dep = self.param_dep
            dep.append(any(dep[p] for p in parents))
            stack = self.stack
            self.norm.append(_NORM_FUNCS.get(func, 0) or (stack[-1][3] if stack else 0))
            self.floating.append(outs[0].is_floating_point())
            aliased = (any(o is a for o in outs for a in args) and not _in_place(func, kwargs))
            for o in outs:
                # An op that hands back its input unchanged (x.to(x.dtype), x.contiguous())
                # makes no new value: the tensor keeps its node.
                if not (aliased and any(o is a for a in args)):
                    self._assign(o, new)
        if merge is not None:
            self.last_sum = len(self.offsets) - 2
            self.sink(skip, pre[0], pre[1], out, projection, name, pre[2], norms)
            self.chained.append(False)
            self._prev_sum = (weakref.ref(out), out._version) if isinstance(out, Tensor) else None
        return out

    def _merge_operands(self, a, b):
        na, nb = self._node(a), self._node(b)
        found = self._latest_common_ancestor(na, nb)
        if found is None:
            return None
        da, db, ancestor = found
        if not self.floating[ancestor]:
            return None
        # The skip path is the operand closer to the common ancestor (the ancestor itself for
        # an identity shortcut); on a tie the first operand is taken as the skip path.
        if db < da:
            a, b, na, nb, da, db = b, a, nb, na, db, da
        # A residual branch holds a learned layer; a sum of two parameter-free functions of
        # one tensor (x + 0.044715 x^3 in GELU, q cos + rotate(q) sin in rotary embeddings)
        # is not a residual merge.
        path = self._path(nb, ancestor)
        if not self._learned(path, ancestor):
            return None
        post = 0
        # The skip path since the last merge's sum: for an identity shortcut, or one that only
        # rescales (DeepNorm's alpha x: no learned layer from the common ancestor on).
        if 0 <= self.last_sum < na and (da == 0 or (
                self.last_sum < ancestor and not self._learned(self._path(na, ancestor), ancestor))):
            post = self._norms(self._path(na, self.last_sum), self.last_sum)
        return a, b, da > 0, ancestor, (_norm_names(self._norms(path, ancestor) & ~(_WEIGHTS | _ACTIVATION)),
                                        _norm_names(post))

    def _norms(self, path, start):
        """The norm bits of the nodes on a path (``start`` itself excluded)."""
        bits = 0
        norm = self.norm
        for n, down in path.items():
            if down and n != start:
                bits |= norm[n]
        return bits

    def _learned(self, path, start):
        """Whether a call on the path took a parameter-dependent input that does not itself
        descend from the path's start (a weight, a gain)."""
        dep = self.param_dep
        for n, down in path.items():
            if down and n != start:
                for p in self.parents(n):
                    if dep[p] and not path.get(p, False):
                        return True
        return False

    def _path(self, node, ancestor, limit=100_000):
        """{n: whether n descends from ``ancestor``} over the ancestors of ``node`` newer than
        ``ancestor``: the nodes with True (but ``ancestor``) are on the paths from ``ancestor``
        to ``node``."""
        if node == ancestor:
            return {}
        # descends[n]: n descends from ancestor (or is it); only nodes newer than it can.
        descends = {ancestor: True}
        todo = [node]
        while todo and len(descends) < limit:
            n = todo[-1]
            if n in descends:
                todo.pop()
                continue
            pending = [p for p in self.parents(n) if p >= ancestor and p not in descends]
            if pending:
                todo.extend(pending)
                continue
            todo.pop()
            descends[n] = any(descends.get(p, False) for p in self.parents(n))
        return descends

    def _latest_common_ancestor(self, na, nb, limit=100_000):
        """Distances from na and nb to their latest common ancestor (by creation), and that
        ancestor, or None.

        Node ids grow with creation time and parents are older than children, so popping the
        newest node first reaches the latest common ancestor before any older one.
        """
        dist = {na: [0, None], nb: [None, 0]} if na != nb else {na: [0, 0]}
        heap = [-na] if na == nb else [-na, -nb]
        heapq.heapify(heap)
        seen = set()
        steps = 0
        while heap and steps < limit:
            node = -heapq.heappop(heap)
            if node in seen:
                continue
            seen.add(node)
            steps += 1
            da, db = dist[node]
            if da is not None and db is not None:
                return da, db, node
            for p in self.parents(node):
                d = dist.setdefault(p, [None, None])
                if da is not None and (d[0] is None or d[0] > da + 1):
                    d[0] = da + 1
                if db is not None and (d[1] is None or d[1] > db + 1):
                    d[1] = db + 1
                heapq.heappush(heap, -p)
        return None


@contextlib.contextmanager
def _search(model, recorder, matcher):
    """The merge search for one forward pass: the call graph under a TorchFunctionMode and
    every module's entry and exit (to name the block that owns each merge and read its
    input; always_call: the exit runs also when the forward raises).

    With ``blocks=`` (a matcher), the outermost matching modules are the blocks, one merge
    each: a block whose output has its input's shape is measured as skip = input, branch =
    output - input (which also covers merges hidden in fused kernels); a block that changes
    the shape (a projection shortcut) takes the last merge the search found inside it."""
    named = list(model.named_modules())
    finder = _MergeFinder(recorder, [m for _, m in named])
    names = {id(m): n for n, m in named}
    norms = {id(m): k for _, m in named if (k := _module_norm(m))}  # the norm modules only
    selected = set()
    if matcher is not None:
        found = {name for name, module in named if matcher(name, module)}
        # Outermost: no enclosing module ("" is the model itself) matched as well.
        selected = {n for n in found if n == "" or not (
            "" in found or any(".".join(n.split(".")[:k]) in found
                               for k in range(1, n.count(".") + 1)))}
        finder.sink = finder.hold  # merges are kept per block until the block exits
    block_hooks = {name: _block_hook(finder, name) for name in selected}
    del named  # the names live on in ``names``
    # Two global module hooks rather than two per module: registering a hook costs more
    # than calling one, and a thousand-block network has thousands of modules.
    def enter(module, args):
        name = names.get(id(module))
        if name is not None:  # a module of the model
            finder.enter(name, args, {}, norms.get(id(module), 0))
            if name in selected:
                finder.held.append([])

    def leave(module, args, out):
        name = names.get(id(module))
        if name is not None:
            if name in selected:
                block_hooks[name](module, args, out)
            finder.leave()

    from torch.nn.modules import module as _module
    handles = [_module.register_module_forward_pre_hook(enter),
               _module.register_module_forward_hook(leave, always_call=True)]
    try:
        with finder:
            # The input and the parameters are roots of the graph.
            yield finder
    finally:
        for h in handles:
            h.remove()
    recorder.finish_forward()


# --- replaying a search ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Site:
    """Where the search found a merge, in terms a replay can see without the call graph: the
    ``ordinal``-th candidate addition (see _candidate; those of submodules included unless
    ``direct``) during call number ``call`` of the module ``owner``, with the skip operand
    first or second."""

    owner: str
    call: int
    ordinal: int
    skip_first: bool
    projection: bool
    norms: tuple
    chained: bool = False  # its sum is the next skip operand (whose statistics it then needs)
    direct: bool = False  # made by the owner's own code: ``ordinal`` counts only those


#: Searches to replay: model -> {pass key -> tuple of _Site}. Weak: a model's plans go with it.
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Frame:
    """One running module call in a replay: the merges expected in it ({ordinal: merge
    index}, None for a module that only marks that its owner is not running its own code),
    whether they count only the owner's own additions, the additions counted so far, and the
    call's first tensor input (a projection block's input)."""

    __slots__ = ("targets", "direct", "count", "x")

    def __init__(self, targets, direct, x):
        self.targets, self.direct, self.count, self.x = targets, direct, 0, x


class _ReplayMode(TorchFunctionMode):
    """Counts candidate additions where the search found merges and records those; it is on
    only while an owner that needs it runs (an owner whose merges its own code makes: while
    no submodule of it runs), so the rest of the network runs bare."""

    def __init__(self, recorder, sites):
        super().__init__()
        self.recorder, self.sites = recorder, sites
        self.seen = []        # merge indices in the order they were recorded
        self.missing = False  # an owner module is gone
        self.frames = []      # _Frame per running owner call, and per call inside an owner
        self.ids = []         # the module of each frame
        self.nested = 0       # frames of owners that count their submodules' additions
        self.active = False

    @property
    def complete(self):
        """Whether the replay saw exactly the search's merges, in order."""
        return not self.missing and self.seen == list(range(len(self.sites)))

    def push(self, module, frame):
        self.frames.append(frame)
        self.ids.append(id(module))
        self.nested += frame.targets is not None and not frame.direct
        self._sync()

    def pop(self, module):
        if self.ids and self.ids[-1] == id(module):
            self.ids.pop()
            frame = self.frames.pop()
            self.nested -= frame.targets is not None and not frame.direct
            self._sync()

    def _sync(self):
        """On while an owner counts: its own code runs, or it counts nested additions."""
        need = self.nested > 0 or bool(self.frames) and self.frames[-1].targets is not None
        if need and not self.active:
            self.__enter__()
            self.active = True
        elif not need and self.active:
            self.__exit__(None, None, None)
            self.active = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if _candidate(func, args, kwargs):
            hit = None
            last = len(self.frames) - 1
            for i, frame in enumerate(self.frames):
                if frame.targets is None or (frame.direct and i != last):
                    continue
                k = frame.count
                frame.count = k + 1
                index = frame.targets.get(k)
                if index is not None:
                    hit = (index, frame)
            if hit is not None:
                index, frame = hit
                site = self.sites[index]
                skip, branch = (args[0], args[1]) if site.skip_first else (args[1], args[0])
                rec = self.recorder
                pre = rec.operands(skip, branch, frame.x if site.projection else skip)
                out = func(*args, **kwargs)
                rec.record(skip, pre[0], pre[1], out, site.projection, site.owner, pre[2],
                           site.norms, full_sum=site.chained or index == len(self.sites) - 1)
                self.seen.append(index)
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def _replay(model, recorder, sites):
    """Measure the merges at ``sites`` with a _ReplayMode that is on only while it is needed.
    Two global module hooks (one dict lookup per module call, no state per module) keep its
    stack of frames: one per call of an owner module, and, inside an owner, one per
    submodule call (to know when the owner's own code runs). Yields the mode: the caller
    checks ``complete`` (a model whose structure changed is searched again)."""
    by_owner = {}
    for k, site in enumerate(sites):
        by_owner.setdefault(site.owner, {}).setdefault(site.call, {})[site.ordinal] = k
    direct = {}
    for site in sites:
        direct[site.owner] = direct.get(site.owner, True) and site.direct
    mode = _ReplayMode(recorder, sites)
    owners = {}
    for name, calls in by_owner.items():
        try:  # by name, not a walk of the model: no memory per module
            module = model.get_submodule(name)
        except AttributeError:
            mode.missing = True
            continue
        owners[id(module)] = (calls, direct[name], [0])

    def pre(module, args):
        owner = owners.get(id(module))
        if owner is not None:
            calls, is_direct, counter = owner
            call = counter[0]
            counter[0] = call + 1
            targets = calls.get(call)
            mode.push(module, _Frame(targets, is_direct, _first_tensor_arg(args, {})
                                     if targets is not None else None))
        elif mode.frames:  # a submodule inside an owner: the owner's own code is not running
            mode.push(module, _Frame(None, False, None))
        return None

    def post(module, args, out):
        mode.pop(module)
        return None

    from torch.nn.modules import module as _module
    handles = [_module.register_module_forward_pre_hook(pre),
               _module.register_module_forward_hook(post, always_call=True)]
    try:
        yield mode
    finally:
        for h in handles:
            h.remove()
        if mode.active:
            mode.__exit__(None, None, None)
            mode.active = False
    recorder.finish_forward()


def _block_hook(finder, name):
    recorder = finder.recorder

    def hook(module, args, output):
        held = finder.held.pop() if finder.held else []
        x = args[0] if args else None
        if not isinstance(output, torch.Tensor):
            return None
        if isinstance(x, torch.Tensor) and x.shape == output.shape:
            with torch.no_grad():
                diff = output - x
                branch = (_channel_stats(diff, recorder.channel_axis)
                          + [_token_cosine(diff, recorder.channel_axis)])
            recorder.record(x, recorder.stats(x), branch, output, projection=False, name=name,
                            input_stats=recorder.input_stats(x),
                            norms=held[-1][-1] if held else ("", ""))
        elif held:
            skip, skip_stats, branch_stats, total, projection, _, input_stats, norms = held[-1]
            recorder.record(skip, skip_stats, branch_stats, total, projection, name,
                            input_stats, norms)
        else:
            recorder.record_missing_skip(output, name)
        return None
    return hook


def _first_tensor_arg(args, kwargs):
    for a in args:
        if isinstance(a, Tensor):
            return a
    for a in kwargs.values():
        if isinstance(a, Tensor):
            return a
    return None


def _block_matcher(blocks):
    if blocks is None:
        return None
    if isinstance(blocks, (str, type)):
        blocks = [blocks]
    try:
        blocks = list(blocks)
    except TypeError:
        raise TypeError(f"blocks must be module classes or name patterns, got {blocks!r}") from None
    for b in blocks:
        if not (isinstance(b, str) or (isinstance(b, type) and issubclass(b, torch.nn.Module))):
            raise TypeError(f"blocks entries must be nn.Module subclasses or fnmatch patterns such "
                            f"as 'layer1.*', got {b!r}")
    types = tuple(b for b in blocks if isinstance(b, type))
    patterns = [b for b in blocks if isinstance(b, str)]

    def matcher(name, module):
        return (types and isinstance(module, types)) or any(fnmatch.fnmatchcase(name, p)
                                                           for p in patterns)
    return matcher


# --- checks and the untouched-model guarantee -------------------------------------------------

def _check_models(model):
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise ValueError("model must be an nn.Module or a non-empty list of them, got an empty list")
    for m in models:
        if not isinstance(m, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (or a list of them), got "
                            f"{type(m).__name__}: {m!r:.80}")
    # A torch.compile'd module runs generated code that no hook or TorchFunctionMode sees
    # reliably; it holds the original module, with the same parameters and buffers, which is
    # measured instead (eager kernels: the same statistics up to float rounding).
    return [_uncompiled(m) for m in models]


def _uncompiled(model):
    return getattr(model, "_orig_mod", model) if _is_compiled(model) else model


def _is_compiled(model):
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return isinstance(model, OptimizedModule)


def _input_source(inputs):
    if isinstance(inputs, (torch.Tensor, Mapping)):
        return lambda i: inputs
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("inputs must be a tensor, a non-empty list of tensors or a callable")
        return lambda i: inputs[i % len(inputs)]
    if callable(inputs):
        return inputs
    raise TypeError(f"inputs must be a torch.Tensor, a list of tensors or a callable seed -> tensor, "
                    f"got {type(inputs).__name__}")


def _check_input(x, model, channel_axis):
    """The batch tensor, and (key, other keyword inputs) for a dict of inputs, or None."""
    kwargs = None
    if isinstance(x, Mapping):
        keys = [k for k, v in x.items() if isinstance(v, torch.Tensor)]
        if not keys:
            raise TypeError(f"keyword inputs must hold at least one tensor (the batch), got keys "
                            f"{list(x)}")
        param = next(iter(model.parameters()), None)
        rest = {k: (v.to(param.device) if isinstance(v, torch.Tensor) and param is not None
                    else v) for k, v in x.items() if k != keys[0]}
        kwargs, x = (keys[0], rest), x[keys[0]]
    return _check_batch(x, model, channel_axis), kwargs


def _check_batch(x, model, channel_axis):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"inputs must be torch.Tensor batches (or dicts of keyword inputs), got "
                        f"{type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"inputs must have a batch axis and a channel axis (rank >= 2), got shape "
                         f"{tuple(x.shape)}")
    if not -x.dim() <= channel_axis < x.dim():
        raise ValueError(f"channel_axis={channel_axis} is out of range for inputs of rank {x.dim()}")
    if x.shape[0] < 2:
        raise ValueError(f"inputs need a batch of at least 2 examples for channel statistics, got "
                         f"shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"inputs must be a real floating (or integer token) tensor, got {x.dtype}")
    param = next(iter(model.parameters()), None)
    if param is not None:
        if x.is_floating_point() and x.dtype != param.dtype:
            raise TypeError(f"inputs have dtype {x.dtype} but the model's parameters are "
                            f"{param.dtype}; cast the inputs, or pass dtype={x.dtype} to measure "
                            f"a copy of the model in that precision")
        if x.device != param.device:
            x = x.to(param.device)
    return x


class ModelChangedWarning(RuntimeWarning):
    """The model modified its own parameters in place during the forward pass."""


@contextlib.contextmanager
def _untouched(model, modules=None):
    """Restore buffers, parameters' flags and gradients, training flags and the RNG state;
    yields the list of the model's modules.

    Buffers (BatchNorm's running statistics, counters) are copied and written back.
    Parameters are not copied, which would double the model's memory: measure never writes
    them, and their version counters tell if the model's own forward pass did. The model is
    walked once and everything restored in a few calls: at a thousand modules this was a
    fifth of the cost of measuring a small network.
    """
    modules = list(model.modules()) if modules is None else modules
    training = [m.training for m in modules]
    b_dicts, b_names, b_tensors = [], [], []
    for mod in modules:
        for name, buf in mod._buffers.items():
            if buf is not None:
                b_dicts.append(mod._buffers)
                b_names.append(name)
                b_tensors.append(buf)
    # One flat copy per dtype, device and 256 buffers, not one small tensor per buffer (at a
    # thousand blocks those were megabytes of tensor objects for kilobytes of data); 256 at
    # a time so that the views made on the way stay few.
    groups = {}
    for buf in b_tensors:
        groups.setdefault((buf.dtype, buf.device), []).append(buf)
    saved = [(group[i:i + 256], torch.cat([b.detach().reshape(-1) for b in group[i:i + 256]]))
             for group in groups.values() for i in range(0, len(group), 256)]
    # Parallel lists, not a tuple per parameter: a few bytes a parameter while the pass runs.
    p_dicts, p_names, p_tensors = [], [], []
    for mod in modules:
        for name, p in mod._parameters.items():
            if p is not None:
                p_dicts.append(mod._parameters)
                p_names.append(name)
                p_tensors.append(p)
    p_versions = [p._version for p in p_tensors]
    p_requires = [p.requires_grad for p in p_tensors]
    p_grads = [p.grad for p in p_tensors]
    rng = torch.get_rng_state()
    try:
        yield modules
    finally:
        changed = []
        with torch.no_grad():
            for d, name, buf in zip(b_dicts, b_names, b_tensors):
                if d.get(name) is not buf:
                    d[name] = buf
            for group, flat in saved:
                parts = flat.split([b.numel() for b in group])
                torch._foreach_copy_(group, [v.view(b.shape) for v, b in zip(parts, group)])
            for d, name, p, version, req, grad in zip(p_dicts, p_names, p_tensors, p_versions,
                                                      p_requires, p_grads):
                if d.get(name) is not p:
                    d[name] = p
                if p._version != version:
                    changed.append(name)
                if p.requires_grad != req:
                    p.requires_grad_(req)
                if p.grad is not grad:
                    p.grad = grad
        for m, flag in zip(modules, training):
            if m.training != flag:
                m.__dict__["training"] = flag
        torch.set_rng_state(rng)
        if changed:
            warnings.warn(f"the model's forward pass modified parameters in place "
                          f"({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}); "
                          f"measure restored buffers and flags but cannot restore those",
                          ModelChangedWarning, stacklevel=3)


def _stderr_is_tty():
    import sys
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
