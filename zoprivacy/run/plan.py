"""The one private-run planner: size release → calibration → budgeted accountant.

Every private entry point (:func:`zoprivacy.make_private`, the ``zoprivacy finetune`` job's
zeroth-order and DP-AdamW trainers, data-parallel runs) calls :func:`plan_run` and nothing else
to sequence Algorithm 1's lines 1-2 with the calibration of Lemma 5:

1. ψ = 1 / (size_fraction · ε) (docs/design.md: the size release gets ``size_fraction`` of ε);
2. ñ = max(1, n + Lap(ψ)) is released once and charged to the accountant *before* the noise is
   drawn (:func:`zoprivacy.data.release_size`, or a caller-supplied ``release``);
3. q = min(1, b/ñ) when the caller gives a wanted expected batch size b (or q directly);
4. σ is calibrated so that the Laplace release plus T subsampled-Gaussian steps compose to at
   most ε (:func:`zoprivacy.accounting.calibrate`);
5. the accountant that holds the size release gets the plan's Rényi orders and the budget
   (ε, δ), so a step beyond the budget raises before it touches data.

The planner never sees records, only their count n, which it releases exactly once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from zoprivacy import checks as check
from zoprivacy.accounting import PrivacyPlan, RDPAccountant, calibrate
from zoprivacy.data import release_size

__all__ = ["RunPlan", "SizeRelease", "plan_run"]

SizeRelease = Callable[[int, float, RDPAccountant], float]
"""``release(n, ψ, accountant) -> ñ``: charges ``accountant.release_size(ψ)`` and returns ñ."""


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What :func:`plan_run` fixes for a run; every field except ``accountant`` is public.

    Attributes:
        plan: the calibration (σ, ψ, target ε, δ, q, T, orders).
        accountant: the budgeted :class:`~zoprivacy.accounting.RDPAccountant`, already
            charged with the size release.
        noisy_dataset_size: ñ, released once.
        sample_rate: q.
        expected_batch_size: b = q·ñ, the public normaliser of every update.
    """

    plan: PrivacyPlan
    accountant: RDPAccountant
    noisy_dataset_size: float
    sample_rate: float
    expected_batch_size: float


def plan_run(
    *,
    num_records: int,
    epsilon: float,
    delta: float,
    steps: int,
    expected_batch_size: float | None = None,
    sample_rate: float | None = None,
    size_fraction: float = 0.05,
    release: SizeRelease | None = None,
) -> RunPlan:
    """Release ñ, choose q, calibrate σ and return the budgeted accountant (Algorithm 1, l. 1-2).

    Args:
        num_records: n, the true (private) number of training records, ``>= 1``.
        epsilon, delta: the target guarantee of the whole run.
        steps: T, the number of subsampled-Gaussian steps planned.
        expected_batch_size: the wanted b; then q = min(1, b/ñ). Exactly one of this and
            ``sample_rate`` must be given.
        sample_rate: q in (0, 1] directly.
        size_fraction: share of ε spent on the size release (0: n is treated as public).
        release: how ñ is released (default :func:`zoprivacy.data.release_size` from OS
            entropy). Data-parallel runs release on one rank and broadcast; a journal-recovered
            run returns the ñ it recorded. It must charge the accountant it is given.

    Raises:
        ValueError: a bad argument, named.
    """
    eps = check.epsilon(epsilon, "epsilon")
    dlt = check.delta(delta, "delta")
    t = check.steps(steps)
    frac = check.size_fraction(size_fraction)
    if (expected_batch_size is None) == (sample_rate is None):
        raise ValueError(
            "pass exactly one of expected_batch_size (b; then q = b/ñ) or sample_rate (q)"
        )
    if expected_batch_size is not None:
        wanted = check.as_real("expected_batch_size", expected_batch_size)
        if not (wanted > 0 and math.isfinite(wanted)):
            raise ValueError(f"expected_batch_size must be a finite number > 0, got {wanted}")
    else:
        q = check.sample_rate(sample_rate)
    if isinstance(num_records, bool) or not isinstance(num_records, int) or num_records < 1:
        raise ValueError("the data set is empty (or its size is not an int): nothing to train on")

    first = RDPAccountant()  # holds the size release until the orders are known
    if frac == 0.0:
        noisy_n = float(num_records)
    else:
        psi = 1.0 / (frac * eps)
        noisy_n = float((release or _release)(num_records, psi, first))
        if not first.size_released:
            raise RuntimeError("the size release did not charge the accountant it was given")
    if expected_batch_size is not None:
        q = min(1.0, wanted / noisy_n)
    plan = calibrate(epsilon=eps, delta=dlt, sample_rate=q, steps=t, size_fraction=frac)
    budgeted = RDPAccountant(orders=plan.orders, budget=(eps, dlt))
    budgeted.load_state_dict(
        {**first.state_dict(), "orders": list(plan.orders), "budget": [eps, dlt]}
    )
    return RunPlan(plan, budgeted, noisy_n, q, q * noisy_n)


def _release(num_records: int, laplace_scale: float, accountant: RDPAccountant) -> float:
    return release_size(num_records, laplace_scale, accountant=accountant)
