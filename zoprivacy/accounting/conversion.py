"""Conversion from RDP to (ε, δ)-DP (paper Lemma 8, Canonne, Kamath and Steinke 2020)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from zoprivacy import checks as check
from zoprivacy.accounting.errors import OrderRangeWarning


def conversion_term(orders: np.ndarray, delta: float) -> np.ndarray:
    """The order-dependent term of Lemma 8: (log(1/δ) + (α−1) log(1 − 1/α) − log α) / (α − 1)."""
    am1 = orders - 1.0
    return (math.log(1.0 / delta) + am1 * np.log1p(-1.0 / orders) - np.log(orders)) / am1


def rdp_to_dp(
    orders: Sequence[float] | np.ndarray,
    rdp: Sequence[float] | np.ndarray,
    delta: float,
    *,
    warn_at_edge: bool = True,
) -> tuple[float, float]:
    """Best (ε, δ)-DP guarantee implied by an RDP curve (Lemma 8), minimised over the orders.

    ε = min_α [ ε(α) + (log(1/δ) + (α−1) log(1−1/α) − log α) / (α−1) ], clamped at 0 (a
    guarantee with smaller ε implies the one with ε = 0).

    Args:
        orders: Rényi orders α > 1.
        rdp: RDP values at those orders (>= 0; +inf allowed, NaN rejected).
        delta: target δ in (0, 1).
        warn_at_edge: emit :class:`OrderRangeWarning` when the best order is the smallest or the
            largest of the list (a wider list could then give a smaller ε).

    Returns:
        ``(epsilon, best_order)``; ``(inf, nan)`` when every order gives +inf.
    """
    alphas = check.orders(orders)
    d = check.delta(delta)
    values = np.asarray(rdp, dtype=float)
    if values.shape != alphas.shape:
        raise ValueError(
            f"rdp must have one value per order: got {values.shape} values for {alphas.shape} "
            "orders"
        )
    if np.any(np.isnan(values)):
        raise ValueError("rdp contains NaN; an RDP value that cannot be computed must be +inf")
    if np.any(values < 0.0):
        raise ValueError(f"rdp values must be >= 0, got {values[values < 0.0][:3].tolist()}")
    eps = values + conversion_term(alphas, d)
    if not np.any(np.isfinite(eps)):
        return math.inf, math.nan
    best = int(np.argmin(eps))
    if (
        warn_at_edge
        and alphas.size > 1
        and best in (int(np.argmin(alphas)), int(np.argmax(alphas)))
    ):
        warnings.warn(
            f"the best Rényi order {alphas[best]:g} is at the edge of the order list "
            f"[{alphas.min():g}, {alphas.max():g}]; a wider list may give a smaller ε",
            OrderRangeWarning,
            stacklevel=2,
        )
    return max(0.0, float(eps[best])), float(alphas[best])
