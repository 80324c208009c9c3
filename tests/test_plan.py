"""The one private-run planner (zoprivacy.run.plan.plan_run) against independent references."""

from __future__ import annotations

import math

import pytest

from zoprivacy.accounting import PrivacyBudgetExceeded, compute_epsilon
from zoprivacy.run.plan import plan_run


def test_plan_spends_the_budget_with_the_size_release_charged_once():
    calls = []

    def release(n, psi, accountant):
        calls.append((n, psi))
        accountant.release_size(psi)
        return n + 3.0  # a fixed ñ, so q is checkable

    run = plan_run(
        num_records=1000, epsilon=2.0, delta=1e-5, steps=50, expected_batch_size=64, release=release
    )
    assert calls == [(1000, 1.0 / (0.05 * 2.0))]
    assert run.noisy_dataset_size == 1003.0
    assert run.sample_rate == pytest.approx(64 / 1003)
    assert run.expected_batch_size == pytest.approx(64.0)
    # An independent recomputation of the composed guarantee at the planned σ: ≤ ε, and tight.
    eps = compute_epsilon(
        noise_multiplier=run.plan.noise_multiplier,
        sample_rate=run.sample_rate,
        steps=50,
        delta=1e-5,
        laplace_scale=1.0 / (0.05 * 2.0),
        orders=run.plan.orders,
    )
    assert eps <= 2.0 + 1e-12
    assert eps > 1.95
    # The accountant holds the size release and enforces the budget (ε, δ).
    assert run.accountant.size_released and run.accountant.steps == 0
    run.accountant.step(
        noise_multiplier=run.plan.noise_multiplier, sample_rate=run.sample_rate, steps=50
    )
    assert run.accountant.get_epsilon(1e-5) == pytest.approx(eps, rel=1e-9)
    with pytest.raises(PrivacyBudgetExceeded):
        run.accountant.step(
            noise_multiplier=run.plan.noise_multiplier, sample_rate=run.sample_rate, steps=1
        )


def test_q_is_capped_at_one_and_size_fraction_zero_treats_n_as_public():
    run = plan_run(
        num_records=10,
        epsilon=1.0,
        delta=1e-5,
        steps=5,
        sample_rate=1.0,
        size_fraction=0.0,
        release=lambda *a: pytest.fail("released"),
    )
    assert run.noisy_dataset_size == 10.0 and not run.accountant.size_released
    big = plan_run(num_records=5, epsilon=1.0, delta=1e-5, steps=5, expected_batch_size=1e6)
    assert big.sample_rate == 1.0
    assert math.isfinite(big.noisy_dataset_size) and big.noisy_dataset_size >= 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"expected_batch_size": 8, "sample_rate": 0.1}, "exactly one"),
        ({}, "exactly one"),
        ({"expected_batch_size": -1}, "expected_batch_size"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": 0.1, "num_records": 0}, "empty"),
        ({"sample_rate": 0.1, "epsilon": 0.0}, "epsilon"),
        ({"sample_rate": 0.1, "delta": -1e-5}, "delta"),
        ({"sample_rate": 0.1, "steps": -3}, "steps"),
    ],
)
def test_bad_arguments_are_named_before_anything_is_released(kwargs, match):
    args = {"num_records": 100, "epsilon": 1.0, "delta": 1e-5, "steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        plan_run(**args, release=lambda *a: pytest.fail("released before validation"))


def test_a_release_that_does_not_charge_is_refused():
    with pytest.raises(RuntimeError, match="charge"):
        plan_run(
            num_records=100,
            epsilon=1.0,
            delta=1e-5,
            steps=10,
            sample_rate=0.1,
            release=lambda n, psi, acc: float(n),
        )
