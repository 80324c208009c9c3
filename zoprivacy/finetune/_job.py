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
from zoprivacy.cli import pld_epsilon_or_none
from zoprivacy.tasks import TensorDictDataset

from . import _outputs as out
from ._config import resolve_config
from ._methods import ZO_METHODS
from ._options import add_arguments as _add_options
from ._options import train_settings
from ._setup import Classifier, SetupError, load_classifier, load_task
from ._step_options import step_report
from ._train import make_trainer

__all__ = ["add_arguments", "resolve_config", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Fine-tune a packaged model privately (DP-AggZO and baselines); writes report and weights."""
    parser.description = (
        "Fine-tune a packaged model on a packaged data set with DP-AggZO (or a baseline) under "
        "an (ε, δ) budget, and write report.json, the trainable weights (safetensors), a model "
        "card and non-private diagnostics to --output. The defaults run a private (ε = 2, "
        "δ = 1e-5) DP-AggZO fine-tune of MiniLM's classifier on BBC News topics in about five "
        "minutes on one CPU thread."
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


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Loaded:
    """The model and data of a run, and the test accuracy before training."""

    task: Any
    classifier: Classifier
    test: Any
    test_features: Any  # the test records' frozen-prefix output, when the cache is on
    dataset: Any  # the training records (None for zeroshot)
    before: float


def _run(args: argparse.Namespace, started: float) -> int:
    cfg = resolve_config(args)
    resume = bool(getattr(args, "resume", False))
    root = Path(cfg.output)
    _check_output(root, resume)
    torch.set_num_threads(cfg.threads)
    root.mkdir(parents=True, exist_ok=True)
    out.write_json(root / out.CONFIG_FILE, cfg.run_dict())
    state_path = root / out.STATE_FILE
    state = out.read_json(state_path) if resume and state_path.exists() else {"sessions": []}
    _say(f"zoprivacy finetune: {cfg.method} on {cfg.model}/{cfg.task}, output {root}")
    if cfg.show_private_diagnostics:
        _say(PRIVATE_NOTICE)
    loaded = _load(cfg, root, state)
    if cfg.method == "zeroshot":
        return _finish(cfg, root, loaded, None, [], loaded.before, started, None)
    trained = _train(cfg, root, loaded, state, resume, started)
    if isinstance(trained, int):
        return trained
    trainer, rows, stopped_early = trained
    _say("evaluating the fine-tuned model")
    after = loaded.classifier.accuracy(loaded.test, features=loaded.test_features)
    _say(f"test accuracy after: {after:.4f}")
    return _finish(cfg, root, loaded, trainer, rows, after, started, stopped_early)


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
    """Load the task and the model, encode the data, and evaluate the starting model (once)."""
    task = load_task(
        cfg.task,
        per_class_train=cfg.train_per_class,
        test_size=cfg.test_size,
        validation_size=cfg.validation_size,
        seed=cfg.seed,
    )
    classifier = load_classifier(
        cfg.model, task, trainable=cfg.trainable, max_length=cfg.max_length, seed=cfg.seed
    )
    test = classifier.encode(task.test_texts, task.test_labels)
    dataset = test_features = None
    if cfg.method != "zeroshot":
        train = classifier.encode(task.train_texts, task.train_labels)
        dataset = TensorDictDataset(train)
        if cfg.cache and classifier.cache_plan() is not None:
            _say("caching the frozen layers' output for the training and test records")
            classifier.build_cache(train)
            if classifier.verify_cache(test):
                dataset = classifier.cached_dataset(train["labels"])
                test_features = classifier.prefix_features(test)
    if state.get("test_accuracy_before") is None:
        _say(f"evaluating the starting model on {len(task.test_texts)} test records")
        state["test_accuracy_before"] = classifier.accuracy(test, features=test_features)
        out.write_json(root / out.STATE_FILE, state)
    before = float(state["test_accuracy_before"])
    _say(f"test accuracy before: {before:.4f}")
    return _Loaded(task, classifier, test, test_features, dataset, before)


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
    from tqdm.auto import tqdm

    bar = tqdm(
        total=trainer.steps_total,
        initial=trainer.steps_done,
        desc=cfg.method,
        unit="step",
        disable=None if cfg.progress else True,
        file=sys.stderr,
        dynamic_ncols=True,
    )
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
            bar.set_postfix(_postfix(eps, private), refresh=False)
            bar.update(1)
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
    after: float,
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
        "threads": cfg.threads,
        "frozen_prefix_cache": loaded.classifier.cache_active,
        "config": cfg.run_dict(),
        "files": {"resources": out.RESOURCES_FILE},
        "diagnostics_warning": out.DIAGNOSTICS_WARNING,
    }
    resources = out.finish_resources(root, time.monotonic() - started, peak_memory_mib())
    if trainer is not None:
        _write_weights_and_card(cfg, root, loaded, report, rows)
    out.write_json(root / out.REPORT_FILE, report)
    _print_summary(report, root, resources if cfg.show_private_diagnostics else None)
    return 0


def _run_fields(cfg: Any, loaded: _Loaded, trainer: Any) -> dict[str, Any]:
    return {
        "method": cfg.method,
        "model": cfg.model,
        "task": cfg.task,
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


def _accuracy_fields(loaded: _Loaded, after: float) -> dict[str, Any]:
    task = loaded.task
    validation = None
    if task.validation_texts:
        classifier = loaded.classifier
        encoded = classifier.encode(task.validation_texts, task.validation_labels)
        validation = classifier.accuracy(encoded)
    return {
        "test_accuracy_before": loaded.before,
        "test_accuracy_after": after,
        "test_records": len(task.test_texts),
        "validation_accuracy": validation,
        "validation_records": len(task.validation_texts),
    }


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
    covered = [
        f"every record of the training split ({cfg.train_per_class} per class at most, "
        f"drawn with the public seed {cfg.seed} from the packaged {cfg.task} data);"
    ]
    if task.validation_texts:
        covered.append(
            f"not the {len(task.validation_texts)} validation records (excluded from "
            "training): their accuracy in report.json is released without privacy;"
        )
    card = out.model_card(report, _load_snippet(cfg, task.num_labels), covered)
    out.write_text(root / out.CARD_FILE, card)
    files["model_card"] = out.CARD_FILE


def _load_snippet(cfg: Any, task_labels: int) -> str:
    if cfg.model == "minilm":
        load = f"model, tokenizer = packaged.load_minilm_classifier({task_labels}, seed={cfg.seed})"
    else:
        load = "model, tokenizer = packaged.load_smollm2()"
    return "\n".join(
        [
            "from safetensors.torch import load_file",
            "from zoprivacy.tasks import packaged",
            "",
            load,
            f'missing, unexpected = model.load_state_dict(load_file("{out.WEIGHTS_FILE}"), '
            "strict=False)",
            "assert not unexpected",
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
    lines = [
        f"test accuracy  {report['test_accuracy_before']:.4f} -> "
        f"{report['test_accuracy_after']:.4f}",
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
