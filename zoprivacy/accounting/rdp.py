"""Rényi DP of the two releases of DP-AggZO (paper Lemma 5, Lemma 6; Mironov et al. 2019).

All sums are taken in log space (``scipy.special.gammaln``, ``gammasgn``, ``log_ndtr``). An order
whose value cannot be computed reliably is reported as ``+inf``: it can only make ε larger, never
smaller, so a numerical failure never weakens the guarantee.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy.special import gammaln, gammasgn, log_ndtr

from zoprivacy import checks as check

#: Truncation target of the fractional-order series, relative to A_α (A_α >= 1).
_FRAC_SERIES_RTOL = 1e-15
#: Give up (and report +inf) once the fractional series needs more terms than this.
_FRAC_SERIES_MAX_TERMS = 1 << 17
#: Below this noise multiplier every order's RDP exceeds ~1e7 (e^{1/σ²} terms): report +inf.
_SIGMA_FLOOR = 1e-4
#: σ-free weights are cached only for arrays up to this length (bounded memory, ~100 MB at most).
_CACHE_MAX_TERMS = 1 << 13


def _logsumexp(log_terms: np.ndarray, signs: np.ndarray | None = None) -> tuple[float, float]:
    """log|Σ s_i e^{x_i}| and its sign.

    Same maths as ``scipy.special.logsumexp(..., b=signs, return_sign=True)``; written out because
    SciPy's array-API dispatch costs ~100 µs per call, which was 60% of a calibration's run time.
    """
    top = float(np.max(log_terms))
    if not np.isfinite(top):
        return top, 1.0
    weights = np.exp(log_terms - top)
    total = float(np.sum(weights if signs is None else signs * weights))
    if total == 0.0:
        return -math.inf, 0.0
    return top + math.log(abs(total)), math.copysign(1.0, total)


def _log_expm1(x: np.ndarray) -> np.ndarray:
    """log(e^x − 1) for x > 0, accurate for tiny and huge x."""
    x = np.asarray(x, dtype=float)
    with np.errstate(divide="ignore"):
        return np.where(
            x > 30.0,
            x + np.log1p(-np.exp(-np.minimum(x, 700.0))),
            np.log(np.expm1(np.minimum(x, 30.0))),
        )


def _readonly(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for arr in arrays:
        arr.flags.writeable = False
    return arrays


def _integer_weights_uncached(q: float, alpha: int) -> tuple[np.ndarray, np.ndarray]:
    """h = 2..α and log[C(α,h) (1−q)^{α−h} q^h]: the σ-free part of Lemma 6, cached because a
    calibration evaluates the same orders at many σ."""
    h = np.arange(2, alpha + 1, dtype=float)
    log_binom = gammaln(alpha + 1.0) - gammaln(h + 1.0) - gammaln(alpha - h + 1.0)
    return _readonly(h, log_binom + (alpha - h) * math.log1p(-q) + h * math.log(q))


def _fractional_weights_uncached(q: float, alpha: float, n_terms: int) -> tuple[np.ndarray, ...]:
    """σ-free parts of the first ``n_terms`` terms of the fractional series (cached)."""
    i = np.arange(n_terms, dtype=float)
    j = alpha - i
    arg = alpha - i + 1.0
    vanishes = float(alpha).is_integer() & (arg <= 0.0)  # C(α, i) = 0 for integer α, i > α
    with np.errstate(divide="ignore", invalid="ignore"):
        log_binom = np.where(
            vanishes, -np.inf, gammaln(alpha + 1.0) - gammaln(i + 1.0) - gammaln(arg)
        )
        sign = np.where(vanishes, 0.0, gammasgn(arg))
    log_q, log_1mq = math.log(q), math.log1p(-q)
    log_w0 = log_binom + i * log_q + j * log_1mq
    log_w1 = log_binom + j * log_q + i * log_1mq
    return _readonly(i, j, sign, log_w0, log_w1)


_integer_weights_cached = functools.lru_cache(maxsize=1024)(_integer_weights_uncached)
_fractional_weights_cached = functools.lru_cache(maxsize=512)(_fractional_weights_uncached)


def _integer_weights(q: float, alpha: int) -> tuple[np.ndarray, np.ndarray]:
    if alpha <= _CACHE_MAX_TERMS:
        return _integer_weights_cached(q, alpha)
    return _integer_weights_uncached(q, alpha)


def _fractional_weights(q: float, alpha: float, n_terms: int) -> tuple[np.ndarray, ...]:
    if n_terms <= _CACHE_MAX_TERMS:
        return _fractional_weights_cached(q, alpha, n_terms)
    return _fractional_weights_uncached(q, alpha, n_terms)


_integer_weights.cache_clear = _integer_weights_cached.cache_clear  # type: ignore[attr-defined]
_fractional_weights.cache_clear = _fractional_weights_cached.cache_clear  # type: ignore[attr-defined]


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log A_α for integer α >= 2 by the binomial sum of Lemma 6, written with positive terms only.

    A_α = Σ_{h=0}^{α} C(α,h) (1−q)^{α−h} q^h e^{h(h−1)/(2σ²)}
        = 1 + Σ_{h=2}^{α} C(α,h) (1−q)^{α−h} q^h expm1(h(h−1)/(2σ²)),
    because the h = 0 and h = 1 exponents vanish and the binomial weights sum to 1. Lemma 5 taken
    literally subtracts nearly equal numbers when the RDP is tiny (large σ, small q); this form
    stays accurate to ~1e-13 relative (docs/design.md, numerics).
    """
    h, log_weights = _integer_weights(q, alpha)
    log_terms = log_weights + _log_expm1(h * (h - 1.0) / (2.0 * (sigma * sigma)))
    return float(np.logaddexp(0.0, _logsumexp(log_terms)[0]))


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """log A_α for any real α > 1 by the series of Mironov, Talwar and Zhang (2019, Sec. 3.3).

    A_α = Σ_{i>=0} C(α,i) [ q^i (1−q)^{α−i} e^{(i²−i)/(2σ²)} Φ((z₀ − i)/σ)
                           + q^{α−i} (1−q)^i e^{(j²−j)/(2σ²)} Φ((j − z₀)/σ) ],   j = α − i,
    with z₀ = σ² log(1/q − 1) + 1/2. For i > α the binomial coefficients C(α, i) alternate in sign;
    the sign is kept (dropping it overstates the RDP, e.g. by 17% at α = 1.5, q = 0.0416, σ = 0.8).
    Once the terms alternate and decrease, the tail is bounded by the first omitted term; the sum
    is extended until that bound is below ``_FRAC_SERIES_RTOL``·A_α. If it never gets there the
    order cannot be computed and +inf is returned.
    """
    odds = 1.0 / q - 1.0
    z0 = (sigma * sigma) * (math.log(odds) if odds > 0.0 else -math.inf) + 0.5
    if not (math.isfinite(z0) or z0 == -math.inf) or z0 > _FRAC_SERIES_MAX_TERMS:
        return math.inf  # σ so large that the series is out of reach: an upper bound
    # Start at a power of two so that nearby σ share the cached σ-free weights.
    n_terms = 1 << max(7, math.ceil(math.log2(max(alpha, z0, 0.0) + 64)))
    is_integer = float(alpha).is_integer()
    while n_terms <= _FRAC_SERIES_MAX_TERMS:
        i, j, sign, log_w0, log_w1 = _fractional_weights(q, alpha, n_terms)
        log_s0 = log_w0 + (i * i - i) / (2.0 * (sigma * sigma)) + log_ndtr((z0 - i) / sigma)
        log_s1 = log_w1 + (j * j - j) / (2.0 * (sigma * sigma)) + log_ndtr((j - z0) / sigma)
        log_pair = np.logaddexp(log_s0, log_s1)  # both parts share the sign of C(α, i)
        log_total, total_sign = _logsumexp(log_pair, sign)
        if not (total_sign > 0 and np.isfinite(log_total)):
            return math.inf
        if is_integer and n_terms > alpha + 1:
            return float(log_total)  # finite sum: nothing was truncated
        # Tail bound: the last terms must alternate and shrink, and the last one must be tiny.
        tail = log_pair[-64:]
        shrinking = bool((tail[1:] < tail[:-1]).all())
        alternating = bool((sign[-64:-1] * sign[-63:] < 0.0).all())
        if shrinking and alternating and tail[-1] - log_total < math.log(_FRAC_SERIES_RTOL):
            return float(log_total)
        n_terms *= 2
    return math.inf


def rdp_subsampled_gaussian(
    sample_rate: float, noise_multiplier: float, orders: Sequence[float] | np.ndarray
) -> np.ndarray:
    """RDP ε(α) of one step of the Poisson-subsampled Gaussian mechanism (add/remove neighbours).

    Implements the second term of the paper's Lemma 5 for one step (Lemma 6 with
    ε(h) = h/(2σ²), sensitivity 1 relative to the noise σ): integer orders by the binomial sum,
    fractional orders by the Mironov–Talwar–Zhang series. ``sample_rate = 1`` gives α/(2σ²)
    exactly; ``noise_multiplier`` below 1e-4 (0 included) gives +inf at every order (the true
    values exceed ~1e7 there). For very large σ the fractional series is out of reach and those
    orders are +inf; the integer orders then carry the guarantee.

    Args:
        sample_rate: Poisson sampling probability q in (0, 1].
        noise_multiplier: σ, the noise standard deviation divided by the L2 sensitivity (>= 0).
        orders: Rényi orders α > 1.

    Returns:
        Array of RDP values, one per order; +inf where a value cannot be computed reliably.
    """
    q = check.sample_rate(sample_rate)
    sigma = check.noise_multiplier(noise_multiplier)
    alphas = check.orders(orders)
    if sigma < _SIGMA_FLOOR:  # includes σ = 0; the true values exceed ~1e7 at every order
        return np.full(alphas.shape, math.inf)
    if q == 1.0:
        return alphas / (2.0 * (sigma * sigma))
    out = np.empty_like(alphas)
    for idx, alpha in enumerate(alphas):
        if alpha.is_integer():
            log_a = _log_a_integer(q, sigma, int(alpha))
        else:
            log_a = _log_a_fractional(q, sigma, float(alpha))
        out[idx] = log_a / (alpha - 1.0) if np.isfinite(log_a) else math.inf
    return out


def _exp_minus_linear(x: np.ndarray) -> np.ndarray:
    """g(x) = e^x − 1 − x >= 0, without cancellation for small |x|."""
    x = np.asarray(x, dtype=float)
    small = np.abs(x) < 0.5
    xs = np.where(small, x, 0.0)
    # Horner form of Σ_{k=2}^{17} x^k / k!; the remainder is below 1e-16 relative at |x| = 0.5.
    acc = np.zeros_like(xs)
    for k in range(17, 1, -1):
        acc = (acc + 1.0 / math.factorial(k)) * xs
    series = acc * xs
    with np.errstate(over="ignore"):
        direct = np.expm1(np.where(small, 1.0, x)) - np.where(small, 1.0, x)
    return np.where(small, series, direct)


def rdp_laplace(laplace_scale: float, orders: Sequence[float] | np.ndarray) -> np.ndarray:
    """RDP of the Laplace mechanism with sensitivity 1 and scale ψ (first term of Lemma 5).

    ε(α) = 1/(α−1) · log( α/(2α−1) e^{(α−1)/ψ} + (α−1)/(2α−1) e^{−α/ψ} )   (Mironov 2017, Prop. 6).

    When the value is small, the bracket minus one is computed as
    [α g((α−1)/ψ) + (α−1) g(−α/ψ)]/(2α−1) with g(x) = e^x − 1 − x >= 0: the first-order terms cancel
    exactly, so tiny values (large ψ) keep full relative precision. Otherwise the log-space form is
    used, which is exact for large orders; ε(α) increases to the pure-DP value 1/ψ as α → ∞.
    """
    psi = check.laplace_scale(laplace_scale)
    alphas = check.orders(orders)
    a = 1.0 / psi
    with np.errstate(over="ignore"):  # huge 1/ψ: the value saturates at 1/ψ below
        return _laplace_curve(a, alphas)


def _laplace_curve(a: float, alphas: np.ndarray) -> np.ndarray:
    am1 = alphas - 1.0
    denom = 2.0 * alphas - 1.0
    small = am1 * a <= 1.0
    bracket_minus_one = (
        alphas * _exp_minus_linear(np.where(small, am1 * a, 0.0))
        + am1 * _exp_minus_linear(np.where(small, -alphas * a, 0.0))
    ) / denom
    value_small = np.log1p(bracket_minus_one) / am1
    value_large = (
        np.logaddexp(np.log(alphas / denom) + am1 * a, np.log(am1 / denom) - alphas * a) / am1
    )
    return np.minimum(np.where(small, value_small, value_large), a)
