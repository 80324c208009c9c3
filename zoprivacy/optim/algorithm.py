"""Algorithm 1 of Bao et al. (USENIX Security 2025), lines 5-16, as pure functions.

One DP-AggZO step is, in order (:meth:`zoprivacy.DPAggZO.step` calls exactly these):

* :func:`probe`, lines 5-10: Δ_k(x) = (L(θ+φz_k; x) − L(θ−φz_k; x)) / (2φ) for the K public
  directions (or the forward difference), in float64, shape [|B|, K];
* line 12, Δ_agg(x) = (1/K)(Δ_1(x), …, Δ_K(x)): ``probe(...).deltas / K``;
* :func:`clip_rows`, line 13 with the diagnostics of eqs. 26/27: Δ̂_agg(x) = Δ_agg(x)·min(1,
  c/‖Δ_agg(x)‖), so that every record contributes at most c in L2 (the only copy of the clipping
  in the package; :func:`clipping_errors` gives eqs. 26/27 for clipping done elsewhere, e.g.
  Opacus's per-sample gradients);
* :func:`release`, line 15: S = Σ_x Δ̂_agg(x) + v, v ~ N(0, σ²c² I_K), the only data-dependent
  release (exact discrete noise through :meth:`~zoprivacy.noise.NoiseSource.add_noise`);
* :func:`apply_update`, line 16 (with decoupled weight decay): θ ← θ(1 − η·wd) − (η/b) Σ_k S_k z_k.

The functions take values, never the optimizer: every per-step value (K, c, σ, φ, η, wd, masks)
is resolved once before data is read (:class:`zoprivacy.optim.config.StepConfig`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from zoprivacy.noise.source import NoiseSource
from zoprivacy.optim.closure import check_batched, evaluate, loss_difference, where
from zoprivacy.optim.directions import DirectionStream
from zoprivacy.optim.perturb import Prober, capture_rng, restore_rng

__all__ = [
    "Clipped",
    "Probe",
    "apply_update",
    "batch_clip_error",
    "clip_rows",
    "clipping_errors",
    "probe",
    "release",
    "row_norms",
    "scaled_sums",
]

Closure = Callable[[], torch.Tensor]
Discover = Callable[[Prober, torch.Tensor, Callable[[], torch.Tensor]], torch.Tensor]


class Probe(NamedTuple):
    """What lines 5-10 compute for one batch."""

    deltas: torch.Tensor  # Δ_k(x), float64 [|B|, K]
    loss_sum: float  # Σ over records and directions of (L+ + L−)/2 (forward: K·Σ L(θ))
    path: str  # "hooks", "mixed", "inplace" or "batched"


class Clipped(NamedTuple):
    """Line 13 and its diagnostics (all PRIVATE: computed from the batch without noise)."""

    clipped: torch.Tensor  # Δ̂_agg, [|B|, K]
    clip_fraction: float  # share of records with ‖Δ_agg(x)‖ > c
    max_clip_error: float  # eq. 26: max_x (1 − c/‖Δ_agg(x)‖)⁺
    batch_clip_error: float  # eq. 27: ‖Σ Δ_agg − Σ Δ̂_agg‖ / ‖Σ Δ_agg‖


# ---------------------------------------------------------------------- lines 5-10
def probe(
    closure: Closure,
    prober: Prober,
    *,
    num_directions: int,
    perturbation_scale: float,
    difference: str,
    batched: int | None = None,
    discover: Discover | None = None,
) -> Probe:
    """Lines 5-10: evaluate the closure at θ ± φz_k for k < K and form the differences Δ_k.

    The torch RNG is reset before each L− (and each L(θ+φz_k) with forward differences) to its
    state before the matching L+ (or L(θ)), so random layers see the same randomness at both
    points. ``discover(prober, out, redo)`` is called after every perturbed evaluation (path
    discovery of ``perturbation="auto"``); any in-place perturbation is undone in ``finally``.
    """
    phi, num = perturbation_scale, num_directions
    devices = sorted({p.device for p in prober.params if p.device.type == "cuda"}, key=str)
    columns: list[torch.Tensor] = []
    loss_sum, batch = 0.0, None

    def point(k: int, sign: int, rng: Any) -> torch.Tensor:
        def run() -> torch.Tensor:
            return prober.evaluate(lambda: evaluate(closure, where(k, sign), batch), k, sign)

        def redo() -> torch.Tensor:
            restore_rng(rng, devices)
            return run()

        out = run()
        return out if sign == 0 or discover is None else discover(prober, out, redo)

    try:
        if batched:
            columns, loss_sum = _probe_batched(
                closure, prober, num, phi, difference, batched, discover
            )
        elif difference == "central":
            for k in range(num):
                rng = capture_rng(devices)
                plus = point(k, +1, rng)
                batch = plus.numel()
                restore_rng(rng, devices)
                minus = point(k, -1, rng)
                columns.append(loss_difference((plus - minus) / (2.0 * phi), k))
                loss_sum += float((plus + minus).sum()) / 2.0
        else:
            rng = capture_rng(devices)
            base = point(0, 0, rng)
            batch = base.numel()
            for k in range(num):
                restore_rng(rng, devices)
                columns.append(loss_difference((point(k, +1, rng) - base) / phi, k))
            loss_sum = num * float(base.sum())
    finally:
        prober.restore()
    return Probe(torch.stack(columns, dim=1), loss_sum, "batched" if batched else prober.path)


def _probe_batched(
    closure: Closure,
    prober: Prober,
    num: int,
    phi: float,
    difference: str,
    chunk: int,
    discover: Discover | None,
) -> tuple[list[torch.Tensor], float]:
    """Lines 5-10 with ``chunk`` directions per vmapped call (``batched_directions``)."""
    devices = sorted({p.device for p in prober.params if p.device.type == "cuda"}, key=str)
    columns: list[torch.Tensor] = []
    loss_sum, batch, base = 0.0, None, None
    if difference == "forward":
        base = evaluate(closure, where(0, 0), None)
        batch = base.numel()
        loss_sum = num * float(base.sum())
    signs = (+1, -1) if difference == "central" else (+1,)
    for first in range(0, num, chunk):
        ks = range(first, min(num, first + chunk))
        points = [(k, s) for k in ks for s in signs]
        rng = capture_rng(devices)
        out = prober.evaluate_batched(closure, points)
        restore_rng(rng, devices)  # as if the points had run one after the other
        rows = check_batched(out, points, batch)
        batch = rows.shape[1]
        if discover is not None:
            discover(prober, rows[0], lambda row=rows[0]: row)
        for j, k in enumerate(ks):
            if base is None:
                plus, minus = rows[2 * j], rows[2 * j + 1]
                columns.append(loss_difference((plus - minus) / (2.0 * phi), k))
                loss_sum += float((plus + minus).sum()) / 2.0
            else:
                columns.append(loss_difference((rows[j] - base) / phi, k))
    return columns, loss_sum


# ---------------------------------------------------------------------- line 13, eqs. 26/27
def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row, scaled by the row's max |entry| so that huge values do not overflow."""
    m = rows.abs().amax(dim=1)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    return m * torch.linalg.vector_norm(rows / safe[:, None], dim=1)


def scaled_sums(
    rows: torch.Tensor, clipped: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_x (Δ_agg − Δ̂_agg)(x)/s and Σ_x Δ_agg(x)/s, the two sums of eq. 27 divided by a common
    scale s > 0 (the largest |entry|, over all ranks in a data-parallel step) so neither
    overflows."""
    return ((rows - clipped) / scale).sum(dim=0), (rows / scale).sum(dim=0)


def batch_clip_error(error_sum: torch.Tensor, total_sum: torch.Tensor) -> float:
    """Eq. 27 from its two (equally scaled) sums: 0.0 when the numerator is 0, +inf when only
    the denominator is 0, never NaN."""
    num = float(torch.linalg.vector_norm(error_sum))
    den = float(torch.linalg.vector_norm(total_sum))
    if num == 0.0:
        return 0.0
    return math.inf if den == 0.0 else num / den


def clip_rows(rows: torch.Tensor, clip_norm: float | None) -> Clipped:
    """Line 13: Δ̂(x) = Δ(x)·min(1, c/‖Δ(x)‖) for every row, with eqs. 26 and 27.

    ``clip_norm=None`` (MeZO) or an empty batch: the rows unchanged, all diagnostics 0.0.
    """
    if clip_norm is None or rows.shape[0] == 0:
        return Clipped(rows, 0.0, 0.0, 0.0)
    norms = row_norms(rows)
    over = norms > clip_norm
    factors = torch.where(over, clip_norm / norms, torch.ones_like(norms))
    clipped = rows * factors[:, None]
    clip_fraction = float(over.double().mean())
    max_err = float((1.0 - factors).max())  # ‖Δ − Δ̂‖/‖Δ‖ = 1 − factor (eq. 26)
    scale = float(rows.abs().max())
    if scale == 0.0:
        return Clipped(clipped, clip_fraction, max_err, 0.0)
    return Clipped(
        clipped, clip_fraction, max_err, batch_clip_error(*scaled_sums(rows, clipped, scale))
    )


def clipping_errors(
    blocks: Sequence[torch.Tensor], clip_norm: float, *, stability: float = 0.0
) -> tuple[float, float, float]:
    """(clip fraction, eq. 26, eq. 27) of per-record vectors clipped elsewhere.

    Each record is the concatenation of its rows in ``blocks`` (tensors [|B|, ...], e.g.
    Opacus's per-sample gradients ``p.grad_sample``), clipped by the factor
    min(1, c/(‖x‖ + ``stability``)) (Opacus uses ``stability=1e-6``). Computed in float64.
    """
    flat = [b.reshape(b.shape[0], -1).double() for b in blocks]
    if not flat or flat[0].shape[0] == 0:
        return 0.0, 0.0, 0.0
    rows = torch.cat(flat, dim=1)
    norms = row_norms(rows)
    factors = (clip_norm / (norms + stability)).clamp(max=1.0)
    clip_fraction = float((norms > clip_norm).double().mean())
    max_err = float((1.0 - factors).max())
    scale = float(rows.abs().max())
    if scale == 0.0:
        return clip_fraction, max_err, 0.0
    return (
        clip_fraction,
        max_err,
        batch_clip_error(*scaled_sums(rows, rows * factors[:, None], scale)),
    )


# ---------------------------------------------------------------------- line 15
def release(
    summed: torch.Tensor, *, noise: NoiseSource, noise_multiplier: float, clip_norm: float | None
) -> torch.Tensor:
    """Line 15: S = Σ Δ̂_agg + v, v ~ N(0, σ²c² I_K) (returned unchanged without noise).

    An exact release: the sum is snapped to the noise grid and integer discrete-Gaussian noise is
    added (:meth:`~zoprivacy.noise.NoiseSource.add_noise`), so the released floats carry nothing
    about the unrounded sum (float noise on a float sum leaks).
    """
    if clip_norm is None or noise_multiplier <= 0:
        return summed
    return noise.add_noise(summed, std=noise_multiplier * clip_norm, sensitivity=clip_norm)


# ---------------------------------------------------------------------- line 16
def apply_update(
    params: Sequence[torch.Tensor],
    stream: DirectionStream,
    scratch: dict[torch.device, torch.Tensor],
    coefs: torch.Tensor,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
) -> None:
    """Line 16 plus decoupled weight decay: θ_i ← θ_i(1 − η_i·wd_i) − η_i Σ_k coefs_k z_{k,i}.

    ``coefs`` = S / b (S / |B| in MeZO mode); each z_k is regenerated from its public seed into
    the scratch buffer of its device. A low-rank matrix takes the whole sum as one rank-K·r
    product of its kept factors (:meth:`DirectionStream.add_combination_`).
    """
    for p, lr, wd in zip(params, lrs, weight_decays, strict=True):
        if wd and lr:
            p.mul_(1.0 - lr * wd)
    values = coefs.tolist()
    rest = [
        i
        for i in range(len(params))
        if lrs[i] and not stream.add_combination_(i, params[i], values, -lrs[i])
    ]
    for k, coef in enumerate(values):
        if coef == 0.0:
            continue
        for i in rest:
            stream.add_(k, i, params[i], -lrs[i] * coef, scratch[params[i].device])
