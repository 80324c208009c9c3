"""The DP-AggZO optimizer (Bao et al., USENIX Security 2025, Algorithm 1).

:class:`DPAggZO` implements lines 5-16 of Algorithm 1 for one step by calling the pure functions
of :mod:`zoprivacy.optim.algorithm`; the class keeps the state (step count, public seed, noise
source, path discovery), the validation and the checkpoints (:mod:`zoprivacy.optim.state`).
Lines 1-2 (the noisy dataset size ñ and b = q·ñ) and line 4 (Poisson sampling) belong to the
caller, who passes b as ``expected_batch_size`` and samples the batch inside the closure's data.
The presets :class:`~zoprivacy.DPZO` (K = 1) and :class:`~zoprivacy.MeZO` (no clipping, no
noise) live in :mod:`zoprivacy.optim.presets`. The DP-ZOSO (stage-wise schedules,
:mod:`zoprivacy.optim.schedules`) and DP-ZOPO (pruned coordinate subsets,
:mod:`zoprivacy.optim.masks`) variants are options of the same class.
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
from zoprivacy.optim.closure import check_closure_argument, dry_run, explain_bad_output
from zoprivacy.optim.config import (
    SCHEDULABLE,
    StepConfig,
    check_batched,
    check_flag,
    check_group,
    check_mode,
    check_public_values,
    check_spec,
    resolve,
    resolve_step,
)
from zoprivacy.optim.directions import (
    DIRECTION_STREAM,
    DirectionOptions,
    DirectionStream,
    check_direction_options,
    draw_public_seed,
)
from zoprivacy.optim.perturb import (
    PathDiscovery,
    Prober,
    ScratchPool,
    check_perturbation,
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

__all__ = ["DIFFERENCES", "DPAggZO", "NotPrivateWarning"]

Closure = Callable[[], torch.Tensor]
Mask = Callable[[int, int, torch.Tensor], torch.Tensor | None]


class NotPrivateWarning(UserWarning):
    """The optimizer is configured so that its steps are not differentially private."""


class DPAggZO(torch.optim.Optimizer):
    """Differentially private zeroth-order optimizer with K aggregated directions (DP-AggZO).

    One :meth:`step` is Algorithm 1, lines 5-16: for k < K evaluate the closure at θ ± φz_k and
    form Δ_k(x) = (L+(x) − L−(x)) / (2φ) (lines 5-10); Δ_agg(x) = (1/K)(Δ_1(x), …, Δ_K(x))
    (line 12); clip every record's Δ_agg(x) to L2 norm c (line 13); release
    S = Σ_x Δ̂_agg(x) + v, v ~ N(0, σ²c² I_K), the only data-dependent release (line 15); update
    θ ← θ − (η/b) Σ_k S_k z_k (line 16). Decoupled weight decay (θ ← θ − η·wd·θ) is applied once
    per step before the update. Only tensors with ``requires_grad=True`` are touched.

    Modes: DP (``clip_norm`` c and ``noise_multiplier`` σ > 0; normalised by the public
    ``expected_batch_size`` b, never by the private |B|; an empty batch still releases S = v);
    clipped but noiseless (σ = 0); MeZO (``clip_norm=None``, σ = 0: normalised by the actual
    |B|). The last two are not private and warn with :class:`NotPrivateWarning`.

    Closure contract: ``closure()`` returns the per-record losses of the current batch, a 1-D
    floating tensor of shape [|B|] (|B| may be 0). It is called 2K times per step (K + 1 with
    forward differences) under ``torch.no_grad()``, must not call ``backward()`` or modify the
    parameters, and must see the same batch every time. The torch RNG is reset between the two
    evaluations of a direction (dropout sees the same randomness at θ ± φz_k); ``model.eval()``
    is still recommended. Check a closure for free with :meth:`check_closure`.

    Privacy of the returned :class:`~zoprivacy.StepStats`: only ``noisy_sum`` is released under
    DP; ``batch_size``, ``loss`` and the clipping diagnostics are private and must not be
    published. Noise comes from :class:`~zoprivacy.noise.NoiseSource`, never from ``seed``. An
    ``accountant`` is charged at the very start of :meth:`step`, before the closure runs, so a
    step beyond the budget raises with nothing touched. A closure that raises or returns bad
    output leaves the parameters as they were and releases nothing.

    The directions are public (functions of ``seed``, the step and k, never of the data), so
    their distribution does not enter the privacy analysis: whatever the kind, Δ_agg(x) is a
    K-vector computed from record x alone and clipped to L2 norm c, so adding or removing one
    record changes Σ_x Δ̂_agg(x) by at most c in L2, S is the same Poisson-subsampled Gaussian
    mechanism with noise multiplier σ, and the update is post-processing of S and the public
    directions. Low-rank directions change only the estimator, not the release or its accounting.

    Args:
        params: iterable of tensors or of param-group dicts (``lr``, ``weight_decay`` per group).
        lr: learning rate η (≥ 0).
        num_directions: K ≥ 1 (K = 1 is DPZO), or a schedule ``f(step) -> int`` (DP-ZOSO,
            :mod:`~zoprivacy.optim.schedules`; the same holds for c, σ and φ).
        clip_norm: c > 0 (or a schedule), or None for MeZO mode (then σ must be 0).
        noise_multiplier: σ ≥ 0 (or a schedule); the noise std per coordinate is σ·c.
        expected_batch_size: b = q·ñ > 0, the public normaliser (required unless MeZO mode).
        perturbation_scale: φ > 0 (or a schedule).
        seed: public seed of the directions (int ≥ 0); None draws one from OS entropy.
        noise_seed: None (OS entropy, private) or an int (reproducible noise, NOT private).
        weight_decay: decoupled weight decay (≥ 0).
        accountant: object with ``step(noise_multiplier=..., sample_rate=..., steps=1)``.
        sample_rate: q ∈ (0, 1], required with ``accountant``.
        process_group: None or a ``torch.distributed`` process group (or a
            :class:`~zoprivacy.distributed.DataParallel`): data-parallel steps, each rank's
            closure returning its own records' losses (:mod:`zoprivacy.distributed`).
        perturbation: how θ ± φz_k is evaluated (:mod:`~zoprivacy.optim.perturb`): ``"auto"``
            (default: zero drift, parameters never written during the probe), ``"hooks"`` or
            ``"inplace"`` (θ written and restored by arithmetic, as in the paper).
        directions: ``"gaussian"`` (default, as in the paper), ``"rademacher"`` (uniform ±1,
            cheaper to generate) or ``"lowrank"`` (LOZO: z = U Vᵀ/√r for every weight matrix,
            Gaussian slices for the other tensors); all have E[z zᵀ] = I
            (:mod:`~zoprivacy.optim.directions`, :func:`~zoprivacy.optim.directions.
            lowrank_factors` for the scaling and the memory, K·r(m + n) values per matrix).
        direction_rank: r ≥ 1 of ``directions="lowrank"`` (default 2).
        direction_refresh: ν ≥ 1 of ``directions="lowrank"``: V is redrawn every ν steps and U
            at every step (LOZO's lazy sampling; default 1).
        direction_buffer: keep the current direction's slices (Gaussian, Rademacher) so each
            z_k is generated once for both probes: 2K generations per central step (1 when
            K = 1) instead of 3K, for the memory of one copy of the trainable tensors. The
            values, hence the trajectory, are the same with and without it.
        difference: ``"central"`` (default, 2K evaluations) or ``"forward"``
            (Δ_k = (L(θ+φz_k) − L(θ)) / φ, K + 1 evaluations; same privacy).
        mask: None or a DP-ZOPO mask callable ``(step, index, param) -> bool tensor | None``
            (:mod:`~zoprivacy.optim.masks`): the direction becomes m ⊙ z.
        batched_directions: None or m ≥ 1 directions evaluated per :func:`torch.func.vmap`
            call over 2m stacked perturbed copies of the trainable tensors (small trainable
            sets only; the closure must be vmap-compatible).
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
        direction_rank: int | None = None,
        direction_refresh: int | None = None,
        direction_buffer: bool = False,
    ) -> None:
        defaults = {
            "lr": checks.real("lr", lr, minimum=0.0),
            "weight_decay": checks.real("weight_decay", weight_decay, minimum=0.0),
        }
        spec = check_spec(num_directions, clip_norm, noise_multiplier, perturbation_scale)
        expected_batch_size, sample_rate, seed = check_public_values(
            expected_batch_size, sample_rate, seed, mask
        )
        self._perturbation = check_perturbation(perturbation)
        self._dirs = check_direction_options(directions, direction_rank, direction_refresh)
        self._dirs_given = self._dirs != DirectionOptions()  # checked against a checkpoint's
        self._directions = self._dirs.kind
        self._buffer = check_flag("direction_buffer", direction_buffer)
        self._difference = check_difference(difference)
        self._batched = check_batched(batched_directions, self._perturbation)
        check_mode(spec, expected_batch_size, accountant, sample_rate)
        super().__init__(params, defaults)
        self._require_trainable()
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

    def _require_trainable(self) -> None:
        if not self._trainable():
            raise ValueError(
                "params contains no tensor with requires_grad=True: nothing to optimise. Pass the "
                "trainable parameters (e.g. [p for p in model.parameters() if p.requires_grad])."
            )

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
        """The direction distribution: ``"gaussian"``, ``"rademacher"`` or ``"lowrank"``."""
        return self._directions

    @property
    def direction_rank(self) -> int | None:
        """r of ``directions="lowrank"`` (None for the other kinds)."""
        return self._dirs.rank

    @property
    def direction_refresh(self) -> int | None:
        """ν of ``directions="lowrank"``: V is redrawn every ν steps (None for the other kinds)."""
        return self._dirs.refresh

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
        check_closure_argument(closure)
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
            params,
            seed=self._seed,
            step=cfg.step,
            kind=self._directions,
            masks=cfg.masks,
            rank=self._dirs.rank,
            refresh=self._dirs.refresh,
            buffer=self._buffer,
            num_directions=cfg.num_directions,
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
            "direction_rank": self._dirs.rank,
            "direction_refresh": self._dirs.refresh,
            "direction_buffer": self._buffer,
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
            "directions": self._dirs,
            "directions_given": self._dirs_given,
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
        self._perturbation, self._dirs = restored["perturbation"], restored["directions"]
        self._directions = self._dirs.kind
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
            direction_rank=zo.get("direction_rank"),
            direction_refresh=zo.get("direction_refresh"),
            direction_buffer=zo.get("direction_buffer", False),
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
        from zoprivacy.tasks.check import check_per_sample

        if not callable(losses):
            raise TypeError(f"losses must be callable (batch -> Tensor[|B|]), got {losses!r}")
        entries = self._trainable()
        params = [p for p, _ in entries]
        cfg = self._resolve_step(entries)
        stream = self._stream(cfg, params)
        dry_run(losses, batch, params, stream, cfg.perturbation_scale, self._paths.flags(params))
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
            self._dirs,
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


def __getattr__(name: str) -> Any:  # the presets' old home: zoprivacy.optim.optimizer.DPZO/MeZO
    if name in ("DPZO", "MeZO"):
        from zoprivacy.optim import presets

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
