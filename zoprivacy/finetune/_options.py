"""The options of ``zoprivacy finetune``, declared once.

:data:`OPTIONS` is the one table of the job's options: name, type, default, help text, the
methods that accept it, and whether it defines the run (saved in ``config.json`` and fixed on
``--resume``). Everything else is built from it: the command-line arguments
(:func:`add_arguments`), the resolved configuration (:class:`FinetuneConfig`, what
``config.json`` and ``report.json`` hold), and the trainers' settings (:class:`TrainSettings`).

The zeroth-order step options (directions, differences, perturbation path, batched directions,
DP-ZOPO masks ``--mask`` and DP-ZOSO stages ``--stage``) map one to one onto
:class:`zoprivacy.DPAggZO`'s keyword options (see ``benchmarks/README_speed.md``); their parsing
is in :mod:`zoprivacy.finetune._step_options`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any

from zoprivacy.optim.directions import DIRECTION_KINDS
from zoprivacy.optim.optimizer import DIFFERENCES
from zoprivacy.optim.perturb import PERTURBATION_PATHS

from ._methods import METHODS, PRIVATE_METHODS, ZO_METHODS
from ._setup import MODELS, TASKS

#: The argument group of the zeroth-order step options.
STEP_GROUP = "zeroth-order step options (dpaggzo, dpzo, mezo)"
#: The argument group of the options for the user's own model and data files.
USER_GROUP = "your own model and data (--model FOLDER, --train-file)"

_REQUIRED = object()  # a trainer setting without a fallback
_NOT_TRAINER = object()  # not a trainer setting


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of the job.

    Attributes:
        name: the configuration key (``config.json``, :class:`FinetuneConfig`).
        help: the ``--help`` text.
        type: the value's type (argparse converts the command-line text with it).
        default: the value when not given; ``None`` when it depends on the method, model or task
            (resolved in :mod:`zoprivacy.finetune._config`).
        saved: the option defines the run: saved in ``config.json``, fixed on ``--resume``.
        methods: the methods that accept it (given with another method, it is refused).
        switch: a flag without a value (``--no-cache``); giving it sets ``not default``.
        trainer: the trainers' fallback for a ``None`` value (``_REQUIRED``: none;
            ``_NOT_TRAINER``: not a :class:`TrainSettings` field).
        group: the ``--help`` section (``None``: the main one).
        flag: the command-line spelling (default ``--name-with-dashes``).
        argparse: further ``add_argument`` keywords (choices, metavar, action, dest).
    """

    name: str
    help: str
    type: type = str
    default: Any = None
    saved: bool = True
    methods: tuple[str, ...] = METHODS
    switch: bool = False
    trainer: Any = _NOT_TRAINER
    group: str | None = None
    flag: str = ""
    argparse: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def cli(self) -> str:
        """The command-line flag."""
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        """The attribute argparse stores the option under."""
        return self.argparse.get("dest", self.cli[2:].replace("-", "_"))


MASK_HELP = (
    "DP-ZOPO: perturb and update only a fraction of each trainable tensor's coordinates. "
    "magnitude:F[:smallest] keeps the fraction F in (0, 1] with the largest |θ| (or smallest), "
    "recomputed from the current weights every step; random:F[:EVERY] keeps each coordinate "
    "with probability F, drawn from the public --seed and redrawn every EVERY steps (default 1). "
    "Masks use public information only, so they cost no privacy"
)
STAGE_HELP = (
    "DP-ZOSO stage: from step S on, use new values, e.g. --stage 500:lr=0.5,directions=16 "
    "(keys: directions, clip-norm, lr, perturbation-scale; a key not given keeps the previous "
    "stage's value, so c does not follow a new K unless clip-norm is given; repeat for more "
    "stages, S increasing). σ stays the calibrated constant, so the accounting is unchanged"
)
PRIVATE_DIAGNOSTICS_HELP = (
    "also print the training loss and clip fraction on the progress bar and the wall time and "
    "peak memory at the end. They are computed from the private data without noise and are NOT "
    "covered by the guarantee (by default only the step and ε spent are shown)"
)

_O = Option
_ZO = ZO_METHODS
_DIRECTIONS_METHODS = ("dpaggzo", "dpzo", "mezo")
_CLIP_METHODS = PRIVATE_METHODS
_STEP: dict[str, Any] = {"group": STEP_GROUP, "methods": _ZO}

#: Every option of ``zoprivacy finetune``, in ``--help`` order.
OPTIONS: tuple[Option, ...] = (
    _O("method", f"{' | '.join(METHODS)} (default dpaggzo)", default="dpaggzo",
       trainer=_REQUIRED),
    _O("model", f"{' | '.join(MODELS)} (packaged presets) or a local Hugging Face folder "
       "(what save_pretrained writes; nothing is downloaded) (default minilm)", default="minilm"),
    _O("task", f"packaged data: {' | '.join(TASKS)} (default bbc_news; replaced by "
       "--train-file)"),
    _O("epsilon", "target ε > 0 of the private methods (default 2)", float, 2.0,
       trainer=_REQUIRED),
    _O("delta", "δ in (0, 1) (default 1e-5)", float, 1e-5, trainer=_REQUIRED),
    _O("directions", "K, directions per step (dpaggzo 64, mezo 16, dpzo 1)", int,
       methods=_DIRECTIONS_METHODS, trainer=1),
    _O("clip_norm", "clip norm c (dpaggzo: β/√K with β chosen on the packaged task's validation "
       "split, 0.4 on bbc_news and your own data, 0.8 on rotten_tomatoes; dpzo: 0.8; dpadamw: "
       "per-sample gradient norm 1.0)", float, methods=_CLIP_METHODS, trainer=float("inf")),
    _O("lr", "learning rate η (default: chosen on the packaged task's validation split, "
       "benchmarks/results/default_selection.json; on bbc_news and your own data dpaggzo and "
       "dpzo 3, mezo 1, dpadamw 0.05, adamw 0.01)", float, trainer=_REQUIRED),
    _O("steps", "number of steps T (default 1000)", int, trainer=_REQUIRED),
    _O("batch_size", "expected batch size b = q·ñ (default 64)", float, 64.0,
       trainer=_REQUIRED),
    _O("perturbation_scale", "φ of the zeroth-order methods (default 1e-3)", float, 1e-3,
       trainer=_REQUIRED),
    _O("weight_decay", "decoupled weight decay (default 0)", float, 0.0, trainer=_REQUIRED),
    _O("trainable", "what to train: classifier, head, lastN, bias (the bias terms), all, "
       "joined with '+', and last lora[:r=8,alpha=16,targets=q_proj+v_proj] (PEFT adapters) "
       "(default: a classifier's head classifier; a causal LM's final norm head; lora for "
       "--target-column)"),
    _O("threads", "torch CPU threads (default 1)", int, 1, saved=False),
    _O("seed", "public seed: split, head initialisation, directions (default 0)", int, 0,
       trainer=_REQUIRED),
    _O("max_length", "tokens per record (rotten_tomatoes 64, bbc_news 128, --train-file 128)",
       int),
    _O("train_per_class", "packaged tasks: training records per class (default 512)", int),
    _O("test_size", "held-out test records (rotten_tomatoes 1000, bbc_news 500; with "
       "--train-file and no --test-file: records carved from it by --seed, required)", int),
    _O("validation_size", "records carved from the training data (public seed) for model "
       "selection; the private run does not train on them and report.json gives their "
       "accuracy, which the privacy guarantee does not cover (default 0: none)", int, 0),
    _O("dtype", "parameter dtype: float32 (default), bfloat16, float16 (the privacy "
       "arithmetic stays float64 on the CPU)", default="float32",
       argparse={"choices": ("float32", "bfloat16", "float16")}),
    _O("device", "auto (default: CUDA when available), cpu, cuda or cuda:N; every tensor "
       "follows the model's device", default="auto", saved=False),
    _O("config", "read the options from a TOML file (keys as the flags, e.g. train-file = "
       "\"x.csv\"); flags given on the command line override it; report.json records the "
       "effective configuration", saved=False, argparse={"metavar": "FILE"}),
    _O("output", "output folder (default runs/<timestamp>)", saved=False,
       argparse={"metavar": "DIR"}),
    _O("resume", "continue the interrupted run in --output DIR", bool, False, saved=False,
       switch=True),
    _O("pld", "skip the PLD accountant's ε (faster)", bool, True, saved=False, switch=True,
       flag="--no-pld"),
    _O("cache", "run the full model in every loss evaluation instead of caching the frozen "
       "prefix", bool, True, switch=True, flag="--no-cache"),
    _O("checkpoint_every", "save a checkpoint every N steps (default 100)", int, 100,
       saved=False),
    _O("progress", "no progress bar", bool, True, saved=False, switch=True,
       flag="--no-progress"),
    _O("show_private_diagnostics", PRIVATE_DIAGNOSTICS_HELP, bool, False, saved=False,
       switch=True),
    _O("model_kind", "classifier or causal: what --model is (default: detected from its "
       "config)", argparse={"choices": ("classifier", "causal")}, group=USER_GROUP),
    _O("train_file", "your PRIVATE training data: a .csv, .jsonl or .parquet file (its record "
       "count is released once with Laplace noise; nothing else about it is shown)",
       group=USER_GROUP, argparse={"metavar": "PATH"}),
    _O("test_file", "your PUBLIC test data, same format (default: --test-size records carved "
       "from --train-file by --seed; their accuracy is then NOT covered by the guarantee)",
       group=USER_GROUP, argparse={"metavar": "PATH"}),
    _O("text_column", "the input text column (default text)", group=USER_GROUP),
    _O("label_column", "the label column, strings or integers (default label)",
       group=USER_GROUP),
    _O("text_pair_column", "an optional second text column (NLI-style pairs)",
       group=USER_GROUP),
    _O("target_column", "a causal LM trained on completions: the target text column "
       "(evaluation: test loss and exact match of greedy decoding)", group=USER_GROUP),
    _O("labels", "the public, ordered label set, comma-separated (default: the labels of "
       "--test-file; required without it). Never taken from the private training file",
       group=USER_GROUP, argparse={"metavar": "A,B,..."}),
    _O("prompt", "a causal LM's prompt with a {text} placeholder (default \"Text: {text}\\n"
       "Label:\"; for --target-column the text itself)", group=USER_GROUP),
    _O("label_words", "a causal LM's answer words, one single-token word per label, "
       "comma-separated, in the labels' order; each is given one leading space (default: ' ' + "
       "each label)", group=USER_GROUP,
       argparse={"metavar": "W1,W2,..."}),
    _O("direction_distribution", "distribution of the directions z: gaussian (default, as in "
       "the paper), rademacher (uniform ±1, cheaper to generate) or lowrank (U Vᵀ/√r per "
       "weight matrix, generated once per step; see --direction-rank, --direction-refresh); "
       "all have E[zzᵀ] = I",
       default="gaussian", trainer="gaussian", argparse={"choices": DIRECTION_KINDS}, **_STEP),
    _O("direction_rank", "rank r of --direction-distribution lowrank: z = U Vᵀ/√r per weight "
       "matrix (default 2; LOZO, Chen et al. 2025)", int, trainer=None,
       argparse={"metavar": "R"}, **_STEP),
    _O("direction_refresh", "lazy sampling of --direction-distribution lowrank: V is redrawn "
       "every NU steps, U at every step (default 1)", int, trainer=None,
       argparse={"metavar": "NU"}, **_STEP),
    _O("difference", "central (default): (L(θ+φz) − L(θ−φz))/2φ, 2K forward passes; forward: "
       "(L(θ+φz) − L(θ))/φ, K + 1 passes (same clipping and privacy)", default="central",
       trainer="central", argparse={"choices": DIFFERENCES}, **_STEP),
    _O("perturbation", "how θ ± φz is evaluated: auto (default; zero drift, in place only "
       "where a tensor cannot be substituted), hooks (substitution everywhere), inplace (the "
       "paper's writes)", default="auto", trainer="auto",
       argparse={"choices": PERTURBATION_PATHS}, **_STEP),
    _O("batched_directions", "evaluate M directions per vmapped call over stacked perturbed "
       "copies of the trainable tensors (faster for small trainable sets; memory grows with M)",
       int, trainer=None, argparse={"metavar": "M"}, **_STEP),
    _O("mask", MASK_HELP, dict, trainer=None, argparse={"metavar": "SPEC", "type": str},
       **_STEP),
    _O("stages", STAGE_HELP, list, [], trainer=[], flag="--stage",
       argparse={"action": "append", "dest": "stages", "metavar": "S:KEY=V,...", "type": str},
       **_STEP),
)  # fmt: skip

BY_NAME = {o.name: o for o in OPTIONS}
#: Options whose values define the run: on --resume they come from config.json.
RUN_OPTIONS = tuple(o.name for o in OPTIONS if o.saved)
#: The zeroth-order step options and their values when not given (None for other methods).
STEP_DEFAULTS = {o.name: o.default for o in OPTIONS if o.group == STEP_GROUP}
#: Defaults that do not depend on the method, model or task.
COMMON_DEFAULTS = {
    o.name: o.default
    for o in OPTIONS
    if o.default is not None and o.group is None and not o.switch and o.name != "output"
}
#: Run options added after the first release: an older config.json gets the value a new run of
#: its method would have.
ADDED_OPTIONS = (
    "validation_size",
    "dtype",
    *STEP_DEFAULTS,
    *(o.name for o in OPTIONS if o.group == USER_GROUP),
)


def flag(name: str) -> str:
    """The command-line spelling of the option ``name``."""
    return BY_NAME[name].cli if name in BY_NAME else "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``zoprivacy finetune`` (argparse defaults are all None: not given)."""
    groups: dict[str | None, Any] = {None: parser}
    for o in OPTIONS:
        if o.group not in groups:
            groups[o.group] = parser.add_argument_group(o.group)
        if o.switch:
            groups[o.group].add_argument(o.cli, action="store_true", help=o.help)
            continue
        kwargs: dict[str, Any] = {"help": o.help}
        if o.type in (int, float):
            kwargs["type"] = o.type
        kwargs.update(o.argparse)
        groups[o.group].add_argument(o.cli, **kwargs)


def _dataclass(name: str, fields: list[tuple], doc: str, **namespace: Any) -> type:
    cls = dataclasses.make_dataclass(name, fields, namespace=namespace)
    cls.__module__ = __name__
    cls.__doc__ = doc
    return cls


def _run_dict(self: Any) -> dict[str, Any]:
    return {k: getattr(self, k) for k in RUN_OPTIONS}


FinetuneConfig = _dataclass(
    "FinetuneConfig",
    [(o.name, o.type | None) for o in OPTIONS if o.name != "resume"],
    "The resolved configuration of a run (``config.json`` holds its run options).",
    private=property(lambda self: self.method in PRIVATE_METHODS),
    run_dict=_run_dict,
)


def _trainer_field(o: Option) -> tuple:
    if o.trainer is _REQUIRED:
        return (o.name, o.type)
    if isinstance(o.trainer, list):
        return (o.name, o.type, dataclasses.field(default_factory=list))
    return (o.name, o.type | None, dataclasses.field(default=o.trainer))


_TRAINER = [o for o in OPTIONS if o.trainer is not _NOT_TRAINER]
TrainSettings = _dataclass(
    "TrainSettings",
    [_trainer_field(o) for o in sorted(_TRAINER, key=lambda o: o.trainer is not _REQUIRED)],
    "The hyper-parameters a trainer needs (already resolved and validated); a ``None`` "
    "option of the configuration becomes its fallback (K = 1, c = ∞, gaussian, ...).",
)


def train_settings(cfg: Any) -> Any:
    """The :class:`TrainSettings` of a resolved configuration."""
    values = {}
    for o in _TRAINER:
        value = getattr(cfg, o.name)
        if value is None and o.trainer is not _REQUIRED:
            value = list(o.trainer) if isinstance(o.trainer, list) else o.trainer
        values[o.name] = value
    return TrainSettings(**values)
