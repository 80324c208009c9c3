"""Parsing and checking the step options of ``zoprivacy finetune``: DP-ZOPO masks (``--mask``),
DP-ZOSO stages (``--stage``), directions, differences, perturbation path, batched directions.

They are declared in :data:`zoprivacy.finetune._options.OPTIONS` and apply to the zeroth-order
methods only. In ``config.json``
they are saved in a normal form (the mask as a dict, the stages resolved: every stage with all
its values), so that ``--resume`` can compare what the user passes again with the saved run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from zoprivacy.optim.directions import DIRECTION_KINDS
from zoprivacy.optim.masks import MagnitudeMask, RandomMask
from zoprivacy.optim.optimizer import DIFFERENCES
from zoprivacy.optim.perturb import PERTURBATION_PATHS as PERTURBATIONS
from zoprivacy.optim.schedules import Stagewise

from ._methods import ZO_METHODS
from ._options import STEP_DEFAULTS
from ._setup import SetupError

#: Hyper-parameters a stage may change, by their config.json name (stage syntax uses the
#: command-line names: directions, clip-norm, lr, perturbation-scale).
STAGE_KEYS = ("directions", "clip_norm", "lr", "perturbation_scale")

# ---------------------------------------------------------------------------------------------
# parsing (what the user gave, in normal form)
# ---------------------------------------------------------------------------------------------


def _number(flag: str, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SetupError(f"{flag}: {what} must be a number, got {text!r}") from None
    return value


def _integer(flag: str, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SetupError(f"{flag}: {what} must be an integer, got {text!r}") from None


def parse_mask(text: str) -> dict[str, Any]:
    """``magnitude:F[:smallest|largest]`` or ``random:F[:EVERY]`` as a dict (config.json form)."""
    usage = "use magnitude:F[:smallest] or random:F[:EVERY], F the kept fraction in (0, 1]"
    parts = str(text).strip().split(":")
    kind = parts[0].lower()
    if kind not in ("magnitude", "random") or len(parts) not in (2, 3):
        raise SetupError(f"--mask {text!r} is not a mask: {usage}")
    density = _number("--mask", parts[1], "the kept fraction F")
    if kind == "magnitude":
        largest = True
        if len(parts) == 3:
            if parts[2].lower() not in ("smallest", "largest"):
                raise SetupError(
                    f"--mask {text!r}: the third field of a magnitude mask is smallest or "
                    "largest (default largest)"
                )
            largest = parts[2].lower() == "largest"
        return {"type": "magnitude", "density": density, "largest": largest}
    every = _integer("--mask", parts[2], "EVERY") if len(parts) == 3 else 1
    return {"type": "random", "density": density, "every": every}


def parse_stage(text: str) -> dict[str, Any]:
    """``S:key=value,...`` as ``{"from_step": S, key: value, ...}`` (only the keys given)."""
    usage = "use S:KEY=V[,KEY=V...] with KEY in directions, clip-norm, lr, perturbation-scale"
    start, sep, body = str(text).partition(":")
    if not sep or not body.strip():
        raise SetupError(f"--stage {text!r}: {usage}, e.g. --stage 500:lr=0.5")
    stage: dict[str, Any] = {"from_step": _integer("--stage", start.strip(), "the first step S")}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        if key in ("k", "num_directions"):
            key = "directions"
        if key in ("noise_multiplier", "sigma", "epsilon"):
            raise SetupError(
                f"--stage {text!r}: the noise multiplier σ is calibrated to the (ε, δ) budget as "
                "one constant for every step and cannot change per stage; drop it"
            )
        if not eq or key not in STAGE_KEYS:
            raise SetupError(f"--stage {text!r}: {item.strip()!r} is not KEY=V; {usage}")
        if key in stage:
            raise SetupError(f"--stage {text!r}: {key.replace('_', '-')} is given twice")
        flag = f"--stage {text!r}"
        what = key.replace("_", "-")
        stage[key] = (
            _integer(flag, value.strip(), what)
            if key == "directions"
            else _number(flag, value.strip(), what)
        )
    return stage


def parse_stages(texts: Sequence[str]) -> list[dict[str, Any]]:
    """Every ``--stage`` given, parsed (:func:`parse_stage`)."""
    return [parse_stage(text) for text in texts]


# ---------------------------------------------------------------------------------------------
# defaults, resolution and validation
# ---------------------------------------------------------------------------------------------


def step_defaults(values: dict[str, Any], given: Mapping[str, Any]) -> None:
    """Fill in the step options of ``values`` (after method, K, c, lr, φ, steps are resolved):
    None for the methods they do not apply to (a given one was refused before)."""
    if values["method"] not in ZO_METHODS:
        values.update(dict.fromkeys(STEP_DEFAULTS))
        return
    for key, default in STEP_DEFAULTS.items():
        if key != "stages":
            values[key] = given.get(key, default)
    values["stages"] = resolve_stages(given.get("stages", []), values)


def resolve_stages(raw: Sequence[Mapping[str, Any]], base: Mapping[str, Any]) -> list[dict]:
    """Every stage with all its values: a key not given keeps the previous stage's value; stage
    0 is the run's own --directions, --clip-norm, --lr and --perturbation-scale."""
    method = base["method"]
    previous = {key: base[key] for key in STAGE_KEYS}
    resolved = []
    for stage in raw:
        if method == "dpzo" and "directions" in stage:
            raise SetupError("--stage: --method dpzo uses one direction (K = 1); drop directions=")
        if method == "mezo" and "clip_norm" in stage:
            raise SetupError(
                "--stage: --method mezo does not clip (clip-norm does not apply); drop clip-norm="
            )
        current = {**previous, **{k: v for k, v in stage.items() if k != "from_step"}}
        resolved.append({"from_step": stage["from_step"], **current})
        previous = current
    return resolved


def need(ok: bool, message: str) -> None:
    """Raise :class:`SetupError` with ``message`` unless ``ok``."""
    if not ok:
        raise SetupError(message)


def validate_step_options(cfg: Any) -> None:
    """Check the step options of a resolved configuration; one-line errors naming the fix."""
    if cfg.method not in ZO_METHODS:
        return
    _check_step(cfg)
    if cfg.mask is not None:
        _check_mask(cfg.mask)
    _check_stages(cfg)


def _check_step(cfg: Any) -> None:
    need(
        cfg.direction_distribution in DIRECTION_KINDS,
        f"--direction-distribution must be one of {', '.join(DIRECTION_KINDS)}, "
        f"got {cfg.direction_distribution!r}",
    )
    for flag, value in (("rank", cfg.direction_rank), ("refresh", cfg.direction_refresh)):
        if value is None:
            continue
        need(
            cfg.direction_distribution == "lowrank",
            f"--direction-{flag} applies to --direction-distribution lowrank only",
        )
        need(
            isinstance(value, int) and value >= 1,
            f"--direction-{flag} must be an int >= 1, got {value!r}",
        )
    need(
        cfg.difference in DIFFERENCES,
        f"--difference must be central or forward, got {cfg.difference!r}",
    )
    need(
        cfg.perturbation in PERTURBATIONS,
        f"--perturbation must be one of {', '.join(PERTURBATIONS)}, got {cfg.perturbation!r}",
    )
    m = cfg.batched_directions
    if m is not None:
        need(isinstance(m, int) and m >= 1, f"--batched-directions must be an int >= 1, got {m!r}")
        need(
            cfg.perturbation != "inplace",
            "--batched-directions evaluates stacked perturbed copies and cannot be combined "
            "with --perturbation inplace; use --perturbation auto or hooks",
        )


def _check_mask(mask: Mapping[str, Any]) -> None:
    density = mask.get("density")
    need(
        isinstance(density, float) and 0.0 < density <= 1.0,
        f"--mask: the kept fraction must be in (0, 1], got {density!r} "
        "(e.g. --mask magnitude:0.1 keeps 10%)",
    )
    if mask["type"] == "random":
        every = mask.get("every")
        need(
            isinstance(every, int) and every >= 1,
            f"--mask random:F:EVERY: EVERY must be an int >= 1, got {every!r}",
        )


def _check_stages(cfg: Any) -> None:
    last = 0
    for stage in cfg.stages:
        start = stage["from_step"]
        need(
            start > last,
            f"--stage {start}: stages must start at increasing steps >= 1 (after {last}); "
            "give them in order",
        )
        need(
            start < cfg.steps,
            f"--stage {start}: the run has only {cfg.steps} steps (0 to {cfg.steps - 1}); "
            "start the stage earlier or raise --steps",
        )
        last = start
        k = stage["directions"]
        need(isinstance(k, int) and k >= 1, f"--stage {start}: directions must be >= 1, got {k}")
        for key in ("lr", "perturbation_scale") + (("clip_norm",) if cfg.private else ()):
            value = stage[key]
            need(
                isinstance(value, float | int) and math.isfinite(value) and value > 0,
                f"--stage {start}: {key.replace('_', '-')} must be a number > 0, got {value}",
            )


# ---------------------------------------------------------------------------------------------
# building the optimizer's options
# ---------------------------------------------------------------------------------------------


def build_mask(spec: Mapping[str, Any] | None, seed: int) -> MagnitudeMask | RandomMask | None:
    """The DP-ZOPO mask of a config.json mask entry (random masks use the public ``seed``)."""
    if spec is None:
        return None
    if spec["type"] == "magnitude":
        return MagnitudeMask(spec["density"], largest=spec["largest"])
    return RandomMask(spec["density"], seed=seed, every=spec["every"])


def schedule(stages: Sequence[Mapping[str, Any]], key: str, first: Any) -> Any | Stagewise | None:
    """``first`` if no stage changes ``key``, else a :class:`Stagewise` over the stages."""
    values = [first, *(s[key] for s in stages)]
    if all(v == first for v in values):
        return first
    return Stagewise([s["from_step"] for s in stages], values)


def step_report(cfg: Any, trainer: Any) -> dict[str, Any]:
    """The step options for ``report.json`` (None for methods they do not apply to), with the
    perturbation path that actually ran (``"hooks"``, ``"mixed"``, ``"inplace"``, ``"batched"``).
    """
    if cfg.method not in ZO_METHODS:
        return {key: None for key in (*STEP_DEFAULTS, "perturbation_path", "inplace_tensors")}
    optimizer = getattr(trainer, "optimizer", None)
    mask = None if cfg.mask is None else dict(cfg.mask)
    if mask is not None and mask["type"] == "random":
        mask["seed"] = cfg.seed  # public: the run's --seed
    stages = None
    if cfg.stages:
        first = {"from_step": 0, **{k: getattr(cfg, k) for k in STAGE_KEYS}}
        stages = [first, *cfg.stages]
    return {
        "direction_distribution": cfg.direction_distribution,
        "direction_rank": None if optimizer is None else optimizer.direction_rank,
        "direction_refresh": None if optimizer is None else optimizer.direction_refresh,
        "difference": cfg.difference,
        "perturbation": cfg.perturbation,
        "perturbation_path": None if optimizer is None else optimizer.perturbation_path,
        "inplace_tensors": None if optimizer is None else list(optimizer.inplace_tensors),
        "batched_directions": cfg.batched_directions,
        "mask": mask,
        "stages": stages,
    }
