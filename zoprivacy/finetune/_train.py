"""The training back-ends of ``zoprivacy finetune``: one class per family of methods.

Every trainer exposes the same small surface to the job loop:

* ``loader``: the Poisson batches still to run (``steps_total - steps_done`` of them);
* ``step(batch) -> dict``: one step; returns the step's non-private diagnostics;
* ``save(path)``: an atomic checkpoint from which ``resume`` continues exactly;
* ``epsilon_spent()``: ε so far (``None`` for non-private methods);
* ``privacy``: the public facts of the guarantee (σ, ψ, q, b, T, ...), for the report.

Private methods (``dpaggzo``, ``dpzo``, ``dpadamw``) share one accounting: ψ = 1/(0.05·ε) for the
release of ñ = n + Lap(ψ) (once), q = b/ñ, σ from :func:`zoprivacy.accounting.calibrate`, and a
budgeted :class:`~zoprivacy.accounting.RDPAccountant` charged once per step *before* the step
touches its batch, all sequenced by :func:`zoprivacy.run.plan.plan_run`. ``dpaggzo``/``dpzo``
get it through :func:`zoprivacy.make_private`; ``dpadamw`` calls ``plan_run`` itself and puts
Opacus's ``GradSampleModule`` and ``DPOptimizer`` around the plan (Opacus draws the noise:
:data:`NOISE_OPACUS` says exactly how).

The zeroth-order trainers pass the step options (directions, difference, perturbation path,
batched directions, DP-ZOPO mask, DP-ZOSO stages; :mod:`zoprivacy.finetune._options`) to the
optimizer: K, c and φ stages become :class:`~zoprivacy.Stagewise` schedules of the
optimizer (saved in its checkpoint and verified on resume), the learning-rate stages set the
param groups' lr before each step. σ is the calibrated constant of every step.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from zoprivacy import MeZO, make_private
from zoprivacy.accounting import PrivacyPlan, RDPAccountant
from zoprivacy.data.poisson import PredictableSamplingWarning, is_empty_batch, poisson_loader
from zoprivacy.optim.algorithm import clipping_errors
from zoprivacy.optim.optimizer import NotPrivateWarning
from zoprivacy.run.journal import Recovery, StepJournal, charge_unreplayable, journal_for_resume
from zoprivacy.run.plan import plan_run
from zoprivacy.run.private import atomic_save
from zoprivacy.tasks import collate_trimmed

from ._methods import METHODS, PRIVATE_METHODS, TRAINING_METHODS, ZO_METHODS
from ._options import TrainSettings
from ._per_record import per_record_gradients, rows_are_records
from ._setup import Classifier
from ._step_options import build_mask, schedule

__all__ = ["METHODS", "FirstOrderTrainer", "TrainSettings", "ZerothOrderTrainer", "make_trainer"]

SIZE_FRACTION = 0.05  # share of ε spent on releasing ñ (the paper's choice)

_FORMAT = "zoprivacy.finetune/1"

#: How the step noise of the zeroth-order methods is drawn (model card, report.json "noise").
NOISE_ZEROTH_ORDER = (
    "the step noise is an exact discrete Gaussian drawn with integer arithmetic from the OS "
    "CSPRNG (zoprivacy.noise.samplers) and added to the clipped sum rounded to its grid, so the "
    "released values carry no floating-point leak"
)
#: How Opacus (1.x, secure_mode=False) draws DP-AdamW's gradient noise: ``_generate_noise`` in
#: opacus/optimizers/optimizer.py calls ``torch.normal(0, std, size, generator=generator)``; the
#: generator we pass is a CPU ``torch.Generator`` (torch's Mersenne Twister, mt19937) seeded once
#: with ``secrets.randbits(63)``. Its outputs are floats added in floating point.
NOISE_OPACUS = (
    "the gradient noise is Opacus's, in its non-secure mode: float Gaussians from torch.normal "
    "with a torch.Generator, i.e. torch's Mersenne Twister (mt19937, not a cryptographically "
    "secure generator), seeded once with 63 bits from Python's secrets module (OS entropy), and "
    "added in floating point (no protection against floating-point attacks on the noise)"
)


def _diag(
    loss: float,
    clip_fraction: float,
    batch_clip_error: float,
    max_clip_error: float,
    batch_size: int,
) -> dict[str, float]:
    return {
        "loss": loss,
        "clip_fraction": clip_fraction,
        "batch_clip_error": batch_clip_error,
        "max_clip_error": max_clip_error,
        "batch_size": batch_size,
    }


class _Trainer:
    """What both families share: construction, the checkpoint envelope, the privacy facts."""

    private: bool
    sample_rate: float

    def __init__(
        self,
        classifier: Classifier,
        dataset: Any,
        settings: TrainSettings,
        *,
        checkpoint: dict[str, Any] | None = None,
        journal: Any = None,
        resume: bool = False,
    ) -> None:
        self.classifier = classifier
        self.settings = settings
        self.private = settings.method in PRIVATE_METHODS
        self.resume = resume  # continue the run in `journal` (make_private's resume=True)
        self._build(dataset, None if checkpoint is None else checkpoint["training"], journal)

    def _build(self, dataset: Any, state: dict[str, Any] | None, journal: Any) -> None:
        raise NotImplementedError

    def _save(self, training: dict[str, Any], path: Any) -> None:
        atomic_save({"format": _FORMAT, "method": self.settings.method, "training": training}, path)

    @property
    def privacy(self) -> dict[str, Any]:
        """The public facts of the guarantee (σ, ψ, q, b, ñ, c, the noise), for the report."""
        if not self.private:
            return {"private": False, "sample_rate": self.sample_rate}
        return self._privacy_facts()

    def _privacy_facts(self) -> dict[str, Any]:
        raise NotImplementedError


def _copy_params(params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)


# ---------------------------------------------------------------------------------------------
# zeroth-order methods
# ---------------------------------------------------------------------------------------------


class ZerothOrderTrainer(_Trainer):
    """``dpaggzo`` / ``dpzo`` (through :func:`zoprivacy.make_private`) and ``mezo``."""

    def _build(self, dataset: Any, state: dict[str, Any] | None, journal: Any) -> None:
        settings = self.settings
        self.last_stats: Any = None  # the StepStats of the last step (public fields: the path...)
        params = self.classifier.trainable_parameters()
        stages = settings.stages
        k = 1 if settings.method == "dpzo" else settings.directions
        lr = schedule(stages, "lr", settings.lr)
        self.lr_schedule = lr if callable(lr) else None
        options: dict[str, Any] = {  # the step options and the K and φ schedules (DP-ZOSO)
            "num_directions": schedule(stages, "directions", k),
            "perturbation_scale": schedule(
                stages, "perturbation_scale", settings.perturbation_scale
            ),
            "perturbation": settings.perturbation,
            "directions": settings.direction_distribution,
            "direction_rank": settings.direction_rank,
            "direction_refresh": settings.direction_refresh,
            "difference": settings.difference,
            "mask": build_mask(settings.mask, settings.seed),
            "batched_directions": settings.batched_directions,
            "seed": settings.seed,
            "weight_decay": settings.weight_decay,
        }
        if self.private:
            self._make_private(params, dataset, state, journal, options)
        else:
            self._make_mezo(params, dataset, state, options)

    def _make_private(
        self, params: list, dataset: Any, state: Any, journal: Any, options: dict[str, Any]
    ) -> None:
        """DP-AggZO / DPZO through :func:`zoprivacy.make_private` (which calls ``plan_run``)."""
        s = self.settings
        self.run = make_private(
            params,
            dataset,
            target_epsilon=s.epsilon,
            target_delta=s.delta,
            steps=s.steps,
            clip_norm=schedule(s.stages, "clip_norm", s.clip_norm),
            lr=s.lr,
            expected_batch_size=s.batch_size,
            size_fraction=SIZE_FRACTION,
            collate_fn=collate_trimmed,
            checkpoint=state,
            journal=journal,
            resume=self.resume,
            **options,
        )
        self.optimizer = self.run.optimizer
        self.loader = self.run.loader
        self.steps_total = self.run.plan.steps

    def _make_mezo(self, params: list, dataset: Any, state: Any, options: dict[str, Any]) -> None:
        """MeZO: no clipping, no noise, normalised by the actual |B|; n is not private."""
        q = min(1.0, self.settings.batch_size / len(dataset))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotPrivateWarning)
            self.optimizer = MeZO(params, self.settings.lr, **options)
            if state is not None:
                _copy_params(params, state["params"])
                self.optimizer.load_state_dict(state["optimizer"])
        self.steps_total = self.settings.steps
        self.sample_rate = q
        left = self.steps_total - self.optimizer.steps_taken
        self.loader = poisson_loader(dataset, q, steps=max(left, 0), collate_fn=collate_trimmed)

    @property
    def steps_done(self) -> int:
        return self.optimizer.steps_taken

    def step(self, batch: Any) -> dict[str, Any]:
        losses = self.classifier.losses
        lr = None
        if self.lr_schedule is not None:  # DP-ZOSO learning-rate stage of this step
            lr = float(self.lr_schedule(self.optimizer.steps_taken))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        stats = self.optimizer.step(lambda: losses(batch))
        self.last_stats = stats
        diag: dict[str, Any] = _diag(
            stats.loss,
            stats.clip_fraction,
            stats.batch_clip_error,
            stats.max_clip_error,
            stats.batch_size,
        )
        # public facts of the step (what the schedules and the path resolved to)
        diag["num_directions"] = stats.num_directions
        diag["perturbation_path"] = stats.perturbation_path
        if self.settings.stages:
            diag["lr"] = lr if lr is not None else float(self.optimizer.param_groups[0]["lr"])
            diag["perturbation_scale"] = stats.perturbation_scale
            diag["clip_norm"] = stats.clip_norm
        return diag

    def save(self, path: Any) -> None:
        if self.private:
            training = self.run.state_dict()
        else:
            params = self.classifier.trainable_parameters()
            training = {
                "params": [p.detach().cpu().clone() for p in params],
                "optimizer": self.optimizer.state_dict(),
            }
        self._save(training, path)

    def epsilon_spent(self) -> float | None:
        return self.run.epsilon_spent() if self.private else None

    @property
    def accountant(self) -> RDPAccountant | None:
        return self.run.accountant if self.private else None

    def _privacy_facts(self) -> dict[str, Any]:
        run = self.run
        return _facts(
            run.plan,
            run.sample_rate,
            run.expected_batch_size,
            run.noisy_dataset_size,
            self.optimizer.clip_norm,
            # steps that died mid-way (found in the journal on a resume): charged, never applied
            abandoned=run.accountant.steps - self.optimizer.steps_taken,
            noise=NOISE_ZEROTH_ORDER,
        )


# ---------------------------------------------------------------------------------------------
# first-order methods
# ---------------------------------------------------------------------------------------------


class FirstOrderTrainer(_Trainer):
    """``dpadamw`` (Opacus per-sample gradients, our accounting) and non-private ``adamw``.

    With a journal, each DP-AdamW step is recorded (``begin``) before it touches data. Its
    release, a noisy d-dimensional gradient, is too large to record, so on a resume every step
    begun after the checkpoint is charged as spent and run again
    (:func:`zoprivacy.run.journal.charge_unreplayable`).
    """

    def _build(self, dataset: Any, state: dict[str, Any] | None, journal: Any) -> None:
        settings = self.settings
        self.params = self.classifier.trainable_parameters()
        self.module = self.classifier.grad_module()
        if state is not None:
            _copy_params(self.params, state["params"])
        self.steps_total = settings.steps
        self._steps_done = 0 if state is None else int(state["steps_done"])
        adamw = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.journal: StepJournal | None = None
        self.recovery: Recovery | None = None
        if self.private:
            self._setup_private(dataset, adamw, state)
            self._setup_journal(journal, state)
        else:
            n = len(dataset)
            self.sample_rate = min(1.0, settings.batch_size / n)
            self.optimizer = adamw
            self.net = self.module
        if state is not None:
            adamw.load_state_dict(state["optimizer"])
        left = self.steps_total - self._steps_done
        self.loader = poisson_loader(
            dataset, self.sample_rate, steps=max(left, 0), collate_fn=collate_trimmed
        )

    def _setup_private(self, dataset: Any, adamw: torch.optim.Optimizer, state: Any) -> None:
        try:
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer
        except ImportError:
            raise ImportError(
                "--method dpadamw needs Opacus: pip install opacus (or 'zoprivacy[bench]')"
            ) from None
        s = self.settings
        if state is None:  # the one planner: release ñ once, q = b/ñ, σ, budgeted accountant
            run = plan_run(
                num_records=len(dataset),
                epsilon=s.epsilon,
                delta=s.delta,
                steps=s.steps,
                expected_batch_size=s.batch_size,
                size_fraction=SIZE_FRACTION,
            )
            plan, accountant = run.plan, run.accountant
            noisy_n, q = run.noisy_dataset_size, run.sample_rate
        else:
            fields = dict(state["plan"])
            fields["orders"] = tuple(fields.get("orders", ()))
            plan = PrivacyPlan(**fields)
            noisy_n = float(state["noisy_dataset_size"])
            q = float(state["sample_rate"])
            accountant = RDPAccountant()
            accountant.load_state_dict(state["accountant"])
        self.plan = plan
        self.accountant = accountant
        self.noisy_dataset_size = noisy_n
        self.sample_rate = q
        self.expected_batch_size = q * noisy_n
        self.steps_total = plan.steps
        self.net = GradSampleModule(self.module, batch_first=True, loss_reduction="mean")
        # Opacus (secure_mode=False) draws its float Gaussian noise with torch.normal from this
        # generator (opacus/optimizers/optimizer.py, _generate_noise): torch's Mersenne Twister,
        # seeded once with 63 bits from `secrets` (OS entropy), never from the public seed. It is
        # not a CSPRNG (secure_mode would need torchcsprng); NOISE_OPACUS says so in the report.
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.optimizer = DPOptimizer(
            adamw,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=s.clip_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
            generator=generator,
        )

    def _setup_journal(self, path: Any, state: Any) -> None:
        info = None if state is None else state.get("journal")
        self.journal = journal_for_resume(info, path, self.params)
        if info is not None:
            self.recovery = charge_unreplayable(self.accountant, self.journal, int(info["records"]))

    @property
    def steps_done(self) -> int:
        return self._steps_done

    def step(self, batch: Any) -> dict[str, float]:
        if self.private:
            # charged before the batch is touched: a step beyond the budget raises here
            self.accountant.step(
                noise_multiplier=self.plan.noise_multiplier, sample_rate=self.sample_rate
            )
            if self.journal is not None:  # write-ahead, before the data is touched
                self.journal.begin(
                    self._steps_done,
                    noise_multiplier=self.plan.noise_multiplier,
                    sample_rate=self.sample_rate,
                )
        model = self.classifier.model
        model.train()
        try:
            diag = self._private_step(batch) if self.private else self._plain_step(batch)
        finally:
            model.eval()
        self._steps_done += 1
        return diag

    def _forward_losses(self, batch: Any, net: torch.nn.Module | None = None) -> torch.Tensor:
        output = (self.net if net is None else net)(batch)
        losses = getattr(self.classifier, "output_losses", None)  # Classifier: on its device
        if losses is not None:
            return losses(output, batch)
        return F.cross_entropy(output.float(), batch["labels"].long(), reduction="none")

    def _plain_step(self, batch: Any) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        if is_empty_batch(batch):
            return _diag(math.nan, 0.0, 0.0, 0.0, 0)
        losses = self._forward_losses(batch)
        losses.mean().backward()
        self.optimizer.step()
        return _diag(float(losses.detach().mean()), 0.0, 0.0, 0.0, int(losses.numel()))

    def _private_step(self, batch: Any) -> dict[str, float]:
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        if is_empty_batch(batch):
            # An empty Poisson batch is still a step: zero per-sample gradients, noise added.
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            opt.step()
            return _diag(math.nan, 0.0, 0.0, 0.0, 0)
        losses = self._grad_samples(batch)
        # eqs. 26/27 of the per-sample gradients, clipped as Opacus does: min(1, c/(‖g‖ + 1e-6))
        fraction, max_err, batch_err = clipping_errors(
            [p.grad_sample for p in self.params], self.settings.clip_norm, stability=1e-6
        )
        opt.step()
        return _diag(float(losses.detach().mean()), fraction, batch_err, max_err, len(losses))

    def _grad_samples(self, batch: Any) -> torch.Tensor:
        """Set each trainable parameter's ``grad_sample`` (row i: the gradient of record i's loss)
        and return the per-record losses. Opacus's layer hooks give them in one backward pass;
        when a layer's rows are not records (OPT flattens ``[B, T, H]`` to ``[B·T, H]`` before
        its MLP; :mod:`zoprivacy.finetune._per_record`), the hooks are removed for good and every
        step takes one backward pass per record instead."""
        if self.net is not self.module:  # Opacus's hooks are still on
            losses = self._forward_losses(batch)
            with warnings.catch_warnings():
                # cached (frozen) inputs do not require gradients; Opacus's hooks still fire
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses.mean().backward()
            if rows_are_records(self.params, len(losses)):
                return losses
            self.net._close()  # removes the hooks and the token-row grad_samples
            self.net = self.module
            self.optimizer.zero_grad(set_to_none=True)
        losses, samples = per_record_gradients(
            lambda one: self._forward_losses(one, self.module), batch, self.params
        )
        for p, sample in zip(self.params, samples, strict=True):
            p.grad_sample = sample
        return losses

    def save(self, path: Any) -> None:
        adamw = self.optimizer.original_optimizer if self.private else self.optimizer
        training: dict[str, Any] = {
            "params": [p.detach().cpu().clone() for p in self.params],
            "optimizer": adamw.state_dict(),
            "steps_done": self._steps_done,
        }
        if self.private:
            training.update(
                {
                    "accountant": self.accountant.state_dict(),
                    "noisy_dataset_size": self.noisy_dataset_size,
                    "sample_rate": self.sample_rate,
                    "expected_batch_size": self.expected_batch_size,
                    "plan": dataclasses.asdict(self.plan),
                    "journal": None
                    if self.journal is None
                    else {"run": self.journal.run_id, "records": self.journal.records},
                }
            )
        self._save(training, path)

    def epsilon_spent(self) -> float | None:
        return self.accountant.get_epsilon(self.plan.delta) if self.private else None

    def _privacy_facts(self) -> dict[str, Any]:
        return _facts(
            self.plan,
            self.sample_rate,
            self.expected_batch_size,
            self.noisy_dataset_size,
            self.settings.clip_norm,
            abandoned=self.accountant.steps - self._steps_done,
            noise=NOISE_OPACUS,
        )

    def close(self) -> None:
        """Remove Opacus's hooks from the model (evaluation then runs the plain model)."""
        if self.private and self.net is not self.module:
            self.net._close()


def _facts(
    plan: PrivacyPlan,
    q: float,
    b: float,
    noisy_n: float,
    clip_norm: float | None,
    *,
    abandoned: int,
    noise: str,
) -> dict[str, Any]:
    return {
        "private": True,
        "noise_multiplier": plan.noise_multiplier,
        "laplace_scale": plan.laplace_scale,
        "size_fraction": plan.size_fraction,
        "sample_rate": q,
        "expected_batch_size": b,
        "noisy_dataset_size": noisy_n,
        "clip_norm": clip_norm,
        "steps_planned": plan.steps,
        "target_epsilon": plan.target_epsilon,
        "delta": plan.delta,
        "calibrated_epsilon": plan.epsilon,
        "abandoned_steps_charged": abandoned,
        "noise": noise,
    }


def make_trainer(
    classifier: Classifier, dataset: Any, settings: TrainSettings, **options: Any
) -> ZerothOrderTrainer | FirstOrderTrainer:
    """The trainer for ``settings.method`` (not ``zeroshot``).

    ``options`` (keywords): ``checkpoint`` (the job's checkpoint dict to resume from),
    ``journal``: path of the write-ahead journal of a private run (:mod:`zoprivacy.run.journal`;
    zeroth-order steps between checkpoints are replayed on resume, not re-released; DP-AdamW
    steps begun after the checkpoint are charged again). ``resume``: the job's ``--resume``
    (a journal that already holds a run is continued, not refused).
    """
    if settings.method not in TRAINING_METHODS:
        raise ValueError(f"method {settings.method!r} does not train")
    trainer = ZerothOrderTrainer if settings.method in ZO_METHODS else FirstOrderTrainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PredictableSamplingWarning)
        if settings.method not in PRIVATE_METHODS:
            options["journal"] = None
        return trainer(classifier, dataset, settings, **options)
