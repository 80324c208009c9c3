"""The accounting command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from zoprivacy.accounting import calibrate, compute_epsilon
from zoprivacy.cli import main


def test_calibrate_json_matches_the_library(capsys):
    assert (
        main(
            [
                "calibrate",
                "--epsilon",
                "2",
                "--delta",
                "1e-5",
                "--sample-rate",
                "0.0416",
                "--steps",
                "1000",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    plan = calibrate(epsilon=2, delta=1e-5, sample_rate=0.0416, steps=1000)
    assert out["noise_multiplier"] == plan.noise_multiplier
    assert out["laplace_scale"] == plan.laplace_scale
    assert out["epsilon_pld"] <= out["epsilon_rdp"] <= 2.0


def test_epsilon_table(capsys):
    assert (
        main(
            [
                "epsilon",
                "--noise-multiplier",
                "3",
                "--sample-rate",
                "0.0416",
                "--steps",
                "1000",
                "--delta",
                "1e-5",
                "--laplace-scale",
                "10",
                "--no-pld",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    eps = compute_epsilon(
        noise_multiplier=3, sample_rate=0.0416, steps=1000, delta=1e-5, laplace_scale=10
    )
    assert f"{eps:.6g}" in text and "best_order" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["calibrate", "--epsilon", "0", "--delta", "1e-5", "--sample-rate", "0.1", "--steps", "10"],
        [
            "epsilon",
            "--noise-multiplier",
            "1",
            "--sample-rate",
            "1.5",
            "--steps",
            "10",
            "--delta",
            "1e-5",
        ],
    ],
)
def test_bad_input_is_one_line_not_a_traceback(argv):
    proc = subprocess.run(
        [sys.executable, "-m", "zoprivacy.cli", *argv], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "error:" in proc.stderr


@pytest.mark.parametrize(
    "argv", [["finetune", "--bogus"], ["calibrate", "--epsilon", "x"], [], ["nonsense"]]
)
def test_argument_errors_are_one_line(argv):
    proc = subprocess.run(
        [sys.executable, "-m", "zoprivacy.cli", *argv], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--help" in proc.stderr


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zoprivacy.cli", *argv], capture_output=True, text=True
    )


CALIBRATE = ["calibrate", "--epsilon", "2", "--delta", "1e-5", "--sample-rate", "0.1"]
EPSILON = ["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "10"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        # with no step there is nothing to calibrate: σ = 0 was printed as a plan
        ([*CALIBRATE, "--steps", "0"], "--steps must be an int >= 1"),
        # a negative-looking value reaches the value check, which names the flag
        ([*CALIBRATE, "--steps", "10", "--delta", "-1e-5"], "--delta must lie in (0, 1)"),
        ([*EPSILON, "--delta", "1e-5", "--laplace-scale", "-2.5"], "--laplace-scale"),
        ([*EPSILON, "--delta", "1e-5", "--noise-multiplier", "-1"], "--noise-multiplier"),
        (["finetune", "--directions", "0"], "--directions must be an int >= 1, got 0"),
        (["finetune", "--directions", "-4"], "--directions must be an int >= 1, got -4"),
        (["finetune", "--delta", "-1e-5"], "--delta must be in (0, 1), got -1e-05"),
    ],
)
def test_rough_edges_give_one_line_naming_the_flag(argv, needle):
    proc = _cli(*argv)
    assert proc.returncode == 2, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_values_not_computed_say_why(capsys):
    """--no-pld and a missing --laplace-scale are not a missing dp-accounting."""
    assert main([*EPSILON, "--delta", "1e-5", "--no-pld"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    assert rows["epsilon_pld"] == "not computed (--no-pld)"
    assert rows["laplace_scale"].startswith("none (no size release")
    assert "pip install" not in "".join(rows.values())
    assert main([*EPSILON, "--delta", "1e-5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["laplace_scale"] is None
    assert out["epsilon_pld"] == pytest.approx(out["epsilon_rdp"], rel=0.5)
    assert out["epsilon_pld"] <= out["epsilon_rdp"]


def test_python_dash_m_knows_the_finetune_command():
    proc = _cli("finetune", "--help")
    assert proc.returncode == 0 and "--show-private-diagnostics" in proc.stdout
