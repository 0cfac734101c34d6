"""The command line: tables for people, JSON for programs, one-line errors, exit codes."""
import json
import subprocess
import sys

import numpy as np
import pytest

import propagation
from propagation.__main__ import main
from propagation.profile import Profile

MLP = ["--model", "propagation.nets:residual_mlp", "--arg", "depth=6", "--arg", "width=128",
       "--input", "128,128"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_schemes_lists_every_registered_scheme(capsys):
    code, out, _ = run(capsys, "schemes")
    assert code == 0
    for name in propagation.schemes():
        assert name in out


def test_predict_json_round_trips(capsys):
    code, out, _ = run(capsys, "predict", "--scheme", "skipinit", "--alpha", "0.1", "--depth", "20",
                       "--json")
    assert code == 0
    p = Profile.from_dict(json.loads(out))
    ref = propagation.predict(20, "skipinit", alpha=0.1)
    np.testing.assert_array_equal(p.skip.log2_second_moment, ref.skip.log2_second_moment)
    np.testing.assert_array_equal(p.grad.log2_second_moment, ref.grad.log2_second_moment)


def test_predict_table(capsys):
    code, out, _ = run(capsys, "predict", "--depth", "3", "--stages", "1,2")
    assert code == 0 and len(out.strip().splitlines()) == 1 + 4


def test_measure_json(capsys):
    code, out, _ = run(capsys, "measure", *MLP, "--json")
    assert code == 0
    m = Profile.from_dict(json.loads(out))
    assert m.depth == 6 and m.source == "measurement"


@pytest.mark.slow
def test_check_passes_on_a_matching_scheme_and_fails_on_another(capsys):
    code, out, _ = run(capsys, "check", *MLP, "--seeds", "3", "--scheme", "batchnorm")
    assert code == 0, out
    assert "agree" in out and "batchnorm" in out
    code, out, _ = run(capsys, "check", *MLP, "--seeds", "3", "--scheme", "none")
    assert code == 1 and "DISAGREE" in out


@pytest.mark.parametrize("argv, words", [
    (["predict", "--depth", "10", "--scheme", "batchnrom"], ["unknown scheme", "batchnorm"]),
    (["predict", "--depth", "0"], ["depth must be an integer >= 1"]),
    (["measure", "--model", "nowhere:thing", "--input", "4,4"], ["nowhere"]),
    (["measure", "--model", "propagation.nets:resnet_v2", "--input", "4,3,8,8", "--arg",
      "scheme=batchnrom"], ["batchnrom"]),
])
def test_errors_are_one_line_and_exit_2(capsys, argv, words):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err


def test_module_entry_point_and_help():
    out = subprocess.run([sys.executable, "-m", "propagation", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "examples:" in out and "propagation check" in out
