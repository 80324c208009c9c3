"""What one DP-AggZO step reports: :class:`StepStats`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["StepStats"]


@dataclass(frozen=True, eq=False)
class StepStats:
    """Result of one :meth:`zoprivacy.DPAggZO.step`.

    Privacy: only ``noisy_sum`` (the release S of Algorithm 1, line 15) is privacy-protected.
    ``batch_size``, ``loss``, ``clip_fraction``, ``batch_clip_error`` and ``max_clip_error`` are
    computed from the private batch without noise. They are diagnostics for the data owner and
    must NOT be published, logged to shared places, or used to choose hyper-parameters that are
    then released, unless their privacy cost is accounted for separately. The public fields
    (``step``, ``seed``, ``num_directions``, ``normalizer`` in DP mode, ``noise_std``) reveal
    nothing about the data.

    Attributes:
        noisy_sum: S ∈ R^K (float64, CPU): Σ_{x∈B} Δ̂_agg(x) + v, v ~ N(0, σ²c² I_K). The only
            data-dependent release. In MeZO mode (no clipping, no noise) it is the plain Σ Δ_agg.
        batch_size: |B|, the number of per-record losses the closure returned. PRIVATE.
        loss: mean over records and directions of (L(θ+φz_k; x) + L(θ−φz_k; x)) / 2, which equals
            the loss at θ up to O(φ²); NaN for an empty batch. PRIVATE.
        clip_fraction: share of records with ‖Δ_agg(x)‖ > c; 0.0 for an empty batch or without
            clipping. PRIVATE.
        batch_clip_error: eq. 27, ‖Σ Δ_agg − Σ Δ̂_agg‖ / ‖Σ Δ_agg‖. Defined as 0.0 when the
            numerator is 0 (nothing clipped, empty batch, all-zero Δ), and +inf when only the
            denominator is 0 (clipping turned a zero sum into a non-zero one). Never NaN. PRIVATE.
        max_clip_error: eq. 26, max_x ‖Δ_agg(x) − Δ̂_agg(x)‖ / ‖Δ_agg(x)‖
            = max_x (1 − c/‖Δ_agg(x)‖)⁺;
            0.0 for an empty batch, for records with Δ_agg(x) = 0, or without clipping. PRIVATE.
        step: index of this step (0 for the first step of a run).
        seed: public seed of the directions; with ``step`` it regenerates every z_k
            (:func:`zoprivacy.optim.directions.direction_tensor`).
        num_directions: K.
        normalizer: the divisor of the update, b in DP mode (public), |B| in MeZO mode.
        noise_std: σ·c, the per-coordinate standard deviation of v (0.0 without noise).
        private: whether the step is a DP release: clipping, σ > 0 and noise from OS entropy
            (False with a user-given ``noise_seed``, whose noise is predictable).
        perturbation_path: how θ ± φz_k was evaluated: ``"hooks"`` (zero drift, θ never
            written), ``"inplace"`` (θ written and restored by arithmetic), ``"mixed"`` (in place
            only for the tensors the substitution could not see) or ``"batched"`` (vmapped
            stacked copies); see :mod:`zoprivacy.optim.perturb`.
        directions: ``"gaussian"``, ``"rademacher"`` or ``"lowrank"``.
        difference: ``"central"`` (2K evaluations) or ``"forward"`` (K + 1 evaluations).
        perturbation_scale, clip_norm, noise_multiplier: φ, c and σ of this step (after
            schedules); public.
        generations: tensor slices of directions generated during the step (probe and update);
            a measure of the step's direction cost. A central step over n trainable tensors
            generates 3K·n slices on the substitution path and 4K·n in place (Gaussian,
            Rademacher), 2K·n on both with ``direction_buffer=True`` (n when K = 1), and K·n
            with low-rank directions (a matrix's two factors count as one slice).
    """

    noisy_sum: torch.Tensor
    batch_size: int
    loss: float
    clip_fraction: float
    batch_clip_error: float
    max_clip_error: float
    step: int
    seed: int
    num_directions: int
    normalizer: float
    noise_std: float
    private: bool
    perturbation_path: str = "inplace"
    directions: str = "gaussian"
    difference: str = "central"
    perturbation_scale: float = math.nan
    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    generations: int = 0
