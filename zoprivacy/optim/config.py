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

__all__ = [
    "SCHEDULABLE",
    "StepConfig",
    "check_batched",
    "check_flag",
    "check_group",
    "check_hyper",
    "check_mode",
    "check_public_values",
    "check_spec",
    "resolve",
    "resolve_step",
]

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


# ---------------------------------------------------------------------- construction checks
def check_spec(num_directions: Any, clip_norm: Any, noise_multiplier: Any, phi: Any) -> dict:
    """K, c, σ, φ: constants validated, schedules validated at step 0 (fail early)."""
    spec: dict[str, Any] = {
        "num_directions": num_directions,
        "clip_norm": clip_norm,
        "noise_multiplier": noise_multiplier,
        "perturbation_scale": phi,
    }
    for name, value in spec.items():
        if callable(value):
            check_hyper(name, value(0), scheduled=True)
        else:
            spec[name] = check_hyper(name, value, scheduled=False)
    return spec


def check_public_values(
    b: Any, q: Any, seed: Any, mask: Any
) -> tuple[float | None, float | None, int | None]:
    """``expected_batch_size`` b, ``sample_rate`` q and ``seed`` (each optional), and ``mask``."""
    if b is not None:
        b = checks.real("expected_batch_size", b, positive=True)
    if q is not None:
        q = checks.sample_rate(q)
    if seed is not None:
        seed = checks.integer("seed", seed, minimum=0)
    if mask is not None and not callable(mask):
        raise TypeError(f"mask must be a callable (step, index, param) -> mask, got {mask!r}")
    return b, q, seed


def check_flag(name: str, value: object) -> bool:
    """A boolean option."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_batched(batched: Any, perturbation: str) -> int | None:
    """``batched_directions``: None or m ≥ 1, never with the in-place path."""
    if batched is None:
        return None
    batched = checks.integer("batched_directions", batched, minimum=1)
    if perturbation == "inplace":
        raise ValueError(
            "batched_directions evaluates stacked perturbed copies through the "
            "substitution path; it cannot be combined with perturbation='inplace'"
        )
    return batched


def check_mode(spec: Mapping[str, Any], b: float | None, accountant: Any, q: float | None) -> None:
    """DP, clipped-noiseless or MeZO: the combinations that make sense (see DPAggZO)."""
    clip0 = resolve(spec["clip_norm"], 0)
    sigma0 = resolve(spec["noise_multiplier"], 0)
    if clip0 is None and sigma0 > 0:
        raise ValueError(
            f"clip_norm=None with noise_multiplier={sigma0}: the noise std is σ·c, "
            "so a clip norm is required. Pass clip_norm=c > 0, or noise_multiplier=0 for "
            "non-private MeZO."
        )
    if clip0 is not None and b is None:
        raise ValueError(
            "expected_batch_size is required when clip_norm is set: the update is normalised "
            "by the public b = q·ñ, never by the private |B|. Pass expected_batch_size=b > 0."
        )
    if accountant is None:
        return
    if not callable(getattr(accountant, "step", None)):
        raise TypeError("accountant must have a step(noise_multiplier, sample_rate, steps)")
    if q is None:
        raise ValueError(
            "sample_rate is required with an accountant: pass the Poisson rate q in (0, 1]"
        )
    if clip0 is None or sigma0 <= 0:
        raise ValueError(
            "an accountant needs a private configuration: clip_norm > 0 and "
            "noise_multiplier > 0 (a noiseless step has infinite privacy cost)"
        )
