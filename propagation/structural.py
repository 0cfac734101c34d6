"""``predict(model, inputs)``: the mean-field theory of a PyTorch model from its own calls and
the weights it holds.

The scheme theory (predict.py) knows a fixed set of architectures with fixed
initialisations. This module derives the same infinite-width, two-point theory for any
network whose forward pass is made of supported calls: it runs the forward pass once, on two
examples of the batch, under a ``TorchFunctionMode`` that carries, beside every tensor, the
*state* the theory predicts for it, and maps that state through each call with the call's
own arguments and weights. The merges are found and named by the same search as
``measure`` (empirical.py), so that theory and measurement line up merge by merge.

The state of a tensor
---------------------
Entries of one channel at two distinct points (another example, or another position) are
modelled, over the randomness of the weights, as jointly Gaussian ``mu + eps``, where the
channel's mean ``mu`` is shared by both points and the noise ``eps`` is not:

* ``q``  = E[x^2], the second moment (averaged over channels);
* ``v``  = E[var of a channel over points] = q - c, the channel variance, where
  ``c`` = E[x(a) x(b)] for distinct points (the squared channel mean of the infinite batch);
* ``nu`` = the part of the mean common to every channel (a ReLU's output has mean
  sqrt(q / 2 pi) in every channel; weight-standardised layers remove exactly that part).

Channels are independent given ``nu`` (infinite width). ``v`` is carried rather than ``c``
because deep unnormalised networks drive c / q to 1, where ``v`` carries the information
(kernels.py); every map below updates ``v`` without subtracting nearly equal numbers.

The maps (each derived in the docstring of its function):

* weight layers (Linear, Conv1d/2d/3d with stride, dilation, groups, zero padding) read
  three statistics of the weight they are called with, per in-bounds tap pattern: A = sum
  of squares, B = sum over input channels of the squared tap sums, C = squared row sums;
* BatchNorm / LayerNorm / GroupNorm / RMSNorm with their affine parameters and eps, and
  hand-written norm modules (by class name, as ``measure`` names them);
* elementwise functions: ReLU in closed form; any other (GELU, SiLU, tanh, sigmoid, ReLU6,
  Hardswish, ...) by quadrature over the Gaussian, with the call's own arguments;
* multipliers and biases (constants, parameters, per-channel gains: SkipInit, LayerScale),
  average and max pooling, padding, concatenation, dropout, reshapes, embeddings, sums of
  independent operands (merges) and products of independent activations (gates).

Backwards, each call multiplies the squared gradient norm by its gain under the
gradient-independence assumption (README, "Theory"), and the gradient profile is read at
the same tensors as ``measure`` reads it.

What it leaves out: attention (softmax of products of activations), products of dependent
activations, pooling windows that overlap (counted as if they did not); the channel
exchangeability above (per-channel gains enter through their mean square). An op with no map
raises :class:`UnsupportedOpError` naming the op and the module that called it, when a merge
depends on it; ``unsupported="measure"`` takes that op's measured output instead and says so
in ``Profile.meta["measured_ops"]``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import _checks, kernels
from .empirical import (_MODES, _NO_MERGES, NoMergesError, _call, _check_input,
                        _check_models, _input_source, _module_norm, _Recorder, _search,
                        _set_mode, _untouched, _WeakIds)
from .predict import _logaddexp2
from .profile import Normalised, Profile

__all__ = ["predict_model", "State", "Op", "register_map", "supported_ops",
           "UnsupportedOpError", "clear_cache", "elementwise_map"]

_LOG2 = math.log2


class UnsupportedOpError(NotImplementedError):
    """The forward pass called an op that the structural theory has no map for."""


@dataclass(frozen=True)
class State:
    """The theory's state of one tensor (see the module docstring): second moment ``q``,
    channel variance ``v`` (so the squared channel mean is q - v), the mean ``nu`` common to
    all channels, and bookkeeping: ``weights`` (weight layers on the longest path from the
    input), ``last_weight`` (the id of the latest weight call on that path, to tell
    independent operands of a product from dependent ones), ``chain`` (for max pooling: the
    Gaussian state, the elementwise calls this tensor is a function of and their composed
    gradient gain), ``pad_of`` (after a zero F.pad: the state before it and the padding per
    spatial axis, which the next convolution reads as its own) and ``unknown`` (why there
    is no state: the op without a map, and where)."""

    q: float
    v: float
    nu: float = 0.0
    weights: int = 0
    last_weight: int = -1
    chain: Optional[Tuple["State", Tuple[Any, ...], float, int]] = None
    pad_of: Optional[Tuple["State", Tuple[Tuple[int, int], ...], float]] = None
    unknown: str = ""

    @property
    def c(self) -> float:
        """E[x(a) x(b)] for distinct points: the squared channel mean of an infinite batch."""
        return self.q - self.v

    @property
    def spread(self) -> float:
        """The variance of the channel means around ``nu``: c - nu^2, at least 0."""
        return max(self.q - self.v - self.nu * self.nu, 0.0)

    def stats(self) -> List[float]:
        return [self.q, max(self.q - self.v, 0.0), self.v]


def _unknown(reason: str) -> State:
    return State(math.nan, math.nan, math.nan, unknown=reason)


@dataclass
class Op:
    """One call as a map sees it: ``func``, ``args``, ``kwargs``, its output ``out`` (the
    real tensor, on the two examples the pass runs on), ``module`` (the qualified name of the
    innermost module running) and ``ctx`` (the propagator: ``ctx.state(t)`` is the state of
    a tensor argument, None for constants such as weights)."""

    func: Any
    args: tuple
    kwargs: dict
    out: Any
    module: str
    ctx: "_Propagator"

    def state(self, t):
        return self.ctx.state(t)

    @property
    def name(self):
        return _op_name(self.func)


#: A map: ``map(op) -> (State of the output, [(input tensor, gain), ...])``, where gain is
#: the factor by which the call multiplies the squared gradient norm from its output to that
#: input (1 for a reshape, 1/2 for a ReLU, the mean squared row norm for a weight layer).
#: Return None to declare the call unsupported for these arguments.
MapFn = Callable[[Op], Optional[Tuple[State, List[Tuple[Tensor, float]]]]]
_MAPS: Dict[Any, Tuple[str, MapFn]] = {}


def register_map(funcs, fn: MapFn, name: Optional[str] = None) -> None:
    """Register ``fn`` as the map of each function in ``funcs`` (e.g. ``torch.erf`` or
    ``F.softmax``), as it arrives in ``__torch_function__``; see :data:`MapFn` and README's
    "Adding a map". A later registration replaces an earlier one."""
    if not callable(fn):
        raise TypeError(f"fn must be a callable op -> (State, gains), got {fn!r}")
    funcs = funcs if isinstance(funcs, (list, tuple, set, frozenset)) else [funcs]
    for f in funcs:
        _MAPS[f] = (name or _op_name(f), fn)


def supported_ops() -> List[str]:
    """The names of the calls with a map, sorted."""
    return sorted({name for name, _ in _MAPS.values()})


def _op_name(func):
    name = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__objclass__", None) or getattr(func, "__self__", None)
    if owner is torch.Tensor or getattr(owner, "__name__", "") == "TensorBase":
        return f"Tensor.{name}"
    module = getattr(func, "__module__", "") or ""
    if module.startswith("torch.nn.functional") or module == "torch._C._nn":
        return f"F.{name}"
    return f"torch.{name}" if module.startswith("torch") else name


# --- Gaussian expectations -----------------------------------------------------------------------

#: Outer nodes (the channel mean mu): Gauss-Hermite, exact for polynomials of degree 95; the
#: integrand there is smooth (an inner Gaussian average of the function).
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(48)
_GH_W = _GH_W / math.sqrt(2.0 * math.pi)
#: Inner nodes (the noise eps): the trapezoid rule on [-9, 9] with step 1/256, weighted by
#: the normal density. Functions with kinks (ReLU6, Hardswish) defeat Gauss-Hermite (its
#: error falls as 1/n); the trapezoid's error at a kink is O(h^2) = 1.5e-5 h^2-units, and the
#: mass beyond 9 sigma is 2e-19. tests/test_structural.py bounds the error against closed
#: forms (ReLU, and the clipped ReLU6 moments).
_TZ = np.linspace(-9.0, 9.0, 18 * 256 + 1)
_TW = np.exp(-0.5 * _TZ ** 2) / math.sqrt(2.0 * math.pi) * (_TZ[1] - _TZ[0])
_TW[0] *= 0.5
_TW[-1] *= 0.5


#: For E f'(z)^2 (a step where f has a kink): the midpoint rule with step 1/4096, whose
#: error at a step is at most h phi(0) / 2 = 5e-5 of the jump.
_MZ = np.arange(-9.0 + 0.5 / 4096, 9.0, 1.0 / 4096)
_MW = np.exp(-0.5 * _MZ ** 2) / math.sqrt(2.0 * math.pi) / 4096


#: For smooth functions (analytic on the real line) the trapezoid rule converges faster than
#: any power of h: step 1/16 is exact to rounding for Gaussian-weighted integrands there.
_SZ = np.linspace(-9.0, 9.0, 18 * 16 + 1)
_SW = np.exp(-0.5 * _SZ ** 2) / math.sqrt(2.0 * math.pi) * (_SZ[1] - _SZ[0])
_SW[0] *= 0.5
_SW[-1] *= 0.5


def _chain(funcs, z):
    """The calls ``funcs`` applied in turn to the float64 grid ``z``, each with its own
    other arguments (``inplace`` acts on a fresh copy of the grid)."""
    for func, args, kwargs in funcs:
        z = func(z.clone(), *args[1:], **kwargs)
    return z


def _grid_moments(funcs, s: State, nodes, weights) -> Tuple[float, float, float]:
    """(q', v', nu') of the chain ``funcs`` at mu + sqrt(v) t, mu ~ N(nu, c - nu^2) by
    Gauss-Hermite (outer), t on ``nodes`` with ``weights`` (inner: the noise, or the
    maximum of a pooling window). The inner variance is formed centred: no cancellation."""
    mu = s.nu + math.sqrt(s.spread) * _GH_X
    z = torch.from_numpy(mu[:, None] + math.sqrt(max(s.v, 0.0)) * nodes[None, :])
    with torch.no_grad():
        f = _chain(funcs, z).double().numpy()
    inner = f @ weights                               # E f, per mu
    var = ((f - inner[:, None]) ** 2) @ weights       # Var f, per mu
    c, v = float(_GH_W @ (inner * inner)), float(_GH_W @ var)
    return c + v, v, float(_GH_W @ inner)


def _elementwise(funcs, s: State) -> Tuple[float, float, float, float]:
    """(q', v', nu', E f'(z)^2) of ``f = funcs[-1] o ... o funcs[0]`` applied to a tensor of
    state ``s`` (Gaussian), by quadrature: mu ~ N(nu, c - nu^2) outer, eps ~ N(0, v) inner."""
    smooth = all(f in _SMOOTH for f, _, _ in funcs)
    tz, tw = (_SZ, _SW) if smooth else (_TZ, _TW)
    mz, mw = (_SZ, _SW) if smooth else (_MZ, _MW)
    q, v, nu = _grid_moments(funcs, s, tz, tw)
    # E (f'(z))^2 for the composed chain, z ~ N(nu, q - nu^2): autograd on a 1-D grid.
    zs = torch.from_numpy(s.nu + math.sqrt(max(s.q - s.nu * s.nu, 0.0)) * mz).requires_grad_(True)
    with torch.enable_grad():
        (d,) = torch.autograd.grad(_chain(funcs, zs).sum(), zs, allow_unused=True)
    gain = 0.0 if d is None else float((d.double().numpy() ** 2) @ mw)
    return q, v, nu, gain


def _relu(s: State) -> Tuple[float, float, float, float]:
    """ReLU of a Gaussian state: (q', v', nu', gain).

    With nu = 0 (every input of a ReLU that follows a weight layer or a norm without bias)
    the closed form: q' = q / 2, with e = v / q, v' = q' (1 - kappa(1 - e))
    (kernels.one_minus_kappa: accurate as e -> 0), nu' = sqrt(q / 2 pi), gain 1/2.

    With nu != 0: the inner moments over eps ~ N(0, v) at a channel mean mu are closed
    forms in t = mu / sqrt(v): E = sqrt(v) (phi(t) + t Phi(t)) and Var = v B(t) with
    B(t) = t^2 Phi(t) Phi(-t) + Phi(t) + t phi(t) (1 - 2 Phi(t)) - phi(t)^2 (no cancellation
    of large terms). They are averaged over mu ~ N(nu, S^2), S^2 = c - nu^2: where
    S <= sqrt(v), by Gauss-Hermite (the inner moments are smooth on the scale of mu's
    spread); otherwise by Gauss-Legendre on |mu| < 8 sqrt(v), where they change, and in
    closed form beyond (mu > 8 sqrt(v): mean mu, variance v, to Phi(-8) = 6e-16; mu below:
    0). The gradient's gain is P(z > 0) = Phi(nu / sqrt(q - nu^2)).
    """
    if s.q <= 0.0:
        return 0.0, 0.0, 0.0, 0.5
    if s.nu == 0.0:
        q = 0.5 * s.q
        return (q, q * kernels.one_minus_kappa_scalar(s.v / s.q), math.sqrt(s.q / (2.0 * math.pi)),
                0.5)
    from scipy.special import ndtr
    sig = math.sqrt(max(s.v, 0.0))
    S = math.sqrt(s.spread)
    nu = s.nu
    gain = float(ndtr(nu / math.sqrt(max(s.q - nu * nu, 1e-300))))

    def inner(mu):
        if sig == 0.0:
            return np.maximum(mu, 0.0), np.zeros_like(mu)
        t = mu / sig
        P, Q = ndtr(t), ndtr(-t)
        ph = np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
        mean = sig * (ph + t * P)
        var = s.v * (t * t * P * Q + P + t * ph * (Q - P) - ph * ph)
        return mean, np.maximum(var, 0.0)

    if S <= sig or S == 0.0:
        m, var = inner(nu + S * _GH_X)
        w = _GH_W
        c = float(w @ (m * m))
        return c + float(w @ var), float(w @ var), float(w @ m), gain
    L = 8.0 * sig
    x, wl = _GL_X, _GL_W
    mu = L * x
    dens = np.exp(-0.5 * ((mu - nu) / S) ** 2) / (S * math.sqrt(2.0 * math.pi)) * L * wl
    m, var = inner(mu)
    c, v, mean = float(dens @ (m * m)), float(dens @ var), float(dens @ m)
    # mu > L: the ReLU passes mu + eps
    a = (L - nu) / S
    P = float(ndtr(-a))
    ph = math.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    e1 = nu * P + S * ph
    e2 = (nu * nu + S * S) * P + S * (nu + L) * ph
    return c + e2 + v + s.v * P, v + s.v * P, mean + e1, gain


_GL_X, _GL_W = np.polynomial.legendre.leggauss(96)


# --- weight layers -------------------------------------------------------------------------------

def _tap_classes(in_size, kernel, stride, padding, dilation):
    """Along one spatial axis: the distinct in-bounds tap masks of the output positions, as
    (mask (kernel,) bool, fraction of output positions); ``padding`` is (before, after)."""
    lo, hi = padding
    out = (in_size + lo + hi - dilation * (kernel - 1) - 1) // stride + 1
    if out <= 0:
        return []
    o = np.arange(out)[:, None]
    taps = o * stride - lo + dilation * np.arange(kernel)[None, :]
    inb = (taps >= 0) & (taps < in_size)
    masks, counts = np.unique(inb, axis=0, return_counts=True)
    return list(zip(masks, counts / out))


def _conv_geometry(op, x, w):
    """Per spatial axis: (kernel, stride, padding, dilation), from F.convNd's arguments."""
    nd = w.dim() - 2
    names = ("stride", "padding", "dilation")
    defaults = (1, 0, 1)
    values = []
    for i, (name, d) in enumerate(zip(names, defaults)):
        val = op.kwargs.get(name, op.args[3 + i] if len(op.args) > 3 + i else d)
        values.append(val)
    stride, padding, dilation = values
    spatial = tuple(x.shape[-nd:])
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same": total padding d (k - 1), the smaller half first
            padding = tuple((dil * (k - 1)) // 2 for dil, k in
                            zip(_tuple(dilation, nd), w.shape[2:]))
            # (torch puts the odd remainder after; a second-order difference at one edge)
    return [(int(w.shape[2 + i]), _tuple(stride, nd)[i], (_tuple(padding, nd)[i],) * 2,
             _tuple(dilation, nd)[i], spatial[i]) for i in range(nd)]


def _tuple(v, n):
    if isinstance(v, (list, tuple)):
        return tuple(int(a) for a in v) if len(v) == n else tuple(int(v[0]) for _ in range(n))
    return (int(v),) * n


class _Moments:
    """A weight's second moments over its taps, (C_out, C_in / groups, *kernel) read once:
    ``G`` = sum over (o, i) of w_oit w_oit' / C_out (taps x taps), ``H`` = sum over o of
    R_ot R_ot' / C_out with R_ot = sum_i w_oit (the row sums per tap), ``r`` = mean over o of
    R_ot. Every statistic the map needs, for any in-bounds tap mask m, is a quadratic or
    linear form in m: A_M = diag(G) m, B_M = m' G m, mean S^2 = m' H m, mean S = r m.
    Cached per weight tensor and version (a model's weights are read once per predict)."""

    def __init__(self, w):
        f = w.detach().to(torch.float64).reshape(w.shape[0], w.shape[1], -1)
        c_out, taps = f.shape[0], f.shape[2]
        flat = f.reshape(-1, taps)
        self.G = (flat.T @ flat).numpy() / c_out
        rows_t = f.sum(dim=1)                                       # (o, taps)
        self.H = (rows_t.T @ rows_t).numpy() / c_out
        self.r = rows_t.mean(dim=0).numpy()
        self.taps, self.fan_in = taps, f.shape[1] * taps
        rows = rows_t.sum(dim=1)
        norms = flat.reshape(c_out, -1).pow(2).sum(dim=1).sqrt()
        # Rows that sum to zero (weight standardisation): their sums are rounding, 1e-7 of
        # the row norm times sqrt(fan_in); a drawn row's sum is of the order of its norm.
        self.zero_sum = bool(self.fan_in > 1 and (rows.abs() <= 1e-5 * norms
                                                  * math.sqrt(self.fan_in)).all())


_MOMENTS = _WeakIds()


def clear_cache() -> None:
    """Forget the weight moments read so far (they are kept per tensor and version, so that
    a second ``predict`` of the same model does not read its weights again)."""
    global _MOMENTS
    _MOMENTS = _WeakIds()


def _moments(w) -> _Moments:
    hit = _MOMENTS.get(w)
    if hit is not None and hit[0] == (w._version, tuple(w.shape), w.dtype):
        return hit[1]
    m = _Moments(w)
    _MOMENTS.set(w, ((w._version, tuple(w.shape), w.dtype), m))
    return m


class _WeightStats:
    """Per class of output positions (their in-bounds tap mask M, with its share of the
    positions): (share, A, B, mean S^2, mean S), means over output channels; over the
    position-averaged mask m_hat (the share of positions for which each tap is in bounds)
    ``b_hat``, ``s2_hat``, ``s_hat`` for the covariance of distant points; over all taps
    ``a_full``, ``b_full``, ``s2_full``, ``s_full``. ``law``: instead, the expectation over
    i.i.d. entries of the layer's realised scale (zero-sum rows conditioned to stay so)."""

    def __init__(self, w, classes, law):
        mo = _moments(w)
        G, H, r, taps = mo.G, mo.H, mo.r, mo.taps
        diag = np.diag(G)
        a_full = float(diag.sum())
        self.a_full = a_full
        zero_sum = mo.zero_sum
        self.classes = []
        m_hat = np.zeros(taps)
        for mask, share in classes:
            m = mask.reshape(-1).astype(np.float64)
            m_hat += share * m
            frac = float(m.sum()) / taps
            if law:
                a = a_full * frac
                # E (sum of k of n entries)^2: k sigma^2, or k sigma^2 (1 - k/n) for a
                # row summing to zero
                self.classes.append((share, a, a, a * (1.0 - frac) if zero_sum else a, 0.0))
            else:
                self.classes.append((share, float(diag @ m), float(m @ G @ m),
                                     float(m @ H @ m), float(r @ m)))
        ones = np.ones(taps)
        if law:
            frac1, frac2 = float(m_hat.sum()) / taps, float(m_hat @ m_hat) / taps
            self.b_hat = a_full * frac2
            self.s2_hat = a_full * (frac2 - frac1 * frac1) if zero_sum else self.b_hat
            self.s_hat = 0.0
            self.b_full, self.s2_full, self.s_full = a_full, (0.0 if zero_sum else a_full), 0.0
        else:
            self.b_hat, self.s2_hat = float(m_hat @ G @ m_hat), float(m_hat @ H @ m_hat)
            self.s_hat = float(r @ m_hat)
            self.b_full, self.s2_full = float(ones @ G @ ones), float(ones @ H @ ones)
            self.s_full = float(r.sum())


def _weight_map(op: Op) -> Optional[Tuple[State, list]]:
    """y_o(a) = sum_{i, t in M_a} W_oit x_i(a + t) + b_o, M_a the taps of output position a
    that fall inside the input (zero padding drops the rest). With x_i = nu + (mu_i - nu) +
    eps_i, channels independent given nu:

        E y_o(a)^2 = v A_M + (c - nu^2) B_M + (nu S_oM + b_o)^2

    (A: squares; B: squared tap sums per input channel; S: row sums, all over M_a), averaged
    over output channels and positions. Two distant points a, b see their own masks; their
    covariance averages to (c - nu^2) B_hat + mean_o (nu S_hat_o + b_o)^2 over the
    position-averaged mask. The channel means (nu S_o + b_o) differ from channel to channel:
    they enter the output's channel-mean spread, and the output's common mean is 0.
    ``padding="mean"`` keeps the unpadded correlation (the scheme theory's mean padding
    factor): c' = q' (c / q of the unpadded layer). Backwards the squared norm gains the
    mean in-bounds A (each input receives sum_o W^2 g^2 from the outputs that read it)."""
    x, w = op.args[0], (op.args[1] if len(op.args) > 1 else op.kwargs.get("weight"))
    bias = op.args[2] if len(op.args) > 2 else op.kwargs.get("bias")
    s = op.state(x)
    if s is None or not isinstance(w, Tensor) or op.state(w) is not None:
        return None  # a product of activations (attention), not a weight layer
    if bias is not None and op.state(bias) is not None:
        return None
    ctx = op.ctx
    pad_gain = 1.0
    if w.dim() == 2:  # F.linear
        classes = [(np.ones((1,), dtype=bool), 1.0)]
    else:
        classes = [(np.ones((), dtype=bool), 1.0)]
        geometry = _conv_geometry(op, x, w)
        if s.pad_of is not None and len(s.pad_of[1]) >= len(geometry):
            # Zeros an F.pad added: the conv's own padding, on the unpadded input. The tape
            # runs through the pad (gain f, its kept fraction), so this call's gain is the
            # pair's over f.
            s, pads, pad_gain = s.pad_of[0], s.pad_of[1][-len(geometry):], s.pad_of[2]
            geometry = [(k, st, (p[0] + lo, p[1] + hi), d, size - lo - hi)
                        for (k, st, p, d, size), (lo, hi) in zip(geometry, pads)]
        for k, st, p, d, size in geometry:
            axis = _tap_classes(size, k, st, p, d)
            classes = [(np.multiply.outer(m0, m1).astype(bool), f0 * f1)
                       for m0, f0 in classes for m1, f1 in axis]
        classes = [(m.reshape(-1), f) for m, f in classes]
    stats = _WeightStats(w, classes, ctx.weights == "law")
    b = None if bias is None else bias.detach().double().reshape(-1)
    b2 = 0.0 if b is None else float(b.pow(2).mean())
    bm = 0.0 if b is None else float(b.mean())
    spread, nu = s.spread, s.nu

    def d2(s2, s_mean):
        # mean_o (nu S_o + b_o)^2 = nu^2 mean S^2 + 2 nu mean(S b) + mean b^2, with mean(S b)
        # taken as mean(S) mean(b) (exact for layers without bias or with nu = 0).
        return nu * nu * s2 + 2.0 * nu * s_mean * bm + b2

    q_new, a_mean = 0.0, 0.0
    for weight, a, bb, s2, s_mean in stats.classes:
        q_new += weight * (s.v * a + spread * bb + d2(s2, s_mean))
        a_mean += weight * a
    c_new = spread * stats.b_hat + d2(stats.s2_hat, stats.s_hat)
    if len(stats.classes) == 1:
        v_new = s.v * a_mean
    elif ctx.padding == "mean":
        # The scheme theory's treatment: the second moment per position, the unpadded
        # layer's share of channel variance.
        full_q = s.v * stats.a_full + spread * stats.b_full + d2(stats.s2_full, stats.s_full)
        v_new = q_new * (s.v * stats.a_full / full_q) if full_q > 0 else 0.0
    else:
        # v' = v A (mean over positions) + the variance over positions of the diagonal
        # terms, which is >= 0 (Jensen); rounding aside, never below v A.
        v_new = max(q_new - c_new, s.v * a_mean)
    state = State(q_new, max(v_new, 0.0), nu=0.0, weights=s.weights + 1,
                  last_weight=ctx.counter)
    return state, [(x, a_mean / pad_gain)]


# --- normalisations ------------------------------------------------------------------------------

def _affine_stats(weight, bias):
    g2 = 1.0 if weight is None else float(weight.detach().double().pow(2).mean())
    gm = 1.0 if weight is None else float(weight.detach().double().mean())
    b2 = 0.0 if bias is None else float(bias.detach().double().pow(2).mean())
    bm = 0.0 if bias is None else float(bias.detach().double().mean())
    return g2, gm, b2, bm


def _normalised(s: State, inner_v, inner_spread, scale, weight, bias):
    """A norm that maps x to (x - subtracted) / scale, then the affine gamma, beta:
    the output's channel variance is inner_v / scale^2 and its channel-mean spread
    inner_spread / scale^2, times mean gamma^2; beta adds mean beta^2 to both q and c."""
    g2, gm, b2, bm = _affine_stats(weight, bias)
    v = g2 * inner_v / scale
    c = g2 * inner_spread / scale + b2
    return State(v + c, v, nu=bm, weights=s.weights, last_weight=s.last_weight), g2 / scale


def _batch_norm(op: Op):
    """F.batch_norm. Train mode (or no running statistics): each channel to its own batch
    mean and variance: the channel means go, v -> v / (v + eps); the gradient's squared norm
    gains gamma^2 / (v + eps). Eval mode with running statistics: a per-channel affine map."""
    a = op.args
    x = a[0]
    s = op.state(x)
    rm = a[1] if len(a) > 1 else op.kwargs.get("running_mean")
    rv = a[2] if len(a) > 2 else op.kwargs.get("running_var")
    weight = a[3] if len(a) > 3 else op.kwargs.get("weight")
    bias = a[4] if len(a) > 4 else op.kwargs.get("bias")
    training = a[5] if len(a) > 5 else op.kwargs.get("training", False)
    eps = a[7] if len(a) > 7 else op.kwargs.get("eps", 1e-5)
    if training or rm is None or rv is None:
        state, gain = _normalised(s, s.v, 0.0, s.v + eps, weight, bias)
        return state, [(x, gain)]
    inv = 1.0 / torch.sqrt(rv.detach().double() + eps)
    g = inv if weight is None else weight.detach().double() * inv
    sh = -rm.detach().double() * g + (0.0 if bias is None else bias.detach().double())
    view = (1, -1) + (1,) * (x.dim() - 2)
    return _affine(s, g.reshape(view), sh.reshape(view), x, op.out, 1)


def _layer_norm(op: Op):
    """F.layer_norm over the trailing ``normalized_shape``: per point (and per example over
    positions when the shape covers them) subtract the mean over the normalised entries and
    divide by their standard deviation. Over channels only, the mean is nu (infinite width):
    v -> v / (q - nu^2), the channel-mean spread likewise. Over C channels and P positions
    (GroupNorm(1, C) as a LayerNorm) see :func:`_group_norm`."""
    x = op.args[0]
    s = op.state(x)
    shape = op.args[1] if len(op.args) > 1 else op.kwargs["normalized_shape"]
    weight = op.args[2] if len(op.args) > 2 else op.kwargs.get("weight")
    bias = op.args[3] if len(op.args) > 3 else op.kwargs.get("bias")
    eps = op.args[4] if len(op.args) > 4 else op.kwargs.get("eps", 1e-5)
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(d) for d in shape)
    n = int(np.prod(shape))
    axis = op.ctx.channel_axis % x.dim()
    if axis >= x.dim() - len(shape):  # the channels are normalised (with positions, if any)
        chans = int(x.shape[axis])
    else:  # over positions only, per channel: an instance norm
        chans = 1
    return _grouped(s, x, group_channels=chans, positions=n // chans, weight=weight,
                    bias=bias, eps=eps)


def _grouped(s, x, group_channels, positions, weight, bias, eps):
    """Normalisation per example over g channels x P positions. The subtracted group mean
    is nu plus the mean of g channel means (a share 1/g of their spread) plus noise over
    gP entries; so, per example,
        kept spread  = (c - nu^2)(1 - 1/g),
        group var    = v (1 - 1/(g P)) + kept spread       (P = 1: all of it cancels in
    the ratios below, which are then exact at any g). The output's v and channel-mean
    spread are v / (group var + eps) and kept spread / (group var + eps)."""
    g = max(int(group_channels), 1)
    spread = s.spread * (1.0 - 1.0 / g) if positions > 1 else s.spread
    var = (s.v * (1.0 - 1.0 / (g * positions)) + spread) if positions > 1 else s.v + s.spread
    state, gain = _normalised(s, s.v, spread, var + eps, weight, bias)
    return state, [(x, gain)]


def _group_norm(op: Op):
    x = op.args[0]
    s = op.state(x)
    groups = int(op.args[1] if len(op.args) > 1 else op.kwargs["num_groups"])
    weight = op.args[2] if len(op.args) > 2 else op.kwargs.get("weight")
    bias = op.args[3] if len(op.args) > 3 else op.kwargs.get("bias")
    eps = op.args[4] if len(op.args) > 4 else op.kwargs.get("eps", 1e-5)
    positions = int(np.prod(x.shape[2:])) if x.dim() > 2 else 1
    return _grouped(s, x, x.shape[1] // groups, positions, weight, bias, eps)


def _rms_norm(op: Op):
    x = op.args[0]
    weight = op.args[2] if len(op.args) > 2 else op.kwargs.get("weight")
    eps = op.args[3] if len(op.args) > 3 else op.kwargs.get("eps")
    return _rms(op.state(x), x, weight, eps)


def _rms(s, x, weight, eps):
    """RMSNorm: x / sqrt(mean x^2 + eps) * gamma: q -> q / (q + eps), no centring (nu scales
    with it); the gradient gains gamma^2 / (q + eps)."""
    eps = 1e-6 if eps is None else float(eps)  # torch's default, the dtype's eps: negligible
    g2, gm, _, _ = _affine_stats(weight, None)
    scale = s.q + eps
    return (State(g2 * s.q / scale, g2 * s.v / scale, nu=gm * s.nu / math.sqrt(scale),
                  weights=s.weights, last_weight=s.last_weight), [(x, g2 / scale)])


def _norm_module(module, s: State, x) -> Tuple[State, list]:
    """A hand-written norm module (LlamaRMSNorm, ConvNextLayerNorm, ...), by class name: its
    ``weight``, ``bias`` and eps (``eps``, ``variance_epsilon``) as held. RMSNorms (and T5's
    bias-free LayerNorm, an RMSNorm) scale; the others normalise over the channels."""
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6))
    weight = weight if isinstance(weight, Tensor) else None
    bias = bias if isinstance(bias, Tensor) else None
    names = " ".join(c.__name__.lower() for c in type(module).__mro__)
    if "rmsnorm" in names or ("t5layernorm" in names and bias is None):
        return _rms(s, x, weight, eps)
    return _grouped(s, x, 1 << 30, 1, weight, bias, float(eps))


# --- elementwise and linear maps -----------------------------------------------------------------

def _activation(op: Op):
    """An elementwise function. Its input is Gaussian unless it is itself an elementwise
    function of a Gaussian (relu(relu(x)): an activation after an activation); then the
    composed chain is evaluated on that Gaussian.

    Backwards, a gradient arriving from the output is independent of the activations, so
    this call gains I = E f'(y)^2 over its own input y; the calls before it in the chain
    then see a gradient already masked by it, and the chain's product must be the composed
    E (f_n o ... o f_1)'(z)^2: the previous call's gain is revised by that ratio (relu after
    relu: 1/2 here, 1 there, where the gradient-independence product would halve twice)."""
    x = op.args[0]
    s = op.state(x)
    link = (op.func, op.args, op.kwargs)
    relu = op.func in _RELUS and (len(op.args) < 2 or isinstance(op.args[1], bool))
    links: Tuple[Any, ...] = ()
    before, prev = 1.0, None
    base = s
    if s.chain is not None:
        base, links, before, prev = s.chain
    links = links + (link,)
    if all(f in _RELUS for f, _, _ in links) and relu:  # relu o relu = relu
        q, v, nu, total = _relu(base)
        own = total  # a ReLU of a ReLU passes where the first did: P(z > 0) either way
    else:
        q, v, nu, total = _elementwise(list(links), base)
        own = total if len(links) == 1 else _elementwise(list(links[-1:]), s)[3]
    if prev is not None and own > 0.0 and before > 0.0:
        op.ctx.revise(prev, total / (before * own))
    # The node this call's output will get (the propagator numbers them in order).
    return (State(q, v, nu, weights=s.weights, last_weight=s.last_weight,
                  chain=(base, links, total, len(op.ctx.nodes))), [(x, own)])


def _affine(s: State, a, b, x, like=None, axis=1):
    """y = a x + b with constants a, b broadcast over the tensor ``like`` (the output):
    per-channel gains, biases, position tables. With means over the broadcast entries,
    q' = E a^2 q + 2 nu E[ab] + E b^2, nu' = nu E a + E b, and v' = E a^2 v plus the part of
    b that varies within a channel (a position embedding: its variance over the positions
    of each channel, E b^2 - E_c (mean of b over channel c)^2). The gradient gains E a^2."""
    a = a.detach().double() if isinstance(a, Tensor) else torch.tensor(float(a), dtype=torch.float64)
    b = b.detach().double() if isinstance(b, Tensor) else torch.tensor(float(b), dtype=torch.float64)
    within = 0.0
    if like is not None and (a.dim() or b.dim()) and like.dim():
        shape = like.shape
        a, b = a.expand(shape) if a.dim() else a, b.expand(shape) if b.dim() else b
        if b.dim():
            ax = axis % len(shape)
            per_channel = b.mean(dim=[d for d in range(len(shape)) if d != ax])
            within = max(float(b.pow(2).mean()) - float(per_channel.pow(2).mean()), 0.0)
    a2, am = float(a.pow(2).mean()), float(a.mean())
    b2, bm = float(b.pow(2).mean()), float(b.mean())
    ab = float((a * b).mean())
    q = a2 * s.q + 2.0 * s.nu * ab + b2
    v = a2 * s.v + within
    return (State(q, v, nu=s.nu * am + bm, weights=s.weights, last_weight=s.last_weight),
            [(x, a2)])


def _binary(op: Op):
    """x + b, x - b, b - x, x * a, x / a with a constant (a number, a parameter, a buffer):
    :func:`_affine`. Two activations: a sum of independent operands adds second moments,
    variances and common means (cross term 2 nu nu'); a product of independent operands
    (a gate: squeeze-excite, GLU) multiplies second moments and distant-point covariances.
    Operands whose latest weight layer is the same are dependent (x * sigmoid(x), x * x):
    no map."""
    kind = _KINDS[op.func]
    a = op.args[0]
    b = op.args[1] if len(op.args) > 1 else op.kwargs.get("other")
    alpha = float(op.kwargs.get("alpha", 1))
    # The additive kinds as k_a a + k_b b (rsub: b - alpha a).
    k_a, k_b = {"add": (1.0, alpha), "sub": (1.0, -alpha), "rsub": (-alpha, 1.0)}.get(
        kind, (1.0, 1.0))
    additive = kind in ("add", "sub", "rsub")
    sa = op.state(a) if isinstance(a, Tensor) else None
    sb = op.state(b) if isinstance(b, Tensor) else None
    if sa is not None and sb is not None:
        if additive and (sa.q == 0.0 or sb.q == 0.0):  # an exactly zero operand: the other
            keep = sa if sb.q == 0.0 else sb           # (its chain of activations too)
            return (replace(keep, weights=max(sa.weights, sb.weights)),
                    [(a, k_a * k_a), (b, k_b * k_b)])
        if additive:
            q = k_a * k_a * sa.q + k_b * k_b * sb.q + 2.0 * k_a * k_b * sa.nu * sb.nu
            v = k_a * k_a * sa.v + k_b * k_b * sb.v
            return (State(q, v, k_a * sa.nu + k_b * sb.nu, weights=max(sa.weights, sb.weights),
                          last_weight=max(sa.last_weight, sb.last_weight)),
                    [(a, k_a * k_a), (b, k_b * k_b)])
        if kind == "mul" and sa.last_weight != sb.last_weight:
            q = sa.q * sb.q
            c = sa.c * sb.c
            return (State(q, q - c, sa.nu * sb.nu, weights=max(sa.weights, sb.weights),
                          last_weight=max(sa.last_weight, sb.last_weight)),
                    [(a, sb.q), (b, sa.q)])
        return None
    if sa is None and sb is None:
        return None
    x, s, const, k_x, k_c = (a, sa, b, k_a, k_b) if sa is not None else (b, sb, a, k_b, k_a)
    assert s is not None
    const = 0.0 if const is None else const
    if additive:
        return _affine(s, k_x, _times(const, k_c), x, op.out, op.ctx.channel_axis)
    if kind == "mul":
        return _affine(s, const, 0.0, x, op.out, op.ctx.channel_axis)
    if kind == "div" and sa is not None:
        c = const.detach().double() if isinstance(const, Tensor) else torch.tensor(float(const))
        return _affine(s, 1.0 / c, 0.0, x, op.out, op.ctx.channel_axis)
    return None


def _times(const, k):
    return const if k == 1.0 else const * k


def _passthrough(op: Op):
    """Reshapes, views, copies, slices: the state does not change (channels stay
    exchangeable; a slice of positions or channels has the statistics of the whole)."""
    x = _first_dynamic(op)
    return (op.state(x), [(x, 1.0)]) if x is not None else None


def _first_dynamic(op):
    for a in (*op.args, *op.kwargs.values()):
        if isinstance(a, Tensor) and op.state(a) is not None:
            return a
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, Tensor) and op.state(b) is not None:
                    return b
    return None


def _dropout(op: Op):
    """Dropout: the identity when off (measure's "init" mode); on, q / (1 - p) and the
    same squared mean, the gradient gains 1 / (1 - p)."""
    x = op.args[0]
    s = op.state(x)
    p = op.args[1] if len(op.args) > 1 else op.kwargs.get("p", 0.5)
    training = op.args[2] if len(op.args) > 2 else op.kwargs.get("training", True)
    if not training or p == 0.0:
        return s, [(x, 1.0)]
    k = 1.0 / (1.0 - p)
    return State(s.q * k, s.v + s.q * (k - 1.0), s.nu, s.weights, s.last_weight), [(x, k)]


def _pad(op: Op):
    """F.pad: zeros (mode "constant", value 0) make a fraction f of the entries real:
    q' = f q, c' = f^2 c, nu' = f nu; the gradient keeps f of its squared norm. Other
    modes copy entries (reflect, replicate, circular): the state is unchanged."""
    x = op.args[0]
    s = op.state(x)
    mode = op.args[2] if len(op.args) > 2 else op.kwargs.get("mode", "constant")
    value = op.args[3] if len(op.args) > 3 else op.kwargs.get("value", None)
    if mode != "constant":
        return s, [(x, 1.0)]
    if value not in (None, 0, 0.0):
        return None
    f = x.numel() / op.out.numel()
    c = f * f * s.c
    pad = op.args[1] if len(op.args) > 1 else op.kwargs["pad"]
    pairs = tuple((int(pad[i]), int(pad[i + 1])) for i in range(0, len(pad), 2))[::-1]
    base = s.pad_of[0] if s.pad_of else s
    if s.pad_of:  # pads compose: add per axis
        old = s.pad_of[1]
        n = max(len(old), len(pairs))
        old = ((0, 0),) * (n - len(old)) + old
        new = ((0, 0),) * (n - len(pairs)) + pairs
        pairs = tuple((a + c_, b + d) for (a, b), (c_, d) in zip(old, new))
    f_total = f * (s.pad_of[2] if s.pad_of else 1.0)
    return (State(f * s.q, f * s.q - c, f * s.nu, s.weights, s.last_weight,
                  pad_of=(base, pairs, f_total)), [(x, f)])


def _adaptive_window(x, out):
    """Positions per window of an adaptive pooling from ``x`` to ``out`` (N, C, ...)."""
    return max(int(np.prod(x.shape[2:])) // max(int(np.prod(out.shape[2:])), 1), 1)


def _avg_pool(op: Op):
    """Average pooling over windows of K positions (window overlap ignored): the noise
    averages, v' = v / K, the channel means stay (c' = c, nu' = nu); each input receives
    1 / K of an output's gradient: gain 1 / K."""
    x = op.args[0]
    s = op.state(x)
    if op.func in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
        k = op.args[1] if len(op.args) > 1 else op.kwargs["kernel_size"]
        kk = max(int(np.prod(k)) if isinstance(k, (list, tuple)) else int(k) ** (x.dim() - 2), 1)
    else:
        kk = _adaptive_window(x, op.out)
    v = s.v / kk
    return State(s.c + v, v, s.nu, s.weights, s.last_weight), [(x, 1.0 / kk)]


def _mean(op: Op):
    """x.mean(dims) over positions (a hand-written global average pool): as average pooling
    over the reduced entries; over the channel axis it is no pooling (unsupported)."""
    x = op.args[0]
    dims = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim")
    if dims is None or x.dim() < 3:
        return None
    dims = [d % x.dim() for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if 0 in dims or op.ctx.channel_axis % x.dim() in dims:
        return None
    s = op.state(x)
    k = int(np.prod([x.shape[d] for d in dims]))
    v = s.v / k
    return State(s.c + v, v, s.nu, s.weights, s.last_weight), [(x, 1.0 / k)]


def _max_pool(op: Op):
    """Max pooling over windows of K positions of f(z), f an elementwise increasing chain
    (ReLU, ...) of a Gaussian z (the identity when the input is Gaussian): the max commutes
    with f, and the max of K points of one channel is mu + sqrt(v) M_K, M_K the maximum of K
    standard normals (density K phi(m) Phi(m)^(K - 1)), by quadrature. Each output's
    gradient goes to one input: gain 1."""
    x = op.args[0]
    s = op.state(x)
    k = op.args[1] if len(op.args) > 1 else op.kwargs.get("kernel_size")
    if op.func in (F.adaptive_max_pool1d, F.adaptive_max_pool2d):
        kk = _adaptive_window(x, op.out)
    else:
        kk = int(np.prod(k)) if isinstance(k, (list, tuple)) else int(k or 1) ** (x.dim() - 2)
    base: State = s.chain[0] if s.chain else s
    chain: Tuple[Any, ...] = s.chain[1] if s.chain else ()
    from scipy.stats import norm
    # The maximum's density on the trapezoid grid; E over it of f(mu + sqrt(v) m).
    dens = kk * norm.pdf(_TZ) * norm.cdf(_TZ) ** (kk - 1) * (_TZ[1] - _TZ[0])
    q, v, nu = _grid_moments(chain, base, _TZ, dens)
    return State(q, v, nu, s.weights, s.last_weight), [(x, 1.0)]


def _cat(op: Op):
    """Concatenation: a mixture of the parts by their share of entries; each part keeps its
    share of the gradient's squared norm."""
    parts = op.args[0] if op.args else op.kwargs["tensors"]
    # A constant part (ViT's class token, expanded over the batch) enters with the
    # statistics of its values.
    states = [(t, op.state(t) or _measured_state(t, op.ctx.channel_axis)) for t in parts]
    total = sum(t.numel() for t in parts)
    w = [t.numel() / total for t in parts]
    q = sum(wi * s.q for wi, (_, s) in zip(w, states))
    nu = sum(wi * s.nu for wi, (_, s) in zip(w, states))
    c = sum(wi * s.c for wi, (_, s) in zip(w, states))
    return (State(q, q - c, nu, max(s.weights for _, s in states),
                  max(s.last_weight for _, s in states)),
            [(t, wi) for wi, (t, _) in zip(w, states)])


def _matmul(op: Op):
    """``x @ W`` (and ``torch.addmm(b, x, W)``, GPT-2's Conv1D) with a constant 2-D ``W``:
    a weight layer with weight W^T. A product of two activations (attention) has no map."""
    if op.func is torch.addmm:
        bias, x, w = op.args[0], op.args[1], op.args[2]
        if op.kwargs.get("beta", 1) != 1 or op.kwargs.get("alpha", 1) != 1:
            return None
    else:
        x, w = op.args[0], op.args[1] if len(op.args) > 1 else op.kwargs.get("other")
        bias = None
    if (not isinstance(w, Tensor) or w.dim() != 2 or op.state(x) is None
            or op.state(w) is not None):
        return None
    return _weight_map(Op(F.linear, (x, w.t(), bias), {}, op.out, op.module, op.ctx))


def _embedding(op: Op):
    """An embedding table read with integer ids: the output is a fixed function of the ids
    and the table, so its state is the table rows it reads, measured on the ids given."""
    out = op.out
    return _measured_state(out, op.ctx.channel_axis), []


def _measured_state(t, channel_axis):
    t = t.detach().double()
    axis = channel_axis % t.dim() if t.dim() >= 2 else 0
    v = t.movedim(axis, -1).reshape(-1, t.shape[axis]) if t.dim() >= 2 else t.reshape(-1, 1)
    n = v.shape[0]
    mean = v.mean(dim=0)
    q = float(v.pow(2).mean())
    var = float((v - mean).pow(2).mean()) * (n / (n - 1) if n > 1 else 1.0)
    return State(q, min(var, q), float(mean.mean()))


_RELUS = (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)
_ACTIVATIONS = (*_RELUS, F.relu6, F.hardtanh, F.hardtanh_, F.gelu, F.silu, F.mish,
                F.hardswish, F.hardsigmoid, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_, F.selu,
                F.celu, F.softplus, F.tanh, torch.tanh, torch.Tensor.tanh, torch.sigmoid,
                torch.Tensor.sigmoid, F.sigmoid, F.logsigmoid, torch.erf, torch.Tensor.erf,
                torch.sin, torch.Tensor.sin, torch.cos, torch.Tensor.cos, torch.exp,
                torch.Tensor.exp, torch.abs, torch.Tensor.abs, torch.square, torch.Tensor.square,
                torch.Tensor.pow, torch.pow, torch.Tensor.__pow__, torch.Tensor.sigmoid_,
                torch.Tensor.tanh_, torch.nn.functional.silu)
_SMOOTH = frozenset((F.gelu, F.silu, F.mish, F.softplus, F.tanh,
                     torch.tanh, torch.Tensor.tanh, torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid,
                     F.logsigmoid, torch.erf, torch.Tensor.erf, torch.sin, torch.Tensor.sin,
                     torch.cos, torch.Tensor.cos, torch.exp, torch.Tensor.exp, torch.square,
                     torch.Tensor.square, torch.Tensor.sigmoid_, torch.Tensor.tanh_))
_PASS = (torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.flatten,
         torch.Tensor.flatten, torch.Tensor.permute, torch.permute, torch.Tensor.transpose,
         torch.transpose, torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.float,
         torch.Tensor.double, torch.Tensor.half, torch.Tensor.type_as, torch.Tensor.clone,
         torch.clone, torch.Tensor.detach, torch.detach, torch.Tensor.squeeze, torch.squeeze,
         torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.expand, torch.Tensor.expand_as,
         torch.Tensor.__getitem__, torch.Tensor.chunk, torch.chunk, torch.Tensor.split,
         torch.split, torch.Tensor.unbind, torch.unbind, torch.Tensor.narrow, torch.narrow,
         torch.Tensor.movedim, torch.movedim, torch.Tensor.view_as, torch.Tensor.reshape_as,
         torch.Tensor.repeat, torch.Tensor.requires_grad_, torch.Tensor.cpu,
         torch.Tensor.cuda, torch.Tensor.roll, torch.roll, torch.Tensor.flip, torch.flip)
_KINDS = {
    **dict.fromkeys((torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__,
                     torch.Tensor.__iadd__, torch.Tensor.__radd__), "add"),
    **dict.fromkeys((torch.sub, torch.subtract, torch.Tensor.sub, torch.Tensor.sub_,
                     torch.Tensor.__sub__, torch.Tensor.__isub__), "sub"),
    **dict.fromkeys((torch.Tensor.__rsub__, torch.rsub), "rsub"),
    **dict.fromkeys((torch.mul, torch.multiply, torch.Tensor.mul, torch.Tensor.mul_,
                     torch.Tensor.__mul__, torch.Tensor.__imul__, torch.Tensor.__rmul__), "mul"),
    **dict.fromkeys((torch.div, torch.Tensor.div, torch.Tensor.div_, torch.Tensor.__truediv__,
                     torch.Tensor.__itruediv__, torch.true_divide), "div"),
}
_BINARY = tuple(_KINDS)
#: Calls that make a state from constants: embedding tables read with integer ids.
_SOURCES = frozenset((F.embedding,))
#: Calls whose output does not depend on the values of their tensor arguments.
_CONSTANT = (torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
             torch.randn_like, torch.rand_like, torch.Tensor.new_zeros, torch.Tensor.new_ones,
             torch.Tensor.new_empty, torch.Tensor.new_full, torch.Tensor.new_tensor)

#: The map of an elementwise function (quadrature; ReLU in closed form), for register_map.
elementwise_map = _activation

register_map([F.linear, F.conv1d, F.conv2d, F.conv3d], _weight_map)
register_map([F.batch_norm, torch.batch_norm], _batch_norm, "F.batch_norm")
register_map([F.layer_norm], _layer_norm)
register_map([F.group_norm], _group_norm)
if hasattr(F, "rms_norm"):
    register_map([F.rms_norm], _rms_norm)
register_map(list(_ACTIVATIONS), _activation)
register_map(list(_BINARY), _binary)
register_map(list(_PASS), _passthrough)
register_map([F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout], _dropout)
register_map([F.pad], _pad)
register_map([F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
              F.adaptive_avg_pool2d, F.adaptive_avg_pool3d], _avg_pool)
register_map([F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
              F.adaptive_max_pool2d], _max_pool)
register_map([torch.mean, torch.Tensor.mean], _mean)
register_map([torch.cat, torch.concat, torch.concatenate], _cat)
register_map([F.embedding], _embedding)
register_map([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
              torch.Tensor.mm, torch.addmm], _matmul, "matmul (x @ weight)")


# --- the propagator ------------------------------------------------------------------------------

class _Propagator(TorchFunctionMode):
    """Carries a State beside every tensor of the forward pass, and the tape of backward
    gains. Entered outside measure's merge search, so that a call's output has its state
    when the search records the merge."""

    def __init__(self, model, weights, padding, unsupported, channel_axis):
        super().__init__()
        self.weights, self.padding, self.unsupported = weights, padding, unsupported
        self.channel_axis = channel_axis
        self.node_of = _WeakIds()
        self.nodes: List[State] = []
        self.tape: List[Tuple[int, Tuple[Tuple[int, float], ...]]] = []
        self.counter = 0
        self.stack: List[str] = []
        self.names = {id(m): n for n, m in model.named_modules()}
        self.suspended = 0
        self.module_inputs: List[Any] = []
        self.measured: List[str] = []
        self.ops_since: List[str] = []

    # states by tensor
    def state(self, t) -> Optional[State]:
        node = self.node_of.get(t)
        return None if node is None else self.nodes[node]

    def node(self, t) -> Optional[int]:
        return self.node_of.get(t)

    def set(self, t, state: State, gains=()):
        node = len(self.nodes)
        self.nodes.append(state)
        ins = []
        for x, g in gains:
            n = self.node_of.get(x)
            if n is not None and g > 0.0:
                ins.append((n, _LOG2(g)))
        self.tape.append((node, tuple(ins)))
        self.node_of.set(t, node)
        return node

    def revise(self, node, factor):
        """Multiply the backward gain of the call that made node ``node`` by ``factor``."""
        if factor <= 0.0:
            return
        out, ins = self.tape[node]
        self.tape[node] = (out, tuple((n, lg + _LOG2(factor)) for n, lg in ins))

    def where(self):
        return repr(self.stack[-1]) if self.stack else "the model's own forward"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.suspended:
            return out
        outs = out if isinstance(out, (list, tuple)) else (out,)
        outs = [o for o in outs if isinstance(o, Tensor) and o.is_floating_point()]
        if not outs or func in _CONSTANT:
            return out
        dynamic = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)
                   and self.node_of.get(a) is not None]
        for a in (*args, *kwargs.values()):
            if isinstance(a, (list, tuple)):
                dynamic += [b for b in a if isinstance(b, Tensor) and self.node_of.get(b) is not None]
        if not dynamic and func not in _SOURCES:
            return out
        self.counter += 1
        states = [self.state(a) for a in dynamic]
        bad = next((s for s in states if s is not None and s.unknown), None)
        name = _op_name(func)
        if bad is not None:
            result = (_unknown(bad.unknown), [])
        else:
            entry = _MAPS.get(func)
            result = None
            if entry is not None:
                result = entry[1](Op(func, args, kwargs, out, self.where(), self))
            if result is None:
                reason = f"{name} in module {self.where()}"
                if self.unsupported == "measure":
                    # Backwards, the forward energy ratio, shared by the inputs: a linear
                    # map with isotropic weights passes the same ratio both ways.
                    self.measured.append(reason)
                    measured = _measured_state(outs[0], self.channel_axis)
                    e_in = sum(st.q * t.numel() for st, t in zip(states, dynamic))
                    ratio = measured.q * outs[0].numel() / e_in if e_in > 0 else 0.0
                    result = (measured, [(t, ratio) for t in dynamic])
                else:
                    result = (_unknown(reason), [])
            else:
                self.ops_since.append(entry[0] if entry else name)
        state, gains = result
        for o in outs:
            self.set(o, state, gains)
        return out

    def enter(self, module, args):
        name = self.names.get(id(module))
        if name is None:
            return
        self.stack.append(name)
        if self.suspended:
            self.suspended += 1
            return
        if _is_norm_module(module):
            x = next((a for a in args if isinstance(a, Tensor)), None)
            s = None if x is None else self.state(x)
            if s is not None:
                self.module_inputs.append((module, x, s))
                self.suspended = 1

    def leave(self, module, args, out):
        name = self.names.get(id(module))
        if name is None:
            return
        if self.stack:
            self.stack.pop()
        if self.suspended:
            self.suspended -= 1
            if self.suspended == 0:
                mod, x, s = self.module_inputs.pop()
                outs = out if isinstance(out, (list, tuple)) else (out,)
                y = next((o for o in outs if isinstance(o, Tensor)), None)
                if y is not None:
                    self.counter += 1
                    if s.unknown:
                        self.set(y, _unknown(s.unknown))
                    else:
                        state, gains = _norm_module(mod, s, x)
                        self.ops_since.append(type(mod).__name__)
                        self.set(y, state, gains)

    # backward
    def backward(self, start: int, seeds: Dict[int, float], stop: int = -1) -> Dict[int, float]:
        """log2 squared gradient norms: ``seeds`` {node: log2 G}, propagated through the tape
        from the newest entry at or before ``start`` back to (not past) node ``stop``."""
        g = dict(seeds)
        for node, ins in reversed(self.tape[:start + 1]):
            if node < stop:
                break
            gn = g.get(node)
            if gn is None or gn == -math.inf:
                continue
            for n, lg in ins:
                val = gn + lg
                old = g.get(n)
                g[n] = val if old is None else _logaddexp2(old, val)
        return g


_TORCH_NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase,
                *((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ()))


def _is_norm_module(module):
    """A hand-written LayerNorm or RMSNorm (by class name, as measure names norms), mapped as
    one call; torch's own norm modules (and subclasses, e.g. GroupNorm + activation) go
    through their functional calls."""
    return _module_norm(module) == 2 and not isinstance(module, _TORCH_NORMS)


class _TheoryRecorder(_Recorder):
    """measure's recorder, reading the theory's states instead of the tensors' values."""

    def __init__(self, channel_axis, prop):
        super().__init__(channel_axis)
        self.prop = prop
        self.skip_nodes: List[Optional[int]] = []
        self.branch_nodes: List[Optional[int]] = []
        self.input_nodes: List[Optional[int]] = []
        self.maps: List[str] = []
        self._pending: Tuple[Optional[int], Optional[int], Optional[int]] = (None, None, None)
        self.last_node: Optional[int] = None

    def stats(self, t):
        s = self.prop.state(t)
        if s is None:
            raise UnsupportedOpError(
                f"a merge operand of shape {tuple(t.shape)} has no theory state: it was made "
                f"by calls outside the traced forward pass")
        if s.unknown:
            raise UnsupportedOpError(
                f"no map for {s.unknown}, on which a residual merge depends. Supported: "
                f"{', '.join(supported_ops())}; hand-written norm modules by class name. Pass "
                f"unsupported='measure' to take that op's measured output instead, or add a "
                f"map with propagation.structural.register_map")
        return s.stats()

    def operands(self, skip, branch, x):
        self._pending = (self.prop.node(skip), self.prop.node(branch),
                         None if x is None else self.prop.node(x))
        return super().operands(skip, branch, x)

    def record(self, skip, skip_stats, branch_stats, total, projection, name="",
               input_stats=None, norms=("", ""), full_sum=True):
        k = super().record(skip, skip_stats, branch_stats, total, projection, name,
                           input_stats, norms, True)
        return k

    def _hook(self, t, k):
        skip, branch, x = self._pending
        self.skip_nodes.append(skip)
        self.branch_nodes.append(branch)
        self.input_nodes.append(x)
        self.maps.append(", ".join(self.prop.ops_since))
        self.prop.ops_since.clear()

    def finish_forward(self):
        # The last sum's node at the end of the pass, as measure hooks it: after an
        # in-place op on it (relu_ of a post-activation block), that op's output.
        t = self._last_sum
        self.last_node = None if t is None else self.prop.node(t)
        self._last_sum = None


def predict_model(model, inputs, *, channel_axis: int = 1, mode: str = "init",
                  weights: str = "held", padding: str = "exact",
                  unsupported: str = "raise") -> Profile:
    """The infinite-width theory of ``model`` at its current weights, for ``inputs``.

    Called as ``propagation.predict(model, inputs, ...)``; returns the same
    :class:`Profile` as ``measure(model, inputs)``, merge for merge (the same search finds
    and names the merges), with ``source="theory"``.

    Args:
        model: an ``nn.Module``.
        inputs: a batch as ``measure`` takes it (a tensor, a dict of keyword inputs, a list
            or a callable: the first batch is used). The theory starts from the batch's
            second moment and channel means; the forward pass runs on two examples.
        channel_axis, mode: as ``measure``.
        weights: "held" (default): the statistics of the weights the model holds, this very
            network. "law": their expectation over an i.i.d. draw with each layer's realised
            scale (rows that sum to zero, as weight standardisation makes them, stay so):
            the theory of the initialisation law rather than of this draw, which
            ``predict(depth, scheme)`` is.
        padding: "exact" (default): zero padding per class of output positions (which taps
            fall inside the map). "mean": the scheme theory's mean padding factor (the
            per-position second moment, the unpadded correlation).
        unsupported: "raise" (default): an op without a map that a merge depends on raises
            :class:`UnsupportedOpError` naming it and its module. "measure": its output's
            measured statistics stand in for the theory (``meta["measured_ops"]`` lists
            them; the forward pass then runs on the whole batch).

    ``meta["maps"]`` lists, per merge, the maps applied since the previous merge.
    """
    import numbers
    models = _check_models(model)
    if len(models) != 1:
        raise TypeError("predict(model, inputs) takes one model, got a list; predict each")
    model = models[0]
    _checks.choice("mode", mode, _MODES)
    _checks.choice("weights", weights, ("held", "law"))
    _checks.choice("padding", padding, ("exact", "mean"))
    _checks.choice("unsupported", unsupported, ("raise", "measure"))
    if not isinstance(channel_axis, numbers.Integral) or isinstance(channel_axis, bool):
        raise TypeError(f"channel_axis must be an int, got {channel_axis!r}")
    x = _input_source(inputs)(0)
    x, kwargs = _check_input(x, model, channel_axis)
    batch = x.shape[0]
    sub = batch if unsupported == "measure" else 2
    x_run = x[:sub]
    if kwargs is not None:
        key, rest = kwargs
        rest = {k: (v[:sub] if isinstance(v, Tensor) and v.dim() and v.shape[0] == batch else v)
                for k, v in rest.items()}
        kwargs = (key, rest)
    prop = _Propagator(model, weights, padding, unsupported, channel_axis)
    recorder = _TheoryRecorder(channel_axis, prop)
    from torch.nn.modules import module as _module
    with _untouched(model) as modules:
        _set_mode(modules, mode)
        if x_run.is_floating_point():
            # The input's state from the whole batch (the squared channel mean of n samples
            # carries variance / n: removed, as comparison.input_state does).
            s0 = _measured_state(x, channel_axis)
            prop.set(x_run, s0)
        else:
            s0 = None
        handles = [_module.register_module_forward_pre_hook(prop.enter),
                   _module.register_module_forward_hook(prop.leave, always_call=True)]
        try:
            with torch.no_grad(), prop:
                with _search(model, recorder, None):
                    _call(model, x_run, kwargs)
        except UnsupportedOpError:
            raise
        except Exception as err:
            err.add_note(f"(raised by the model's forward pass inside propagation.predict, on "
                         f"{sub} examples of inputs of shape {tuple(x.shape)}; the model was "
                         f"restored)")
            raise
        finally:
            for h in handles:
                h.remove()
    if not recorder.merges:
        raise NoMergesError(_NO_MERGES)
    return _profile(recorder, prop, mode, s0, x, model, weights, padding)


def _profile(recorder, prop, mode, s0, x, model, weights, padding):
    D = recorder.merges
    # Gradients: squared norms relative to the last merge's sum (log2 G = 0 there).
    last = recorder.last_node
    g = prop.backward(len(prop.tape) - 1, {last: 0.0}) if last is not None else {}
    numel_info = np.frombuffer(recorder._info, dtype=np.int64).reshape(D, 4)
    numel_last = float(numel_info[-1, 2])
    for k, node in enumerate(recorder.skip_nodes):
        lg = g.get(node, -math.inf) if node is not None else math.nan
        recorder.grads[k] = [2.0 ** lg / float(numel_info[k, 1]) if lg == lg else math.nan,
                             math.nan, math.nan]
    recorder.grads[-1] = [1.0 / numel_last, math.nan, math.nan]
    share = np.zeros(D)
    for k in range(D):
        b, s, xin = recorder.branch_nodes[k], recorder.skip_nodes[k], recorder.input_nodes[k]
        if b is None or xin is None:
            continue
        gb = prop.backward(b, {b: 0.0}, stop=xin).get(xin, -math.inf)
        if bool(numel_info[k, 0]):  # projection: the skip path's own gain to the input
            gs = prop.backward(s, {s: 0.0}, stop=xin).get(xin, -math.inf)
        else:
            gs = 0.0
        tot = _logaddexp2(gb, gs)
        share[k] = 0.0 if tot == -math.inf else 2.0 ** (gb - tot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = recorder.profile(mode=mode, readout="output", dtype="float64",
                                input_shape=tuple(x.shape), backward=True, seed=0)
    layers = []
    for k in range(D):
        b, xin = recorder.branch_nodes[k], recorder.input_nodes[k]
        if b is not None and xin is not None:
            layers.append(prop.nodes[b].weights - prop.nodes[xin].weights)
    n_layers = int(np.median(layers)) if layers else 2
    branch_norm = prof.branch_norm or ()
    post_norm = prof.post_norm or ()
    normalised = Normalised(
        branch=bool(branch_norm) and all(bool(b) and b != "activation" for b in branch_norm),
        pre=False,
        post=len(post_norm) > 1 and all(("layer" in p or "batch" in p) for p in post_norm[1:]))
    meta = {**prof.meta, "maps": recorder.maps, "weights": weights, "padding": padding,
            "model": type(model).__name__}
    if prop.measured:
        meta["measured_ops"] = list(prop.measured)
    return replace(prof, source="theory", scheme=f"model:{type(model).__name__}",
                   params={"layers": max(n_layers, 1)}, samples_per_channel=None,
                   block_input_samples_per_channel=None, grad_branch_share=share,
                   normalised=normalised,
                   input_second_moment=None if s0 is None else s0.q,
                   input_squared_mean=None if s0 is None else s0.c, meta=meta)
