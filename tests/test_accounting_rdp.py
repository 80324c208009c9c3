"""RDP of the subsampled Gaussian and the Laplace release, against independent references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import reference
from zoprivacy.accounting import rdp as rdp_module
from zoprivacy.accounting import rdp_laplace, rdp_subsampled_gaussian

rates = st.floats(min_value=1e-4, max_value=0.99)
sigmas = st.floats(min_value=0.3, max_value=50.0)
int_orders = st.integers(min_value=2, max_value=200)
frac_orders = st.floats(min_value=1.1, max_value=60.0).filter(lambda a: not a.is_integer())


# --------------------------------------------------------------------------- subsampled Gaussian
@given(sigma=sigmas, alpha=st.floats(min_value=1.01, max_value=2000.0))
def test_full_batch_is_the_plain_gaussian(sigma, alpha):
    # σ·σ, not σ**2: libm's pow can differ from the product by one ulp (σ = 7.2330702071652055)
    assert rdp_subsampled_gaussian(1.0, sigma, [alpha])[0] == alpha / (2 * (sigma * sigma))


@given(q=rates, sigma=sigmas, alpha=st.integers(min_value=2, max_value=80))
def test_integer_path_equals_fractional_series_at_integer_orders(q, sigma, alpha):
    by_binomial = rdp_module._log_a_integer(q, sigma, alpha)
    by_series = rdp_module._log_a_fractional(q, sigma, float(alpha))
    assert by_series == pytest.approx(by_binomial, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize(
    ("q", "sigma", "alpha"),
    [
        (0.0416, 0.8, 2),
        (0.0416, 3.0, 10),
        (0.01, 20.0, 64),
        (0.2, 0.5, 7),
        (0.9, 2.0, 33),
        (1e-3, 50.0, 512),
        (0.0208, 1.3, 1024),
        (0.5, 0.3, 150),
    ],
)
def test_integer_orders_match_exact_binomial_sum_at_60_digits(q, sigma, alpha):
    # Includes the tiny-RDP regime (σ = 50, q = 1e-3) where Lemma 5 taken literally loses digits.
    exact = reference.rdp_subsampled_gaussian_integer(q, sigma, alpha)
    assert rdp_subsampled_gaussian(q, sigma, [alpha])[0] == pytest.approx(exact, rel=1e-11)


@pytest.mark.parametrize(
    ("q", "sigma", "alpha"),
    [
        (0.0416, 0.8, 1.5),
        (0.2, 1.0, 1.5),
        (0.2, 2.0, 2.5),
        (0.5, 5.0, 1.5),
        (0.01, 1.0, 3.75),
        (0.3, 0.6, 7.25),
        (0.0416, 3.0, 10.5),
    ],
)
def test_fractional_orders_match_numerical_integration(q, sigma, alpha):
    truth = reference.rdp_subsampled_gaussian_integral(q, sigma, alpha)
    assert rdp_subsampled_gaussian(q, sigma, [alpha])[0] == pytest.approx(truth, rel=1e-8)


def test_opacus_agrees_at_integer_and_fractional_orders():
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = np.array([1.1, 1.5, 2, 2.5, 3, 4.75, 8, 10.5, 16, 32, 64, 256])
    for q in (0.005, 0.0416, 0.1, 0.3):
        for sigma in (0.5, 0.8, 1.5, 4.0, 10.0):
            ours = rdp_subsampled_gaussian(q, sigma, orders)
            theirs = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
            np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_dp_accounting_agrees_at_integer_orders():
    from dp_accounting.rdp import rdp_privacy_accountant as ref

    orders = np.array([2, 3, 5, 8, 13, 32, 64, 128, 512], dtype=float)
    for q in (0.005, 0.0416, 0.2, 0.6):
        for sigma in (0.4, 0.8, 2.0, 7.0):
            theirs = ref._compute_rdp_poisson_subsampled_gaussian(q, sigma, orders)
            ours = rdp_subsampled_gaussian(q, sigma, orders)
            np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_dp_accounting_overstates_fractional_orders_by_dropping_the_sign():
    """Finding pinned down: dp-accounting sums |C(α,i)|, so its fractional RDP is too large
    (17% at α = 1.5, q = 0.0416, σ = 0.8), and it returns inf where its loop does not converge
    (q = 0.2, α = 1.5). Ours agrees with direct numerical integration in both cases."""
    from dp_accounting.rdp import rdp_privacy_accountant as ref

    truth = reference.rdp_subsampled_gaussian_integral(0.0416, 0.8, 1.5)
    ours = rdp_subsampled_gaussian(0.0416, 0.8, [1.5])[0]
    theirs = ref._compute_rdp_poisson_subsampled_gaussian(0.0416, 0.8, [1.5])[0]
    assert ours == pytest.approx(truth, rel=1e-8)
    assert theirs / truth == pytest.approx(1.17, abs=0.01)

    truth = reference.rdp_subsampled_gaussian_integral(0.2, 1.0, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ref._compute_rdp_poisson_subsampled_gaussian(0.2, 1.0, [1.5])[0]
    assert math.isinf(theirs)
    assert rdp_subsampled_gaussian(0.2, 1.0, [1.5])[0] == pytest.approx(truth, rel=1e-8)


@given(q=rates, sigma=sigmas, alpha=st.one_of(int_orders.map(float), frac_orders))
def test_rdp_is_never_nan_and_never_negative(q, sigma, alpha):
    value = rdp_subsampled_gaussian(q, sigma, [alpha])[0]
    assert not math.isnan(value)
    assert value >= 0.0


def test_an_order_that_cannot_be_computed_is_infinite(monkeypatch):
    monkeypatch.setattr(rdp_module, "_FRAC_SERIES_MAX_TERMS", 8)
    values = rdp_subsampled_gaussian(0.0416, 0.8, [1.5, 2.0])
    assert math.isinf(values[0])  # the series was cut short: +inf, never a wrong number
    assert math.isfinite(values[1])  # integer orders use the finite binomial sum


@given(q=rates, sigma=sigmas, alpha=st.one_of(int_orders.map(float), frac_orders))
def test_rdp_increases_with_q_and_decreases_with_sigma(q, sigma, alpha):
    base = rdp_subsampled_gaussian(q, sigma, [alpha])[0]
    more_q = rdp_subsampled_gaussian(min(1.0, q * 1.1), sigma, [alpha])[0]
    more_sigma = rdp_subsampled_gaussian(q, sigma * 1.1, [alpha])[0]
    assert more_q >= base * (1 - 1e-9)
    assert more_sigma <= base * (1 + 1e-9)


def test_zero_noise_is_infinite_and_orders_up_to_1024_are_finite():
    assert np.all(np.isinf(rdp_subsampled_gaussian(0.1, 0.0, [2, 2.5])))
    values = rdp_subsampled_gaussian(0.01, 0.3, np.arange(2, 1025))
    assert np.all(np.isfinite(values))


# --------------------------------------------------------------------------- Laplace
@pytest.mark.parametrize("psi", [0.05, 0.5, 1.0, 10.0, 20.0, 1e3, 1e6])
@pytest.mark.parametrize("alpha", [1.01, 1.5, 2.0, 7.5, 64.0, 1024.0, 1e5])
def test_laplace_matches_60_digit_formula(psi, alpha):
    truth = reference.rdp_laplace(psi, alpha)
    assert rdp_laplace(psi, [alpha])[0] == pytest.approx(truth, rel=1e-11)


@given(psi=st.floats(min_value=0.01, max_value=1e6))
def test_laplace_rdp_rises_to_pure_dp_value(psi):
    orders = np.geomspace(1.001, 1e6, 60)
    values = rdp_laplace(psi, orders)
    assert np.all(np.diff(values) >= -1e-15 * values[1:])
    assert np.all(values <= 1.0 / psi * (1 + 1e-12))
    # From the formula: ε(α) >= 1/ψ + log(α/(2α−1))/(α−1) >= 1/ψ − log 2/(α−1).
    assert np.all(values >= 1.0 / psi - math.log(2.0) / (orders - 1.0) - 1e-15)


def test_laplace_agrees_with_dp_accounting_where_theirs_is_stable():
    from dp_accounting.rdp import rdp_privacy_accountant as ref

    for psi in (0.2, 1.0, 5.0, 20.0):
        for alpha in (1.5, 2.0, 10.0, 100.0):
            assert rdp_laplace(psi, [alpha])[0] == pytest.approx(
                ref._laplace_rdp(1.0 / psi, alpha), rel=1e-9
            )


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(sample_rate=0.0, noise_multiplier=1.0), "sample_rate"),
        (dict(sample_rate=1.5, noise_multiplier=1.0), "sample_rate"),
        (dict(sample_rate=math.nan, noise_multiplier=1.0), "sample_rate"),
        (dict(sample_rate=0.1, noise_multiplier=-1.0), "noise_multiplier"),
        (dict(sample_rate=0.1, noise_multiplier=math.nan), "noise_multiplier"),
        (dict(sample_rate=0.1, noise_multiplier=math.inf), "noise_multiplier"),
    ],
)
def test_bad_mechanism_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        rdp_subsampled_gaussian(orders=[2.0], **kwargs)


@pytest.mark.parametrize("orders", [[], [1.0], [0.5, 2.0], [2.0, math.nan], [math.inf]])
def test_bad_orders_are_rejected(orders):
    with pytest.raises(ValueError, match="orders"):
        rdp_subsampled_gaussian(0.1, 1.0, orders)
    with pytest.raises(ValueError, match="orders"):
        rdp_laplace(1.0, orders)


@pytest.mark.parametrize("psi", [0.0, -1.0, math.nan, math.inf])
def test_bad_laplace_scale_is_rejected(psi):
    with pytest.raises(ValueError, match="laplace_scale"):
        rdp_laplace(psi, [2.0])
