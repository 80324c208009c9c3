"""The DP-AggZO optimizer (Bao et al., USENIX Security 2025, Algorithm 1) and its presets.

:class:`DPAggZO` implements lines 5-16 of Algorithm 1 for one step; lines 1-2 (the noisy dataset
size ñ and b = q·ñ) and line 4 (Poisson sampling) belong to the caller, who passes b as
``expected_batch_size`` and samples the batch inside the closure's data. :class:`DPZO` (K = 1) and
:class:`MeZO` (no clipping, no noise) are the same class with fixed arguments.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from zoprivacy.directions import draw_public_seed, iter_direction, scratch_buffers
from zoprivacy.distributed import DataParallel
from zoprivacy.noise import NoiseSource
from zoprivacy.stats import StepStats

__all__ = ["DPZO", "DPAggZO", "MeZO", "NotPrivateWarning"]

Closure = Callable[[], torch.Tensor]

_STATE_KEY = "zoprivacy"
_MAX_LISTED = 10


class NotPrivateWarning(UserWarning):
    """The optimizer is configured so that its steps are not differentially private."""


class DPAggZO(torch.optim.Optimizer):
    """Differentially private zeroth-order optimizer with K aggregated directions (DP-AggZO).

    One :meth:`step` implements Algorithm 1, lines 5-16:

    * lines 5-10: for k = 1..K, regenerate z_k from the public seed, perturb θ += φz_k and call the
      closure (L+), then θ −= 2φz_k (L−), then θ += φz_k (restore), and form
      Δ_k(x) = (L+(x) − L−(x)) / (2φ) in float64;
    * line 12: Δ_agg(x) = (1/K)(Δ_1(x), …, Δ_K(x));
    * line 13: Δ̂_agg(x) = Δ_agg(x)·min(1, c/‖Δ_agg(x)‖) (the paper's typeset formula is mis-typed;
      this is the clipping of DESIGN.md, so every record contributes at most c in L2);
    * line 15: S = Σ_x Δ̂_agg(x) + v, v ~ N(0, σ²c² I_K), the only data-dependent release;
    * line 16: θ ← θ − (η/b) Σ_k S_k z_k, regenerating each z_k from its seed again.

    Decoupled weight decay (θ ← θ − η·wd·θ, per param group) is applied once per step, to the
    parameters before the zeroth-order update. Only tensors with ``requires_grad=True`` are
    touched; frozen tensors in ``params`` are skipped.

    Modes:

    * DP (``clip_norm`` set, ``noise_multiplier`` > 0): normalised by ``expected_batch_size`` b,
      never by the private |B|; an empty batch still releases S = v, updates and counts as a step.
    * clipped, noiseless (``clip_norm`` set, ``noise_multiplier`` = 0): normalised by b, not
      private (:class:`NotPrivateWarning`).
    * MeZO (``clip_norm=None``, ``noise_multiplier`` = 0): plain two-point estimate averaged over
      the K directions and the actual |B| records; an empty batch only advances the step counter.
      Not private (:class:`NotPrivateWarning`). ``expected_batch_size`` is ignored.

    Closure contract: ``closure()`` returns the per-record losses of the current batch as a 1-D
    floating tensor of shape [|B|] (|B| may be 0). It is called 2K times per step under
    ``torch.no_grad()``, must not call ``backward()``, and must see the same batch every time.
    Before each L− evaluation the torch RNG state (CPU, and CUDA for CUDA parameters) is reset to
    what it was before the matching L+ evaluation, so dropout and other random layers see identical
    randomness at θ+φz_k and θ−φz_k (consecutive directions see fresh randomness). Calling
    ``model.eval()`` is still recommended: the estimate is then exactly a finite difference.

    Privacy of the returned :class:`~zoprivacy.stats.StepStats`: only ``noisy_sum`` is released
    under DP. ``batch_size``, ``loss``, ``clip_fraction``, ``batch_clip_error`` and
    ``max_clip_error`` are computed from the private batch without noise and must not be
    published.

    Directions: per-tensor seeds derived from (``seed``, step, k, tensor index)
    (:mod:`zoprivacy.directions`), generated in the parameter's dtype with a
    :class:`torch.Generator` on its device, into one scratch buffer per device with the byte size
    of the largest trainable tensor there, and added in place in the parameter's dtype. No copy of
    θ or of a whole z_k is ever made; peak extra memory is that buffer plus K·|B| float64 loss
    differences (measured in ``tests/test_optimizer_memory.py``).

    Noise: from :class:`~zoprivacy.noise.NoiseSource`, never derived from ``seed``: OS entropy per
    step when ``noise_seed`` is None, a seeded reproducible generator (with a warning that the run
    is not private) when it is an int.

    Accountant: when ``accountant`` is given, ``accountant.step(noise_multiplier=σ,
    sample_rate=q, steps=1)`` is called at the very start of :meth:`step`, before the closure runs,
    so a step beyond the budget raises (e.g. ``PrivacyBudgetExceeded``) with the parameters and the
    data untouched. A step that fails later (bad closure output) has already been charged: this
    over-counts, which is conservative.

    Failure safety: if the closure raises or returns bad output (not a tensor, not 1-D, NaN/inf,
    length changing between evaluations), the current perturbation is undone in a ``finally`` block
    before the error propagates, nothing is released and the step counter does not advance.

    Perturbation drift: undoing a perturbation by arithmetic (θ + φz − 2φz + φz) is not exact in
    floating point (a later issue removes this drift). Measured on 10⁶ parameters θ ~ N(0, 0.05²),
    φ = 1e-3, one step whose update is zero (so only the probe's 3K adds act), |θ_after − θ|:

    ========  ==================  ==================  ===========================
    dtype     K = 1: max / mean   K = 16: max / mean  entries changed (K=1 / 16)
    ========  ==================  ==================  ===========================
    float32   1.5e-8 / 1.7e-9     1.9e-7 / 7.5e-9     48% / 86%
    float16   1.2e-4 / 1.4e-5     1.5e-3 / 6.2e-5     48% / 86%
    bfloat16  9.8e-4 / 1.1e-4     9.8e-3 / 4.9e-4     48% / 86%
    ========  ==================  ==================  ===========================

    The drift is a random walk in the rounding (mean grows roughly like √K) and comes on top of the
    update, which in float16/bfloat16 is itself rounded to the parameter's precision one direction
    at a time. The finite difference uses the nominal φ, not the rounded perturbation actually
    applied, which in float16/bfloat16 adds relative error of order ulp(θ)/φ to each Δ_k.

    Args:
        params: iterable of tensors or of param-group dicts (``lr``, ``weight_decay`` per group).
        lr: learning rate η (≥ 0).
        num_directions: K ≥ 1 (K = 1 is DPZO).
        clip_norm: c > 0, or None for MeZO mode (then ``noise_multiplier`` must be 0).
        noise_multiplier: σ ≥ 0; the noise std per coordinate is σ·c.
        expected_batch_size: b = q·ñ > 0, the public normaliser (required unless MeZO mode).
        perturbation_scale: φ > 0.
        seed: public seed of the directions (int ≥ 0); None draws one from OS entropy, kept in
            :attr:`seed` and in ``state_dict()``.
        noise_seed: None (OS entropy, private) or an int (reproducible noise, NOT private).
        weight_decay: decoupled weight decay (≥ 0).
        accountant: object with ``step(noise_multiplier=..., sample_rate=..., steps=1)``.
        sample_rate: q ∈ (0, 1], required with ``accountant``.
        process_group: None (one process) or a ``torch.distributed`` process group (or a
            :class:`~zoprivacy.distributed.DataParallel` around one) to make every step data
            parallel: each rank's closure returns the losses of its own records only; the
            clipped K-sums are all-reduced, group rank 0 alone draws the noise and broadcasts S,
            and every rank applies the same update (O(K) floats per step, see
            :mod:`zoprivacy.distributed`). The returned stats are then global (all ranks'
            records). With ``seed=None`` rank 0 draws the direction seed and broadcasts it; the
            construction checks that every rank has the same configuration and parameters.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        num_directions: int,
        clip_norm: float | None,
        noise_multiplier: float,
        expected_batch_size: float | None = None,
        perturbation_scale: float = 1e-3,
        seed: int | None = None,
        noise_seed: int | None = None,
        weight_decay: float = 0.0,
        accountant: Any | None = None,
        sample_rate: float | None = None,
        process_group: Any | None = None,
    ) -> None:
        lr = _check_real("lr", lr, minimum=0.0)
        weight_decay = _check_real("weight_decay", weight_decay, minimum=0.0)
        num_directions = _check_int("num_directions", num_directions, minimum=1)
        noise_multiplier = _check_real("noise_multiplier", noise_multiplier, minimum=0.0)
        perturbation_scale = _check_real("perturbation_scale", perturbation_scale, positive=True)
        if clip_norm is not None:
            clip_norm = _check_real("clip_norm", clip_norm, positive=True)
        if expected_batch_size is not None:
            expected_batch_size = _check_real(
                "expected_batch_size", expected_batch_size, positive=True
            )
        if sample_rate is not None:
            sample_rate = _check_real("sample_rate", sample_rate, positive=True)
            if sample_rate > 1.0:
                raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if seed is not None:
            seed = _check_int("seed", seed, minimum=0)

        if clip_norm is None and noise_multiplier > 0:
            raise ValueError(
                f"clip_norm=None with noise_multiplier={noise_multiplier}: the noise std is σ·c, "
                "so a clip norm is required. Pass clip_norm=c > 0, or noise_multiplier=0 for "
                "non-private MeZO."
            )
        if clip_norm is not None and expected_batch_size is None:
            raise ValueError(
                "expected_batch_size is required when clip_norm is set: the update is normalised "
                "by the public b = q·ñ, never by the private |B|. Pass expected_batch_size=b > 0."
            )
        private = clip_norm is not None and noise_multiplier > 0
        if accountant is not None:
            if not callable(getattr(accountant, "step", None)):
                raise TypeError("accountant must have a step(noise_multiplier, sample_rate, steps)")
            if sample_rate is None:
                raise ValueError(
                    "sample_rate is required with an accountant: pass the Poisson rate q in (0, 1]"
                )
            if not private:
                raise ValueError(
                    "an accountant needs a private configuration: clip_norm > 0 and "
                    "noise_multiplier > 0 (a noiseless step has infinite privacy cost)"
                )

        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        if not self._trainable():
            raise ValueError(
                "params contains no tensor with requires_grad=True: nothing to optimise. Pass the "
                "trainable parameters (e.g. [p for p in model.parameters() if p.requires_grad])."
            )

        self._num_directions = num_directions
        self._clip_norm = clip_norm
        self._noise_multiplier = noise_multiplier
        self._expected_batch_size = expected_batch_size
        self._perturbation_scale = perturbation_scale
        self._sample_rate = sample_rate
        self._accountant = accountant
        self._dp = None if process_group is None else DataParallel.wrap(process_group)
        if self._dp is not None:
            seed = self._dp.agree_on_seed(seed)  # rank 0 draws it (if None) and broadcasts it
        self._seed = draw_public_seed() if seed is None else seed
        self._step_count = 0
        self._noise = NoiseSource(noise_seed)
        self._warn_if_not_private()
        if self._dp is not None:
            self._dp.verify(self)  # same configuration and bit-identical parameters everywhere

    # ------------------------------------------------------------------ read-only configuration
    @property
    def num_directions(self) -> int:
        """K, the number of directions per step."""
        return self._num_directions

    @property
    def clip_norm(self) -> float | None:
        """c, or None in MeZO mode."""
        return self._clip_norm

    @property
    def noise_multiplier(self) -> float:
        """σ."""
        return self._noise_multiplier

    @property
    def expected_batch_size(self) -> float | None:
        """b, the public normaliser of the update (None in MeZO mode when not given)."""
        return self._expected_batch_size

    @property
    def perturbation_scale(self) -> float:
        """φ."""
        return self._perturbation_scale

    @property
    def sample_rate(self) -> float | None:
        """q, passed to the accountant."""
        return self._sample_rate

    @property
    def seed(self) -> int:
        """Public seed of the directions."""
        return self._seed

    @property
    def data_parallel(self) -> DataParallel | None:
        """The :class:`~zoprivacy.distributed.DataParallel` collectives, or None (one process)."""
        return self._dp

    @property
    def steps_taken(self) -> int:
        """Number of completed steps (the index of the next step)."""
        return self._step_count

    @property
    def is_mezo(self) -> bool:
        """True without clipping (and hence without noise): non-private MeZO."""
        return self._clip_norm is None

    @property
    def is_private(self) -> bool:
        """True when steps are DP releases (clipping and σ > 0, noise from OS entropy)."""
        return (
            self._clip_norm is not None
            and self._noise_multiplier > 0
            and not self._noise.reproducible
        )

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating its ``lr`` and ``weight_decay``; params must be floating."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group)
            for p in group["params"]:
                if p.requires_grad and not (p.is_floating_point()):
                    raise TypeError(f"parameters must be floating point, got dtype {p.dtype}")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _trainable(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        return [(p, g) for g in self.param_groups for p in g["params"] if p.requires_grad]

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> StepStats:  # type: ignore[override]
        """Run one DP-AggZO step (Algorithm 1, lines 5-16) and return its :class:`StepStats`.

        ``closure()`` must return the per-record losses, shape [|B|]; see the class docstring.
        Raises ``ValueError``/``TypeError`` on bad closure output with the parameters restored.
        """
        if closure is None:
            raise ValueError(
                "DPAggZO.step needs a closure returning the per-record losses (shape [|B|]) of "
                "the current batch, evaluated without backward(): opt.step(lambda: losses(model))"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        if self._accountant is not None:
            self._accountant.step(
                noise_multiplier=self._noise_multiplier, sample_rate=self._sample_rate, steps=1
            )

        entries = self._trainable()
        params = [p for p, _ in entries]
        step = self._step_count
        scratch = scratch_buffers(params)
        gens = {dev: torch.Generator(device=dev) for dev in scratch}

        try:
            deltas, loss_sum = self._probe(closure, params, step, scratch, gens)
        except BaseException:
            if self._dp is not None:
                self._dp.abort(self, step)  # the peers raise now, not after the timeout
            raise
        batch = deltas.shape[0]
        agg = deltas / self._num_directions  # line 12, shape [|B|, K]
        clipped, clip_fraction, max_err, batch_err = self._clip(agg)  # line 13, eqs. 26-27
        noisy_sum = clipped.sum(dim=0)
        if self._dp is not None:  # data parallel: sum every rank's clipped records (O(K) floats)
            noisy_sum, batch, loss_sum, clip_fraction, max_err, batch_err = self._dp.reduce(
                self, step, agg, clipped, clip_fraction, max_err, loss_sum
            )
        noise_std = 0.0
        draw = None
        if self._clip_norm is not None and self._noise_multiplier > 0:
            noise_std = self._noise_multiplier * self._clip_norm
            draw = functools.partial(self._noise.sample, self._num_directions, noise_std)
        if self._dp is not None:  # rank 0 alone draws v and broadcasts S = Σ + v (line 15)
            noisy_sum = self._dp.release(step, noisy_sum, draw)
        elif draw is not None:
            noisy_sum = noisy_sum + draw()  # line 15

        if self.is_mezo:
            normalizer = float(batch)
        else:
            normalizer = float(self._expected_batch_size)  # type: ignore[arg-type]
        if normalizer > 0:
            self._update(entries, step, scratch, gens, noisy_sum / normalizer)  # line 16

        self._step_count = step + 1
        mean_loss = loss_sum / (batch * self._num_directions) if batch else math.nan
        return StepStats(
            noisy_sum=noisy_sum,
            batch_size=batch,
            loss=mean_loss,
            clip_fraction=clip_fraction,
            batch_clip_error=batch_err,
            max_clip_error=max_err,
            step=step,
            seed=self._seed,
            num_directions=self._num_directions,
            normalizer=normalizer,
            noise_std=noise_std,
            private=noise_std > 0 and not self._noise.reproducible,
        )

    def _probe(
        self,
        closure: Closure,
        params: list[torch.Tensor],
        step: int,
        scratch: dict[torch.device, torch.Tensor],
        gens: dict[torch.device, torch.Generator],
    ) -> tuple[torch.Tensor, float]:
        """Lines 5-10: the 2K closure evaluations; returns Δ (float64 [|B|, K]) and Σ(L+ + L−)/2.

        ``offsets[i]`` is how many φ·z_k tensor i currently carries; the ``finally`` block undoes
        whatever is left, so an exception at any point leaves θ restored (up to rounding).
        """
        phi = self._perturbation_scale
        offsets = [0] * len(params)
        current = 0

        def move(k: int, units: int) -> None:
            for i, p, z in iter_direction(
                params, seed=self._seed, step=step, k=k, scratch=scratch, generators=gens
            ):
                p.add_(z, alpha=units * phi)
                offsets[i] += units

        columns: list[torch.Tensor] = []
        loss_sum = 0.0
        batch: int | None = None
        cuda_devices = sorted({p.device for p in params if p.device.type == "cuda"}, key=str)
        try:
            for k in range(self._num_directions):
                current = k
                rng = _capture_rng(cuda_devices)
                move(k, +1)
                plus = _evaluate(closure, k, "+", batch)
                batch = plus.numel()
                _restore_rng(rng, cuda_devices)
                move(k, -2)
                minus = _evaluate(closure, k, "-", batch)
                move(k, +1)
                delta = (plus - minus) / (2.0 * phi)
                bad = ~torch.isfinite(delta)
                if bool(bad.any()):
                    raise ValueError(
                        f"the loss difference overflows float64 for records {_indices(bad)} at "
                        f"direction k={k}; the losses are too large: rescale the loss"
                    )
                columns.append(delta)
                loss_sum += float((plus + minus).sum()) / 2.0
        finally:
            if any(offsets):
                for i, p, z in iter_direction(
                    params, seed=self._seed, step=step, k=current, scratch=scratch, generators=gens
                ):
                    if offsets[i]:
                        p.add_(z, alpha=-offsets[i] * phi)
                        offsets[i] = 0
        return torch.stack(columns, dim=1), loss_sum

    def _clip(self, agg: torch.Tensor) -> tuple[torch.Tensor, float, float, float]:
        """Line 13 and the diagnostics of eqs. 26-27: (Δ̂, clip fraction, max err, batch err)."""
        if self._clip_norm is None or agg.shape[0] == 0:
            return agg, 0.0, 0.0, 0.0
        c = self._clip_norm
        norms = _row_norms(agg)
        over = norms > c
        factors = torch.where(over, c / norms, torch.ones_like(norms))
        clipped = agg * factors[:, None]
        clip_fraction = float(over.double().mean())
        max_err = float((1.0 - factors).max())  # ‖Δ − Δ̂‖/‖Δ‖ = 1 − factor (eq. 26)
        # eq. 27 with both sums divided by the largest |entry| so that neither overflows.
        scale = float(agg.abs().max())
        if scale == 0.0:
            return clipped, clip_fraction, max_err, 0.0
        num = float(torch.linalg.vector_norm(((agg - clipped) / scale).sum(dim=0)))
        den = float(torch.linalg.vector_norm((agg / scale).sum(dim=0)))
        if num == 0.0:
            batch_err = 0.0
        elif den == 0.0:
            batch_err = math.inf
        else:
            batch_err = num / den
        return clipped, clip_fraction, max_err, batch_err

    def _update(
        self,
        entries: list[tuple[torch.Tensor, dict[str, Any]]],
        step: int,
        scratch: dict[torch.device, torch.Tensor],
        gens: dict[torch.device, torch.Generator],
        coefs: torch.Tensor,
    ) -> None:
        """Line 16 plus decoupled weight decay: θ ← θ(1 − η·wd) − η Σ_k coefs_k z_k."""
        params = [p for p, _ in entries]
        lrs = [float(g["lr"]) for _, g in entries]
        for p, g in entries:
            wd = float(g["weight_decay"])
            if wd and g["lr"]:
                p.mul_(1.0 - float(g["lr"]) * wd)
        for k, coef in enumerate(coefs.tolist()):
            if coef == 0.0:
                continue
            for i, p, z in iter_direction(
                params, seed=self._seed, step=step, k=k, scratch=scratch, generators=gens
            ):
                if lrs[i]:
                    p.add_(z, alpha=-lrs[i] * coef)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Torch's state plus step count, public seed, hyper-parameters and (seeded) noise state.

        With ``noise_seed=None`` no noise state is saved: a resumed run draws fresh OS entropy.
        The accountant is not saved (checkpoint it separately).
        """
        sd = super().state_dict()
        sd[_STATE_KEY] = {
            "version": 1,
            "step": self._step_count,
            "seed": self._seed,
            "num_directions": self._num_directions,
            "clip_norm": self._clip_norm,
            "noise_multiplier": self._noise_multiplier,
            "expected_batch_size": self._expected_batch_size,
            "perturbation_scale": self._perturbation_scale,
            "sample_rate": self._sample_rate,
            "noise": self._noise.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, so the run continues the same trajectory bit for bit.

        The saved hyper-parameters, seed, step count and noise mode replace the current ones
        (validated first; nothing changes if validation fails).
        """
        sd = dict(state_dict)
        zo = sd.pop(_STATE_KEY, None)
        if not isinstance(zo, dict):
            raise ValueError(f"state_dict has no {_STATE_KEY!r} entry: not from DPAggZO")
        step = _check_int("step", zo["step"], minimum=0)
        seed = _check_int("seed", zo["seed"], minimum=0)
        k = _check_int("num_directions", zo["num_directions"], minimum=1)
        clip = zo["clip_norm"]
        clip = None if clip is None else _check_real("clip_norm", clip, positive=True)
        sigma = _check_real("noise_multiplier", zo["noise_multiplier"], minimum=0.0)
        b = zo["expected_batch_size"]
        b = None if b is None else _check_real("expected_batch_size", b, positive=True)
        phi = _check_real("perturbation_scale", zo["perturbation_scale"], positive=True)
        q = zo["sample_rate"]
        q = None if q is None else _check_real("sample_rate", q, positive=True)
        for group in sd["param_groups"]:
            _check_group(group)
        noise = NoiseSource()
        noise.load_state_dict(zo["noise"])
        super().load_state_dict(sd)
        self._step_count, self._seed, self._num_directions = step, seed, k
        self._clip_norm, self._noise_multiplier, self._expected_batch_size = clip, sigma, b
        self._perturbation_scale, self._sample_rate, self._noise = phi, q, noise

    def _warn_if_not_private(self) -> None:
        if self._clip_norm is None:
            msg = "clip_norm=None and noise_multiplier=0: this is non-private MeZO"
        elif self._noise_multiplier == 0:
            msg = "noise_multiplier=0: the steps are clipped but noiseless, hence not private"
        else:
            return
        warnings.warn(msg + "; do not use it on data that needs privacy.", NotPrivateWarning, 3)


class DPZO(DPAggZO):
    """DPZO / DPZero: :class:`DPAggZO` with a single direction (K = 1, scalar clipping)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        clip_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        perturbation_scale: float = 1e-3,
        seed: int | None = None,
        noise_seed: int | None = None,
        weight_decay: float = 0.0,
        accountant: Any | None = None,
        sample_rate: float | None = None,
        process_group: Any | None = None,
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
        perturbation_scale: float = 1e-3,
        num_directions: int = 1,
        seed: int | None = None,
        weight_decay: float = 0.0,
        process_group: Any | None = None,
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
        )


# ---------------------------------------------------------------------- helpers
def _check_real(
    name: str, value: object, *, minimum: float | None = None, positive: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if positive and x <= 0:
        raise ValueError(f"{name} must be > 0, got {x}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return x


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    x = int(value)
    if x < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {x}")
    return x


def _check_group(group: dict[str, Any]) -> None:
    _check_real("lr", group["lr"], minimum=0.0)
    _check_real("weight_decay", group["weight_decay"], minimum=0.0)


def _capture_rng(cuda_devices: list[torch.device]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda_devices]


def _restore_rng(
    state: tuple[torch.Tensor, list[torch.Tensor]], cuda_devices: list[torch.device]
) -> None:
    torch.set_rng_state(state[0])
    for dev, s in zip(cuda_devices, state[1], strict=True):
        torch.cuda.set_rng_state(s, dev)


def _indices(mask: torch.Tensor) -> str:
    idx = mask.nonzero().flatten().tolist()
    more = f" (and {len(idx) - _MAX_LISTED} more)" if len(idx) > _MAX_LISTED else ""
    return f"{idx[:_MAX_LISTED]}{more}"


def _evaluate(closure: Closure, k: int, sign: str, batch: int | None) -> torch.Tensor:
    """Call the closure once and check its output; returns the losses as float64 on CPU."""
    where = f"direction k={k} (θ{sign}φ·z_k)"
    out = closure()
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"closure must return a torch.Tensor of per-record losses, got "
            f"{type(out).__name__} at {where}"
        )
    if out.dim() != 1:
        raise ValueError(
            f"closure must return a 1-D tensor of shape [|B|] (one loss per record, e.g. "
            f"reduction='none'), got shape {tuple(out.shape)} at {where}"
        )
    if not out.is_floating_point():
        raise TypeError(f"closure must return floating-point losses, got {out.dtype} at {where}")
    if batch is not None and out.numel() != batch:
        raise ValueError(
            f"closure returned {out.numel()} losses at {where} but {batch} at the first "
            "evaluation of the step: every evaluation of one step must see the same batch"
        )
    losses = out.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        raise ValueError(
            f"closure returned NaN/inf losses for records {_indices(bad)} at {where}; fix the "
            "loss (e.g. log(0), float16 overflow) or lower perturbation_scale"
        )
    return losses


def _row_norms(a: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row, scaled by the row's max |entry| so that huge values do not overflow."""
    m = a.abs().amax(dim=1)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    return m * torch.linalg.vector_norm(a / safe[:, None], dim=1)
