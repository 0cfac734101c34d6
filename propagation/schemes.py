"""The registry of initialisation schemes: each one is data, not a branch in ``predict``.

A scheme is a name, a one-line description, a reference, the parameters it takes (with
defaults and checks) and a ``build`` function that assembles a :class:`~propagation.layers.Block`
from the layer maps in layers.py. ``predict`` and the generic tests only ever go through
this registry, so a scheme added with :func:`register_scheme` is predicted and tested like
the built-in ones.
"""
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Tuple, Union

import numpy as np

from . import _checks
from .layers import (BatchNorm, Block, BlockGain, Gain, LayerNorm, Linear, ReLU,
                     ReLUScaledWS, ReLUWeight, Zero)


@dataclass(frozen=True)
class Param:
    """A scheme parameter: default, a one-line meaning and a check returning the clean value."""

    default: object
    doc: str
    check: Optional[Callable] = None

    def clean(self, name, value):
        return self.check(name, value) if self.check else value


def nonneg_finite(name, value):
    return _checks.finite_float(name, value, low=0.0)


@dataclass(frozen=True)
class Plan:
    """Where the blocks sit: ``projection[l]`` is True when block l has a projection shortcut."""

    depth: int
    projection: np.ndarray
    stages: Optional[tuple] = None
    layers: int = 2


@dataclass(frozen=True)
class Scheme:
    """One registered scheme: its layer maps, its parameters and its reference network.

    Attributes:
        name, description, reference: what ``schemes()`` lists.
        build: ``build(plan, **params) -> Block``, the block's layer maps (the theory).
        params: ``{name: Param}``.
        network: the factory of its reference network in ``propagation.nets`` (a callable
            ``factory(plan, kit, **params) -> (block index, geometry) -> ResidualBlock``, or
            "module:attribute" naming one, imported on first use so that registering stays
            free of torch); None for a theory-only scheme.
        head_norm: the norm in front of the reference network's classifier ("batchnorm",
            "layernorm" or None).
        zero_head: the classifier starts at zero (Fixup).
        gate: the parameter settings at which the CI gate checks theory against the
            reference network.
        family: the family ``diagnose`` reports for a network closest to this scheme (a
            variant names its parent: relu_bn_conv is a "batchnorm" network); "" means the
            scheme's own name.
    """

    name: str
    description: str
    reference: str
    build: Callable  # build(plan, **params) -> Block
    params: Mapping[str, Param] = field(default_factory=dict)
    network: Optional[Union[str, Callable]] = None
    head_norm: Optional[str] = None
    zero_head: bool = False
    gate: Tuple[Mapping[str, object], ...] = ({},)
    family: str = ""

    @property
    def family_name(self) -> str:
        return self.family or self.name

    def network_factory(self) -> Callable:
        """The reference network's block factory (imported on first use)."""
        if self.network is None:
            raise ValueError(f"scheme {self.name!r} has no reference network; schemes with one: "
                             f"{', '.join(with_networks())}")
        if callable(self.network):
            return self.network
        module, attr = self.network.split(":")
        import importlib
        return getattr(importlib.import_module(module), attr)

    def defaults(self):
        return {k: p.default for k, p in self.params.items()}

    def clean_params(self, params):
        """The defaults updated with ``params``, each checked; unknown names are a TypeError."""
        return clean_params(self.name, self.params, params)


def clean_params(scheme, spec, params):
    """``spec``'s defaults ({name: Param}) updated with ``params``, each checked by its
    Param; a name ``spec`` does not have is a TypeError naming the scheme's parameters."""
    clean = {k: p.default for k, p in spec.items()}
    for name, value in params.items():
        if name not in spec:
            allowed = ", ".join(spec) or "none"
            raise TypeError(f"scheme {scheme!r} takes no parameter {name!r} (its "
                            f"parameters: {allowed})" + _checks.close_names(name, spec))
        clean[name] = spec[name].clean(name, value)
    return clean


_REGISTRY: dict = {}


def register_scheme(name: str, description: str, reference: str, build: Callable,
                    params: Optional[Mapping[str, Param]] = None, *,
                    network: Optional[Union[str, Callable]] = None,
                    head_norm: Optional[str] = None, zero_head: bool = False,
                    gate: Tuple[Mapping[str, object], ...] = ({},), family: str = "",
                    replace: bool = False) -> "Scheme":
    """Add a scheme to the registry: one call, and ``predict``, ``propagation.nets``, the
    gate, ``diagnose`` and the training runs pick it up.

    Args:
        name: the name ``predict`` takes.
        description: one line for ``schemes()``.
        reference: where the scheme comes from.
        build: ``build(plan, **params) -> Block``; ``plan.layers`` is the number of weight
            layers in a branch and ``plan.projection`` marks blocks with projection shortcuts.
        params: ``{name: Param(default, doc, check)}``.
        network, head_norm, zero_head, gate: the reference network (see :class:`Scheme`).
        family: the family ``diagnose`` names for this scheme ("" for its own name).
        replace: allow overwriting an existing name.
    Returns: the registered :class:`Scheme`.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"scheme name must be an identifier-like string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"scheme {name!r} is already registered; pass replace=True to overwrite it")
    _checks.choice("head_norm", head_norm, (None, "batchnorm", "layernorm"))
    if network is not None and not (callable(network) or (isinstance(network, str)
                                                          and network.count(":") == 1)):
        raise TypeError(f"network must be a callable or 'module:attribute', got {network!r}")
    params = dict(params or {})
    gate = tuple(dict(g) for g in gate)
    scheme = Scheme(name, description, reference, build, params, network, head_norm,
                    bool(zero_head), gate, str(family))
    for g in gate:
        scheme.clean_params(g)  # a gate setting the scheme cannot take fails here, not in CI
    _REGISTRY[name] = scheme
    return scheme


def unregister_scheme(name):
    """Remove a scheme added with :func:`register_scheme` (tests use this to clean up)."""
    _REGISTRY.pop(name, None)


def get_scheme(name):
    if isinstance(name, Scheme):
        return name
    if not isinstance(name, str):
        raise TypeError(f"scheme must be a str, got {name!r} of type {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown scheme {name!r}; known schemes: {', '.join(sorted(_REGISTRY))}"
                         + _checks.close_names(name, _REGISTRY))
    return _REGISTRY[name]


def with_networks():
    """Names of the registered schemes that have a reference network, sorted."""
    return sorted(name for name, s in _REGISTRY.items() if s.network is not None)


def registered():
    """The registered :class:`Scheme` objects, in registration order."""
    return list(_REGISTRY.values())


def schemes():
    """The registered schemes: ``{name: (description, {param: (default, doc)}, reference)}``."""
    return {s.name: SchemeInfo(s.description, {k: (p.default, p.doc) for k, p in s.params.items()},
                               s.reference)
            for s in _REGISTRY.values()}


@dataclass(frozen=True)
class SchemeInfo:
    description: str
    params: dict
    reference: str

    def __str__(self):
        ps = ", ".join(f"{k}={d!r}" for k, (d, _) in self.params.items())
        return f"{self.description}" + (f" [{ps}]" if ps else "")


# --- the built-in schemes -------------------------------------------------------------------

def _he_branch(plan, norm=None):
    """k x ([norm] ReLU He-weight); the first norm lives in ``pre`` (shared with the projection)."""
    layers = [ReLUWeight(2.0)]
    for _ in range(plan.layers - 1):
        layers += ([norm()] if norm else []) + [ReLUWeight(2.0)]
    return tuple(layers)


def _batchnorm(plan):
    return Block(pre=(BatchNorm(),), branch=_he_branch(plan, BatchNorm))


def _none(plan):
    return Block(branch=_he_branch(plan))


def _sqrt_half(plan):
    return Block(branch=_he_branch(plan), post=(Gain(2 ** -0.5),))


def _skipinit(plan, alpha):
    return Block(branch=_he_branch(plan) + (Gain(alpha),))


def _fixup(plan):
    return Block(branch=_he_branch(plan)[:-1] + (Zero(),))


def nf_expected_variance(plan, alpha):
    """beta_l^2 of NF-ResNets: the analytic variance of each block's input.

    It starts at 1, grows by alpha^2 per block and is reset to 1 by a projection block
    (whose shortcut reads x / beta, which has unit variance) before that block's alpha^2.
    """
    proj = plan.projection
    idx = np.arange(plan.depth)
    # last[l]: the last projection block at or before l, -1 when there is none yet.
    last = np.maximum.accumulate(np.where(proj, idx, -1))
    after = np.where(last >= 0, 1.0 + alpha ** 2 * (idx - last + 1), 1.0 + alpha ** 2 * (idx + 1))
    return np.concatenate(([1.0], after[:-1]))


def _nf(plan, alpha, ws=True):
    beta2 = nf_expected_variance(plan, alpha)
    relu_w = (lambda: ReLUScaledWS()) if ws else (lambda: ReLUWeight(2.0))
    return Block(pre=(BlockGain(1.0 / beta2, "1/beta^2"),),
                 branch=tuple(relu_w() for _ in range(plan.layers)) + (Gain(alpha),),
                 projection=(relu_w(),))


def _layernorm(plan):
    return Block(pre=(LayerNorm(),), branch=_he_branch(plan, LayerNorm))


def _postnorm(plan):
    return Block(branch=_he_branch(plan), post=(LayerNorm(),))


def _relu_bn_conv(plan, gain2):
    # ReLU-BN-Conv ordering: the conv reads BN's zero-mean output directly, so no mean shift.
    unit = (ReLU(), BatchNorm(), Linear(gain2))
    return Block(branch=unit * plan.layers, projection=unit)


_ALPHA_DOC = "branch multiplier alpha"
_NETS = "propagation.nets:"  # the reference networks' block factories, imported on first use
register_scheme("batchnorm", "BN-ReLU-Conv pre-activation blocks, BatchNorm in train mode",
                "De & Smith 2020; He et al. 2016 (ResNet-V2)", _batchnorm,
                network=_NETS + "_batchnorm", head_norm="batchnorm")
register_scheme("none", "unnormalised pre-activation blocks, He init", "De & Smith 2020", _none,
                network=_NETS + "_none")
register_scheme("sqrt_half", "unnormalised blocks rescaled after the merge: (x + f(x)) / sqrt(2)",
                "De & Smith 2020", _sqrt_half, network=_NETS + "_sqrt_half")
register_scheme("skipinit", "unnormalised blocks with a scalar alpha at the end of each branch",
                "De & Smith 2020 (SkipInit); Bachlechner et al. 2020 (ReZero)", _skipinit,
                {"alpha": Param(0.0, _ALPHA_DOC + " (0 makes every block the identity)", nonneg_finite)},
                network=_NETS + "_skipinit", gate=({"alpha": 0.0}, {"alpha": 0.1}))
register_scheme("fixup", "unnormalised blocks whose last branch layer is zero-initialised",
                "Zhang, Dauphin & Ma 2019 (Fixup)", _fixup, network=_NETS + "_fixup",
                zero_head=True)
register_scheme("nf", "NF-ResNet: x + alpha f(x / beta_l), ReLU + Scaled Weight Standardisation",
                "Brock, De & Smith 2021", _nf,
                {"alpha": Param(0.2, _ALPHA_DOC + "; beta_l^2 = 1 + alpha^2 l", nonneg_finite)},
                network=_NETS + "_nf")
register_scheme("nf_he", "NF-ResNet scaling with He-initialised (not standardised) weights",
                "Brock, De & Smith 2021 (their He-init baseline)",
                lambda plan, alpha: _nf(plan, alpha, ws=False),
                {"alpha": Param(0.2, _ALPHA_DOC, nonneg_finite)}, network=_NETS + "_nf_he",
                family="nf")
register_scheme("layernorm", "pre-LN blocks: LayerNorm over channels before each ReLU",
                "Xiong et al. 2020 (pre-LN)", _layernorm, network=_NETS + "_layernorm",
                head_norm="layernorm")
register_scheme("postnorm", "post-LN blocks: x <- LayerNorm(x + f(x)), unnormalised branch",
                "Vaswani et al. 2017 (post-LN)", _postnorm, network=_NETS + "_postnorm",
                head_norm="layernorm")
register_scheme("relu_bn_conv", "ReLU-BN-Conv ordering: the conv reads BatchNorm's zero-mean output",
                "Brock, De & Smith 2021 (signal propagation plots)", _relu_bn_conv,
                {"gain2": Param(2.0, "squared gain of the conv weights (2 = He, 1 = LeCun)",
                                lambda n, v: _checks.finite_float(n, v, low=0.0))},
                network=_NETS + "_relu_bn_conv", head_norm="batchnorm", family="batchnorm")
