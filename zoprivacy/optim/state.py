"""The checkpoint format of :class:`~zoprivacy.DPAggZO` and how a resume is checked.

``DPAggZO.state_dict()`` is torch's optimizer state plus one entry, ``state[STATE_KEY]``, holding
the step count, the public seed, the hyper-parameters (a schedule's value at the saved step, the
library's own schedules and masks whole), the seeded noise state and how a step is computed
(directions, direction stream, difference, perturbation path, batching). A resume must continue
the same trajectory, so :func:`read_state` refuses any mismatch with a message naming the fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from zoprivacy import checks
from zoprivacy.optim.config import SCHEDULABLE, check_hyper
from zoprivacy.optim.directions import (
    DIRECTION_STREAM,
    DirectionOptions,
    check_direction_options,
    stream_affects,
)
from zoprivacy.optim.masks import FixedMask, MagnitudeMask, RandomMask, mask_from_state_dict
from zoprivacy.optim.perturb import check_perturbation
from zoprivacy.optim.schedules import Stagewise, schedule_from_state_dict

__all__ = ["DIFFERENCES", "STATE_KEY", "STATE_VERSION", "describe", "read_state", "serialisable"]

STATE_KEY = "zoprivacy"
STATE_VERSION = 2

DIFFERENCES = ("central", "forward")
"""Values of ``DPAggZO(difference=...)``."""


def check_difference(value: object) -> str:
    if value not in DIFFERENCES:
        raise ValueError(f"difference must be one of {DIFFERENCES}, got {value!r}")
    return str(value)


def serialisable(obj: object) -> bool:
    """A library schedule or mask, which saves itself whole in ``DPAggZO.state_dict()``."""
    return type(obj) in (Stagewise, MagnitudeMask, RandomMask, FixedMask)


def describe(obj: Any) -> Any:
    """A process-independent description of a mask or schedule (for the configuration
    fingerprint): the library's by their whole configuration (a FixedMask by a digest of its
    bits), any other callable by its qualified name only."""
    if obj is None:
        return None
    kind = type(obj)
    if kind is FixedMask:
        return ("FixedMask", obj.digest)  # hashed once (the masks are fixed)
    if serialisable(obj):
        return repr(sorted(obj.state_dict().items()))
    name = getattr(obj, "__qualname__", None) or kind.__qualname__
    return (getattr(obj, "__module__", None) or kind.__module__, name)


def saved_entry(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer's own entry of a state dict, or a ValueError."""
    zo = state_dict.get(STATE_KEY) if isinstance(state_dict, Mapping) else None
    if not isinstance(zo, dict):
        raise ValueError(f"state_dict has no {STATE_KEY!r} entry: not from DPAggZO")
    return zo


def read_state(
    zo: Mapping[str, Any],
    current: Mapping[str, Any],
    trainable: Sequence[torch.Tensor],
) -> dict[str, Any]:
    """The settings a checkpoint restores, checked against this optimizer's ``current`` ones.

    ``current`` holds ``spec`` (K, c, σ, φ: constants or schedules), ``mask``, ``perturbation``,
    ``directions`` (a :class:`~zoprivacy.optim.directions.DirectionOptions`), ``directions_given``
    (whether they were chosen, not the defaults), ``difference`` and ``batched``. Returns the same
    keys plus ``step``, ``seed``, ``expected_batch_size`` and ``sample_rate``.
    """
    step = checks.integer("step", zo["step"], minimum=0)
    scheduled = list(zo.get("scheduled", []))
    saved_schedules = zo.get("schedules") or {}
    spec = {
        name: _resume_schedule(
            name, current["spec"][name], name in scheduled, saved_schedules.get(name), zo, step
        )
        for name in SCHEDULABLE
    }
    if spec["clip_norm"] is None and callable(spec["noise_multiplier"]):
        raise ValueError("clip_norm=None (MeZO) cannot be resumed with a σ schedule")
    b, q = zo["expected_batch_size"], zo["sample_rate"]
    directions = _resume_directions(zo, current["directions"], current["directions_given"])
    _check_stream(zo.get("direction_stream", "v1"), trainable, directions.kind)
    batched = zo.get("batched_directions", current["batched"])
    return {
        "step": step,
        "seed": checks.integer("seed", zo["seed"], minimum=0),
        "spec": spec,
        "expected_batch_size": None
        if b is None
        else checks.real("expected_batch_size", b, positive=True),
        "sample_rate": None if q is None else checks.real("sample_rate", q, positive=True),
        "perturbation": check_perturbation(zo.get("perturbation", current["perturbation"])),
        "directions": directions,
        "difference": check_difference(zo.get("difference", current["difference"])),
        "mask": _resume_mask(current["mask"], bool(zo.get("masked", False)), zo.get("mask")),
        "batched": None
        if batched is None
        else checks.integer("batched_directions", batched, minimum=1),
    }


def _resume_directions(
    zo: Mapping[str, Any], mine: DirectionOptions, given: bool
) -> DirectionOptions:
    """The checkpoint's direction options; refused when this optimizer chose other ones.

    An optimizer built with the default options (Gaussian) takes the checkpoint's, as a resume
    through ``make_private`` does; one built with other options (another kind, a rank or a
    refresh period) must match the checkpoint, or the run would not continue its trajectory.
    """
    saved = check_direction_options(
        zo.get("directions", mine.kind), zo.get("direction_rank"), zo.get("direction_refresh")
    )
    if given and saved != mine:
        raise ValueError(
            f"the checkpoint's directions are {_options_text(saved)} but this optimizer's are "
            f"{_options_text(mine)}: resume with the same directions, direction_rank and "
            "direction_refresh (or leave them out to take the checkpoint's)"
        )
    return saved


def _options_text(options: DirectionOptions) -> str:
    if options.kind != "lowrank":
        return repr(options.kind)
    return f"'lowrank' (direction_rank={options.rank}, direction_refresh={options.refresh})"


def _check_stream(stream: str, trainable: Sequence[torch.Tensor], directions: str) -> None:
    if stream != DIRECTION_STREAM and stream_affects(list(trainable), directions):
        raise ValueError(
            f"state_dict was saved with direction stream {stream!r}, this zoprivacy "
            f"generates {DIRECTION_STREAM!r}: its CPU Gaussian directions of tensors with "
            "more than GAUSSIAN_CHUNK values differ, so the run would not continue the same "
            "trajectory; resume with the zoprivacy version that wrote the checkpoint, or "
            "start a new run"
        )


def _resume_schedule(
    name: str, mine: Any, was_scheduled: bool, saved: dict[str, Any] | None, zo: Mapping, step: int
) -> Any:
    """The spec of hyper-parameter ``name`` after loading a checkpoint (see load_state_dict)."""
    if not was_scheduled:
        if callable(mine):
            raise ValueError(
                f"the checkpoint's {name} is the constant {zo[name]!r} but this optimizer has "
                f"the schedule {mine!r}: build it with {name}={zo[name]!r} (or nothing) to resume"
            )
        return check_hyper(name, zo[name], scheduled=False)
    if saved is not None:
        restored = schedule_from_state_dict(saved)
        if not callable(mine):  # built without it (e.g. make_private's resume): restore it
            check_hyper(name, restored(step), scheduled=True, step=step)
            return restored
        if mine != restored:
            raise ValueError(
                f"the checkpoint's {name} schedule is {restored!r} but this optimizer's is "
                f"{mine!r}: resume with the same schedule, or build the optimizer without one to "
                "restore the checkpoint's"
            )
        return mine
    if not callable(mine):
        raise ValueError(
            f"the checkpoint's {name} was a schedule: build the optimizer with the "
            f"same schedule (a callable of the step) to resume it"
        )
    value = check_hyper(name, mine(step), scheduled=True, step=step)
    saved_value = check_hyper(name, zo[name], scheduled=True, step=step)
    if value != saved_value:
        raise ValueError(
            f"this optimizer's {name} schedule gives {value!r} at step {step}, the checkpoint "
            f"saved {saved_value!r}: resume with the same schedule"
        )
    return mine


def _resume_mask(mine: Any, masked: bool, saved: dict[str, Any] | None) -> Any:
    """The mask after loading a checkpoint (see load_state_dict)."""
    if not masked:
        if mine is not None:
            raise ValueError(
                f"the checkpoint was taken without a mask but this optimizer has {mine!r}: "
                "build it with mask=None to resume"
            )
        return None
    if saved is not None:
        restored = mask_from_state_dict(saved)
        if mine is None:
            return restored
        if mine != restored:
            raise ValueError(
                f"the checkpoint's mask is {restored!r} but this optimizer's is {mine!r}: resume "
                "with the same mask, or with mask=None to restore the checkpoint's"
            )
        return mine
    if mine is None:
        raise ValueError("the checkpoint was taken with a mask: pass the same mask to resume")
    return mine
