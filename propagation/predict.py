"""``predict``: the infinite-width theory of a residual network at initialisation."""
import math
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from numpy.typing import ArrayLike

from . import _checks, kernels
from dataclasses import dataclass, replace

from .layers import MATH, NUMPY, Block, BlockGain, Gain, backward_gain, run
from .profile import Normalised, Profile, Stats
from .schemes import Plan, get_scheme

_NAN = math.nan


def make_plan(depth: int, stages: Optional[Sequence[int]] = None, project_first: bool = True,
              layers: int = 2) -> Plan:
    """Check ``depth``/``stages`` and mark the blocks that begin a stage with a projection."""
    depth = _checks.positive_int("depth", depth)
    layers = _checks.positive_int("layers", layers)
    projection = np.zeros(depth, dtype=bool)
    if stages is not None:
        try:
            stages = tuple(stages)
        except TypeError:
            raise TypeError(f"stages must be a sequence of positive ints summing to depth={depth}, "
                            f"got {stages!r}") from None
        for i, n in enumerate(stages):
            _checks.positive_int(f"stages[{i}]", n)
        if sum(stages) != depth:
            raise ValueError(f"stages must sum to depth={depth}, got {stages!r} (sum {sum(stages)})")
        starts = np.cumsum((0,) + stages[:-1])
        projection[starts if project_first else starts[1:]] = True
    return Plan(depth=depth, projection=projection, stages=stages, layers=layers)


def predict(depth: int, scheme: str = "batchnorm", *, stages: Optional[Sequence[int]] = None,
            project_first: bool = True, layers: int = 2, input_second_moment: float = 1.0,
            input_squared_mean: float = 0.0, padding_factors: Optional[ArrayLike] = None,
            branch_gain: float = 1.0, width: Optional[int] = None, batch: Optional[int] = None,
            positions: Optional[Mapping[str, Any]] = None, **params: Any) -> Profile:
    """Predict per-block signal propagation at initialisation: the infinite-width values and,
    with ``width``, the distribution of a single network's statistics at that width.

    Two forms:

    * ``predict(depth, scheme, ...)``: a registered scheme, a fixed architecture and
      initialisation (below);
    * ``predict(model, inputs, ...)``: the theory of a PyTorch model from the calls its
      forward pass makes and the weights it holds, merge for merge as ``measure(model,
      inputs)`` finds them (:func:`propagation.structural.predict_model`, whose keyword
      arguments it takes: ``channel_axis``, ``mode``, ``weights``, ``padding``,
      ``unsupported``). torch is imported only for this form.

    Args:
        depth: number of residual blocks D (a positive int).
        scheme: a registered scheme name (see :func:`propagation.schemes`).
        stages: block counts per stage, summing to ``depth`` (e.g. (3, 4, 6, 3) for
            ResNet-50-V2). Each stage begins with a projection-shortcut block; with
            ``project_first=False`` the first stage does not (CIFAR-style ResNets).
        layers: weight layers per residual branch: 2 (basic block, MLP) or 3 (bottleneck).
        input_second_moment, input_squared_mean: the state of x_0, the input of block 0
            (default: i.i.d. N(0, 1) input, i.e. 1 and 0).
        padding_factors: optional, shape (layers,) or (depth, layers): a factor on the output
            of each weight layer of each branch, for finite convolutions whose zero padding
            loses the out-of-bounds taps (the mean fraction of in-bounds taps; see
            ``propagation.nets.padding_factors``). Default: none (the infinite limit).
        branch_gain: an extra multiplier at the end of every residual branch (default 1);
            ``diagnose`` fits it to say how a network's branches are scaled against a
            scheme's.
        width: channels of the residual stream. Given, the profile also carries ``spread``,
            the predicted distribution over initialisations of every statistic of one
            network of that width (:mod:`propagation.finite`): ``.quantile(0.5)`` is the
            predicted median profile, ``.quantile(0.05)`` and ``.quantile(0.95)`` the 90%
            band. Default: none (the infinite-width limit only).
        batch: inputs per batch that each statistic averages over (samples per channel);
            it sets the finite-sample floor of the squared mean and how much the batch
            averages the spread. Default: the infinite-batch limit. Only with ``width``.
        positions: a convolutional network's geometry (:func:`propagation.nets.conv_geometry`:
            input shape, stem and every block's convolutions). Given, every map is followed
            position by position (:func:`propagation.positions.predict_positions`): zero
            padding, strides and Scaled WS's border leak exactly. The network's input is
            taken i.i.d. and pushed through the stem; its output is conditioned on the input
            moments (block 0's, as without positions, but the squared mean as the batch
            measures it: ``input_state(m, finite_batch=True)``). The squared means are those
            a batch of the input's examples measures. With ``width``, the finite-width
            spread of the forward statistics over positions
            (:mod:`propagation.finite_positions`): each convolution with the output
            channels the geometry records, ``width`` where it records none; gradients keep
            compare's band. Not with ``padding_factors`` or ``batch`` (the geometry's).
        **params: the scheme's own parameters (e.g. ``alpha`` for skipinit and nf).

    Transformer schemes (``propagation.sequence``: transformer_preln, transformer_postln,
    rezero, layerscale, deepnorm, depth_mup, completep) take ``depth`` as transformer layers
    (two merges each), ``tokens``, ``causal``, ``logit_std``, ``input_token_correlation``
    and their own parameters, and return a profile with ``tokens`` (the token correlation).

    Returns:
        A :class:`Profile` with ``skip`` (D + 1,), ``branch`` (D,), ``grad`` (D + 1,) and
        ``downscale`` (D,). Values are float64, computed in log2 space; ``log2_*`` fields hold
        them exactly where the linear ones overflow.

    The recursion is the two-point mean-field theory of ../shared/THEORY.md, corrected where
    noted in README.md (Scaled-WS correlations, backward gains of standardised layers).
    """
    if _is_module(depth):
        if (stages is not None or not project_first or layers != 2 or input_second_moment != 1.0
                or input_squared_mean != 0.0 or padding_factors is not None or branch_gain != 1.0
                or width is not None or batch is not None):
            raise TypeError("predict(model, inputs) takes the keyword arguments of "
                            "propagation.structural.predict_model (channel_axis, mode, weights, "
                            "padding, unsupported), not the scheme form's stages, layers, "
                            "input moments, padding_factors, branch_gain, width or batch "
                            "(the finite-width spread covers the scheme form only)")
        from .structural import predict_model
        return predict_model(depth, scheme, **params)
    from .sequence import is_sequence_scheme, predict_sequence
    if is_sequence_scheme(scheme):
        if (stages is not None or not project_first or layers != 2 or padding_factors is not None
                or branch_gain != 1.0 or width is not None or batch is not None):
            raise TypeError(f"{scheme!r} is a transformer scheme (propagation.sequence): it takes "
                            f"tokens, causal, logit_std, the input moments and its own parameters, "
                            f"not stages, layers, padding_factors, branch_gain, width or batch")
        return predict_sequence(depth, scheme, input_second_moment=input_second_moment,
                                input_squared_mean=input_squared_mean, **params)
    setup = _setup(depth, scheme, stages, project_first, layers, input_second_moment,
                   input_squared_mean, padding_factors, branch_gain, params)
    plan, block, q0, m0 = setup.plan, setup.block, setup.q0, setup.m0
    if positions is not None:
        if padding_factors is not None or batch is not None:
            raise TypeError("positions takes the padding, the batch and the input from the "
                            "geometry: not with padding_factors or batch")
        if width is not None:
            width = _checks.positive_int("width", width)
        return _profile_positions(setup, positions, width)

    if _resets(block, plan):
        prof = _profile_reset(block, plan, q0, m0)
    else:
        lq_x, e_x = _block_inputs_scan(block, plan, math.log2(q0), (q0 - m0) / q0)
        prof = _profile(block, plan, lq_x, e_x)
    share = prof[3]
    spread = None
    if width is not None:
        from .finite import spread as finite_spread
        width = _checks.positive_int("width", width)
        if batch is not None:
            batch = _checks.positive_int("batch", batch)
            if batch < 2:
                raise ValueError(f"batch must be at least 2 (a squared channel mean over one "
                                 f"input is its second moment), got {batch}")
        spread = finite_spread(block, plan, q0, m0, width, batch, share=np.asarray(share),
                               grad_log2=prof[2].log2_second_moment)
    elif batch is not None:
        raise TypeError("batch is only used with width (the finite-width spread); pass width=<channels>")
    return Profile(skip=prof[0], branch=prof[1], grad=prof[2], depth=plan.depth,
                   projection=plan.projection, source="theory", scheme=setup.name,
                   params=setup.profile_params,
                   **_norms(block, plan.depth),
                   grad_branch_share=np.asarray(share),
                   normalised=_normalised(block),
                   input_second_moment=q0, input_squared_mean=m0, spread=spread,
                   meta={"input_second_moment": q0, "input_squared_mean": m0,
                         **({"width": width, "batch": batch} if width is not None else {})})


def _profile_positions(setup, geometry, width=None):
    from .positions import predict_positions
    plan, block = setup.plan, setup.block
    out = predict_positions(block, plan, geometry, setup.q0, setup.m0, width=width)
    skip, branch, grad, share = out["skip"], out["branch"], out["grad"], out["share"]

    def stats(a):
        with np.errstate(divide="ignore"):
            return Stats(*np.log2(np.maximum(a[:, :3], 0.0)).T)
    with np.errstate(divide="ignore"):
        g = Stats(np.log2(grad), np.full_like(grad, np.nan), np.full_like(grad, np.nan))
    batch = int(geometry["input_shape"][0])
    spread = None
    if width is not None:
        from .finite_positions import build_spread
        spread = build_spread(*out["spread"], g.log2_second_moment, width, batch)
    return Profile(skip=stats(skip), branch=stats(branch), grad=g, depth=plan.depth,
                   projection=plan.projection, source="theory", scheme=setup.name,
                   params=setup.profile_params, **_norms(block, plan.depth),
                   grad_branch_share=share, normalised=_normalised(block),
                   input_second_moment=float(out["input"][0]),
                   input_squared_mean=float(out["input"][1]), spread=spread,
                   meta={"positions": True, "finite_batch": batch,
                         **({"width": width} if width is not None else {}),
                         "sample_rho2_skip": skip[:, 3].tolist(),
                         "sample_rho2_branch": branch[:, 3].tolist(),
                         "input_second_moment": setup.q0, "input_squared_mean": setup.m0})


def _normalised(block):
    """Where a block's maps normalise (Profile.normalised)."""
    def any_norm(layers):
        return any(layer.normalises or layer.resets for layer in layers)
    return Normalised(branch=any_norm(block.pre + block.branch), pre=any_norm(block.pre),
                      post=any_norm(block.post))


def _is_module(obj):
    """Whether ``obj`` is a torch ``nn.Module``, without importing torch for the scheme form."""
    import sys
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def predict_reference(depth: int, scheme: str = "batchnorm", *,
                      stages: Optional[Sequence[int]] = None, project_first: bool = True,
                      layers: int = 2, input_second_moment: float = 1.0,
                      input_squared_mean: float = 0.0,
                      padding_factors: Optional[ArrayLike] = None, branch_gain: float = 1.0,
                      **params: Any) -> Profile:
    """:func:`predict`, written the way THEORY.md reads: one block at a time, one layer at a
    time, in Python floats. It is the specification the fast paths are tested against
    (tests/test_predict.py), not a tool: it costs some 20 us per layer and block.

    Block l maps the state x_l = (log2 q, 1 - rho) of its input to
        p = pre(x_l),  b = branch(p),  s = projection(p) if projecting else skip_gain^2 x_l,
        y = merge(s, b) (second moments and variances of independent operands add),
        x_{l+1} = post(y);
    backwards, the log2 squared-norm gain from y to x_l is
        a_l = log2(skip_gain^2 + 2^(g_pre + g_branch)), or g_pre + log2(2^g_branch + 2^g_proj)
    for a projection block, and G at x_l sums a_k and the gains of post over k >= l (the
    read-out sits at y_{D-1}, whose post is not part of the network).
    """
    setup = _setup(depth, scheme, stages, project_first, layers, input_second_moment,
                   input_squared_mean, padding_factors, branch_gain, params)
    plan, block, q0, m0 = setup.plan, setup.block, setup.q0, setup.m0
    log2 = MATH.log2
    skip_gain2 = log2(block.skip_gain ** 2)
    lq, e = math.log2(q0), (q0 - m0) / q0
    skip_states, branch_states, gain_y_to_x, gain_post, share = [], [], [], [], []
    merged = (lq, e)
    for l in range(plan.depth):
        lq_p, e_p = run(block.pre, lq, e, l, MATH)
        g_pre = backward_gain(block.pre, lq, e, l, MATH)
        b = run(block.branch, lq_p, e_p, l, MATH)
        g_branch = backward_gain(block.branch, lq_p, e_p, l, MATH)
        if plan.projection[l]:
            s = run(block.projection, lq_p, e_p, l, MATH)
            a = g_pre + _logaddexp2(g_branch,
                                    backward_gain(block.projection, lq_p, e_p, l, MATH))
        else:
            s = (lq + skip_gain2, e)
            a = _logaddexp2(skip_gain2, g_pre + g_branch)
        merged = _merge_floats(s, b)
        skip_states.append(s)
        branch_states.append(b)
        gain_y_to_x.append(a)
        share.append(min(_exp2_or_zero(g_pre + g_branch - a), 1.0))
        gain_post.append(backward_gain(block.post, merged[0], merged[1], l, MATH))
        lq, e = run(block.post, merged[0], merged[1], l, MATH)
    skip_states.append(merged)  # the last merge's sum, before its post
    # G at x_l, from the read-out at y_{D-1} backwards.
    grad = [0.0] * (plan.depth + 1)
    g_x = 0.0
    for l in reversed(range(plan.depth)):
        g_y = g_x + (gain_post[l] if l < plan.depth - 1 else 0.0)
        g_x = g_y + gain_y_to_x[l]
        identity = not plan.projection[l] and block.skip_gain == 1.0
        grad[l] = g_x if identity else g_y  # a new tensor has the merge output's gradient
    nan = [math.nan] * (plan.depth + 1)
    return Profile(skip=_stats_floats(skip_states), branch=_stats_floats(branch_states),
                   grad=Stats(np.array(grad), np.array(nan), np.array(nan)), depth=plan.depth,
                   projection=plan.projection, source="theory", scheme=setup.name,
                   params=setup.profile_params,
                   **_norms(block, plan.depth),
                   grad_branch_share=np.array(share),
                   input_second_moment=q0, input_squared_mean=m0,
                   meta={"input_second_moment": q0, "input_squared_mean": m0})


def _norms(block, depth):
    """Profile.branch_norm and post_norm of a block's layer maps, as measure names them."""
    def kinds(layers):
        return "+".join(sorted({layer.norm for layer in layers if layer.norm}))
    branch, post = kinds(block.pre + block.branch), kinds(block.post)
    return {"branch_norm": (branch,) * depth, "post_norm": ("",) + (post,) * (depth - 1)}


def _logaddexp2(a, b):
    """log2(2^a + 2^b) in floats, for a and b finite or -inf."""
    hi, lo = max(a, b), min(a, b)
    if hi == -math.inf or hi == math.inf:
        return hi
    return hi + math.log2(1.0 + 2.0 ** (lo - hi))


def _exp2_or_zero(t):
    return 0.0 if math.isnan(t) else 2.0 ** t if t < 1024.0 else math.inf


def _merge_floats(s, b):
    """State of s + b for independent operands, each (log2 q, 1 - rho): q and q (1 - rho)
    add."""
    (lq_s, e_s), (lq_b, e_b) = s, b
    if lq_b > lq_s:
        (lq_s, e_s), (lq_b, e_b) = (lq_b, e_b), (lq_s, e_s)
    if lq_s == -math.inf:
        return lq_s, e_s
    w = 2.0 ** (lq_b - lq_s)
    return lq_s + math.log2(1.0 + w), (e_s + w * e_b) / (1.0 + w)


def _stats_floats(states):
    lq = np.array([s[0] for s in states], dtype=np.float64)
    e = np.array([s[1] for s in states], dtype=np.float64)
    return _stats(lq, e)


@dataclass(frozen=True)
class _Setup:
    """What predict and predict_reference build from their arguments, checked."""

    name: str
    plan: Plan
    block: Block
    q0: float
    m0: float
    profile_params: dict


def _setup(depth, scheme, stages, project_first, layers, input_second_moment,
           input_squared_mean, padding_factors, branch_gain, params):
    spec = get_scheme(scheme)
    plan = make_plan(depth, stages, project_first, layers)
    clean = spec.clean_params(params)
    q0 = _checks.finite_float("input_second_moment", input_second_moment, low=0.0)
    if q0 == 0.0:
        raise ValueError("input_second_moment must be > 0, got 0.0")
    m0 = _checks.finite_float("input_squared_mean", input_squared_mean, low=0.0, high=q0)
    block = spec.build(plan, **clean)
    if padding_factors is not None:
        block = _with_padding(block, plan, padding_factors)
    gain = _checks.finite_float("branch_gain", branch_gain, low=0.0)
    if gain != 1.0:
        block = replace(block, branch=block.branch + (Gain(gain),))
    profile_params = {**clean, **({"stages": list(plan.stages)} if plan.stages else {}),
                      **({"layers": layers} if layers != 2 else {})}
    return _Setup(spec.name, plan, block, q0, m0, profile_params)


def _with_padding(block, plan, factors):
    """Follow the j-th weight layer of every branch with a per-block gain factors[:, j]."""
    weights = [i for i, layer in enumerate(block.branch) if layer.is_weight_layer]
    try:
        f = np.broadcast_to(np.asarray(factors, dtype=np.float64), (plan.depth, len(weights)))
    except ValueError:
        raise ValueError(f"padding_factors must have shape ({len(weights)},) or ({plan.depth}, "
                         f"{len(weights)}) for this scheme's branches, got shape "
                         f"{np.shape(factors)}") from None
    if not np.all(np.isfinite(f)) or np.any(f <= 0) or np.any(f > 1):
        raise ValueError(f"padding_factors must lie in (0, 1], got values from {f.min()} to {f.max()}")
    branch = list(block.branch)
    for j, i in reversed(list(enumerate(weights))):
        branch.insert(i + 1, BlockGain(f[:, j], f"padding[{j}]"))
    return replace(block, branch=tuple(branch))


def _merge(lq_s, e_s, lq_b, e_b):
    """State of skip + branch for independent operands: second moments and variances add.
    Arrays over blocks; the sequential loop inlines the same formula for floats."""
    hi = np.maximum(lq_s, lq_b)
    with np.errstate(invalid="ignore"):
        ws = np.where(np.isneginf(hi), 1.0, np.exp2(lq_s - hi))
        wb = np.where(np.isneginf(hi), 0.0, np.exp2(lq_b - hi))
    return hi + np.log2(ws + wb), (ws * e_s + wb * e_b) / (ws + wb)


def _resets(block, plan):
    """Whether every branch (and projection) output is independent of the block input, so
    that the skip path is a running sum and everything vectorises over blocks."""
    return (not block.post and block.skip_gain == 1.0
            and block.chain_resets(block.pre + block.branch)
            and (not plan.projection.any() or block.chain_resets(block.pre + block.projection)))


_LOG2E = 1.0 / math.log(2.0)


def _log2_1p_exp2(t, out=None):
    """(log2(1 + 2^t), 2^t / (1 + 2^t)): ``np.logaddexp2(0, t)`` and the share of 2^t in
    the sum, for t finite or +-inf. Where 2^t is finite this is logaddexp2's own formula for
    t <= 0 (log1p of exp2, times log2(e)) in a fifth of logaddexp2's time; elsewhere
    logaddexp2 itself. ``out`` (t's shape) may be t itself: it then receives the share."""
    if np.ndim(t) == 0 or np.max(t) < 1000.0:
        x = np.exp2(t, out=out)
        a = np.log1p(x)
        a *= _LOG2E
        if out is None:
            return a, x / (x + 1.0)
        return a, np.divide(x, x + 1.0, out=x)
    a = np.logaddexp2(0.0, t)
    with np.errstate(over="ignore", invalid="ignore"):
        share = np.exp2(t - a)
    return a, np.minimum(np.nan_to_num(share, nan=0.0), 1.0)


def _linear(lq, e):
    """(q, v, m) from (log2 q, 1 - rho): second moment, variance and squared mean."""
    q = np.exp2(lq)
    return q, q * e, q * (1.0 - e)


def _running_sum(start, inc, proj, at_proj, arange):
    """x_0 = start, x_{l+1} = (at_proj[l] if proj[l] else x_l) + inc[l]: a new array (D + 1,).

    With ``arange`` (0 .. D, given when there is no projection and the increment is the same
    in every block) this is start + l * inc, rounded once where a running sum would round D
    times."""
    D = len(proj)
    if arange is not None:
        if inc == 0.0:
            return np.float64(start)  # constant: broadcast at the end, not stored D times
        out = arange * inc
        out += start
        return out
    inc = np.broadcast_to(inc, (D,))
    out = np.empty(D + 1)
    out[0] = start
    if at_proj is None:
        np.cumsum(inc, out=out[1:])
        out[1:] += start
        return out
    # A projection block replaces x_l by p_l: x_{l+1} = (x_0 if no projection yet) + the
    # increments since the last projection, the projection's own p_l included.
    idx = np.arange(D)
    inc = inc + np.where(proj, at_proj, 0.0)
    cum = np.cumsum(inc)
    seg = np.maximum.accumulate(np.where(proj, idx, -1))  # last projection at or before l
    first = np.maximum(seg, 0)
    out[1:] = cum - np.where(seg >= 0, cum[first] - inc[first], -start)
    return out


def _log2_inplace(x):
    """log2 of max(x, 0), in x's own memory where x is an array."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if np.ndim(x) == 0:
            return np.log2(np.maximum(x, 0.0))
        np.maximum(x, 0.0, out=x)
        return np.log2(x, out=x)


def _gain_at_inputs(layers, lq, lv, e_of, idx):
    """Summed log2 backward gain of ``layers`` applied to the block inputs, given as log2 q
    and log2 v; ``e_of()`` makes 1 - rho only for a layer that reads it. Also returns the
    state after the layers (None for no layers)."""
    if not layers:
        return 0.0, None
    first = layers[0]
    total = first.backward_lv(lq, lv, idx, NUMPY)
    e = None
    if total is None:
        e = e_of()
        total = first.backward(lq, e, idx, NUMPY)
    if first.resets:  # its output does not depend on its input (run's convention: from (0, 1))
        state = first.forward(np.float64(0.0), np.float64(1.0), idx, NUMPY)
    else:
        state = first.forward(lq, e_of() if e is None else e, idx, NUMPY)
    for layer in layers[1:]:
        total = total + layer.backward(*state, idx, NUMPY)
        state = layer.forward(*state, idx, NUMPY)
    return total, state


def _profile_reset(block, plan, q0, m0):
    """``_profile`` for blocks whose branch (and projection) output does not depend on the
    block input, because a norm layer or a zero resets it.

    The skip path is then a running sum of second moments, squared means and variances,
    restarted at each projection block, and everything else a few passes over arrays of
    blocks. Chains after a reset are evaluated once (0-d) and broadcast; with the same
    branch in every block and no projection the running sums are start + l * increment.
    At 10^6 blocks the time is the arrays the Profile holds (new memory) and the passes
    that fill them: three log2 for the skip path, exp2 and log1p for the backward gains and
    a cumulative sum for the gradient; buffers are reused so that little else is allocated.
    tests/test_predict.py holds it to ``_profile`` over the block-by-block recursion.
    """
    D, proj = plan.depth, plan.projection
    any_proj = bool(proj.any())
    idx = np.arange(D)
    zero, one = np.float64(0.0), np.float64(1.0)
    lq_b, e_b = run(block.pre + block.branch, zero, one, idx, NUMPY)
    q_b, v_b, m_b = _linear(lq_b, e_b)
    proj_linear = (None,) * 3
    if any_proj:
        lq_p, e_p = run(block.pre + block.projection, zero, one, idx, NUMPY)
        proj_linear = _linear(lq_p, e_p)
    closed = not any_proj and np.ndim(q_b) == 0
    e0 = (q0 - m0) / q0
    if closed and q_b == 0.0:
        # The branch adds exactly nothing (Fixup, SkipInit at alpha = 0): every x_l is x_0.
        block_index = None
        with np.errstate(divide="ignore"):
            skip_lq, skip_lv, skip_lm = (np.log2(np.float64(q0)), np.log2(np.float64(q0 * e0)),
                                         np.log2(np.float64(m0)))
        lq_x, lv_x = skip_lq, skip_lv
    else:
        block_index = np.arange(D + 1, dtype=np.float64) if closed else None
        # x_0 .. x_D (x_D: the last merge's sum): second moment, variance, squared mean,
        # each then turned into its log2 in place.
        skip_lq = _running_sum(q0, q_b, proj, proj_linear[0], block_index)
        skip_lv = _running_sum(q0 * e0, v_b, proj, proj_linear[1], block_index)
        skip_lm = _running_sum(m0, m_b, proj, proj_linear[2], block_index)
        skip_lq, skip_lv, skip_lm = _log2_inplace(skip_lq), _log2_inplace(skip_lv), _log2_inplace(skip_lm)
        lq_x, lv_x = (x[:-1] if np.ndim(x) else x for x in (skip_lq, skip_lv))

    def e_of():  # 1 - rho of x_0 .. x_{D-1}, for a layer that reads it
        if closed and (q_b == 0.0 or e_b == e0):  # the increments keep it constant
            return np.float64(e0)
        with np.errstate(invalid="ignore", over="ignore"):
            e = np.exp2(lv_x - lq_x)
        return np.where(np.isneginf(lq_x), 1.0, e)

    # Backward, as in _profile: gain_y_to_x[l], the log2 gain from the merge output y_l to x_l.
    g_pre, state = _gain_at_inputs(block.pre, lq_x, lv_x, e_of, idx)
    if state is None:
        g_branch = _gain_at_inputs(block.branch, lq_x, lv_x, e_of, idx)[0]
        g_proj = _gain_at_inputs(block.projection, lq_x, lv_x, e_of, idx)[0] if any_proj else 0.0
    else:
        g_branch = backward_gain(block.branch, *state, idx, NUMPY)
        g_proj = backward_gain(block.projection, *state, idx, NUMPY) if any_proj else 0.0
    # The identity shortcut: log2(1 + branch gain); block_index's memory is free now and
    # takes the share.
    if block_index is not None and np.ndim(g_pre) + np.ndim(g_branch) > 0:
        total_gain = np.add(g_pre, g_branch, out=block_index[:D])
        gain_y_to_x, share = _log2_1p_exp2(total_gain, out=total_gain)
    else:
        gain_y_to_x, share = _log2_1p_exp2(g_pre + g_branch)
    if any_proj:
        a_proj = g_pre + np.logaddexp2(g_branch, g_proj)
        with np.errstate(over="ignore", invalid="ignore"):
            share_proj = np.exp2(g_pre + g_branch - a_proj)
        gain_y_to_x = np.where(proj, a_proj, gain_y_to_x)
        share = np.where(proj, np.minimum(np.nan_to_num(share_proj, nan=0.0), 1.0), share)
    # log2_grad at x_l = sum_{k >= l} gain_y_to_x[k] (no post layers here); a projection block's skip
    # operand is a new tensor whose gradient is the merge output's: log2_grad at x_l minus gain_y_to_x[l].
    if np.ndim(gain_y_to_x) == 0:
        if gain_y_to_x == 0.0:
            log2_grad = np.broadcast_to(0.0, (D + 1,))
        else:
            log2_grad = np.arange(D, -1, -1, dtype=np.float64)
            log2_grad *= gain_y_to_x
    else:
        log2_grad = np.empty(D + 1)
        np.cumsum(gain_y_to_x[::-1], out=log2_grad[-2::-1])
        log2_grad[D] = 0.0
    if any_proj:
        with np.errstate(invalid="ignore"):  # inf - inf where a norm meets no variance
            log2_grad[:-1][proj] -= np.broadcast_to(gain_y_to_x, (D,))[proj]
        skip_p = _stats(lq_p, e_p)
        for full, part in zip((skip_lq, skip_lm, skip_lv),
                              (skip_p.log2_second_moment, skip_p.log2_squared_mean,
                               skip_p.log2_variance)):
            full[:-1][proj] = np.broadcast_to(part, (D,))[proj]
    nan = np.broadcast_to(np.nan, (D + 1,))
    branch = _stats(lq_b, e_b)
    branch = Stats(*(np.broadcast_to(x, (D,)) for x in (
        branch.log2_second_moment, branch.log2_squared_mean, branch.log2_variance)))
    skip = Stats(*(np.broadcast_to(x, (D + 1,)) if np.ndim(x) == 0 else x
                   for x in (skip_lq, skip_lm, skip_lv)))
    return skip, branch, Stats(log2_grad, nan, nan), np.broadcast_to(share, (D,))


def _block_inputs_scan(block, plan, lq0, e0):
    """General path: the block recursion, one block at a time, in (log2 q, 1 - rho).

    This loop is the only sequential part of ``predict``. It is compiled once per block
    structure from the layers' own scalar code (``Layer.scalar_code``): floats only, the
    ReLU kernel inlined, constants as local variables, no call per layer and no test for a
    projection where the plan has none (``make bench`` times it). :func:`predict_reference`
    is the same recursion written plainly, and the tests hold this one to it.
    """
    any_proj = bool(plan.projection.any())
    scan = _compile_scan(block, any_proj)
    lq_x, e_x = [0.0] * plan.depth, [0.0] * plan.depth
    scan(plan.depth, lq0, e0, plan.projection.tolist() if any_proj else None, lq_x, e_x)
    return np.array(lq_x), np.array(e_x)


_OMK_CALL = re.compile(r"omk\((\w+)\)")


_ADD_CONST = re.compile(r"^(\w+) = \1 \+ (\w+)$")


def _compile_scan(block, projections=True):
    consts = {"log2": math.log2, "sqrt": math.sqrt, "asin": math.asin, "MATH": MATH,
              "neg_inf": -math.inf}
    counter = [0]

    def inline(line):
        # "q = q + g" with g == 0.0 is dropped (it changes no value but the sign of a zero);
        # "e = omk(e) / c" becomes the kernel's statements into _o, then "e = _o / c".
        m = _ADD_CONST.match(line)
        if m is not None and consts.get(m.group(2)) == 0.0:
            return []
        m = _OMK_CALL.search(line)
        if m is None:
            return [line]
        return kernels.one_minus_kappa_scalar_code(m.group(1), "_o") + [
            line[:m.start()] + "_o" + line[m.end():]]

    def emit(layers, q, e, indent):
        lines = []
        for layer in layers:
            k = counter[0]
            counter[0] += 1
            code = layer.scalar_code()
            if code is None:
                consts[f"f{k}"] = layer.forward
                body = [f"{q}, {e} = f{k}({q}, {e}, l, MATH)"]
            else:
                consts.update({name.format(k=k): value for name, value in code[1].items()})
                body = [out for line in code[0] for out in inline(line.format(q=q, e=e, k=k))]
            lines += [indent + line for line in body]
        return lines

    skip_gain = 2.0 * math.log2(block.skip_gain) if block.skip_gain > 0 else -math.inf
    consts["lg_skip"] = skip_gain
    i2, i3 = " " * 8, " " * 12
    body = ["    for l in range(D):",
            "        lq_x[l] = xq = lq",
            "        e_x[l] = xe = e"]
    body += emit(block.pre, "lq", "e", i2)
    body += ["        lqb = lq", "        eb = e"]
    body += emit(block.branch, "lqb", "eb", i2)
    skip = [f"lq = xq{' + lg_skip' if skip_gain != 0.0 else ''}", "e = xe"]
    if projections:  # else the plan has none: no test per block
        body += ["        if proj[l]:"]
        body += emit(block.projection, "lq", "e", i3) or [i3 + "pass"]
        body += ["        else:"] + [i3 + line for line in skip]
    else:
        body += [i2 + line for line in skip]
    # merge, as _merge: second moments and variances of independent operands add
    body += ["        if lqb > lq:",
             "            lq, e, lqb, eb = lqb, eb, lq, e",
             "        if lq != neg_inf:",
             "            w = 2.0 ** (lqb - lq)",
             "            w1 = 1.0 + w",
             "            lq, e = lq + log2(w1), (e + w * eb) / w1"]
    body += emit(block.post, "lq", "e", i2)
    # Constants and functions as keyword defaults: local variables, not global look-ups.
    src = ["def scan(D, lq, e, proj, lq_x, e_x, *, " + ", ".join(f"{n}={n}" for n in consts)
           + "):"] + body
    namespace = dict(consts)
    exec(compile("\n".join(src), "<predict scan>", "exec"), namespace)
    return namespace["scan"]


def _run_with_gain(layers, lq, e, idx):
    """``run`` and ``backward_gain`` in one pass: (output state, summed log2 gain)."""
    total = 0.0
    for layer in layers:
        total = total + layer.backward(lq, e, idx, NUMPY)
        lq, e = layer.forward(lq, e, idx, NUMPY)
    return (lq, e), total


def _full(D, *arrays):
    """Broadcast per-block values (0-d where a chain was constant) to shape (D,)."""
    return tuple(np.broadcast_to(np.asarray(a, dtype=np.float64), (D,)) for a in arrays)


def _stats(lq, e):
    with np.errstate(divide="ignore", invalid="ignore"):
        return Stats(lq, lq + np.log2(np.maximum(1.0 - e, 0.0)), lq + np.log2(e))


def _profile(block, plan, lq_x, e_x):
    """Everything else, vectorised over blocks, from the block-input states."""
    D, proj = plan.depth, plan.projection
    any_proj = bool(proj.any())
    idx = np.arange(D)
    # Each chain once, forward states and backward gains together (run + backward_gain).
    (lq_p, e_p), g_pre = _run_with_gain(block.pre, lq_x, e_x, idx)
    (lq_b, e_b), g_branch = _run_with_gain(block.branch, lq_p, e_p, idx)
    lq_b, e_b = _full(D, lq_b, e_b)
    with np.errstate(divide="ignore"):
        lg_skip = 2.0 * np.log2(block.skip_gain)
    lq_s, e_s = lq_x + lg_skip, e_x
    if any_proj:  # the projection chain only where there are projections
        (lq_pr, e_pr), g_proj = _run_with_gain(block.projection, lq_p, e_p, idx)
        lq_s = np.where(proj, lq_pr, lq_s)
        e_s = np.where(proj, e_pr, e_s)
    lq_y, e_y = _merge(lq_s, e_s, lq_b, e_b)

    # Backward, in log2 squared-norm gains. a[l]: from the merge output y_l to the input x_l.
    if lg_skip == 0.0:
        a = _log2_1p_exp2(g_pre + g_branch)[0]  # np.logaddexp2(0, .), in a fifth of the time
    else:
        a = np.logaddexp2(lg_skip, g_pre + g_branch)
    if any_proj:
        a = np.where(proj, g_pre + np.logaddexp2(g_branch, g_proj), a)
    a = _full(D, a)[0]
    g_post = _full(D, backward_gain(block.post, lq_y, e_y, idx, NUMPY))[0]
    # log2 G at x_l = sum_{k >= l} a[k] + sum_{k >= l, k < D-1} g_post[k]  (G at y_{D-1} = 1).
    steps = a + np.concatenate((g_post[:-1], [0.0]))
    g_x = np.cumsum(steps[::-1])[::-1]
    with np.errstate(invalid="ignore"):  # inf - inf where a norm meets no variance
        g_y = g_x - a
    # The skip operand is the block input itself only for an identity shortcut with gain 1;
    # otherwise it is a new tensor whose gradient is the merge output's.
    g_skip = np.where(~proj & (block.skip_gain == 1.0), g_x, g_y)
    nan = np.broadcast_to(np.nan, (D + 1,))
    skip = _stats(np.append(lq_s, lq_y[-1]), np.append(e_s, e_y[-1]))
    branch = _stats(lq_b, e_b)
    grad = Stats(np.append(g_skip, 0.0), nan, nan)
    with np.errstate(over="ignore", invalid="ignore"):
        share = np.nan_to_num(np.exp2(g_pre + g_branch - a), nan=0.0)
    return skip, branch, grad, np.minimum(share, 1.0)
