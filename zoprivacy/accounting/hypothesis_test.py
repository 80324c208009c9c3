"""What one distinguishing test proves about ε: the error rates it must keep under (ε, δ)-DP,
and Clopper-Pearson intervals on the rates it was measured to have.

An (ε, δ)-DP mechanism forces every test of "D0 or D1?" to satisfy
FPR + e^ε·FNR ≥ 1 − δ and FNR + e^ε·FPR ≥ 1 − δ (Kairouz, Oh and Viswanath 2015, Theorem 2.1;
Wasserman and Zhou 2010), so measured rates give a lower bound on ε (the method of Jagielski,
Ullman and Oprea 2020, "Auditing differentially private machine learning", Section 3).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from zoprivacy import checks as check

__all__ = ["clopper_pearson", "epsilon_from_rates"]


def clopper_pearson(
    successes: np.ndarray | int, trials: int, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Clopper-Pearson interval(s) for a binomial proportion (vectorised).

    Clopper and Pearson (1934): the ends are the α/2 and 1 − α/2 quantiles of
    Beta(k, n − k + 1) and Beta(k + 1, n − k), α = 1 − ``confidence`` (0 and 1 at k = 0 and
    k = n), which is what ``scipy.stats.binomtest(...).proportion_ci(method="exact")`` computes,
    here for arrays of counts."""
    n = check.integer("trials", trials, minimum=1)
    level = check.real("confidence", confidence, positive=True)
    if not level < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), e.g. 0.95, got {level!r}")
    k = np.asarray(successes, dtype=float)
    alpha = 1.0 - level
    with np.errstate(all="ignore"):
        lower = np.where(k > 0, stats.beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        upper = np.where(k < n, stats.beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    return np.nan_to_num(lower, nan=0.0), np.nan_to_num(upper, nan=1.0)


def epsilon_from_rates(
    fpr: np.ndarray | float, fnr: np.ndarray | float, delta: float
) -> tuple[np.ndarray, np.ndarray]:
    """The two (ε, δ) lower bounds of one test, log((1−δ−FNR)/FPR) and log((1−δ−FPR)/FNR):
    the two inequalities of Kairouz, Oh and Viswanath (2015), Theorem 2.1, solved for ε
    (−inf where a bound says nothing, +inf for a perfect test)."""
    d = check.delta(delta)
    fpr = np.asarray(fpr, dtype=float)
    fnr = np.asarray(fnr, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.log(np.maximum(1.0 - d - fnr, 0.0)) - np.log(fpr)
        second = np.log(np.maximum(1.0 - d - fpr, 0.0)) - np.log(fnr)
    return np.nan_to_num(first, nan=-np.inf), np.nan_to_num(second, nan=-np.inf)
