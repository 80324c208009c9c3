"""ε of a whole DP-AggZO run: the size release composed with T subsampled-Gaussian steps."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np

from zoprivacy import checks as check
from zoprivacy.accounting.conversion import rdp_to_dp
from zoprivacy.accounting.errors import OrderRangeWarning
from zoprivacy.accounting.orders import DEFAULT_ORDERS
from zoprivacy.accounting.pld import pld_epsilon
from zoprivacy.accounting.rdp import rdp_laplace, rdp_subsampled_gaussian

Accountant = Literal["rdp", "pld"]


def composed_rdp(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    laplace_scale: float | None,
    orders: np.ndarray,
) -> np.ndarray:
    """RDP curve of the whole run (Lemma 5): the Laplace release + ``steps`` Gaussian steps."""
    total = np.zeros_like(orders)
    if steps > 0:
        total = total + steps * rdp_subsampled_gaussian(sample_rate, noise_multiplier, orders)
    if laplace_scale is not None:
        total = total + rdp_laplace(laplace_scale, orders)
    return total


def epsilon_and_order(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    laplace_scale: float | None = None,
    orders: Sequence[float] | np.ndarray | None = None,
    warn_at_edge: bool = True,
) -> tuple[float, float]:
    """Like :func:`compute_epsilon` with the RDP accountant, also returning the best order.

    With ``steps = 0`` and a size release, the pure-DP value 1/ψ of the Laplace release is taken
    when it is smaller than the RDP route (the best order is then reported as ``inf``).
    """
    sigma = check.noise_multiplier(noise_multiplier)
    q = check.sample_rate(sample_rate)
    t = check.steps(steps)
    d = check.delta(delta)
    psi = None if laplace_scale is None else check.laplace_scale(laplace_scale)
    alphas = DEFAULT_ORDERS if orders is None else check.orders(orders)
    if t == 0 and psi is None:
        return 0.0, math.nan
    rdp = composed_rdp(
        noise_multiplier=sigma, sample_rate=q, steps=t, laplace_scale=psi, orders=alphas
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OrderRangeWarning)
        eps, order = rdp_to_dp(alphas, rdp, d, warn_at_edge=warn_at_edge)
    if t == 0 and psi is not None and 1.0 / psi <= eps:
        return 1.0 / psi, math.inf
    for w in caught:  # re-emit from the caller's frame
        warnings.warn(w.message, w.category, stacklevel=3)
    return eps, order


def compute_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    laplace_scale: float | None = None,
    orders: Sequence[float] | np.ndarray | None = None,
    accountant: Accountant = "rdp",
) -> float:
    """(ε, δ) guarantee of a DP-AggZO run (paper Lemma 5, converted with Lemma 8).

    The run is one Laplace release of the dataset size with scale ψ (``laplace_scale``; ``None``
    if the size is public or not released) and ``steps`` Poisson-subsampled Gaussian releases with
    noise multiplier σ at sample rate q. The K-vector released per step has L2 sensitivity c and
    noise σc per coordinate, so K does not enter the accounting.

    Args:
        noise_multiplier: σ >= 0 (σ = 0 with steps > 0 gives ε = inf).
        sample_rate: q in (0, 1].
        steps: number of steps T >= 0 (0: the size release alone).
        delta: δ in (0, 1).
        laplace_scale: ψ > 0 of the size release, or ``None``.
        orders: Rényi orders for ``accountant="rdp"`` (default :data:`DEFAULT_ORDERS`).
        accountant: ``"rdp"`` (Lemma 5 + Lemma 8) or ``"pld"`` (tight numerical accounting,
            needs ``dp-accounting``).

    Returns:
        ε (a float, possibly ``inf``).
    """
    if accountant == "rdp":
        eps, _ = epsilon_and_order(
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            delta=delta,
            laplace_scale=laplace_scale,
            orders=orders,
        )
        return eps
    if accountant == "pld":
        if orders is not None:
            raise ValueError("orders only applies to accountant='rdp'; drop it for 'pld'")
        return pld_epsilon(
            noise_multiplier=check.noise_multiplier(noise_multiplier),
            sample_rate=check.sample_rate(sample_rate),
            steps=check.steps(steps),
            delta=check.delta(delta),
            laplace_scale=None if laplace_scale is None else check.laplace_scale(laplace_scale),
        )
    raise ValueError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")
