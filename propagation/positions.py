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


def _relu_kernel(rho):
    return (np.sqrt(np.maximum(1.0 - rho * rho, 0.0)) + (math.pi - np.arccos(rho)) * rho) / (2 * math.pi)


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
        d = np.sqrt(np.diag(flat))
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = np.clip(np.nan_to_num(flat / np.outer(d, d)), -1.0, 1.0)
        return PositionKernel((np.outer(d, d) * _relu_kernel(rho)).reshape(self.K.shape), self.shape)

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
