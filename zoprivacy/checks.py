"""Argument checks: the one place where zoprivacy validates what a caller passes.

The accounting functions, the optimizer, the data loaders and the run planner all validate through
these functions, so a value is accepted or refused the same way whichever entry point it enters by.
Every check raises ``ValueError`` (``TypeError`` for a wrong type) whose message names the argument,
the value received and the valid range, *before* any computation starts: NaN, infinities and
out-of-range values are the inputs on which other libraries hang or return nonsense.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from zoprivacy.accounting.orders import MAX_ORDER


def as_real(name: str, value: object) -> float:
    """``value`` as a float; a bool, a non-number or NaN is refused (infinities pass)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    out = float(value)
    if math.isnan(out):
        raise ValueError(f"{name} is NaN; pass a finite number")
    return out


def real(
    name: str, value: object, *, minimum: float | None = None, positive: bool = False
) -> float:
    """A finite real number, ``> 0`` with ``positive``, ``>= minimum`` when given."""
    x = as_real(name, value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if positive and x <= 0:
        raise ValueError(f"{name} must be > 0, got {x}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return x


def integer(name: str, value: object, *, minimum: int = 0) -> int:
    """An int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    x = int(value)
    if x < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {x}")
    return x


def sample_rate(value: object, name: str = "sample_rate") -> float:
    q = as_real(name, value)
    if not 0.0 < q <= 1.0:
        raise ValueError(
            f"{name} must lie in (0, 1] (the Poisson sampling probability q), got {q!r}"
        )
    return q


def noise_multiplier(value: object, name: str = "noise_multiplier") -> float:
    sigma = as_real(name, value)
    if sigma < 0.0 or math.isinf(sigma):
        raise ValueError(
            f"{name} must be a finite number >= 0 (0 means no noise and ε = inf), got {sigma!r}"
        )
    return sigma


def delta(value: object, name: str = "delta") -> float:
    d = as_real(name, value)
    if not 0.0 < d < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), e.g. 1e-5, got {d!r}")
    return d


def epsilon(value: object, name: str = "epsilon") -> float:
    e = as_real(name, value)
    if not (e > 0.0 and math.isfinite(e)):
        raise ValueError(f"{name} must be a finite number > 0, got {e!r}")
    return e


def steps(value: object, name: str = "steps") -> int:
    return integer(name, value, minimum=0)


def laplace_scale(value: object, name: str = "laplace_scale") -> float:
    psi = as_real(name, value)
    if not (psi > 0.0 and math.isfinite(psi)):
        raise ValueError(
            f"{name} must be a finite number > 0 (the scale ψ of Lap(ψ); None for no release), "
            f"got {psi!r}"
        )
    return psi


def size_fraction(value: object, name: str = "size_fraction") -> float:
    f = as_real(name, value)
    if not 0.0 <= f < 1.0:
        raise ValueError(
            f"{name} must lie in [0, 1): the share of ε spent on the dataset-size release "
            f"(0 = no release, the paper uses 0.05), got {f!r}"
        )
    return f


def orders(value: object, name: str = "orders") -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a sequence of real numbers > 1, got {value!r}") from exc
    arr = np.atleast_1d(arr)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of Rényi orders > 1")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite; got {arr[~np.isfinite(arr)][:3].tolist()}")
    if np.any(arr <= 1.0):
        raise ValueError(f"{name} must all be > 1; got {arr[arr <= 1.0][:3].tolist()}")
    if np.any(arr > MAX_ORDER):
        raise ValueError(
            f"{name} must all be <= {MAX_ORDER:g} (2^20; larger orders only matter for ε below "
            f"~1e-5 and cost memory linear in the order); got {arr[arr > MAX_ORDER][:3].tolist()}"
        )
    return arr
