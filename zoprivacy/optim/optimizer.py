"""The DP-AggZO optimizer (Bao et al., USENIX Security 2025, Algorithm 1) and its presets.

:class:`DPAggZO` implements lines 5-16 of Algorithm 1 for one step by calling the pure functions
of :mod:`zoprivacy.optim.algorithm`; the class keeps the state (step count, public seed, noise
source, path discovery), the validation and the checkpoints (:mod:`zoprivacy.optim.state`).
Lines 1-2 (the noisy dataset size ñ and b = q·ñ) and line 4 (Poisson sampling) belong to the
caller, who passes b as ``expected_batch_size`` and samples the batch inside the closure's data.
:class:`DPZO` (K = 1) and :class:`MeZO` (no clipping, no noise) are the same class with fixed
arguments. The DP-ZOSO (stage-wise schedules, :mod:`zoprivacy.optim.schedules`) and DP-ZOPO
(pruned coordinate subsets, :mod:`zoprivacy.optim.masks`) variants are options of the same class.
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from zoprivacy import checks
from zoprivacy.distributed import DataParallel
from zoprivacy.noise.source import NoiseSource
from zoprivacy.optim.algorithm import Clipped, Probe, apply_update, clip_rows, probe, release
from zoprivacy.optim.closure import evaluate, explain_bad_output, where
from zoprivacy.optim.config import (
    SCHEDULABLE,
    StepConfig,
    check_group,
    check_hyper,
    resolve,
    resolve_step,
)
from zoprivacy.optim.directions import (
    DIRECTION_STREAM,
    DirectionStream,
    check_kind,
    draw_public_seed,
)
from zoprivacy.optim.perturb import (
    PathDiscovery,
    Prober,
    ScratchPool,
    capture_rng,
    check_perturbation,
    restore_rng,
)
from zoprivacy.optim.state import (
    DIFFERENCES,
    STATE_KEY,
    STATE_VERSION,
    check_difference,
    describe,
    read_state,
    saved_entry,
    serialisable,
)
from zoprivacy.optim.stats import StepStats

__all__ = ["DIFFERENCES", "DPZO", "DPAggZO", "MeZO", "NotPrivateWarning"]

Closure = Callable[[], torch.Tensor]
Mask = Callable[[int, int, torch.Tensor], torch.Tensor | None]


class NotPrivateWarning(UserWarning):
    """The optimizer is configured so that its steps are not differentially private."""


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
        mask: Mask | None = None,
        batched_directions: int | None = None,
    ) -> None:
        defaults = {
            "lr": checks.real("lr", lr, minimum=0.0),
            "weight_decay": checks.real("weight_decay", weight_decay, minimum=0.0),
        }
        spec = _check_spec(num_directions, clip_norm, noise_multiplier, perturbation_scale)
        if expected_batch_size is not None:
            expected_batch_size = checks.real(
                "expected_batch_size", expected_batch_size, positive=True
            )
        if sample_rate is not None:
            sample_rate = checks.sample_rate(sample_rate)
        if seed is not None:
            seed = checks.integer("seed", seed, minimum=0)
        if mask is not None and not callable(mask):
            raise TypeError(f"mask must be a callable (step, index, param) -> mask, got {mask!r}")
        self._perturbation = check_perturbation(perturbation)
        self._directions = check_kind(directions)
        self._difference = check_difference(difference)
        self._batched = _check_batched(batched_directions, self._perturbation)
        _check_mode(spec, expected_batch_size, accountant, sample_rate)
        super().__init__(params, defaults)
        if not self._trainable():
            raise ValueError(
                "params contains no tensor with requires_grad=True: nothing to optimise. Pass the "
                "trainable parameters (e.g. [p for p in model.parameters() if p.requires_grad])."
            )
        self._spec, self._mask = spec, mask
        self._expected_batch_size, self._sample_rate = expected_batch_size, sample_rate
        self._accountant, self._journal = accountant, None
        self._current: StepConfig | None = None  # the running step's values (None between steps)
        self._last_path: str | None = None
        self._dp = None if process_group is None else DataParallel.wrap(process_group)
        self._paths = self._path_discovery()
        if self._dp is not None:
            seed = self._dp.agree_on_seed(seed)  # rank 0 draws it (if None) and broadcasts it
        self._seed = draw_public_seed() if seed is None else seed
        self._step_count = 0
        self._noise = NoiseSource(noise_seed)
        self._warn_if_not_private()
        if self._dp is not None:  # same configuration and bit-identical parameters everywhere
            self._dp.verify(self.config_fingerprint(), [p for p, _ in self._trainable()])

    def _path_discovery(self) -> PathDiscovery:
        label = "batched" if self._batched else "hooks"
        fixed = self._dp is not None or bool(self._batched)
        return PathDiscovery(self._perturbation, fixed=fixed, label=label)

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
        return tuple(name for name in SCHEDULABLE if callable(self._spec[name]))

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
        return tuple(sorted(self._paths.inplace or ()))

    def _value(self, name: str) -> Any:
        return resolve(self._spec[name], self._step_count)

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating its ``lr`` and ``weight_decay``; params must be floating."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_group(group)
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
        Every per-step value is resolved once, before the closure runs, and used for the whole
        step. Raises ``ValueError``/``TypeError`` on bad closure output with the parameters
        restored (the step was charged if there is an accountant: the message says so).
        """
        _check_closure_argument(closure)
        entries = self._trainable()
        params = [p for p, _ in entries]
        cfg = self._resolve_step(entries)  # K, c, σ, φ, η, wd, masks: once, before data is read
        self._charge(cfg)  # the accountant, then the journal's write-ahead record
        stream = self._stream(cfg, params)
        pool = ScratchPool(params)
        prober = Prober(params, stream, cfg.perturbation_scale, self._paths.flags(params), pool)
        self._current = cfg
        try:
            probed = self._probe(closure, prober, cfg)  # lines 5-10: Δ_k(x), k < K
            agg = probed.deltas / cfg.num_directions  # line 12: Δ_agg(x), [|B|, K]
            clipped = Clipped(*self._clip(agg))  # line 13 (eqs. 26/27) at the step's c
            batch, loss_sum, summed = agg.shape[0], probed.loss_sum, clipped.clipped.sum(dim=0)
            if self._dp is not None:  # every rank's clipped K-sums (O(K) floats)
                fingerprint = self._fingerprint(cfg)
                summed, batch, loss_sum, *diagnostics = self._dp.reduce(
                    cfg.step, agg, clipped, loss_sum, fingerprint=fingerprint, params=params
                )
                clipped = Clipped(clipped.clipped, *diagnostics)
            noisy_sum = self._release(cfg, summed)  # line 15: S = Σ Δ̂_agg + v
            if self._journal is not None:  # S_t is on disk before the update is applied
                self._journal.release(
                    cfg.step,
                    noisy_sum,
                    lrs=list(cfg.lrs),
                    weight_decays=list(cfg.weight_decays),
                    noise_state=self._noise.state_dict() if self._noise.reproducible else None,
                )
            normalizer = self._normalizer(batch)
            if normalizer > 0:  # line 16: θ ← θ − (η/b) Σ_k S_k z_k
                self._update(entries, cfg.step, pool.buffers(), stream, noisy_sum / normalizer)
        finally:
            self._current = None
            pool.release_all()
        self._step_count, self._last_path = cfg.step + 1, probed.path
        return self._stats(cfg, probed.path, noisy_sum, batch, loss_sum, clipped, stream)

    def _probe(self, closure: Closure, prober: Prober, cfg: StepConfig) -> Probe:
        """Lines 5-10 (:func:`~zoprivacy.optim.algorithm.probe`); on failure the data-parallel
        peers are told at once and a bad-output error says what the step cost."""
        try:
            return probe(
                closure,
                prober,
                num_directions=cfg.num_directions,
                perturbation_scale=cfg.perturbation_scale,
                difference=self._difference,
                batched=self._batched,
                discover=self._paths.discover,
            )
        except BaseException as exc:
            if self._dp is not None:  # the peers raise now, not after the timeout
                self._dp.abort(cfg.step, prober.params)
            explain_bad_output(exc, cfg.step, charged=self._accountant is not None)
            raise

    def _normalizer(self, batch: int) -> float:
        """The divisor of line 16: the public b, or |B| in (non-private) MeZO mode."""
        return float(batch) if self.is_mezo else float(self._expected_batch_size)  # type: ignore[arg-type]

    def _resolve_step(self, entries: list[tuple[torch.Tensor, dict[str, Any]]]) -> StepConfig:
        return resolve_step(self._spec, self._step_count, entries, self._mask)

    def _charge(self, cfg: StepConfig) -> None:
        """Charge the accountant with this step's σ and write the journal's ``begin`` record,
        both before any data is touched (a step beyond the budget raises here)."""
        if self._accountant is not None:
            if not cfg.noisy:
                raise ValueError(
                    f"the schedules give noise_multiplier={cfg.noise_multiplier} at step "
                    f"{cfg.step}: a noiseless step has infinite privacy cost and cannot be "
                    "accounted"
                )
            self._accountant.step(
                noise_multiplier=cfg.noise_multiplier, sample_rate=self._sample_rate, steps=1
            )
        if self._journal is not None:
            self._journal.begin(
                cfg.step, noise_multiplier=cfg.noise_multiplier, sample_rate=self._sample_rate
            )

    def _clip(self, agg: torch.Tensor) -> tuple[torch.Tensor, float, float, float]:
        """Line 13 at the running step's c (:func:`~zoprivacy.optim.algorithm.clip_rows`).

        A method so that the canary audit's planted faults can override it."""
        assert self._current is not None, "_clip runs inside step()"
        return clip_rows(agg, self._current.clip_norm)

    def _release(self, cfg: StepConfig, summed: torch.Tensor) -> torch.Tensor:
        """Line 15 (:func:`~zoprivacy.optim.algorithm.release`); data parallel: rank 0 alone
        draws the noise and broadcasts S."""
        draw = functools.partial(
            release,
            noise=self._noise,
            noise_multiplier=cfg.noise_multiplier,
            clip_norm=cfg.clip_norm,
        )
        if self._dp is not None:
            return self._dp.release(cfg.step, summed, draw)
        return draw(summed)

    def _update(
        self,
        entries: list[tuple[torch.Tensor, dict[str, Any]]],
        step: int,
        scratch: dict[torch.device, torch.Tensor],
        stream: DirectionStream,
        coefs: torch.Tensor,
        lrs: Sequence[float] | None = None,
        weight_decays: Sequence[float] | None = None,
    ) -> None:
        """Line 16 (:func:`~zoprivacy.optim.algorithm.apply_update`) with the running step's
        resolved η and wd unless given (a replayed step passes its recorded ones)."""
        if lrs is None or weight_decays is None:
            assert self._current is not None, "_update without lrs runs inside step()"
            lrs, weight_decays = self._current.lrs, self._current.weight_decays
        params = [p for p, _ in entries]
        apply_update(params, stream, scratch, coefs, lrs, weight_decays)

    def _stream(self, cfg: StepConfig, params: list[torch.Tensor]) -> DirectionStream:
        """The public directions of the step (regenerated from the seed, masked)."""
        return DirectionStream(
            params, seed=self._seed, step=cfg.step, kind=self._directions, masks=cfg.masks
        )

    def _stats(
        self,
        cfg: StepConfig,
        path: str,
        noisy_sum: torch.Tensor,
        batch: int,
        loss_sum: float,
        clipped: Clipped,
        stream: DirectionStream,
    ) -> StepStats:
        noise_std = cfg.noise_multiplier * (cfg.clip_norm or 0.0)
        k = cfg.num_directions
        return StepStats(
            noisy_sum=noisy_sum,
            batch_size=batch,
            loss=loss_sum / (batch * k) if batch else math.nan,
            clip_fraction=clipped.clip_fraction,
            batch_clip_error=clipped.batch_clip_error,
            max_clip_error=clipped.max_clip_error,
            step=cfg.step,
            seed=self._seed,
            num_directions=k,
            normalizer=self._normalizer(batch),
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
        entries = self._trainable()
        params = [p for p, _ in entries]
        if len(lrs) != len(params) or len(weight_decays) != len(params):
            raise ValueError(
                f"the recorded step has {len(lrs)} learning rates for {len(params)} trainable "
                "tensors: resume with the same model and trainable selection"
            )
        cfg = self._resolve_step(entries)
        noisy_sum = torch.as_tensor(noisy_sum)
        if tuple(noisy_sum.shape) != (cfg.num_directions,):
            raise ValueError(
                f"recorded S_t has shape {tuple(noisy_sum.shape)}, step {cfg.step} uses "
                f"{cfg.num_directions} directions"
            )
        stream = self._stream(cfg, params)
        pool = ScratchPool(params)
        coefs = noisy_sum / float(self._expected_batch_size)  # type: ignore[arg-type]
        self._update(
            entries, cfg.step, pool.buffers(), stream, coefs, list(lrs), list(weight_decays)
        )
        pool.release_all()
        if noise_state is not None:
            noise = NoiseSource()
            noise.load_state_dict(noise_state)
            self._noise = noise
        self._step_count = cfg.step + 1

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Torch's state plus step count, public seed, hyper-parameters and (seeded) noise state.

        With ``noise_seed=None`` no noise state is saved: a resumed run draws fresh OS entropy.
        The accountant is not saved (checkpoint it separately). Scheduled hyper-parameters are
        saved with their value at the current step and listed under ``"scheduled"``; the
        library's own schedules (:class:`~zoprivacy.Stagewise`) are saved whole under
        ``"schedules"``, and the library's masks (:class:`~zoprivacy.MagnitudeMask`,
        :class:`~zoprivacy.RandomMask`, :class:`~zoprivacy.FixedMask`) under
        ``"mask"``. Any other callable (schedule or mask) is not saved: pass the same callable
        when resuming. Format: :mod:`zoprivacy.optim.state`.
        """
        sd = super().state_dict()
        sd[STATE_KEY] = {
            "version": STATE_VERSION,
            "step": self._step_count,
            "seed": self._seed,
            **{name: self._value(name) for name in SCHEDULABLE},
            "expected_batch_size": self._expected_batch_size,
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
                if serialisable(self._spec[name])
            },
            "mask": self._mask.state_dict() if serialisable(self._mask) else None,
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
        zo = saved_entry(sd)
        sd.pop(STATE_KEY)
        current = {
            "spec": self._spec,
            "mask": self._mask,
            "perturbation": self._perturbation,
            "directions": self._directions,
            "difference": self._difference,
            "batched": self._batched,
        }
        restored = read_state(zo, current, [p for p, _ in self._trainable()])
        for group in sd["param_groups"]:
            check_group(group)
        noise = NoiseSource()
        noise.load_state_dict(zo["noise"])
        super().load_state_dict(sd)
        self._step_count, self._seed = restored["step"], restored["seed"]
        self._spec, self._mask = restored["spec"], restored["mask"]
        self._expected_batch_size = restored["expected_batch_size"]
        self._sample_rate, self._noise = restored["sample_rate"], noise
        self._perturbation, self._directions = restored["perturbation"], restored["directions"]
        self._difference, self._batched = restored["difference"], restored["batched"]
        self._paths = self._path_discovery()
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
        zo = saved_entry(state_dict)
        unknown = sorted(set(schedules) - set(SCHEDULABLE))
        if unknown:
            raise TypeError(
                f"from_state_dict got unknown keyword(s) {unknown}: schedules may be given for "
                f"{', '.join(SCHEDULABLE)} only"
            )
        groups = state_dict.get("param_groups") or [{}]
        hyper = {name: schedules.get(name, zo[name]) for name in SCHEDULABLE}
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
        entries = self._trainable()
        params = [p for p, _ in entries]
        cfg = self._resolve_step(entries)
        flags = self._paths.flags(params)
        saved = [p.detach().clone() if f else None for p, f in zip(params, flags, strict=True)]
        pool = ScratchPool(params)
        prober = Prober(params, self._stream(cfg, params), cfg.perturbation_scale, flags, pool)
        devices = sorted({p.device for p in params if p.device.type == "cuda"}, key=str)
        rng = capture_rng(devices)
        try:
            for sign in (0, +1, -1):
                restore_rng(rng, devices)
                point = where(0, sign)
                prober.evaluate(lambda p=point: evaluate(lambda: losses(batch), p, size), 0, sign)
        finally:
            prober.restore()
            for p, copy in zip(params, saved, strict=True):
                if copy is not None:
                    p.copy_(copy)
            pool.release_all()
        check_per_sample(losses, batch)

    # ------------------------------------------------------------------ public configuration
    def config_fingerprint(self) -> bytes:
        """An 8-byte digest of the public configuration of the next step.

        It covers what makes two optimizers take the same step on the same data: K, c, σ, φ, b,
        q, the public seed, the step count, whether the step is private, every trainable
        tensor's η, weight decay, shape and dtype, the perturbation path, directions, difference
        and batching, and a description of the schedules and the mask. Data-parallel ranks
        compare it (:class:`~zoprivacy.distributed.DataParallel`). It holds no data.
        """
        entries = self._trainable()
        return self._fingerprint(resolve_step(self._spec, self._step_count, entries, None))

    def _fingerprint(self, cfg: StepConfig) -> bytes:
        params = [p for p, _ in self._trainable()]
        items = (
            cfg.num_directions,
            cfg.clip_norm,
            cfg.noise_multiplier,
            self._expected_batch_size,
            cfg.perturbation_scale,
            self._sample_rate,
            self._seed,
            cfg.step,
            cfg.noisy and not self._noise.reproducible,
            list(zip(cfg.lrs, cfg.weight_decays, strict=True)),
            [(tuple(p.shape), str(p.dtype)) for p in params],
            self._perturbation,
            self._directions,
            self._difference,
            self._batched,
            describe(self._mask),
            tuple((name, describe(self._spec[name])) for name in self.scheduled),
        )
        return hashlib.blake2b(repr(items).encode(), digest_size=8).digest()

    def _warn_if_not_private(self) -> None:
        if self._spec["clip_norm"] is None:
            msg = "clip_norm=None and noise_multiplier=0: this is non-private MeZO"
        elif resolve(self._spec["noise_multiplier"], 0) == 0:
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


# ---------------------------------------------------------------------- argument checks
def _check_spec(num_directions: Any, clip_norm: Any, noise_multiplier: Any, phi: Any) -> dict:
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


def _check_batched(batched: Any, perturbation: str) -> int | None:
    if batched is None:
        return None
    batched = checks.integer("batched_directions", batched, minimum=1)
    if perturbation == "inplace":
        raise ValueError(
            "batched_directions evaluates stacked perturbed copies through the "
            "substitution path; it cannot be combined with perturbation='inplace'"
        )
    return batched


def _check_mode(spec: dict, b: float | None, accountant: Any, q: float | None) -> None:
    """DP, clipped-noiseless or MeZO: the combinations that make sense (class docstring)."""
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


def _check_closure_argument(closure: object) -> None:
    if closure is None:
        raise ValueError(
            "DPAggZO.step needs a closure returning the per-record losses (shape [|B|]) of "
            "the current batch, evaluated without backward(): opt.step(lambda: losses(model))"
        )
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")
