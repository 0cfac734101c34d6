"""The training experiments' machinery: data, networks, the loop, divergence, the cache,
torchrun data parallelism, and the T1/F5/T2 scripts in quick mode.

Every run here is tiny (a 10-layer net of width 4 on the 8x8 digits, a second or two).
"""
import json
import math
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from propagation import data as pdata
from propagation import nets, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(depth=10, width=4, batch_size=32, epochs=2.0)


@pytest.fixture(scope="module")
def digits():
    return pdata.load("digits")


# --- data -------------------------------------------------------------------------------------

def test_digits_split_is_stratified_standardised_and_fixed(digits):
    again = pdata.load("digits")
    assert digits.shape == (1, 8, 8) and digits.classes == 10
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert torch.equal(digits.x_test, again.x_test)  # the split and scaling are fixed
    # Stratified 80/20: every class has round(0.2 n_c) test images.
    counts = np.bincount(digits.y_test.numpy(), minlength=10)
    totals = counts + np.bincount(digits.y_train.numpy(), minlength=10)
    assert np.array_equal(counts, np.round(0.2 * totals).astype(int))
    # Standardised with the training set's own statistics: mean 0, std 1 up to float32
    # rounding of ~1e5 values (relative 2^-24 * sqrt(1e5) ~ 2e-5; 1e-4 leaves a margin).
    assert abs(digits.x_train.mean().item()) < 1e-4
    assert abs(digits.x_train.std(unbiased=False).item() - 1.0) < 1e-4


def _fake_cifar(folder, n_per_batch=6):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n_per_batch).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def test_cifar10_loader_reads_the_python_version_from_a_local_folder(tmp_path):
    folder = _fake_cifar(tmp_path / "cifar-10-batches-py")
    for root in (folder, tmp_path):  # the folder itself, or the one holding it
        d = pdata.load("cifar10", root)
        assert d.shape == (3, 32, 32) and len(d.y_train) == 30 and len(d.y_test) == 6
    with open(folder / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    # Row-major 3072 bytes = 3 planes of 32x32: image 0 of batch 2 is train image 6.
    x = raw[b"data"][0].reshape(3, 32, 32).astype(np.float64)
    all_x = np.concatenate([pickle.load(open(folder / f"data_batch_{i}", "rb"),
                                        encoding="bytes")[b"data"] for i in range(1, 6)])
    all_x = all_x.reshape(-1, 3, 32, 32).astype(np.float64)
    expect = (x - all_x.mean(axis=(0, 2, 3))[:, None, None]) / all_x.std(axis=(0, 2, 3))[:, None, None]
    # float32 storage of values of size ~2: relative 2^-24, absolute < 1e-6.
    assert np.allclose(d.x_train[6].numpy(), expect, atol=1e-5)
    assert d.y_train[6].item() == raw[b"labels"][0]


def test_cifar10_loader_errors_name_the_folder_and_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="data_root"):
        pdata.load("cifar10")
    with pytest.raises(FileNotFoundError, match="missing data_batch_1.*test_batch"):
        pdata.load("cifar10", tmp_path)
    with pytest.raises(ValueError, match="dataset must be one of.*'cifar10'"):
        pdata.load("cifar")


# --- runs and networks ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(depth=15), "depth must be 6 N \\+ 4"),
    (dict(scheme="batchnrom"), "did you mean 'batchnorm'"),
    (dict(scheme="batchnorm", alpha=0.5), "scheme='batchnorm' takes no alpha"),
    (dict(scheme="fixup", regularised=True), "needs scheme='skipinit'"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(epochs=-1.0), "epochs must be > 0"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(device="gpu"), "device must be"),
    (dict(diverge_factor=1.0), "diverge_factor must be > 1"),
])
def test_bad_run_settings_name_the_argument(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        train.Run(**kwargs)


def test_batch_larger_than_the_data_is_refused(digits):
    with pytest.raises(ValueError, match="batch_size=4096 exceeds the 1438 training images"):
        train.train(train.Run(batch_size=4096, **{k: v for k, v in TINY.items()
                                                  if k != "batch_size"}), digits)


def test_regularised_skipinit_adds_biases_and_dropout_but_computes_the_same_at_init():
    plain = train.build_model(train.Run(scheme="skipinit", alpha=0.5, **TINY), 1, 10)
    reg = train.build_model(train.Run(scheme="skipinit", alpha=0.5, regularised=True,
                                      dropout=0.3, **TINY), 1, 10)
    for block in reg.blocks:
        mods = list(block.branch)
        convs = [i for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]
        assert convs and all(isinstance(mods[i - 1], nets._Bias) for i in convs)
    assert isinstance(reg.head[-2], nn.Dropout) and reg.head[-2].p == 0.3
    # Same seed, biases start at 0 and dropout is off in eval mode: the same function.
    # Both run the same float32 ops in the same order, so the outputs are bit-equal.
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(10_000))
    assert torch.equal(plain.eval()(x), reg.eval()(x))


def test_fixup_classifier_starts_at_zero():
    model = train.build_model(train.Run(scheme="fixup", **TINY), 1, 10)
    assert not model.head[-1].weight.any() and not model.head[-1].bias.any()


# --- the loop ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_loss_decreases_for_a_shallow_batchnorm_net(digits):
    r = train.train(train.Run(scheme="batchnorm", lr=0.1, **TINY), digits, progress=False)
    assert not r["diverged"] and r["steps_run"] == r["steps"] == math.ceil(2 * len(digits.y_train) / 32)
    first = np.mean(r["curve"]["loss"][:5])
    # A 10-class net starts near chance, ln 10 = 2.30; two epochs of the digits take a
    # working net far below it. Halving the loss is a loose bar a broken loop cannot pass
    # (a frozen or shuffled-label run stays at ~2.3).
    assert first > 0.8 * math.log(10)
    assert r["train_loss"] < 0.5 * first
    assert r["test_acc"] > 0.5  # chance is 0.1


@pytest.mark.slow
def test_same_seed_same_run_and_other_seed_other_run(digits):
    run = train.Run(scheme="skipinit", alpha=0.2, **{**TINY, "epochs": 0.3})
    a, b = (train.train(run, digits, progress=False) for _ in range(2))
    c = train.train(train.Run(**{**run.to_dict(), "seed": 1}), digits, progress=False)
    assert a["curve"] == b["curve"] and a["test_acc"] == b["test_acc"]
    assert a["curve"] != c["curve"]


@pytest.mark.slow
def test_a_diverging_configuration_is_reported_and_stopped(digits):
    r = train.train(train.Run(scheme="batchnorm", lr=1e4, momentum=0.0, **TINY), digits,
                    progress=False)
    assert r["diverged"] and r["diverged_at"] is not None
    assert r["steps_run"] == r["diverged_at"] < r["steps"]
    last = r["curve"]["loss"][-1]
    assert not math.isfinite(last) or last > 10 * math.log(10)


@pytest.mark.slow
def test_overflow_at_initialisation_is_divergence_at_step_0(digits):
    # SkipInit with alpha = 1 doubles the variance every block: after 66 blocks the logits
    # are of order 2^33, and so is the loss, far above 10 ln 10 before any step is taken.
    r = train.train(train.Run(scheme="skipinit", alpha=1.0, depth=136, width=2, epochs=0.1,
                              batch_size=32), digits, progress=False)
    assert r["diverged"] and r["diverged_at"] == 0 and r["steps_run"] == 0


# --- cache ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_cached_run_is_not_recomputed(tmp_path, monkeypatch, digits):
    run = train.Run(scheme="batchnorm", **{**TINY, "epochs": 0.3})
    first = train.run(run, cache=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.json"))) == 1

    def boom(*a, **k):
        raise AssertionError("a cached run was trained again")
    monkeypatch.setattr(train, "train", boom)
    assert train.run(run, cache=tmp_path, progress=False) == first
    with pytest.raises(AssertionError, match="trained again"):  # a changed run is not cached
        train.run(train.Run(**{**run.to_dict(), "lr": 0.2}), cache=tmp_path, progress=False)


@pytest.mark.slow
def test_an_interrupted_grid_continues_where_it_stopped(tmp_path, monkeypatch, digits):
    runs = [train.Run(scheme="skipinit", alpha=a, **{**TINY, "epochs": 0.2})
            for a in (0.0, 0.1, 0.2)]
    train.run_all(runs[:1], cache=tmp_path, workers=1, progress=False)
    real, trained = train.train, []

    def counting(run, *a, **k):
        trained.append(run)
        return real(run, *a, **k)
    monkeypatch.setattr(train, "train", counting)
    out = train.run_all(runs, cache=tmp_path, workers=1, progress=False)
    assert trained == runs[1:] and [o["run"] for o in out] == [r.to_dict() for r in runs]
    (tmp_path / f"{train.Cache(tmp_path).key(runs[2])}.json").write_text('{"half": ')
    train.run_all(runs, cache=tmp_path, workers=1, progress=False)
    assert trained == runs[1:] + runs[2:]  # a half-written file is redone


@pytest.mark.slow
def test_worker_processes_give_the_in_process_results(tmp_path, digits):
    runs = [train.Run(scheme=s, **{**TINY, "epochs": 0.3}) for s in ("batchnorm", "fixup")]
    pooled = train.run_all(runs, cache=tmp_path / "a", workers=2, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: then the float32 sums run in one order
    try:
        local = train.run_all(runs, cache=tmp_path / "b", workers=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    for p, l in zip(pooled, local):
        assert p["curve"] == l["curve"] and p["test_acc"] == l["test_acc"]


# --- torchrun ---------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(args, nproc=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", "-m", "propagation.train", *args]
    else:
        cmd = [sys.executable, "-m", "propagation.train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_torchrun_two_processes_gloo_match_one_process():
    # No BatchNorm (SkipInit): each process takes half of every batch and DDP averages the
    # gradients, which is the one-process gradient of the mean loss. Only the order of
    # float32 sums differs: per step a relative 2^-24 * (log2 of the ~16-term sums ~ 4)
    # ~ 3e-7 in the gradient, carried through 12 steps of SGD with lr 0.05 on a loss of
    # size 2, so 1e-5 absolute on the losses is a bound with a wide margin and far below
    # the ~1e-2 a wrong sharding (e.g. both processes on the same half) changes them by.
    args = ["--scheme", "skipinit", "--alpha", "0.3", "--depth", "10", "--width", "4",
            "--batch-size", "16", "--lr", "0.05", "--epochs", str(12 * 16 / 1438),
            "--quiet"]
    one, two = _cli(args), _cli(args, nproc=2)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert one["steps_run"] == two["steps_run"] == 12
    np.testing.assert_allclose(two["curve"]["loss"], one["curve"]["loss"], rtol=0, atol=1e-5)
    assert abs(two["test_acc"] - one["test_acc"]) <= 1 / 359  # at most one test image


@pytest.mark.slow
def test_torchrun_batchnorm_runs_with_per_process_statistics():
    out = _cli(["--scheme", "batchnorm", "--depth", "10", "--width", "4", "--batch-size",
                "32", "--epochs", "0.2", "--quiet"], nproc=2)
    assert out["world_size"] == 2 and not out["diverged"]


def test_cli_reports_bad_input_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "propagation.train", "--depth", "12"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: depth must be 6 N + 4 layers with N >= 1 blocks per stage (10, 16, 22, "
        "..., 1000), got depth=12"]


# --- the figure scripts, quick mode -----------------------------------------------------------

@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("training")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    for script in ("t1_trainability.py", "f5_batch_lr.py", "t2_regularised.py"):
        proc = subprocess.run([sys.executable, str(ROOT / "figures" / script), "--quick",
                               "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _csv(path):
    import csv
    with open(path) as f:
        return list(csv.DictReader(f))


def test_t1_table_reports_every_scheme_and_depth(quick_out):
    rows = _csv(quick_out / "T1.csv")
    t1 = json.loads((quick_out / "T1.json").read_text())
    depths, lrs = t1["settings"]["depths"], t1["settings"]["lrs"]
    assert len(rows) == 5 * len(depths) * len(lrs)
    for cell in t1["table"]:
        mine = [r for r in rows if r["label"] == cell["scheme"] and int(r["depth"]) == cell["depth"]
                and r["diverged"] == "False"]
        if not mine:
            assert cell["best_lr"] is None
            continue
        best = min(mine, key=lambda r: float(r["train_loss"]))
        assert cell["train_loss"] == float(best["train_loss"])
    md = (quick_out / "T1.md").read_text()
    for label in ("batchnorm", "fixup", "skipinit (alpha=0)", "skipinit (alpha=1)", "sqrt_half"):
        assert f"| {label} |" in md
    assert "digits" in md and (quick_out / "T1.png").stat().st_size > 10_000


def test_f5_optimal_lr_is_the_best_test_accuracy_of_the_grid(quick_out):
    rows = _csv(quick_out / "F5.csv")
    f5 = json.loads((quick_out / "F5.json").read_text())
    assert len(f5["summary"]) == 2 * len(f5["settings"]["batch_sizes"])
    for s in f5["summary"]:
        mine = [r for r in rows if r["label"] == s["scheme"]
                and int(r["batch_size"]) == s["batch_size"] and r["diverged"] == "False"]
        assert s["best_test_acc"] == max(float(r["test_acc"]) for r in mine)
        assert s["largest_stable_lr"] == max(float(r["lr"]) for r in mine)
    assert (quick_out / "F5.png").stat().st_size > 10_000


def test_t2_reuses_f5_runs_and_adds_regularised_skipinit(quick_out):
    t2 = json.loads((quick_out / "T2.json").read_text())
    labels = {c["scheme"] for c in t2["table"]}
    assert labels == {"batchnorm", "skipinit (alpha=0)", "regularised skipinit (dropout 0.2)"}
    runs = list((quick_out / "runs").glob("*.json"))
    s = t2["settings"]
    f5_runs = 2 * 2 * len(s["lrs"])  # F5 quick: 2 schemes x 2 batch sizes x lrs
    t1_runs = 5 * 2  # T1 quick: 5 variants x 2 depths x 1 lr
    # T2's BatchNorm and SkipInit runs are F5's (same batch sizes in quick mode): cached.
    assert len(runs) == t1_runs + f5_runs + len(s["batch_sizes"]) * len(s["lrs"])


def test_a_second_run_of_a_script_trains_nothing(quick_out, tmp_path):
    before = sorted(p.name for p in (quick_out / "runs").glob("*.json"))
    proc = subprocess.run([sys.executable, str(ROOT / "figures" / "t1_trainability.py"),
                           "--quick", "--out", str(quick_out), "--workers", "1"], cwd=ROOT,
                          env={**os.environ, "MPLBACKEND": "Agg"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (quick_out / "runs").glob("*.json")) == before
    assert "step/s" not in proc.stderr  # no step bar: nothing was trained


def test_augmentation_crops_and_flips_each_image_within_its_padding():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8) + 1
    out = train._augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))  # padding 1 below 16 pixels
    for i in range(2):
        windows = [padded[i, :, a:a + 8, b:b + 8] for a in range(3) for b in range(3)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(out[i], w) for w in windows)
    # 18 equally likely (crop, flip) choices per image: 64 images all left in place would
    # have probability 18^-64.
    many = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(10_000))
    moved = train._augment(many, torch.Generator().manual_seed(1))
    assert sum(not torch.equal(a, b) for a, b in zip(many, moved)) > 32
