"""``zoprivacy finetune``: a real private fine-tune of a packaged model, end to end.

The job loads a packaged model and data set, splits the data (public seed), evaluates the test
accuracy, fine-tunes the trainable selection with the chosen method under an (ε, δ) budget,
evaluates again and writes a report, the weights, a model card and non-private diagnostics to
``--output`` (see :mod:`zoprivacy.finetune._outputs` for the layout).

Interrupting (Ctrl-C) finishes the current step, saves a checkpoint and exits with status 130;
``--resume`` with the same ``--output`` continues from it without releasing ñ again or
re-counting a step. A second Ctrl-C stops at once (the checkpoint then charges the interrupted
step, which is conservative).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from zoprivacy import __version__
from zoprivacy.accounting import PrivacyBudgetExceeded
from zoprivacy.cli import ensure_passive_wait, pld_epsilon_or_none
from zoprivacy.tasks import TensorDictDataset

from . import _outputs as out
from . import export
from ._config import resolve_config
from ._methods import ZO_METHODS
from ._options import add_arguments as _add_options
from ._options import train_settings
from ._progress import Progress, say
from ._setup import Classifier, SetupError
from ._step_options import step_report
from ._train import make_trainer
from ._user import (
    MODEL_DIR,
    covered_records,
    load_data,
    load_job_model,
    task_name,
    test_is_private,
    write_model_folder,
)

__all__ = ["add_arguments", "resolve_config", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Fine-tune a model privately (DP-AggZO and baselines); writes report and weights."""
    parser.description = (
        "Fine-tune a packaged model or your own Hugging Face folder (--model) on a packaged "
        "data set or your own labelled file (--train-file, --test-file) with DP-AggZO (or a "
        "baseline) under an (ε, δ) budget, and write report.json, the trainable weights "
        "(safetensors), the model as a Hugging Face folder (model/), a model card and "
        "non-private diagnostics to --output. The defaults run a private (ε = 2, δ = 1e-5) "
        "DP-AggZO fine-tune of MiniLM's classifier on BBC News topics on one CPU thread; its "
        "measured run time and memory are in benchmarks/results/finetune_default_report.json."
    )
    _add_options(parser)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``zoprivacy finetune``; returns the exit status."""
    started = time.monotonic()
    try:
        return _run(args, started)
    except KeyboardInterrupt:
        print("zoprivacy finetune: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, ImportError, RuntimeError) as exc:
        # one line, whatever the original message: the CLI prints it after "error: "
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise RuntimeError(message) from None


# ---------------------------------------------------------------------------------------------
# Ctrl-C between steps
# ---------------------------------------------------------------------------------------------


class GracefulStop:
    """While active, the first SIGINT only asks the loop to stop after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nzoprivacy finetune: stopping after this step (Ctrl-C again to stop at once)",
            file=sys.stderr,
        )

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------

#: Said once on screen when ``--show-private-diagnostics`` is given.
PRIVATE_NOTICE = (
    "zoprivacy finetune: --show-private-diagnostics: the loss, clip fraction, wall time and peak "
    "memory shown below are PRIVATE (computed from the training data without noise, not covered "
    "by the differential-privacy guarantee); do not share this output"
)


def peak_memory_mib() -> float:
    """Peak resident memory of this process (ru_maxrss) in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


_say = say


@dataclasses.dataclass
class _Loaded:
    """The model and data of a run, and the test accuracy before training."""

    task: Any
    classifier: Classifier
    test: Any
    test_features: Any  # the test records' frozen-prefix output, when the cache is on
    dataset: Any  # the training records (None for zeroshot)
    before: dict[str, float]  # the test metrics before training (accuracy; loss, exact match)
    data: Any = None  # the TaskData (packaged) or UserData (the user's files)


def _run(args: argparse.Namespace, started: float) -> int:
    cfg = resolve_config(args)
    resume = bool(getattr(args, "resume", False))
    root = Path(cfg.output)
    _check_output(root, resume)
    ensure_passive_wait(cfg.threads)  # e.g. threads from --config: before anything is written
    torch.set_num_threads(cfg.threads)
    root.mkdir(parents=True, exist_ok=True)
    out.write_json(root / out.CONFIG_FILE, cfg.run_dict())
    state_path = root / out.STATE_FILE
    state = out.read_json(state_path) if resume and state_path.exists() else {"sessions": []}
    _say(
        f"zoprivacy finetune: {cfg.method}, model {cfg.model}, data {task_name(cfg)}, output {root}"
    )
    if cfg.show_private_diagnostics:
        _say(PRIVATE_NOTICE)
    loaded = _load(cfg, root, state)
    if cfg.method == "zeroshot":
        return _finish(cfg, root, loaded, None, [], dict(loaded.before), started, None)
    trained = _train(cfg, root, loaded, state, resume, started)
    if isinstance(trained, int):
        return trained
    trainer, rows, stopped_early = trained
    _say("evaluating the fine-tuned model")
    after = loaded.classifier.evaluate(loaded.test, features=loaded.test_features)
    _say(_metrics_text(after, "after") + _private_note(loaded))
    return _finish(cfg, root, loaded, trainer, rows, after, started, stopped_early)


def _metrics_text(metrics: dict[str, float], when: str) -> str:
    """``"test accuracy before: 0.5000"`` (one item per metric)."""
    return ", ".join(
        f"test {name.replace('_', ' ')} {when}: {value:.4f}" for name, value in metrics.items()
    )


def _private_note(loaded: _Loaded) -> str:
    if test_is_private(loaded.data):
        return " (carved from the private training file: NOT covered by the guarantee)"
    return ""


def _check_output(root: Path, resume: bool) -> None:
    """A new run needs a fresh folder; --resume needs an unfinished run."""
    if resume:
        report_path = root / out.REPORT_FILE
        if report_path.exists() and out.read_json(report_path).get("completed"):
            raise SetupError(f"--resume: the run in {root} is already complete")
    elif (root / out.CONFIG_FILE).exists() or (root / out.CHECKPOINT_FILE).exists():
        raise SetupError(
            f"{root} already holds a run: pass --resume to continue it, or choose a new --output"
        )


def _load(cfg: Any, root: Path, state: dict[str, Any]) -> _Loaded:
    """Load the data and the model, encode the data, and evaluate the starting model (once).

    Every bad file or option fails here, before any privacy budget is spent."""
    _say("reading the data")
    task = load_data(cfg)
    _say(f"loading the model {cfg.model}")
    classifier = load_job_model(cfg, task)
    test = classifier.encode_part(task, "test")
    dataset = test_features = None
    if cfg.method != "zeroshot":
        train = classifier.encode_part(task, "train")
        dataset = TensorDictDataset(train)
        if cfg.cache and classifier.cache_plan() is not None:
            _say("caching the frozen layers' output for the training and test records")
            try:
                classifier.build_cache(train)
            except KeyboardInterrupt:
                _say(
                    "zoprivacy finetune: interrupted while caching (no privacy budget spent). "
                    f"Continue with: zoprivacy finetune --output {root} --resume"
                )
                raise
            if classifier.verify_cache(test):
                dataset = classifier.cached_dataset(train["labels"])
                test_features = classifier.prefix_features(test)
    before = state.get("test_metrics_before")
    if before is None and state.get("test_accuracy_before") is not None:  # an older state.json
        before = {"accuracy": state["test_accuracy_before"]}
    if before is None:
        _say(f"evaluating the starting model on {len(task.test_texts)} test records")
        before = classifier.evaluate(test, features=test_features)
        state["test_metrics_before"] = before
        if "accuracy" in before:
            state["test_accuracy_before"] = before["accuracy"]
        out.write_json(root / out.STATE_FILE, state)
    _say(_metrics_text(before, "before"))
    return _Loaded(task, classifier, test, test_features, dataset, before, task)


def _read_checkpoint(cfg: Any, path: Path, resume: bool) -> dict[str, Any] | None:
    if not (resume and path.exists()):
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint.get("format") != "zoprivacy.finetune/1" or checkpoint.get("method") != cfg.method:
        raise SetupError(f"{path} is not a checkpoint of this run")
    return checkpoint


def _train(
    cfg: Any, root: Path, loaded: _Loaded, state: dict, resume: bool, started: float
) -> tuple[Any, list[dict[str, Any]], str | None] | int:
    """Train (or continue); returns (trainer, history rows, why it stopped early), or 130 when
    interrupted (the checkpoint is saved)."""
    checkpoint_path = root / out.CHECKPOINT_FILE
    checkpoint = _read_checkpoint(cfg, checkpoint_path, resume)
    with GracefulStop() as stop:
        trainer = make_trainer(
            loaded.classifier,
            loaded.dataset,
            train_settings(cfg),
            checkpoint=checkpoint,
            journal=root / out.JOURNAL_FILE,
            resume=resume,
        )
        if checkpoint is None:
            trainer.save(checkpoint_path)  # ñ is released: record it before any step
        history = out.History(root, keep_steps_below=trainer.steps_done)
        session = {"from_step": trainer.steps_done}
        try:
            stopped_early = _train_loop(cfg, trainer, history, stop, checkpoint_path)
        except BaseException as exc:
            # Interrupted, or a crash inside a step: keep what was done. The accountant has
            # already charged a failed step, so the saved ε over-counts (conservative).
            try:
                trainer.save(checkpoint_path)
                crashed = not isinstance(exc, KeyboardInterrupt)
                _end_session(root, state, session, trainer.steps_done, started, crashed=crashed)
            finally:
                history.close()
            if isinstance(exc, KeyboardInterrupt):
                _say(
                    f"zoprivacy finetune: interrupted after step {trainer.steps_done}/"
                    f"{trainer.steps_total}; checkpoint saved. Continue with: zoprivacy "
                    f"finetune --output {root} --resume"
                )
                return 130
            raise
        history.close()
    _end_session(root, state, session, trainer.steps_done, started)
    if hasattr(trainer, "close"):
        trainer.close()
    return trainer, history.rows, stopped_early


def _end_session(
    root: Path, state: dict, session: dict, steps_done: int, started: float, *, crashed=False
) -> None:
    """Record a session: its steps in state.json, its wall time (private) in diagnostics/."""
    session["to_step"] = steps_done
    if crashed:
        session["crashed"] = True
    state["sessions"].append(session)
    out.write_json(root / out.STATE_FILE, state)
    private = {"wall_seconds": time.monotonic() - started, "peak_memory_mib": peak_memory_mib()}
    out.record_session(root, {**session, **private})


def _train_loop(cfg: Any, trainer: Any, history: Any, stop: Any, checkpoint_path: Path) -> Any:
    """Run the remaining steps; returns why it stopped early (None when it ran them all)."""
    bar = Progress(trainer.steps_total, trainer.steps_done, cfg.method, enabled=cfg.progress)
    smooth = None
    stopped = None
    try:
        for batch in trainer.loader:
            if stop.requested:
                raise KeyboardInterrupt
            step = trainer.steps_done
            try:
                diag = trainer.step(batch)
            except PrivacyBudgetExceeded as exc:
                stopped = f"privacy budget exhausted before step {step + 1}: {exc}"
                _say(f"zoprivacy finetune: {stopped}")
                break
            eps = trainer.epsilon_spent()
            history.append({"step": step, **diag, "epsilon": eps})
            if not math.isnan(diag["loss"]):
                smooth = diag["loss"] if smooth is None else 0.95 * smooth + 0.05 * diag["loss"]
            private = (smooth, diag["clip_fraction"]) if cfg.show_private_diagnostics else None
            bar.update(_postfix(eps, private))
            if trainer.steps_done % cfg.checkpoint_every == 0:
                trainer.save(checkpoint_path)
        if stop.requested and trainer.steps_done < trainer.steps_total:
            raise KeyboardInterrupt
    finally:
        bar.close()
    trainer.save(checkpoint_path)
    return stopped


def _postfix(eps: float | None, private: tuple[float | None, float] | None) -> dict[str, str]:
    """The progress bar's values: ε spent (public); with ``--show-private-diagnostics`` also the
    smoothed loss and the clip fraction, labelled private."""
    postfix = {} if eps is None else {"ε": f"{eps:.3f}"}
    if private is not None:
        loss, clip = private
        postfix["private loss"] = "n/a" if loss is None else f"{loss:.4f}"
        postfix["private clip"] = f"{clip:.2f}"
    return postfix


# ---------------------------------------------------------------------------------------------
# the outputs
# ---------------------------------------------------------------------------------------------


def _finish(
    cfg: Any,
    root: Path,
    loaded: _Loaded,
    trainer: Any,
    rows: list[dict[str, Any]],
    after: dict[str, float],
    started: float,
    stopped_early: str | None,
) -> int:
    """Write report.json (public), the weights and model card, and the private resources."""
    report = {
        "zoprivacy_version": __version__,
        "completed": True,
        **_run_fields(cfg, loaded, trainer),
        **_privacy_fields(cfg, trainer),
        **step_report(cfg, trainer),  # directions, difference, path, mask, stages
        "stopped_early": stopped_early,
        **_accuracy_fields(loaded, after),
        "data": _data_fields(cfg, loaded),
        "threads": cfg.threads,
        "frozen_prefix_cache": loaded.classifier.cache_active,
        "config": cfg.run_dict(),
        "config_file": cfg.config,
        "device": str(loaded.classifier.device),
        "files": {"resources": out.RESOURCES_FILE},
        "diagnostics_warning": out.DIAGNOSTICS_WARNING,
    }
    resources = out.finish_resources(root, time.monotonic() - started, peak_memory_mib())
    if trainer is not None:
        _say("writing the weights, the model folder and the model card")
        _write_weights_and_card(cfg, root, loaded, report, rows)
        write_model_folder(cfg, root, loaded.classifier, report, loaded.data)
        report["files"]["model"] = MODEL_DIR
    out.write_json(root / out.REPORT_FILE, report)
    _print_summary(report, root, resources if cfg.show_private_diagnostics else None)
    return 0


def _run_fields(cfg: Any, loaded: _Loaded, trainer: Any) -> dict[str, Any]:
    return {
        "method": cfg.method,
        "model": cfg.model,
        "model_kind": loaded.classifier.kind,
        "task": task_name(cfg),
        "trainable": cfg.trainable,
        "trainable_parameters": loaded.classifier.num_trainable(),
        "steps": 0 if trainer is None else trainer.steps_done,
        "steps_planned": cfg.steps,
    }


def _privacy_fields(cfg: Any, trainer: Any) -> dict[str, Any]:
    """The guarantee's public facts: ε by RDP (and PLD), σ, ψ, q, b, ñ, c, K, η, φ, noise."""
    privacy: dict[str, Any] = {"private": False} if trainer is None else dict(trainer.privacy)
    private = bool(privacy.get("private"))
    eps = None if trainer is None else trainer.epsilon_spent()
    eps_pld = None
    if private and cfg.pld:
        eps_pld = pld_epsilon_or_none(
            noise_multiplier=privacy["noise_multiplier"],
            sample_rate=privacy["sample_rate"],
            steps=trainer.steps_done + privacy.get("abandoned_steps_charged", 0),
            delta=cfg.delta,
            laplace_scale=privacy["laplace_scale"],
        )
    fields = {
        "private": private,
        "epsilon_spent": eps if private else (0.0 if trainer is None else None),
        "epsilon_spent_pld": eps_pld,
        "accountant": "rdp" if private else None,
        "delta": cfg.delta,
        "target_epsilon": cfg.epsilon if private else None,
    }
    for key in ("noise_multiplier", "laplace_scale", "size_fraction", "sample_rate",
                "expected_batch_size", "noisy_dataset_size"):  # fmt: skip
        fields[key] = privacy.get(key)
    zeroth_order = cfg.method in ZO_METHODS
    fields.update(
        clip_norm=cfg.clip_norm,
        directions=cfg.directions,
        learning_rate=cfg.lr,
        perturbation_scale=cfg.perturbation_scale if zeroth_order else None,
        noise=privacy.get("noise"),
        abandoned_steps_charged=privacy.get("abandoned_steps_charged"),
    )
    return fields


def _accuracy_fields(loaded: _Loaded, after: dict[str, float]) -> dict[str, Any]:
    """The test metrics before and after (public for a --test-file or a packaged task), and
    the validation metrics (computed on private records: not covered)."""
    task = loaded.task
    validation = None
    if task.validation_texts:
        classifier = loaded.classifier
        validation = classifier.evaluate(classifier.encode_part(task, "validation"))
    return {
        "test_accuracy_before": loaded.before.get("accuracy"),
        "test_accuracy_after": after.get("accuracy"),
        "test_metrics_before": dict(loaded.before),
        "test_metrics_after": dict(after),
        "test_records": len(task.test_texts),
        "test_is_private": test_is_private(task),
        "validation_accuracy": None if validation is None else validation.get("accuracy"),
        "validation_metrics": validation,
        "validation_records": len(task.validation_texts),
    }


def _data_fields(cfg: Any, loaded: _Loaded) -> dict[str, Any]:
    """What report.json says about the data: public facts only (never the training file's
    record count or class counts; the count is released as ñ, with noise)."""
    summary = getattr(loaded.task, "public_summary", None)
    if summary is not None:
        fields = dict(summary)
    else:
        fields = {"task": cfg.task, "train_per_class": cfg.train_per_class, "seed": cfg.seed}
    fields["label_names"] = list(loaded.classifier.label_names)
    if test_is_private(loaded.task):
        fields["test_note"] = TEST_IS_PRIVATE_NOTE
    return fields


#: Said in report.json (and the model cards) when the test part was carved from --train-file.
TEST_IS_PRIVATE_NOTE = (
    "no --test-file: the test part was carved from the private training file by the public "
    "seed, so the test metrics are computed on private data without noise and are NOT covered "
    "by the differential-privacy guarantee"
)


def _write_weights_and_card(
    cfg: Any, root: Path, loaded: _Loaded, report: dict[str, Any], rows: list[dict[str, Any]]
) -> None:
    """The trainable weights (safetensors), the private diagnostics plot and the model card."""
    metadata = {
        "format": "zoprivacy.finetune trainable weights",
        **{k: getattr(cfg, k) for k in ("model", "task", "method", "trainable")},
        "epsilon": report["epsilon_spent"],
        "delta": cfg.delta if report["private"] else None,
    }
    out.save_weights(loaded.classifier.trainable_state(), root / out.WEIGHTS_FILE, metadata)
    files = report["files"]
    files["weights"] = out.WEIGHTS_FILE
    files["history"] = out.HISTORY_FILE
    if out.plot_history(rows, root / out.PLOT_FILE, f"{cfg.method} on {cfg.model}/{cfg.task}"):
        files["plot"] = out.PLOT_FILE
    task = loaded.task
    covered = covered_records(cfg, task)
    card = out.model_card(report, _load_snippet(cfg, loaded.classifier), covered)
    out.write_text(root / out.CARD_FILE, card)
    files["model_card"] = out.CARD_FILE


def _load_snippet(cfg: Any, classifier: Classifier) -> str:
    """How to load the result: the Hugging Face folder (or adapter) in model/."""
    if export.is_adapter(classifier.model):
        auto = (
            "AutoModelForSequenceClassification"
            if classifier.kind == "classifier"
            else "AutoModelForCausalLM"
        )
        base = f"{auto}.from_pretrained(BASE_MODEL)  # --model {cfg.model}"
        return "\n".join(
            [
                "from peft import PeftModel",
                f"from transformers import AutoTokenizer, {auto}",
                "",
                f"base = {base}",
                f'model = PeftModel.from_pretrained(base, "{MODEL_DIR}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{MODEL_DIR}")',
            ]
        )
    auto = (
        "AutoModelForSequenceClassification"
        if classifier.kind == "classifier"
        else ("AutoModelForCausalLM")
    )
    return "\n".join(
        [
            f"from transformers import AutoTokenizer, {auto}",
            "",
            f'model = {auto}.from_pretrained("{MODEL_DIR}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{MODEL_DIR}")',
        ]
    )


def _print_summary(report: dict[str, Any], root: Path, resources: dict | None) -> None:
    """The public summary on stdout; the private wall time and memory only when asked."""
    eps = report["epsilon_spent"]
    if report["private"]:
        pld = report["epsilon_spent_pld"]
        privacy = f"ε = {eps:.4f} (RDP)" + (f", {pld:.4f} (PLD)" if pld is not None else "")
        privacy += f", δ = {report['delta']:g}"
    elif report["method"] == "zeroshot":
        privacy = "no training (ε = 0)"
    else:
        privacy = "NOT private"
    before, after = report["test_metrics_before"], report["test_metrics_after"]
    note = "  (private data: not covered)" if report["test_is_private"] else ""
    lines = [
        f"{'test ' + name.replace('_', ' '):<15}{before[name]:.4f} -> {after[name]:.4f}{note}"
        for name in after
    ]
    lines += [
        f"privacy        {privacy}",
        f"steps          {report['steps']}",
    ]
    if resources is not None:
        lines += [
            f"wall time      {resources['wall_seconds']:.1f} s (private)",
            f"peak memory    {resources['peak_memory_mib']:.0f} MiB (private)",
        ]
    lines.append(f"report         {root / out.REPORT_FILE}")
    print("\n".join(lines))
    sys.stdout.flush()
