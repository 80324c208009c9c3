"""Exact privacy profiles δ(ε) of the Gaussian mechanism and of one Poisson-subsampled Gaussian
step, and the tight ε at a given δ.

The privacy profile of a mechanism M is δ(ε) = sup over neighbours of the hockey-stick
divergence ∫ max(0, p − e^ε r) (Balle, Barthe and Gaboardi 2018); M is (ε, δ)-DP exactly when
δ ≥ δ(ε), so the smallest such ε is the tight ε at δ, with no slack from RDP (Lemma 8) or from
a numerical accountant. The canary audit (:mod:`zoprivacy.audit`) uses these as the value no
attack can beat.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from scipy import optimize, special

from zoprivacy import checks as check

__all__ = [
    "gaussian_delta",
    "gaussian_epsilon",
    "subsampled_gaussian_delta",
    "subsampled_gaussian_deltas",
    "subsampled_gaussian_epsilon",
]

_MAX_EPSILON = 1e6  # a profile still above δ here: no finite ε reaches δ


def gaussian_delta(mu: float, epsilon: float) -> float:
    """Exact δ(ε) of the Gaussian mechanism with sensitivity/σ = μ (μ-GDP):
    δ(ε) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2) (Balle and Wang 2018, Theorem 8; Dong, Roth and
    Su 2019, Corollary 2.13). μ ≤ 0 gives 0."""
    mu = check.as_real("mu", mu)
    epsilon = check.as_real("epsilon", epsilon)
    if mu <= 0:
        return 0.0
    a = -epsilon / mu + mu / 2
    b = -epsilon / mu - mu / 2
    return float(special.ndtr(a) - math.exp(epsilon + special.log_ndtr(b)))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest ε ≥ 0 with :func:`gaussian_delta` (μ, ε) ≤ δ: the tight ε of μ-GDP at δ
    (0 for μ ≤ 0, inf for μ = inf)."""
    mu = check.as_real("mu", mu)
    d = check.delta(delta)
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    return epsilon_at_delta(lambda e: gaussian_delta(mu, e), d)


def subsampled_gaussian_delta(q: float, sigma: float, epsilon: float) -> float:
    """Exact δ(ε) of ONE Poisson-subsampled Gaussian step (sensitivity 1, noise σ, rate q) under
    add/remove adjacency: the larger of the two orderings of
    :func:`subsampled_gaussian_deltas`."""
    return max(subsampled_gaussian_deltas(q, sigma, epsilon))


def subsampled_gaussian_deltas(q: float, sigma: float, epsilon: float) -> tuple[float, float]:
    """(δ_{P‖Q}(ε), δ_{Q‖P}(ε)): the two hockey-stick divergences of
    P = (1−q)·N(0, σ²) + q·N(1, σ²) (the record is present) and Q = N(0, σ²) (it is absent).

    One projection is enough: along the record's contribution the two outputs differ only in the
    mixture weight; orthogonal coordinates have the same law under both (Balle, Barthe and
    Gaboardi 2018 reduce the subsampled Gaussian to this pair; Zhu, Dong and Wang 2022, the
    "dominating pair" of the Poisson-subsampled Gaussian). With the densities p and r of P and Q
    the likelihood ratio p/r(x) = 1 − q + q·exp((x − ½)/σ²) is increasing in x, so each
    δ(ε) = ∫ max(0, p − e^ε r) dx (Balle and Wang 2018, Theorem 5) is the integral over one
    half-line and has a closed form in Φ:

    * P‖Q: p > e^ε r ⇔ x > x* = σ²·log((e^ε − 1 + q)/q) + ½, so
      δ_{P‖Q}(ε) = q·Φ((1 − x*)/σ) − (e^ε − 1 + q)·Φ(−x*/σ);
    * Q‖P: r > e^ε p has solutions only when e^{−ε} > 1 − q (the ratio is never below 1 − q):
      x < x' = σ²·log((e^{−ε} − 1 + q)/q) + ½, and
      δ_{Q‖P}(ε) = (1 − e^ε(1 − q))·Φ(x'/σ) − e^ε·q·Φ((x' − 1)/σ); otherwise 0.

    At q = 1 both reduce to :func:`gaussian_delta` with μ = 1/σ. Both terms of each difference
    are computed in log space (:func:`scipy.special.log_ndtr`) so that small δ keeps its
    relative accuracy. Limits: σ = inf gives 0; σ = 0 (no noise) gives
    (q, max(0, 1 − e^ε(1 − q))).

    Args:
        q: sampling rate in (0, 1].
        sigma: noise multiplier σ ≥ 0 (noise std over sensitivity; inf allowed).
        epsilon: ε ≥ 0 (inf allowed).
    """
    q, sigma = _rate_and_noise(q, sigma)
    epsilon = check.as_real("epsilon", epsilon)
    if epsilon < 0.0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if math.isinf(epsilon) or math.isinf(sigma):
        return 0.0, 0.0
    if sigma == 0.0:  # P puts mass q on 1, where Q has none; Q puts 1 on 0, where P has 1 − q
        if q == 1.0:
            return 1.0, 1.0
        log_ratio = epsilon + math.log1p(-q)  # log(e^ε(1 − q)); δ_{Q‖P} = max(0, 1 − e^ε(1 − q))
        return q, (-math.expm1(log_ratio) if log_ratio < 0.0 else 0.0)
    return _forward_delta(q, sigma, epsilon), _backward_delta(q, sigma, epsilon)


def _forward_delta(q: float, sigma: float, epsilon: float) -> float:
    """δ_{P‖Q}(ε) for 0 < σ < inf; log(e^ε − 1 + q) = ε + log(1 − e^{−ε} + q·e^{−ε}), a sum of
    two positive terms."""
    log_shift = epsilon + math.log(-math.expm1(-epsilon) + q * math.exp(-epsilon))
    x_star = sigma * sigma * (log_shift - math.log(q)) + 0.5
    return _log_diff(
        math.log(q) + float(special.log_ndtr((1.0 - x_star) / sigma)),
        log_shift + float(special.log_ndtr(-x_star / sigma)),
    )


def _backward_delta(q: float, sigma: float, epsilon: float) -> float:
    """δ_{Q‖P}(ε) for 0 < σ < inf; 1 − e^ε(1 − q) = e^ε·(e^{−ε} − 1 + q). The gap
    e^{−ε} − (1 − q) is taken from the form without cancellation: for e^{−ε} < ½ a positive gap
    needs q > ½, where 1 − q is exact; otherwise expm1(−ε) keeps its relative accuracy."""
    gap = math.exp(-epsilon) - (1.0 - q) if epsilon > math.log(2.0) else q + math.expm1(-epsilon)
    if not gap > 0.0:
        return 0.0
    x_prime = sigma * sigma * (math.log(gap) - math.log(q)) + 0.5
    return _log_diff(
        epsilon + math.log(gap) + float(special.log_ndtr(x_prime / sigma)),
        epsilon + math.log(q) + float(special.log_ndtr((x_prime - 1.0) / sigma)),
    )


def subsampled_gaussian_epsilon(q: float, sigma: float, delta: float) -> float:
    """Tight ε of ONE Poisson-subsampled Gaussian step at δ: the smallest ε ≥ 0 with
    :func:`subsampled_gaussian_delta` (q, σ, ε) ≤ δ (+inf when no finite ε reaches δ, e.g.
    σ = 0, δ < q). At q = 1 this is :func:`gaussian_epsilon` with μ = 1/σ."""
    q, sigma = _rate_and_noise(q, sigma)
    d = check.delta(delta)
    return epsilon_at_delta(lambda e: subsampled_gaussian_delta(q, sigma, e), d)


def epsilon_at_delta(profile: Callable[[float], float], delta: float) -> float:
    """The smallest ε ≥ 0 with ``profile(ε) ≤ δ`` for a continuous, non-increasing privacy
    profile: 0 when δ(0) ≤ δ, +inf when δ(10^6) > δ, else the root of δ(ε) = δ bracketed by
    doubling and found by :func:`scipy.optimize.brentq`."""
    if profile(0.0) <= delta:
        return 0.0
    hi = 1.0
    while profile(hi) > delta:
        hi *= 2
        if hi > _MAX_EPSILON:
            return math.inf
    return float(optimize.brentq(lambda e: profile(e) - delta, 0.0, hi, xtol=1e-12))


def _rate_and_noise(q: object, sigma: object) -> tuple[float, float]:
    """q in (0, 1] and σ ≥ 0, where σ = inf (no information) is allowed, unlike
    :func:`zoprivacy.checks.noise_multiplier`."""
    rate = check.sample_rate(q, "q (sample_rate)")
    noise = check.as_real("sigma (noise_multiplier)", sigma)
    if noise < 0.0:
        raise ValueError(f"sigma (noise_multiplier) must be >= 0 (inf allowed), got {noise!r}")
    return rate, noise


def _log_diff(log_a: float, log_b: float) -> float:
    """e^{log_a} − e^{log_b}, clamped at 0, without cancelling to 0 when both are tiny."""
    if not log_a > log_b:
        return 0.0
    return float(math.exp(log_a) * -math.expm1(log_b - log_a))
