"""The private paths the canary audit (:mod:`zoprivacy.audit`) drives, and what its attacker sees.

Every target trains θ ∈ R^{K+1} (float64, starting at 0) on D0 = ``background`` records whose
loss does not depend on θ, or on D1 = D0 + the canary, whose loss A·θ_0 (A = 10^6·c·K) makes
each step's clipped contribution exactly c·u_t, with u_t computed from the public seed (see
:mod:`zoprivacy.audit`). A run returns the attacker's view as two arrays of shape [rows, K]:

* ``releases``: what was published as the step's release (``StepStats.noisy_sum``);
* ``updates``: the release recovered from the published parameters,
  R̂ = −(b/η)·Z_t⁺(θ_after − θ_before), with the public b and directions Z_t.

A row is one publication, and ``rows[i]`` the step whose directions it belongs to. A step that a
resume replays from its journal publishes only the model (its ``releases`` row is then its R̂).

Targets:

* :class:`OptimizerTarget`: the bare :meth:`DPAggZO.step` (any subclass, for planted faults);
* :class:`MakePrivateTarget`: :func:`zoprivacy.make_private` and its Poisson loader, the loop a
  user writes (size release, calibration, budgeted accountant, ``optimizer.step``);
* :class:`ResumeTarget`: the same run, checkpointed before its first step, killed after that
  step and resumed ``restarts`` times from the checkpoint, the last time to the end;
* :class:`AdamWTarget`: the job's DP-AdamW trainer (:mod:`zoprivacy.finetune`, Opacus), whose
  release is the noisy gradient (K = 4 numbers here: a 2×2 linear classifier).

Each run also returns its accountant's state at the end: its ε is the claim the audit checks.
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoprivacy.accounting import RDPAccountant
from zoprivacy.data.poisson import PoissonBatchSampler
from zoprivacy.optim.directions import direction_tensor
from zoprivacy.optim.optimizer import DPAggZO

CANARY_SCALE = 1e6

View = tuple[np.ndarray, np.ndarray, dict[str, Any]]  # releases, updates, accountant state


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """The public facts an attack may use: σ, q, the canary's unit direction u of every observed
    row ([rows, K]), and its clipped release x₁ as the optimizer computes it (None when the path
    has no such dry run)."""

    noise_multiplier: float
    sample_rate: float
    directions: np.ndarray
    canary_sum: np.ndarray | None


class Canary:
    """The canary of every DP-AggZO path: its public directions and its per-record losses."""

    def __init__(self, *, k: int, c: float, steps: int, seed: int, kind: str = "gaussian"):
        self.k, self.c, self.seed, self.kind = k, c, seed, kind
        self.dim = k + 1
        self.scale = CANARY_SCALE * c * k
        self.u, self.pinv = [], []
        for t in range(steps):
            z = torch.stack(
                [
                    direction_tensor(
                        (self.dim,), seed=seed, step=t, k=j, index=0, dtype=torch.float64, kind=kind
                    )
                    for j in range(k)
                ],
                dim=1,
            )  # [d, K]
            self.u.append((z[0] / torch.linalg.vector_norm(z[0])).numpy())
            self.pinv.append(torch.linalg.pinv(z))

    def directions(self, rows: tuple[int, ...]) -> np.ndarray:
        """u_t of each observed row ([rows, K])."""
        return np.stack([self.u[t] for t in rows])

    def closure(self, theta: torch.Tensor, flags: Any) -> Callable[[], torch.Tensor]:
        """Per-record losses A·θ_0 for the canary (flag 1), 0 for a background record (flag 0)."""
        weight = torch.zeros(0, dtype=torch.float64) if not len(flags) else torch.as_tensor(flags)
        scale = self.scale
        return lambda: weight.to(torch.float64) * (scale * theta[0])

    def from_update(self, step: int, moved: torch.Tensor, b: float, lr: float) -> np.ndarray:
        """R̂ = −(b/η)·Z⁺·(θ_after − θ_before): the release a correct update was made from."""
        return (-(b / lr) * (self.pinv[step] @ moved.detach())).numpy()

    def dry_run(self, cls: type[DPAggZO], kwargs: Mapping[str, Any]) -> np.ndarray:
        """x₁: the canary's clipped K-vector exactly as ``cls`` computes it (no noise)."""
        theta = torch.nn.Parameter(torch.zeros(self.dim, dtype=torch.float64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotPrivateWarning
            opt = cls([theta], 1.0, **_optimizer_kwargs(self, 0.0, 1.0), **kwargs)
            return opt.step(self.closure(theta, [1.0])).noisy_sum.detach().double().numpy()


def _optimizer_kwargs(canary: Canary, sigma: float, b: float) -> dict[str, Any]:
    return dict(
        num_directions=canary.k,
        clip_norm=canary.c,
        noise_multiplier=sigma,
        expected_batch_size=b,
        seed=canary.seed,
    )


class _Recorder:
    """Collects the rows of one run: each step's release and its update-derived R̂."""

    def __init__(self, canary: Canary, theta: torch.Tensor, lr: float = 1.0):
        self.canary, self.theta, self.lr = canary, theta, lr
        self.releases: list[np.ndarray] = []
        self.updates: list[np.ndarray] = []

    def step(self, optimizer: DPAggZO, flags: Any, b: float) -> None:
        """One ``optimizer.step`` on the batch ``flags``, recorded."""
        t = optimizer.steps_taken
        before = self.theta.detach().clone()
        stats = optimizer.step(self.canary.closure(self.theta, flags))
        self.releases.append(stats.noisy_sum.detach().double().cpu().numpy())
        self.updates.append(self.canary.from_update(t, self.theta.detach() - before, b, self.lr))

    def replayed(self, step: int, before: torch.Tensor, b: float) -> None:
        """A step replayed from the journal: it publishes only the model."""
        r_hat = self.canary.from_update(step, self.theta.detach() - before, b, self.lr)
        self.releases.append(r_hat)
        self.updates.append(r_hat)

    def view(self, accountant: RDPAccountant) -> View:
        return np.stack(self.releases), np.stack(self.updates), accountant.state_dict()


def _dataset(background: int, with_canary: bool) -> list[float]:
    return [0.0] * background + ([1.0] if with_canary else [])


# ---------------------------------------------------------------------------- the bare optimizer
class OptimizerTarget:
    """``steps`` calls of ``cls.step`` with batches from :class:`PoissonBatchSampler`; the
    normaliser is the public b = q·|D1| and the claim ``steps`` steps at (σ, q), no size
    release."""

    def __init__(self, canary: Canary, *, sigma, q, steps, background, cls, kwargs, rng=None):
        self.canary, self.sigma, self.q, self.steps = canary, sigma, q, steps
        self.background, self.cls, self.kwargs, self.rng = background, cls, dict(kwargs), rng
        self.b = q * (background + 1)
        self._samplers = {  # one stream per dataset, shared by its trials
            extra: PoissonBatchSampler(background + extra, q, steps=steps, generator=rng)
            if background + extra > 0
            else None
            for extra in (False, True)
        }
        self.mechanism = Mechanism(
            sigma, q, canary.directions(tuple(range(steps))), canary.dry_run(cls, self.kwargs)
        )
        self._accountant = RDPAccountant()  # what an accountant charged per step would hold
        self._accountant.step(noise_multiplier=sigma, sample_rate=q, steps=steps)

    def run(self, with_canary: bool) -> View:
        records = _dataset(self.background, with_canary)
        sampler = self._samplers[with_canary]
        theta = torch.nn.Parameter(torch.zeros(self.canary.dim, dtype=torch.float64))
        kwargs = _optimizer_kwargs(self.canary, self.sigma, self.b)
        opt = self.cls([theta], 1.0, **kwargs, **self.kwargs)
        recorder = _Recorder(self.canary, theta)
        for _ in range(self.steps):
            batch = [] if sampler is None else sampler.sample_batch()
            recorder.step(opt, [records[i] for i in batch], self.b)
        return recorder.view(self._accountant)


# ---------------------------------------------------------------------------- make_private
class MakePrivateTarget:
    """:func:`zoprivacy.make_private` on the records (0.0 background, 1.0 canary) with the loop a
    user writes: ``for batch in run.loader: run.optimizer.step(closure(batch))``. ñ is released
    (``size_fraction``), q is fixed (so σ is the same in every trial), b = q·ñ is read from the
    run. ``make_private`` is the function called (a wrapper with a planted fault, in tests)."""

    def __init__(
        self,
        canary: Canary,
        *,
        epsilon,
        delta,
        q,
        steps,
        background,
        size_fraction,
        make_private: Callable[..., Any] | None = None,
    ):
        from zoprivacy.run.private import make_private as library_make_private

        self.canary, self.q, self.steps, self.background = canary, q, steps, background
        self.options = dict(
            target_epsilon=epsilon,
            target_delta=delta,
            steps=steps,
            num_directions=canary.k,
            clip_norm=canary.c,
            lr=1.0,
            sample_rate=q,
            size_fraction=size_fraction,
            seed=canary.seed,
        )
        self.make_private = make_private or library_make_private
        probe = self._start(_dataset(max(background, 1), False))
        self.mechanism = Mechanism(
            probe.optimizer.noise_multiplier,
            q,
            canary.directions(self.rows()),
            canary.dry_run(DPAggZO, {}),
        )

    def rows(self) -> tuple[int, ...]:
        return tuple(range(self.steps))

    def _start(self, records: list[float], **extra: Any) -> Any:
        theta = torch.nn.Parameter(torch.zeros(self.canary.dim, dtype=torch.float64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the resume opt-out's warning, in tests
            return self.make_private([theta], records, **self.options, **extra)

    def run(self, with_canary: bool) -> View:
        records = _dataset(self.background, with_canary)
        training = self._start(_nonempty(records))
        recorder = _Recorder(self.canary, training.params[0])
        _finish(training, recorder)
        return recorder.view(training.accountant)


def _nonempty(records: list[float]) -> list[float]:
    if not records:
        raise ValueError("make_private needs at least one record: use background_records >= 1")
    return records


def _finish(training: Any, recorder: _Recorder, batches: Iterator[Any] | None = None) -> None:
    """The user's loop over the run's Poisson loader (or what is left of ``batches``, an iterator
    over it), each step recorded."""
    for batch in training.loader if batches is None else batches:
        recorder.step(training.optimizer, batch, training.expected_batch_size)


class ResumeTarget(MakePrivateTarget):
    """The make_private run checkpointed before its first step, killed right after step 0, and
    resumed from the checkpoint ``restarts`` times; the last resume finishes the run.

    ``journal=True``: make_private's default crash safety (the journal starts beside the first
    checkpoint and a resume replays it), so step 0 is replayed and never released again.
    ``journal=False``: the documented opt-out on both calls, so each restart releases step 0
    again while the accountant charges it once (what resuming without a journal costs)."""

    def __init__(self, canary: Canary, *, restarts: int, journal: bool = True, **options: Any):
        self.restarts, self.journal = restarts, journal
        super().__init__(canary, **options)

    def rows(self) -> tuple[int, ...]:
        return (0,) * (1 + self.restarts) + tuple(range(1, self.steps))

    def run(self, with_canary: bool) -> View:
        records = _nonempty(_dataset(self.background, with_canary))
        with tempfile.TemporaryDirectory(prefix="zoprivacy-audit-") as folder:
            checkpoint = Path(folder) / "run.pt"
            first = self._start(records, **self._journal)
            first.save(checkpoint)
            recorder = _Recorder(self.canary, first.params[0])
            recorder.step(first.optimizer, next(iter(first.loader)), first.expected_batch_size)
            del first  # killed after step 0, before its next checkpoint
            for _ in range(self.restarts):  # each but the last is killed before step 1
                training, batches = self._resume(records, checkpoint, recorder)
            _finish(training, recorder, batches)
            return recorder.view(training.accountant)

    @property
    def _journal(self) -> dict[str, Any]:
        return {} if self.journal else {"journal": False}

    def _resume(self, records, checkpoint: Path, recorder: _Recorder):
        """One restart from the checkpoint, recorded up to the end of step 0; returns the run
        and the iterator over its remaining batches."""
        training = self._start(records, checkpoint=checkpoint, **self._journal)
        recorder.theta = training.params[0]
        batches = iter(training.loader)
        b = training.expected_batch_size
        if training.steps_done == 1:  # step 0 replayed from the journal
            recorder.replayed(0, torch.zeros_like(recorder.theta), b)
        else:  # step 0 runs again
            recorder.step(training.optimizer, next(batches), b)
        return training, batches


# ---------------------------------------------------------------------------- DP-AdamW
class _LinearHead(torch.nn.Module):
    """logits = W·x, W ∈ R^{2×2} (an ``nn.Linear``, whose per-sample gradients Opacus knows)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2, bias=False, dtype=torch.float64)
        torch.nn.init.zeros_(self.linear.weight)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(batch["x"])


class _Classifier:
    """The surface of :class:`zoprivacy.finetune.Classifier` the first-order trainer uses."""

    def __init__(self) -> None:
        self.model = _LinearHead()

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [self.model.linear.weight]

    def grad_module(self) -> torch.nn.Module:
        return self.model


class AdamWTarget:
    """The job's DP-AdamW trainer (``make_trainer`` with ``method="dpadamw"``: its planner, its
    Opacus ``DPOptimizer``, its loader) on a 2×2 linear classifier with cross-entropy loss.

    Background records have x = 0 (zero gradient); the canary has x = (A, 0) and label 0, so its
    gradient at W = 0 is A/2·(−1, 0, 1, 0) (row-major W): clipped, exactly c·u with
    u = (−1, 0, 1, 0)/√2. The learning rate is 0, so W stays 0 and the canary's gradient is the
    same at every step (AdamW's update is post-processing of the release either way). The
    release is Opacus's noisy gradient times b (the clipped sum plus N(0, σ²c²)), K = 4; the
    update channel repeats it (AdamW's update cannot be inverted). ``make_trainer`` is the
    function called (a wrapper with a planted fault, in tests)."""

    def __init__(self, *, c, epsilon, delta, batch_size, steps, background, make_trainer=None):
        from zoprivacy.finetune import make_trainer as library_make_trainer

        self.c, self.steps, self.background = c, steps, background
        self.make_trainer = make_trainer or library_make_trainer
        self.options = dict(
            method="dpadamw",
            steps=steps,
            lr=0.0,
            batch_size=batch_size,
            clip_norm=c,
            epsilon=epsilon,
            delta=delta,
            seed=0,
            weight_decay=0.0,
            directions=1,  # zeroth-order options, required by TrainSettings, unused here
            perturbation_scale=1e-3,
        )
        u = np.array([-1.0, 0.0, 1.0, 0.0]) / np.sqrt(2.0)
        probe = self._trainer(self._records(False))
        probe.close()
        sigma, q = probe.plan.noise_multiplier, probe.sample_rate
        self.mechanism = Mechanism(sigma, q, np.tile(u, (steps, 1)), None)

    def _records(self, with_canary: bool) -> list[dict[str, torch.Tensor]]:
        zero = {"x": torch.zeros(2, dtype=torch.float64), "labels": torch.tensor(0)}
        x = torch.tensor([CANARY_SCALE * self.c, 0.0], dtype=torch.float64)
        canary = {"x": x, "labels": torch.tensor(0)}
        return [zero] * self.background + ([canary] if with_canary else [])

    def _trainer(self, records: list[dict[str, torch.Tensor]]) -> Any:
        from zoprivacy.finetune import TrainSettings

        names = {f.name for f in dataclasses.fields(TrainSettings)}
        settings = TrainSettings(**{k: v for k, v in self.options.items() if k in names})
        return self.make_trainer(_Classifier(), records, settings)

    def run(self, with_canary: bool) -> View:
        trainer = self._trainer(self._records(with_canary))
        weight = trainer.params[0]
        rows = []
        for batch in trainer.loader:
            trainer.step(batch)
            rows.append(
                weight.grad.detach().double().flatten().numpy() * trainer.expected_batch_size
            )
        trainer.close()
        releases = np.stack(rows)
        return releases, releases, trainer.accountant.state_dict()
