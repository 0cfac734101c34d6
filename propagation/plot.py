"""Plots of :class:`~propagation.Profile` objects: theory as lines, measurement as points.

Every function takes a measured profile, a theory profile or both (``measure`` and
``predict`` return the same type), draws one quantity per block, and returns what it drew
on, so a user can put their own model beside the theory in two lines::

    ax = propagation.plot.plot_profile(propagation.measure(model, x, seeds=3),
                                       propagation.predict(**model.theory))

Measured points are the median over seeds; their bars span the seed spread (min to max over
``samples`` by default, or a pair of quantiles). matplotlib is imported on first use, with
the Agg backend when there is no display, so ``import propagation`` never loads it.
"""
import os
import sys
import warnings

import numpy as np

from . import _checks
from .profile import QUANTITIES, Profile

#: What can be drawn per block: the three Stats families, the downscale factor
#: sqrt(q_skip / q_branch) and its inverse square q_branch / q_skip ("ratio").
PARTS = ("skip", "branch", "grad", "downscale", "ratio")

_LABELS = {
    ("skip", "second_moment"): "skip-path second moment",
    ("skip", "squared_mean"): "skip-path avg. channel squared mean",
    ("skip", "variance"): "skip-path avg. channel variance",
    ("branch", "second_moment"): "residual-branch second moment",
    ("branch", "squared_mean"): "residual-branch avg. channel squared mean",
    ("branch", "variance"): "residual-branch avg. channel variance",
    ("grad", "second_moment"): "gradient second moment (rel. to output)",
    ("grad", "squared_mean"): "gradient avg. channel squared mean",
    ("grad", "variance"): "gradient avg. channel variance",
    ("downscale", None): "downscale sqrt(q_skip / q_branch)",
    ("ratio", None): "q_branch / q_skip",
}


# --- data -------------------------------------------------------------------------------------

def _check(profile, name):
    if profile is not None and not isinstance(profile, Profile):
        raise TypeError(f"{name} must be a propagation.Profile (from measure or predict) or None, "
                        f"got {type(profile).__name__}")
    return profile


def _log2(profile, part, quantity):
    if part == "downscale":
        return np.asarray(profile.log2_downscale, dtype=np.float64)
    if part == "ratio":
        return -2.0 * np.asarray(profile.log2_downscale, dtype=np.float64)
    return np.asarray(getattr(getattr(profile, part), f"log2_{quantity}"), dtype=np.float64)


def _exp2(log2_values):
    with np.errstate(over="ignore"):
        return np.exp2(log2_values)


def _check_part(part, quantity):
    _checks.choice("part", part, PARTS)
    if part not in ("downscale", "ratio"):
        _checks.choice("quantity", quantity, QUANTITIES)


def values(profile, part="skip", quantity="second_moment"):
    """The per-block values of one quantity of a profile, as drawn.

    Args:
        profile: a :class:`Profile` (theory or measurement; for a measurement over several
            seeds this is the median over seeds).
        part: "skip" (x_0 .. x_D, shape (D + 1,)), "branch" (f_0 .. f_{D-1}, (D,)), "grad"
            ((D + 1,), relative to the last merge), "downscale" (sqrt(q_skip / q_branch),
            (D,)) or "ratio" (q_branch / q_skip, (D,)).
        quantity: "second_moment", "squared_mean" or "variance" (ignored for downscale/ratio).

    Returns:
        (positions, values): float64 arrays of the same shape; positions are block indices
        0, 1, ... (for "skip" and "grad" the last one, D, is the network's output). Values
        are linear (``inf`` where float64 overflows, 0 where a quantity is exactly zero, NaN
        where it is not available).
    """
    _check(profile, "profile")
    _check_part(part, quantity)
    log2 = _log2(profile, part, quantity)
    return np.arange(len(log2), dtype=np.float64), _exp2(log2)


def spread(profile, part="skip", quantity="second_moment", how="minmax"):
    """The seed spread of a measured quantity: (low, high) arrays, or None without samples.

    Args:
        profile: a measured :class:`Profile` with ``samples`` (``measure(..., seeds=n)``).
        part, quantity: as :func:`values`.
        how: "minmax" (the extremes over seeds) or a pair of quantiles ``(q_low, q_high)``
            in [0, 1], e.g. (0.1, 0.9) (``Profile.quantile``).

    Returns:
        (low, high), linear float64 arrays shaped like :func:`values`' output, or None when
        the profile has no samples (a single seed, or theory).
    """
    bars = _log2_spread(profile, part, quantity, how)
    return None if bars is None else (_exp2(bars[0]), _exp2(bars[1]))


def _log2_spread(profile, part, quantity, how):
    _check(profile, "profile")
    _check_part(part, quantity)
    if isinstance(how, str):
        if how != "minmax":
            raise ValueError(f"how must be 'minmax' or a pair of quantiles such as (0.1, 0.9), "
                             f"got {how!r}")
    else:
        try:
            q_lo, q_hi = (float(q) for q in how)
        except (TypeError, ValueError):
            raise TypeError(f"how must be 'minmax' or a pair of quantiles such as (0.1, 0.9), "
                            f"got {how!r}") from None
        if not 0.0 <= q_lo <= q_hi <= 1.0:
            raise ValueError(f"how must be quantiles 0 <= q_low <= q_high <= 1, got {how!r}")
    if not profile.samples:
        return None
    if isinstance(how, str):
        stack = np.stack([_log2(s, part, quantity) for s in profile.samples])
        # NaN is "not available" and is skipped; -inf (an exact zero) and inf are values.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)
    return (_log2(profile.quantile(q_lo), part, quantity),
            _log2(profile.quantile(q_hi), part, quantity))


def describe(part="skip", quantity="second_moment"):
    """A short axis label for a part and quantity (the names used in code and docs)."""
    _check_part(part, quantity)
    return _LABELS[(part, None if part in ("downscale", "ratio") else quantity)]


# --- matplotlib -------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    headless = (sys.platform.startswith("linux") and not os.environ.get("DISPLAY")
                and not os.environ.get("WAYLAND_DISPLAY"))
    # Only when nobody chose a backend yet: never switch one a user (or pyplot) already set.
    if headless and "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def subplots(nrows=1, ncols=1, **kwargs):
    """``matplotlib.pyplot.subplots`` with the Agg backend when there is no display.

    Args: nrows, ncols and keyword arguments of ``plt.subplots`` (``constrained_layout``
    defaults to True). Returns: (fig, axes), as ``plt.subplots``.
    """
    kwargs.setdefault("constrained_layout", True)
    return _pyplot().subplots(nrows, ncols, **kwargs)


def _axes(ax):
    if ax is None:
        _, ax = subplots(figsize=(5, 3.5))
    return ax


def scheme_color(scheme):
    """A fixed colour per registered scheme (its place in the registry), so figures agree.

    Args: scheme: a scheme name (see :func:`propagation.schemes`); unknown names get grey.
    Returns: a matplotlib colour (an RGBA tuple).
    """
    plt = _pyplot()
    names = _scheme_names(scheme)
    if scheme not in names:
        return (0.4, 0.4, 0.4, 1.0)
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return cmap(names.index(scheme) % cmap.N)


def _scheme_names(scheme):
    """The list a scheme's colour and style are indexed in: the registered schemes, or the
    transformer schemes (propagation.sequence), which are drawn apart from them."""
    from .schemes import schemes
    from .sequence import SEQ_SCHEMES
    registered = list(schemes())
    return list(SEQ_SCHEMES) if scheme not in registered and scheme in SEQ_SCHEMES else registered


#: |log2 value| beyond which plot_profile draws log2 values on a linear axis: matplotlib's
#: log axes compute 10^(limit + margin) and overflow float64 near 1e308 = 2^1023.
LOG_AXIS_LIMIT = 600.0

_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p")
_LINESTYLES = ("-", "--", "-.", ":")


def scheme_style(scheme):
    """Colour, marker and line style of a scheme, fixed by its place in the registry.

    Schemes whose laws coincide (e.g. batchnorm and layernorm, both q_l = q_0 + l) then stay
    distinguishable when drawn on one Axes.

    Args: scheme: a scheme name. Returns: ``{"color", "marker", "linestyle"}``, keyword
    arguments for :func:`plot_profile`, :func:`plot_downscale` and :func:`plot_grad`.
    """
    names = _scheme_names(scheme)
    i = names.index(scheme) if scheme in names else 0
    return {"color": scheme_color(scheme), "marker": _MARKERS[i % len(_MARKERS)],
            "linestyle": _LINESTYLES[i % len(_LINESTYLES)]}


def legend_handle(color=None, marker="o", linestyle="-", label=None):
    """A legend entry showing both the theory line and the measured marker of one curve."""
    from matplotlib.lines import Line2D
    return Line2D([], [], color=color, marker=marker, linestyle=linestyle, ms=4, label=label)


def _subsample(n, max_points, logx):
    """Indices of at most ``max_points`` of n positions, evenly spread on the drawn x axis."""
    if max_points is None or n <= max_points:
        return np.arange(n)
    if logx:
        idx = np.unique(np.round(np.geomspace(1, n, max_points)).astype(int) - 1)
    else:
        idx = np.unique(np.round(np.linspace(0, n - 1, max_points)).astype(int))
    return idx


def _drawable(y, log):
    ok = np.isfinite(y)
    return ok & (y > 0) if log else ok


def plot_profile(measured=None, theory=None, part="skip", quantity="second_moment", ax=None,
                 label=None, color=None, how="minmax", logx=False, logy=True, offset=0,
                 max_points=80, marker="o", linestyle="-", log2=None):
    """Draw one quantity per block: theory as a line, measurement as points with seed spread.

    Args:
        measured: a Profile from :func:`propagation.measure` (median over seeds; bars from
            ``samples`` when there are several seeds), or None.
        theory: a Profile from :func:`propagation.predict`, or None. With both, their depths
            must agree.
        part, quantity: what to draw (see :func:`values`): part "skip", "branch", "grad",
            "downscale" or "ratio"; quantity "second_moment", "squared_mean" or "variance".
        ax: a matplotlib Axes to draw on (default: a new figure).
        label: legend label of the curve (given to the theory line, or to the points when
            there is no theory).
        color: matplotlib colour of both line and points (default: the scheme's colour when
            the theory names a scheme, else the next colour of the axes' cycle).
        how: the spread drawn as bars: "minmax" over seeds or quantiles (q_low, q_high).
        logx, logy: log axes (non-positive and non-finite values are not drawn on them).
        offset: added to the block index on the x axis (1 puts the first block at 1, for
            log x axes).
        max_points: at most this many measured points are drawn, evenly spread along the
            x axis (all values stay in ``values``); None draws all.
        marker, linestyle: matplotlib marker of the measured points and line style of the
            theory (to tell apart schemes whose curves coincide).
        log2: draw log2 of the values on a linear y axis. Default (None): only when
            ``logy`` and some value is beyond 2^LOG_AXIS_LIMIT, where matplotlib's log axes
            overflow (``predict(1000, "none")`` reaches 2^1000; ``predict(5000, "none")``
            is not even a float64).

    Returns:
        The Axes. The theory is one Line2D; the measurement is one errorbar container
        (``ax.containers``), whose marker line holds the drawn points. A theory predicted
        at a finite width (``predict(..., width=n)``) also draws its predicted median
        (dotted) and 90% band (shaded) where it holds.
    """
    _check(measured, "measured")
    _check(theory, "theory")
    _check_part(part, quantity)
    if measured is None and theory is None:
        raise ValueError("plot_profile needs a measured profile, a theory profile or both; "
                         "got neither")
    if measured is not None and theory is not None and measured.depth != theory.depth:
        raise ValueError(f"measured and theory have different depths ({measured.depth} and "
                         f"{theory.depth} blocks); predict with the model's settings "
                         f"(propagation.predict(**model.theory)) or the same depth")
    ax = _axes(ax)
    t_l2 = None if theory is None else _log2(theory, part, quantity)
    m_l2 = None if measured is None else _log2(measured, part, quantity)
    bars = None if measured is None else _log2_spread(measured, part, quantity, how)
    if log2 is None:
        finite = [a[np.isfinite(a)] for a in (t_l2, m_l2) + tuple(bars or ()) if a is not None]
        peak = max((np.max(np.abs(a)) for a in finite if a.size), default=0.0)
        log2 = logy and peak > LOG_AXIS_LIMIT
    # In log2 mode the values are drawn as log2 on a linear axis (exact beyond float64).
    to_y = (lambda a: a) if log2 else _exp2
    ylog = logy and not log2
    if logx:
        ax.set_xscale("log")
    if ylog:
        ax.set_yscale("log")
    if color is None:
        scheme = (theory or measured).scheme
        color = scheme_color(scheme) if scheme else None
    if theory is not None:
        x, y = np.arange(len(t_l2), dtype=np.float64), to_y(t_l2)
        ok = _drawable(y, ylog) & _drawable(x + offset, logx)
        (line,) = ax.plot(x[ok] + offset, y[ok], linestyle=linestyle, color=color, lw=1.5,
                          label=label)
        color = line.get_color()
        if getattr(theory, "spread", None) is not None and part in ("skip", "branch", "grad"):
            _draw_spread(ax, theory, part, quantity, to_y, ylog, logx, offset, color)
    if measured is not None:
        x, y = np.arange(len(m_l2), dtype=np.float64), to_y(m_l2)
        ok = _drawable(y, ylog) & _drawable(x + offset, logx)
        idx = _subsample(len(y), max_points, logx)
        idx = idx[ok[idx]]
        yerr = None
        if bars is not None:
            lo, hi = to_y(bars[0]), to_y(bars[1])
            lo = np.where(_drawable(lo, ylog), lo, y)
            hi = np.where(_drawable(hi, ylog), hi, y)
            with np.errstate(invalid="ignore"):  # inf - inf where a value overflowed
                yerr = np.vstack((np.maximum(y - lo, 0.0), np.maximum(hi - y, 0.0)))[:, idx]
        ax.errorbar(x[idx] + offset, y[idx], yerr=yerr, fmt=marker, ms=3.5, color=color,
                    elinewidth=0.8, capsize=0, alpha=0.85,
                    label=label if theory is None else None)
    # Labels only where none is set: several parts often share one Axes.
    if not ax.get_xlabel():
        ax.set_xlabel("residual block" + (" (1 = first)" if offset == 1 else ""))
    if not ax.get_ylabel():
        ax.set_ylabel(("log2 " if log2 else "") + describe(part, quantity))
    return ax


def _draw_spread(ax, theory, part, quantity, to_y, ylog, logx, offset, color):
    """A finite-width theory's predicted median (dotted) and 90% band (shaded), where the
    theory marks itself valid (``theory.spread``)."""
    valid = np.asarray(getattr(theory.spread, f"valid_{part}"), dtype=bool)
    lo, med, hi = (to_y(_log2(theory.quantile(q), part, quantity)) for q in (0.05, 0.5, 0.95))
    x = np.arange(len(med), dtype=np.float64) + offset
    ok = valid & _drawable(lo, ylog) & _drawable(hi, ylog) & _drawable(x, logx)
    if not ok.any():
        return
    ax.fill_between(x, np.where(ok, lo, np.nan), np.where(ok, hi, np.nan), color=color,
                    alpha=0.18, lw=0)
    ax.plot(x[ok], med[ok], linestyle=":", color=color, lw=1.0)


def plot_downscale(measured=None, theory=None, ax=None, label=None, color=None, inverse=False,
                   how="minmax", logx=True, logy=True, max_points=40, marker="o", linestyle="-",
                   log2=None):
    """Draw the downscale factor sqrt(q_skip / q_branch) of every residual branch.

    The De & Smith law: with BatchNorm it grows like sqrt(block index); unnormalised He
    blocks keep it at 1. Blocks are numbered from 1 on the x axis, so log-log axes show a
    power law as a straight line.

    Args:
        measured, theory: Profiles (either may be None), as :func:`plot_profile`.
        ax, label, color, how, max_points, marker, linestyle, log2: as :func:`plot_profile`.
        inverse: draw q_branch / q_skip (= 1 / downscale^2) instead.
        logx, logy: log axes (default log-log).

    Returns: the Axes. Blocks whose branch is exactly zero (SkipInit with alpha = 0,
    Fixup) have an infinite downscale and are not drawn.
    """
    return plot_profile(measured, theory, part="ratio" if inverse else "downscale", ax=ax,
                        label=label, color=color, how=how, logx=logx, logy=logy, offset=1,
                        max_points=max_points, marker=marker, linestyle=linestyle, log2=log2)


def plot_grad(measured=None, theory=None, ax=None, label=None, color=None, how="minmax",
              logx=False, logy=True, max_points=80, marker="o", linestyle="-", log2=None):
    """Draw the gradient second moment at every skip-path tensor under a random read-out.

    Values are relative to the gradient at the network's output (1 at the last position):
    ``grad.second_moment`` of :func:`propagation.predict` and :func:`propagation.measure`.

    Args: as :func:`plot_profile` (the part is "grad", the quantity "second_moment").
    Returns: the Axes.
    """
    return plot_profile(measured, theory, part="grad", quantity="second_moment", ax=ax,
                        label=label, color=color, how=how, logx=logx, logy=logy,
                        max_points=max_points, marker=marker, linestyle=linestyle, log2=log2)


def plot_tokens(measured=None, theory=None, part="skip", ax=None, label=None, color=None,
                max_points=80, marker="o", linestyle="-", offset=0):
    """Draw the token correlation (mean cosine between two tokens of one sequence) per
    merge: theory as a line, the measured median as points with the min-max over seeds.

    Args:
        measured, theory: Profiles of a sequence model (``tokens`` set), either may be None.
        part: "skip" (the residual stream at each merge, then the last sum) or "branch".
        ax, label, color, max_points, marker, linestyle, offset: as :func:`plot_profile`.
    Returns: the Axes (linear y axis from 0 to 1: 1 is rank collapse).
    """
    _check(measured, "measured")
    _check(theory, "theory")
    _checks.choice("part", part, ("skip", "branch"))
    for name, p in (("measured", measured), ("theory", theory)):
        if p is not None and p.tokens is None:
            raise ValueError(f"{name} has no token correlations (Profile.tokens is None): "
                             f"measure a sequence model with channel_axis=-1, or predict a "
                             f"transformer scheme")
    if measured is None and theory is None:
        raise ValueError("plot_tokens needs a measured profile, a theory profile or both")
    ax = _axes(ax)
    if color is None:
        scheme = (theory or measured).scheme
        color = scheme_color(scheme) if scheme else None
    if theory is not None:
        y = getattr(theory.tokens, part)
        x = np.arange(len(y), dtype=np.float64) + offset
        (line,) = ax.plot(x, y, linestyle=linestyle, color=color, lw=1.5, label=label)
        color = line.get_color()
    if measured is not None:
        y = getattr(measured.tokens, part)
        x = np.arange(len(y), dtype=np.float64) + offset
        idx = _subsample(len(y), max_points, False)
        idx = idx[np.isfinite(y[idx])]
        yerr = None
        samples = [s.tokens for s in measured.samples if s.tokens is not None]
        if samples:
            stack = np.stack([getattr(t, part) for t in samples])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                lo, hi = np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)
            yerr = np.vstack((np.maximum(y - lo, 0.0), np.maximum(hi - y, 0.0)))[:, idx]
        ax.errorbar(x[idx], y[idx], yerr=yerr, fmt=marker, ms=3.5, color=color,
                    elinewidth=0.8, capsize=0, alpha=0.85,
                    label=label if theory is None else None)
    ax.set_ylim(-0.05, 1.05)
    if not ax.get_xlabel():
        ax.set_xlabel("residual merge")
    if not ax.get_ylabel():
        ax.set_ylabel("token correlation (mean cosine)")
    return ax


def plot_training(profiles, part="skip", quantity="second_moment", ax=None, cmap="viridis"):
    """A statistic against training step, one line per block, coloured by depth.

    Args:
        profiles: {step: Profile} (``Monitor.profiles``, or ``propagation.monitoring.read_log(path)``).
        part, quantity: as :func:`values`.
        ax: matplotlib axes (default: a new figure).
        cmap: the colormap from the first block to the last.
    Returns: the axes.
    """
    if not isinstance(profiles, dict) or not profiles:
        raise ValueError("profiles must be a non-empty {step: Profile} dict (Monitor.profiles)")
    _check_part(part, quantity)
    steps = sorted(profiles)
    for s in steps:
        _check(profiles[s], f"profiles[{s}]")
    rows = [_log2(profiles[s], part, quantity) for s in steps]
    width = min(len(r) for r in rows)
    y = _exp2(np.array([r[:width] for r in rows]))
    ax = _axes(ax)
    colours = _pyplot().get_cmap(cmap)
    for block in range(width):
        ax.plot(steps, y[:, block], color=colours(block / max(width - 1, 1)), lw=1,
                marker="o" if len(steps) < 20 else None, ms=3)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(describe(part, quantity))
    sm = _pyplot().cm.ScalarMappable(cmap=colours,
                                     norm=_pyplot().Normalize(0, max(width - 1, 1)))
    ax.figure.colorbar(sm, ax=ax, label="block")
    return ax


def mark_projections(ax, profile, **line_kw):
    """Dotted vertical lines at the blocks with a projection shortcut (stage starts).

    Args: ax: the Axes; profile: a Profile (its ``projection`` flags); line_kw: passed to
    ``ax.axvline``. Returns: the list of lines drawn.
    """
    _check(profile, "profile")
    kw = {"color": "0.6", "lw": 0.7, "ls": ":", "zorder": 0, **line_kw}
    return [ax.axvline(float(l), **kw) for l in np.flatnonzero(profile.projection)]


_SPP_PANELS = (("skip", "squared_mean", "avg. channel squared mean"),
               ("skip", "variance", "avg. channel variance"),
               ("branch", "variance", "residual-branch avg. channel variance"))


def _as_list(profiles, name):
    if profiles is None:
        return None
    if isinstance(profiles, Profile):
        return [profiles]
    profiles = list(profiles)
    for i, p in enumerate(profiles):
        if p is not None:
            _check(p, f"{name}[{i}]")
    return profiles


def signal_propagation_plot(measured=None, theory=None, labels=None, axes=None, colors=None,
                            how="minmax", logy=False, max_points=80, legend=True):
    """A signal propagation plot in the style of Brock, De & Smith (2021).

    Three panels per network, against the block index: the average channel squared mean of
    the skip path, the average channel variance of the skip path, and the average channel
    variance of each residual branch.

    Args:
        measured: a Profile or a list of Profiles (one per network; entries may be None).
        theory: a Profile or a list of the same length as ``measured`` (entries may be None).
        labels: one legend label per network (default: the theory's scheme name).
        axes: three matplotlib Axes to draw on (default: a new 1 x 3 figure).
        colors: one colour per network (default: the scheme colours).
        how: seed spread of the measured points ("minmax" or quantiles).
        logy: log y axes (default linear, as in Brock et al.; a zero squared mean is then
            drawn at 0).
        max_points: as :func:`plot_profile`.
        legend: put a legend of the networks on the first panel.

    Returns:
        (fig, axes): the Figure and the three Axes.
    """
    measured = _as_list(measured, "measured")
    theory = _as_list(theory, "theory")
    if measured is None and theory is None:
        raise ValueError("signal_propagation_plot needs measured profiles, theory profiles or "
                         "both; got neither")
    n = len(measured if measured is not None else theory)
    measured = measured if measured is not None else [None] * n
    theory = theory if theory is not None else [None] * n
    if len(measured) != len(theory):
        raise ValueError(f"measured and theory must list the same networks, got {len(measured)} "
                         f"and {len(theory)} profiles")
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels must have one entry per network ({n}), got {len(labels)}")
    if colors is not None and len(colors) != n:
        raise ValueError(f"colors must have one entry per network ({n}), got {len(colors)}")
    if axes is None:
        fig, axes = subplots(1, 3, figsize=(13, 3.8))
    else:
        axes = list(axes)
        if len(axes) != 3:
            raise ValueError(f"axes must be three Axes (squared mean, variance, branch "
                             f"variance), got {len(axes)}")
        fig = axes[0].figure
    for i, (m, t) in enumerate(zip(measured, theory)):
        if m is None and t is None:
            continue
        scheme = (t or m).scheme
        label = labels[i] if labels is not None else scheme
        color = colors[i] if colors is not None else None
        for ax, (part, quantity, _) in zip(axes, _SPP_PANELS):
            plot_profile(m, t, part, quantity, ax=ax, label=label, color=color, how=how,
                         logy=logy, max_points=max_points)
    for ax, (_, _, title) in zip(axes, _SPP_PANELS):
        ax.set_title(title)
        ax.set_ylabel(title)
    if legend and axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="small")
    return fig, axes
