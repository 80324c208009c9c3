"""The tight accounting references of the canary audit, against independent computations:
Clopper-Pearson intervals (scipy's exact binomial test), the (ε, δ) inequalities of a test, the
exact Gaussian and subsampled-Gaussian privacy profiles (numerical integration, dp-accounting's
PLD), the trade-off curve (its duality with the profile) and the family bound (its inverse)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from scipy import integrate, special, stats

from zoprivacy.accounting import compute_epsilon
from zoprivacy.accounting.hypothesis_test import clopper_pearson, epsilon_from_rates
from zoprivacy.accounting.pld import subsampled_gaussian_epsilon_pld
from zoprivacy.accounting.profile import (
    gaussian_delta,
    gaussian_epsilon,
    subsampled_gaussian_delta,
    subsampled_gaussian_deltas,
    subsampled_gaussian_epsilon,
)
from zoprivacy.accounting.tradeoff import mu_from_rates, subsampled_gaussian_tradeoff


# ---------------------------------------------------------------------------- statistics helpers
@pytest.mark.parametrize("k, n", [(0, 50), (1, 50), (17, 50), (49, 50), (50, 50), (3, 1000)])
def test_clopper_pearson_matches_scipy_exact_interval(k, n):
    lo, hi = clopper_pearson(k, n, 0.95)
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert float(lo) == pytest.approx(ref.low, abs=1e-12)
    assert float(hi) == pytest.approx(ref.high, abs=1e-12)


def test_epsilon_from_rates_is_the_dp_inequality():
    # A perfect test (FPR = FNR = 0) is impossible to bound: +inf; a coin flip gives ε ≤ 0.
    first, second = epsilon_from_rates(np.array([0.01, 0.5]), np.array([0.5, 0.5]), 1e-5)
    assert first[0] == pytest.approx(math.log((1 - 1e-5 - 0.5) / 0.01))
    assert second[0] == pytest.approx(math.log((1 - 1e-5 - 0.01) / 0.5))
    assert first[1] < 0 and second[1] < 0


@pytest.mark.parametrize("mu", [0.25, 1.0, 3.0])
def test_gaussian_epsilon_inverts_the_exact_profile_and_is_below_the_rdp_claim(mu):
    for delta in (1e-2, 1e-5):
        eps = gaussian_epsilon(mu, delta)
        assert gaussian_delta(mu, eps) == pytest.approx(delta, rel=1e-6)
        claimed = compute_epsilon(noise_multiplier=1 / mu, sample_rate=1.0, steps=1, delta=delta)
        assert eps < claimed


# ---------------------------------------------------------------------------- subsampled reference
def _hockey_stick_by_quad(q, sigma, epsilon):
    """Brute force: ∫ max(0, p − e^ε r) and ∫ max(0, r − e^ε p) over a range holding all but
    e^-800 of the mass, for P = (1−q)N(0,σ²) + qN(1,σ²) and Q = N(0,σ²)."""

    def p(x):
        return (1 - q) * stats.norm.pdf(x, 0, sigma) + q * stats.norm.pdf(x, 1, sigma)

    def r(x):
        return stats.norm.pdf(x, 0, sigma)

    e = math.exp(epsilon)
    lim = 40 * sigma + 2
    kw = dict(points=[0.0, 1.0], limit=2000, epsabs=1e-15, epsrel=1e-11)
    forward = integrate.quad(lambda x: max(0.0, p(x) - e * r(x)), -lim, lim, **kw)[0]
    backward = integrate.quad(lambda x: max(0.0, r(x) - e * p(x)), -lim, lim, **kw)[0]
    return forward, backward


@pytest.mark.parametrize("q", [0.5, 0.1, 0.01])
@pytest.mark.parametrize("sigma", [0.7, 2.0])
def test_subsampled_gaussian_profile_matches_the_numerical_integral(q, sigma):
    for epsilon in (0.0, 0.05, 0.5, 2.0):
        closed = subsampled_gaussian_deltas(q, sigma, epsilon)
        reference = _hockey_stick_by_quad(q, sigma, epsilon)
        for got, want in zip(closed, reference, strict=True):
            assert got == pytest.approx(want, rel=1e-7, abs=1e-14), (q, sigma, epsilon)
        assert subsampled_gaussian_delta(q, sigma, epsilon) == max(closed)
    # Q‖P is zero exactly when e^{−ε} ≤ 1 − q (the likelihood ratio never drops below 1 − q)
    assert subsampled_gaussian_deltas(q, sigma, -math.log1p(-q) + 1e-9)[1] == 0.0
    assert subsampled_gaussian_deltas(q, sigma, 0.5 * -math.log1p(-q))[1] > 0.0


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0, 5.0])
def test_subsampled_gaussian_reduces_to_the_gaussian_at_q_1(sigma):
    for epsilon in (0.0, 0.3, 1.0, 3.0):
        assert subsampled_gaussian_delta(1.0, sigma, epsilon) == pytest.approx(
            gaussian_delta(1 / sigma, epsilon), rel=1e-12, abs=1e-300
        )
    for delta in (1e-2, 1e-5, 1e-9):
        assert subsampled_gaussian_epsilon(1.0, sigma, delta) == pytest.approx(
            gaussian_epsilon(1 / sigma, delta), abs=1e-9
        )
    alpha = np.array([1e-6, 0.01, 0.3, 0.9])
    beta = stats.norm.cdf(stats.norm.ppf(1 - alpha) - 1 / sigma)  # the GDP trade-off curve
    assert [subsampled_gaussian_tradeoff(1.0, sigma, a) for a in alpha] == pytest.approx(beta)
    # the family inversion is the GDP μ = Φ⁻¹(1 − FPR) − Φ⁻¹(FNR) bit for bit
    fnr = np.array([0.5, 0.2, 0.01, 0.999])
    gdp = -special.ndtri(alpha) - special.ndtri(fnr)
    assert np.array_equal(mu_from_rates(alpha, fnr, 1.0), gdp)


@pytest.mark.parametrize("q, sigma", [(0.5, 1.0), (0.1, 0.5), (0.02, 2.0)])
def test_subsampled_gaussian_epsilon_against_dp_accounting_pld(q, sigma):
    """dp-accounting's PLD (connect-the-dots, pessimistic) is exact at the privacy-loss grid
    points ε = i·h and above the true profile between them, so for one step its ε lies in
    [ε_tight, ε_tight + h] (Doroshenko et al. 2022): the closed form must sit in that window."""
    dp_event = pytest.importorskip("dp_accounting.dp_event")
    pld = pytest.importorskip("dp_accounting.pld")
    h = 1e-4
    accountant = pld.PLDAccountant(value_discretization_interval=h)
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), 1)
    for delta in (1e-2, 1e-5):
        closed = subsampled_gaussian_epsilon(q, sigma, delta)
        if closed > 0:
            assert subsampled_gaussian_delta(q, sigma, closed) == pytest.approx(delta, rel=1e-8)
        else:  # (q, σ) = (0.02, 2) at δ = 1e-2: already (0, δ)-DP
            assert subsampled_gaussian_delta(q, sigma, 0.0) <= delta
        reference = accountant.get_epsilon(delta)
        assert closed <= reference + 1e-12
        assert reference - closed <= h
        assert subsampled_gaussian_epsilon_pld(q, sigma, 1, delta) == reference
    for epsilon in (0.0, 0.05, 0.5, 1.0):  # grid points: equal up to the PLD's float sums
        assert accountant.get_delta(epsilon) == pytest.approx(
            subsampled_gaussian_delta(q, sigma, epsilon), rel=1e-9, abs=1e-14
        )


def test_pld_for_several_steps_is_between_one_step_and_the_rdp_claim(monkeypatch):
    pytest.importorskip("dp_accounting")
    q, sigma, delta = 0.5, 1.0, 1e-2
    three = subsampled_gaussian_epsilon_pld(q, sigma, 3, delta)
    assert subsampled_gaussian_epsilon(q, sigma, delta) < three
    assert three < compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=3, delta=delta)
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # not installed: no reference
    assert subsampled_gaussian_epsilon_pld(q, sigma, 3, delta) is None


@pytest.mark.parametrize("q, sigma", [(0.5, 1.0), (0.1, 0.5), (0.05, 2.0)])
def test_tradeoff_curve_is_dual_to_the_privacy_profile(q, sigma):
    """δ_{P‖Q}(ε) = sup_α 1 − β(α) − e^ε α and δ_{Q‖P}(ε) = sup_α 1 − α − e^ε β(α)
    (Dong, Roth, Su 2019, Proposition 2.12), with β from scipy's normal CDFs on a fine grid."""
    alpha = stats.norm.sf(np.linspace(-12, 12, 40001))
    a = stats.norm.isf(alpha)
    beta = (1 - q) * (1 - alpha) + q * stats.norm.cdf(a - 1 / sigma)
    for i in range(0, 40001, 4000):
        assert subsampled_gaussian_tradeoff(q, sigma, alpha[i]) == pytest.approx(beta[i])
    for epsilon in (0.0, 0.2, 1.0, 2.5):
        e = math.exp(epsilon)
        forward, backward = subsampled_gaussian_deltas(q, sigma, epsilon)
        assert np.max(1 - beta - e * alpha) == pytest.approx(forward, rel=1e-6, abs=1e-12)
        assert max(np.max(1 - alpha - e * beta), 0.0) == pytest.approx(
            backward, rel=1e-6, abs=1e-12
        )
    # inverting the curve at exact rates recovers 1/σ (the family bound without sampling error)
    mask = (alpha > 1e-6) & (alpha < 1 - 1e-6)
    mu = mu_from_rates(alpha[mask][::500], beta[mask][::500], q)
    assert mu == pytest.approx(np.full(mu.shape, 1 / sigma), rel=1e-5)


def test_subsampled_gaussian_limits_and_bad_input():
    q = 0.3
    assert subsampled_gaussian_delta(q, math.inf, 0.0) == 0.0
    assert subsampled_gaussian_epsilon(q, math.inf, 1e-5) == 0.0
    # no noise: the canary is visible exactly when sampled, so δ(ε) ≥ q for every ε
    assert subsampled_gaussian_delta(q, 0.0, 5.0) == pytest.approx(q)
    assert subsampled_gaussian_delta(q, 1e-3, 5.0) == pytest.approx(q, rel=1e-6)
    assert subsampled_gaussian_epsilon(q, 0.0, 1e-5) == math.inf
    assert subsampled_gaussian_tradeoff(q, 0.0, 0.0) == pytest.approx(1 - q)
    for bad in (
        lambda: subsampled_gaussian_delta(0.0, 1.0, 1.0),
        lambda: subsampled_gaussian_delta(1.5, 1.0, 1.0),
        lambda: subsampled_gaussian_delta(0.5, -1.0, 1.0),
        lambda: subsampled_gaussian_delta(0.5, math.nan, 1.0),
        lambda: subsampled_gaussian_delta(0.5, 1.0, -0.1),
        lambda: subsampled_gaussian_epsilon(0.5, 1.0, 0.0),
        lambda: subsampled_gaussian_epsilon(0.5, 1.0, 1.0),
        lambda: subsampled_gaussian_tradeoff(0.5, 1.0, 1.5),
        lambda: subsampled_gaussian_epsilon_pld(0.5, 0.0, 1, 1e-5),
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="sample_rate"):
        subsampled_gaussian_delta(0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="delta"):
        subsampled_gaussian_epsilon(0.5, 1.0, 2.0)


def test_bad_input_names_the_argument():
    cases = [
        (lambda: clopper_pearson(3, 0), "trials"),
        (lambda: clopper_pearson(3, 10, 1.0), "confidence"),
        (lambda: epsilon_from_rates(0.1, 0.1, 0.0), "delta"),
        (lambda: mu_from_rates(0.1, 0.1, 0.0), "sample_rate"),
        (lambda: gaussian_epsilon(1.0, 2.0), "delta"),
        (lambda: gaussian_delta(math.nan, 1.0), "mu"),
        (lambda: subsampled_gaussian_epsilon_pld(0.5, 1.0, 0, 1e-5), "steps"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
