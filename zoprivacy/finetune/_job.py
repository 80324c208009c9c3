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
import warnings
from pathlib import Path
from typing import Any

import torch

from zoprivacy import __version__
from zoprivacy.accounting import PrivacyBudgetExceeded, compute_epsilon
from zoprivacy.tasks import TensorDictDataset

from . import _outputs as out
from ._options import (
    FLAGS,
    STEP_DEFAULTS,
    ZO_METHODS,
    add_step_arguments,
    given_step_options,
    resolve_stages,
    step_defaults,
    step_report,
    validate_step_options,
)
from ._setup import (
    MODELS,
    TASK_DEFAULTS,
    TASKS,
    Classifier,
    SetupError,
    load_classifier,
    load_task,
    parse_trainable,
)
from ._train import METHODS, PRIVATE_METHODS, TrainSettings, make_trainer

# ---------------------------------------------------------------------------------------------
# defaults
# ---------------------------------------------------------------------------------------------

#: Defaults that do not depend on the method.
COMMON_DEFAULTS: dict[str, Any] = {
    "method": "dpaggzo",
    "model": "minilm",
    "task": "bbc_news",
    "epsilon": 2.0,
    "delta": 1e-5,
    "batch_size": 64.0,
    "perturbation_scale": 1e-3,
    "weight_decay": 0.0,
    "threads": 1,
    "seed": 0,
    "train_per_class": 512,
    "validation_size": 0,
    "checkpoint_every": 100,
}

#: Trainable selection per model.
TRAINABLE_DEFAULTS = {"minilm": "classifier", "smollm2": "head"}

#: Per-method defaults (K, clip norm c, learning rate η, steps T). The clip norm of DP-AggZO is
#: β/√K with β = ``clip_beta`` (the paper's parametrisation: the noise σ·c·√K on the update
#: stays constant when K changes); DPZO clips its scalar at β.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dpaggzo": {"directions": 64, "clip_beta": 0.8, "lr": 1.0, "steps": 1000},
    "dpzo": {"directions": 1, "clip_beta": 0.8, "lr": 1.0, "steps": 1000},
    "mezo": {"directions": 16, "clip_beta": None, "lr": 0.3, "steps": 1000},
    "dpadamw": {"directions": None, "clip_beta": 1.0, "lr": 0.01, "steps": 1000},
    "adamw": {"directions": None, "clip_beta": None, "lr": 0.01, "steps": 1000},
    "zeroshot": {"directions": None, "clip_beta": None, "lr": None, "steps": 0},
}

#: Options whose values define the run: on --resume they come from config.json.
RUN_OPTIONS = (
    "method",
    "model",
    "task",
    "epsilon",
    "delta",
    "directions",
    "clip_norm",
    "lr",
    "steps",
    "batch_size",
    "perturbation_scale",
    "weight_decay",
    "trainable",
    "seed",
    "max_length",
    "train_per_class",
    "test_size",
    "validation_size",
    "cache",
    # step options of the zeroth-order methods (None for the others): see _options.py
    "direction_distribution",
    "difference",
    "perturbation",
    "batched_directions",
    "mask",
    "stages",
)

#: Run options added after the first release: their value when an older config.json lacks them.
_ADDED_OPTIONS: dict[str, Any] = {"validation_size": 0}


@dataclasses.dataclass
class FinetuneConfig:
    """The resolved configuration of a run (what ``config.json`` holds)."""

    method: str
    model: str
    task: str
    epsilon: float
    delta: float
    directions: int | None
    clip_norm: float | None
    lr: float
    steps: int
    batch_size: float
    perturbation_scale: float
    weight_decay: float
    trainable: str
    seed: int
    max_length: int
    train_per_class: int
    test_size: int
    validation_size: int
    cache: bool
    direction_distribution: str | None
    difference: str | None
    perturbation: str | None
    batched_directions: int | None
    mask: dict[str, Any] | None
    stages: list[dict[str, Any]] | None
    output: str
    threads: int
    checkpoint_every: int
    pld: bool
    progress: bool | None

    @property
    def private(self) -> bool:
        return self.method in PRIVATE_METHODS

    def run_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in RUN_OPTIONS}


class _OneLineParserError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Fine-tune a packaged model privately (DP-AggZO and baselines); writes report and weights."""
    parser.description = (
        "Fine-tune a packaged model on a packaged data set with DP-AggZO (or a baseline) under "
        "an (ε, δ) budget, and write report.json, the trainable weights (safetensors), a model "
        "card and non-private diagnostics to --output. The defaults run a private (ε = 2, "
        "δ = 1e-5) DP-AggZO fine-tune of MiniLM's classifier on BBC News topics in about five "
        "minutes on one CPU thread."
    )
    _one_line_errors(parser)
    a = parser.add_argument
    a("--method", help=f"{' | '.join(METHODS)} (default dpaggzo)")
    a("--model", help=f"{' | '.join(MODELS)} (default minilm)")
    a("--task", help=f"{' | '.join(TASKS)} (default bbc_news)")
    a("--epsilon", type=float, help="target ε > 0 of the private methods (default 2)")
    a("--delta", type=float, help="δ in (0, 1) (default 1e-5)")
    a("--directions", type=int, help="K, directions per step (dpaggzo 64, mezo 16, dpzo 1)")
    a(
        "--clip-norm",
        type=float,
        help="clip norm c (dpaggzo: 0.8/√K; dpzo: 0.8; dpadamw: per-sample gradient norm 1.0)",
    )
    a(
        "--lr",
        type=float,
        help="learning rate η (dpaggzo and dpzo 1.0, mezo 0.3, dpadamw and adamw 0.01)",
    )
    a("--steps", type=int, help="number of steps T (default 1000)")
    a("--batch-size", type=float, help="expected batch size b = q·ñ (default 64)")
    a("--perturbation-scale", type=float, help="φ of the zeroth-order methods (default 1e-3)")
    a("--weight-decay", type=float, help="decoupled weight decay (default 0)")
    a(
        "--trainable",
        help="what to train: classifier, head, lastN, all, joined with '+' "
        "(minilm default classifier; smollm2 default head = final norm)",
    )
    a("--threads", type=int, help="torch CPU threads (default 1)")
    a("--seed", type=int, help="public seed: split, head initialisation, directions (default 0)")
    a("--max-length", type=int, help="tokens per record (rotten_tomatoes 64, bbc_news 128)")
    a("--train-per-class", type=int, help="training records per class (default 512)")
    a("--test-size", type=int, help="held-out test records (rotten_tomatoes 1000, bbc_news 500)")
    a(
        "--validation-size",
        type=int,
        help="records carved from the training data (public seed) for model selection; the "
        "private run does not train on them and report.json gives their accuracy, which the "
        "privacy guarantee does not cover (default 0: none)",
    )
    a("--output", metavar="DIR", help="output folder (default runs/<timestamp>)")
    a("--resume", action="store_true", help="continue the interrupted run in --output DIR")
    a("--no-pld", action="store_true", help="skip the PLD accountant's ε (faster)")
    a(
        "--no-cache",
        action="store_true",
        help="run the full model in every loss evaluation instead of caching the frozen prefix",
    )
    a("--checkpoint-every", type=int, help="save a checkpoint every N steps (default 100)")
    a("--no-progress", action="store_true", help="no progress bar")
    add_step_arguments(parser.add_argument_group("zeroth-order step options (dpaggzo, dpzo, mezo)"))


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make argparse errors of this sub-command one line on stderr (exit status 2)."""

    def error(message: str) -> None:
        print(f"zoprivacy finetune: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]


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
# configuration
# ---------------------------------------------------------------------------------------------


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The run options the user gave explicitly (argparse defaults are all None)."""
    given = {k: getattr(args, k, None) for k in RUN_OPTIONS if k != "cache" and k not in FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    given.update(given_step_options(args))
    if getattr(args, "no_cache", False):
        given["cache"] = False
    return given


def resolve_config(args: argparse.Namespace) -> FinetuneConfig:
    """Fill in defaults and validate; on --resume the saved configuration wins."""
    given = _given(args)
    output = getattr(args, "output", None)
    resume = bool(getattr(args, "resume", False))
    if resume:
        if not output:
            raise SetupError("--resume needs --output DIR, the folder of the run to continue")
        path = Path(output) / out.CONFIG_FILE
        if not path.exists():
            raise SetupError(f"--resume: {path} not found; is {output} a zoprivacy finetune run?")
        saved = out.read_json(path)
        for key, default in STEP_DEFAULTS.items():  # a run saved before these options existed
            if key not in saved:
                saved[key] = default if saved.get("method") in ZO_METHODS else None
        if "stages" in given and saved.get("method") in ZO_METHODS:
            given["stages"] = resolve_stages(given["stages"], saved)  # the saved (resolved) form
        for key, value in given.items():
            if key in saved and saved[key] != value:
                raise SetupError(
                    f"--resume continues the saved run: "
                    f"{FLAGS.get(key, '--' + key.replace('_', '-'))} {value!r} "
                    f"differs from its {saved[key]!r} (drop the option or use a new --output)"
                )
        values = {k: saved[k] if k in saved else _ADDED_OPTIONS[k] for k in RUN_OPTIONS}
    else:
        values = _defaults(given)
    if not output:
        output = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    threads = getattr(args, "threads", None)
    every = getattr(args, "checkpoint_every", None)
    cfg = FinetuneConfig(
        **values,
        output=output,
        threads=COMMON_DEFAULTS["threads"] if threads is None else threads,
        checkpoint_every=COMMON_DEFAULTS["checkpoint_every"] if every is None else every,
        pld=not getattr(args, "no_pld", False),
        progress=False if getattr(args, "no_progress", False) else None,
    )
    validate(cfg)
    return cfg


def _defaults(given: dict[str, Any]) -> dict[str, Any]:
    values = {k: given.get(k, COMMON_DEFAULTS.get(k)) for k in RUN_OPTIONS}
    method = str(values["method"]).lower()
    if method not in METHODS:
        raise SetupError(f"unknown method {values['method']!r}; choose one of {', '.join(METHODS)}")
    values["method"] = method
    model = str(values["model"]).lower()
    if model not in MODELS:
        raise SetupError(f"unknown model {values['model']!r}; choose one of {', '.join(MODELS)}")
    values["model"] = model
    task = str(values["task"]).lower()
    if task not in TASKS:
        raise SetupError(f"unknown task {values['task']!r}; choose one of {', '.join(TASKS)}")
    values["task"] = task
    md = METHOD_DEFAULTS[method]
    if values["directions"] is None:
        values["directions"] = md["directions"]
    if method == "dpzo":
        if values["directions"] not in (None, 1):
            raise SetupError("--method dpzo uses one direction (K = 1); drop --directions")
        values["directions"] = 1
    if method in ("dpadamw", "adamw", "zeroshot") and "directions" in given:
        raise SetupError(f"--directions does not apply to --method {method}")
    if values["clip_norm"] is None and md["clip_beta"] is not None:
        k = values["directions"] if method in ("dpaggzo", "dpzo") else 1
        values["clip_norm"] = md["clip_beta"] / math.sqrt(k)
    if method in ("mezo", "adamw", "zeroshot") and "clip_norm" in given:
        raise SetupError(f"--clip-norm does not apply to the non-private --method {method}")
    if values["lr"] is None:
        values["lr"] = md["lr"] if md["lr"] is not None else 0.0
    if values["steps"] is None:
        values["steps"] = md["steps"]
    if method == "zeroshot":
        values["steps"] = 0
    if values["trainable"] is None:
        values["trainable"] = TRAINABLE_DEFAULTS[model]
    if values["max_length"] is None:
        values["max_length"] = TASK_DEFAULTS[task]["max_length"]
    if values["test_size"] is None:
        values["test_size"] = TASK_DEFAULTS[task]["test_size"]
    if values["cache"] is None:
        values["cache"] = True
    step_defaults(values, given)
    return values


def validate(cfg: FinetuneConfig) -> None:
    """Check every value before anything is loaded; one-line errors."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SetupError(message)

    methods = ", ".join(METHODS)
    need(cfg.method in METHODS, f"unknown method {cfg.method!r}; choose one of {methods}")
    need(cfg.model in MODELS, f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    need(cfg.task in TASKS, f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    finite = math.isfinite
    need(finite(cfg.epsilon) and cfg.epsilon > 0, f"--epsilon must be > 0, got {cfg.epsilon}")
    need(0 < cfg.delta < 1, f"--delta must be in (0, 1), got {cfg.delta}")
    if cfg.method != "zeroshot":
        need(cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}")
        need(finite(cfg.lr) and cfg.lr > 0, f"--lr must be a number > 0, got {cfg.lr}")
    need(
        finite(cfg.batch_size) and cfg.batch_size > 0,
        f"--batch-size must be a number > 0, got {cfg.batch_size}",
    )
    if cfg.directions is not None:
        need(cfg.directions >= 1, f"--directions must be >= 1, got {cfg.directions}")
    if cfg.clip_norm is not None:
        need(
            finite(cfg.clip_norm) and cfg.clip_norm > 0,
            f"--clip-norm must be a number > 0, got {cfg.clip_norm}",
        )
    need(
        finite(cfg.perturbation_scale) and cfg.perturbation_scale > 0,
        f"--perturbation-scale must be a number > 0, got {cfg.perturbation_scale}",
    )
    need(
        finite(cfg.weight_decay) and cfg.weight_decay >= 0,
        f"--weight-decay must be >= 0, got {cfg.weight_decay}",
    )
    need(cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}")
    need(cfg.max_length >= 8, f"--max-length must be >= 8, got {cfg.max_length}")
    need(cfg.train_per_class >= 1, f"--train-per-class must be >= 1, got {cfg.train_per_class}")
    need(cfg.test_size >= 1, f"--test-size must be >= 1, got {cfg.test_size}")
    need(cfg.validation_size >= 0, f"--validation-size must be >= 0, got {cfg.validation_size}")
    need(cfg.threads >= 1, f"--threads must be >= 1, got {cfg.threads}")
    need(cfg.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {cfg.checkpoint_every}")
    parse_trainable(cfg.trainable)
    validate_step_options(cfg)


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


def peak_memory_mib() -> float:
    """Peak resident memory of this process (ru_maxrss) in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(args: argparse.Namespace, started: float) -> int:
    cfg = resolve_config(args)
    root = Path(cfg.output)
    resume = bool(getattr(args, "resume", False))
    checkpoint_path = root / out.CHECKPOINT_FILE
    if resume:
        report_path = root / out.REPORT_FILE
        if report_path.exists() and out.read_json(report_path).get("completed"):
            raise SetupError(f"--resume: the run in {root} is already complete")
    elif (root / out.CONFIG_FILE).exists() or checkpoint_path.exists():
        raise SetupError(
            f"{root} already holds a run: pass --resume to continue it, or choose a new --output"
        )
    torch.set_num_threads(cfg.threads)
    root.mkdir(parents=True, exist_ok=True)
    out.write_json(root / out.CONFIG_FILE, cfg.run_dict())
    state_path = root / out.STATE_FILE
    state = out.read_json(state_path) if resume and state_path.exists() else {"sessions": []}

    _say(f"zoprivacy finetune: {cfg.method} on {cfg.model}/{cfg.task}, output {root}")
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
    dataset: Any = None
    test_features = None  # the test records' frozen-prefix output, when the cache is on
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
        out.write_json(state_path, state)
    before = float(state["test_accuracy_before"])
    _say(f"test accuracy before: {before:.4f}")

    if cfg.method == "zeroshot":
        return _finish(cfg, root, classifier, task, None, [], before, before, state, started, None)

    settings = TrainSettings(
        method=cfg.method,
        steps=cfg.steps,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        directions=cfg.directions or 1,
        clip_norm=cfg.clip_norm if cfg.clip_norm is not None else math.inf,
        perturbation_scale=cfg.perturbation_scale,
        weight_decay=cfg.weight_decay,
        epsilon=cfg.epsilon,
        delta=cfg.delta,
        seed=cfg.seed,
        direction_distribution=cfg.direction_distribution or "gaussian",
        difference=cfg.difference or "central",
        perturbation=cfg.perturbation or "auto",
        batched_directions=cfg.batched_directions,
        mask=cfg.mask,
        stages=cfg.stages or [],
    )
    checkpoint = None
    if resume and checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if (
            checkpoint.get("format") != "zoprivacy.finetune/1"
            or checkpoint.get("method") != cfg.method
        ):
            raise SetupError(f"{checkpoint_path} is not a checkpoint of this run")

    with GracefulStop() as stop:
        trainer = make_trainer(
            classifier, dataset, settings, checkpoint=checkpoint, journal=root / out.JOURNAL_FILE
        )
        if checkpoint is None:
            trainer.save(checkpoint_path)  # ñ is released: record it before any step
        history = out.History(root, keep_steps_below=trainer.steps_done)
        session = {"from_step": trainer.steps_done}
        stopped_early = None
        try:
            stopped_early = _train_loop(cfg, trainer, history, stop, checkpoint_path)
        except KeyboardInterrupt:
            trainer.save(checkpoint_path)
            session.update(to_step=trainer.steps_done, wall_seconds=time.monotonic() - started)
            state["sessions"].append(session)
            out.write_json(state_path, state)
            history.close()
            _say(
                f"zoprivacy finetune: interrupted after step {trainer.steps_done}/"
                f"{trainer.steps_total}; checkpoint saved. Continue with: zoprivacy finetune "
                f"--output {root} --resume"
            )
            return 130
        except BaseException:
            # A crash inside a step: keep what was done. The accountant has already charged
            # the failed step, so the saved ε over-counts (conservative).
            try:
                trainer.save(checkpoint_path)
                session.update(to_step=trainer.steps_done, crashed=True)
                state["sessions"].append(session)
                out.write_json(state_path, state)
            finally:
                history.close()
            raise
        history.close()
    session.update(to_step=trainer.steps_done, wall_seconds=time.monotonic() - started)
    state["sessions"].append(session)
    out.write_json(state_path, state)
    if hasattr(trainer, "close"):
        trainer.close()
    _say("evaluating the fine-tuned model")
    after = classifier.accuracy(test, features=test_features)
    _say(f"test accuracy after: {after:.4f}")
    return _finish(
        cfg, root, classifier, task, trainer, history.rows, before, after, state, started,
        stopped_early,
    )  # fmt: skip


def _train_loop(cfg, trainer, history, stop, checkpoint_path) -> str | None:
    """Run the remaining steps; returns why it stopped early (None when it ran them all)."""
    from tqdm.auto import tqdm

    total = trainer.steps_total
    bar = tqdm(
        total=total,
        initial=trainer.steps_done,
        desc=cfg.method,
        unit="step",
        disable=True if cfg.progress is False else None,
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
            loss = diag["loss"]
            if not math.isnan(loss):
                smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
            postfix = {"loss": "n/a" if smooth is None else f"{smooth:.4f}"}
            postfix["clip"] = f"{diag['clip_fraction']:.2f}"
            if eps is not None:
                postfix["ε"] = f"{eps:.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if trainer.steps_done % cfg.checkpoint_every == 0:
                trainer.save(checkpoint_path)
        if stop.requested and trainer.steps_done < total:
            raise KeyboardInterrupt
    finally:
        bar.close()
    trainer.save(checkpoint_path)
    return stopped


def _load_snippet(cfg: FinetuneConfig, task_labels: int) -> str:
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


def _finish(
    cfg: FinetuneConfig,
    root: Path,
    classifier: Classifier,
    task: Any,
    trainer: Any,
    rows: list[dict[str, Any]],
    before: float,
    after: float,
    state: dict[str, Any],
    started: float,
    stopped_early: str | None,
) -> int:
    privacy: dict[str, Any] = {"private": False} if trainer is None else dict(trainer.privacy)
    steps = 0 if trainer is None else trainer.steps_done
    eps = None if trainer is None else trainer.epsilon_spent()
    eps_pld = None
    if privacy.get("private") and cfg.pld:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                eps_pld = compute_epsilon(
                    noise_multiplier=privacy["noise_multiplier"],
                    sample_rate=privacy["sample_rate"],
                    steps=steps + privacy.get("abandoned_steps_charged", 0),
                    delta=cfg.delta,
                    laplace_scale=privacy["laplace_scale"],
                    accountant="pld",
                )
        except ImportError:
            eps_pld = None
    wall = time.monotonic() - started
    sessions = state.get("sessions", [])
    report: dict[str, Any] = {
        "zoprivacy_version": __version__,
        "completed": True,
        "method": cfg.method,
        "model": cfg.model,
        "task": cfg.task,
        "trainable": cfg.trainable,
        "trainable_parameters": classifier.num_trainable(),
        "private": bool(privacy.get("private")),
        "epsilon_spent": eps if privacy.get("private") else (0.0 if trainer is None else None),
        "epsilon_spent_pld": eps_pld,
        "accountant": "rdp" if privacy.get("private") else None,
        "delta": cfg.delta,
        "target_epsilon": cfg.epsilon if privacy.get("private") else None,
        "noise_multiplier": privacy.get("noise_multiplier"),
        "laplace_scale": privacy.get("laplace_scale"),
        "size_fraction": privacy.get("size_fraction"),
        "sample_rate": privacy.get("sample_rate"),
        "expected_batch_size": privacy.get("expected_batch_size"),
        "noisy_dataset_size": privacy.get("noisy_dataset_size"),
        "clip_norm": cfg.clip_norm,
        "directions": cfg.directions,
        "learning_rate": cfg.lr,
        "perturbation_scale": cfg.perturbation_scale
        if cfg.method in ("dpaggzo", "dpzo", "mezo")
        else None,
        **step_report(cfg, trainer),  # directions, difference, path, mask, stages
        "steps": steps,
        "steps_planned": cfg.steps,
        "abandoned_steps_charged": privacy.get("abandoned_steps_charged"),
        "stopped_early": stopped_early,
        "test_accuracy_before": before,
        "test_accuracy_after": after,
        "test_records": len(task.test_texts),
        "validation_accuracy": _validation_accuracy(classifier, task),
        "validation_records": len(task.validation_texts),
        "wall_seconds": wall,
        "wall_seconds_all_sessions": sum(s.get("wall_seconds", 0.0) for s in sessions[:-1]) + wall,
        "peak_memory_mib": peak_memory_mib(),
        "threads": cfg.threads,
        "frozen_prefix_cache": classifier.cache_active,
        "config": cfg.run_dict(),
        "files": {},
        "diagnostics_warning": out.DIAGNOSTICS_WARNING,
    }
    if trainer is not None:
        weights = root / out.WEIGHTS_FILE
        out.save_weights(
            classifier.trainable_state(),
            weights,
            {
                "format": "zoprivacy.finetune trainable weights",
                "model": cfg.model,
                "task": cfg.task,
                "method": cfg.method,
                "trainable": cfg.trainable,
                "epsilon": report["epsilon_spent"],
                "delta": cfg.delta if report["private"] else None,
            },
        )
        report["files"]["weights"] = out.WEIGHTS_FILE
        report["files"]["history"] = out.HISTORY_FILE
        if out.plot_history(rows, root / out.PLOT_FILE, f"{cfg.method} on {cfg.model}/{cfg.task}"):
            report["files"]["plot"] = out.PLOT_FILE
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
        report["files"]["model_card"] = out.CARD_FILE
    out.write_json(root / out.REPORT_FILE, report)
    _print_summary(report, root)
    return 0


def _validation_accuracy(classifier: Classifier, task: Any) -> float | None:
    """Accuracy on the validation split (``None`` without ``--validation-size``)."""
    if not task.validation_texts:
        return None
    return classifier.accuracy(classifier.encode(task.validation_texts, task.validation_labels))


def _print_summary(report: dict[str, Any], root: Path) -> None:
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
        f"wall time      {report['wall_seconds']:.1f} s",
        f"peak memory    {report['peak_memory_mib']:.0f} MiB",
        f"report         {root / out.REPORT_FILE}",
    ]
    print("\n".join(lines))
    sys.stdout.flush()
