"""Calibration: the smallest noise multiplier that meets a target (ε, δ) (docs/design.md).

The dataset-size release gets ``size_fraction`` of ε as pure DP, ψ = 1/(size_fraction·ε), as in the
paper (5%); the noise multiplier σ is then the smallest one whose *jointly composed* guarantee
(Lemma 5: Laplace + T subsampled-Gaussian steps in RDP, converted once with Lemma 8) is <= ε. This
is tighter than splitting ε into 95% + 5% and composing basically, as the paper's artifact does.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy.optimize import brentq

from zoprivacy import checks as check
from zoprivacy.accounting.conversion import rdp_to_dp
from zoprivacy.accounting.epsilon import Accountant, composed_rdp
from zoprivacy.accounting.errors import OrderRangeWarning
from zoprivacy.accounting.orders import DEFAULT_ORDERS, MAX_ORDER, extended_orders
from zoprivacy.accounting.pld import pld_epsilon
from zoprivacy.accounting.rdp import rdp_laplace

#: Relative precision of the noise multiplier returned by :func:`calibrate`.
SIGMA_RTOL = 1e-6
#: Number of orders around the current best one used during the root search (see _search_orders).
_WINDOW = 5


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """Result of :func:`calibrate`: the noise to use and the guarantee it achieves.

    Attributes:
        noise_multiplier: σ for the Gaussian steps (0.0 when ``steps = 0``).
        laplace_scale: ψ for the dataset-size release, ``None`` when ``size_fraction = 0``.
        epsilon: ε actually achieved by (σ, ψ); never above ``target_epsilon``.
        best_order: the Rényi order that gives ``epsilon`` (``nan`` for PLD, ``inf`` when the
            pure-DP bound of the size release is used).
        target_epsilon, delta, sample_rate, steps, size_fraction, accountant: the inputs.
        orders: the Rényi orders the guarantee was computed on (extended beyond the default list
            for small targets); an :class:`RDPAccountant` tracking this run should use them.
    """

    noise_multiplier: float
    laplace_scale: float | None
    epsilon: float
    best_order: float
    target_epsilon: float
    delta: float
    sample_rate: float
    steps: int
    size_fraction: float
    accountant: str
    orders: tuple[float, ...] = dataclasses.field(default=tuple(DEFAULT_ORDERS), repr=False)


def _rdp_epsilon(sigma, q, steps, delta, psi, orders) -> tuple[float, float]:
    rdp = composed_rdp(
        noise_multiplier=sigma, sample_rate=q, steps=steps, laplace_scale=psi, orders=orders
    )
    return rdp_to_dp(orders, rdp, delta, warn_at_edge=False)


def _floor_epsilon(delta: float, psi: float | None, orders: np.ndarray) -> tuple[float, float]:
    """ε as σ → ∞: the size release plus the conversion term of Lemma 8."""
    rdp = np.zeros_like(orders) if psi is None else rdp_laplace(psi, orders)
    return rdp_to_dp(orders, rdp, delta, warn_at_edge=False)


def _smallest_reachable(delta: float, size_fraction: float, orders: np.ndarray) -> float:
    """Smallest target ε for which some finite σ works (the floor grows with ε through ψ)."""

    def gap(e: float) -> float:
        psi = None if size_fraction == 0.0 else 1.0 / (size_fraction * e)
        return _floor_epsilon(delta, psi, orders)[0] - e

    hi = 1.0
    while gap(hi) > 0.0:
        hi *= 2.0
    return float(brentq(gap, 1e-12, hi, rtol=1e-10))


def _search_orders(orders: np.ndarray, best: float) -> np.ndarray:
    """A few orders on each side of ``best``: ε is a min over orders, so searching on a subset
    can only overstate ε (the σ found is safe) and the full list is checked afterwards."""
    idx = int(np.searchsorted(orders, best))
    return orders[max(0, idx - _WINDOW) : idx + _WINDOW + 1]


#: A coarse order list used only to bracket σ (a subset: its ε is an upper bound, hence safe).
_COARSE_ORDERS = np.array([2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256], float)


def _best_order(sigma, q, steps, delta, psi, orders) -> float:
    """argmin over ``orders`` of ε_α(σ) by ternary search (ε_α(σ) is unimodal in α in practice;
    if it were not, the window check in :func:`_calibrate_rdp` would still keep σ safe)."""
    cache: dict[int, float] = {}

    def eps_at(k: int) -> float:
        if k not in cache:
            cache[k] = _rdp_epsilon(sigma, q, steps, delta, psi, orders[k : k + 1])[0]
        return cache[k]

    lo, hi = 0, len(orders) - 1
    while hi - lo > 2:
        m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
        if eps_at(m1) <= eps_at(m2):
            hi = m2
        else:
            lo = m1
    return float(orders[min(range(lo, hi + 1), key=eps_at)])


def _reachable_orders(target, delta, psi, orders, orders_given) -> np.ndarray:
    """The orders to search, extended while the best one sits at the top of the list; raises
    when even infinite noise cannot reach ``target``."""
    floor, best = _floor_epsilon(delta, psi, orders)
    while floor >= target and best == orders[-1] and not orders_given and best < MAX_ORDER:
        orders = extended_orders(orders)
        floor, best = _floor_epsilon(delta, psi, orders)
    if floor >= target:
        raise ValueError(
            "target epsilon cannot be reached: even infinite noise leaves "
            f"ε = {floor:.6g} >= {target:g} (delta = {delta:g}, orders up to {orders[-1]:g})"
        )
    return orders


def _coarse_bracket(target, q, steps, delta, psi, orders, orders_given) -> tuple[float, float]:
    """A bracket (lo, hi) of σ with hi safe, from a coarse subset of the orders when its ε can
    reach the target (else from the full list), tightened around a rough root."""
    coarse = orders if orders_given else _COARSE_ORDERS
    if _floor_epsilon(delta, psi, coarse)[0] >= target:
        coarse = orders
    memo: dict[float, float] = {}

    def excess(s: float) -> float:
        if s not in memo:
            memo[s] = _rdp_epsilon(s, q, steps, delta, psi, coarse)[0] - target
        return memo[s]

    hi = 1.0
    while excess(hi) > 0.0:
        hi *= 2.0
    lo = hi / 2.0
    while excess(lo) <= 0.0:
        hi, lo = lo, lo / 2.0
    # A rough root on the coarse subset tells where the best order of the full list is.
    rough = float(brentq(excess, lo, hi, rtol=1e-2))
    if excess(rough * 1.02) <= 0.0:
        hi = rough * 1.02
    return lo, hi


def _calibrate_rdp(
    target, delta, q, steps, psi, orders, orders_given
) -> tuple[float, float, float, np.ndarray]:
    """Returns (σ, ε achieved, best order, the orders searched).

    ε(σ) = min over orders of ε_α(σ), so σ* = min over orders of σ*_α, and searching on any
    subset of the orders can only overstate ε: every σ found on a subset is safe. The search
    brackets σ on a coarse subset, locates the best order by ternary search, solves on a window
    of orders around it, and re-centres the window until the best order is strictly inside.
    """
    orders = _reachable_orders(target, delta, psi, orders, orders_given)
    lo, hi = _coarse_bracket(target, q, steps, delta, psi, orders, orders_given)
    # 3. Root search on a window of orders, re-centred until the best order is inside it.
    memo: dict[tuple[float, int], float] = {}
    best = _best_order(hi, q, steps, delta, psi, orders)
    for _ in range(16):
        if best >= orders[-1] and not orders_given and orders[-1] < MAX_ORDER:
            orders = extended_orders(orders)
        window = _search_orders(orders, best)

        def excess(s: float, window: np.ndarray = window) -> float:
            key = (s, id(window))
            if key not in memo:
                memo[key] = _rdp_epsilon(s, q, steps, delta, psi, window)[0] - target
            return memo[key]

        if excess(hi) > 0.0:  # the window misses the best order at the top of the bracket
            best = _best_order(hi, q, steps, delta, psi, orders)
            hi *= 1.1
            continue
        near = hi * 0.9  # σ* is usually within 10% of a safe hi: try the narrow bracket first
        if excess(near) <= 0.0:
            near = lo
            if excess(lo) <= 0.0:
                hi, lo = lo, lo / 2.0
                continue
        sigma = float(brentq(excess, near, hi, rtol=SIGMA_RTOL / 8, xtol=1e-12))
        nudge = SIGMA_RTOL / 8  # always return the safe side
        while excess(sigma) > 0.0:
            sigma *= 1.0 + nudge
            nudge *= 2.0
        eps, best_window = _rdp_epsilon(sigma, q, steps, delta, psi, window)
        lo_ok = window[0] < best_window or window[0] == orders[0]
        hi_ok = best_window < window[-1] or (window[-1] == orders[-1] and orders_given)
        if lo_ok and hi_ok:
            return sigma, eps, best_window, orders
        # The optimum left the window: re-centre on the best order at this σ.
        best = _best_order(sigma, q, steps, delta, psi, orders)
        hi = sigma
    raise RuntimeError("calibration did not settle on a Rényi order; please report this bug")


def calibrate(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    size_fraction: float = 0.05,
    orders: Sequence[float] | np.ndarray | None = None,
    accountant: Accountant = "rdp",
) -> PrivacyPlan:
    """Noise multiplier σ and Laplace scale ψ that make a run (ε, δ)-DP (Lemma 5 + Lemma 8).

    ψ = 1/(size_fraction·ε) (pure DP for the size release); σ is the smallest noise multiplier
    whose composed guarantee is <= ε, found with a bracketed root finder (``scipy.optimize.brentq``)
    to relative precision 1e-6 and always returned on the safe side (ε(σ) <= target). When the
    best order is the largest of the default list, the list is extended (up to 2^20), so small
    targets stay reachable; an unreachable target raises ``ValueError`` naming the smallest
    reachable ε.

    Args:
        epsilon: target ε > 0.
        delta: δ in (0, 1).
        sample_rate: Poisson rate q in (0, 1].
        steps: number of steps T >= 0.
        size_fraction: share of ε given to the size release, in [0, 1); 0 = no release.
        orders: Rényi orders (default :data:`DEFAULT_ORDERS`, extended when needed); given
            orders are used as they are.
        accountant: ``"rdp"`` or ``"pld"`` (σ found on the PLD accountant's ε, needs
            ``dp-accounting``; slower).
    """
    target = check.epsilon(epsilon)
    d = check.delta(delta)
    q = check.sample_rate(sample_rate)
    t = check.steps(steps)
    f = check.size_fraction(size_fraction)
    alphas = DEFAULT_ORDERS if orders is None else np.unique(check.orders(orders))
    if accountant not in ("rdp", "pld"):
        raise ValueError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")
    psi = None if f == 0.0 else 1.0 / (f * target)
    common = dict(
        target_epsilon=target,
        delta=d,
        sample_rate=q,
        steps=t,
        size_fraction=f,
        accountant=accountant,
    )
    if t == 0:
        eps = 0.0 if psi is None else 1.0 / psi
        return PrivacyPlan(0.0, psi, eps, math.inf, **common)
    try:
        sigma, eps, best, alphas = _calibrate_rdp(target, d, q, t, psi, alphas, orders is not None)
    except ValueError as exc:
        if "cannot be reached" not in str(exc):
            raise
        reach = _smallest_reachable(d, f, alphas if orders is not None else _max_orders())
        raise ValueError(
            f"epsilon={target:g} cannot be reached with delta={d:g} and "
            f"size_fraction={f:g}: {exc}. The smallest reachable epsilon is about {reach:.4g}; "
            "raise epsilon or delta, or lower size_fraction."
        ) from None
    if accountant == "pld":
        sigma = _calibrate_pld(target, d, q, t, psi, sigma_rdp=sigma)
        eps = pld_epsilon(
            noise_multiplier=sigma, sample_rate=q, steps=t, delta=d, laplace_scale=psi
        )
        return PrivacyPlan(sigma, psi, eps, math.nan, **common, orders=tuple(alphas.tolist()))
    return PrivacyPlan(sigma, psi, eps, best, **common, orders=tuple(alphas.tolist()))


def _max_orders() -> np.ndarray:
    orders = DEFAULT_ORDERS
    while orders[-1] < MAX_ORDER:
        orders = extended_orders(orders)
    return orders


def _calibrate_pld(target, delta, q, steps, psi, *, sigma_rdp: float) -> float:
    """σ on the PLD accountant, bracketed below the RDP answer (PLD ε <= RDP ε)."""

    def excess(s: float) -> float:
        return (
            pld_epsilon(
                noise_multiplier=s, sample_rate=q, steps=steps, delta=delta, laplace_scale=psi
            )
            - target
        )

    hi = sigma_rdp
    while excess(hi) > 0.0:  # discretisation can make PLD slightly pessimistic
        hi *= 1.01
    lo = hi * 0.8
    while excess(lo) <= 0.0:
        hi, lo = lo, lo * 0.8
    sigma = float(brentq(excess, lo, hi, rtol=SIGMA_RTOL, xtol=1e-12))
    nudge = SIGMA_RTOL
    while excess(sigma) > 0.0:
        sigma *= 1.0 + nudge
        nudge *= 2.0
    return sigma


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int | None = None,
    epochs: float | None = None,
    accountant: Accountant = "rdp",
    **_ignored: object,
) -> float:
    """Opacus-style helper: σ for the Gaussian steps alone (no size release).

    Same keyword names as ``opacus.accountants.utils.get_noise_multiplier``; ``epochs`` is
    converted to ``steps = int(epochs / sample_rate)``. Extra Opacus keywords (such as
    ``epsilon_tolerance``) are accepted and ignored: the answer is always precise to 1e-6.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("pass exactly one of steps or epochs")
    if steps is None:
        steps = int(check.as_real("epochs", epochs) / check.sample_rate(sample_rate))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OrderRangeWarning)
        plan = calibrate(
            epsilon=target_epsilon,
            delta=target_delta,
            sample_rate=sample_rate,
            steps=steps,
            size_fraction=0.0,
            accountant=accountant,
        )
    return plan.noise_multiplier
