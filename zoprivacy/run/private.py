"""One-call setup of a private DP-AggZO run: :func:`make_private` (Algorithm 1, lines 1-4).

It calibrates σ and ψ for the target (ε, δ) (Lemma 5), releases the noisy dataset size ñ once
(line 1), fixes the public expected batch size b = q·ñ (line 2), and builds the Poisson loader
(line 4), an :class:`~zoprivacy.accounting.RDPAccountant` with the budget guard, and the optimizer
that charges it at every step. :class:`PrivateTraining` bundles them and checkpoints all of it
(parameters, optimizer, accountant, ñ) atomically, so a resumed run never re-spends the size
release or re-counts a step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoprivacy import checks as check
from zoprivacy.accounting import PrivacyPlan, RDPAccountant, calibrate
from zoprivacy.data.poisson import poisson_loader, release_size
from zoprivacy.distributed import distributed_poisson_loader, is_root, release_size_distributed
from zoprivacy.optim.optimizer import DPAggZO
from zoprivacy.run.journal import (
    JournalError,
    Recovery,
    StepJournal,
    journal_for_resume,
    params_digest,
    plan_recovery,
    recover,
)

_FORMAT = "zoprivacy.PrivateTraining/1"


@dataclasses.dataclass
class PrivateTraining:
    """Everything a private run needs, returned by :func:`make_private`.

    Attributes:
        optimizer: the :class:`DPAggZO` optimizer; it charges ``accountant`` at every step.
        loader: Poisson batches (rate ``sample_rate``), ``steps - steps_done`` of them.
        accountant: the RDP accountant with budget (ε, δ); it already holds the size release.
        plan: the calibration (σ, ψ, target ε, δ, q, T).
        noisy_dataset_size: ñ, released once (public from then on).
        sample_rate: q.
        expected_batch_size: b = q·ñ, the public normaliser of the update.
        params: the trainable parameters, in the optimizer's order (for checkpoints).
        process_group: the data-parallel group, or None (one process).
        journal: the write-ahead :class:`~zoprivacy.run.journal.StepJournal`, or None.
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
    recovery: Recovery | None = None

    @property
    def steps_done(self) -> int:
        return self.optimizer.steps_taken

    @property
    def steps_left(self) -> int:
        """Planned steps not taken yet, capped by what the budget still allows (abandoned
        steps charged on a resume can leave room for fewer than planned)."""
        left = self.plan.steps - self.steps_done
        sigma = self.optimizer.noise_multiplier
        allowed = None
        if isinstance(sigma, float) and sigma > 0:
            allowed = self.accountant.steps_allowed(
                noise_multiplier=sigma, sample_rate=self.sample_rate
            )
        return max(0, left if allowed is None else min(left, allowed))

    def epsilon_spent(self, delta: float | None = None) -> float:
        """ε spent so far (size release + steps taken) at ``delta`` (default: the plan's δ)."""
        return self.accountant.get_epsilon(self.plan.delta if delta is None else delta)

    def state_dict(self) -> dict[str, Any]:
        """Parameters, optimizer, accountant, ñ and the plan: all a resume needs."""
        return {
            "format": _FORMAT,
            "params": [p.detach().cpu().clone() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "accountant": self.accountant.state_dict(),
            "noisy_dataset_size": self.noisy_dataset_size,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.expected_batch_size,
            "plan": dataclasses.asdict(self.plan),
            "sampler": _sampler_state(self.loader),
            "journal": None
            if self.journal is None
            else {"run": self.journal.run_id, "records": self.journal.records},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`state_dict` atomically (temporary file, fsync, rename): a crash while
        saving leaves the previous checkpoint intact, never a truncated one.

        Data parallel: only group rank 0 writes (every rank holds the same state, and the
        checkpoint has nothing specific to the world size); other ranks return ``path``."""
        if not is_root(self.process_group):
            return Path(path)
        return atomic_save(self.state_dict(), path)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
    journal: str | os.PathLike | None = None,
    process_group: Any = None,
    perturbation: str = "auto",
    directions: str = "gaussian",
    difference: str = "central",
    mask: Callable[[int, int, torch.Tensor], torch.Tensor | None] | None = None,
    batched_directions: int | None = None,
    **loader_kwargs: Any,
) -> PrivateTraining:
    """Set up a private DP-AggZO run on ``dataset`` that is (target ε, target δ)-DP after ``steps``.

    Order of operations (nothing touches the data before the size release is charged):

    1. ψ = 1/(size_fraction·ε) (paper: 5% of ε as pure DP for the size release);
    2. ñ = max(1, n + Lap(ψ)) from OS entropy, charged once to the accountant (line 1);
    3. q = ``sample_rate``, or q = min(1, ``expected_batch_size``/ñ) (post-processing of ñ);
    4. σ = the smallest noise multiplier with Lemma 5's composed guarantee <= ε (:func:`calibrate`);
    5. b = q·ñ (line 2); the optimizer normalises by b, never by the private |B|.

    With ``size_fraction=0`` the dataset size n is treated as public (no release; b = q·n).

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
        perturbation, directions, difference, mask, batched_directions: the speed and DP-ZOPO
            options of :class:`DPAggZO`, passed to it. On resume the checkpoint's values win (as
            for the constants above); a schedule or mask passed with ``checkpoint`` is checked
            against the checkpoint's (library schedules and masks are saved in it and restored
            when none is passed; any other callable must be passed again).
        expected_batch_size, sample_rate: exactly one of them.
        collate_fn, sampling_generator, loader_kwargs: passed to :func:`poisson_loader`
            (``sampling_generator=None`` draws batches from OS entropy).
        checkpoint: a path or state from :meth:`PrivateTraining.save` to resume from: nothing is
            re-released, the accountant and optimizer continue, and the loader yields the steps
            left.
        journal: path of a write-ahead journal (:mod:`~zoprivacy.run.journal`; recommended for any
            run that checkpoints less often than every step). Every step is recorded on disk before
            it touches data, and its release S_t before its update, so a resume (from
            ``checkpoint``, or from scratch with the same initial model if the run died before its
            first checkpoint) replays the steps that ran after the checkpoint instead of releasing
            them again, reuses the recorded ñ, and charges a step that died mid-way as spent. A
            resumed run that had a journal must be given it again.
        process_group: None (one process) or a ``torch.distributed`` process group, to run data
            parallel (e.g. under ``torchrun``): every rank passes the same model weights and the
            *whole* dataset; group rank 0 alone releases ñ and broadcasts it (every rank's
            accountant is charged identically, so the budget guard fires on every rank at the
            same step); every rank gets the same σ and b; the loader yields this rank's part of
            each Poisson batch (:class:`~zoprivacy.distributed.DistributedPoissonSampler`); only
            rank 0 writes checkpoints, which resume on any world size.

    Raises:
        ValueError: bad arguments (named), or a target that cannot be reached.
        PrivacyBudgetExceeded: (later, from ``optimizer.step``) on a step beyond the budget.
    """
    params = _trainable(model_or_params)
    n = len(dataset)
    if journal is not None and process_group is not None:
        raise ValueError(
            "journal= is not supported with process_group yet: checkpoint every step instead"
        )
    if checkpoint is not None:
        return _resume(
            params,
            dataset,
            checkpoint,
            collate_fn,
            sampling_generator,
            loader_kwargs,
            process_group,
            journal,
            {
                **{
                    name: value
                    for name, value in (
                        ("num_directions", num_directions),
                        ("clip_norm", clip_norm),
                        ("perturbation_scale", perturbation_scale),
                    )
                    if callable(value)
                },
                "mask": mask,
            },
        )
    eps = check.epsilon(target_epsilon, "target_epsilon")
    delta = check.delta(target_delta, "target_delta")
    t = check.steps(steps)
    frac = check.size_fraction(size_fraction)
    if (expected_batch_size is None) == (sample_rate is None):
        raise ValueError(
            "pass exactly one of expected_batch_size (b; then q = b/ñ) or sample_rate (q)"
        )
    if expected_batch_size is not None:
        b_wanted = check.as_real("expected_batch_size", expected_batch_size)
        if not (b_wanted > 0 and math.isfinite(b_wanted)):
            raise ValueError(f"expected_batch_size must be a finite number > 0, got {b_wanted}")
    else:
        q = check.sample_rate(sample_rate)
    if n == 0:
        raise ValueError("dataset is empty: there is nothing to fine-tune on")

    accountant_orders = None
    psi = None if frac == 0.0 else 1.0 / (frac * eps)
    # The size release is charged to an unbudgeted accountant first: the budget is attached once
    # the calibration (which spends the rest of ε on the steps) is known.
    accountant = RDPAccountant()
    log, recorded = _open_fresh_journal(journal, params)
    reopened = log is not None and log.records > 1  # a run that died before its first checkpoint
    if recorded is not None:  # the run died before its first checkpoint: reuse its ñ
        noisy_n, recorded_psi = recorded
        if psi is None or recorded_psi != psi:
            raise JournalError(
                f"the journal's size release used laplace_scale={recorded_psi}, this call "
                f"{psi}: resume with the same target_epsilon and size_fraction"
            )
        accountant.release_size(psi)
    elif process_group is not None:  # rank 0 releases ñ once, every rank is charged and gets it
        noisy_n = release_size_distributed(
            n, psi, accountant=accountant, process_group=process_group
        )
    elif psi is not None:
        noisy_n = release_size(n, psi, accountant=accountant)
        if log is not None:
            log.size(noisy_n, psi)
    else:
        noisy_n = float(n)
    if expected_batch_size is not None:
        q = min(1.0, b_wanted / noisy_n)
    plan = calibrate(epsilon=eps, delta=delta, sample_rate=q, steps=t, size_fraction=frac)
    accountant_orders = plan.orders
    budgeted = RDPAccountant(orders=accountant_orders, budget=(eps, delta))
    budgeted.load_state_dict(
        {**accountant.state_dict(), "orders": list(accountant_orders), "budget": [eps, delta]}
    )
    b = q * noisy_n
    optimizer = DPAggZO(
        params,
        lr,
        num_directions=num_directions,
        clip_norm=clip_norm,
        noise_multiplier=plan.noise_multiplier,
        expected_batch_size=b,
        perturbation_scale=perturbation_scale,
        seed=seed,
        noise_seed=noise_seed,
        weight_decay=weight_decay,
        accountant=budgeted,
        sample_rate=q,
        process_group=process_group,
        perturbation=perturbation,
        directions=directions,
        difference=difference,
        mask=mask,
        batched_directions=batched_directions,
    )
    recovery = None
    if log is not None:
        if reopened:  # replay what ran before the crash
            recovery = recover(optimizer, log, 2 if recorded is not None else 1)
        optimizer.attach_journal(log)
    training = PrivateTraining(
        optimizer,
        None,
        budgeted,
        plan,
        noisy_n,
        q,
        b,
        _flat(optimizer),
        process_group,
        log,
        recovery,
    )
    return _with_loader(
        training, dataset, collate_fn, sampling_generator, loader_kwargs, sampler_state=None
    )


def _with_loader(training, dataset, collate_fn, generator, loader_kwargs, *, sampler_state):
    """Attach the Poisson loader for the steps left (from the step count on) and say whether a
    resume charged abandoned steps."""
    training.loader = _loader(
        dataset,
        training.sample_rate,
        training.steps_left,
        collate_fn,
        generator,
        training.process_group,
        loader_kwargs,
        position=training.optimizer.steps_taken,
        state=sampler_state,
    )
    _warn_abandoned(training)
    return training


def _open_fresh_journal(
    path: str | os.PathLike | None, params: list[Any]
) -> tuple[StepJournal | None, tuple[float, float] | None]:
    """A new run's journal: created, or (if a run with the same initial parameters died before
    its first checkpoint) reopened, with its recorded size release."""
    if path is None:
        return None, None
    digest = params_digest(_tensors(params))
    if Path(path).exists() and Path(path).stat().st_size > 0:
        log = StepJournal.open(path)
        if log.digest != digest:
            raise JournalError(
                f"journal {path} belongs to a run that started from other parameters: pass that "
                "run's checkpoint=, or use a new journal path for a new run"
            )
        return log, log.size_release()
    return StepJournal.create(path, digest=digest), None


def _tensors(params: list[Any]) -> list[torch.Tensor]:
    flat = [p for p in params if not isinstance(p, dict)] or [
        p for g in params for p in g["params"]
    ]
    return [p for p in flat if p.requires_grad]


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
        stacklevel=3,
    )


class AbandonedStepWarning(UserWarning):
    """A resume found steps that died mid-way; they were charged to the accountant."""


def _sampler_state(loader: Any) -> dict[str, Any] | None:
    sampler = getattr(loader, "batch_sampler", None)
    state = getattr(sampler, "state_dict", None)
    return state() if callable(state) else None


def _loader(
    dataset, q, steps, collate_fn, generator, process_group, loader_kwargs, *, position, state=None
):
    if process_group is None:
        loader = poisson_loader(
            dataset, q, steps=steps, collate_fn=collate_fn, generator=generator, **loader_kwargs
        )
        if state is not None:  # a seeded run continues its batches; OS entropy draws a new key
            loader.batch_sampler.load_state_dict(state, position=position)
        else:
            loader.batch_sampler.position = position
        return loader
    loader = distributed_poisson_loader(
        dataset,
        q,
        steps=steps,
        process_group=process_group,
        collate_fn=collate_fn,
        generator=generator,
        **loader_kwargs,
    )
    # Each rank's stream is keyed by its rank (and, seeded, by the same seed again on resume):
    # continuing at the step count reproduces a seeded run's batches on the same world size.
    local = getattr(loader.batch_sampler, "_local", None)
    if local is not None:
        local.position = position
    return loader


def _flat(optimizer: DPAggZO) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]


def _resume(
    params,
    dataset,
    checkpoint,
    collate_fn,
    generator,
    loader_kwargs,
    process_group,
    journal,
    options=None,  # schedules (callables) and mask passed to make_private, checked on load
):
    options = options or {}
    state = checkpoint
    if not isinstance(state, dict):
        state = torch.load(Path(checkpoint), map_location="cpu", weights_only=False)
    if state.get("format") != _FORMAT:
        raise ValueError(f"checkpoint is not a zoprivacy PrivateTraining checkpoint: {checkpoint}")
    plan_fields = dict(state["plan"])
    plan_fields["orders"] = tuple(plan_fields.get("orders", ()))
    plan = PrivacyPlan(**plan_fields)
    accountant = RDPAccountant()
    accountant.load_state_dict(state["accountant"])
    saved = state["params"]
    trainable = _tensors(params)
    if len(saved) != len(trainable) or any(
        s.shape != p.shape for s, p in zip(saved, trainable, strict=True)
    ):
        raise ValueError(
            "checkpoint parameters do not match the model's trainable parameters (count or "
            "shapes differ): resume with the same model and the same trainable selection"
        )
    log = journal_for_resume(state.get("journal"), journal, saved)  # before any write
    if log is not None and state.get("journal") is not None:  # a bad tail: refuse it now
        plan_recovery(
            log, int(state["journal"]["records"]), int(state["optimizer"]["zoprivacy"]["step"])
        )
    zo = state["optimizer"]["zoprivacy"]
    with torch.no_grad():  # before DPAggZO, which checks the parameters across ranks
        for p, s in zip(trainable, saved, strict=True):
            p.copy_(s.to(device=p.device, dtype=p.dtype))
    optimizer = DPAggZO(
        params,
        float(state["optimizer"]["param_groups"][0]["lr"]),
        num_directions=options.get("num_directions", zo["num_directions"]),
        clip_norm=options.get("clip_norm", zo["clip_norm"]),
        noise_multiplier=zo["noise_multiplier"],
        expected_batch_size=zo["expected_batch_size"],
        perturbation_scale=options.get("perturbation_scale", zo["perturbation_scale"]),
        seed=zo["seed"],
        noise_seed=None,  # the checkpoint decides: OS entropy, or the saved seeded state
        accountant=accountant,
        sample_rate=zo["sample_rate"],
        process_group=process_group,
        # the path, directions, difference and batching are the checkpoint's (load_state_dict);
        # a mask or schedule passed here is verified against the checkpoint's, or kept
        mask=options.get("mask"),
    )
    optimizer.load_state_dict(state["optimizer"])
    recovery = None
    if log is not None:
        info = state.get("journal")
        if info is not None:
            recovery = recover(optimizer, log, int(info["records"]))
        optimizer.attach_journal(log)
    training = PrivateTraining(
        optimizer,
        None,  # type: ignore[arg-type]
        accountant,
        plan,
        state["noisy_dataset_size"],
        state["sample_rate"],
        state["expected_batch_size"],
        _flat(optimizer),
        process_group,
        log,
        recovery,
    )
    return _with_loader(
        training, dataset, collate_fn, generator, loader_kwargs, sampler_state=state.get("sampler")
    )
