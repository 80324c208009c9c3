"""The DP-AggZO optimizer (Bao et al., USENIX Security 2025, Algorithm 1) and its presets.

:class:`DPAggZO` implements lines 5-16 of Algorithm 1 for one step; lines 1-2 (the noisy dataset
size ñ and b = q·ñ) and line 4 (Poisson sampling) belong to the caller, who passes b as
``expected_batch_size`` and samples the batch inside the closure's data. :class:`DPZO` (K = 1) and
:class:`MeZO` (no clipping, no noise) are the same class with fixed arguments. The DP-ZOSO
(stage-wise schedules, :mod:`zoprivacy.optim.schedules`) and DP-ZOPO (pruned coordinate subsets,
:mod:`zoprivacy.optim.masks`) variants are options of the same class.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zoprivacy.distributed import DataParallel
from zoprivacy.noise.source import NoiseSource
from zoprivacy.optim.directions import (
    DIRECTION_STREAM,
    DirectionStream,
    check_kind,
    draw_public_seed,
    stream_affects,
)
from zoprivacy.optim.masks import pack_mask
from zoprivacy.optim.perturb import Prober, ScratchPool, check_perturbation, warn_unseen
from zoprivacy.optim.stats import StepStats

__all__ = ["DIFFERENCES", "DPZO", "DPAggZO", "MeZO", "NotPrivateWarning"]

Closure = Callable[[], torch.Tensor]

_STATE_KEY = "zoprivacy"
_STATE_VERSION = 2
_MAX_LISTED = 10
_SCHEDULABLE = ("num_directions", "clip_norm", "noise_multiplier", "perturbation_scale")

DIFFERENCES = ("central", "forward")
"""Values of ``DPAggZO(difference=...)``."""


class NotPrivateWarning(UserWarning):
    """The optimizer is configured so that its steps are not differentially private."""


@dataclass(frozen=True)
class _Config:
    """The hyper-parameters of one step (schedules resolved)."""

    num_directions: int
    clip_norm: float | None
    noise_multiplier: float
    perturbation_scale: float


class DPAggZO(torch.optim.Optimizer):
    """Differentially private zeroth-order optimizer with K aggregated directions (DP-AggZO).

    One :meth:`step` implements Algorithm 1, lines 5-16:

    * lines 5-10: for k = 1..K, regenerate z_k from the public seed, evaluate the closure at
      θ + φz_k (L+) and θ − φz_k (L−), and form Δ_k(x) = (L+(x) − L−(x)) / (2φ) in float64
      (how θ ± φz_k is evaluated: ``perturbation`` below);
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
    floating tensor of shape [|B|] (|B| may be 0). It is called 2K times per step (K + 1 with
    forward differences) under ``torch.no_grad()``, must not call ``backward()``, must not modify
    the parameters, and must see the same batch every time. Before each L− evaluation the torch
    RNG state (CPU, and CUDA for CUDA parameters) is reset to what it was before the matching L+
    evaluation, so dropout and other random layers see identical randomness at θ+φz_k and
    θ−φz_k (consecutive directions see fresh randomness). Calling ``model.eval()`` is still
    recommended: the estimate is then exactly a finite difference.

    Privacy of the returned :class:`~zoprivacy.StepStats`: only ``noisy_sum`` is released
    under DP. ``batch_size``, ``loss``, ``clip_fraction``, ``batch_clip_error`` and
    ``max_clip_error`` are computed from the private batch without noise and must not be
    published.

    Perturbation (``perturbation``, :mod:`zoprivacy.optim.perturb`):

    * ``"auto"`` (default): zero drift. θ is never written during the probe; every torch call of
      the closure that reads a trainable tensor (module forwards, tied weights read by several
      modules, weights read outside modules) receives θ_i ± φz_{k,i} built for that call in a
      scratch buffer from the regenerated z. Parameters are bit-exact after any number of
      evaluations and after any exception, in every dtype, and a central step generates 3K
      direction passes instead of 4K. Tensors that the first perturbed evaluation (with at least
      one record) did not read through torch functions (TorchScript, C++ extensions, another
      thread, or simply unused) use the in-place path from then on (``perturbation_path`` then
      says ``"mixed"`` or ``"inplace"``; :attr:`inplace_tensors` lists them). In a data-parallel
      run ``"auto"`` means ``"hooks"`` (so that every rank takes the same path).
    * ``"hooks"``: the substitution for every tensor, with a warning if some tensor was not read.
    * ``"inplace"``: θ += φz_k, θ −= 2φz_k, θ += φz_k around the two evaluations, as in the paper;
      undoing a perturbation by arithmetic is exact only up to rounding (a few ulps per step,
      ``benchmarks/drift.py``), and the finite difference uses the nominal φ, not the rounded
      perturbation actually applied (relative error ~ulp(θ)/φ per Δ_k in float16/bfloat16).

    :attr:`perturbation_path` and ``StepStats.perturbation_path`` say which path ran.

    Directions (``directions``): ``"gaussian"`` (default, as in the paper) or ``"rademacher"``
    (uniform ±1 from random bits, no float normal drawn: ~8x cheaper to generate). Both have
    E[z zᵀ] = I, so the estimator is the same in expectation. Per-tensor seeds derived from
    (``seed``, step, k, tensor index) (:mod:`zoprivacy.optim.directions`), generated in the
    parameter's dtype with a :class:`torch.Generator` on its device.

    Differences (``difference``):

    * ``"central"`` (default): Δ_k = (L(θ+φz_k) − L(θ−φz_k)) / (2φ), 2K evaluations.
    * ``"forward"``: Δ_k = (L(θ+φz_k) − L(θ)) / φ with one shared L(θ) per step, K + 1
      evaluations (the torch RNG is reset to its state before L(θ) before every L(θ+φz_k)).
      Privacy is unchanged: Δ_agg(x) is still a K-vector computed from record x alone, it is
      clipped to L2 norm c exactly as before, so adding or removing one record still changes
      Σ Δ̂_agg by at most c in L2 and the release S is the same Poisson-subsampled Gaussian
      mechanism with noise multiplier σ. Only the estimator changes (bias O(φ) instead of O(φ²)).
      ``StepStats.loss`` is then the mean of L(θ).

    Schedules (DP-ZOSO, :mod:`zoprivacy.optim.schedules`): ``num_directions``, ``clip_norm``,
    ``noise_multiplier`` and ``perturbation_scale`` each accept a callable ``f(step) -> value``
    (e.g. :class:`~zoprivacy.Stagewise`), evaluated at the start of every step and
    validated; the properties of the same names return the value for the next step. Learning
    rates are scheduled with any torch LR scheduler (``torch.optim.lr_scheduler``) on this
    optimizer. The accountant is charged with the current σ at every step, so schedules that
    change σ are accounted as heterogeneous steps. ``clip_norm=None`` (MeZO) cannot be
    scheduled.

    Masks (DP-ZOPO, :mod:`~zoprivacy.optim.masks`): ``mask(step, index, param) -> bool tensor |
    None``, called for every trainable tensor at the start of every step; the direction of that
    tensor is then m ⊙ z, so the probe and the update change only the masked coordinates.

    Batched directions (``batched_directions=m``): the closure is evaluated at the 2m points of m
    directions at once with :func:`torch.func.vmap` over stacked perturbed copies of the
    trainable tensors (each z generated once per step for the probe). This trades memory for
    speed: the stacks hold 2m copies of the trainable tensors, so use it only for small
    trainable subsets (a head, LoRA adapters, a last layer behind
    :class:`~zoprivacy.PrefixCache`). Peak memory grows with m, not with K. The closure
    must be vmap-compatible (no ``.item()`` on values that depend on the parameters, no
    in-place writes to captured tensors); random layers see the same randomness at all 2m
    points (``randomness="same"``).

    Memory (default path): no copy of θ or of a whole z_k is ever made; peak extra memory is one
    scratch buffer per device with the byte size of the largest trainable tensor plus K·|B| float64
    loss differences (``tests/test_optimizer_memory.py``); see :mod:`~zoprivacy.optim.perturb` for
    the rare cases (a call reading two trainable tensors at once, a view of a perturbed tensor kept
    by the closure) that add a temporary. Rademacher directions add ~0.6 MiB of fixed chunk buffers;
    masks add 1 bit per trainable coordinate.

    Noise: from :class:`~zoprivacy.noise.NoiseSource`, never derived from ``seed``: OS entropy per
    step when ``noise_seed`` is None, a seeded reproducible generator (with a warning that the run
    is not private) when it is an int.

    Accountant: when ``accountant`` is given, ``accountant.step(noise_multiplier=σ_t,
    sample_rate=q, steps=1)`` is called at the very start of :meth:`step` with this step's σ,
    before the closure runs, so a step beyond the budget raises (e.g. ``PrivacyBudgetExceeded``)
    with the parameters and the data untouched. A step that fails later (bad closure output) has
    already been charged: this over-counts, which is conservative.

    Failure safety: if the closure raises or returns bad output (not a tensor, not 1-D, NaN/inf,
    length changing between evaluations), any in-place perturbation is undone in a ``finally``
    block before the error propagates (the zero-drift path has nothing to undo), nothing is
    released and the step counter does not advance.

    Args:
        params: iterable of tensors or of param-group dicts (``lr``, ``weight_decay`` per group).
        lr: learning rate η (≥ 0).
        num_directions: K ≥ 1 (K = 1 is DPZO), or a schedule ``f(step) -> int``.
        clip_norm: c > 0 (or a schedule), or None for MeZO mode (then ``noise_multiplier`` must
            be 0).
        noise_multiplier: σ ≥ 0 (or a schedule); the noise std per coordinate is σ·c.
        expected_batch_size: b = q·ñ > 0, the public normaliser (required unless MeZO mode).
        perturbation_scale: φ > 0 (or a schedule).
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
        perturbation: ``"auto"`` (default), ``"hooks"`` or ``"inplace"`` (see above).
        directions: ``"gaussian"`` (default) or ``"rademacher"``.
        difference: ``"central"`` (default) or ``"forward"``.
        mask: None or a mask callable (DP-ZOPO, :mod:`zoprivacy.optim.masks`).
        batched_directions: None (default) or m ≥ 1 directions evaluated per vmapped call.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        num_directions: int | Callable[[int], int],
        clip_norm: float | Callable[[int], float] | None,
        noise_multiplier: float | Callable[[int], float],
        expected_batch_size: float | None = None,
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
        batched_directions: int | None = None,
    ) -> None:
        lr = _check_real("lr", lr, minimum=0.0)
        weight_decay = _check_real("weight_decay", weight_decay, minimum=0.0)
        spec: dict[str, Any] = {
            "num_directions": num_directions,
            "clip_norm": clip_norm,
            "noise_multiplier": noise_multiplier,
            "perturbation_scale": perturbation_scale,
        }
        for name, value in spec.items():
            if callable(value):
                _check_hyper(name, value(0), scheduled=True)  # fail early on a bad schedule
            else:
                spec[name] = _check_hyper(name, value, scheduled=False)
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
        perturbation = check_perturbation(perturbation)
        directions = check_kind(directions)
        if difference not in DIFFERENCES:
            raise ValueError(f"difference must be one of {DIFFERENCES}, got {difference!r}")
        if mask is not None and not callable(mask):
            raise TypeError(f"mask must be a callable (step, index, param) -> mask, got {mask!r}")
        if batched_directions is not None:
            batched_directions = _check_int("batched_directions", batched_directions, minimum=1)
            if perturbation == "inplace":
                raise ValueError(
                    "batched_directions evaluates stacked perturbed copies through the "
                    "substitution path; it cannot be combined with perturbation='inplace'"
                )

        clip0 = _resolve(spec["clip_norm"], 0)
        sigma0 = _resolve(spec["noise_multiplier"], 0)
        if clip0 is None and sigma0 > 0:
            raise ValueError(
                f"clip_norm=None with noise_multiplier={sigma0}: the noise std is σ·c, "
                "so a clip norm is required. Pass clip_norm=c > 0, or noise_multiplier=0 for "
                "non-private MeZO."
            )
        if clip0 is not None and expected_batch_size is None:
            raise ValueError(
                "expected_batch_size is required when clip_norm is set: the update is normalised "
                "by the public b = q·ñ, never by the private |B|. Pass expected_batch_size=b > 0."
            )
        private = clip0 is not None and sigma0 > 0
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

        self._spec = spec
        self._expected_batch_size = expected_batch_size
        self._sample_rate = sample_rate
        self._accountant = accountant
        self._journal: Any | None = None
        self._perturbation = perturbation
        self._directions = directions
        self._difference = difference
        self._mask = mask
        self._batched = batched_directions
        self._inplace: frozenset[int] | None = None  # tensors on the in-place path (None: unknown)
        self._layout: tuple[int, ...] = ()  # ids of the trainable tensors when _inplace was set
        self._checked_unseen = False
        self._last_path: str | None = None
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
        """K for the next step (the current step while a step runs)."""
        return self._value("num_directions")

    @property
    def clip_norm(self) -> float | None:
        """c for the next step, or None in MeZO mode."""
        return self._value("clip_norm")

    @property
    def noise_multiplier(self) -> float:
        """σ for the next step."""
        return self._value("noise_multiplier")

    @property
    def expected_batch_size(self) -> float | None:
        """b, the public normaliser of the update (None in MeZO mode when not given)."""
        return self._expected_batch_size

    @property
    def perturbation_scale(self) -> float:
        """φ for the next step."""
        return self._value("perturbation_scale")

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
        return self._spec["clip_norm"] is None

    @property
    def is_private(self) -> bool:
        """True when the next step is a DP release (clipping, σ > 0, noise from OS entropy)."""
        return (
            self.clip_norm is not None
            and self.noise_multiplier > 0
            and not self._noise.reproducible
        )

    @property
    def perturbation(self) -> str:
        """The requested perturbation path: ``"auto"``, ``"hooks"`` or ``"inplace"``."""
        return self._perturbation

    @property
    def directions(self) -> str:
        """The direction distribution: ``"gaussian"`` or ``"rademacher"``."""
        return self._directions

    @property
    def difference(self) -> str:
        """``"central"`` (2K evaluations) or ``"forward"`` (K + 1 evaluations)."""
        return self._difference

    @property
    def scheduled(self) -> tuple[str, ...]:
        """Names of the hyper-parameters given as schedules (callables of the step)."""
        return tuple(name for name in _SCHEDULABLE if callable(self._spec[name]))

    @property
    def perturbation_path(self) -> str:
        """The path of the last step: ``"hooks"``, ``"mixed"``, ``"inplace"`` or ``"batched"``.

        Before the first step: the requested ``perturbation``, resolved when already known.
        """
        if self._last_path is not None:
            return self._last_path
        if self._perturbation == "inplace":
            return "inplace"
        return "batched" if self._batched else "hooks" if self._perturbation == "hooks" else "auto"

    @property
    def inplace_tensors(self) -> tuple[int, ...]:
        """Indices of the trainable tensors perturbed in place (empty on the zero-drift path)."""
        if self._perturbation == "inplace":
            return tuple(range(len(self._trainable())))
        return tuple(sorted(self._inplace or ()))

    def _value(self, name: str) -> Any:
        return _resolve(self._spec[name], self._step_count)

    def _config(self, step: int) -> _Config:
        values = {
            name: _check_hyper(name, _resolve(self._spec[name], step), scheduled=True, step=step)
            for name in _SCHEDULABLE
        }
        if values["clip_norm"] is None and self._spec["clip_norm"] is not None:
            raise ValueError(f"the clip_norm schedule returned None at step {step}")
        return _Config(**values)

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
        step = self._step_count
        cfg = self._config(step)
        if self._accountant is not None:
            if cfg.clip_norm is None or cfg.noise_multiplier <= 0:
                raise ValueError(
                    f"the schedules give noise_multiplier={cfg.noise_multiplier} at step {step}: "
                    "a noiseless step has infinite privacy cost and cannot be accounted"
                )
            self._accountant.step(
                noise_multiplier=cfg.noise_multiplier, sample_rate=self._sample_rate, steps=1
            )
        if self._journal is not None:  # write-ahead: on disk before any data is touched
            self._journal.begin(
                step, noise_multiplier=cfg.noise_multiplier, sample_rate=self._sample_rate
            )

        entries = self._trainable()
        params = [p for p, _ in entries]
        stream = self._stream(step, params)
        pool = ScratchPool(params)
        try:
            deltas, loss_sum, path = self._probe(closure, params, stream, pool, cfg)
        except BaseException as exc:
            if self._dp is not None:
                self._dp.abort(self, step)  # the peers raise now, not after the timeout
            _explain_bad_output(exc, step, charged=self._accountant is not None)
            raise
        k = cfg.num_directions
        batch = deltas.shape[0]
        agg = deltas / k  # line 12, shape [|B|, K]
        clipped, clip_fraction, max_err, batch_err = self._clip(agg)  # line 13, eqs. 26-27
        noisy_sum = clipped.sum(dim=0)
        if self._dp is not None:  # data parallel: sum every rank's clipped records (O(K) floats)
            noisy_sum, batch, loss_sum, clip_fraction, max_err, batch_err = self._dp.reduce(
                self, step, agg, clipped, clip_fraction, max_err, loss_sum
            )
        noise_std = 0.0
        release = None
        if cfg.clip_norm is not None and cfg.noise_multiplier > 0:
            noise_std = cfg.noise_multiplier * cfg.clip_norm
            # Line 15 as an exact release: the sum is snapped to the noise grid and integer
            # discrete-Gaussian noise is added (noise.NoiseSource.add_noise), so the released
            # floats carry nothing about the unrounded sum (float noise on a float sum leaks).
            release = functools.partial(
                self._noise.add_noise, std=noise_std, sensitivity=cfg.clip_norm
            )
        if self._dp is not None:  # rank 0 alone releases S and broadcasts it (line 15)
            noisy_sum = self._dp.release(step, noisy_sum, release)
        elif release is not None:
            noisy_sum = release(noisy_sum)

        if self._journal is not None:  # S_t is on disk before the update is applied
            self._journal.release(
                step,
                noisy_sum,
                lrs=[float(g["lr"]) for _, g in entries],
                weight_decays=[float(g["weight_decay"]) for _, g in entries],
                noise_state=self._noise.state_dict() if self._noise.reproducible else None,
            )
        if self.is_mezo:
            normalizer = float(batch)
        else:
            normalizer = float(self._expected_batch_size)  # type: ignore[arg-type]
        if normalizer > 0:
            self._update(entries, step, pool.buffers(), stream, noisy_sum / normalizer)  # line 16
        pool.release_all()

        self._step_count = step + 1
        self._last_path = path
        mean_loss = loss_sum / (batch * k) if batch else math.nan
        return StepStats(
            noisy_sum=noisy_sum,
            batch_size=batch,
            loss=mean_loss,
            clip_fraction=clip_fraction,
            batch_clip_error=batch_err,
            max_clip_error=max_err,
            step=step,
            seed=self._seed,
            num_directions=k,
            normalizer=normalizer,
            noise_std=noise_std,
            private=noise_std > 0 and not self._noise.reproducible,
            perturbation_path=path,
            directions=self._directions,
            difference=self._difference,
            perturbation_scale=cfg.perturbation_scale,
            clip_norm=cfg.clip_norm,
            noise_multiplier=cfg.noise_multiplier,
            generations=stream.generations,
        )

    # ------------------------------------------------------------------ journal and replay
    @property
    def accountant(self) -> Any | None:
        """The accountant charged at every step (None if not accounted)."""
        return self._accountant

    def attach_journal(self, journal: Any | None) -> None:
        """Write every step to ``journal`` (a :class:`zoprivacy.run.journal.StepJournal`): a
        ``begin`` record before the step touches data and a ``release`` record with S_t before
        its update. :func:`zoprivacy.make_private` attaches one when given ``journal=``."""
        if journal is not None:
            if self._accountant is None:
                raise ValueError(
                    "a journal records accounted releases: build the optimizer with an "
                    "accountant (or use zoprivacy.make_private(..., journal=path))"
                )
            if self._dp is not None:
                raise ValueError(
                    "journals are not supported for data-parallel runs yet (process_group is "
                    "set): checkpoint every step instead"
                )
        self._journal = journal

    @torch.no_grad()
    def replay_release(
        self,
        noisy_sum: torch.Tensor,
        *,
        lrs: Sequence[float],
        weight_decays: Sequence[float],
        noise_state: dict[str, Any] | None = None,
    ) -> None:
        """Apply the next step's update (line 16) from its already released S_t.

        Post-processing of a release made before a crash (see :mod:`zoprivacy.run.journal`): no
        closure runs, no noise is drawn, the accountant is not charged here (the journal's
        ``begin`` record is). ``lrs``/``weight_decays`` are the recorded per-tensor values and
        ``noise_state`` the seeded noise state after the step (None: OS-entropy noise).
        """
        if self.is_mezo:
            raise ValueError("MeZO steps are normalised by the private |B| and cannot be replayed")
        step = self._step_count
        cfg = self._config(step)
        entries = self._trainable()
        params = [p for p, _ in entries]
        if len(lrs) != len(params) or len(weight_decays) != len(params):
            raise ValueError(
                f"the recorded step has {len(lrs)} learning rates for {len(params)} trainable "
                "tensors: resume with the same model and trainable selection"
            )
        noisy_sum = torch.as_tensor(noisy_sum)
        if tuple(noisy_sum.shape) != (cfg.num_directions,):
            raise ValueError(
                f"recorded S_t has shape {tuple(noisy_sum.shape)}, step {step} uses "
                f"{cfg.num_directions} directions"
            )
        stream = self._stream(step, params)
        pool = ScratchPool(params)
        coefs = noisy_sum / float(self._expected_batch_size)  # type: ignore[arg-type]
        self._update(entries, step, pool.buffers(), stream, coefs, list(lrs), list(weight_decays))
        pool.release_all()
        if noise_state is not None:
            noise = NoiseSource()
            noise.load_state_dict(noise_state)
            self._noise = noise
        self._step_count = step + 1

    def _stream(self, step: int, params: list[torch.Tensor]) -> DirectionStream:
        """The public directions of step ``step`` (regenerated from the seed, masked)."""
        return DirectionStream(
            params,
            seed=self._seed,
            step=step,
            kind=self._directions,
            masks=self._masks(step, params),
        )

    def _masks(self, step: int, params: list[torch.Tensor]) -> list[torch.Tensor | None] | None:
        """DP-ZOPO: this step's mask of every tensor, packed to bits (None: no masks)."""
        if self._mask is None:
            return None
        packed: list[torch.Tensor | None] = []
        for i, p in enumerate(params):
            m = self._mask(step, i, p.detach())
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

    def _inplace_flags(self, params: list[torch.Tensor]) -> list[bool]:
        """Which tensors use the in-place path this step (discovery state of ``"auto"``)."""
        layout = tuple(id(p) for p in params)
        if layout != self._layout:  # the trainable set changed: find out again
            self._layout = layout
            self._inplace = None
            self._checked_unseen = False
        if self._perturbation == "inplace":
            return [True] * len(params)
        inplace = self._inplace or frozenset()
        return [i in inplace for i in range(len(params))]

    def _discover(
        self,
        prober: Prober,
        params: list[torch.Tensor],
        out: torch.Tensor,
        redo: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """After a perturbed evaluation: settle which tensors the substitution cannot see."""
        if self._checked_unseen or self._perturbation == "inplace" or out.numel() == 0:
            return out
        self._checked_unseen = True
        unseen = prober.unseen()
        if self._perturbation == "auto" and self._dp is None and not self._batched:
            self._inplace = frozenset(unseen)
            if unseen:
                prober.set_inplace(unseen)
                return redo()  # that evaluation missed their perturbation: run it again
            return out
        self._inplace = frozenset()
        warn_unseen(params, unseen, "batched" if self._batched else "hooks")
        return out

    def _probe(
        self,
        closure: Closure,
        params: list[torch.Tensor],
        stream: DirectionStream,
        pool: ScratchPool,
        cfg: _Config,
    ) -> tuple[torch.Tensor, float, str]:
        """Lines 5-10: the closure evaluations; returns Δ (float64 [|B|, K]), the loss sum
        (Σ over records and directions of (L+ + L−)/2, or K·Σ L(θ) with forward differences)
        and the path that ran. Any in-place perturbation left is undone in ``finally``."""
        phi = cfg.perturbation_scale
        num = cfg.num_directions
        prober = Prober(params, stream, phi, self._inplace_flags(params), pool)
        cuda_devices = sorted({p.device for p in params if p.device.type == "cuda"}, key=str)
        columns: list[torch.Tensor] = []
        loss_sum = 0.0
        batch: int | None = None

        def point(k: int, sign: int, rng: Any) -> torch.Tensor:
            where = _where(k, sign)

            def run() -> torch.Tensor:
                return prober.evaluate(lambda: _evaluate(closure, where, batch), k, sign)

            def redo() -> torch.Tensor:
                _restore_rng(rng, cuda_devices)
                return run()

            out = run()
            return out if sign == 0 else self._discover(prober, params, out, redo)

        try:
            if self._batched:
                columns, loss_sum = self._probe_batched(closure, prober, params, cfg)
            elif self._difference == "central":
                for k in range(num):
                    rng = _capture_rng(cuda_devices)
                    plus = point(k, +1, rng)
                    batch = plus.numel()
                    _restore_rng(rng, cuda_devices)
                    minus = point(k, -1, rng)
                    columns.append(_difference((plus - minus) / (2.0 * phi), k))
                    loss_sum += float((plus + minus).sum()) / 2.0
            else:
                rng = _capture_rng(cuda_devices)
                base = point(0, 0, rng)
                batch = base.numel()
                for k in range(num):
                    _restore_rng(rng, cuda_devices)
                    plus = point(k, +1, rng)
                    columns.append(_difference((plus - base) / phi, k))
                loss_sum = num * float(base.sum())
        finally:
            prober.restore()
        inplace = [i for i, x in enumerate(prober.inplace) if x]
        if self._batched:
            path = "batched"
        elif not inplace:
            path = "hooks"
        elif len(inplace) == len(params):
            path = "inplace"
        else:
            path = "mixed"
        return torch.stack(columns, dim=1), loss_sum, path

    def _probe_batched(
        self, closure: Closure, prober: Prober, params: list[torch.Tensor], cfg: _Config
    ) -> tuple[list[torch.Tensor], float]:
        """The probe with ``batched_directions`` directions per vmapped call."""
        phi = cfg.perturbation_scale
        num = cfg.num_directions
        chunk = int(self._batched or 1)
        cuda_devices = sorted({p.device for p in params if p.device.type == "cuda"}, key=str)
        columns: list[torch.Tensor] = []
        loss_sum = 0.0
        batch: int | None = None
        base: torch.Tensor | None = None
        if self._difference == "forward":
            base = _evaluate(closure, _where(0, 0), None)
            batch = base.numel()
            loss_sum = num * float(base.sum())
        signs = (+1, -1) if self._difference == "central" else (+1,)
        for first in range(0, num, chunk):
            ks = range(first, min(num, first + chunk))
            points = [(k, s) for k in ks for s in signs]
            rng = _capture_rng(cuda_devices)
            out = prober.evaluate_batched(closure, points)
            _restore_rng(rng, cuda_devices)  # as if the points had run one after the other
            rows = _check_batched(out, points, batch)
            batch = rows.shape[1]
            first_row = rows[0]
            self._discover(prober, params, first_row, lambda row=first_row: row)
            for j, k in enumerate(ks):
                if base is None:
                    plus, minus = rows[2 * j], rows[2 * j + 1]
                    columns.append(_difference((plus - minus) / (2.0 * phi), k))
                    loss_sum += float((plus + minus).sum()) / 2.0
                else:
                    columns.append(_difference((rows[j] - base) / phi, k))
        return columns, loss_sum

    def _clip(self, agg: torch.Tensor) -> tuple[torch.Tensor, float, float, float]:
        """Line 13 and the diagnostics of eqs. 26-27: (Δ̂, clip fraction, max err, batch err)."""
        c = self.clip_norm
        if c is None or agg.shape[0] == 0:
            return agg, 0.0, 0.0, 0.0
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
        stream: DirectionStream,
        coefs: torch.Tensor,
        lrs: list[float] | None = None,
        weight_decays: list[float] | None = None,
    ) -> None:
        """Line 16 plus decoupled weight decay: θ ← θ(1 − η·wd) − η Σ_k coefs_k z_k.

        ``lrs``/``weight_decays`` (per tensor) default to the param groups' current values."""
        if lrs is None:
            lrs = [float(g["lr"]) for _, g in entries]
        if weight_decays is None:
            weight_decays = [float(g["weight_decay"]) for _, g in entries]
        for i, (p, _) in enumerate(entries):
            wd = weight_decays[i]
            if wd and lrs[i]:
                p.mul_(1.0 - lrs[i] * wd)
        for k, coef in enumerate(coefs.tolist()):
            if coef == 0.0:
                continue
            for i, (p, _) in enumerate(entries):
                if lrs[i]:
                    z = stream.fill(k, i, stream.view(scratch[p.device], i))
                    p.add_(z, alpha=-lrs[i] * coef)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Torch's state plus step count, public seed, hyper-parameters and (seeded) noise state.

        With ``noise_seed=None`` no noise state is saved: a resumed run draws fresh OS entropy.
        The accountant is not saved (checkpoint it separately). Scheduled hyper-parameters are
        saved with their value at the current step and listed under ``"scheduled"``; the
        library's own schedules (:class:`~zoprivacy.Stagewise`) are saved whole under
        ``"schedules"``, and the library's masks (:class:`~zoprivacy.MagnitudeMask`,
        :class:`~zoprivacy.RandomMask`, :class:`~zoprivacy.FixedMask`) under
        ``"mask"``. Any other callable (schedule or mask) is not saved: pass the same callable
        when resuming.
        """
        sd = super().state_dict()
        sd[_STATE_KEY] = {
            "version": _STATE_VERSION,
            "step": self._step_count,
            "seed": self._seed,
            "num_directions": self.num_directions,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "expected_batch_size": self._expected_batch_size,
            "perturbation_scale": self.perturbation_scale,
            "sample_rate": self._sample_rate,
            "noise": self._noise.state_dict(),
            "scheduled": list(self.scheduled),
            "perturbation": self._perturbation,
            "directions": self._directions,
            "direction_stream": DIRECTION_STREAM,
            "difference": self._difference,
            "masked": self._mask is not None,
            "batched_directions": self._batched,
            "schedules": {
                name: self._spec[name].state_dict()
                for name in self.scheduled
                if _serialisable(self._spec[name])
            },
            "mask": self._mask.state_dict() if _serialisable(self._mask) else None,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, so the run continues the same trajectory bit for bit.

        The saved hyper-parameters, seed, step count, noise mode, direction distribution,
        difference and perturbation path replace the current ones (validated first; nothing
        changes if validation fails).

        Schedules and masks (a resume must follow the same trajectory, so mismatches raise):

        * a library schedule or mask saved in the checkpoint (``Stagewise``, ``MagnitudeMask``,
          ``RandomMask``, ``FixedMask``) is restored when this optimizer was built without one
          (a constant in place of the schedule, ``mask=None``); when it was built with one, it
          must be equal to the saved one;
        * a hyper-parameter scheduled by another callable keeps this optimizer's callable, which
          must exist and must give the saved value at the saved step; a run saved with another
          mask callable needs this optimizer to have one (pass the same callable);
        * a hyper-parameter that was constant when saved cannot be resumed with a schedule, and
          a run saved without a mask cannot be resumed with one.
        """
        sd = dict(state_dict)
        zo = sd.pop(_STATE_KEY, None)
        if not isinstance(zo, dict):
            raise ValueError(f"state_dict has no {_STATE_KEY!r} entry: not from DPAggZO")
        step = _check_int("step", zo["step"], minimum=0)
        seed = _check_int("seed", zo["seed"], minimum=0)
        scheduled = list(zo.get("scheduled", []))
        saved_schedules = zo.get("schedules") or {}
        spec = dict(self._spec)
        for name in _SCHEDULABLE:
            spec[name] = _resume_schedule(
                name, self._spec[name], name in scheduled, saved_schedules.get(name), zo, step
            )
        if spec["clip_norm"] is None and callable(spec["noise_multiplier"]):
            raise ValueError("clip_norm=None (MeZO) cannot be resumed with a σ schedule")
        b = zo["expected_batch_size"]
        b = None if b is None else _check_real("expected_batch_size", b, positive=True)
        q = zo["sample_rate"]
        q = None if q is None else _check_real("sample_rate", q, positive=True)
        perturbation = check_perturbation(zo.get("perturbation", self._perturbation))
        directions = check_kind(zo.get("directions", self._directions))
        stream = zo.get("direction_stream", "v1")
        trainable = [p for p, _ in self._trainable()]
        if stream != DIRECTION_STREAM and stream_affects(trainable, directions):
            raise ValueError(
                f"state_dict was saved with direction stream {stream!r}, this zoprivacy "
                f"generates {DIRECTION_STREAM!r}: its CPU Gaussian directions of tensors with "
                "more than GAUSSIAN_CHUNK values differ, so the run would not continue the same "
                "trajectory; resume with the zoprivacy version that wrote the checkpoint, or "
                "start a new run"
            )
        difference = zo.get("difference", self._difference)
        if difference not in DIFFERENCES:
            raise ValueError(f"difference must be one of {DIFFERENCES}, got {difference!r}")
        mask = _resume_mask(self._mask, bool(zo.get("masked", False)), zo.get("mask"))
        batched = zo.get("batched_directions", self._batched)
        if batched is not None:
            batched = _check_int("batched_directions", batched, minimum=1)
        for group in sd["param_groups"]:
            _check_group(group)
        noise = NoiseSource()
        noise.load_state_dict(zo["noise"])
        super().load_state_dict(sd)
        self._step_count, self._seed, self._spec = step, seed, spec
        self._expected_batch_size, self._sample_rate, self._noise = b, q, noise
        self._perturbation, self._directions, self._difference = (
            perturbation,
            directions,
            difference,
        )
        self._batched, self._mask = batched, mask
        self._inplace, self._layout, self._checked_unseen = None, (), False
        self._last_path = None

    @classmethod
    def from_state_dict(
        cls,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        state_dict: dict[str, Any],
        *,
        accountant: Any | None = None,
        process_group: Any | None = None,
        mask: Callable[[int, int, torch.Tensor], torch.Tensor | None] | None = None,
        **schedules: Callable[[int], Any],
    ) -> DPAggZO:
        """Rebuild an optimizer from its own :meth:`state_dict`, ready to take the next step.

        Everything that defines the trajectory comes from the checkpoint: η and weight decay (per
        param group), K, c, σ, φ, b, q, the public seed, step count, noise state, direction
        distribution, difference, perturbation path and batching. ``schedules`` (callables of the
        step for ``num_directions``, ``clip_norm``, ``noise_multiplier`` or
        ``perturbation_scale``) and ``mask`` are checked against the saved ones exactly as
        :meth:`load_state_dict` does; the library's own schedules and masks are restored from
        the checkpoint when not given. The parameters' values are not in the optimizer's state:
        load them before calling this (a data-parallel build checks them across ranks).

        Args:
            params: the same trainable tensors (or param groups) as the saved optimizer's.
            state_dict: a :meth:`state_dict` of :class:`DPAggZO` (or a preset).
            accountant: charged from the next step on (restore its own state separately).
            process_group: as in :class:`DPAggZO`.
            mask: the DP-ZOPO mask callable of the saved run, or None.
            **schedules: the saved run's schedules that are not the library's own.
        """
        zo = state_dict.get(_STATE_KEY) if isinstance(state_dict, dict) else None
        if not isinstance(zo, dict):
            raise ValueError(f"state_dict has no {_STATE_KEY!r} entry: not from DPAggZO")
        unknown = sorted(set(schedules) - set(_SCHEDULABLE))
        if unknown:
            raise TypeError(
                f"from_state_dict got unknown keyword(s) {unknown}: schedules may be given for "
                f"{', '.join(_SCHEDULABLE)} only"
            )
        groups = state_dict.get("param_groups") or [{}]
        hyper = {name: schedules.get(name, zo[name]) for name in _SCHEDULABLE}
        optimizer = cls.__new__(cls)
        DPAggZO.__init__(
            optimizer,
            params,
            groups[0].get("lr", 0.0),
            weight_decay=groups[0].get("weight_decay", 0.0),
            **hyper,
            expected_batch_size=zo["expected_batch_size"],
            seed=zo["seed"],
            accountant=accountant,
            sample_rate=zo["sample_rate"],
            process_group=process_group,
            perturbation=zo.get("perturbation", "auto"),
            directions=zo.get("directions", "gaussian"),
            difference=zo.get("difference", "central"),
            mask=mask,
            batched_directions=zo.get("batched_directions"),
        )
        optimizer.load_state_dict(state_dict)
        return optimizer

    @torch.no_grad()
    def check_closure(self, losses: Callable[[Any], torch.Tensor], batch: Any) -> None:
        """A free dry run of ``losses`` on a batch the caller declares public or synthetic.

        Checks, with the perturbation machinery of a real step, that ``losses(batch)`` is a 1-D
        floating tensor of shape [|B|], finite at θ and at θ ± φz_0 of the next step, and that
        each record's loss depends on that record alone
        (:func:`zoprivacy.tasks.check.check_per_sample`, which also asks for the empty batch).
        Nothing is charged, journaled or released, no noise is drawn, the step counter does not
        advance and the parameters are left bit-identical (tensors perturbed in place are
        restored from a copy). Never call it on private data: it reads the records it is given.

        Raises:
            TypeError, ValueError: naming the problem and the fix (the same messages a step
                would raise); :class:`~zoprivacy.tasks.check.PerSampleViolation` when a record's
                loss depends on the other records.
        """
        from zoprivacy.tasks.check import batch_size_of, check_per_sample

        if not callable(losses):
            raise TypeError(f"losses must be callable (batch -> Tensor[|B|]), got {losses!r}")
        size = batch_size_of(batch)
        step = self._step_count
        cfg = self._config(step)
        params = [p for p, _ in self._trainable()]
        stream = self._stream(step, params)
        pool = ScratchPool(params)
        flags = self._inplace_flags(params)
        saved = [p.detach().clone() if f else None for p, f in zip(params, flags, strict=True)]
        prober = Prober(params, stream, cfg.perturbation_scale, flags, pool)
        cuda_devices = sorted({p.device for p in params if p.device.type == "cuda"}, key=str)
        rng = _capture_rng(cuda_devices)
        try:
            for sign in (0, +1, -1):
                _restore_rng(rng, cuda_devices)
                where = _where(0, sign)
                prober.evaluate(lambda w=where: _evaluate(lambda: losses(batch), w, size), 0, sign)
        finally:
            prober.restore()
            for p, copy in zip(params, saved, strict=True):
                if copy is not None:
                    p.copy_(copy)
            pool.release_all()
        check_per_sample(losses, batch)

    def _warn_if_not_private(self) -> None:
        if self._spec["clip_norm"] is None:
            msg = "clip_norm=None and noise_multiplier=0: this is non-private MeZO"
        elif _resolve(self._spec["noise_multiplier"], 0) == 0:
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
        )


# ---------------------------------------------------------------------- helpers
def _serialisable(obj: object) -> bool:
    """A library schedule or mask, which saves itself whole in ``DPAggZO.state_dict()``."""
    from zoprivacy.optim.masks import FixedMask, MagnitudeMask, RandomMask
    from zoprivacy.optim.schedules import Stagewise

    return type(obj) in (Stagewise, MagnitudeMask, RandomMask, FixedMask)


def _resume_schedule(
    name: str, mine: Any, was_scheduled: bool, saved: dict[str, Any] | None, zo: dict, step: int
) -> Any:
    """The spec of hyper-parameter ``name`` after loading a checkpoint (see load_state_dict)."""
    from zoprivacy.optim.schedules import schedule_from_state_dict

    if not was_scheduled:
        if callable(mine):
            raise ValueError(
                f"the checkpoint's {name} is the constant {zo[name]!r} but this optimizer has "
                f"the schedule {mine!r}: build it with {name}={zo[name]!r} (or nothing) to resume"
            )
        return _check_hyper(name, zo[name], scheduled=False)
    if saved is not None:
        restored = schedule_from_state_dict(saved)
        if not callable(mine):  # built without it (e.g. make_private's resume): restore it
            _check_hyper(name, restored(step), scheduled=True, step=step)
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
    value = _check_hyper(name, mine(step), scheduled=True, step=step)
    saved_value = _check_hyper(name, zo[name], scheduled=True, step=step)
    if value != saved_value:
        raise ValueError(
            f"this optimizer's {name} schedule gives {value!r} at step {step}, the checkpoint "
            f"saved {saved_value!r}: resume with the same schedule"
        )
    return mine


def _resume_mask(mine: Any, masked: bool, saved: dict[str, Any] | None) -> Any:
    """The mask after loading a checkpoint (see load_state_dict)."""
    from zoprivacy.optim.masks import mask_from_state_dict

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


def _resolve(spec: Any, step: int) -> Any:
    return spec(step) if callable(spec) else spec


def _check_hyper(name: str, value: object, *, scheduled: bool, step: int | None = None) -> Any:
    """Validate one (possibly scheduled) hyper-parameter value."""
    where = f"{name}" if step is None or not scheduled else f"{name} (at step {step})"
    if name == "num_directions":
        return _check_int(where, value, minimum=1)
    if name == "clip_norm":
        return None if value is None else _check_real(where, value, positive=True)
    if name == "noise_multiplier":
        return _check_real(where, value, minimum=0.0)
    return _check_real(where, value, positive=True)  # perturbation_scale


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


def _where(k: int, sign: int) -> str:
    if sign == 0:
        return "the unperturbed θ (forward differences)"
    return f"direction k={k} (θ{'+' if sign > 0 else '-'}φ·z_k)"


def _difference(delta: torch.Tensor, k: int) -> torch.Tensor:
    bad = ~torch.isfinite(delta)
    if bool(bad.any()):
        raise _bad(
            ValueError,
            f"the loss difference overflows float64 for records {_indices(bad)} at "
            f"direction k={k}; the losses are too large: rescale the loss",
        )
    return delta


def _bad(kind: type[Exception], message: str) -> Exception:
    exc = kind(message)
    exc.bad_closure_output = True  # type: ignore[attr-defined]
    return exc


def _explain_bad_output(exc: BaseException, step: int, *, charged: bool) -> None:
    """Append to a bad-output error what it cost and how to find such bugs for free (defect 5)."""
    if not getattr(exc, "bad_closure_output", False) or not exc.args:
        return
    cost = (
        f"DPAggZO step {step} was already charged to the accountant: the closure had read the "
        "data before its output could be checked, so this step's privacy budget is spent. "
        if charged
        else ""
    )
    exc.args = (
        f"{exc.args[0]}. {cost}Find such closure bugs for free, on a batch you declare public "
        "or synthetic, with DPAggZO.check_closure(losses, batch) (or "
        "PrivateTraining.dry_run(batch)) before training",
        *exc.args[1:],
    )


def _evaluate(closure: Closure, where: str, batch: int | None) -> torch.Tensor:
    """Call the closure once and check its output; returns the losses as float64 on CPU."""
    return _check_losses(closure(), where, batch)


def _check_losses(out: object, where: str, batch: int | None) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise _bad(
            TypeError,
            f"closure must return a torch.Tensor of per-record losses, got "
            f"{type(out).__name__} at {where}",
        )
    if out.dim() != 1:
        raise _bad(
            ValueError,
            f"closure must return a 1-D tensor of shape [|B|] (one loss per record, e.g. "
            f"reduction='none'), got shape {tuple(out.shape)} at {where}",
        )
    if not out.is_floating_point():
        raise _bad(
            TypeError, f"closure must return floating-point losses, got {out.dtype} at {where}"
        )
    if batch is not None and out.numel() != batch:
        raise _bad(
            ValueError,
            f"closure returned {out.numel()} losses at {where} but {batch} at the first "
            "evaluation of the step: every evaluation of one step must see the same batch",
        )
    losses = out.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        raise _bad(
            ValueError,
            f"closure returned NaN/inf losses for records {_indices(bad)} at {where}; fix the "
            "loss (e.g. log(0), float16 overflow) or lower perturbation_scale",
        )
    return losses


def _check_batched(out: object, points: list[tuple[int, int]], batch: int | None) -> torch.Tensor:
    """Check the vmapped output [len(points), |B|] row by row; returns float64 CPU rows."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(points):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _bad(
            ValueError,
            f"batched_directions: the vmapped closure returned {shape}, expected "
            f"[{len(points)}, |B|] (one 1-D tensor of per-record losses per point)",
        )
    rows = [_check_losses(out[j], _where(k, s), batch) for j, (k, s) in enumerate(points)]
    return torch.stack(rows)


def _row_norms(a: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row, scaled by the row's max |entry| so that huge values do not overflow."""
    m = a.abs().amax(dim=1)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    return m * torch.linalg.vector_norm(a / safe[:, None], dim=1)
