"""Rényi orders used by default, and their extension for small privacy targets.

Why these: the best order for ε between ~0.5 and ~10 sits between 1.5 and ~40, where integer-only
grids cost up to ~19% in ε (docs/design.md, numerics): hence the fine fractional grid at small
orders.
Small targets need large orders: the conversion term of Lemma 8 alone is about
(log(1/δ) − log α)/(α − 1), which floors ε near 0.02 at α = 256 and δ = 1e-5 however large σ is,
so the default list reaches 1024 and :func:`extended_orders` goes further on demand.
"""

from __future__ import annotations

import numpy as np

#: Default orders: a 0.1-step grid below 11, every integer to 64, then a sparse tail to 1024.
DEFAULT_ORDERS: np.ndarray = np.unique(
    np.concatenate(
        [
            np.round(np.arange(1.1, 11.0, 0.1), 10),
            np.arange(11, 65, dtype=float),
            np.array([72, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512], float),
            np.array([640, 768, 896, 1024], float),
        ]
    )
)

#: Largest order :func:`extended_orders` will ever add.
MAX_ORDER: float = float(2**20)


def extended_orders(orders: np.ndarray, factor: float = 4.0) -> np.ndarray:
    """Return ``orders`` plus a geometric tail of integer orders up to ``factor × max(orders)``."""
    top = float(np.max(orders))
    new_top = min(top * factor, MAX_ORDER)
    tail = np.unique(np.round(np.geomspace(top, new_top, num=12)))
    return np.unique(np.concatenate([orders, tail]))
