"""Utility of DP-AggZO against its baselines at CPU scale (the paper's Tables 1-2 and Figure 5).

Protocol (README_utility.md has the full description and the results):

* tasks: Rotten Tomatoes (binary, the SST-2 stand-in) and BBC News topics (5 classes, the TREC
  stand-in), split once with the public seed 0 by
  :func:`zoprivacy.tasks.packaged.make_splits`: a fixed
  held-out test split (the ``zoprivacy finetune`` job's, same seed and size), a validation split
  carved from the rest, and up to 512 training records per class from what is left;
* models (``--model``): the packaged MiniLM classifier with only the classification head
  trainable (``minilm``), or SmolLM2-135M-Instruct answering with label words with only its final
  norm trainable (``smollm2``, the job's default ``head``). The frozen prefix's output (MiniLM's
  pooled output; SmolLM2's last decoder state at the answer position) is computed once per task
  by the job's frozen-prefix cache (:meth:`zoprivacy.finetune.Classifier.build_cache`,
  checked against the full model on test records) and every loss, gradient and accuracy reads
  it;
* methods: DP-AggZO (K = 16, 64), DPZO (K = 1), MeZO (K = 16), DP-AdamW (Opacus, the job's
  accounting: ψ = 1/(0.05 ε) for ñ, σ calibrated for q = b/ñ and T steps), AdamW and the
  untrained (zero-shot) head; δ = 1e-5, ε in {2, 6}, the non-private methods once;
* hyper-parameters: a small learning-rate grid per method (:data:`GRID`), trained with the grid
  seed 0 and selected on the *validation* accuracy; the selected value then runs the other
  seeds. Test accuracy never enters the selection;
* budgets: every method runs T steps (``--steps``). DPZO is also run at the forward-pass budget
  of DP-AggZO K = 64 (64 T steps), capped at ``--dpzo-cap`` steps (row key ``comparison``).

Each run calls the job's own trainers (:func:`zoprivacy.finetune.make_trainer`) in this
process, so the privacy accounting, clipping and noise are exactly the job's. Results are
appended to ``utility.json`` (a list of rows) after every run; an interrupted run resumes and
skips the rows already there.

    python -m benchmarks.utility --tasks bbc_news --epsilons 2 --steps 1000
    python -m benchmarks.utility --figure5          # accuracy against K (Figure 5)
    python -m benchmarks.utility --quick --out /tmp/u
    python -m benchmarks.utility --model smollm2 --tasks rotten_tomatoes --methods dpaggzo \
        --ks 16 --epsilons 2 --seeds 0 --grid "dpaggzo=1.0"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import RESULTS, machine

#: The learning-rate grid of each method (three values; a first pass ran the first two and the
#: third was added on the side where the first pass selected its edge value). The ZO clip norm
#: is β/√K with β = 0.8 and DP-AdamW clips per-sample gradients at 1.0 (the job's defaults).
GRID: dict[str, list[float]] = {
    "dpaggzo": [1.0, 3.0, 0.3],
    "dpzo": [1.0, 3.0, 10.0],
    "mezo": [0.3, 1.0, 3.0],
    "dpadamw": [0.01, 0.05, 0.2],
    "adamw": [0.01, 0.05, 0.002],
    "zeroshot": [0.0],
}
CLIP_BETA = 0.8  # ZO: c = β/√K
DPADAMW_CLIP = 1.0
MEZO_K = 16
BATCH_SIZE = 64.0
PERTURBATION_SCALE = 1e-3
DELTA = 1e-5
SPLIT_SEED = 0  # the public split (the fixed test split of the finetune job)
GRID_SEED = 0  # the seed the grid runs with; the other seeds reuse the selected value
PER_CLASS_TRAIN = 512
VALIDATION_SIZE = {"rotten_tomatoes": 200, "bbc_news": 200}
MODELS = ("minilm", "smollm2")
#: The trainable selection of each model (the ``zoprivacy finetune`` defaults).
TRAINABLE = {"minilm": "classifier", "smollm2": "head"}
ALL_TASKS = ("bbc_news", "rotten_tomatoes")
ALL_METHODS = ("zeroshot", "dpaggzo", "dpzo", "mezo", "dpadamw", "adamw")
ZO_K = {"dpaggzo": (64, 16), "dpzo": (1,), "mezo": (MEZO_K,)}
FIGURE5_K = (1, 4, 16, 64)
REFERENCE_K = 64  # DPZO's forward-pass budget is that of DP-AggZO with this K

#: Keys of every row of utility.json (the quick test checks them).
ROW_KEYS = (
    "task",
    "model",
    "method",
    "K",
    "epsilon",
    "seed",
    "test_accuracy",
    "validation_accuracy",
    "test_accuracy_before",
    "comparison",
    "steps",
    "steps_planned",
    "forward_passes",
    "backward_passes",
    "wall_seconds",
    "peak_memory_mib",
    "noise_multiplier",
    "clip_norm",
    "lr",
    "delta",
    "epsilon_spent",
    "batch_size",
    "selected",
    "selected_on",
    "grid",
    "grid_seed",
    "train_records",
    "validation_records",
    "test_records",
)


# ---------------------------------------------------------------------------------------------
# data and the cached features
# ---------------------------------------------------------------------------------------------


class TaskFeatures:
    """One task's public split (the job's :func:`load_task`), encoded once through the frozen
    prefix of ``model`` with the job's public feature-cache helpers."""

    def __init__(
        self,
        task: str,
        *,
        per_class_train: int,
        validation_size: int,
        test_size: int | None,
        max_length: int | None,
        cache_dir: Path | None,
        model: str = "minilm",
        trainable: str | None = None,
    ) -> None:
        from zoprivacy.finetune import TASK_DEFAULTS, load_classifier, load_task

        self.task = task
        self.model = model
        self.trainable = TRAINABLE[model] if trainable is None else trainable
        defaults = TASK_DEFAULTS[task]
        test_size = defaults["test_size"] if test_size is None else test_size
        max_length = defaults["max_length"] if max_length is None else max_length
        data = load_task(
            task,
            per_class_train=per_class_train,
            test_size=test_size,
            validation_size=validation_size,
            seed=SPLIT_SEED,
        )
        self.num_labels = data.num_labels
        self.sizes = {
            "train": len(data.train_texts),
            "validation": len(data.validation_texts),
            "test": len(data.test_texts),
        }
        self.classifier = load_classifier(
            model, data, trainable=self.trainable, max_length=max_length, seed=GRID_SEED
        )
        clf = self.classifier
        self._initial = clf.trainable_state()  # the packaged weights (MiniLM: and seed 0's head)
        key = f"{task}-{per_class_train}-{validation_size}-{test_size}-{max_length}-{SPLIT_SEED}"
        if model != "minilm":  # (MiniLM files keep the name of the first runs)
            key = f"{model}-{key}"
        if self.trainable != TRAINABLE[model]:
            key = f"{key}-{self.trainable}"
        path = None if cache_dir is None else cache_dir / f"features-{key}.pt"
        test = clf.encode(data.test_texts, data.test_labels)
        if path is not None and path.exists():
            self.features = torch.load(path, weights_only=True)
        else:
            self.features = _prefix_features(clf, data, test, label=f"{model} on {task}")
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self.features, path)
        # a check on every start (cached file or not): cached test logits == full model's
        probe = {k: v[:8] for k, v in test.items()}
        with torch.inference_mode():
            full = clf.full_logits(probe)
            fast = clf.suffix_logits({k: v[:8] for k, v in self.split("test").items()})
        if not torch.allclose(full, fast, atol=1e-4, rtol=1e-4):
            raise RuntimeError("cached features differ from the full model; delete the cache")
        self._heads: dict[int, dict[str, torch.Tensor]] = {}

    def initial_head(self, seed: int) -> dict[str, torch.Tensor]:
        """The packaged loader's MiniLM head initialisation for ``seed`` (the job's --seed)."""
        if seed not in self._heads:
            from zoprivacy.tasks import packaged

            net, _ = packaged.load_minilm_classifier(self.num_labels, seed=seed)
            self._heads[seed] = {k: v.clone() for k, v in net.classifier.state_dict().items()}
            del net
        return self._heads[seed]

    def reset(self, seed: int) -> None:
        """Put the trainable tensors back to the job's starting point for ``seed``: the
        packaged weights, and for MiniLM the head initialisation of ``seed``."""
        clf = self.classifier
        _, unexpected = clf.model.load_state_dict(self._initial, strict=False)
        assert not unexpected
        if self.model == "minilm":
            clf.model.classifier.load_state_dict(self.initial_head(seed))
        clf.model.eval()

    def split(self, name: str) -> dict[str, torch.Tensor]:
        """The cached prefix features of a split, without its labels (suffix inputs)."""
        return {k: v for k, v in self.features[name].items() if k != "labels"}

    def accuracy(self, split: str) -> float:
        """Accuracy on a split from its cached features (the job's own feature path)."""
        labels = self.features[split]["labels"]
        batch = 512 if self.split(split)["hidden"].dim() == 2 else 64
        return self.classifier.accuracy(
            {"labels": labels}, features=self.split(split), batch_size=batch
        )


def _prefix_features(clf: Any, data: Any, test: dict[str, torch.Tensor], *, label: str) -> dict:
    """The three splits' frozen-prefix features (the job's cache, verified on test records)."""
    train = clf.encode(data.train_texts, data.train_labels)
    val = clf.encode(data.validation_texts, data.validation_labels)
    clf.build_cache(train)
    if not clf.verify_cache(test):
        raise RuntimeError(f"the frozen-prefix cache does not match {label}")
    return {
        "train": {**clf.cached_features, "labels": train["labels"]},
        "validation": {**clf.prefix_features(val, batch_size=32), "labels": val["labels"]},
        "test": {**clf.prefix_features(test, batch_size=32), "labels": test["labels"]},
    }


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(
    feats: TaskFeatures,
    *,
    method: str,
    k: int | None,
    epsilon: float | None,
    seed: int,
    lr: float,
    steps: int,
    clip_norm: float | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the head with ``method`` through the job's trainers; returns the measured row.

    ``clip_norm`` overrides the method's default clip norm (:func:`_clip_norm`); ``options``
    are further :class:`~zoprivacy.finetune.TrainSettings` fields (e.g. the direction kind)."""
    feats.reset(seed)
    before = feats.accuracy("test")
    _reset_peak_rss()
    started = time.monotonic()
    clip = _clip_norm(method, k) if clip_norm is None else clip_norm
    done, privacy, eps_spent = 0, {}, 0.0
    if method != "zeroshot":
        settings = _settings(method, k, epsilon, seed, lr, steps, clip, **(options or {}))
        done, privacy, eps_spent = _train(feats, settings)
    wall = time.monotonic() - started
    peak = _peak_rss_mib()
    feats.classifier.model.eval()
    zeroth_order = method in ("dpaggzo", "dpzo", "mezo")
    if zeroth_order:
        forward, backward = 2 * (k or 1) * done, 0
    elif method in ("dpadamw", "adamw"):
        forward, backward = done, done
    else:
        forward, backward = 0, 0
    return {
        "task": feats.task,
        "model": feats.model,
        "method": method,
        "K": k,
        "epsilon": epsilon,
        "seed": seed,
        "test_accuracy": feats.accuracy("test"),
        "validation_accuracy": feats.accuracy("validation"),
        "test_accuracy_before": before,
        "steps": done,
        "steps_planned": steps if method != "zeroshot" else 0,
        "forward_passes": forward,
        "backward_passes": backward,
        "wall_seconds": wall,
        "peak_memory_mib": peak,
        "noise_multiplier": privacy.get("noise_multiplier"),
        "directions_used": privacy.get("directions_used"),
        "clip_norm": clip,
        "lr": lr if method != "zeroshot" else None,
        "delta": DELTA if epsilon is not None else None,
        "epsilon_spent": eps_spent,
        "sample_rate": privacy.get("sample_rate"),
        "noisy_dataset_size": privacy.get("noisy_dataset_size"),
        "batch_size": BATCH_SIZE,
        "perturbation_scale": PERTURBATION_SCALE if zeroth_order else None,
        "train_records": feats.sizes["train"],
        "validation_records": feats.sizes["validation"],
        "test_records": feats.sizes["test"],
    }


def _clip_norm(method: str, k: int | None) -> float | None:
    """The clip norm of ``method``: β/√K for the private ZO methods, 1.0 for DP-AdamW."""
    if method in ("dpaggzo", "dpzo"):
        return CLIP_BETA / math.sqrt(k)
    if method == "dpadamw":
        return DPADAMW_CLIP
    return None


def _settings(method: str, k, eps, seed: int, lr: float, steps: int, clip, **options) -> Any:
    """The job's trainer settings for one run (``k``, ``eps``, ``clip``: None when unused;
    ``options``: further TrainSettings fields)."""
    from zoprivacy.finetune import TrainSettings

    return TrainSettings(
        method=method,
        steps=steps,
        lr=lr,
        batch_size=BATCH_SIZE,
        directions=k or 1,
        clip_norm=math.inf if clip is None else clip,
        perturbation_scale=PERTURBATION_SCALE,
        weight_decay=0.0,
        epsilon=2.0 if eps is None else eps,
        delta=DELTA,
        seed=seed,
        **options,
    )


def _train(feats: TaskFeatures, settings: Any) -> tuple[int, dict[str, Any], float]:
    """Run the job's trainer on the cached training features: (steps done, privacy facts and
    the direction kind of the last zeroth-order step, ε spent)."""
    from zoprivacy.accounting import PrivacyBudgetExceeded
    from zoprivacy.finetune import make_trainer
    from zoprivacy.tasks import TensorDictDataset

    train = feats.features["train"]
    dataset = TensorDictDataset(dict(train))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(feats.classifier, dataset, settings)
        for batch in trainer.loader:
            try:
                trainer.step(batch)
            except PrivacyBudgetExceeded:
                break
        if hasattr(trainer, "close"):
            trainer.close()
    stats = getattr(trainer, "last_stats", None)  # the direction kind the last step used
    facts = {**trainer.privacy, "directions_used": getattr(stats, "directions", None)}
    return trainer.steps_done, facts, trainer.epsilon_spent()


# ---------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------


def cells(
    tasks: Sequence[str],
    methods: Sequence[str],
    epsilons: Sequence[float],
    steps: int,
    dpzo_cap: int,
    ks: dict[str, Sequence[int]],
) -> list[dict[str, Any]]:
    """The (task, method, K, ε, steps, comparison) cells, in the order they run."""
    out: list[dict[str, Any]] = []
    for task in tasks:
        for method in methods:
            if method == "zeroshot":
                out.append(_cell(task, method, None, None, 0, "untrained"))
                continue
            eps_list: list[float | None] = (
                list(epsilons) if method in ("dpaggzo", "dpzo", "dpadamw") else [None]
            )
            for eps in eps_list:
                if method in ("dpadamw", "adamw"):
                    out.append(_cell(task, method, None, eps, steps, "equal_steps"))
                    continue
                for k in ks.get(method, ZO_K[method]):
                    out.append(_cell(task, method, k, eps, steps, "equal_steps"))
                if method == "dpzo" and dpzo_cap > steps:
                    budget = min(REFERENCE_K * steps, dpzo_cap)
                    out.append(_cell(task, method, 1, eps, budget, "equal_forward_passes"))
    return out


def _cell(task, method, k, eps, steps, comparison) -> dict[str, Any]:
    return {
        "task": task,
        "method": method,
        "K": k,
        "epsilon": eps,
        "steps": steps,
        "comparison": comparison,
    }


def _cell_of(row: dict[str, Any]) -> tuple:
    """The cell a row of utility.json belongs to (its planned steps, not the steps done)."""
    return (
        row.get("model", "minilm"),
        row["task"],
        row["method"],
        row["K"],
        row["epsilon"],
        row["steps_planned"],
        row["comparison"],
    )


def _cell_id(cell: dict[str, Any]) -> tuple:
    """A cell of :func:`cells` as :func:`_cell_of` gives it for its rows."""
    return _cell_of({**cell, "steps_planned": cell["steps"]})


def _key(row: dict[str, Any]) -> tuple:
    return (*_cell_of(row), row["seed"], row["lr"])


def _load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return json.loads(path.read_text())


def _save(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def run_cells(
    cell_list: list[dict[str, Any]],
    seeds: Sequence[int],
    path: Path,
    *,
    features: dict[str, TaskFeatures],
    make_features,
    grid: dict[str, list[float]],
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every cell: the grid (seed 0), the selection on validation, then the other seeds."""
    from tqdm.auto import tqdm

    rows = _load(path)
    done = {_key(r) for r in rows}
    total = sum(
        len(grid[c["method"]]) + len([s for s in seeds if s != GRID_SEED]) for c in cell_list
    )
    bar = tqdm(total=total, desc="utility", unit="run", disable=not progress, file=sys.stderr)
    for cell in cell_list:
        values = grid[cell["method"]]
        lr_of_run = {}
        for lr in values:  # grid runs on the grid seed
            lr_of_run[lr] = _run_or_skip(
                cell, GRID_SEED, lr, rows, done, path, features, make_features, values, bar
            )
        best_lr = first_best(values, lambda v, runs=lr_of_run: runs[v]["validation_accuracy"])
        for r in rows:
            if _matches(r, cell):
                r["grid"] = {"lr": list(values)} if cell["method"] != "zeroshot" else {}
                if r["seed"] == GRID_SEED:
                    r["selected"] = r["lr"] == best_lr if r["lr"] is not None else True
                elif r["lr"] != best_lr:
                    r["selected"] = False  # another seed of a value the grid no longer selects
        for seed in seeds:
            if seed == GRID_SEED:
                continue
            row = _run_or_skip(
                cell, seed, best_lr, rows, done, path, features, make_features, values, bar
            )
            row["selected"] = True
        _save(path, rows)
    bar.close()
    return rows


def first_best(values: Sequence[Any], score) -> Any:
    """The selection rule of every grid here: the value with the highest ``score`` (the
    validation accuracy), the first in grid order on a tie."""
    values = list(values)
    return max(values, key=lambda v: (score(v), -values.index(v)))


def _matches(row: dict[str, Any], cell: dict[str, Any]) -> bool:
    return _cell_of(row) == _cell_id(cell)


def _run_or_skip(cell, seed, lr, rows, done, path, features, make_features, values, bar):
    lr_key = None if cell["method"] == "zeroshot" else lr
    key = (*_cell_id(cell), seed, lr_key)
    if key in done:
        bar.update(1)
        return next(r for r in rows if _key(r) == key)
    if cell["task"] not in features:
        features[cell["task"]] = make_features(cell["task"])
    bar.set_postfix_str(
        f"{cell['task']} {cell['method']} K={cell['K']} eps={cell['epsilon']} "
        f"T={cell['steps']} lr={lr} seed={seed}"
    )
    row = run_one(
        features[cell["task"]],
        method=cell["method"],
        k=cell["K"],
        epsilon=cell["epsilon"],
        seed=seed,
        lr=lr,
        steps=cell["steps"],
    )
    row.update(
        comparison=cell["comparison"],
        selected=False,
        selected_on="validation",
        grid={"lr": list(values)} if cell["method"] != "zeroshot" else {},
        grid_seed=GRID_SEED,
        clip_beta=CLIP_BETA if cell["method"] in ("dpaggzo", "dpzo") else None,
    )
    rows.append(row)
    done.add(key)
    _save(path, rows)
    bar.update(1)
    return row


# ---------------------------------------------------------------------------------------------
# summary and plots
# ---------------------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std of the test accuracy of the selected rows, one entry per cell."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if not r.get("selected"):
            continue
        groups.setdefault(_cell_of(r), []).append(r)
    out = []
    for key, group in groups.items():
        acc = torch.tensor([g["test_accuracy"] for g in group], dtype=torch.float64)
        out.append(
            {
                "model": key[0],
                "task": key[1],
                "method": key[2],
                "K": key[3],
                "epsilon": key[4],
                "steps": key[5],
                "comparison": key[6],
                "lr": group[0]["lr"],
                "seeds": sorted(g["seed"] for g in group),
                "test_accuracy_mean": float(acc.mean()),
                "test_accuracy_std": float(acc.std()) if len(group) > 1 else 0.0,
                "wall_seconds_mean": sum(g["wall_seconds"] for g in group) / len(group),
                "forward_passes": group[0]["forward_passes"],
            }
        )
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The selected cells as a markdown table (mean ± std of the test accuracy over seeds)."""
    lines = [
        "| model | task | method | K | ε | T | comparison | lr (val.) | seeds | test acc. "
        "| s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = sorted(summarize(rows), key=_order)
    for s in summary:
        eps = "–" if s["epsilon"] is None else f"{s['epsilon']:g}"
        k = s["K"] if s["K"] is not None else "–"
        lines.append(
            f"| {s['model']} | {s['task']} | {s['method']} | {k} | {eps} "
            f"| {s['steps']} | {s['comparison']} | {s['lr'] if s['lr'] is not None else '–'} "
            f"| {len(s['seeds'])} | {s['test_accuracy_mean']:.3f} ± {s['test_accuracy_std']:.3f} "
            f"| {s['wall_seconds_mean']:.0f} |"
        )
    return "\n".join(lines)


#: Rows of :func:`paper_table`: (label, method, K, comparison, steps or None for "any").
PAPER_ROWS = (
    ("zero-shot / untrained", "zeroshot", None, "untrained", None),
    ("AdamW (non-private)", "adamw", None, "equal_steps", None),
    ("MeZO K=16 (non-private)", "mezo", 16, "equal_steps", None),
    ("DP-AdamW (Opacus)", "dpadamw", None, "equal_steps", None),
    ("DPZO (K=1), equal steps", "dpzo", 1, "equal_steps", None),
    ("DPZO, 16× steps (= K=16's forward passes)", "dpzo", 1, "equal_forward_passes", 16_000),
    ("DPZO, 64× steps (= K=64's forward passes)", "dpzo", 1, "equal_forward_passes", 64_000),
    ("DP-AggZO K=16", "dpaggzo", 16, "equal_steps", None),
    ("DP-AggZO K=64", "dpaggzo", 64, "equal_steps", None),
)


def paper_table(rows: list[dict[str, Any]], model: str) -> str:
    """One model's selected cells laid out like the paper's Table 1: a row per method, a column
    per (task, ε); non-private methods fill every ε column of their task. Empty: not run."""
    summary = [s for s in summarize(rows) if s["model"] == model]
    if not summary:
        return ""
    tasks = sorted({s["task"] for s in summary})
    epsilons = sorted({s["epsilon"] for s in summary if s["epsilon"] is not None})
    columns = [(t, e) for t in tasks for e in epsilons]
    head = " | ".join(f"{t} ε={e:g}" for t, e in columns)
    lines = [f"| {model} | {head} |", "|---" * (len(columns) + 1) + "|"]
    for label, method, k, comparison, steps in PAPER_ROWS:
        cells = []
        for task, eps in columns:
            found = [
                s
                for s in summary
                if s["task"] == task
                and s["method"] == method
                and s["K"] == k
                and s["comparison"] == comparison
                and (steps is None or s["steps"] == steps)
                and s["epsilon"] in (eps, None)
            ]
            if not found:
                cells.append("")
                continue
            s = found[0]
            n = len(s["seeds"])
            seeds = "" if n == 3 else f" ({n} seed{'s' * (n > 1)})"
            cells.append(f"{s['test_accuracy_mean']:.3f}±{s['test_accuracy_std']:.3f}{seeds}")
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _order(s: dict[str, Any]) -> tuple:
    return (
        MODELS.index(s.get("model", "minilm")),
        s["task"],
        s["comparison"] == "accuracy_vs_k",
        -1 if s["epsilon"] is None else s["epsilon"],
        ALL_METHODS.index(s["method"]),
        -(s["K"] or 0),
        s["steps"],
    )


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(
        {(s["model"], s["task"]) for s in summary}, key=lambda m: (MODELS.index(m[0]), m[1])
    )
    if not panels:
        return
    cols = min(2, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 4.5 * nrows), squeeze=False)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    for ax, (model, task) in zip(axes.flat, panels, strict=False):
        items = [
            s
            for s in summary
            if s["task"] == task and s["model"] == model and s["comparison"] != "accuracy_vs_k"
        ]
        items = sorted(items, key=_order, reverse=True)  # barh draws bottom-up
        labels = [_label(s) for s in items]
        means = [s["test_accuracy_mean"] for s in items]
        stds = [s["test_accuracy_std"] for s in items]
        ax.barh(range(len(items)), means, xerr=stds, color="tab:blue", alpha=0.8)
        ax.set_yticks(range(len(items)), labels, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("test accuracy (mean ± std over seeds)")
        ax.set_title(f"{model} {TRAINABLE[model]}, {task}")
        for i, m in enumerate(means):
            ax.text(min(m + 0.02, 0.9), i, f"{m:.3f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _label(s: dict[str, Any]) -> str:
    eps = "non-private" if s["epsilon"] is None else f"ε={s['epsilon']:g}"
    k = "" if s["K"] is None else f" K={s['K']}"
    extra = " (equal fwd)" if s["comparison"] == "equal_forward_passes" else ""
    return f"{s['method']}{k} {eps} T={s['steps']}{extra}"


def plot_vs_k(rows: list[dict[str, Any]], path: Path) -> None:
    """Figure 5: test accuracy against K, one line per (model, task, ε), mean ± std over the
    seeds of the selected ``accuracy_vs_k`` cells (:func:`summarize`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple, list[dict[str, Any]]] = {}
    for s in summarize(rows):
        if s["comparison"] == "accuracy_vs_k":
            key = (s["model"], s["task"], s["epsilon"], s["steps"])
            lines.setdefault(key, []).append(s)
    if not lines:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (model, task, eps, steps), cells in sorted(lines.items(), key=str):
        cells.sort(key=lambda s: s["K"])
        counts = [len(s["seeds"]) for s in cells]
        low, high = min(counts), max(counts)
        seeds = f"{low}" if low == high else f"{low}-{high}"
        label = f"{model} {task}, ε={eps:g}, T={steps} ({seeds} seed{'s' * (high > 1)})"
        ax.errorbar(
            [s["K"] for s in cells],
            [s["test_accuracy_mean"] for s in cells],
            yerr=[s["test_accuracy_std"] for s in cells],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (directions per step)")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title("DP-AggZO accuracy against K (c = 0.8/√K, fixed lr)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.utility", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one cell, two steps (CI)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--model", default="minilm", choices=MODELS, help="default minilm")
    parser.add_argument("--tasks", default=",".join(ALL_TASKS))
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epsilons", default="2,6")
    parser.add_argument("--steps", type=int, default=1000, help="steps T of every method")
    parser.add_argument("--ks", default="", help="DP-AggZO K values (default 64,16)")
    parser.add_argument(
        "--dpzo-cap",
        type=int,
        default=16000,
        help="cap on DPZO's steps at DP-AggZO K=64's forward-pass budget (64 T); 0: no run",
    )
    parser.add_argument(
        "--comparisons",
        default="",
        help="only these cells: untrained,equal_steps,equal_forward_passes (default all)",
    )
    parser.add_argument("--grid", default="", help="override: METHOD=lr1,lr2;METHOD=...")
    parser.add_argument(
        "--figure5",
        action="store_true",
        help="accuracy against K (DP-AggZO, K in 1,4,16,64 or --ks, first ε, every task and seed)",
    )
    parser.add_argument("--figure5-lr", type=float, default=None)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/zoprivacy-utility-cache"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--table",
        action="store_true",
        help="print the markdown tables of --out/utility.json, redraw its two plots, and exit",
    )
    return parser


def _show_tables(out: Path) -> None:
    """``--table``: print the tables of ``out/utility.json`` and redraw its two plots."""
    rows = _load(out / "utility.json")
    for model in MODELS:
        table = paper_table(rows, model)
        if table:
            print(table + "\n")
    print(markdown_table(rows))
    plot(summarize(rows), out / "utility_accuracy.png")
    plot_vs_k(rows, out / "utility_vs_k.png")


def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The runs the arguments ask for: tasks, methods, seeds, ε, K, grid and data sizes."""
    grid = {k: list(v) for k, v in GRID.items()}
    for part in filter(None, args.grid.split(";")):
        name, values = part.split("=")
        grid[name.strip()] = _floats(values)
    plan: dict[str, Any] = {
        "tasks": [t for t in args.tasks.split(",") if t],
        "methods": [m for m in args.methods.split(",") if m],
        "seeds": _ints(args.seeds),
        "epsilons": _floats(args.epsilons),
        "ks": {"dpaggzo": _ints(args.ks)} if args.ks else {},
        "grid": grid,
        "sizes": (PER_CLASS_TRAIN, None, None, None),  # per class, validation, test, length
        "cache_dir": args.cache_dir,
        "name": "utility",
    }
    if args.quick:
        args.steps, args.dpzo_cap = 2, 0
        grid["dpaggzo"] = [1.0]
        plan.update(
            tasks=["rotten_tomatoes"], methods=["dpaggzo"], seeds=[0], epsilons=[2.0],
            ks={"dpaggzo": [4]}, sizes=(8, 8, 16, 32), cache_dir=None, name="utility_quick",
        )  # fmt: skip
    unknown = set(plan["methods"]) - set(ALL_METHODS) or set(plan["tasks"]) - set(ALL_TASKS)
    if unknown:
        parser.error(f"unknown {sorted(unknown)}")
    return plan


def _cell_list(args: argparse.Namespace, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The cells to run (``--figure5``: DP-AggZO at each K, first ε), tagged with the model."""
    if args.figure5:
        cell_list = [
            _cell(task, "dpaggzo", k, plan["epsilons"][0], args.steps, "accuracy_vs_k")
            for task in plan["tasks"]
            for k in plan["ks"].get("dpaggzo", FIGURE5_K)
        ]
    else:
        cell_list = cells(
            plan["tasks"], plan["methods"], plan["epsilons"], args.steps, args.dpzo_cap, plan["ks"]
        )
        if args.comparisons:
            wanted = set(args.comparisons.split(","))
            cell_list = [c for c in cell_list if c["comparison"] in wanted]
    for c in cell_list:
        c["model"] = args.model
    return cell_list


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.table:
        _show_tables(args.out)
        return 0
    torch.set_num_threads(1)
    plan = _plan(args, parser)
    per_class, val_size, test_size, max_length = plan["sizes"]

    def make_features(task: str) -> TaskFeatures:
        return TaskFeatures(
            task,
            per_class_train=per_class,
            validation_size=VALIDATION_SIZE[task] if val_size is None else val_size,
            test_size=test_size,
            max_length=max_length,
            cache_dir=plan["cache_dir"],
            model=args.model,
        )

    grid = plan["grid"]
    if args.figure5:
        lr = args.figure5_lr if args.figure5_lr is not None else grid["dpaggzo"][0]
        grid = {"dpaggzo": [lr]}
    name = plan["name"]
    rows = run_cells(
        _cell_list(args, plan),
        plan["seeds"],
        args.out / f"{name}.json",
        features={},
        make_features=make_features,
        grid=grid,
        progress=not args.no_progress,
    )
    summary = summarize(rows)
    print(f"machine: {machine()}", file=sys.stderr)
    plot(summary, args.out / f"{name}_accuracy.png")
    plot_vs_k(rows, args.out / f"{name}_vs_k.png")
    for s in sorted(summary, key=lambda s: (s["model"], s["task"], s["method"], str(s["epsilon"]))):
        print(
            f"{s['model']:8s} {s['task']:16s} {_label(s):45s} lr={s['lr']}  "
            f"test {s['test_accuracy_mean']:.4f} "
            f"± {s['test_accuracy_std']:.4f}  seeds {s['seeds']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
