"""The running RDPAccountant: composition, the budget guard, the single size release, state."""

from __future__ import annotations

import json

import pytest

from zoprivacy.accounting import PrivacyBudgetExceeded, RDPAccountant, calibrate, compute_epsilon


def test_accountant_equals_compute_epsilon():
    acc = RDPAccountant()
    acc.release_size(10.0)
    for _ in range(300):
        acc.step(noise_multiplier=2.0, sample_rate=0.05)
    acc.step(noise_multiplier=2.0, sample_rate=0.05, steps=200)
    expected = compute_epsilon(
        noise_multiplier=2.0, sample_rate=0.05, steps=500, delta=1e-5, laplace_scale=10.0
    )
    assert acc.get_epsilon(1e-5) == pytest.approx(expected, rel=1e-12)
    assert acc.steps == 500
    assert acc.history == [
        {"mechanism": "laplace", "laplace_scale": 10.0},
        {
            "mechanism": "subsampled_gaussian",
            "noise_multiplier": 2.0,
            "sample_rate": 0.05,
            "steps": 500,
        },
    ]


def test_heterogeneous_steps_compose_by_adding_rdp():
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    acc.step(noise_multiplier=3.0, sample_rate=0.05, steps=100)
    low = RDPAccountant()
    low.step(noise_multiplier=3.0, sample_rate=0.05, steps=100)
    assert acc.get_epsilon(1e-5) > low.get_epsilon(1e-5)
    assert len(acc.history) == 2


def test_budget_guard_raises_before_recording_and_says_how_many_steps_fit():
    plan = calibrate(epsilon=1.0, delta=1e-5, sample_rate=0.05, steps=400)
    acc = RDPAccountant(budget=(1.0, 1e-5))
    acc.release_size(plan.laplace_scale)
    acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=0.05, steps=400)
    before = acc.state_dict()
    with pytest.raises(PrivacyBudgetExceeded, match="0 more such steps fit"):
        acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=0.05)
    assert acc.state_dict() == before  # nothing recorded

    fresh = RDPAccountant(budget=(1.0, 1e-5))
    fresh.release_size(plan.laplace_scale)
    with pytest.raises(PrivacyBudgetExceeded, match=r"(\d+) more such steps fit") as info:
        fresh.step(noise_multiplier=plan.noise_multiplier, sample_rate=0.05, steps=10_000)
    allowed = int(info.value.args[0].split(" more such steps fit")[0].rsplit(" ", 1)[1])
    assert allowed >= 400  # the calibrated number of steps fits
    fresh.step(noise_multiplier=plan.noise_multiplier, sample_rate=0.05, steps=allowed)
    with pytest.raises(PrivacyBudgetExceeded):
        fresh.step(noise_multiplier=plan.noise_multiplier, sample_rate=0.05)


def test_second_size_release_raises():
    acc = RDPAccountant()
    acc.release_size(5.0)
    with pytest.raises(RuntimeError, match="already released"):
        acc.release_size(5.0)
    assert acc.get_epsilon(1e-5) == pytest.approx(0.2)  # pure DP of Lap(5)


def test_budget_applies_to_the_size_release_too():
    acc = RDPAccountant(budget=(0.1, 1e-5))
    with pytest.raises(PrivacyBudgetExceeded):
        acc.release_size(1.0)
    assert not acc.size_released


def test_state_dict_is_json_and_round_trips():
    acc = RDPAccountant(budget=(3.0, 1e-6))
    acc.release_size(7.0)
    acc.step(noise_multiplier=1.5, sample_rate=0.02, steps=123)
    state = json.loads(json.dumps(acc.state_dict()))
    other = RDPAccountant()
    other.load_state_dict(state)
    assert other.get_epsilon(1e-6) == acc.get_epsilon(1e-6)
    assert other.budget == (3.0, 1e-6) and other.steps == 123 and other.size_released
    with pytest.raises(RuntimeError):
        other.release_size(7.0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(noise_multiplier=-1.0, sample_rate=0.1), "noise_multiplier"),
        (dict(noise_multiplier=1.0, sample_rate=0.0), "sample_rate"),
        (dict(noise_multiplier=1.0, sample_rate=0.1, steps=-1), "steps"),
    ],
)
def test_bad_step_arguments(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        RDPAccountant().step(**kwargs)


def test_bad_budget():
    with pytest.raises(ValueError, match="budget epsilon"):
        RDPAccountant(budget=(0.0, 1e-5))
    with pytest.raises(ValueError, match="budget delta"):
        RDPAccountant(budget=(1.0, 1.0))
