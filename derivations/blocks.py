"""Symbolic layer maps and the residual blocks of every scheme, in (q, m) = (second moment,
average channel squared mean), the variables of THEORY.md.

This is an independent transcription of the mean-field maps (THEORY.md, corrected where the
derivations in kernels.py say so), not an import of propagation/layers.py: the closed forms
solved from it are an oracle for ``propagation.predict`` only because they share no code.

A map sends the state of its input to that of its output and has a backward gain: the ratio
of the per-entry squared gradient at its input to that at its output, under the
gradient-independence assumption (a ReLU keeps half the gradient, a weight layer of variance
gain2/fan_in multiplies by gain2, a normalisation divides by the variance it divides by).
"""
import functools
from dataclasses import dataclass
from typing import Callable

import sympy as sp

from . import kernels

l = sp.Symbol("l", integer=True, nonnegative=True)       # block index
alpha = sp.Symbol("alpha", positive=True)                 # branch multiplier (skipinit, nf)
gain2 = sp.Symbol("gain2", positive=True)                 # conv gain of relu_bn_conv


@dataclass(frozen=True)
class Map:
    """One layer: ``forward(q, m, l) -> (q, m)`` and ``backward(q, m, l) -> gain``."""

    name: str
    forward: Callable
    backward: Callable


def relu_weight(g2=2):
    """ReLU then weights N(0, g2/fan_in): (q, m) -> (g2/2 q, g2/2 q kappa(m/q)); He is g2 = 2."""
    return Map(f"ReLU+W({g2})", lambda q, m, l: (g2 * q / 2, g2 * q / 2 * kernels.kappa(m / q)),
               lambda q, m, l: sp.S(g2) / 2)


def relu():
    """A ReLU alone: half the second moment, correlation through kappa."""
    return Map("ReLU", lambda q, m, l: (q / 2, q / 2 * kernels.kappa(m / q)),
               lambda q, m, l: sp.Rational(1, 2))


def linear(g2):
    """A weight layer N(0, g2/fan_in) with no ReLU before it: correlations are kept."""
    return Map(f"W({g2})", lambda q, m, l: (g2 * q, g2 * m), lambda q, m, l: g2)


def relu_scaled_ws():
    """ReLU then Scaled WS at the standard gain (kernels.scaled_ws_map); backward gain2/2."""
    q_out, m_out = kernels.scaled_ws_map()
    g2 = kernels.ws_relu_gain2()

    def forward(q, m, l):
        sub = {kernels.gain2: g2, kernels.q: q, kernels.rho: m / q}
        return q_out.subs(sub), m_out.subs(sub)

    return Map("ReLU+ScaledWS", forward, lambda q, m, l: g2 / 2)


def batchnorm():
    """Train-mode BatchNorm: (1, 0); the gradient is divided by the channel variance q - m."""
    return Map("BN", lambda q, m, l: (sp.S(1), sp.S(0)), lambda q, m, l: 1 / (q - m))


def layernorm():
    """LayerNorm over channels: (1, m/q); the gradient is divided by q."""
    return Map("LN", lambda q, m, l: (sp.S(1), m / q), lambda q, m, l: 1 / q)


def gain(a):
    """A scalar multiplier a: (a^2 q, a^2 m), backward a^2."""
    return Map(f"x{a}", lambda q, m, l: (a ** 2 * q, a ** 2 * m), lambda q, m, l: a ** 2)


def block_gain(a2, name):
    """A multiplier whose square ``a2(l)`` depends on the block (NF's 1/beta_l)."""
    return Map(name, lambda q, m, l: (a2(l) * q, a2(l) * m), lambda q, m, l: a2(l))


def zero():
    """A zero-initialised weight layer: (0, 0), no gradient passes."""
    return Map("0", lambda q, m, l: (sp.S(0), sp.S(0)), lambda q, m, l: sp.S(0))


@dataclass(frozen=True)
class Block:
    """x_{l+1} = post(x_l + branch(pre(x_l))); ``pre`` is shared by the branch only (no stages)."""

    branch: tuple
    pre: tuple = ()
    post: tuple = ()


def run(maps, q, m, l):
    for f in maps:
        q, m = f.forward(q, m, l)
    return q, m


def backward_gain(maps, q, m, l):
    """Product of the backward gains of ``maps``, each at its own input state."""
    total = sp.S(1)
    for f in maps:
        total *= f.backward(q, m, l)
        q, m = f.forward(q, m, l)
    return total


@functools.lru_cache(maxsize=None)
def nf_expected_variance():
    """beta_l^2 of NF-ResNets: the analytic q_l of a unit-variance input.

    NF chooses beta_l so that x_l / beta_l has unit second moment; the branch then adds
    alpha^2 (Scaled WS keeps q), so beta_{l+1}^2 = beta_l^2 + alpha^2 with beta_0^2 = 1.
    """
    b = sp.Function("b")
    sol = sp.rsolve(b(l + 1) - b(l) - alpha ** 2, b(l), {b(0): 1})
    return sp.expand(sol)


def _he(layers, norm=None):
    maps = [relu_weight(2)]
    for _ in range(layers - 1):
        maps += ([norm()] if norm else []) + [relu_weight(2)]
    return tuple(maps)


def _nf(layers, unit):
    beta2 = nf_expected_variance()
    return Block(pre=(block_gain(lambda k: 1 / beta2.subs(l, k), "1/beta^2"),),
                 branch=tuple(unit() for _ in range(layers)) + (gain(alpha),))


#: scheme name -> (parameter symbols by name, build(layers) -> Block). Mirrors the schemes
#: of propagation/schemes.py that have closed forms (all registered ones without stages).
SCHEMES = {
    "batchnorm": ({}, lambda L: Block(pre=(batchnorm(),), branch=_he(L, batchnorm))),
    "none": ({}, lambda L: Block(branch=_he(L))),
    "sqrt_half": ({}, lambda L: Block(branch=_he(L), post=(gain(1 / sp.sqrt(2)),))),
    "skipinit": ({"alpha": alpha}, lambda L: Block(branch=_he(L) + (gain(alpha),))),
    "fixup": ({}, lambda L: Block(branch=_he(L)[:-1] + (zero(),))),
    "nf": ({"alpha": alpha}, lambda L: _nf(L, relu_scaled_ws)),
    "nf_he": ({"alpha": alpha}, lambda L: _nf(L, lambda: relu_weight(2))),
    "layernorm": ({}, lambda L: Block(pre=(layernorm(),), branch=_he(L, layernorm))),
    "postnorm": ({}, lambda L: Block(branch=_he(L), post=(layernorm(),))),
    "relu_bn_conv": ({"gain2": gain2},
                     lambda L: Block(branch=(relu(), batchnorm(), linear(gain2)) * L)),
}
