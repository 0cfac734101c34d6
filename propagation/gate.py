"""The CI gate's cases: theory against measurement for every registered scheme.

Every scheme with a reference network, at each of its registered ``gate`` settings, is
measured on the residual MLP (depths 1, 10, 100, 1000) and the convolutional ResNet-V2
(depths 1, 10, 100) over 3 seeds and checked with :func:`propagation.check`; every
transformer scheme (``propagation.sequence``) on its reference transformer (1, 10 and 100
layers, 32 tokens, width 256). The test suite
(tests/test_gate.py) asserts every case; figures/agreement.py tabulates them. Both read this
module, so the table shows exactly what CI checks.

``KNOWN`` lists where the infinite-width theory is known to part from these finite networks
by more than the finite-width band allows; those quantities are left out of a case's verdict,
and the suite checks that they still depart, so a better theory shows up there.
``STRUCTURAL_KNOWN`` does the same for the structural theory alone (``predict(model, x)``),
which the suite also checks every case against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from . import nets
from .pipeline import ALL_QUANTITIES, Check, check

__all__ = ["ALL_QUANTITIES", "Case", "KNOWN", "SEEDS", "STRUCTURAL_KNOWN", "cases", "known_cases",
           "settings"]
from .schemes import registered

SEEDS = 3
MLP_DEPTHS = (1, 10, 100, 1000)
CONV_DEPTHS = (1, 10, 100)
#: Transformer layers (two merges each) of the transformer schemes' reference networks:
#: width 256, 4 heads, batches of 8 random sequences of 32 tokens, logit_std 0.3.
TRANSFORMER_DEPTHS = (1, 10, 100)
TRANSFORMER_SHAPE = (8, 32, 256)

DEEP_NARROW = ("1000 unnormalised blocks at width 128: the predicted spread of ln q reaches 7 "
               "nats (past block 10 it is above the 0.5 nats where the finite-width theory, "
               "an expansion in that spread, holds; it marks those blocks invalid); the "
               "squared mean's median is then not the log-normal's, and the 7/n band does "
               "not cover it")
STRUCTURAL_WS = ("the structural theory (predict(model, x)) reads zero padding per class of "
                 "border positions, each conv on its own: it gives a Scaled-WS conv's border "
                 "leak of the ReLU's channel mean, but not the channel mean that leak leaves on "
                 "the skip path for the standardised convs of later blocks; over 100 blocks the "
                 "branch second moment ends 20% above it. The scheme theory, position by "
                 "position (propagation.positions), carries both and agrees")
DEEP_SKIPINIT = ("1000 SkipInit blocks (alpha 0.1) at width 128: the finite-width theory's "
                 "predicted spread passes 0.5 nats in log from block 511 (the channel means' "
                 "common part, which every branch reads as a shift, drifts with the depth), "
                 "where the theory, an expansion in that spread, marks itself invalid and "
                 "compare falls back to the infinite-width mean with the 7/n band; the "
                 "measured second moment sits 0.46 nats below that mean at block 513, the "
                 "channel variance 0.45 above it at block 896, where the finite-width median "
                 "(indicative there) predicts -0.10 and +0.51")
#: Where only the structural theory departs: (architecture, case id, depth) -> (quantities, why).
STRUCTURAL_KNOWN: Dict[Tuple[str, str, int], Tuple[Tuple[str, ...], str]] = {
    ("conv", "nf", 100): (("second_moment", "variance"), STRUCTURAL_WS),
}
#: (architecture, case id, depth) -> (quantities, why).
KNOWN: Dict[Tuple[str, str, int], Tuple[Tuple[str, ...], str]] = {
    ("mlp", "none", 1000): (("squared_mean",), DEEP_NARROW),
    ("mlp", "skipinit-alpha0.1", 1000): (("second_moment", "variance"), DEEP_SKIPINIT),
}


def case_id(scheme: str, params: Mapping[str, object]) -> str:
    """"skipinit-alpha0.1": the scheme and its gate parameters."""
    return scheme + "".join(f"-{k}{v}" for k, v in params.items())


@dataclass(frozen=True)
class Case:
    """One network of the gate: an architecture, a scheme at one setting, a depth."""

    arch: str                 # "mlp" (residual MLP) or "conv" (basic-block ResNet-V2)
    scheme: str
    params: Mapping[str, object] = field(default_factory=dict)
    depth: int = 10

    @property
    def id(self) -> str:
        return case_id(self.scheme, self.params)

    @property
    def width(self) -> int:
        if self.arch == "transformer":
            return TRANSFORMER_SHAPE[-1]
        if self.arch == "conv":
            return 32
        return 256 if self.depth < 1000 else 128

    @property
    def shape(self) -> Tuple[int, ...]:
        if self.arch == "transformer":
            return TRANSFORMER_SHAPE
        return (8, 3, 32, 32) if self.arch == "conv" else (self.width, self.width)

    @property
    def dtype(self) -> torch.dtype:
        # 2^1000 does not fit in float32: the unnormalised MLP is measured in float64.
        return torch.float64 if self.scheme == "none" and self.depth >= 1000 else torch.float32

    @property
    def known(self) -> Tuple[Tuple[str, ...], str]:
        """The quantities this case is known to miss, and why (empty when none)."""
        return KNOWN.get((self.arch, self.id, self.depth), ((), ""))

    @property
    def structural_known(self) -> Tuple[Tuple[str, ...], str]:
        """The quantities the structural theory (only) is known to miss here, and why."""
        return STRUCTURAL_KNOWN.get((self.arch, self.id, self.depth), ((), ""))

    def builder(self) -> Callable[[], torch.nn.Module]:
        if self.arch == "transformer":
            return lambda: nets.transformer(self.depth, width=self.width, scheme=self.scheme,
                                            **self.params)
        if self.arch == "mlp":
            return lambda: nets.residual_mlp(self.depth, width=self.width, scheme=self.scheme,
                                             **self.params)
        stages = (self.depth,) if self.depth < 2 else (self.depth - self.depth // 2,
                                                       self.depth // 2)
        return lambda: nets.resnet_v2(stages=stages, width=self.width, scheme=self.scheme,
                                      block="basic", num_classes=None, **self.params)

    def run(self, quantities: Optional[Tuple[str, ...]] = None, seeds: int = SEEDS) -> Check:
        """The check of this case, on the quantities outside ``known`` by default."""
        if quantities is None:
            quantities = tuple(q for q in ALL_QUANTITIES if q not in self.known[0])
        return check(self.builder(), self.shape, seeds=seeds, dtype=self.dtype,
                     quantities=quantities, progress=False, diagnosis=False,
                     channel_axis=-1 if self.arch == "transformer" else 1)

    def __str__(self) -> str:
        return f"{self.arch}-{self.id}-{self.depth}"


def settings() -> List[Tuple[str, Mapping[str, object]]]:
    """(scheme, parameters) of every gate setting of every scheme with a network."""
    return [(s.name, dict(p)) for s in registered() if s.network is not None for p in s.gate]


def transformer_settings() -> List[Tuple[str, Mapping[str, object]]]:
    """(scheme, parameters) of every gate setting of every transformer scheme."""
    from .sequence import SEQ_SCHEMES
    return [(s.name, dict(p)) for s in SEQ_SCHEMES.values() for p in s.gate]


def cases(arch: Optional[str] = None) -> List[Case]:
    """Every case: MLP, conv, then transformer, in registration order within each depth."""
    out = []
    for a, depths in (("mlp", MLP_DEPTHS), ("conv", CONV_DEPTHS)):
        if arch in (None, a):
            out += [Case(a, scheme, params, depth) for scheme, params in settings()
                    for depth in depths]
    if arch in (None, "transformer"):
        out += [Case("transformer", scheme, params, depth)
                for scheme, params in transformer_settings() for depth in TRANSFORMER_DEPTHS]
    return out


def known_cases() -> List[Case]:
    """The cases with known departures (one per KNOWN entry)."""
    by_key = {(c.arch, c.id, c.depth): c for c in cases()}
    return [by_key[k] for k in sorted(KNOWN) if k in by_key]
