"""The trade-off curve of one Poisson-subsampled Gaussian step, and its inversion: the family
bound that turns a test's error rates into an upper bound on the noise multiplier.

f-DP (Dong, Roth and Su 2019, Definition 2.1) describes a mechanism by its trade-off curve
β(α): the smallest false-negative rate of any test of "D0 or D1?" whose false-positive rate is
α. The curve and the privacy profile of :mod:`zoprivacy.accounting.profile` are dual
(Proposition 2.12 there).
"""

from __future__ import annotations

import numpy as np
from scipy import special

from zoprivacy import checks as check
from zoprivacy.accounting.profile import _rate_and_noise

__all__ = ["mu_from_rates", "subsampled_gaussian_tradeoff"]


def subsampled_gaussian_tradeoff(q: float, sigma: float, fpr: float) -> float:
    """β(α) of one subsampled-Gaussian step for the test "is the record present?" (null
    Q = N(0, σ²), alternative P = (1−q)·N(0, σ²) + q·N(1, σ²), as in
    :func:`~zoprivacy.accounting.profile.subsampled_gaussian_deltas`). By Neyman-Pearson the
    best test thresholds x (the likelihood ratio is increasing): with a = Φ⁻¹(1 − α),
    β(α) = P(X ≤ σa) = (1 − q)(1 − α) + q·Φ(a − 1/σ)
    (at q = 1 the Gaussian curve Φ(Φ⁻¹(1 − α) − μ), Dong, Roth and Su 2019, eq. (2.3))."""
    q, sigma = _rate_and_noise(q, sigma)
    alpha = check.as_real("fpr", fpr)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {alpha!r}")
    if sigma == 0.0:  # no noise: "x > ½" has FPR 0 and FNR 1 − q
        return (1.0 - q) * (1.0 - alpha)
    a = -float(special.ndtri(alpha))
    return (1.0 - q) * (1.0 - alpha) + q * float(special.ndtr(a - 1.0 / sigma))


def mu_from_rates(
    fpr: np.ndarray | float, fnr: np.ndarray | float, sample_rate: float = 1.0
) -> np.ndarray:
    """The largest 1/σ' for which (FPR, FNR) lies on or above the trade-off curve of the
    subsampled Gaussian with rate q (:func:`subsampled_gaussian_tradeoff`): solving
    β = (1 − q)(1 − α) + q·Φ(Φ⁻¹(1 − α) − 1/σ') gives
    1/σ' = Φ⁻¹(1 − α) − Φ⁻¹((β − (1 − q)(1 − α))/q).

    At q = 1 this is the GDP μ = Φ⁻¹(1 − FPR) − Φ⁻¹(FNR) (Dong, Roth and Su 2019, Corollary
    2.13). +inf when no rate-q subsampled Gaussian allows the point (β < (1 − q)(1 − α)); −inf
    or below when any does. With upper confidence ends for the rates, a rate-q subsampled
    Gaussian with noise above 1/value is ruled out at that confidence (the audit's family
    bound)."""
    q = check.sample_rate(sample_rate)
    fpr = np.asarray(fpr, float)
    fnr = np.asarray(fnr, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        target = fnr if q >= 1.0 else np.clip((fnr - (1.0 - q) * (1.0 - fpr)) / q, 0.0, 1.0)
        value = -special.ndtri(fpr) - special.ndtri(target)
    return np.nan_to_num(value, nan=-np.inf, posinf=np.inf, neginf=-np.inf)
