"""Calibration of σ (and ψ) for a target (ε, δ), Opacus-style helper, and the paper's settings."""

from __future__ import annotations

import math
import re
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zoprivacy.accounting import (
    OrderRangeWarning,
    calibrate,
    compute_epsilon,
    epsilon_and_order,
    get_noise_multiplier,
)
from zoprivacy.accounting.orders import DEFAULT_ORDERS, extended_orders


def _eps(plan, sigma):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OrderRangeWarning)
        return compute_epsilon(
            noise_multiplier=sigma,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            delta=plan.delta,
            laplace_scale=plan.laplace_scale,
            orders=extended_orders(extended_orders(DEFAULT_ORDERS)),
        )


@settings(max_examples=25)
@given(
    epsilon=st.floats(min_value=0.05, max_value=10.0),
    q=st.floats(min_value=1e-3, max_value=0.3),
    steps=st.integers(min_value=1, max_value=3000),
    size_fraction=st.sampled_from([0.0, 0.05, 0.2]),
)
def test_round_trip_is_safe_and_tight(epsilon, q, steps, size_fraction):
    plan = calibrate(
        epsilon=epsilon, delta=1e-5, sample_rate=q, steps=steps, size_fraction=size_fraction
    )
    assert _eps(plan, plan.noise_multiplier) <= epsilon  # safe side
    assert plan.epsilon <= epsilon
    assert _eps(plan, plan.noise_multiplier * (1 - 1e-4)) > epsilon  # tight to 1e-4
    if size_fraction == 0.0:
        assert plan.laplace_scale is None
    else:
        assert plan.laplace_scale == pytest.approx(1.0 / (size_fraction * epsilon))


# The artifact's runs (paper appendix, 004_…): (ε, q, T).
ARTIFACT_RUNS = [
    (2.0, 0.0208, 500),
    (2.0, 0.0416, 1000),
    (2.0, 0.0416, 5000),
    (0.5, 0.0416, 500),
    (0.5, 0.0416, 1000),
    (6.0, 0.0416, 1000),
]


@pytest.mark.parametrize(("epsilon", "q", "steps"), ARTIFACT_RUNS)
def test_joint_composition_needs_less_noise_than_the_artifacts_split(epsilon, q, steps):
    """The artifact gives 95% of ε to the Gaussian (Opacus RDP) and 5% pure ε to the Laplace
    release, composed basically; Lemma 5's joint RDP composition must need less noise."""
    from opacus.accountants.utils import get_noise_multiplier as opacus_sigma

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifact = opacus_sigma(
            target_epsilon=0.95 * epsilon,
            target_delta=1e-5,
            sample_rate=q,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=1e-4,
        )
    plan = calibrate(epsilon=epsilon, delta=1e-5, sample_rate=q, steps=steps)
    assert plan.noise_multiplier < artifact
    assert plan.laplace_scale == pytest.approx(1.0 / (0.05 * epsilon))
    assert _eps(plan, plan.noise_multiplier) <= epsilon


def test_small_targets_extend_the_orders_and_stay_reachable():
    plan = calibrate(epsilon=0.01, delta=1e-5, sample_rate=0.01, steps=100)
    assert plan.best_order > 256  # capped at 256 this target would be out of reach
    assert _eps(plan, plan.noise_multiplier) <= 0.01
    plan = calibrate(epsilon=0.003, delta=1e-5, sample_rate=0.001, steps=10, size_fraction=0.0)
    assert plan.best_order > DEFAULT_ORDERS[-1]


def test_unreachable_target_names_the_smallest_reachable_epsilon():
    with pytest.raises(ValueError, match="smallest reachable epsilon is about") as info:
        calibrate(epsilon=1e-4, delta=1e-5, sample_rate=0.01, steps=10, orders=DEFAULT_ORDERS)
    reach = float(re.search(r"about ([0-9.e+-]+)", str(info.value)).group(1))
    plan = calibrate(
        epsilon=reach * 1.05, delta=1e-5, sample_rate=0.01, steps=10, orders=DEFAULT_ORDERS
    )
    assert plan.epsilon <= reach * 1.05
    with pytest.raises(ValueError, match="cannot be reached"):
        calibrate(
            epsilon=reach * 0.95, delta=1e-5, sample_rate=0.01, steps=10, orders=DEFAULT_ORDERS
        )


def test_steps_zero_is_the_size_release_alone():
    plan = calibrate(epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=0)
    assert plan.noise_multiplier == 0.0
    assert plan.epsilon == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("override", "name"),
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(epsilon=math.inf), "epsilon"),
        (dict(epsilon=math.nan), "epsilon"),
        (dict(delta=1.0), "delta"),
        (dict(delta=0.0), "delta"),
        (dict(sample_rate=2.0), "sample_rate"),
        (dict(steps=-3), "steps"),
        (dict(size_fraction=1.0), "size_fraction"),
        (dict(size_fraction=-0.1), "size_fraction"),
        (dict(accountant="x"), "accountant"),
    ],
)
def test_bad_calibration_input_names_the_argument(override, name):
    kw = dict(epsilon=2.0, delta=1e-5, sample_rate=0.04, steps=100)
    kw.update(override)
    with pytest.raises((ValueError, TypeError), match=name):
        calibrate(**kw)


def test_opacus_style_helper_is_at_least_as_tight_as_opacus():
    from opacus.accountants.utils import get_noise_multiplier as opacus_sigma

    for eps, q, steps in ((1.0, 0.01, 1000), (3.0, 0.0416, 1000), (8.0, 0.1, 200)):
        ours = get_noise_multiplier(
            target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = opacus_sigma(
                target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps, accountant="rdp"
            )
        achieved, _ = epsilon_and_order(
            noise_multiplier=ours, sample_rate=q, steps=steps, delta=1e-5, warn_at_edge=False
        )
        assert achieved <= eps
        assert ours <= theirs
    by_epochs = get_noise_multiplier(
        target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01, epochs=10
    )
    assert by_epochs == get_noise_multiplier(
        target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01, steps=1000
    )


def test_pld_calibration_needs_no_more_noise_than_rdp():
    rdp_plan = calibrate(epsilon=2.0, delta=1e-5, sample_rate=0.0416, steps=300)
    pld_plan = calibrate(epsilon=2.0, delta=1e-5, sample_rate=0.0416, steps=300, accountant="pld")
    assert pld_plan.noise_multiplier <= rdp_plan.noise_multiplier
    assert pld_plan.epsilon <= 2.0
    assert (
        compute_epsilon(
            noise_multiplier=pld_plan.noise_multiplier,
            sample_rate=0.0416,
            steps=300,
            delta=1e-5,
            laplace_scale=pld_plan.laplace_scale,
            accountant="pld",
        )
        <= 2.0
    )
