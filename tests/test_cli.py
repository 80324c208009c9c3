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
