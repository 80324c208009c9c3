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


def test_direction_utility_quick(tmp_path, capsys):
    """The direction-kind comparison's quick mode: per kind, the grid on seed 0, the selection
    on validation and the other seed at the selected η; each run really used its kind."""
    from benchmarks import direction_utility

    assert direction_utility.main(["--quick", "--out", str(tmp_path)]) == 0
    for kind in direction_utility.KINDS:
        rows = json.loads((tmp_path / "direction_utility_quick" / f"{kind}.json").read_text())
        assert len(rows) == 3 and {r["directions_used"] for r in rows} == {kind}
        grid = [r for r in rows if r["seed"] == 0]
        best = utility.first_best(
            [r["lr"] for r in grid],
            lambda lr, grid=grid: next(r for r in grid if r["lr"] == lr)["validation_accuracy"],
        )
        assert {(r["seed"], r["lr"]) for r in rows if r["selected"]} == {(0, best), (1, best)}
        assert all(r["trainable"] == "last1+classifier" for r in rows)
        assert all(r["epsilon_spent"] <= 2.0 + 1e-6 for r in rows)
    summary = json.loads((tmp_path / "direction_utility_quick" / "summary.json").read_text())
    assert [s["kind"] for s in summary["summary"]] == list(direction_utility.KINDS)
    assert "| low-rank (r = 2, ν = 1) |" in capsys.readouterr().out
    assert not (RESULTS / "direction_utility_quick").exists()


def test_first_best_takes_the_first_of_equal_scores():
    scores = {0.3: 0.8, 1.0: 0.9, 3.0: 0.9}
    assert utility.first_best([0.3, 1.0, 3.0], scores.get) == 1.0
    assert utility.first_best([3.0, 1.0, 0.3], scores.get) == 3.0
