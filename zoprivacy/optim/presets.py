"""The presets of :class:`~zoprivacy.DPAggZO`: DPZO (K = 1) and non-private MeZO.

Both are :class:`DPAggZO` with fixed arguments; they are exported from :mod:`zoprivacy` and
:mod:`zoprivacy.optim`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from zoprivacy.optim.optimizer import DPAggZO

__all__ = ["DPZO", "MeZO"]


class DPZO(DPAggZO):
    """DPZO / DPZero: :class:`DPAggZO` with a single direction (K = 1, scalar clipping)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        clip_norm: float | Callable[[int], float],
        noise_multiplier: float | Callable[[int], float],
        expected_batch_size: float,
        perturbation_scale: float | Callable[[int], float] = 1e-3,
        seed: int | None = None,
        noise_seed: int | None = None,
        weight_decay: float = 0.0,
        accountant: Any | None = None,
        sample_rate: float | None = None,
        process_group: Any | None = None,
        perturbation: str = "auto",
        directions: str = "gaussian",
        difference: str = "central",
        mask: Callable[[int, int, torch.Tensor], torch.Tensor | None] | None = None,
        direction_rank: int | None = None,
        direction_refresh: int | None = None,
        direction_buffer: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            num_directions=1,
            clip_norm=clip_norm,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch_size,
            perturbation_scale=perturbation_scale,
            seed=seed,
            noise_seed=noise_seed,
            weight_decay=weight_decay,
            accountant=accountant,
            sample_rate=sample_rate,
            process_group=process_group,
            perturbation=perturbation,
            directions=directions,
            difference=difference,
            mask=mask,
            direction_rank=direction_rank,
            direction_refresh=direction_refresh,
            direction_buffer=direction_buffer,
        )


class MeZO(DPAggZO):
    """Non-private MeZO (Malladi et al. 2023): :class:`DPAggZO` without clipping or noise.

    The update is θ ← θ − η·(1/(K|B|)) Σ_x Σ_k Δ_k(x) z_k, normalised by the actual |B|.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        perturbation_scale: float | Callable[[int], float] = 1e-3,
        num_directions: int | Callable[[int], int] = 1,
        seed: int | None = None,
        weight_decay: float = 0.0,
        process_group: Any | None = None,
        perturbation: str = "auto",
        directions: str = "gaussian",
        difference: str = "central",
        mask: Callable[[int, int, torch.Tensor], torch.Tensor | None] | None = None,
        batched_directions: int | None = None,
        direction_rank: int | None = None,
        direction_refresh: int | None = None,
        direction_buffer: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            num_directions=num_directions,
            clip_norm=None,
            noise_multiplier=0.0,
            perturbation_scale=perturbation_scale,
            seed=seed,
            weight_decay=weight_decay,
            process_group=process_group,
            perturbation=perturbation,
            directions=directions,
            difference=difference,
            mask=mask,
            batched_directions=batched_directions,
            direction_rank=direction_rank,
            direction_refresh=direction_refresh,
            direction_buffer=direction_buffer,
        )
