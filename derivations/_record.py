"""The one record every derivation returns: a name, a sympy expression and what it means."""
from dataclasses import dataclass

import sympy as sp


@dataclass(frozen=True)
class Derivation:
    """A derived result.

    Attributes:
        name: a short label in the notation of THEORY.md (``"q_l"``, ``"E[relu(z)]"``).
        expr: the sympy expression (or Eq / tuple of expressions) that was derived.
        meaning: one line saying what it is and how it was obtained.
    """

    name: str
    expr: object
    meaning: str

    def __str__(self):
        return f"{self.name} = {sp.sstr(self.expr)}\n    {self.meaning}"
