"""Tight accounting through privacy loss distributions, using Google's ``dp-accounting``.

Optional: needs the ``bench`` extra (``pip install dp-accounting``). The PLD accountant composes
the same events as Lemma 5 (one Laplace size release and ``steps`` Poisson-subsampled Gaussian
steps) numerically, with pessimistic discretisation, so its ε is an upper bound that is usually
smaller than the RDP one.
"""

from __future__ import annotations

import math

from zoprivacy import checks as check


def _require_dp_accounting():
    try:
        import dp_accounting
        from dp_accounting import pld
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "accountant='pld' needs Google's dp-accounting package: pip install dp-accounting "
            "(or pip install 'zoprivacy[bench]')"
        ) from exc
    return dp_accounting, pld


def pld_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    laplace_scale: float | None = None,
    value_discretization_interval: float = 1e-4,
) -> float:
    """ε of the composed run by the PLD accountant (inputs already validated by the caller)."""
    dpa, pld = _require_dp_accounting()
    if steps > 0 and noise_multiplier == 0.0:
        return math.inf
    accountant = pld.PLDAccountant(
        dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=value_discretization_interval,
    )
    if laplace_scale is not None:
        accountant.compose(dpa.LaplaceDpEvent(laplace_scale))
    if steps > 0:
        event = dpa.PoissonSampledDpEvent(sample_rate, dpa.GaussianDpEvent(noise_multiplier))
        accountant.compose(event, steps)
    if laplace_scale is None and steps == 0:
        return 0.0
    return max(0.0, float(accountant.get_epsilon(delta)))


def subsampled_gaussian_epsilon_pld(
    q: float,
    sigma: float,
    steps: int,
    delta: float,
    *,
    value_discretization_interval: float = 1e-4,
) -> float | None:
    """ε at δ of ``steps`` composed Poisson-subsampled Gaussian steps by dp-accounting's PLD
    accountant (Koskela, Jälkö and Honkela 2020; Doroshenko et al. 2022, "Connect the dots"),
    add/remove adjacency, both orderings. PLD discretises the privacy loss *pessimistically*
    on a grid of width h = ``value_discretization_interval``: the result is an upper bound on
    the tight ε and, for one step, exceeds it by at most h (each privacy-loss value is rounded
    up by less than h, so δ_PLD(ε) ≤ δ(ε − h)). Returns None when dp-accounting is not
    installed (it is an optional reference)."""
    rate = check.sample_rate(q, "q (sample_rate)")
    noise = check.noise_multiplier(sigma, "sigma (noise_multiplier)")
    if noise == 0.0:
        raise ValueError("sigma (noise_multiplier) must be > 0 for the PLD reference, got 0.0")
    try:
        _require_dp_accounting()
    except ImportError:
        return None
    return pld_epsilon(
        noise_multiplier=noise,
        sample_rate=rate,
        steps=check.integer("steps", steps, minimum=1),
        delta=check.delta(delta),
        value_discretization_interval=value_discretization_interval,
    )
