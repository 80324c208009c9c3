"""Smoke test of the utility benchmark: ``--quick`` (one cell, two steps) into a tmp folder."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("opacus")

from benchmarks import utility
from benchmarks._common import RESULTS


def test_utility_quick(tmp_path):
    started = time.monotonic()
    assert utility.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "utility_quick.json").read_text())
    assert len(rows) == 1
    row = rows[0]
    assert set(utility.ROW_KEYS) <= set(row)
    assert row["method"] == "dpaggzo" and row["K"] == 4 and row["epsilon"] == 2.0
    assert row["steps"] == 2 and row["forward_passes"] == 2 * 4 * 2
    assert row["selected_on"] == "validation" and row["selected"] is True
    assert 0.0 <= row["test_accuracy"] <= 1.0
    assert row["epsilon_spent"] <= 2.0 + 1e-6
    assert row["noise_multiplier"] > 0
    # resuming skips the finished row
    assert utility.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert len(json.loads((tmp_path / "utility_quick.json").read_text())) == 1
    assert not (RESULTS / "utility_quick.json").exists()
    assert time.monotonic() - started < 60


def test_utility_quick_figure5_and_table(tmp_path):
    """``--figure5`` runs its K cells for every seed given and draws the accuracy-against-K plot;
    ``--table`` prints the markdown summary with the model column."""
    argv = ["--quick", "--figure5", "--out", str(tmp_path), "--no-progress"]
    assert utility.main(argv) == 0
    rows = json.loads((tmp_path / "utility_quick.json").read_text())
    assert [(r["comparison"], r["K"], r["seed"]) for r in rows] == [("accuracy_vs_k", 4, 0)]
    assert (tmp_path / "utility_quick_vs_k.png").stat().st_size > 0
    table = utility.markdown_table(rows)
    assert table.splitlines()[0].startswith("| model | task | method | K |")
    assert "| minilm | rotten_tomatoes | dpaggzo | 4 | 2 | 2 | accuracy_vs_k |" in table
