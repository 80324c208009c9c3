"""Exact, floating-point-safe noise: discrete Gaussian and rounded Laplace from OS entropy.

Why: a textbook sampler (``mu + scale * f(uniform)`` in floating point) leaks through the low-order
bits of its output (Mironov, CCS 2012, for the Laplace mechanism; the same holds for Gaussian
samplers and, more generally, for *adding* float noise to a float value: the set of floats
``fl(x + v)`` can reach depends on ``x``). The samplers here use only integer arithmetic on
uniform draws from :mod:`secrets` (the OS CSPRNG), following Canonne, Kamath and Steinke, "The
Discrete Gaussian for Differential Privacy" (NeurIPS 2020, arXiv:2004.00010; "CKS" below):

* :func:`bernoulli_exp` — Bernoulli(exp(−γ)) for a rational γ ≥ 0 (CKS Algorithm 1);
* :func:`discrete_laplace` — P[Y = y] ∝ exp(−|y|·s/t) on the integers (CKS Algorithm 2);
* :func:`discrete_gaussian` — P[Y = y] ∝ exp(−y²/(2σ²)) on the integers, σ² rational
  (CKS Algorithm 3);
* :func:`rounded_laplace` — round(L), L ~ Laplace(0, ψ), sampled exactly (for the size release).

The grid
--------
The Gaussian noise of one step, std ``σc``, lives on the grid g·Z with ``g = noise_grid(σc)``
``= 2^(⌊log2 σc⌋ − GRID_BITS)``: a power of two, so that ``x / g`` is exact in float64, chosen from
the *public* std only (never from data), with ``σc / g ∈ [2^30, 2^31)``. Two uses:

* :func:`snapped_noisy_sum` (the secure release, used through ``NoiseSource.add_noise``): the
  clipped sum x is rounded to the grid, n = round(x/g) ∈ Z^K, an integer discrete Gaussian
  Y ~ N_Z(0, σ_g²)^K is added, and (n + Y)·g is returned. The released vector is a deterministic
  function of the integer vector n + Y, so no floating-point effect can leak anything beyond it.
  Rounding a sum of vectors of norm ≤ c moves each coordinate by < 1 grid unit, so the L2
  sensitivity of n is at most Δ_g = c/g + √K (plus the float64 summation error of x, below 2^-40·c
  per coordinate for batches up to 10^5 records, far inside the one grid unit of slack). With
  ``sensitivity=c`` the noise is inflated to σ_g = σ·(c/g + ⌈√K⌉), so that σ_g / Δ_g ≥ σ: the
  integer mechanism has *at least* the noise multiplier σ the accountant charges (the inflation
  is a relative 2^-30·σ·√K, i.e. ≤ 1.5e-8 for σ ≤ 100, K ≤ 256).
* :func:`secure_gaussian` (what ``sample_noise(k, std, None)`` returns): the same discrete
  Gaussian plus a uniform dither on [−g/2, g/2) with 64 random bits, i.e. a sample from a density
  that is constant on each grid cell. It is exact and uses no transcendental floating-point
  function, but when the *optimizer* adds it to an unrounded float sum (``x + v``) the final float
  addition still leaks through the low bits (see ``docs/threat_model.md``); only the snapped path
  avoids that.

The guarantee we rely on
------------------------
* CKS Theorem 14 (multivariate discrete Gaussian): if an integer-valued query has
  Σ_j (q_j(x) − q_j(x'))² ≤ Δ² on neighbours, adding independent N_Z(0, σ²) noise to each
  coordinate satisfies ½(Δ/σ)²-concentrated DP, i.e. Rényi DP α·Δ²/(2σ²) for every α > 1:
  exactly the curve of the continuous Gaussian. This covers a step with q = 1.
* With Poisson subsampling (q < 1) the accountant uses the subsampled *continuous* Gaussian bound
  (Mironov, Talwar, Zhang 2019). For integer orders the same expansion holds for the discrete
  Gaussian term by term, because its moment generating function is dominated by the continuous
  one (CKS Corollary 9: E[e^{tY}] ≤ e^{t²σ²/2}), which bounds every moment
  E[(p(Y−Δ)/p(Y))^h] by exp(h(h−1)Δ²/(2σ²)). Beyond that (fractional orders, the reverse
  divergence) we rely on σ_g ≥ 2^30: by Poisson summation, sums over the integer lattice of the
  Gaussian-mixture terms in the analysis equal the corresponding integrals up to relative errors of
  order exp(−2π²σ_g²/α) — zero in any floating-point arithmetic — so the discrete mechanism's RDP
  curve equals the continuous one's to far below the accountant's own precision (1e-13).
* The size release uses round(Lap(ψ)): since n is an integer, n + round(L) = round(n + L) is
  post-processing of the Laplace mechanism, so it is exactly 1/ψ-pure DP and has exactly the
  Laplace RDP curve the accountant charges (Lemma 5). The CKS *discrete* Laplace would also be
  1/ψ-pure DP, but its RDP curve exceeds the continuous Laplace's at some orders (by up to 32%
  for ψ ≥ 100, α ≥ 16), so it is not used: the accountant would under-charge it.

Randomness: every sampler takes ``rng``, an object with ``randrange(n)`` (e.g.
``random.Random(seed)`` for reproducible statistical tests); the default is the OS CSPRNG
(``os.urandom``, the source behind :mod:`secrets`, read through a small fork-safe buffer).
"""

from __future__ import annotations

import math
import os
import threading
from fractions import Fraction
from typing import Protocol

import torch

__all__ = [
    "GRID_BITS",
    "bernoulli_exp",
    "discrete_gaussian",
    "discrete_gaussian_pmf",
    "discrete_laplace",
    "geometric_exp",
    "noise_grid",
    "rounded_laplace",
    "secure_gaussian",
    "snapped_noisy_sum",
]

GRID_BITS = 30
"""σc / g lies in [2^GRID_BITS, 2^(GRID_BITS+1)): the noise std in grid units."""

_DITHER_BITS = 64


class RandomSource(Protocol):
    def randrange(self, n: int) -> int: ...


class _EntropyPool:
    """Uniform integers from OS entropy (``os.urandom``), read 4 KiB at a time.

    One system call per ~1000 draws instead of one per draw (a draw is a few bits). The buffer is
    discarded when the process id changes, so a forked child never replays its parent's bytes,
    and a lock keeps two threads from receiving the same bytes.
    """

    _CHUNK = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._buffer = b""
        self._pos = 0

    def _take(self, nbytes: int) -> bytes:
        with self._lock:
            if self._pid != os.getpid() or self._pos + nbytes > len(self._buffer):
                self._buffer = os.urandom(max(self._CHUNK, nbytes))
                self._pos = 0
                self._pid = os.getpid()
            out = self._buffer[self._pos : self._pos + nbytes]
            self._pos += nbytes
            return out

    def randrange(self, n: int) -> int:
        """Uniform on {0, …, n−1} (rejection sampling on n.bit_length() random bits)."""
        if n <= 0:
            raise ValueError(f"randrange needs n > 0, got {n}")
        bits = (n - 1).bit_length()
        if bits == 0:
            return 0
        nbytes, extra = (bits + 7) // 8, (-bits) % 8
        while True:
            r = int.from_bytes(self._take(nbytes), "little") >> extra
            if r < n:
                return r


_OS = _EntropyPool()


def _uniform(rng: RandomSource | None):
    """The ``randrange``-like callable of ``rng`` (the OS-entropy pool by default)."""
    if rng is None:
        return _OS.randrange
    return rng.randrange


# ------------------------------------------------------------------------- CKS Algorithms 1-3
def _bernoulli_exp_at_most_one(num: int, den: int, below) -> bool:
    """Bernoulli(exp(−num/den)) for 0 ≤ num/den ≤ 1 (CKS Algorithm 1, first branch).

    K = 1; while Bernoulli(γ/K): K += 1; return K odd. P[K odd] = Σ_j (−γ)^j / j! = exp(−γ).
    """
    k = 1
    while below(den * k) < num:  # Bernoulli(γ/k) with integer arithmetic
        k += 1
    return k % 2 == 1


def bernoulli_exp(num: int, den: int, rng: RandomSource | None = None) -> bool:
    """Return True with probability exp(−num/den), exactly (CKS Algorithm 1).

    Args:
        num: integer ≥ 0.
        den: integer > 0.
        rng: source of uniform integers (``randrange``); None: the OS CSPRNG.
    """
    if num < 0 or den <= 0:
        raise ValueError(f"bernoulli_exp needs num >= 0 and den > 0, got {num}/{den}")
    below = _uniform(rng)
    while num > den:  # γ > 1: exp(−γ) = exp(−1)^⌊γ⌋ · exp(−(γ − ⌊γ⌋))
        if not _bernoulli_exp_at_most_one(1, 1, below):
            return False
        num -= den
    return _bernoulli_exp_at_most_one(num, den, below)


def geometric_exp(s: int, t: int, rng: RandomSource | None = None) -> int:
    """G ≥ 0 with P[G = j] = (1 − e^{−s/t}) e^{−j·s/t}, exactly (the core of CKS Algorithm 2).

    X = U + t·V with U uniform on {0..t−1} accepted with probability e^{−U/t} and V the number of
    successes of Bernoulli(e^{−1}) before the first failure is geometric with ratio e^{−1/t};
    ⌊X/s⌋ is then geometric with ratio e^{−s/t}.
    """
    if s <= 0 or t <= 0:
        raise ValueError(f"geometric_exp needs positive integers s, t, got {s}, {t}")
    below = _uniform(rng)
    while True:
        u = below(t)
        if not _bernoulli_exp_fraction(u, t, below):
            continue
        v = 0
        while _bernoulli_exp_at_most_one(1, 1, below):
            v += 1
        return (u + t * v) // s


def _bernoulli_exp_fraction(num: int, den: int, below) -> bool:
    while num > den:
        if not _bernoulli_exp_at_most_one(1, 1, below):
            return False
        num -= den
    return _bernoulli_exp_at_most_one(num, den, below)


def discrete_laplace(t: int, s: int = 1, rng: RandomSource | None = None) -> int:
    """Y ∈ Z with P[Y = y] ∝ exp(−|y|·s/t) (CKS Algorithm 2: discrete Laplace of scale t/s)."""
    below = _uniform(rng)
    while True:
        y = geometric_exp(s, t, rng)
        negative = below(2) == 1
        if negative and y == 0:
            continue  # reject so that 0 is not counted twice
        return -y if negative else y


def discrete_gaussian(sigma2: Fraction | int, rng: RandomSource | None = None) -> int:
    """Y ∈ Z with P[Y = y] ∝ exp(−y²/(2σ²)), exactly (CKS Algorithm 3); σ² > 0 rational.

    Proposal: discrete Laplace of scale t = ⌊σ⌋ + 1; accept with probability
    exp(−(|Y| − σ²/t)²/(2σ²)), evaluated as one rational exponent with integer arithmetic.
    """
    sigma2 = Fraction(sigma2)
    if sigma2 <= 0:
        raise ValueError(f"discrete_gaussian needs sigma2 > 0, got {sigma2}")
    a, b = sigma2.numerator, sigma2.denominator  # σ² = a/b
    t = math.isqrt(a // b) + 1  # ⌊σ⌋ + 1 (⌊√x⌋ = isqrt(⌊x⌋))
    below = _uniform(rng)
    den = 2 * a * t * t * b
    while True:
        y = discrete_laplace(t, 1, rng)
        # (|y| − σ²/t)² / (2σ²) = (|y|·t·b − a)² / (2·a·t²·b)
        num = (abs(y) * t * b - a) ** 2
        if _bernoulli_exp_fraction(num, den, below):
            return y


def discrete_gaussian_pmf(sigma2: float, support: range) -> dict[int, float]:
    """Exact-enough pmf of N_Z(0, σ²) on ``support`` (normalised over |y| ≤ 40σ + 40; tests)."""
    bound = int(40 * math.sqrt(sigma2)) + 40
    weights = {y: math.exp(-(y * y) / (2 * sigma2)) for y in range(-bound, bound + 1)}
    total = math.fsum(weights.values())
    return {y: weights.get(y, 0.0) / total for y in support}


def rounded_laplace(scale: float, rng: RandomSource | None = None) -> int:
    """round(L) for L ~ Laplace(0, scale), sampled exactly with integer arithmetic.

    P[0] = 1 − e^{−1/(2ψ)} and P[±k] = ½ e^{−(k−½)/ψ}(1 − e^{−1/ψ}) for k ≥ 1: |L| ≥ ½ with
    probability e^{−1/(2ψ)}, and then |L| − ½ is Exp(ψ) (memoryless), whose floor is geometric with
    ratio e^{−1/ψ}. Adding it to an integer n is post-processing of n + L (round(n + L)), so the
    release keeps the exact guarantee (and RDP curve) of the continuous Laplace mechanism.
    """
    psi = Fraction(_positive_finite(scale, "scale"))
    a, b = psi.numerator, psi.denominator  # 1/ψ = b/a
    below = _uniform(rng)
    if not _bernoulli_exp_fraction(b, 2 * a, below):
        return 0
    magnitude = 1 + geometric_exp(b, a, rng)
    return -magnitude if below(2) == 1 else magnitude


# ------------------------------------------------------------------------- vectors on the grid
def noise_grid(std: float) -> float:
    """The grid step g = 2^(⌊log2 std⌋ − GRID_BITS) for noise of standard deviation ``std``."""
    std = _positive_finite(std, "std")
    _, exponent = math.frexp(std)  # std = m·2^exponent, m ∈ [0.5, 1)
    return math.ldexp(1.0, exponent - 1 - GRID_BITS)


def _grid_exponent(std: float) -> int:
    _, exponent = math.frexp(std)
    return exponent - 1 - GRID_BITS


def secure_gaussian(k: int, std: float, rng: RandomSource | None = None) -> torch.Tensor:
    """K samples of std·(discrete Gaussian on the grid + uniform dither), float64 CPU.

    Each value is g·(Y + U) with Y ~ N_Z(0, (std/g)²) (CKS Algorithm 3) and U uniform on
    [−½, ½) with 64 random bits, rounded once (correctly) to float64. Its variance is
    std² + g²/12. ``std = 0`` gives zeros.
    """
    k = _count(k)
    if std == 0:
        return torch.zeros(k, dtype=torch.float64)
    std = _positive_finite(std, "std")
    exponent = _grid_exponent(std)
    sigma2 = (Fraction(std) / Fraction(2) ** exponent) ** 2
    below = _uniform(rng)
    half = 1 << (_DITHER_BITS - 1)
    values = []
    for _ in range(k):
        y = discrete_gaussian(sigma2, rng)
        fine = (y << _DITHER_BITS) + below(1 << _DITHER_BITS) - half  # (Y + U)·2^64, exact
        values.append(math.ldexp(float(fine), exponent - _DITHER_BITS))
    return torch.tensor(values, dtype=torch.float64)


def snapped_noisy_sum(
    values: torch.Tensor,
    std: float,
    *,
    sensitivity: float | None = None,
    rng: RandomSource | None = None,
) -> torch.Tensor:
    """Release ``values`` (the clipped K-sum) with discrete Gaussian noise on the grid, exactly.

    n = round(values/g) (half to even, exact since g is a power of two), Y ~ N_Z(0, σ_g²)^K,
    returns (n + Y)·g as float64 (exact when |n + Y| < 2^53; otherwise correctly rounded, which is
    post-processing of the integer release). σ_g = std/g, or, with ``sensitivity=c``,
    σ_g = (std/c)·(c/g + ⌈√K⌉) so that the rounding's extra sensitivity is covered and the noise
    multiplier of the integer mechanism is at least std/c.
    """
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise TypeError("values must be a 1-D tensor (the K-vector to release)")
    x = values.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("values must be finite")
    k = x.numel()
    if std == 0:
        return x.clone()
    std = _positive_finite(std, "std")
    exponent = _grid_exponent(std)
    grid = Fraction(2) ** exponent
    sigma_g = Fraction(std) / grid
    if sensitivity is not None:
        c = Fraction(_positive_finite(sensitivity, "sensitivity"))
        root = math.isqrt(k)
        root += root * root < k  # ⌈√K⌉
        sigma_g = Fraction(std) / c * (c / grid + root)
    sigma2 = sigma_g * sigma_g
    out = []
    for value in x.tolist():
        n = round(math.ldexp(value, -exponent))  # exact scaling, round half to even
        out.append(math.ldexp(float(n + discrete_gaussian(sigma2, rng)), exponent))
    return torch.tensor(out, dtype=torch.float64)


def _positive_finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    if v < 2.0 ** (-1000):
        raise ValueError(f"{name}={v!r} is too small for the noise grid")
    return v


def _count(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return k
