"""Smoke test of the utility benchmark: ``--quick`` (one cell, two steps) into a tmp folder."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("opacus")

from benchmarks import utility
from benchmarks._common import RESULTS


def test_utility_quick(tmp_path):
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
    # resuming skips the finished row: it is not run again (the file holds the same row)
    assert utility.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert json.loads((tmp_path / "utility_quick.json").read_text()) == rows
    assert not (RESULTS / "utility_quick.json").exists()


def test_utility_quick_figure5_and_table(tmp_path, capsys):
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
    # --table reads <out>/utility.json: print the tables and redraw both plots from it
    report = tmp_path / "report"
    report.mkdir()
    (report / "utility.json").write_text((tmp_path / "utility_quick.json").read_text())
    assert utility.main(["--table", "--out", str(report)]) == 0
    assert (report / "utility_vs_k.png").stat().st_size > 0
    assert (report / "utility_accuracy.png").stat().st_size > 0
    assert "accuracy_vs_k" in capsys.readouterr().out


def _row(task, method, k, eps, acc, seed, *, steps=1000, comparison="equal_steps", model="m"):
    return {
        "model": model, "task": task, "method": method, "K": k, "epsilon": eps, "seed": seed,
        "test_accuracy": acc, "steps_planned": steps, "comparison": comparison, "lr": 1.0,
        "selected": True, "wall_seconds": 1.0, "forward_passes": 0,
    }  # fmt: skip


def test_paper_table_lays_out_mean_and_std_per_task_and_epsilon():
    import statistics

    accs = [0.5, 0.6, 0.7]
    rows = [_row("a", "dpaggzo", 16, 2.0, x, i) for i, x in enumerate(accs)]
    rows += [_row("a", "dpaggzo", 16, 6.0, 0.9, 0)]
    rows += [_row("a", "adamw", None, None, 0.95, i) for i in range(3)]
    rows += [_row("a", "dpzo", 1, 2.0, 0.4, 0, steps=16000, comparison="equal_forward_passes")]
    rows += [_row("a", "dpzo", 1, 2.0, 0.3, 0, steps=64000, comparison="equal_forward_passes")]
    rows += [dict(_row("a", "dpaggzo", 16, 2.0, 0.0, 0), selected=False, lr=3.0)]  # lost
    lines = utility.paper_table(rows, "m").splitlines()
    assert lines[0] == "| m | a ε=2 | a ε=6 |"
    body = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    expected = f"{statistics.mean(accs):.3f}±{statistics.stdev(accs):.3f}"
    assert body["DP-AggZO K=16"] == [expected, "0.900±0.000 (1 seed) |"]
    assert body["AdamW (non-private)"] == ["0.950±0.000", "0.950±0.000 |"]  # every ε column
    assert body["DPZO, 16× steps (= K=16's forward passes)"][0] == "0.400±0.000 (1 seed)"
    assert body["DPZO, 64× steps (= K=64's forward passes)"][0] == "0.300±0.000 (1 seed)"
    assert "DP-AdamW (Opacus)" not in body  # not run: no row
    assert utility.paper_table(rows, "other") == ""
