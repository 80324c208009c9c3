"""Utility of the three direction kinds on real weight matrices (issue: low-rank directions).

Head-only training has too few weights (a 5 × 384 matrix) for the distribution of the
directions to matter, so this benchmark trains MiniLM's last transformer layer and its
classification head (``--trainable last1+classifier``: six weight matrices of 384 × 384 up to
1536 × 384 and the 5 × 384 head, 1.78 M values) with DP-AggZO at ε = 2 and compares

* ``gaussian``: z ~ N(0, I) (the default),
* ``rademacher``: z uniform on {−1, +1}^d,
* ``lowrank``: z = U Vᵀ/√r per weight matrix, r = 2, V redrawn every step (LOZO's sampling; the
  library's defaults ``direction_rank=2``, ``direction_refresh=1``); Gaussian for the biases and
  LayerNorm vectors.

Protocol: BBC News topics (5 classes) from the job's public split (:func:`load_task`, seed 0:
up to 512 training records per class, 200 validation, 1000 test), 64 tokens per record, the
frozen prefix (embeddings and layers 0-4) cached once by the job's own cache
(:class:`benchmarks.utility.TaskFeatures`, checked against the full model) and every run goes
through the job's trainer (:func:`zoprivacy.finetune.make_trainer`): K directions, T steps,
expected batch 64, c = β/√K with β = 0.8, φ = 1e-3, δ = 1e-5, σ calibrated for ε = 2 over T
steps. For each kind the learning rate is chosen on the validation accuracy from :data:`GRID`
with seed 0 (:func:`benchmarks.utility.first_best`); the selected value then runs seeds 1 and 2.
Test accuracy never enters the selection.

Rows go to ``benchmarks/results/direction_utility/<kind>.json`` (one file per kind, so kinds can
run in parallel processes; ``--quick`` writes to ``direction_utility_quick/``); a rerun skips the
rows already there. ``--table`` prints the markdown
table of ``benchmarks/README_utility.md`` and redraws ``direction_utility.png``.

    python -m benchmarks.direction_utility --kinds gaussian,rademacher
    python -m benchmarks.direction_utility --kinds lowrank
    python -m benchmarks.direction_utility --table
    python -m benchmarks.direction_utility --quick --out /tmp/du     # smoke test (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import torch  # noqa: E402  (after the thread settings)

from benchmarks import utility  # noqa: E402
from benchmarks._common import RESULTS, machine  # noqa: E402

KINDS = ("gaussian", "rademacher", "lowrank")
TASK = "bbc_news"
TRAINABLE = "last1+classifier"
MAX_LENGTH = 64
K = 4
STEPS = 200
EPSILON = 2.0
RANK = 2
REFRESH = 1
#: One learning-rate grid for every kind: the three kinds have E[z zᵀ] = I, so φ, c and η
#: mean the same for each. Placed by scouting (Gaussian, seed 0, validation accuracy: η = 1e-3
#: at T = 200 stayed at 0.33; at T = 100, 1e-2 gave 0.395 and 3e-2 0.44); the first pass of
#: this grid ran 3e-2 and 1e-1 and selected its edge 1e-1 for both kinds it had reached, so the
#: third value went to that side (as in benchmarks/utility.py). In the order the values run
#: (a tie goes to the earlier value).
GRID = (3e-2, 1e-1, 3e-1)
SEEDS = (0, 1, 2)


def kind_options(kind: str) -> dict[str, Any]:
    """The TrainSettings fields of a direction kind."""
    if kind == "lowrank":
        return {
            "direction_distribution": kind,
            "direction_rank": RANK,
            "direction_refresh": REFRESH,
        }
    return {"direction_distribution": kind}


def run_kind(
    kind: str,
    feats: utility.TaskFeatures,
    path: Path,
    *,
    grid: Sequence[float],
    seeds: Sequence[int],
    k: int,
    steps: int,
) -> list[dict[str, Any]]:
    """The grid on seed 0, the selection on validation, the other seeds at the selected η."""
    rows = utility._load(path)

    def run(lr: float, seed: int) -> dict[str, Any]:
        for r in rows:
            if (r["lr"], r["seed"], r["K"], r["steps_planned"]) == (lr, seed, k, steps):
                return r
        row = utility.run_one(
            feats, method="dpaggzo", k=k, epsilon=EPSILON, seed=seed, lr=lr, steps=steps,
            options=kind_options(kind),
        )  # fmt: skip
        row.update(
            {"direction_rank": None, "direction_refresh": None, **kind_options(kind)},
            trainable=feats.trainable,
            trainable_params=feats.classifier.num_trainable(),
            max_length=MAX_LENGTH,
            grid={"lr": list(grid)},
            grid_seed=utility.GRID_SEED,
            selected_on="validation",
            clip_beta=utility.CLIP_BETA,
        )
        rows.append(row)
        utility._save(path, rows)
        print(
            f"{kind:10s} lr={lr:g} seed={seed}: validation {row['validation_accuracy']:.3f} "
            f"test {row['test_accuracy']:.3f} ({row['wall_seconds']:.0f} s)",
            file=sys.stderr,
        )
        return row

    by_lr = {lr: run(lr, utility.GRID_SEED) for lr in grid}
    best = utility.first_best(grid, lambda lr: by_lr[lr]["validation_accuracy"])
    for seed in seeds:
        run(best, seed)
    for r in rows:
        r["selected"] = r["lr"] == best and r["K"] == k and r["steps_planned"] == steps
    utility._save(path, rows)
    return rows


def summarize(folder: Path) -> list[dict[str, Any]]:
    """Per kind: the selected η and the test accuracy over its seeds (mean, std, values)."""
    summary = []
    for kind in KINDS:
        path = folder / f"{kind}.json"
        chosen = [r for r in utility._load(path) if r.get("selected")]
        if not chosen:
            continue
        chosen.sort(key=lambda r: r["seed"])
        acc = [r["test_accuracy"] for r in chosen]
        summary.append(
            {
                "kind": kind,
                "lr": chosen[0]["lr"],
                "K": chosen[0]["K"],
                "steps": chosen[0]["steps_planned"],
                "seeds": [r["seed"] for r in chosen],
                "test_accuracy": acc,
                "test_accuracy_mean": statistics.fmean(acc),
                "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "test_accuracy_before": statistics.fmean(r["test_accuracy_before"] for r in chosen),
                "wall_seconds_mean": statistics.fmean(r["wall_seconds"] for r in chosen),
                "peak_memory_mib_max": max(r["peak_memory_mib"] for r in chosen),
                "noise_multiplier": chosen[0]["noise_multiplier"],
                "clip_norm": chosen[0]["clip_norm"],
                "trainable_params": chosen[0]["trainable_params"],
            }
        )
    return summary


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """The README_utility table: one line per kind."""
    lines = [
        "| directions | selected η | test accuracy (mean ± std) | seeds | s / run | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        name = f"low-rank (r = {RANK}, ν = {REFRESH})" if s["kind"] == "lowrank" else s["kind"]
        seeds = ", ".join(f"{a:.3f}" for a in s["test_accuracy"])
        lines.append(
            f"| {name} | {s['lr']:g} | {s['test_accuracy_mean']:.3f} ± "
            f"{s['test_accuracy_std']:.3f} | {seeds} | {s['wall_seconds_mean']:.0f} | "
            f"{s['peak_memory_mib_max']:.0f} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy per kind: the mean with ±1 std, and each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for i, s in enumerate(summary):
        ax.bar(i, s["test_accuracy_mean"], yerr=s["test_accuracy_std"], color="C0", alpha=0.6)
        ax.plot([i] * len(s["test_accuracy"]), s["test_accuracy"], "k.", ms=6)
    if summary:
        ax.axhline(summary[0]["test_accuracy_before"], color="grey", ls="--", lw=1)
        first = summary[0]
        ax.set_title(
            f"MiniLM last layer + head, BBC, ε = {EPSILON:g}, K = {first['K']}, "
            f"T = {first['steps']}",
            fontsize=9,
        )
    ax.set_xticks(range(len(summary)), [s["kind"] for s in summary])
    ax.set_ylabel("test accuracy (3 seeds; dashed: untrained)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.direction_utility", description=__doc__
    )
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--grid", default=",".join(f"{v:g}" for v in GRID))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--k", type=int, default=K, help=f"directions K (default {K})")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps T (default {STEPS})")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/zoprivacy-utility-cache"))
    parser.add_argument("--quick", action="store_true", help="tiny splits, two steps (CI)")
    parser.add_argument("--table", action="store_true", help="print the table, redraw the plot")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    folder = args.out / ("direction_utility_quick" if args.quick else "direction_utility")
    if not args.table:
        torch.set_num_threads(1)
        sizes = dict(per_class_train=8, validation_size=8, test_size=16) if args.quick else dict(
            per_class_train=utility.PER_CLASS_TRAIN,
            validation_size=utility.VALIDATION_SIZE[TASK],
            test_size=None,
        )  # fmt: skip
        if args.quick:
            args.steps, args.grid, args.seeds = 2, "1e-3,3e-3", "0,1"
        feats = utility.TaskFeatures(
            TASK, **sizes, max_length=MAX_LENGTH, model="minilm", trainable=TRAINABLE,
            cache_dir=None if args.quick else args.cache_dir,
        )  # fmt: skip
        grid = [float(x) for x in args.grid.split(",")]
        seeds = [int(x) for x in args.seeds.split(",")]
        for kind in args.kinds.split(","):
            run_kind(
                kind,
                feats,
                folder / f"{kind}.json",
                grid=grid,
                seeds=seeds,
                k=args.k,
                steps=args.steps,
            )
    summary = summarize(folder)
    payload = {"machine": machine(), "method": __doc__, "summary": summary}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    plot(summary, folder / "direction_utility.png")
    print(markdown_table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
