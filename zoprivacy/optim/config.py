"""The hyper-parameters of DP-AggZO and their one resolution per step.

K, c, σ and φ are constants or schedules ``f(step) -> value`` (DP-ZOSO); the learning rate and
weight decay live in the param groups (and may be changed by a torch LR scheduler between steps);
the DP-ZOPO mask is a callable of (step, index, tensor). :func:`resolve_step` evaluates every one
of them exactly once, at the start of a step and before any data is read, into a frozen
:class:`StepConfig`; that one value is used for the whole step (clipping, noise, journal, update,
stats), so a schedule or param group changed while the closure runs cannot make the clipping and
the noise disagree (issue 14, defect 2).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zoprivacy import checks
from zoprivacy.optim.masks import pack_mask

__all__ = ["SCHEDULABLE", "StepConfig", "check_group", "check_hyper", "resolve", "resolve_step"]

SCHEDULABLE = ("num_directions", "clip_norm", "noise_multiplier", "perturbation_scale")
"""The hyper-parameters that accept a schedule ``f(step) -> value``."""

Mask = Callable[[int, int, torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True)
class StepConfig:
    """Every per-step value of one step, resolved once before data is read."""

    step: int
    num_directions: int  # K
    clip_norm: float | None  # c (None: MeZO)
    noise_multiplier: float  # σ
    perturbation_scale: float  # φ
    lrs: tuple[float, ...]  # η of every trainable tensor
    weight_decays: tuple[float, ...]  # decoupled weight decay of every trainable tensor
    masks: tuple[torch.Tensor | None, ...] | None  # packed DP-ZOPO masks (None: no mask)

    @property
    def noisy(self) -> bool:
        """True when line 15 adds noise (clipping and σ > 0)."""
        return self.clip_norm is not None and self.noise_multiplier > 0


def resolve(spec: Any, step: int) -> Any:
    """A schedule's value at ``step``, or the constant itself."""
    return spec(step) if callable(spec) else spec


def check_hyper(name: str, value: object, *, scheduled: bool, step: int | None = None) -> Any:
    """Validate one (possibly scheduled) hyper-parameter value."""
    where = f"{name}" if step is None or not scheduled else f"{name} (at step {step})"
    if name == "num_directions":
        return checks.integer(where, value, minimum=1)
    if name == "clip_norm":
        return None if value is None else checks.real(where, value, positive=True)
    if name == "noise_multiplier":
        return checks.real(where, value, minimum=0.0)
    return checks.real(where, value, positive=True)  # perturbation_scale


def check_group(group: Mapping[str, Any]) -> None:
    """A param group's learning rate and weight decay."""
    checks.real("lr", group["lr"], minimum=0.0)
    checks.real("weight_decay", group["weight_decay"], minimum=0.0)


def resolve_hyper(spec: Mapping[str, Any], step: int) -> dict[str, Any]:
    """K, c, σ, φ at ``step``, each schedule called once and validated."""
    values = {
        name: check_hyper(name, resolve(spec[name], step), scheduled=True, step=step)
        for name in SCHEDULABLE
    }
    if values["clip_norm"] is None and spec["clip_norm"] is not None:
        raise ValueError(f"the clip_norm schedule returned None at step {step}")
    return values


def resolve_step(
    spec: Mapping[str, Any],
    step: int,
    entries: Sequence[tuple[torch.Tensor, Mapping[str, Any]]],
    mask: Mask | None,
) -> StepConfig:
    """The :class:`StepConfig` of ``step`` for the trainable ``entries`` (tensor, its group)."""
    for group in {id(g): g for _, g in entries}.values():
        check_group(group)
    return StepConfig(
        step=step,
        **resolve_hyper(spec, step),
        lrs=tuple(float(g["lr"]) for _, g in entries),
        weight_decays=tuple(float(g["weight_decay"]) for _, g in entries),
        masks=None if mask is None else tuple(_masks(mask, step, [p for p, _ in entries])),
    )


def _masks(mask: Mask, step: int, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """DP-ZOPO: this step's mask of every tensor (called once per tensor), packed to bits."""
    packed: list[torch.Tensor | None] = []
    for i, p in enumerate(params):
        m = mask(step, i, p.detach())
        if m is None:
            packed.append(None)
            continue
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(
                f"mask(step={step}, index={i}) must return a bool tensor or None, got "
                f"{type(m).__name__}{'' if not isinstance(m, torch.Tensor) else m.dtype}"
            )
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(
                f"mask(step={step}, index={i}) has shape {tuple(m.shape)}, the tensor "
                f"{tuple(p.shape)}"
            )
        packed.append(pack_mask(m.to(p.device)))
    return packed
