"""Exact samplers of zoprivacy.noise.samplers against their exact distributions.

Distribution tests use ``random.Random(seed)`` as the uniform source, so they are deterministic
(no flaky p-values); a few sanity checks use the default OS-entropy source with 6-sigma bounds.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import special, stats

import zoprivacy.noise.source as zn
from zoprivacy.data import poisson as data
from zoprivacy.data.poisson import release_size
from zoprivacy.noise import samplers as secure_noise
from zoprivacy.noise.samplers import (
    GRID_BITS,
    bernoulli_exp,
    discrete_gaussian,
    discrete_gaussian_pmf,
    discrete_laplace,
    geometric_exp,
    noise_grid,
    rounded_laplace,
    secure_gaussian,
    snapped_noisy_sum,
)
from zoprivacy.noise.source import NoiseSource


def _chisquare(samples: list[int], pmf: dict[int, float]) -> float:
    """p-value of a chi-square goodness of fit; cells with expected count < 5 are pooled."""
    n = len(samples)
    counts: dict[int, int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    observed, expected = [], []
    pool_obs, pool_exp = 0, 0.0
    for y in sorted(pmf):
        if n * pmf[y] >= 5:
            observed.append(counts.get(y, 0))
            expected.append(n * pmf[y])
        else:
            pool_obs += counts.get(y, 0)
            pool_exp += n * pmf[y]
    pool_obs += n - sum(observed) - pool_obs  # everything outside the listed support
    pool_exp = n - sum(expected)
    if pool_exp > 0:
        observed.append(pool_obs)
        expected.append(pool_exp)
    return float(stats.chisquare(observed, expected).pvalue)


# ---------------------------------------------------------------------------- Algorithm 1
@pytest.mark.parametrize("num, den", [(0, 1), (1, 3), (1, 1), (7, 4), (13, 5)])
def test_bernoulli_exp_has_probability_exp_minus_gamma(num, den):
    rng = random.Random(num * 100 + den)
    n = 40_000
    hits = sum(bernoulli_exp(num, den, rng) for _ in range(n))
    p = math.exp(-num / den)
    if p == 1.0:
        assert hits == n
    else:
        assert stats.binomtest(hits, n, p).pvalue > 1e-4


def test_bernoulli_exp_refuses_bad_arguments():
    with pytest.raises(ValueError):
        bernoulli_exp(-1, 2)
    with pytest.raises(ValueError):
        bernoulli_exp(1, 0)


# ---------------------------------------------------------------------------- Algorithm 2
@pytest.mark.parametrize("t, s", [(1, 1), (3, 2), (10, 1)])
def test_discrete_laplace_matches_its_pmf(t, s):
    rng = random.Random(t * 10 + s)
    samples = [discrete_laplace(t, s, rng) for _ in range(30_000)]
    r = math.exp(-s / t)
    support = range(-200, 201)
    pmf = {y: (1 - r) / (1 + r) * r ** abs(y) for y in support}
    assert all(isinstance(y, int) for y in samples)
    assert _chisquare(samples, pmf) > 1e-4


def test_geometric_exp_matches_its_pmf():
    rng = random.Random(5)
    samples = [geometric_exp(2, 7, rng) for _ in range(30_000)]
    r = math.exp(-2 / 7)
    assert _chisquare(samples, {j: (1 - r) * r**j for j in range(200)}) > 1e-4


# ---------------------------------------------------------------------------- Algorithm 3
@pytest.mark.parametrize("sigma2", [Fraction(2, 3), Fraction(9, 4), Fraction(25, 1)])
def test_discrete_gaussian_matches_the_exact_pmf(sigma2):
    rng = random.Random(int(sigma2 * 1000))
    samples = [discrete_gaussian(sigma2, rng) for _ in range(30_000)]
    assert all(isinstance(y, int) for y in samples)
    bound = int(12 * math.sqrt(sigma2)) + 12
    pmf = discrete_gaussian_pmf(float(sigma2), range(-bound, bound + 1))
    assert _chisquare(samples, pmf) > 1e-4
    # mean 0 and variance slightly below σ² (CKS Prop. 19: Var ≤ σ²), to sampling error
    mean = sum(y * p for y, p in pmf.items())
    var = sum(y * y * p for y, p in pmf.items()) - mean**2
    assert var <= float(sigma2) + 1e-12
    arr = np.array(samples, dtype=float)
    assert abs(arr.mean()) < 6 * math.sqrt(var / arr.size)
    assert abs(arr.var() - var) < 6 * var * math.sqrt(2 / arr.size)
    # and a Kolmogorov-Smirnov check of the whole CDF
    ys = np.array(sorted(pmf))
    cdf = np.cumsum([pmf[y] for y in ys])
    ks = np.max(np.abs(np.searchsorted(np.sort(arr), ys, side="right") / arr.size - cdf))
    assert ks < 1.95 / math.sqrt(arr.size)  # 0.1% critical value (conservative when discrete)


def test_discrete_gaussian_from_os_entropy_has_the_right_moments():
    samples = np.array([discrete_gaussian(Fraction(4)) for _ in range(4000)], dtype=float)
    assert abs(samples.mean()) < 6 * 2 / math.sqrt(samples.size)
    assert abs(samples.var() - 4.0) < 6 * 4.0 * math.sqrt(2 / samples.size)


@given(
    num=st.integers(min_value=1, max_value=10**30), den=st.integers(min_value=1, max_value=10**30)
)
def test_discrete_gaussian_returns_an_int_for_any_rational_variance(num, den):
    variance = Fraction(num, den)
    y = discrete_gaussian(variance, random.Random(num ^ den))
    # An exact integer, never a float, and inside a 40σ tail bound (P[|Y| > 40σ + 1] < e^-800).
    assert isinstance(y, int) and abs(y) <= 40 * math.sqrt(variance) + 1
    assert y == discrete_gaussian(variance, random.Random(num ^ den))  # a function of the coins


# ---------------------------------------------------------------------------- the size release
def test_rounded_laplace_matches_the_rounded_laplace_pmf():
    psi = 3.0
    rng = random.Random(11)
    samples = [rounded_laplace(psi, rng) for _ in range(30_000)]
    pmf = {0: 1 - math.exp(-1 / (2 * psi))}
    for k in range(1, 300):
        pmf[k] = pmf[-k] = 0.5 * math.exp(-(k - 0.5) / psi) * (1 - math.exp(-1 / psi))
    assert _chisquare(samples, pmf) > 1e-4


def test_rounded_laplace_is_the_rounding_of_a_laplace():
    """Same pmf as rounding continuous Laplace draws (two-sample chi-square on binned counts)."""
    psi = 2.5
    rng = random.Random(3)
    ours = np.array([rounded_laplace(psi, rng) for _ in range(20_000)])
    theirs = np.round(np.random.default_rng(3).laplace(0, psi, 20_000)).astype(int)
    bins = np.arange(-8, 10) - 0.5
    a, _ = np.histogram(np.clip(ours, -8, 8), bins)
    b, _ = np.histogram(np.clip(theirs, -8, 8), bins)
    assert stats.chi2_contingency(np.stack([a, b]))[1] > 1e-4


def test_release_size_is_integer_valued_rounded_laplace_from_os_entropy():
    """Replacement for test_data.py::test_release_size_distribution_from_os_entropy, which still
    expects continuous Laplace values: the secure release is n + round(Lap(ψ))."""
    n, psi, draws = 10_000, 20.0, 20_000
    values = np.array([release_size(n, psi) for _ in range(draws)])
    assert np.all(values == np.round(values))
    noise = (values - n).astype(int)
    assert abs(noise.mean()) < 5 * psi * math.sqrt(2 / draws)
    assert abs(np.abs(noise).mean() - psi) < 5 * psi / math.sqrt(draws)
    # the shape: P[|Y| >= k] = exp(-(k - 1/2)/psi) for k >= 1, checked at a few k
    for k in (1, 10, 40):
        p = math.exp(-(k - 0.5) / psi)
        assert abs(np.mean(np.abs(noise) >= k) - p) < 6 * math.sqrt(p * (1 - p) / draws)


def test_os_entropy_laplace_keeps_its_signature():
    value = data._os_entropy_laplace(4.0)
    assert isinstance(value, float) and value == round(value)


# ---------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("std", [1e-6, 0.3, 1.0, 2.0, 3.7, 1234.5])
def test_noise_grid_is_a_power_of_two_that_resolves_the_std(std):
    g = noise_grid(std)
    mantissa, _ = math.frexp(g)
    assert mantissa == 0.5  # a power of two
    assert 2**GRID_BITS <= std / g < 2 ** (GRID_BITS + 1)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_noise_grid_refuses_bad_std(bad):
    with pytest.raises(ValueError):
        noise_grid(bad)


def test_secure_gaussian_is_gaussian_with_the_requested_std():
    std = 2.5
    v = secure_gaussian(4000, std, random.Random(8))
    assert v.dtype == torch.float64 and v.shape == (4000,)
    assert stats.kstest(v.numpy(), stats.norm(scale=std).cdf).pvalue > 1e-4
    assert torch.equal(secure_gaussian(3, 0.0), torch.zeros(3, dtype=torch.float64))


def test_secure_gaussian_is_dithered_off_the_grid():
    v = secure_gaussian(200, 1.0, random.Random(1)).numpy()
    g = noise_grid(1.0)
    assert np.mean(v / g == np.round(v / g)) < 0.05


def test_snapped_sum_lies_exactly_on_the_grid():
    x = torch.tensor([0.0, 1e-12, -0.37, 123.456, 1e6], dtype=torch.float64)
    std = 1.7
    g = noise_grid(std)
    out = snapped_noisy_sum(x, std, sensitivity=0.85, rng=random.Random(2))
    scaled = out / g
    assert torch.equal(scaled, torch.round(scaled))
    # and the noise is integer grid units around round(x/g)
    noise = scaled - torch.round(x / g)
    assert torch.equal(noise, torch.round(noise))


@given(
    values=st.lists(
        st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=8,
    ),
    std=st.floats(min_value=1e-3, max_value=1e3),
)
def test_snapped_sum_has_no_float_artefacts(values, std):
    """Whatever the input, the output is g times an integer (computed exactly), so its low-order
    bits say nothing beyond that integer."""
    x = torch.tensor(values, dtype=torch.float64)
    out = snapped_noisy_sum(x, std, rng=random.Random(len(values)))
    g = noise_grid(std)
    for o in out.tolist():
        assert Fraction(o) / Fraction(g) == int(Fraction(o) / Fraction(g))


def test_snapped_sum_inflates_the_noise_to_cover_rounding(monkeypatch):
    seen = []

    def fake(sigma2, rng=None):
        seen.append(sigma2)
        return 0

    monkeypatch.setattr(secure_noise, "discrete_gaussian", fake)
    std, c, k = 3.0, 1.5, 10
    snapped_noisy_sum(torch.zeros(k, dtype=torch.float64), std, sensitivity=c)
    g = Fraction(noise_grid(std))
    sigma_g = Fraction(std) / Fraction(c) * (Fraction(c) / g + 4)  # ⌈√10⌉ = 4
    assert seen == [sigma_g**2] * k
    # the integer mechanism's noise multiplier: σ_g / (c/g + √K) ≥ σ = std/c
    assert sigma_g / (Fraction(c) / g + Fraction(math.sqrt(k))) >= Fraction(std) / Fraction(c)
    seen.clear()
    snapped_noisy_sum(torch.zeros(2, dtype=torch.float64), std)
    assert seen == [(Fraction(std) / g) ** 2] * 2


def test_snapped_sum_noise_has_the_requested_std():
    out = snapped_noisy_sum(torch.zeros(3000, dtype=torch.float64), 0.8, rng=random.Random(4))
    assert stats.kstest(out.numpy(), stats.norm(scale=0.8).cdf).pvalue > 1e-4


def test_snapped_sum_refuses_bad_input():
    with pytest.raises(TypeError):
        snapped_noisy_sum(torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError):
        snapped_noisy_sum(torch.tensor([math.nan]), 1.0)
    with pytest.raises(ValueError):
        snapped_noisy_sum(torch.zeros(2), -1.0)


# ---------------------------------------------------------------------------- NoiseSource wiring
def test_os_noise_goes_through_the_secure_sampler(monkeypatch):
    calls = []
    real = secure_noise.secure_gaussian

    def traced(k, std, rng=None):
        calls.append((k, std))
        return real(k, std, rng)

    monkeypatch.setattr(secure_noise, "secure_gaussian", traced)
    v = NoiseSource().sample(5, 2.0)
    assert calls == [(5, 2.0)] and v.shape == (5,) and v.dtype == torch.float64
    assert zn.sample_noise(3, 1.0, None).shape == (3,)


def test_seeded_noise_is_unchanged_float_normals():
    with pytest.warns(zn.PredictableNoiseWarning):
        source = NoiseSource(7)
    expected = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(source.sample(4, 1.5), expected * 1.5)


def test_add_noise_os_mode_is_exact_on_the_grid_and_seeded_mode_adds():
    x = torch.tensor([0.25, -3.0, 7.125], dtype=torch.float64)
    out = NoiseSource().add_noise(x, 0.5, sensitivity=1.0)
    g = noise_grid(0.5)
    assert torch.equal(out / g, torch.round(out / g))
    with pytest.warns(zn.PredictableNoiseWarning):
        a, b = NoiseSource(3), NoiseSource(3)
    assert torch.equal(a.add_noise(x, 0.5), x + b.sample(3, 0.5))


def test_entropy_pool_is_uniform_and_refills_after_fork(monkeypatch):
    pool = secure_noise._EntropyPool()
    draws = [pool.randrange(6) for _ in range(6000)]
    assert stats.chisquare(np.bincount(draws, minlength=6)).pvalue > 1e-5
    assert pool.randrange(1) == 0
    with pytest.raises(ValueError):
        pool.randrange(0)
    before = pool._buffer
    monkeypatch.setattr(secure_noise.os, "getpid", lambda: -42)  # as in a forked child
    pool.randrange(2**16)
    assert pool._buffer is not before and pool._pid == -42


# ---------------------------------------------------------------------------- privacy of the pmfs
@pytest.mark.parametrize("psi", [0.3, 1.0, 5.0, 40.0])
def test_rounded_laplace_release_is_exactly_one_over_psi_pure_dp(psi):
    """n + Y versus n + 1 + Y: the worst log-ratio of the pmf at neighbouring integers is 1/ψ."""
    a = 1 / (2 * psi)
    pmf = {0: -math.expm1(-a)}
    for k in range(1, 400):
        pmf[k] = pmf[-k] = 0.5 * math.exp(-(k - 0.5) / psi) * -math.expm1(-1 / psi)
    ratios = [abs(math.log(pmf[k] / pmf[k - 1])) for k in range(-398, 400) if pmf[k] > 1e-300]
    assert max(ratios) == pytest.approx(1 / psi, rel=1e-9)
    assert max(ratios) <= 1 / psi * (1 + 1e-12)


def _dg_logpmf(sigma: float, shift: int = 0) -> np.ndarray:
    bound = 60 * math.ceil(sigma) + 60
    ys = np.arange(-bound, bound + 1)
    logw = -((ys - shift) ** 2) / (2 * sigma**2)
    return logw - special.logsumexp(logw)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_discrete_gaussian_rdp_is_at_most_the_continuous_one(sigma):
    """CKS 2020: D_α(N_Z(0,σ²) ‖ N_Z(Δ,σ²)) ≤ αΔ²/(2σ²) for integer shifts Δ."""
    logp = _dg_logpmf(sigma)
    for shift in (1, 2):
        logq = _dg_logpmf(sigma, shift)
        for alpha in (1.5, 2.0, 5.0, 16.0):
            d = special.logsumexp(alpha * logp + (1 - alpha) * logq) / (alpha - 1)
            assert d <= alpha * shift**2 / (2 * sigma**2) * (1 + 1e-9)


@pytest.mark.parametrize("sigma, q", [(0.8, 0.3), (1.0, 0.05), (2.0, 0.5)])
def test_subsampled_discrete_gaussian_is_covered_by_the_accountant_at_integer_orders(sigma, q):
    """The accountant charges the Poisson-subsampled continuous Gaussian; at integer orders the
    discrete one is covered in both directions of the divergence (numerically, to 1e-9)."""
    from zoprivacy.accounting import rdp_subsampled_gaussian

    logp, logp1 = _dg_logpmf(sigma), _dg_logpmf(sigma, 1)
    logmix = np.logaddexp(math.log1p(-q) + logp, math.log(q) + logp1)
    for alpha in (2, 3, 5, 8):
        charged = rdp_subsampled_gaussian(q, sigma, [float(alpha)])[0]
        for log_a, log_b in ((logmix, logp), (logp, logmix)):  # D_α(a ‖ b)
            d = special.logsumexp(alpha * log_a + (1 - alpha) * log_b) / (alpha - 1)
            assert d <= charged * (1 + 1e-9) + 1e-15
