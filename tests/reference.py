"""Independent high-precision references for the accounting tests (mpmath, 60 digits).

Nothing here is imported from zoprivacy: each function re-derives its quantity from the
definition, so a test comparing against it checks the library, not the library against itself.
"""

from __future__ import annotations

import mpmath as mp

mp.mp.dps = 60


def rdp_subsampled_gaussian_integer(q: float, sigma: float, alpha: int) -> float:
    """Lemma 6 (equivalently the second term of Lemma 5 for one step), exact binomial sum."""
    q, s = mp.mpf(q), mp.mpf(sigma)
    total = mp.mpf(0)
    for h in range(alpha + 1):
        total += (
            mp.binomial(alpha, h)
            * (1 - q) ** (alpha - h)
            * q**h
            * mp.e ** (h * (h - 1) / (2 * s**2))
        )
    return float(mp.log(total) / (alpha - 1))


def rdp_subsampled_gaussian_integral(q: float, sigma: float, alpha: float) -> float:
    """max of the two Rényi divergences between N(0,σ²) and (1−q)N(0,σ²) + qN(1,σ²), any α > 1,
    by numerical integration of the definition (the add/remove neighbouring relation)."""
    mp.mp.dps = 30
    try:
        q, s, a = mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha)

        def ratio(z):  # μ1(z)/μ0(z)
            return (1 - q) + q * mp.e ** ((2 * z - 1) / (2 * s**2))

        def gauss(z):
            return mp.npdf(z, 0, s)

        z0 = s**2 * mp.log(1 / q - 1) + mp.mpf(1) / 2
        pts = sorted(
            {-mp.inf, -20 * s, min(z0, 0), 0, mp.mpf(1) / 2, 1, max(z0, 1), 40 * s + 2, mp.inf}
        )
        a_up = mp.quad(lambda z: gauss(z) * ratio(z) ** a, pts)
        a_down = mp.quad(lambda z: gauss(z) * ratio(z) ** (1 - a), pts)
        return float(max(mp.log(a_up), mp.log(a_down)) / (a - 1))
    finally:
        mp.mp.dps = 60


def rdp_laplace(psi: float, alpha: float) -> float:
    """Mironov (2017) Prop. 6 / first term of Lemma 5, at 60 digits."""
    a, lam = mp.mpf(alpha), mp.mpf(psi)
    inner = a / (2 * a - 1) * mp.e ** ((a - 1) / lam) + (a - 1) / (2 * a - 1) * mp.e ** (-a / lam)
    return float(mp.log(inner) / (a - 1))


def lemma8(rdp: float, alpha: float, delta: float) -> float:
    a = mp.mpf(alpha)
    return float(
        mp.mpf(rdp)
        + (mp.log(1 / mp.mpf(delta)) + (a - 1) * mp.log(1 - 1 / a) - mp.log(a)) / (a - 1)
    )
