"""What a ``zoprivacy finetune`` run writes: report, weights, model card, diagnostics.

Layout of the output folder::

    DIR/
      config.json                    the resolved configuration (used by --resume)
      checkpoint.pt                  resumable training state (parameters, optimizer, accountant, ñ)
      state.json                     per-session bookkeeping (accuracy before, steps run)
      report.json                    the public summary: accuracies, ε, σ, ψ, q, T, the noise
      trainable_weights.safetensors  the fine-tuned trainable tensors
      README.md                      the model card, with the privacy guarantee
      diagnostics/                   NON-PRIVATE: do not share with the weights
        README.txt
        history.jsonl                one line per step: loss, clip fraction, clipping errors, |B|
        training.png                 loss, clip fraction and batch clipping error per step
        resources.json               wall time and peak memory of each session and of the run

The per-step loss, clip fraction, clipping errors and batch size are computed from the private
training batch *without noise*, and the wall time and memory depend on the batch sizes (a timing
side channel, ``docs/threat_model.md``): they are diagnostics for whoever holds the data, outside
the guarantee, and live in ``diagnostics/`` so that the folder can be left out when the weights
are shared. Nothing private is printed unless ``--show-private-diagnostics`` is given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from zoprivacy.run.checkpoint import atomic_write

DIAGNOSTICS_WARNING = (
    "NON-PRIVATE DIAGNOSTICS: the per-step loss, clip fraction, clipping errors and batch sizes "
    "are computed from the private training batches without noise, and the wall time and memory "
    "in resources.json depend on the batch sizes. They are not covered by the "
    "differential-privacy guarantee and must not be published or shared with the weights."
)

WEIGHTS_FILE = "trainable_weights.safetensors"
CARD_FILE = "README.md"
REPORT_FILE = "report.json"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
CHECKPOINT_FILE = "checkpoint.pt"
JOURNAL_FILE = "journal.jsonl"  # write-ahead journal of the private zeroth-order methods
DIAGNOSTICS_DIR = "diagnostics"
HISTORY_FILE = f"{DIAGNOSTICS_DIR}/history.jsonl"
PLOT_FILE = f"{DIAGNOSTICS_DIR}/training.png"
RESOURCES_FILE = f"{DIAGNOSTICS_DIR}/resources.json"


def json_safe(value: Any) -> Any:
    """JSON-friendly copy: non-finite floats become strings ("inf") or null (NaN)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (UTF-8)."""

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# per-step history (non-private)
# ---------------------------------------------------------------------------------------------


class History:
    """The per-step diagnostics, appended to ``diagnostics/history.jsonl`` as steps run."""

    def __init__(self, root: Path, *, keep_steps_below: int | None = None) -> None:
        self.path = root / HISTORY_FILE
        self.rows: list[dict[str, Any]] = []
        if keep_steps_below is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    if int(row["step"]) < keep_steps_below:
                        self.rows.append(row)
        # rewrite: drops the steps a crash ran past the last checkpoint (they are run again)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, "".join(json.dumps(json_safe(r)) + "\n" for r in self.rows))
        readme = root / DIAGNOSTICS_DIR / "README.txt"
        if not readme.exists():
            write_text(readme, DIAGNOSTICS_WARNING + "\n")
        self._fh = open(self.path, "a", encoding="utf-8")  # closed in close()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._fh.write(json.dumps(json_safe(row)) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def record_session(root: Path, session: Mapping[str, Any]) -> None:
    """Append a session's steps, wall time and peak memory to ``diagnostics/resources.json``."""
    path = root / RESOURCES_FILE
    resources = read_json(path) if path.exists() else {"sessions": []}
    resources["sessions"].append(dict(session))
    write_json(path, resources)


def finish_resources(root: Path, wall_seconds: float, peak_memory_mib: float) -> dict[str, Any]:
    """Add the finished run's wall time (this session and all) and peak memory to
    ``diagnostics/resources.json`` (private: timing is a side channel); returns its content."""
    path = root / RESOURCES_FILE
    resources = read_json(path) if path.exists() else {"sessions": []}
    earlier = sum(s.get("wall_seconds", 0.0) for s in resources["sessions"][:-1])
    resources.update(
        wall_seconds=wall_seconds,
        wall_seconds_all_sessions=earlier + wall_seconds,
        peak_memory_mib=peak_memory_mib,
    )
    write_json(path, resources)
    return resources


def plot_history(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Loss, clip fraction and clipping errors per step as a PNG; False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False

    def column(key: str) -> list[float]:
        out = []
        for r in rows:
            v = r.get(key)
            out.append(math.nan if v is None or isinstance(v, str) else float(v))
        return out

    steps = [int(r["step"]) + 1 for r in rows]
    fig = Figure(figsize=(8, 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 1, sharex=True)
    axes[0].plot(steps, column("loss"), lw=0.8, color="tab:blue")
    axes[0].plot(steps, _running_mean(column("loss"), 25), lw=1.8, color="navy", label="mean of 25")
    axes[0].set_ylabel("training loss")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].plot(steps, column("clip_fraction"), lw=0.8, color="tab:orange")
    axes[1].set_ylabel("clip fraction")
    axes[1].set_ylim(-0.02, 1.02)
    axes[2].plot(steps, column("batch_clip_error"), lw=0.8, color="tab:red", label="batch (eq. 27)")
    axes[2].plot(
        steps, column("max_clip_error"), lw=0.8, color="tab:gray", label="max individual (eq. 26)"
    )
    axes[2].set_ylabel("clipping error")
    axes[2].legend(loc="upper right", fontsize=8)
    eps = column("epsilon")
    if any(not math.isnan(e) for e in eps):
        axes[3].plot(steps, eps, color="tab:green")
        axes[3].set_ylabel("ε spent")
    else:
        axes[3].text(0.5, 0.5, "not private", ha="center", va="center", transform=axes[3].transAxes)
        axes[3].set_ylabel("ε spent")
    axes[3].set_xlabel("step")
    fig.suptitle(f"{title}\nNON-PRIVATE DIAGNOSTICS: do not share", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return True


def _running_mean(values: list[float], window: int) -> list[float]:
    out: list[float] = []
    recent: list[float] = []
    for v in values:
        if not math.isnan(v):
            recent.append(v)
            if len(recent) > window:
                recent.pop(0)
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


# ---------------------------------------------------------------------------------------------
# weights and model card
# ---------------------------------------------------------------------------------------------


def save_weights(state: Mapping[str, Any], path: Path, metadata: Mapping[str, Any]) -> None:
    """The trainable tensors as safetensors (atomic), with string metadata."""
    from safetensors.torch import save_file

    meta = {k: str(v) for k, v in metadata.items()}
    atomic_write(path, lambda tmp: save_file(dict(state), tmp, metadata=meta))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        return f"{value:.{digits}g}"
    return str(value)


def _clip_norms(r: Mapping[str, Any]) -> str:
    """c, or c per DP-ZOSO stage (each step's sensitivity is its own c, noise σ·c)."""
    stages = r.get("stages") or []
    norms = [(s["from_step"], s["clip_norm"]) for s in stages]
    if len({c for _, c in norms}) <= 1:
        return _fmt(r["clip_norm"])
    return ", ".join(f"{_fmt(c)} from step {start}" for start, c in norms)


def _step_lines(r: Mapping[str, Any]) -> list[str]:
    """The zeroth-order step of the run (directions, difference, path, mask, stages)."""
    if r.get("direction_distribution") is None:
        return []
    difference = {
        "central": "central differences (L(θ+φz) − L(θ−φz))/2φ",
        "forward": "forward differences (L(θ+φz) − L(θ))/φ",
    }.get(r["difference"], str(r["difference"]))
    lines = [
        "",
        "## Zeroth-order step",
        "",
        f"- {r['direction_distribution']} directions, {difference}; perturbation path "
        f"`{r.get('perturbation_path')}` (requested `{r['perturbation']}`)"
        + (
            f", {r['batched_directions']} directions per batched call"
            if r.get("batched_directions")
            else ""
        )
        + ";",
    ]
    if r.get("mask"):
        lines.append(f"- {_mask_text(r['mask'])}")
    if r.get("stages"):
        lines.append(_stages_line(r["stages"]))
    return lines


def _mask_text(mask: Mapping[str, Any]) -> str:
    """The DP-ZOPO mask in words."""
    if mask["type"] == "magnitude":
        which = "largest" if mask["largest"] else "smallest"
        return (
            f"DP-ZOPO magnitude mask: each step perturbs and updates the "
            f"{_fmt(100 * mask['density'], 3)}% of each tensor's coordinates with the "
            f"{which} |θ| (computed from the current weights, a post-processing of public "
            "values);"
        )
    return (
        f"DP-ZOPO random mask: each coordinate kept with probability "
        f"{_fmt(mask['density'])}, drawn from the public seed {mask.get('seed')} and "
        f"redrawn every {mask['every']} steps;"
    )


def _stages_line(stages: Iterable[Mapping[str, Any]]) -> str:
    """The DP-ZOSO stages, each with all its values."""
    parts = []
    for s in stages:
        fields = [f"K = {s['directions']}"]
        if s.get("clip_norm") is not None:
            fields.append(f"c = {_fmt(s['clip_norm'])}")
        fields += [f"η = {_fmt(s['lr'])}", f"φ = {_fmt(s['perturbation_scale'])}"]
        parts.append(f"from step {s['from_step']}: " + ", ".join(fields))
    return (
        "- DP-ZOSO stages (σ is the same calibrated constant in every stage): "
        + "; ".join(parts)
        + "."
    )


def model_card(report: Mapping[str, Any], load_snippet: str, covered: Iterable[str]) -> str:
    """The model card (Markdown) of a finished run."""
    r = report
    lines = [
        f"# {r['model']} fine-tuned on {r['task']} with {r['method']} (zoprivacy)",
        "",
        f"Trainable selection `{r['trainable']}` ({r['trainable_parameters']:,} parameters); "
        f"everything else is the public pre-trained model.",
        "",
        "| | |",
        "|---|---|",
        f"| test accuracy before | {_fmt(r['test_accuracy_before'])} |",
        f"| test accuracy after | {_fmt(r['test_accuracy_after'])} |",
        f"| test records | {r['test_records']} |",
        f"| steps | {r['steps']} |",
        "",
        "## Privacy guarantee",
        "",
        *_guarantee_lines(r, covered),
        *_step_lines(r),
        *_files_lines(r, load_snippet),
    ]
    return "\n".join(lines)


def _guarantee_lines(r: Mapping[str, Any], covered: Iterable[str]) -> list[str]:
    """What the guarantee is, what it covers (the noise as drawn), what is public, what not."""
    lines: list[str] = []
    if r.get("private"):
        pld = r.get("epsilon_spent_pld")
        pld_line = (
            f" The PLD accountant (Google dp-accounting, same events) gives ε = {_fmt(pld)}."
            if pld is not None
            else ""
        )
        lines += [
            f"The released weights are **(ε = {_fmt(r['epsilon_spent'])}, "
            f"δ = {_fmt(r['delta'])})-differentially private** with respect to the training "
            "records, under add/remove-one-record neighbouring datasets. ε is computed by "
            "zoprivacy's RDP accountant: the Rényi-DP composition of the release of the noisy "
            "training-set size and of every step (Lemma 5 of Bao et al., USENIX Security 2025), "
            "converted to (ε, δ) with the Canonne-Kamath-Steinke conversion, minimised over the "
            f"Rényi orders.{pld_line}",
            "",
            "What is covered:",
            "",
            *[f"- {item}" for item in covered],
            f"- the one release of the training-set size ñ = n + Lap(ψ), ψ = "
            f"{_fmt(r['laplace_scale'])} ({_fmt(100 * r['size_fraction'], 3)}% of ε), which fixes "
            f"the expected batch size b = q·ñ = {_fmt(r['expected_batch_size'])}; it is "
            "included in ε;",
            f"- {r['steps']} Poisson-subsampled Gaussian steps with sample rate q = "
            f"{_fmt(r['sample_rate'])}, noise multiplier σ = {_fmt(r['noise_multiplier'])} and "
            f"clip norm c = {_clip_norms(r)}; the Poisson batches and the size noise were "
            f"drawn from OS entropy, and {r.get('noise') or 'the step noise from OS entropy'}.",
            "",
            "What is public (not protected, and not needed to be): the pre-trained model and "
            "its tokenizer, the initialisation of the new head (seeded), the seed of the "
            "train/test split, the seeds of the zeroth-order directions, and every "
            "hyper-parameter in `report.json`.",
            "",
            "Not covered: the test accuracies (computed on held-out test records, without noise) "
            "and anything in `diagnostics/` (per-step loss, clip fraction, clipping errors and "
            "batch sizes of the private batches, without noise; wall time and memory, which "
            "depend on the batch sizes). **Do not share `diagnostics/` "
            "with the weights.** The default hyper-parameters of `zoprivacy finetune` were "
            "chosen by experiments on the packaged data sets; that choice is not accounted for.",
        ]
    else:
        lines += [
            f"**None.** `{r['method']}` is not differentially private: the weights can reveal "
            "the training records. Use `--method dpaggzo`, `dpzo` or `dpadamw` for a private run.",
        ]
    return lines


def _files_lines(r: Mapping[str, Any], load_snippet: str) -> list[str]:
    return [
        "",
        "## Files",
        "",
        f"- `{WEIGHTS_FILE}`: the trainable tensors, named as in the model's `named_parameters()`;",
        f"- `{REPORT_FILE}`: the public summary (privacy parameters, accuracies);",
        f"- `{DIAGNOSTICS_DIR}/`: non-private training diagnostics, wall time and memory (keep "
        "them to yourself).",
        "",
        "## Loading",
        "",
        "```python",
        load_snippet,
        "```",
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(json_safe(r.get("config", {})), indent=2),
        "```",
        "",
    ]
