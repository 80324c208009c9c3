"""Resolving the options of ``zoprivacy finetune``: what the user gave, the defaults of the
method, model and task, the saved run on ``--resume``, and the checks of every value before
anything is loaded (one-line errors naming the flag and the fix).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path
from typing import Any

from . import _outputs as out
from ._methods import METHODS, TRAINABLE_DEFAULTS, ZO_METHODS, method_defaults
from ._options import (
    ADDED_OPTIONS,
    BY_NAME,
    OPTIONS,
    RUN_OPTIONS,
    STEP_GROUP,
    USER_GROUP,
    FinetuneConfig,
    flag,
)
from ._setup import MODELS, TASK_DEFAULTS, TASKS, SetupError
from ._step_options import (
    parse_mask,
    parse_stages,
    resolve_stages,
    step_defaults,
    validate_step_options,
)
from .user_model import parse_trainable_spec, resolve_dtype

#: Options given as text and parsed into their config.json form.
_PARSERS = {"mask": parse_mask, "stages": parse_stages}
#: The choices of the options that name something, by option.
_CHOICES = {"method": METHODS, "task": TASKS}
#: Defaults of a run on the user's files (--train-file).
USER_DEFAULTS = {"max_length": 128, "text_column": "text", "label_column": "label"}
#: The options that apply to the packaged tasks only.
PACKAGED_ONLY = ("task", "train_per_class")
#: The options that need --train-file.
USER_DATA_ONLY = tuple(
    o.name
    for o in OPTIONS
    if o.group == USER_GROUP and o.name not in ("model_kind", "prompt", "label_words")
)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise SetupError(message)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options the user gave explicitly (argparse defaults are all None), parsed; with
    ``--config FILE`` the file's options first, the command line's overriding them."""
    given: dict[str, Any] = {}
    path = getattr(args, "config", None)
    if path:
        from ._toml import read_config

        given.update({k: _PARSERS[k](v) if k in _PARSERS else v
                      for k, v in read_config(path).items()})  # fmt: skip
    for o in OPTIONS:
        value = getattr(args, o.dest, None)
        if o.switch:
            if value:
                given[o.name] = not o.default
        elif value is not None:
            given[o.name] = _PARSERS[o.name](value) if o.name in _PARSERS else value
    return given


def resolve_config(args: argparse.Namespace) -> FinetuneConfig:
    """Fill in defaults and validate; on --resume the saved configuration wins."""
    given = given_options(args)
    if given.get("resume"):
        values = _saved_run(given)
    else:
        values = _defaults({k: v for k, v in given.items() if k in RUN_OPTIONS})
    for o in OPTIONS:
        if not o.saved and o.name != "resume":
            values[o.name] = given.get(o.name, o.default)
    if not values["output"]:
        values["output"] = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    cfg = FinetuneConfig(**values)
    validate(cfg)
    return cfg


def _saved_run(given: dict[str, Any]) -> dict[str, Any]:
    """The run options of the run in ``--output`` (what the user gives again must agree)."""
    output = given.get("output")
    if not output:
        raise SetupError("--resume needs --output DIR, the folder of the run to continue")
    path = Path(output) / out.CONFIG_FILE
    if not path.exists():
        raise SetupError(f"--resume: {path} not found; is {output} a zoprivacy finetune run?")
    saved = out.read_json(path)
    zeroth_order = saved.get("method") in ZO_METHODS
    for key in ADDED_OPTIONS:  # a run saved before these options existed
        if key not in saved:
            applies = zeroth_order or BY_NAME[key].group != STEP_GROUP
            saved[key] = copy.copy(BY_NAME[key].default) if applies else None
    if "stages" in given and zeroth_order:
        given["stages"] = resolve_stages(given["stages"], saved)  # the saved (resolved) form
    for key, value in given.items():
        if key in RUN_OPTIONS and saved[key] != value:
            raise SetupError(
                f"--resume continues the saved run: {flag(key)} {value!r} differs from its "
                f"{saved[key]!r} (drop the option or use a new --output)"
            )
    return {k: saved[k] for k in RUN_OPTIONS}


def _defaults(given: dict[str, Any]) -> dict[str, Any]:
    """The run options of a new run: what was given, else the method's, model's, task's or the
    common default."""
    values = {k: given.get(k, BY_NAME[k].default) for k in RUN_OPTIONS}
    _data_defaults(values, given)
    for key, choices in _CHOICES.items():
        if values[key] is None:
            continue
        name = str(values[key]).lower()
        _need(name in choices, f"unknown {key} {values[key]!r}; choose one of {', '.join(choices)}")
        values[key] = name
    if str(values["model"]).lower() in MODELS:
        values["model"] = str(values["model"]).lower()
    method = values["method"]
    if method == "dpzo":
        _need(given.get("directions", 1) == 1,
              "--method dpzo uses one direction (K = 1); drop --directions")  # fmt: skip
    for key in given:  # an option of other methods is refused, naming them
        methods = BY_NAME[key].methods
        _need(method in methods, f"{flag(key)} does not apply to --method {method}: it is an "
              f"option of {', '.join(methods)}; drop it")  # fmt: skip
    _method_defaults(values)
    if values["trainable"] is None:
        values["trainable"] = _default_trainable(values)
    step_defaults(values, given)
    return values


def _data_defaults(values: dict[str, Any], given: dict[str, Any]) -> None:
    """A packaged task's defaults, or those of the user's files (``--train-file``)."""
    if values["train_file"] is None:
        for key in USER_DATA_ONLY:
            _need(key not in given, f"{flag(key)} needs --train-file (your data file)")
        values["task"] = values["task"] or "bbc_news"
        task = TASK_DEFAULTS.get(str(values["task"]).lower(), {})
        for key in ("max_length", "test_size"):
            values[key] = task.get(key) if values[key] is None else values[key]
        if values["train_per_class"] is None:
            values["train_per_class"] = 512
        return
    for key in PACKAGED_ONLY:
        _need(key not in given, f"{flag(key)} is for the packaged data; drop it with --train-file")
    for key, default in USER_DEFAULTS.items():
        if values[key] is None:
            values[key] = default
    if values["target_column"] is not None:
        values["label_column"] = None  # generation: no label column is read


def _default_trainable(values: dict[str, Any]) -> str:
    """The packaged preset's default, else by the model's kind (read from its config only)."""
    model = values["model"]
    if model in TRAINABLE_DEFAULTS and values["model_kind"] is None:
        return TRAINABLE_DEFAULTS[model]
    if values["target_column"] is not None:
        return "lora"
    kind = values["model_kind"]
    if kind is None and model not in MODELS:
        kind = _folder_kind(model)
    return "classifier" if kind == "classifier" else "head"


def _folder_kind(model: str) -> str | None:
    """The kind of a model folder from its config (``None`` when unreadable: the load fails
    later with the full message)."""
    from .user_model import detect_kind

    try:
        from transformers import AutoConfig

        return detect_kind(AutoConfig.from_pretrained(model, local_files_only=True))
    except (OSError, ValueError):
        return None


def _method_defaults(values: dict[str, Any]) -> None:
    """K, c = β/√K, η and T from :func:`method_defaults` (the validation selection of the
    packaged task, or of the default task for the user's own data) where not given."""
    method = values["method"]
    md = method_defaults(method, None if values["train_file"] is not None else values["task"])
    if values["directions"] is None:
        values["directions"] = md["directions"]
    k = values["directions"]
    if k is not None:  # checked here: c = β/√K needs K >= 1
        _need(isinstance(k, int) and k >= 1, f"--directions must be an int >= 1, got {k}")
    if values["clip_norm"] is None and md["clip_beta"] is not None:
        values["clip_norm"] = md["clip_beta"] / math.sqrt(k if method in ZO_METHODS else 1)
    if values["lr"] is None:
        values["lr"] = md["lr"] if md["lr"] is not None else 0.0
    if values["steps"] is None or method == "zeroshot":  # zeroshot only evaluates: T = 0
        values["steps"] = md["steps"]


def validate(cfg: FinetuneConfig) -> None:
    """Check every value before anything is loaded; one-line errors naming the flag."""
    for key, choices in _CHOICES.items():
        value = getattr(cfg, key)
        if value is None and key == "task" and cfg.train_file is not None:
            continue
        _need(value in choices, f"unknown {key} {value!r}; choose one of {', '.join(choices)}")
    resolve_dtype(cfg.dtype)
    if cfg.model not in MODELS:
        from .user_model import _folder

        try:
            _folder(cfg.model)
        except SetupError as exc:
            raise SetupError(f"unknown model {cfg.model!r}: {exc}") from None
    _need(
        math.isfinite(cfg.epsilon) and cfg.epsilon > 0, f"--epsilon must be > 0, got {cfg.epsilon}"
    )
    _need(0 < cfg.delta < 1, f"--delta must be in (0, 1), got {cfg.delta}")
    if cfg.method != "zeroshot":
        _need(cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}")
        _positive(cfg, "lr")
    _positive(cfg, "batch_size")
    if cfg.directions is not None:
        _need(cfg.directions >= 1, f"--directions must be an int >= 1, got {cfg.directions}")
    if cfg.clip_norm is not None:
        _positive(cfg, "clip_norm")
    _positive(cfg, "perturbation_scale")
    _need(
        math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
        f"--weight-decay must be >= 0, got {cfg.weight_decay}",
    )
    minimum = {"seed": 0, "max_length": 8, "train_per_class": 1, "test_size": 1,
               "validation_size": 0, "threads": 1, "checkpoint_every": 1}  # fmt: skip
    for key, least in minimum.items():
        value = getattr(cfg, key)
        if value is None and key in ("train_per_class", "test_size"):
            continue  # --train-file: no per-class cap; a --test-file: no carved test part
        _need(value >= least, f"{flag(key)} must be >= {least}, got {value}")
    parse_trainable_spec(cfg.trainable)
    validate_step_options(cfg)


def _positive(cfg: FinetuneConfig, key: str) -> None:
    value = getattr(cfg, key)
    _need(math.isfinite(value) and value > 0, f"{flag(key)} must be a number > 0, got {value}")
