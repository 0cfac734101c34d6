"""Mean-field maps of single layers, the parts that schemes are assembled from.

A layer maps the two-point state of its input to that of its output and knows its backward
gain. The state is ``(lq, e)``: ``lq = log2`` of the second moment (so that 2^5000 is just
5000) and ``e = 1 - rho``, the fraction of the second moment that is channel variance
(kernels.py explains why e rather than rho).

Backward gains are log2 ratios of squared gradient norms, input over output, under the
gradient-independence assumption: a ReLU halves the norm, a weight layer with variance
``gain2 / fan_in`` multiplies it by ``gain2`` (its fan-out over fan-in cancels the change of
tensor size), a normalisation divides it by the variance it divides its input by.

Every method works on floats (``math`` backend, inside the sequential recursion) and on
NumPy arrays over blocks (``numpy`` backend, for whole profiles at once); ``l`` is the block
index (an int or an index array) for layers whose parameters differ from block to block.
"""
import math
from dataclasses import dataclass

import numpy as np

from . import kernels


def _log2(x):
    with np.errstate(divide="ignore"):
        return float(np.log2(x))


class _Numpy:
    @staticmethod
    def log2(x):
        with np.errstate(divide="ignore"):  # log2(0) = -inf is meant (no variance)
            return np.log2(np.maximum(x, 0.0))
    omk = staticmethod(kernels.one_minus_kappa)

    @staticmethod
    def const(value, like):
        # A 0-d value broadcasts against the per-block arrays: a chain after a resetting
        # layer (BatchNorm) is then evaluated once, not once per block.
        return np.float64(value)


class _Math:
    omk = staticmethod(kernels.one_minus_kappa_scalar)

    @staticmethod
    def log2(x):
        return math.log2(x) if x > 0.0 else -math.inf

    @staticmethod
    def const(value, like):
        return value


NUMPY, MATH = _Numpy(), _Math()


class Layer:
    """Base class. ``resets`` is True when the output state does not depend on the input."""

    resets = False
    #: True for weight layers (convolutions, dense layers): the ones zero padding shrinks.
    is_weight_layer = False
    #: True when the output's scale does not follow the input's (BatchNorm, LayerNorm): a
    #: finite network's random drift of the input scale stops here.
    normalises = False
    #: The kind of normalisation, as ``measure`` names it from the calls a network makes:
    #: "batch" (statistics over the batch and positions, per channel) or "layer" (over the
    #: channels of each example: LayerNorm, RMSNorm, GroupNorm); "" for no normalisation.
    norm = ""

    def forward(self, lq, e, l, backend):
        raise NotImplementedError

    def backward(self, lq, e, l, backend):
        raise NotImplementedError

    def backward_lv(self, lq, lv, l, backend):
        """Optional: :meth:`backward` at the state given as log2 q and log2 v (v = e q, the
        channel variance), which predict's vectorised path has at hand; ``None`` (the
        default) makes it form e and call :meth:`backward`."""
        return None

    def scalar_code(self):
        """Optional: the scalar forward map as Python source, for predict's sequential loop.

        Returns (lines, constants): lines use ``{q}`` and ``{e}`` for the state and ``{k}``
        as a suffix for this layer's constants, ``omk`` for the kernel and ``l`` for the
        block; ``None`` (the default) makes the loop call :meth:`forward` instead. Tests
        check every layer's code against its forward.
        """
        return None

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class ReLUWeight(Layer):
    """ReLU then a weight layer with weights N(0, gain2 / fan_in): He init is gain2 = 2."""

    is_weight_layer = True

    def __init__(self, gain2=2.0):
        self.gain2 = float(gain2)
        self._lg = _log2(self.gain2 / 2.0)

    def forward(self, lq, e, l, backend):
        return lq + self._lg, backend.omk(e)

    def scalar_code(self):
        return ["{q} = {q} + g{k}", "{e} = omk({e})"], {"g{k}": self._lg}

    def backward(self, lq, e, l, backend):
        return backend.const(self._lg, lq)


class ReLU(Layer):
    """A ReLU alone: E[relu(z)^2] = q/2 and the correlation goes through kappa."""

    def forward(self, lq, e, l, backend):
        return lq - 1.0, backend.omk(e)

    def scalar_code(self):
        return ["{q} = {q} - 1.0", "{e} = omk({e})"], {}

    def backward(self, lq, e, l, backend):
        return backend.const(-1.0, lq)


class Linear(Layer):
    """A weight layer N(0, gain2 / fan_in) with no ReLU before it: correlations unchanged."""

    is_weight_layer = True

    def __init__(self, gain2=1.0):
        self.gain2 = float(gain2)
        self._lg = _log2(self.gain2)

    def forward(self, lq, e, l, backend):
        return lq + self._lg, e

    def scalar_code(self):
        return ["{q} = {q} + g{k}"], {"g{k}": self._lg}

    def backward(self, lq, e, l, backend):
        return backend.const(self._lg, lq)


class ReLUScaledWS(Layer):
    """ReLU then a Scaled-Weight-Standardised layer (Brock et al. 2021).

    Each output channel's weights have zero mean over the fan-in, which removes the part of
    the ReLU output that is common to all inputs: with u = relu(z),
    E[y_a y_b] = gain2 (E[u_a u_b] - E[u]^2), so rho' = (kappa(rho) - 1/pi) / (1 - 1/pi) and
    q' = q gain2 (1 - 1/pi) / 2, which is q at the standard gain 2 / (1 - 1/pi).
    """

    is_weight_layer = True

    def __init__(self, gain2=kernels.WS_RELU_GAIN2):
        self.gain2 = float(gain2)
        self._c = 1.0 - 1.0 / kernels.PI
        self._lq = _log2(self.gain2 * self._c / 2.0)
        self._lb = _log2(self.gain2 / 2.0)

    def forward(self, lq, e, l, backend):
        return lq + self._lq, backend.omk(e) / self._c

    def scalar_code(self):
        return ["{q} = {q} + g{k}", "{e} = omk({e}) / c{k}"], {"g{k}": self._lq, "c{k}": self._c}

    def backward(self, lq, e, l, backend):
        return backend.const(self._lb, lq)


class BatchNorm(Layer):
    """BatchNorm in train mode, gamma = 1, beta = 0: every channel to mean 0, variance 1."""

    resets = True
    normalises = True
    norm = "batch"

    def forward(self, lq, e, l, backend):
        return backend.const(0.0, lq), backend.const(1.0, e)

    def scalar_code(self):
        return ["{q} = 0.0", "{e} = 1.0"], {}

    def backward(self, lq, e, l, backend):
        return -(lq + backend.log2(e))

    def backward_lv(self, lq, lv, l, backend):
        return -lv  # the variance it divides by


class LayerNorm(Layer):
    """LayerNorm over channels, per example: q to 1, correlations between inputs kept."""

    normalises = True
    norm = "layer"

    def forward(self, lq, e, l, backend):
        return backend.const(0.0, lq), e

    def scalar_code(self):
        return ["{q} = 0.0"], {}

    def backward(self, lq, e, l, backend):
        return -lq


class Gain(Layer):
    """A scalar multiplier ``a`` (SkipInit's alpha, the 1/sqrt(2) rescale, a zero layer)."""

    def __init__(self, a):
        self.a = float(a)
        self._lg = _log2(self.a * self.a)
        # A zero gain outputs exactly zero whatever its input: predict can then treat the
        # branch as independent of the skip path and vectorise over blocks.
        self.resets = self.a == 0.0

    def forward(self, lq, e, l, backend):
        return lq + self._lg, e

    def scalar_code(self):
        return ["{q} = {q} + g{k}"], {"g{k}": self._lg}

    def backward(self, lq, e, l, backend):
        return backend.const(self._lg, lq)


class BlockGain(Layer):
    """A multiplier that differs per block, given as its square ``a2[l]`` (NF's 1/beta_l)."""

    def __init__(self, a2, name="a2"):
        self.name = name
        with np.errstate(divide="ignore"):
            self._la2 = np.log2(np.asarray(a2, dtype=np.float64))
        self._la2_list = self._la2.tolist()

    def forward(self, lq, e, l, backend):
        return lq + (self._la2_list[l] if backend is MATH else self._la2[l]), e

    def scalar_code(self):
        return ["{q} = {q} + a{k}[l]"], {"a{k}": self._la2_list}

    def backward(self, lq, e, l, backend):
        return self._la2_list[l] if backend is MATH else self._la2[l]

    def __repr__(self):
        return f"BlockGain({self.name})"


class Zero(Gain):
    """A zero-initialised weight layer (Fixup's last layer): the output is exactly 0."""

    is_weight_layer = True

    def __init__(self):
        super().__init__(0.0)

    def __repr__(self):
        return "Zero()"


@dataclass(frozen=True)
class Block:
    """One residual block: x_next = post(skip + branch).

    ``pre`` is applied to the block input and shared by the branch and, in blocks with a
    projection shortcut, by the projection (ResNet-V2 normalises and activates once, then
    feeds both). In other blocks the skip operand is ``skip_gain * x``.
    """

    branch: tuple
    pre: tuple = ()
    projection: tuple = (ReLUWeight(2.0),)
    skip_gain: float = 1.0
    post: tuple = ()

    def chain_resets(self, layers):
        return any(layer.resets for layer in layers)


def run(layers, lq, e, l, backend):
    """Apply ``layers`` in order; return the output state."""
    for layer in layers:
        lq, e = layer.forward(lq, e, l, backend)
    return lq, e


def backward_gain(layers, lq, e, l, backend):
    """Sum of log2 backward gains of ``layers``, each evaluated at its own input state."""
    total = 0.0
    for layer in layers:
        total = total + layer.backward(lq, e, l, backend)
        lq, e = layer.forward(lq, e, l, backend)
    return total
