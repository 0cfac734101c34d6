"""``check``: the theory of a measured model, in one call.

Measure a model over seeds, predict the same finite network (its ``theory``, the zero
padding of its convolutions, the measured state of its first block's input), compare the
two and diagnose the measurement. The command line (``propagation check``), the figures, the
CI gate and its agreement table all go through :func:`check`, so there is one definition of
"the theory of this measured model".
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from . import _checks
from .comparison import TOLERANCE, Comparison, Diagnosis, compare, diagnose, input_state
from .empirical import measure
from .positions import GeometryError
from .predict import predict
from .profile import Profile

#: The keys of a theory dict that describe the architecture, not the scheme: kept when the
#: caller names another scheme than the model's own.
STRUCTURE = ("depth", "stages", "project_first", "layers")
ALL_QUANTITIES = tuple(TOLERANCE)

Builder = Callable[[], torch.nn.Module]
Inputs = Union[torch.Tensor, Sequence[torch.Tensor], Callable[[int], torch.Tensor],
               Sequence[int]]


@dataclass(frozen=True)
class Check:
    """Theory, measurement, their comparison and a diagnosis of one model.

    Attributes:
        theory: the prediction, a :class:`Profile` (``predict(**predict_kwargs)``).
        measured: the measurement, a :class:`Profile` over ``seeds`` initialisations.
        comparison: per block and quantity, the log-ratio and its band (:class:`Comparison`).
        diagnosis: the growth law of the skip path and what it means, or None with
            ``diagnosis_note`` saying why there is none.
        predict_kwargs: JSON-ready keyword arguments that reproduce ``theory``.
    """

    theory: Profile
    measured: Profile
    comparison: Comparison
    diagnosis: Optional[Diagnosis]
    predict_kwargs: dict
    diagnosis_note: str = ""
    models: tuple = field(default=(), repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """Whether every block and quantity lies in its band."""
        return self.comparison.ok

    def table(self) -> str:
        """The comparison's table, then the diagnosis."""
        diag = str(self.diagnosis) if self.diagnosis is not None else self.diagnosis_note
        return self.comparison.table() + ("\n" + diag if diag else "")

    def to_dict(self) -> dict:
        return {"ok": self.ok, "predict": self.predict_kwargs,
                "comparison": self.comparison.to_dict(),
                "diagnosis": None if self.diagnosis is None else {
                    "law": self.diagnosis.law, "rate": self.diagnosis.rate,
                    "closest": self.diagnosis.closest, "messages": list(self.diagnosis.messages)},
                "diagnosis_note": self.diagnosis_note}


def gaussian_inputs(shape: Sequence[int], dtype: Optional[torch.dtype] = None
                    ) -> Callable[[int], torch.Tensor]:
    """``seed -> tensor``: an i.i.d. N(0, 1) batch of ``shape`` per seed, drawn in ``dtype``
    (default float32) from a generator seeded with 10000 + seed.

    The offset keeps the inputs apart from the weights: ``torch.manual_seed(s)`` and a
    generator seeded with s draw the same numbers, and a weight matrix equal to its input is
    no random network.
    """
    shape = tuple(_checks.positive_int(f"shape[{i}]", s) for i, s in enumerate(shape))
    dtype = dtype or torch.float32

    def inputs(seed: int) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(10_000 + seed),
                           dtype=dtype)
    return inputs


def build_models(model: Union[torch.nn.Module, Sequence[torch.nn.Module], Builder],
                 seeds: int) -> list:
    """One model per seed: a builder is called under ``torch.manual_seed(seed)``; a module
    or a list of modules is used as it is."""
    if isinstance(model, torch.nn.Module):
        return [model]
    if isinstance(model, (list, tuple)):
        return list(model)
    if callable(model):
        models = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            built = model()
            if not isinstance(built, torch.nn.Module):
                raise TypeError(f"the model builder must return a torch.nn.Module, got "
                                f"{type(built).__name__}")
            models.append(built)
        return models
    raise TypeError(f"model must be a torch.nn.Module, a list of them or a builder "
                    f"() -> nn.Module, got {type(model).__name__}")


def _is_shape(inputs: Any) -> bool:
    return (isinstance(inputs, (tuple, list)) and len(inputs) > 0
            and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in inputs))


def _first_input(inputs: Any) -> Optional[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return inputs
    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], torch.Tensor):
        return inputs[0]
    return None


def check(model: Union[torch.nn.Module, Sequence[torch.nn.Module], Builder], inputs: Inputs, *,
          seeds: int = 1, theory: Union[None, str, Mapping[str, Any]] = None,
          width: Optional[int] = None, quantities: Sequence[str] = ALL_QUANTITIES,
          mode: str = "init", dtype: Optional[torch.dtype] = None, channel_axis: int = 1,
          backward: Optional[bool] = None, blocks: Any = None, progress: Optional[bool] = None,
          diagnosis: bool = True, **overrides: Any) -> Check:
    """Measure ``model``, predict it, compare and diagnose: the toolkit's one pipeline.

    Args:
        model: an ``nn.Module``, a list of them (one per seed), or a builder
            ``() -> nn.Module`` called under ``torch.manual_seed(seed)`` for each seed.
        inputs: a tensor, a list of tensors, a callable ``seed -> tensor``, or a shape such
            as ``(8, 3, 32, 32)`` for i.i.d. N(0, 1) batches (:func:`gaussian_inputs`).
        seeds: initialisations (and input batches) to measure; the comparison's bands
            account for the median over them.
        theory: ``"model"``: the structural theory, ``predict(model, inputs)`` from the
            model's own calls and weights (of the held weights for one seed; with several,
            of their initialisation law at the first model's scales, ``weights="law"``);
            or ``predict`` keyword arguments (``scheme``, its parameters, ``stages``, ...).
            Default: the model's own ``theory`` dict (the networks of ``propagation.nets``
            have one), else "model". ``depth`` defaults to the merges measured; ``stages`` and
            ``project_first`` to the projection shortcuts measured (a stage starts at each);
            the input state to the measured state of the first block's input
            (:func:`input_state`); convolutional networks of ``propagation.nets`` get the
            position theory of their convolutions (``predict(..., positions=...)``).
        width: channels for the finite-width band (default: the narrowest merge measured).
        quantities: the quantities compared (default all four); forward-only measurements
            (``backward=False``) leave out "grad".
        mode, dtype, channel_axis, blocks, progress: as :func:`propagation.measure`.
        backward: measure gradients; default: whenever "grad" is among ``quantities``.
        diagnosis: also run :func:`propagation.diagnose` (about a second: it fits every
            registered scheme); the gate and the figures, which do not read it, skip it.
        **overrides: ``predict`` keyword arguments that replace the theory's. A ``scheme``
            other than the theory's keeps only its structure (depth, stages, project_first,
            layers), not its parameters.

    Returns: a :class:`Check` (``ok``, ``table()``, ``theory``, ``measured``, ...).
    """
    seeds = _checks.positive_int("seeds", seeds)
    quantities = tuple(quantities)
    for q in quantities:
        _checks.choice("quantities entry", q, ALL_QUANTITIES)
    if backward is None:
        backward = "grad" in quantities
    elif not backward:
        quantities = tuple(q for q in quantities if q != "grad")
    models = build_models(model, seeds)
    batches: Any = inputs
    shape: Optional[tuple] = None
    if _is_shape(inputs):
        shape = tuple(int(s) for s in inputs)  # type: ignore[union-attr]
        batches = gaussian_inputs(shape, dtype)
    else:
        first = _first_input(inputs)
        shape = None if first is None else tuple(first.shape)
    measured = measure(models, batches, seeds=seeds, backward=backward, channel_axis=channel_axis,
                       mode=mode, dtype=dtype, blocks=blocks, progress=progress)
    if theory is None and not getattr(models[0], "theory", None) and "scheme" not in overrides:
        theory = "model"
    if isinstance(theory, str):
        _checks.choice("theory", theory, ("model",))
        if overrides:
            raise TypeError(f"theory='model' takes no predict keyword arguments, got "
                            f"{sorted(overrides)}")
        first_batch = batches(0) if callable(batches) else (
            batches[0] if isinstance(batches, (list, tuple)) else batches)
        predicted = predict(models[0], first_batch, channel_axis=channel_axis, mode=mode,
                            weights="law" if len(models) > 1 else "held")
        kwargs = {"model": type(models[0]).__name__, "weights": predicted.meta["weights"]}
    else:
        kwargs = theory_kwargs(models[0], measured, theory, overrides, shape)
        kwargs.update(_finite_width(kwargs, measured, width))
        try:
            predicted = predict(**kwargs)
        except GeometryError:
            # A theory whose blocks do not fit the network's convolutions (another scheme's
            # layer count, a modified block): the mean padding factor, which needs no fit.
            kwargs = theory_kwargs(models[0], measured, theory, overrides, shape, positions=False)
            kwargs.update(_finite_width(kwargs, measured, width))
            predicted = predict(**kwargs)
    comparison = compare(predicted, measured, width=width, quantities=quantities)
    found, note = None, ""
    if not diagnosis:
        note = "no diagnosis (diagnosis=False)"
    elif measured.depth < 2:
        note = f"no diagnosis: it needs at least 2 blocks, the model has {measured.depth}"
    else:
        found = diagnose(measured)
    return Check(predicted, measured, comparison, found, jsonable_kwargs(kwargs), note,
                 tuple(models))


def _finite_width(kwargs: Mapping[str, Any], measured: Profile, width: Optional[int]) -> dict:
    """``width`` and ``batch`` for the finite-width theory, where it applies: networks whose
    merges hold one vector per input (MLPs; every statistic averages over the batch alone),
    and ``width`` for the position theory of convolutional networks
    (:mod:`propagation.finite_positions`: second moments and squared means; the channel
    variance and gradients keep compare's band). Sequence tensors average over tokens too,
    which are not exchangeable with inputs; they keep the 7/n band of ``compare`` (README:
    finite width)."""
    if "width" in kwargs:
        return {}
    if "positions" in kwargs:
        # The position theory's spread: each convolution's channels from the geometry.
        width = width or measured.channels
        return {} if width is None else {"width": int(width)}
    if measured.samples_per_channel is None:
        return {}
    n = np.asarray(measured.samples_per_channel, dtype=np.float64)
    shape = measured.meta.get("input_shape")
    batch = int(shape[0]) if shape else None
    width = width or measured.channels
    if width is None or batch is None or not np.all(n == batch) or batch < 2:
        return {}
    return {"width": int(width), "batch": int(batch)}


def theory_kwargs(model: torch.nn.Module, measured: Profile,
                  theory: Optional[Mapping[str, Any]] = None,
                  overrides: Optional[Mapping[str, Any]] = None,
                  input_shape: Optional[Sequence[int]] = None, positions: bool = True) -> dict:
    """The ``predict`` keyword arguments for ``model`` as measured (see :func:`check`);
    ``positions=False``: the mean padding factor for conv nets, not the position theory."""
    base = dict(theory if theory is not None else getattr(model, "theory", None) or {})
    overrides = dict(overrides or {})
    if "scheme" in overrides and overrides["scheme"] != base.get("scheme"):
        base = {k: v for k, v in base.items() if k in STRUCTURE}
    base.update(overrides)
    if "scheme" not in base:
        raise ValueError("the theory needs a scheme: the model has no .theory, so pass "
                         "theory={'scheme': ...} (or scheme=...) to check")
    from .sequence import is_sequence_scheme
    if is_sequence_scheme(base["scheme"]):
        # A transformer scheme: depth counts layers (two merges each), the sequence length
        # comes from the measurement, and there are no stages or padding.
        base.setdefault("depth", max(measured.depth // 2, 1))
        if "tokens" not in base and measured.tokens is not None and measured.tokens.length:
            base["tokens"] = measured.tokens.length
        if "input_second_moment" not in base:
            base.update(input_state(measured, tokens=True))
        return base
    base.setdefault("depth", measured.depth)
    if "stages" not in base and base["depth"] == measured.depth:
        base.update(measured_stages(measured, base.get("project_first")))
    from . import nets
    if (input_shape is not None and len(input_shape) == 4
            and "padding_factors" not in base and "positions" not in base):
        geometry = _conv_geometry(model, input_shape) if positions else None
        if geometry is not None:
            base["positions"] = geometry  # every map position by position (exact padding)
        elif isinstance(model, nets.ResidualNetwork):
            base["padding_factors"] = nets.padding_factors(model, input_shape)
    if "input_second_moment" not in base:
        base.update(input_state(measured, finite_batch="positions" in base))
    return base


def _conv_geometry(model, input_shape):
    """The network's geometry for the position theory, or None where it has no position
    map (dense networks, the ImageNet stem's max pool, grouped convolutions). A network of
    propagation.nets is read by its classes; any other is traced (one forward pass of
    random inputs of ``input_shape``)."""
    from . import nets
    try:
        if isinstance(model, nets.ResidualNetwork):
            return nets.conv_geometry(model, input_shape)
        from .tracing import traced_conv_geometry
        param = next(model.parameters(), None)
        x = torch.randn(tuple(int(s) for s in input_shape), generator=torch.Generator().manual_seed(0),
                        dtype=param.dtype if param is not None and param.is_floating_point()
                        else torch.float32)
        if param is not None:
            x = x.to(param.device)
        return traced_conv_geometry(model, x)
    except (ValueError, TypeError):
        return None


def measured_stages(measured: Profile, project_first: Optional[bool] = None) -> dict:
    """``stages`` and ``project_first`` for ``predict`` from where the measurement found
    projection shortcuts: a stage starts at each (and at block 0). With ``project_first``
    given, block 0's projection is taken from it rather than from the measurement."""
    proj = np.asarray(measured.projection, dtype=bool)
    first = bool(proj[0]) if project_first is None else bool(project_first)
    starts = [0] + [int(i) for i in np.nonzero(proj)[0] if i > 0] + [measured.depth]
    if len(starts) == 2 and not first:
        return {"project_first": False}  # no projection anywhere: no stages
    stages = [b - a for a, b in zip(starts[:-1], starts[1:])]
    return {"stages": stages, "project_first": first}


def jsonable_kwargs(kwargs: Mapping[str, Any]) -> dict:
    """``predict`` keyword arguments as JSON: arrays and tuples become lists."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out
