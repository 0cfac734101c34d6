"""derivations: the sympy derivations behind ``propagation``'s numbers, and its test oracle.

- :mod:`derivations.kernels`: Gaussian expectations of the ReLU (moments, the arc-cosine
  kernel, 1 - kappa without cancellation and its series, the Scaled-WS gain), each derived by
  integrating against the Gaussian density.
- :mod:`derivations.blocks`: the mean-field layer maps and every scheme's residual block, in
  sympy, written independently of propagation/layers.py.
- :mod:`derivations.closed_forms`: the per-block recursions solved in closed form (skip path,
  branch, downscale, gradient), exposed as NumPy callables for tests/test_derivations.py.

``python -m derivations`` (or ``make derivations``) prints every result. Needs sympy (the
``derive`` extra); ``import propagation`` never imports this package.
"""
from . import blocks, closed_forms, kernels
from ._record import Derivation


def derivations(layers=2):
    """Every derivation, as :class:`Derivation` records: kernels, closed forms, THEORY notes."""
    return kernels.derivations() + closed_forms.derivations(layers) + closed_forms.theory_notes()


__all__ = ["Derivation", "blocks", "closed_forms", "derivations", "kernels"]
