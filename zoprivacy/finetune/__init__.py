"""The ``zoprivacy finetune`` job: a real private fine-tune of a packaged model, end to end.

Importing this package registers the sub-command with :mod:`zoprivacy.cli`::

    zoprivacy finetune                       # DP-AggZO, MiniLM on Rotten Tomatoes, ε = 2
    zoprivacy finetune --method dpadamw      # the first-order baseline, same accounting
    zoprivacy finetune --output DIR --resume # continue an interrupted run

From Python, :func:`main` takes the same arguments as the command line. The options are declared
once, in :data:`OPTIONS` (:mod:`zoprivacy.finetune._options`). See
:mod:`zoprivacy.finetune._outputs` for what the output folder holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from zoprivacy.cli import register_command
from zoprivacy.finetune._config import resolve_config
from zoprivacy.finetune._job import add_arguments, run
from zoprivacy.finetune._methods import METHOD_DEFAULTS, METHODS, TRAINABLE_DEFAULTS
from zoprivacy.finetune._options import (
    COMMON_DEFAULTS,
    OPTIONS,
    FinetuneConfig,
    Option,
    TrainSettings,
    train_settings,
)
from zoprivacy.finetune._setup import (
    MODELS,
    TASK_DEFAULTS,
    TASKS,
    Classifier,
    SetupError,
    TaskData,
    load_classifier,
    load_task,
)
from zoprivacy.finetune._train import make_trainer

__all__ = [
    "COMMON_DEFAULTS",
    "METHODS",
    "METHOD_DEFAULTS",
    "MODELS",
    "OPTIONS",
    "TASKS",
    "TASK_DEFAULTS",
    "TRAINABLE_DEFAULTS",
    "Classifier",
    "FinetuneConfig",
    "Option",
    "SetupError",
    "TaskData",
    "TrainSettings",
    "add_arguments",
    "load_classifier",
    "load_task",
    "main",
    "make_trainer",
    "resolve_config",
    "run",
    "train_settings",
]

register_command("finetune", add_arguments, run)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``zoprivacy finetune`` with ``argv`` (the arguments after ``finetune``)."""
    from zoprivacy.cli import main as cli_main

    return cli_main(["finetune", *(argv or [])])
