"""One-call setup of a private DP-AggZO run: :func:`make_private` (Algorithm 1, lines 1-4).

:func:`~zoprivacy.run.plan.plan_run` releases the noisy dataset size ñ once (line 1), fixes the
public expected batch size b = q·ñ (line 2) and calibrates σ for the target (ε, δ) (Lemma 5);
:func:`make_private` adds the Poisson loader (line 4) and the optimizer that charges the budgeted
accountant at every step. :class:`PrivateTraining` bundles them and checkpoints all of it
(parameters, optimizer, accountant, ñ, the journal's position) atomically. The write-ahead
journal is kept by default (:mod:`~zoprivacy.run.checkpoint`), so a resumed run never re-spends the
size release, never re-releases a step and never leaves one uncharged; a resume that cannot
guarantee this is refused unless the caller opts out explicitly with ``journal=False``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoprivacy import checks as check
from zoprivacy.accounting import PrivacyPlan, RDPAccountant
from zoprivacy.data.poisson import poisson_loader, release_size
from zoprivacy.distributed import distributed_poisson_loader, is_root, release_size_distributed
from zoprivacy.optim.optimizer import DPAggZO
from zoprivacy.run.checkpoint import (
    DATA_PARALLEL,
    FORMAT,
    OPT_OUT,
    UnjournaledResumeWarning,
    atomic_save,
    checkpoint_journal,
    default_journal_path,
    journal_record,
    load_checkpoint,
    resume_journal,
    start_journal,
)
from zoprivacy.run.journal import JournalError, Recovery, StepJournal, recover
from zoprivacy.run.plan import SizeRelease, plan_run

__all__ = [
    "AbandonedStepWarning",
    "PrivateTraining",
    "UnjournaledResumeWarning",
    "atomic_save",
    "make_private",
]

_SCHEDULABLE = ("num_directions", "clip_norm", "perturbation_scale")


@dataclasses.dataclass(kw_only=True)
class PrivateTraining:
    """Everything a private run needs, returned by :func:`make_private`.

    Attributes:
        optimizer: the :class:`DPAggZO` optimizer; it charges ``accountant`` at every step.
        loader: Poisson batches (rate ``sample_rate``), ``steps_left`` of them.
        accountant: the RDP accountant with budget (ε, δ); it already holds the size release.
        plan: the calibration (σ, ψ, target ε, δ, q, T).
        noisy_dataset_size: ñ, released once (public from then on).
        sample_rate: q.
        expected_batch_size: b = q·ñ, the public normaliser of the update.
        params: the trainable parameters, in the optimizer's order (for checkpoints).
        process_group: the data-parallel group, or None (one process).
        journal: the write-ahead :class:`~zoprivacy.run.journal.StepJournal`, or None (not
            started yet: ``journal=None`` starts it at the first :meth:`save`; or none kept).
        unjournaled: why the run keeps no journal (``"journal=False"`` or ``"process_group"``),
            or None; its checkpoints say so, and resuming them needs ``journal=False``.
        recovery: on a resume with a journal, what was replayed and what was charged as
            abandoned (:class:`~zoprivacy.run.journal.Recovery`); None otherwise.
    """

    optimizer: DPAggZO
    loader: torch.utils.data.DataLoader
    accountant: RDPAccountant
    plan: PrivacyPlan
    noisy_dataset_size: float
    sample_rate: float
    expected_batch_size: float
    params: list[torch.Tensor]
    process_group: Any = None
    journal: StepJournal | None = None
    unjournaled: str | None = None
    recovery: Recovery | None = None

    @property
    def steps_done(self) -> int:
        return self.optimizer.steps_taken

    @property
    def steps_left(self) -> int:
        """Planned steps not taken yet, capped by what the budget still allows (abandoned
        steps charged on a resume can leave room for fewer than planned)."""
        return _steps_left(self.optimizer, self.plan, self.accountant, self.sample_rate)

    def epsilon_spent(self, delta: float | None = None) -> float:
        """ε spent so far (size release + steps taken) at ``delta`` (default: the plan's δ)."""
        return self.accountant.get_epsilon(self.plan.delta if delta is None else delta)

    def dry_run(self, losses: Callable[[Any], torch.Tensor], batch: Any) -> None:
        """Check the per-record loss function on a batch you declare public or synthetic, for
        free (:meth:`DPAggZO.check_closure`): shape [|B|], finite values at θ and θ ± φz, and
        records independent of each other. Nothing is charged, journaled or released, and the
        parameters and the step count do not change. Never pass private records: it reads them.
        """
        self.optimizer.check_closure(losses, batch)

    def state_dict(self) -> dict[str, Any]:
        """Parameters, optimizer, accountant, ñ, the plan and the journal: all a resume needs."""
        return {
            "format": FORMAT,
            "params": [p.detach().cpu().clone() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "accountant": self.accountant.state_dict(),
            "noisy_dataset_size": self.noisy_dataset_size,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.expected_batch_size,
            "plan": dataclasses.asdict(self.plan),
            "sampler": _sampler_state(self.loader),
            "journal": journal_record(self.journal, self.unjournaled),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`state_dict` atomically (temporary file, fsync, rename): a crash while
        saving leaves the previous checkpoint intact, never a truncated one.

        The first save of a run that keeps a journal but has none yet (``journal=None``)
        starts it at ``<path>.journal`` (refused if that file holds another run's journal), so
        every step after the first checkpoint is journaled; the checkpoint records the
        journal's absolute path, run id and position.

        Data parallel: only group rank 0 writes (every rank holds the same state, and the
        checkpoint has nothing specific to the world size); other ranks return ``path``."""
        if not is_root(self.process_group):
            return Path(path)
        if self.journal is None and self.unjournaled is None:
            self.journal = checkpoint_journal(default_journal_path(path), self.params)
            self.optimizer.attach_journal(self.journal)
        return atomic_save(self.state_dict(), path)


#: make_private's arguments that are passed to :class:`DPAggZO` unchanged.
_OPTIMIZER_OPTIONS = frozenset(
    {
        "lr", "num_directions", "clip_norm", "perturbation_scale", "seed", "noise_seed",
        "weight_decay", "process_group", "perturbation", "directions", "direction_rank",
        "direction_refresh", "direction_buffer", "difference", "mask", "batched_directions",
    }
)  # fmt: skip


class AbandonedStepWarning(UserWarning):
    """A resume found steps that died mid-way; they were charged to the accountant."""


def make_private(
    model_or_params: nn.Module | Iterable[Any],
    dataset: Any,
    *,
    target_epsilon: float,
    target_delta: float,
    steps: int,
    num_directions: int | Callable[[int], int],
    clip_norm: float | Callable[[int], float],
    lr: float,
    expected_batch_size: float | None = None,
    sample_rate: float | None = None,
    perturbation_scale: float | Callable[[int], float] = 1e-3,
    size_fraction: float = 0.05,
    weight_decay: float = 0.0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    seed: int | None = None,
    noise_seed: int | None = None,
    sampling_generator: Any = None,
    checkpoint: str | os.PathLike | dict[str, Any] | None = None,
    journal: str | os.PathLike | bool | None = None,
    resume: bool = False,
    process_group: Any = None,
    perturbation: str = "auto",
    directions: str = "gaussian",
    direction_rank: int | None = None,
    direction_refresh: int | None = None,
    direction_buffer: bool = False,
    difference: str = "central",
    mask: Callable[[int, int, torch.Tensor], torch.Tensor | None] | None = None,
    batched_directions: int | None = None,
    **loader_kwargs: Any,
) -> PrivateTraining:
    """Set up a private DP-AggZO run on ``dataset`` that is (target ε, target δ)-DP after ``steps``.

    Order of operations (:func:`~zoprivacy.run.plan.plan_run`; nothing touches the data before
    the size release is charged):

    1. ψ = 1/(size_fraction·ε) (paper: 5% of ε as pure DP for the size release);
    2. ñ = max(1, n + Lap(ψ)) from OS entropy, charged once to the accountant (line 1);
    3. q = ``sample_rate``, or q = min(1, ``expected_batch_size``/ñ) (post-processing of ñ);
    4. σ = the smallest noise multiplier with Lemma 5's composed guarantee <= ε (:func:`calibrate`);
    5. b = q·ñ (line 2); the optimizer normalises by b, never by the private |B|.

    With ``size_fraction=0`` the dataset size n is treated as public (no release; b = q·n).

    Crash safety (:mod:`~zoprivacy.run.checkpoint`, :mod:`~zoprivacy.run.journal`): a journal
    records every step on disk before it touches data and its release S_t before its update, so
    a resume replays the steps that ran after its checkpoint (post-processing; no data is read),
    charges a step that died mid-way as spent, and releases nothing twice. No resume under-counts:
    one from a checkpoint without a usable journal is refused unless ``journal=False`` is passed.

    Args:
        model_or_params: a module (its ``requires_grad`` parameters are trained) or an iterable of
            tensors / param-group dicts.
        dataset: a map-style dataset (``len`` and ``__getitem__``), e.g. a torch ``Dataset`` or a
            Hugging Face ``datasets.Dataset``.
        target_epsilon, target_delta: the budget (ε > 0, δ in (0, 1)).
        steps: number of steps T.
        num_directions, clip_norm, lr, perturbation_scale, weight_decay, seed, noise_seed: passed
            to :class:`DPAggZO`; ``num_directions``, ``clip_norm`` and ``perturbation_scale`` may
            be schedules (DP-ZOSO, e.g. :class:`~zoprivacy.Stagewise`). σ is the
            calibrated constant (the calibration assumes one σ for every step).
        perturbation, directions, direction_rank, direction_refresh, direction_buffer,
        difference, mask, batched_directions: the speed, low-rank and DP-ZOPO
            options of :class:`DPAggZO`, passed to it. On resume the checkpoint's values win (as
            for the constants above); a schedule or mask passed with ``checkpoint`` is checked
            against the checkpoint's (library schedules and masks are saved in it and restored
            when none is passed; any other callable must be passed again).
        expected_batch_size, sample_rate: exactly one of them.
        collate_fn, sampling_generator, loader_kwargs: passed to :func:`poisson_loader`
            (``sampling_generator=None`` draws batches from OS entropy).
        checkpoint: a path or state from :meth:`PrivateTraining.save` to resume from: nothing is
            re-released, the accountant and optimizer continue, the journal the checkpoint
            records is replayed, and the loader yields the steps left.
        journal: the write-ahead journal.

            * ``None`` (default): started beside the run's first checkpoint
              (``<checkpoint path>.journal``, by the first :meth:`PrivateTraining.save`), so
              every step after a checkpoint is journaled. On resume: the journal the checkpoint
              records (refused if it is missing or if the checkpoint records none).
            * a path: journaled from step 0 (also covers a crash before the first checkpoint).
              On resume: the checkpoint's journal, moved to that path.
            * ``False``: no journal (its checkpoints are marked unjournaled). On resume: resume
              without one, accepting that steps run after the checkpoint may go uncharged and
              be released again (an :class:`UnjournaledResumeWarning` says so); refused if the
              checkpoint's journal exists and records such steps.
        resume: with ``journal=PATH`` and no ``checkpoint``: continue the run recorded in that
            journal if it holds one (it died before its first checkpoint: its ñ is reused and
            its steps replayed). Without ``resume=True`` a journal that holds a run is refused.
        process_group: None (one process) or a ``torch.distributed`` process group, to run data
            parallel (e.g. under ``torchrun``): every rank passes the same model weights and the
            *whole* dataset; group rank 0 alone releases ñ and broadcasts it (every rank's
            accountant is charged identically, so the budget guard fires on every rank at the
            same step); every rank gets the same σ and b; the loader yields this rank's part of
            each Poisson batch (:class:`~zoprivacy.distributed.DistributedPoissonSampler`); only
            rank 0 writes checkpoints, which resume on any world size. Data-parallel runs keep
            no journal (``journal=PATH`` is refused; their checkpoints are marked unjournaled),
            so resuming one needs ``journal=False``.

    Raises:
        ValueError: bad arguments (named), or a target that cannot be reached.
        JournalError: a resume or journal that could under-count or does not match (above).
        PrivacyBudgetExceeded: (later, from ``optimizer.step``) on a step beyond the budget.
    """
    params = _trainable(model_or_params)
    _check_journal_option(journal, process_group)
    loader = dict(collate_fn=collate_fn, generator=sampling_generator)
    loader.update(process_group=process_group, kwargs=loader_kwargs)
    if checkpoint is not None:
        given = zip(_SCHEDULABLE, (num_directions, clip_norm, perturbation_scale), strict=True)
        schedules = {name: value for name, value in given if callable(value)}
        return _resume(params, dataset, checkpoint, journal, process_group, mask, schedules, loader)
    # plan_run checks the rest; these two are named as the caller knows them
    eps = check.epsilon(target_epsilon, "target_epsilon")
    delta = check.delta(target_delta, "target_delta")
    planned = dict(epsilon=eps, delta=delta, steps=steps, size_fraction=size_fraction)
    planned.update(expected_batch_size=expected_batch_size, sample_rate=sample_rate)
    options = {name: value for name, value in locals().items() if name in _OPTIMIZER_OPTIONS}
    return _start(params, dataset, planned, options, journal, resume, loader)


def _check_journal_option(journal: Any, process_group: Any) -> None:
    if process_group is not None and journal not in (None, False):
        raise ValueError(
            "journal=PATH is not supported with process_group: data-parallel runs keep no "
            "journal (pass journal=False, and checkpoint every step)"
        )


def _start(params, dataset, planned, options, journal, resume, loader) -> PrivateTraining:
    """A new run (or one that died before its first checkpoint, from its ``journal=PATH``):
    plan it, build the optimizer, replay what the journal recorded."""
    log, reopened = None, False
    if journal not in (None, False):
        log, reopened = start_journal(journal, _tensors(params), resume=resume)
    recorded = log.size_release() if reopened else None
    if recorded is not None and planned["size_fraction"] == 0:
        raise JournalError("the journal records a size release; this call has size_fraction=0")
    run = plan_run(
        num_records=len(dataset),
        **planned,
        release=_size_release(log, recorded, options["process_group"]),
    )
    optimizer = DPAggZO(
        params,
        noise_multiplier=run.plan.noise_multiplier,
        expected_batch_size=run.expected_batch_size,
        accountant=run.accountant,
        sample_rate=run.sample_rate,
        **options,
    )
    recovery = None
    if reopened:  # replay what ran before the crash (after the header and the size record)
        recovery = recover(optimizer, log, 2 if recorded is not None else 1)
    if log is not None:
        optimizer.attach_journal(log)
    unjournaled = _unjournaled(journal, options["process_group"])
    fields = dict(
        plan=run.plan,
        noisy_dataset_size=run.noisy_dataset_size,
        sample_rate=run.sample_rate,
        expected_batch_size=run.expected_batch_size,
    )
    return _assemble(optimizer, dataset, fields, log, unjournaled, recovery, loader, None)


def _size_release(
    log: StepJournal | None, recorded: tuple[float, float] | None, process_group: Any
) -> SizeRelease:
    """How ñ is released (Algorithm 1, line 1): reused from the journal of a run that died
    before its first checkpoint (charged again to this process's accountant, as it was to the
    dead one's), by rank 0 for every rank (data parallel), or here, recorded in the journal."""

    def release(n: int, psi: float, accountant: RDPAccountant) -> float:
        if recorded is not None:
            noisy_n, recorded_psi = recorded
            if recorded_psi != psi:
                raise JournalError(
                    f"the journal's size release used laplace_scale={recorded_psi}, this call "
                    f"{psi}: resume with the same target_epsilon and size_fraction"
                )
            accountant.release_size(psi)
            return noisy_n
        if process_group is not None:
            return release_size_distributed(
                n, psi, accountant=accountant, process_group=process_group
            )
        noisy_n = release_size(n, psi, accountant=accountant)
        if log is not None:
            log.size(noisy_n, psi)
        return noisy_n

    return release


def _unjournaled(journal: Any, process_group: Any) -> str | None:
    if process_group is not None:
        return DATA_PARALLEL
    return OPT_OUT if journal is False else None


def _resume(params, dataset, checkpoint, journal, process_group, mask, schedules, loader):
    """Continue a run from its checkpoint: optimizer and accountant restored, the checkpoint's
    journal replayed (:func:`~zoprivacy.run.checkpoint.resume_journal` decides which, and
    refuses any resume that could under-count before the model changes)."""
    state = load_checkpoint(checkpoint)
    saved, trainable = state["params"], _tensors(params)
    if len(saved) != len(trainable) or any(
        s.shape != p.shape for s, p in zip(saved, trainable, strict=True)
    ):
        raise ValueError(
            "checkpoint parameters do not match the model's trainable parameters (count or "
            "shapes differ): resume with the same model and the same trainable selection"
        )
    accountant = RDPAccountant()
    accountant.load_state_dict(state["accountant"])
    if process_group is not None:  # the data-parallel build checks the parameters across ranks
        _load_params(trainable, saved)
    optimizer = DPAggZO.from_state_dict(
        params,
        state["optimizer"],
        accountant=accountant,
        process_group=process_group,
        mask=mask,
        **schedules,
    )
    info = state.get("journal")
    log = resume_journal(info, journal, step=optimizer.steps_taken, process_group=process_group)
    _load_params(trainable, saved)
    recovery = None
    if log is not None:
        recovery = recover(optimizer, log, int(info["records"]))
        optimizer.attach_journal(log)
    plan_fields = dict(state["plan"])
    plan_fields["orders"] = tuple(plan_fields.get("orders", ()))
    fields = dict(
        plan=PrivacyPlan(**plan_fields),
        noisy_dataset_size=state["noisy_dataset_size"],
        sample_rate=state["sample_rate"],
        expected_batch_size=state["expected_batch_size"],
    )
    unjournaled = _unjournaled(journal, process_group)
    sampler = state.get("sampler")
    return _assemble(optimizer, dataset, fields, log, unjournaled, recovery, loader, sampler)


def _assemble(optimizer, dataset, fields, log, unjournaled, recovery, loader, sampler_state):
    """The :class:`PrivateTraining` with its Poisson loader for the steps left (from the step
    count on); warns if a resume charged abandoned steps."""
    left = _steps_left(optimizer, fields["plan"], optimizer.accountant, fields["sample_rate"])
    position = optimizer.steps_taken
    training = PrivateTraining(
        optimizer=optimizer,
        loader=_loader(dataset, fields["sample_rate"], left, loader, position, sampler_state),
        accountant=optimizer.accountant,
        params=_flat(optimizer),
        process_group=loader["process_group"],
        journal=log,
        unjournaled=unjournaled,
        recovery=recovery,
        **fields,
    )
    _warn_abandoned(training)
    return training


def _steps_left(optimizer: DPAggZO, plan: PrivacyPlan, accountant: Any, q: float) -> int:
    left = plan.steps - optimizer.steps_taken
    sigma = optimizer.noise_multiplier
    if isinstance(sigma, float) and sigma > 0:
        left = min(left, accountant.steps_allowed(noise_multiplier=sigma, sample_rate=q))
    return max(0, left)


def _trainable(model_or_params: nn.Module | Iterable[Any]) -> list[Any]:
    if isinstance(model_or_params, nn.Module):
        params = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        params = list(model_or_params)
    if not params:
        raise ValueError(
            "model_or_params has no trainable parameter: set requires_grad=True on the tensors "
            "to fine-tune (e.g. the head and the last layers)"
        )
    return params


def _tensors(params: list[Any]) -> list[torch.Tensor]:
    flat = [p for p in params if not isinstance(p, dict)] or [
        p for g in params for p in g["params"]
    ]
    return [p for p in flat if p.requires_grad]


def _flat(optimizer: DPAggZO) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]


@torch.no_grad()
def _load_params(trainable: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    for p, s in zip(trainable, saved, strict=True):
        p.copy_(s.to(device=p.device, dtype=p.dtype))


def _warn_abandoned(training: PrivateTraining) -> None:
    rec = training.recovery
    if rec is None or rec.abandoned == 0:
        return
    planned = training.plan.steps - training.steps_done
    warnings.warn(
        f"the journal shows {rec.abandoned} step(s) that died mid-way (steps "
        f"{list(rec.abandoned_steps)}); they read data, so each was charged as spent "
        f"(ε now {training.epsilon_spent():.4g}). The budget allows {training.steps_left} of the "
        f"{planned} planned steps left.",
        AbandonedStepWarning,
        stacklevel=5,
    )


def _sampler_state(loader: Any) -> dict[str, Any] | None:
    sampler = getattr(loader, "batch_sampler", None)
    state = getattr(sampler, "state_dict", None)
    return state() if callable(state) else None


def _loader(dataset, q, steps, options, position, state):
    """The Poisson loader (Algorithm 1, line 4) for ``steps`` batches from batch ``position``:
    a seeded run continues its batches (``state``); OS entropy draws a new key."""
    common = dict(steps=steps, collate_fn=options["collate_fn"], generator=options["generator"])
    group = options["process_group"]
    if group is None:
        loader = poisson_loader(dataset, q, **common, **options["kwargs"])
        if state is not None:
            loader.batch_sampler.load_state_dict(state, position=position)
        else:
            loader.batch_sampler.position = position
        return loader
    loader = distributed_poisson_loader(
        dataset, q, process_group=group, **common, **options["kwargs"]
    )
    # Each rank's stream is keyed by its rank (and, seeded, by the same seed again on resume):
    # continuing at the step count reproduces a seeded run's batches on the same world size.
    local = getattr(loader.batch_sampler, "_local", None)
    if local is not None:
        local.position = position
    return loader
