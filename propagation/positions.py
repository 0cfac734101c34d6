"""Exact zero padding: convolutional networks at infinite width, position by position.

``predict`` treats zero padding as one mean factor per convolution (the mean fraction of
in-bounds taps, ``nets.padding_factors``). That is exact only where every position loses
the same share. It is not exact on small maps: border positions lose more than the mean,
and the loss compounds position by position. A residual ReLU conv net on 8x8 maps then
drifts 30% below the exact kernel in second moment by block 6.

Here the state is the full kernel over (example, position) pairs,
``K[n, p, n', p'] = E[x_np . x_n'p'] / channels``, the infinite-width limit of a CNN (the
NNGP of Novak et al. 2019), and each layer is its exact map:

* a convolution with weights of variance ``gain2 / fan_in`` (fan_in = channels x taps):
  ``K' = gain2 / taps * sum_t S_t K S_t^T``, where S_t (positions out x positions in) reads
  tap t in PyTorch's index convention (``o * stride - padding + t * dilation``). Zero
  padding makes rows of S_t zero where the tap falls outside; circular padding wraps;
* a ReLU: the arc-cosine kernel entry by entry, on the two positions' own variances;
* average pooling: ``A K A^T``; a residual sum adds kernels (independent branch weights).

The profile's quantities follow: the second moment ``q`` is the mean diagonal, and the squared
channel mean over the batch and positions ``m`` is the mean of every entry (the batch as
given, its examples' own terms included). tests/test_positions.py checks both against
neural-tangents' kernels (tests/data/nngp_padding.json) at SAME, CIRCULAR and pooled
8x8 nets: within 1e-9 relative, against 30% for the mean factor.
"""
from __future__ import annotations

import functools
import math
from typing import List, Sequence, Tuple

import numpy as np

from . import _checks

MODES = ("zeros", "circular")


def _axis_taps(size, kernel, stride, padding, dilation, mode):
    """Per tap offset k: (out_size, in_size) 0/1 matrix of which input each output reads."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise ValueError(f"the convolution leaves no output: size {size}, kernel {kernel}, "
                         f"stride {stride}, padding {padding}, dilation {dilation}")
    mats = []
    for k in range(kernel):
        m = np.zeros((out, size))
        for o in range(out):
            i = o * stride - padding + k * dilation
            if mode == "circular":
                m[o, i % size] = 1.0
            elif 0 <= i < size:
                m[o, i] = 1.0
        mats.append(m)
    return out, mats


def conv_taps(shape: Tuple[int, int], kernel=3, stride=1, padding=1, dilation=1,
              mode="zeros") -> Tuple[Tuple[int, int], List[np.ndarray]]:
    """The taps of a 2-d convolution on maps of ``shape`` (H, W) as PyTorch's Conv2d reads
    them: (output shape, [S_t]), S_t of shape (H_out W_out, H W), one per tap (row-major)."""
    _checks.choice("mode", mode, MODES)
    h, w = (_checks.positive_int(f"shape[{i}]", s) for i, s in enumerate(shape))
    kernel, stride, padding, dilation = (
        (v, v) if isinstance(v, int) else tuple(v) for v in (kernel, stride, padding, dilation))
    oh, rows = _axis_taps(h, kernel[0], stride[0], padding[0], dilation[0], mode)
    ow, cols = _axis_taps(w, kernel[1], stride[1], padding[1], dilation[1], mode)
    return (oh, ow), [np.kron(r, c) for r in rows for c in cols]


def _outer_sd(K):
    """(sd_a sd_b, its inverse or 0 where a variance is 0), from K's diagonal."""
    d = np.sqrt(np.maximum(np.diag(K), 0.0))
    dd = np.outer(d, d)
    return dd, np.divide(1.0, dd, out=np.zeros_like(dd), where=dd > 0.0)


def _relu_map(K, dd, inv):
    """dd J(K / dd), J the arc-cosine kernel, in place on one temporary (the kernels are
    large: every pass over them counts)."""
    rho = np.multiply(K, inv)
    np.clip(rho, -1.0, 1.0, out=rho)
    out = np.arccos(rho)
    np.subtract(math.pi, out, out=out)
    out *= rho
    np.multiply(rho, rho, out=rho)
    np.subtract(1.0, rho, out=rho)
    np.maximum(rho, 0.0, out=rho)
    np.sqrt(rho, out=rho)
    out += rho
    out *= dd
    out *= 1.0 / (2.0 * math.pi)
    return out


class PositionKernel:
    """The kernel of one tensor over (example, position) pairs, shape (N, P, N, P), for maps
    of ``shape`` (H, W), P = H W."""

    def __init__(self, K: np.ndarray, shape: Tuple[int, int]):
        self.K = np.asarray(K, dtype=np.float64)
        self.shape: Tuple[int, int] = (int(shape[0]), int(shape[1]))
        n, p = self.K.shape[:2]
        if self.K.shape != (n, p, n, p) or p != self.shape[0] * self.shape[1]:
            raise ValueError(f"K must have shape (N, H W, N, H W) for maps of shape {shape}, "
                             f"got {self.K.shape}")

    @classmethod
    def from_inputs(cls, x) -> "PositionKernel":
        """The kernel of a batch ``x`` of shape (N, C, H, W) (NumPy or torch, channels
        second as PyTorch): K = x . x / C per pair of (example, position)."""
        x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
        if x.ndim != 4:
            raise ValueError(f"x must have shape (N, C, H, W), got {x.shape}")
        n, c, h, w = x.shape
        v = x.transpose(0, 2, 3, 1).reshape(n, h * w, c)
        return cls(np.einsum("npc,mqc->npmq", v, v) / c, (h, w))

    def conv(self, gain2=1.0, kernel=3, stride=1, padding=1, dilation=1, mode="zeros"):
        """A convolution with weights of variance gain2 / fan_in."""
        out_shape, taps = conv_taps(self.shape, kernel, stride, padding, dilation, mode)
        K = sum(np.einsum("ab,nbmc,dc->namd", S, self.K, S, optimize=True) for S in taps)
        return PositionKernel(float(gain2) / len(taps) * K, out_shape)

    def relu(self):
        n, p = self.K.shape[:2]
        flat = self.K.reshape(n * p, n * p)
        dd, inv = _outer_sd(flat)
        return PositionKernel(_relu_map(flat, dd, inv).reshape(self.K.shape), self.shape)

    def avg_pool(self, kernel=2, stride=None):
        """Average pooling (no padding): the mean of each window, K' = A K A^T."""
        stride = kernel if stride is None else stride
        out_shape, taps = conv_taps(self.shape, kernel, stride, 0, 1, "zeros")
        A = sum(taps) / len(taps)
        return PositionKernel(np.einsum("ab,nbmc,dc->namd", A, self.K, A, optimize=True),
                              out_shape)

    def scale(self, a2):
        return PositionKernel(float(a2) * self.K, self.shape)

    def __add__(self, other: "PositionKernel") -> "PositionKernel":
        if self.shape != other.shape:
            raise ValueError(f"cannot add kernels of maps {self.shape} and {other.shape}")
        return PositionKernel(self.K + other.K, self.shape)

    @property
    def q(self) -> float:
        """Second moment: the mean over examples and positions of K[n, p, n, p]."""
        n, p = self.K.shape[:2]
        return float(np.trace(self.K.reshape(n * p, n * p))) / (n * p)

    @property
    def m(self) -> float:
        """Squared channel mean over the batch and positions: the mean of every entry."""
        return float(self.K.mean())

    @property
    def q_per_position(self) -> np.ndarray:
        """(H, W): the second moment at each position, averaged over examples."""
        n, p = self.K.shape[:2]
        return np.diag(self.K.reshape(n * p, n * p)).reshape(n, p).mean(axis=0).reshape(self.shape)


def residual_relu_net(x, blocks=6, mode="zeros", pool_after: Sequence[int] = (),
                      stem_gain2=1.0, gain2=2.0) -> List[PositionKernel]:
    """The stream's kernel after each block of a pre-activation residual ReLU conv net: a
    linear 3x3 stem, then ``blocks`` blocks x + conv(relu(conv(relu(x)))) (3x3, stride 1,
    padding 1 of ``mode``, He weights), a 2x2 average pool on the stream after the blocks
    numbered in ``pool_after`` (1-based). Returns one :class:`PositionKernel` per block."""
    k = PositionKernel.from_inputs(x).conv(stem_gain2, mode=mode)
    out = []
    for b in range(1, blocks + 1):
        branch = k.relu().conv(gain2, mode=mode).relu().conv(gain2, mode=mode)
        k = k + branch
        if b in pool_after:
            k = k.avg_pool(2)
        out.append(k)
    return out


# --- the population form: what predict uses for convolutional networks ----------------------

def tap_index(shape: Tuple[int, int], kernel=3, stride=1, padding=1, dilation=1,
              mode="zeros") -> Tuple[Tuple[int, int], List[np.ndarray]]:
    """:func:`conv_taps` as index arrays: per tap, the flat input position each output
    position reads, H W (one past the last position) where zero padding reads nothing."""
    _checks.choice("mode", mode, MODES)
    return _tap_index((int(shape[0]), int(shape[1])), _pair(kernel), _pair(stride),
                      _pair(padding), _pair(dilation), mode)


@functools.lru_cache(maxsize=256)
def _tap_index(shape, kernel, stride, padding, dilation, mode):
    axes = []
    for size, k, s, p, d in zip(shape, kernel, stride, padding, dilation):
        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
        if out < 1:
            raise ValueError(f"the convolution leaves no output: size {size}, kernel {k}, "
                             f"stride {s}, padding {p}, dilation {d}")
        i = np.arange(out)[None, :] * s - p + d * np.arange(k)[:, None]  # (k, out)
        axes.append((out, i % size if mode == "circular" else i))
    (oh, ih), (ow, iw) = axes
    h, w = shape
    index = []
    for a in range(kernel[0]):
        for b in range(kernel[1]):
            r, c = ih[a][:, None], iw[b][None, :]
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            index.append(np.where(inside, r * w + c, h * w).ravel())
    return (oh, ow), index


class Population:
    """The kernels of a batch of exchangeable examples, position by position.

    For random inputs drawn i.i.d. the (example, position) kernel of :class:`PositionKernel`
    has, in expectation over the inputs, two (P, P) blocks: ``W`` between positions of one
    example and ``X`` between positions of two different examples, P = H W. ``mu`` (P,) is
    the channel-mean function, the infinite-width mean over channels at each position (zero
    after a weight layer with zero-mean weights, sqrt(W_pp / 2 pi) after a ReLU): Scaled WS
    and the normalisations that centre need it. A batch of ``batch`` examples has the full
    kernel I_N x (W - X) + J_N x X (:meth:`full`); BatchNorm centres over it.

    One approximation sits here, the same as the scheme theory's: a ReLU's cross-example
    entries are mapped with the population's per-position variances, not each example's own.
    Every other map is exact in expectation (tests/test_positions.py checks each against the
    full kernel and the full kernel against neural-tangents).
    """

    def __init__(self, W, X, mu, shape, batch):
        self.W = np.asarray(W, dtype=np.float64)
        self.X = np.asarray(X, dtype=np.float64)
        self.mu = np.asarray(mu, dtype=np.float64)
        self.shape: Tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.batch = int(batch)
        p = self.shape[0] * self.shape[1]
        if self.W.shape != (p, p) or self.X.shape != (p, p) or self.mu.shape != (p,):
            raise ValueError(f"W and X must have shape ({p}, {p}) and mu ({p},) for maps of "
                             f"shape {shape}, got {self.W.shape}, {self.X.shape}, {self.mu.shape}")

    @classmethod
    def iid(cls, shape: Tuple[int, int], batch: int, second_moment=1.0, squared_mean=0.0):
        """Inputs whose entries are i.i.d. across examples, positions and channels given a
        common channel mean: second moment q and squared channel mean m at every position."""
        p = int(shape[0]) * int(shape[1])
        q, m = float(second_moment), float(squared_mean)
        return cls((q - m) * np.eye(p) + m, np.full((p, p), m), np.zeros(p), shape, batch)

    def _new(self, W, X, mu, shape=None):
        return Population(W, X, mu, self.shape if shape is None else shape, self.batch)

    def conv(self, gain2=1.0, kernel=3, stride=1, padding=1, dilation=1, mode="zeros",
             standardised=False):
        """A convolution, weights of variance gain2 / fan_in; ``standardised``: Scaled WS,
        each output channel's weights of zero mean over its fan-in (the channel-mean
        function is removed only where every tap is in bounds). The output's ``mu`` is 0."""
        out_shape, index = tap_index(self.shape, kernel, stride, padding, dilation, mode)
        args = (self.shape, out_shape, kernel, stride, padding, dilation, mode)
        W, X = _tap_sum(self.W, *args), _tap_sum(self.X, *args)
        c = float(gain2) / len(index)
        W *= c
        X *= c
        if standardised:
            mu = np.append(self.mu, 0.0)
            leak = sum(mu[i] for i in index)
            cross = (c / len(index)) * np.outer(leak, leak)
            W -= cross
            X -= cross
        return Population(W, X, np.zeros(W.shape[0]), out_shape, self.batch)

    def conv_backward(self, h, gain2=1.0, kernel=3, stride=1, padding=1, dilation=1,
                      mode="zeros"):
        """The squared gradient norm per input position (summed over channels) of a
        convolution reading this state, given ``h`` per output position: each tap sends its
        output's gradient through independent weights, gain2 / taps each."""
        _, index = tap_index(self.shape, kernel, stride, padding, dilation, mode)
        p = self.W.shape[0]
        out = np.zeros(p + 1)
        for i in index:
            np.add.at(out, i, h)
        return float(gain2) / len(index) * out[:p]

    def relu(self):
        """A ReLU of zero-mean Gaussian pre-activations: the arc-cosine kernel entry by entry."""
        if np.any(self.mu != 0.0):
            raise NotImplementedError("a ReLU of an input with a channel mean (a ReLU after a "
                                      "ReLU or a centred ReLU output) is not in this theory")
        dd, inv = _outer_sd(self.W)
        d = np.sqrt(np.maximum(np.diag(self.W), 0.0))
        return self._new(_relu_map(self.W, dd, inv), _relu_map(self.X, dd, inv),
                         d / math.sqrt(2.0 * math.pi))

    def batchnorm(self):
        """BatchNorm in train mode over the batch and positions: each channel centred over
        the ``batch`` examples and their positions, then divided by its variance there.
        Returns (state, the variance divided by)."""
        n = self.batch
        r = (self.W.sum(axis=1) + (n - 1) * self.X.sum(axis=1)) / (n * self.W.shape[0])
        g = float(r.mean())
        W = self.W - r[:, None] - r[None, :] + g
        X = self.X - r[:, None] - r[None, :] + g
        v = float(np.mean(np.diag(W)))
        return self._new(W / v, X / v, (self.mu - self.mu.mean()) / math.sqrt(v)), v

    def groupnorm(self):
        """GroupNorm(1, C): each example centred over its channels and positions (the
        channel-mean function's mean over positions) and divided by its variance there.
        Returns (state, the variance divided by)."""
        a = float(self.mu.mean())
        v = float(np.mean(np.diag(self.W))) - a * a
        shift = a * (self.mu[:, None] + self.mu[None, :]) - a * a
        return self._new((self.W - shift) / v, (self.X - shift) / v, (self.mu - a) / math.sqrt(v)), v

    def condition(self, second_moment, squared_mean=None):
        """This kernel's shape with the given second moment and squared mean (as a batch of
        ``batch`` measures it): a W + c, a X + c. Every map of the theory is positively
        homogeneous, so the scale a conditions on a measured stem draw; c is a component
        common to every example and position, for inputs with a channel mean. Where the
        squared mean asked for is below what this kernel's own batch share gives, c = 0
        and only the second moment is matched."""
        q0, m0 = self.q, self.m
        q1 = float(second_moment)
        m1 = m0 * q1 / q0 if squared_mean is None else float(squared_mean)
        a, c = q1 / q0, 0.0
        if m1 > a * m0 and q0 > m0:
            a = (q1 - m1) / (q0 - m0)
            c = m1 - a * m0
        return self._new(a * self.W + c, a * self.X + c, math.sqrt(a) * self.mu)

    def scale(self, a2):
        return self._new(float(a2) * self.W, float(a2) * self.X, math.sqrt(float(a2)) * self.mu)

    def zero(self, shape=None):
        p = self.W.shape[0] if shape is None else int(shape[0]) * int(shape[1])
        return self._new(np.zeros((p, p)), np.zeros((p, p)), np.zeros(p), shape)

    def __add__(self, other: "Population") -> "Population":
        """The sum of two tensors whose weights are independent (a residual merge)."""
        if self.shape != other.shape:
            raise ValueError(f"cannot add maps of shape {self.shape} and {other.shape}")
        return self._new(self.W + other.W, self.X + other.X, self.mu + other.mu)

    @property
    def q(self) -> float:
        """Second moment: the mean of W's diagonal."""
        return float(np.mean(np.diag(self.W)))

    @property
    def mean_rho2(self) -> float:
        """The mean squared correlation between two of the batch's samples (example,
        position), pairs of one sample with itself included: how much of a layer's random
        rescaling every sample shares. 1/(N P) + ... for independent samples, 1 for
        collapsed ones; what the finite-width band weighs a layer's spread of q with."""
        n, q = self.batch, self.q
        if q <= 0.0:
            return 0.0
        return (float(np.mean(self.W ** 2)) / n
                + (1.0 - 1.0 / n) * float(np.mean(self.X ** 2))) / (q * q)

    @property
    def m(self) -> float:
        """The squared channel mean a batch of ``batch`` examples measures: the mean of the
        full kernel, W / N + X (1 - 1 / N)."""
        n = self.batch
        return float(self.W.mean()) / n + (1.0 - 1.0 / n) * float(self.X.mean())

    def full(self) -> PositionKernel:
        """The full (example, position) kernel of the batch, for tests."""
        n = self.batch
        K = np.kron(np.eye(n), self.W - self.X) + np.kron(np.ones((n, n)), self.X)
        p = self.W.shape[0]
        return PositionKernel(K.reshape(n, p, n, p), self.shape)


def _pair(v):
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def _tap_sum(K, shape, out_shape, kernel, stride, padding, dilation, mode):
    """sum_t S_t K S_t^T over a convolution's taps (zero or circular padding), as strided
    slices of the padded (H, W, H, W) kernel: the same sum as :func:`conv_taps`'s matrices
    (tests/test_positions.py), without forming them."""
    (h, w), (oh, ow) = shape, out_shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (kernel, stride, padding, dilation))
    pads = ((ph, ph), (pw, pw), (ph, ph), (pw, pw))
    K4 = K.reshape(h, w, h, w)
    Kp = np.pad(K4, pads, mode="wrap") if mode == "circular" else np.pad(K4, pads)
    # The taps are a product of row and column offsets: sum the rows first, then the
    # columns (kh + kw strided sums instead of kh kw).
    rows_sum = np.zeros((oh, Kp.shape[1], oh, Kp.shape[3]))
    for a in range(kh):
        rows = slice(a * dh, a * dh + sh * (oh - 1) + 1, sh)
        rows_sum += Kp[rows, :, rows, :]
    out = np.zeros((oh, ow, oh, ow))
    for b in range(kw):
        cols = slice(b * dw, b * dw + sw * (ow - 1) + 1, sw)
        out += rows_sum[:, cols, :, cols]
    return out.reshape(oh * ow, oh * ow)


# --- a scheme's blocks, position by position ---------------------------------------------------

class GeometryError(ValueError):
    """A network's geometry does not fit a scheme's blocks (convolutions per branch, blocks,
    projections): ``check`` then falls back to the mean padding factor."""


def _conv_args(spec):
    """The tap arguments of a geometry's convolution spec (its channels are not among them)."""
    args = {k: tuple(int(v) for v in spec[k]) for k in ("kernel", "stride", "padding", "dilation")}
    args["mode"] = spec.get("mode", "zeros")
    return args


def _ops(layers, convs, l, where):
    """The position maps of a block's ``layers`` (propagation.layers) at block ``l``: a list of
    (name, forward(state) -> (state, aux), backward(h, state_in, aux) -> h, info). Weight
    layers take the next convolution of ``convs``, in order; a convolution's info holds its
    geometry spec and whether it is Scaled WS."""
    from . import layers as L
    convs = list(convs)
    ops = []

    def take(layer):
        if not convs:
            raise GeometryError(f"the geometry has fewer convolutions in the {where} of block {l} "
                             f"than the scheme has weight layers there")
        spec = convs.pop(0)
        return _conv_args(spec), spec

    for layer in layers:
        if isinstance(layer, (L.ReLUWeight, L.ReLUScaledWS, L.ReLU)):
            ops.append(("relu", lambda s: (s.relu(), None), lambda h, s, aux: 0.5 * h, {}))
        if isinstance(layer, (L.ReLUWeight, L.ReLUScaledWS, L.Linear)):
            (args, spec), g2 = take(layer), layer.gain2
            ws = isinstance(layer, L.ReLUScaledWS)
            ops.append(("conv",
                        lambda s, a=args, g=g2, w=ws: (s.conv(g, standardised=w, **a), None),
                        lambda h, s, aux, a=args, g=g2: s.conv_backward(h, g, **a),
                        {"spec": spec, "standardised": ws, "gain2": g2}))
        elif isinstance(layer, L.Zero):
            args, _ = take(layer)
            ops.append(("zero", lambda s, a=args: (s.zero(tap_index(s.shape, **a)[0]), None),
                        lambda h, s, aux: 0.0 * s.mu, {}))
        elif isinstance(layer, L.Gain):
            a2 = layer.a * layer.a
            ops.append(("scale", lambda s, a=a2: (s.scale(a), None), lambda h, s, aux, a=a2: a * h, {}))
        elif isinstance(layer, L.BlockGain):
            a2 = float(np.exp2(layer._la2[l]))
            ops.append(("scale", lambda s, a=a2: (s.scale(a), None), lambda h, s, aux, a=a2: a * h, {}))
        elif isinstance(layer, L.BatchNorm):
            ops.append(("batchnorm", lambda s: s.batchnorm(), lambda h, s, v: h / v, {}))
        elif isinstance(layer, L.LayerNorm):
            # The convolutional networks' LayerNorm is GroupNorm(1, C) (propagation.nets).
            ops.append(("groupnorm", lambda s: s.groupnorm(), lambda h, s, v: h / v, {}))
        elif not isinstance(layer, (L.ReLUWeight, L.ReLUScaledWS, L.ReLU, L.Linear)):
            raise NotImplementedError(f"{type(layer).__name__} has no position map")
    if convs:
        raise GeometryError(f"the geometry has {len(convs)} more convolutions in the {where} of "
                         f"block {l} than the scheme has weight layers there")
    return ops


def _forward(ops, state, walk=None, form=None):
    """Runs ``ops`` on ``state``: (output, tape for _backward, the output's fluctuation form
    where a finite-width ``walk`` (propagation.finite_positions) carries one)."""
    tape = []
    for name, fwd, bwd, info in ops:
        out, aux = fwd(state)
        tape.append((bwd, state, aux))
        if walk is not None:
            form = walk.op(name, info, fwd, state, out, form)
        state = out
    return state, tape, form


def _backward(tape, h):
    for bwd, state, aux in reversed(tape):
        h = bwd(h, state, aux)
    return h


def predict_positions(block, plan, geometry, input_second_moment=1.0, input_squared_mean=0.0,
                      progress=False, width=None):
    """A scheme's profile on a convolutional network, every map position by position.

    ``block`` and ``plan`` are the scheme's (``propagation.schemes``); ``geometry`` is the
    network's (:func:`propagation.nets.conv_geometry`, or for any network
    :func:`propagation.tracing.traced_conv_geometry`): its input shape, stem convolutions
    (and ReLUs, BatchNorms: ``{"op": "relu"}``) and each block's branch and projection
    convolutions. The network's input is i.i.d.
    across examples, positions and channels; the stem's output, block 0's input, is then
    conditioned on the given second moment and squared mean (:meth:`Population.condition`),
    as the scheme theory starts from a measured block input.

    Returns a dict of arrays: "skip" (D + 1, 4) and "branch" (D, 4) hold (second moment,
    squared mean, variance) as a batch of the input's examples measures them, and the mean
    squared correlation between the batch's samples (:attr:`Population.mean_rho2`), "input" (4,)
    the same of block 0's input; "grad" (D + 1,) the squared gradient norm relative to the
    last merge's sum; "share" (D,) the part of each block input's gradient that came
    through the branch. With ``width``, also "spread": the finite-width spread of every
    skip and branch statistic (:mod:`propagation.finite_positions`), each convolution with
    the output channels its geometry spec records, or ``width`` where it records none.

    Raises GeometryError where the network does not fit the theory: a map it does not have
    (a ReLU reading an input with a channel mean, a stem op other than conv, ReLU and
    BatchNorm).
    """
    try:
        return _predict_positions(block, plan, geometry, input_second_moment,
                                  input_squared_mean, progress, width)
    except NotImplementedError as err:
        raise GeometryError(str(err)) from None


def _predict_positions(block, plan, geometry, input_second_moment=1.0, input_squared_mean=0.0,
                       progress=False, width=None):
    """:func:`predict_positions`, raising NotImplementedError where a map is missing."""
    n, c_in, h, w = (int(v) for v in geometry["input_shape"])
    state = Population.iid((h, w), n)
    walk = form = None
    if width is not None:
        from .finite_positions import PositionSpread, _Form, report
        # The input's c_in i.i.d. channels: its realised kernel's excess is 1 / c_in.
        walk, form = PositionSpread(width), _Form(n=c_in, nu=1.0 / max(c_in, 1))
    for spec in geometry.get("stem", ()):
        op = spec.get("op", "conv")
        info: dict = {}
        if op == "relu":
            out = state.relu()
        elif op == "batchnorm":
            out = state.batchnorm()[0]
        elif op == "conv":
            gain2, ws = spec.get("gain2", 1.0), spec.get("standardised", False)
            out = state.conv(gain2, standardised=ws, **_conv_args(spec))
            info = {"spec": spec, "gain2": gain2, "standardised": ws}
        else:
            raise GeometryError(f"the stem's {op!r} has no position map (conv, relu, batchnorm)")
        if walk is not None:
            form = walk.op(op, info, None, state, out, form)
        state = out
    state = state.condition(input_second_moment, input_squared_mean)
    blocks = geometry["blocks"]
    if len(blocks) != plan.depth:
        raise GeometryError(f"the geometry has {len(blocks)} blocks, the plan {plan.depth}")

    def stats(s):
        q, m = s.q, s.m
        return q, m, q - m, s.mean_rho2

    skip, branch, tapes = [], [], []
    first = stats(state)
    if walk is not None:
        # Block 0's input is conditioned on its measured moments: no fluctuation of its own,
        # but the stem's realised-kernel excess.
        form = _Form(nu=form.nu)
        spread_skip, spread_branch = [], []
    from tqdm import tqdm
    for l in tqdm(range(plan.depth), desc="positions", disable=not progress, leave=False):
        geo = blocks[l]
        x, form_x = state, form
        p, pre_tape, form_p = _forward(_ops(block.pre, (), l, "pre"), x, walk, form_x)
        b, branch_tape, form_b = _forward(_ops(block.branch, geo["branch"], l, "branch"), p,
                                          walk, form_p)
        if plan.projection[l]:
            s, proj_tape, form_s = _forward(_ops(block.projection, geo["projection"], l,
                                                 "projection"), p, walk, form_p)
        else:
            if geo.get("projection"):
                raise GeometryError(f"block {l} has a projection in the geometry but not in the plan")
            s, proj_tape, form_s = x.scale(block.skip_gain ** 2), None, form_x
        y = s + b
        skip.append(stats(s))
        branch.append(stats(b))
        form_y = None
        if walk is not None:
            spread_skip.append(report(s, form_s))
            spread_branch.append(report(b, form_b))
            form_y = walk.merge(s, form_s, b, form_b, y)
        state, post_tape, form = _forward(_ops(block.post, (), l, "post"), y, walk, form_y)
        tapes.append((pre_tape, branch_tape, proj_tape, post_tape))
    skip.append(stats(y))
    if walk is not None:
        spread_skip.append(report(y, form_y))

    # Backwards from a read-out of i.i.d. N(0, 1) weights at the last merge's sum.
    hy = np.ones(y.W.shape[0])
    total = hy.sum()
    grad = np.zeros(plan.depth + 1)
    grad[plan.depth] = 1.0
    share = np.zeros(plan.depth)
    hx = hy
    for l in reversed(range(plan.depth)):
        pre_tape, branch_tape, proj_tape, post_tape = tapes[l]
        if l < plan.depth - 1:  # the last merge's post is not part of the network
            hy = _backward(post_tape, hx)
        from_branch = _backward(pre_tape, _backward(branch_tape, hy))
        if proj_tape is not None:
            hx = from_branch + _backward(pre_tape, _backward(proj_tape, hy))
        else:
            hx = from_branch + block.skip_gain ** 2 * hy
        share[l] = min(from_branch.sum() / hx.sum(), 1.0) if hx.sum() > 0 else 0.0
        identity = proj_tape is None and block.skip_gain == 1.0
        grad[l] = (hx if identity else hy).sum() / total
    out = {"skip": np.array(skip), "branch": np.array(branch), "grad": grad, "share": share,
           "input": first}
    if walk is not None:
        out["spread"] = (spread_skip, spread_branch)
    return out
