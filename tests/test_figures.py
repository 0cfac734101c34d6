"""The figure scripts end to end (quick mode), and the plot functions on small profiles.

Each script runs as `make figures-quick` runs it (a subprocess of this interpreter), all four
at once into one temporary folder; the tests then read back what they wrote and check it
against an independent recomputation of the theory.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import propagation
from propagation import plot

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"F1": "f1_statistics.py", "F2": "f2_sqrt_depth.py",
           "F3": "f3_signal_propagation.py", "F4": "f4_gradients.py"}


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    procs = {fid: subprocess.Popen([sys.executable, str(ROOT / "figures" / name), "--quick",
                                    "--out", str(out)], cwd=ROOT, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for fid, name in SCRIPTS.items()}
    failed = {}
    for fid, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failed[fid] = stderr[-3000:]
    assert not failed, f"figure scripts failed: {failed}"
    return out


def load(out, fid):
    with open(out / f"{fid}.json") as f:
        return json.load(f)


def arr(values):
    # The scripts write inf/nan as strings (JSON has neither), as Profile.to_json does.
    return np.array([float(v) for v in values], dtype=np.float64)


def expected_theory(kwargs, part, quantity):
    """The plotted theory, recomputed from propagation.predict without propagation.plot."""
    p = propagation.predict(**kwargs)
    if part == "downscale":
        return p.downscale
    if part == "ratio":
        return 1.0 / p.downscale ** 2
    return getattr(getattr(p, part), quantity)


@pytest.mark.parametrize("fid", SCRIPTS)
def test_png_pdf_json_are_written(quick_out, fid):
    for ext in ("png", "pdf", "json"):
        path = quick_out / f"{fid}.{ext}"
        assert path.is_file() and path.stat().st_size > 0, path
    assert (quick_out / f"{fid}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (quick_out / f"{fid}.pdf").read_bytes()[:5] == b"%PDF-"


@pytest.mark.parametrize("fid", SCRIPTS)
def test_plotted_theory_is_predict(quick_out, fid):
    data = load(quick_out, fid)
    assert data["curves"]
    for c in data["curves"]:
        want = expected_theory(c["predict"], c["part"], c["quantity"])
        # JSON keeps a float's repr exactly; the ratio is 1/d^2 here and 2^(-2 log2 d) in
        # the script, equal to a few ulps, hence rtol 1e-12 rather than 0.
        np.testing.assert_allclose(arr(c["theory"]), want, rtol=1e-12, err_msg=c["label"])
        np.testing.assert_array_equal(arr(c["x"]), np.arange(len(want)))


@pytest.mark.parametrize("fid", SCRIPTS)
def test_measured_arrays_have_the_theory_shape_and_are_finite(quick_out, fid):
    for c in load(quick_out, fid)["curves"]:
        theory = arr(c["theory"])
        med, lo, hi = (arr(c[k]) for k in ("measured_median", "measured_low", "measured_high"))
        assert med.shape == lo.shape == hi.shape == theory.shape, c["label"]
        # Wherever the theory is a positive number the measurement must be one too; where the
        # theory is exactly 0 (SkipInit's alpha = 0 branch) or infinite (a zero branch's
        # downscale) the measurement may be 0 / inf as well.
        must = np.isfinite(theory) & (theory > 0)
        assert np.all(np.isfinite(med[must]) & (med[must] > 0)), c["label"]
        ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(med)
        assert np.all(lo[ok] <= med[ok] * (1 + 1e-12)), c["label"]
        assert np.all(med[ok] <= hi[ok] * (1 + 1e-12)), c["label"]


@pytest.mark.parametrize("fid", SCRIPTS)
def test_batchnorm_measurement_follows_its_theory(quick_out, fid):
    # A check that the figure pairs the right curves (not a test of the theory, which the
    # gate tests do): quick sizes are tiny (width 8 to 32, batch 8 to 32), where BatchNorm
    # networks were seen within 0.6 log2 of the theory; 1.5 leaves room for other seeds.
    curves = [c for c in load(quick_out, fid)["curves"] if c["scheme"] == "batchnorm"]
    assert curves
    for c in curves:
        assert c["worst_abs_log2_ratio"] is not None and c["worst_abs_log2_ratio"] < 1.5, c


@pytest.mark.parametrize("fid", SCRIPTS)
def test_caption_and_settings_say_what_was_run(quick_out, fid):
    data = load(quick_out, fid)
    s, caption = data["settings"], data["caption"]
    assert s["quick"] is True and s["seeds"] == 2
    assert caption.startswith(fid) and "Mode: quick" in caption
    for word in ("Network", "seeds", "train mode", "float32", "N(0, 1)"):
        assert word in caption, word
    assert f"batch of {s['batch']}" in caption
    assert f"{s['seeds']} seeds" in caption
    if fid in ("F1", "F3"):
        assert f"base width {s['width']}" in caption
        assert f"stages {tuple(s['stages'])}" in caption
        assert f"3x{s['image']}x{s['image']}" in caption
        for c in data["curves"]:
            assert c["predict"]["stages"] == s["stages"]
            state = data["input_state"][c["scheme"]]
            assert c["predict"]["input_second_moment"] == state["input_second_moment"]
    else:
        assert f"{s['depth']} blocks of two {s['width']}x{s['width']}" in caption
        assert {c["predict"]["depth"] for c in data["curves"]} == {s["depth"]}
        # Every scheme with a reference network is in the MLP figures.
        assert {c["scheme"] for c in data["curves"]} == set(propagation.nets.supported_schemes())


# --- the plot functions -------------------------------------------------------------------------

class Block(nn.Module):
    """A BN-ReLU-Linear residual block written here, not taken from propagation.nets."""

    def __init__(self, width):
        super().__init__()
        self.n1, self.n2 = nn.BatchNorm1d(width), nn.BatchNorm1d(width)
        self.l1 = nn.Linear(width, width, bias=False)
        self.l2 = nn.Linear(width, width, bias=False)
        for layer in (self.l1, self.l2):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")

    def forward(self, x):
        return x + self.l2(torch.relu(self.n2(self.l1(torch.relu(self.n1(x))))))


DEPTH = 12


@pytest.fixture(scope="module")
def measured():
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(nn.Sequential(*[Block(32) for _ in range(DEPTH)]))
    return propagation.measure(models, lambda i: torch.randn(
        32, 32, generator=torch.Generator().manual_seed(i)), seeds=3, progress=False)


@pytest.fixture(scope="module")
def theory():
    return propagation.predict(DEPTH, "batchnorm")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


def points(ax):
    """x and y of the measured markers drawn on ax (one errorbar container)."""
    (container,) = ax.containers
    line = container.lines[0]
    return np.asarray(line.get_xdata()), np.asarray(line.get_ydata())


@pytest.mark.parametrize("part,n", [("skip", DEPTH + 1), ("branch", DEPTH), ("grad", DEPTH + 1)])
def test_plot_profile_draws_one_line_and_one_point_per_block(measured, theory, part, n):
    ax = plot.plot_profile(measured, theory, part=part, label="bn")
    theory_lines = [l for l in ax.lines if l.get_label() == "bn"]
    assert len(theory_lines) == 1 and len(theory_lines[0].get_xdata()) == n
    x, y = points(ax)
    np.testing.assert_array_equal(x, np.arange(n))
    np.testing.assert_allclose(y, plot.values(measured, part)[1])
    # Bars span the seed extremes: the error bar collection has one segment per point.
    assert len(ax.containers[0].lines[2][0].get_segments()) == n
    assert ax.get_yscale() == "log"


def test_plot_profile_with_only_theory_or_only_measurement(measured, theory):
    ax = plot.plot_profile(theory=theory, quantity="variance")
    assert len(ax.lines) == 1 and not ax.containers
    ax = plot.plot_profile(measured, quantity="squared_mean", logy=False)
    assert len(ax.containers) == 1 and ax.get_yscale() == "linear"


def test_plot_profile_subsamples_long_profiles(theory):
    long_theory = propagation.predict(500, "batchnorm")
    ax = plot.plot_profile(long_theory, long_theory, max_points=50)
    x, _ = points(ax)
    assert len(x) <= 50 and x[0] == 0 and x[-1] == 500


def test_plot_downscale_is_log_log_from_block_one(measured, theory):
    ax = plot.plot_downscale(measured, theory)
    assert ax.get_xscale() == ax.get_yscale() == "log"
    (line,) = ax.lines[:1]
    np.testing.assert_array_equal(line.get_xdata(), np.arange(1, DEPTH + 1))
    np.testing.assert_allclose(line.get_ydata(), np.sqrt(1.0 + np.arange(DEPTH)))
    ax = plot.plot_downscale(theory=theory, inverse=True)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), 1.0 / (1.0 + np.arange(DEPTH)))


def test_values_beyond_log_axes_are_drawn_as_log2():
    # 2^1000 and 2^5000 break matplotlib's log axes (and the second is not a float64).
    for depth in (1000, 5000):
        ax = plot.plot_grad(theory=propagation.predict(depth, "none"))
        assert ax.get_yscale() == "linear" and ax.get_ylabel().startswith("log2 ")
        np.testing.assert_allclose(ax.lines[0].get_ydata()[[0, -1]], [depth, 0.0], atol=1e-9)
        ax.figure.canvas.draw()
    ax = plot.plot_grad(theory=propagation.predict(10, "none"))
    assert ax.get_yscale() == "log"


def test_zero_branch_is_not_drawn_on_log_axes():
    ax = plot.plot_downscale(theory=propagation.predict(8, "skipinit"))  # alpha = 0
    assert len(ax.lines[0].get_xdata()) == 0


def test_plot_grad_draws_the_gradient(measured, theory):
    ax = plot.plot_grad(measured, theory)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), theory.grad.second_moment)
    x, y = points(ax)
    assert len(x) == DEPTH + 1 and y[-1] == pytest.approx(1.0)


def test_signal_propagation_plot_has_three_panels(measured, theory):
    other = propagation.predict(DEPTH, "relu_bn_conv")
    fig, axes = plot.signal_propagation_plot([measured, None], [theory, other],
                                             labels=["BN-ReLU", "ReLU-BN"])
    assert len(axes) == 3 and all(ax.figure is fig for ax in axes)
    for ax in axes:
        assert [l.get_label() for l in ax.lines if not l.get_label().startswith("_")] == \
            ["BN-ReLU", "ReLU-BN"]
        assert len(ax.containers) == 1  # only the first network was measured
    assert axes[0].get_legend() is not None


def test_values_and_spread(measured):
    x, y = plot.values(measured, "branch", "variance")
    assert x.shape == y.shape == (DEPTH,)
    lo, hi = plot.spread(measured, "branch", "variance")
    assert np.all(lo <= y) and np.all(y <= hi)
    q_lo, q_hi = plot.spread(measured, "branch", "variance", how=(0.1, 0.9))
    assert np.all(lo <= q_lo * (1 + 1e-12)) and np.all(q_hi <= hi * (1 + 1e-12))
    assert plot.spread(measured.samples[0]) is None


def test_every_scheme_has_its_own_style():
    styles = [plot.scheme_style(name) for name in propagation.schemes()]
    keys = {(tuple(s["color"]), s["marker"]) for s in styles}
    assert len(keys) == len(styles)


def test_bad_arguments_name_the_problem(measured, theory):
    with pytest.raises(ValueError, match="did you mean 'branch'"):
        plot.plot_profile(measured, theory, part="brnch")
    with pytest.raises(ValueError, match="did you mean 'variance'"):
        plot.values(theory, "skip", "varaince")
    with pytest.raises(ValueError, match="different depths"):
        plot.plot_profile(measured, propagation.predict(DEPTH + 1, "batchnorm"))
    with pytest.raises(ValueError, match="neither"):
        plot.plot_profile()
    with pytest.raises(TypeError, match="Profile"):
        plot.plot_grad(np.ones(3))
    with pytest.raises(ValueError, match="pair of quantiles"):
        plot.spread(measured, how="iqr9")
    with pytest.raises(ValueError, match="quantiles 0 <= q_low"):
        plot.spread(measured, how=(0.9, 0.1))


def test_import_propagation_does_not_import_matplotlib():
    code = ("import sys, propagation, propagation.plot; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- F6: transformers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def f6_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("f6")
    proc = subprocess.run([sys.executable, str(ROOT / "figures" / "f6_transformers.py"), "--quick",
                           "--out", str(out)], cwd=ROOT, env={**os.environ, "MPLBACKEND": "Agg"},
                          text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow  # the quick F6 script: ~20 s
def test_f6_writes_its_files_and_draws_predict(f6_out):
    for ext in ("png", "pdf", "json"):
        assert (f6_out / f"F6.{ext}").stat().st_size > 0
    data = load(f6_out, "F6")
    from propagation.sequence import SEQ_SCHEMES
    drawn = {c["scheme"] for c in data["curves"] if not c.get("theory_only")}
    assert drawn == set(SEQ_SCHEMES)  # every transformer scheme is in F6
    for c in data["curves"]:
        p = propagation.predict(**c["predict"])
        if c["quantity"] == "token_correlation":
            want = getattr(p.tokens, c["part"])
        else:
            want = expected_theory(c["predict"], c["part"], c["quantity"])
        np.testing.assert_allclose(arr(c["theory"]), want, rtol=1e-12, err_msg=c["label"])
    assert data["caption"].startswith("F6") and "Mode: quick" in data["caption"]


@pytest.mark.slow
def test_f6_measurement_follows_the_token_theory(f6_out):
    # A check that the figure pairs the right curves: quick sizes are width 64, 2 seeds, where
    # one network's token correlation spreads by up to sqrt(2/64) ~ 0.18 (comparison.
    # token_sigma); the median of 2 seeds was within 0.09 of theory. 0.25 allows other seeds.
    for c in load(f6_out, "F6")["curves"]:
        if c["quantity"] == "token_correlation":
            assert c["worst_abs_difference"] is not None and c["worst_abs_difference"] < 0.25, c
