"""ε of a composed run: Lemma 8 conversion, composition, and cross-checks with two libraries."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import reference
from zoprivacy.accounting import (
    DEFAULT_ORDERS,
    OrderRangeWarning,
    compute_epsilon,
    epsilon_and_order,
    rdp_laplace,
    rdp_subsampled_gaussian,
    rdp_to_dp,
)
from zoprivacy.accounting.epsilon import composed_rdp

INT_ORDERS = np.array([2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 128, 256], float)


# --------------------------------------------------------------------------- conversion
@given(
    rdp=st.floats(min_value=0.0, max_value=50.0),
    alpha=st.floats(min_value=1.01, max_value=1e4),
    delta=st.floats(min_value=1e-12, max_value=0.5),
)
def test_conversion_matches_lemma8_and_is_nonnegative(rdp, alpha, delta):
    eps, order = rdp_to_dp([alpha], [rdp], delta, warn_at_edge=False)
    assert order == alpha
    assert eps >= 0.0
    assert eps == pytest.approx(max(0.0, reference.lemma8(rdp, alpha, delta)), rel=1e-10, abs=1e-12)


def test_conversion_minimises_over_orders_and_warns_at_the_edge():
    rdp = rdp_subsampled_gaussian(0.0416, 3.0, INT_ORDERS) * 1000
    eps, order = rdp_to_dp(INT_ORDERS, rdp, 1e-5)
    each = [
        rdp_to_dp([a], [r], 1e-5, warn_at_edge=False)[0]
        for a, r in zip(INT_ORDERS, rdp, strict=False)
    ]
    assert eps == min(each)
    assert order == INT_ORDERS[int(np.argmin(each))]
    with pytest.warns(OrderRangeWarning, match="edge"):
        rdp_to_dp(INT_ORDERS[:3], rdp[:3], 1e-5)  # best order is the largest of a short list


def test_conversion_rejects_nan_and_mismatched_lengths():
    with pytest.raises(ValueError, match="NaN"):
        rdp_to_dp([2.0, 3.0], [0.1, math.nan], 1e-5)
    with pytest.raises(ValueError, match="one value per order"):
        rdp_to_dp([2.0, 3.0], [0.1], 1e-5)
    assert rdp_to_dp([2.0], [math.inf], 1e-5)[0] == math.inf


def test_conversion_agrees_with_opacus_and_dp_accounting():
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon as dpa_eps
    from opacus.accountants.analysis.rdp import get_privacy_spent

    for sigma, steps in ((0.8, 100), (3.0, 1000), (10.0, 5000)):
        rdp = steps * rdp_subsampled_gaussian(0.0416, sigma, INT_ORDERS)
        ours, order = rdp_to_dp(INT_ORDERS, rdp, 1e-5, warn_at_edge=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            op_eps, op_order = get_privacy_spent(orders=INT_ORDERS, rdp=rdp, delta=1e-5)
        dp_eps, dp_order = dpa_eps(INT_ORDERS, rdp, 1e-5)
        assert ours == pytest.approx(op_eps, rel=1e-9) and order == op_order
        assert ours == pytest.approx(dp_eps, rel=1e-9) and order == dp_order


# --------------------------------------------------------------------------- composed run
def test_matches_dp_accounting_rdp_accountant_with_laplace_and_poisson_gaussian():
    import dp_accounting as dpa
    from dp_accounting import rdp

    for q, sigma, steps, psi in (
        (0.0416, 3.0, 1000, 10.0),
        (0.0208, 1.3, 500, 10.0),
        (0.01, 0.9, 300, 2.0),
        (0.2, 5.0, 50, 40.0),
    ):
        acc = rdp.RdpAccountant(INT_ORDERS.tolist(), dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
        acc.compose(dpa.LaplaceDpEvent(psi))
        acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
        theirs = acc.get_epsilon(1e-5)
        ours = compute_epsilon(
            noise_multiplier=sigma,
            sample_rate=q,
            steps=steps,
            delta=1e-5,
            laplace_scale=psi,
            orders=INT_ORDERS,
        )
        assert ours == pytest.approx(theirs, rel=1e-6)


def test_matches_opacus_for_the_gaussian_part():
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = np.array([1.5, 1.75, 2, 2.5, 3, 4, 6, 8, 11, 16, 32, 64])
    for q, sigma, steps in ((0.0416, 3.0, 1000), (0.005, 0.7, 2000), (0.3, 4.0, 100)):
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
        ours = compute_epsilon(
            noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, orders=orders
        )
        assert ours == pytest.approx(theirs, rel=1e-6)


sigma_s = st.floats(min_value=0.5, max_value=20.0)
q_s = st.floats(min_value=1e-3, max_value=0.5)
steps_s = st.integers(min_value=1, max_value=5000)


@given(sigma=sigma_s, q=q_s, steps=steps_s)
def test_epsilon_rises_with_steps_and_rate_and_falls_with_noise(sigma, q, steps):
    kw = dict(delta=1e-5, laplace_scale=20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OrderRangeWarning)
        base = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, **kw)
        more_steps = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps + 1, **kw)
        more_rate = compute_epsilon(
            noise_multiplier=sigma, sample_rate=min(1.0, q * 1.2), steps=steps, **kw
        )
        more_noise = compute_epsilon(noise_multiplier=sigma * 1.2, sample_rate=q, steps=steps, **kw)
    assert more_steps >= base
    assert more_rate >= base
    assert more_noise <= base


@given(sigma=sigma_s, q=q_s, t1=steps_s, t2=steps_s)
def test_rdp_adds_under_composition(sigma, q, t1, t2):
    def curve(t, psi):
        return composed_rdp(
            noise_multiplier=sigma, sample_rate=q, steps=t, laplace_scale=psi, orders=INT_ORDERS
        )

    np.testing.assert_allclose(curve(t1 + t2, 5.0), curve(t1, 5.0) + curve(t2, None), rtol=1e-12)
    np.testing.assert_allclose(
        curve(t1, 5.0),
        t1 * rdp_subsampled_gaussian(q, sigma, INT_ORDERS) + rdp_laplace(5.0, INT_ORDERS),
    )


def test_size_release_alone_takes_the_pure_dp_bound_when_smaller():
    eps, order = epsilon_and_order(
        noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5, laplace_scale=10.0
    )
    assert eps == pytest.approx(0.1) and order == math.inf
    # A very small δ-free RDP route can beat 1/ψ only for huge δ; both are valid upper bounds.
    rdp_route, _ = rdp_to_dp(
        DEFAULT_ORDERS, rdp_laplace(10.0, DEFAULT_ORDERS), 1e-5, warn_at_edge=False
    )
    assert eps <= rdp_route
    assert compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5) == 0.0


def test_zero_noise_gives_infinite_epsilon():
    assert compute_epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=3, delta=1e-5) == math.inf


@settings(max_examples=6)
@given(sigma=st.floats(min_value=0.8, max_value=6.0), q=st.floats(min_value=0.005, max_value=0.1))
def test_pld_is_at_most_rdp(sigma, q):
    kw = dict(noise_multiplier=sigma, sample_rate=q, steps=200, delta=1e-5, laplace_scale=20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OrderRangeWarning)
        assert compute_epsilon(accountant="pld", **kw) <= compute_epsilon(**kw)


@pytest.mark.parametrize(
    ("override", "name"),
    [
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(delta=math.nan), "delta"),
        (dict(steps=-1), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(noise_multiplier=-0.1), "noise_multiplier"),
        (dict(laplace_scale=0.0), "laplace_scale"),
        (dict(orders=[]), "orders"),
        (dict(accountant="gdp"), "accountant"),
    ],
)
def test_bad_input_names_the_argument(override, name):
    kw = dict(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5)
    kw.update(override)
    with pytest.raises((ValueError, TypeError), match=name):
        compute_epsilon(**kw)
