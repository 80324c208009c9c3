"""Probes along low-rank directions in factored form: W ± φz is not written for the reads that pay.

For a weight matrix W (m × n) whose slice of z_k is low rank, z = (U/√r) Vᵀ
(:func:`~zoprivacy.optim.directions.lowrank_factors`), the two reads that dominate a language
model's forward pass can be evaluated at the perturbed point W + a·z (a = ±φ) from the factors:

* ``F.linear(x, W + a·z, b) = F.linear(x, W, b) + a·(x V)(U/√r)ᵀ``
* ``F.embedding(i, W + a·z) = F.embedding(i, W) + a·(U/√r)[i] Vᵀ``

The correction costs a pass over the call's input and output, r·(m + n) multiply-adds per row of
x, where the materialised form writes the m·n values of W + a·z. Which is cheaper depends on the
call (:func:`factoring_pays`): an embedding always (it reads a few rows of a large matrix, and
the input-embedding matrix is the largest tensor of a small language model); a linear layer when
its rows of input are fewer than mn/(m + n), e.g. a tied output layer over a large vocabulary.

The loss is the same function of θ + a·z up to floating-point rounding (the product is summed in
another order; in bfloat16 the factored form is the more accurate one, since a·z is added to the
layer's output rather than rounded into W). The directions, the released K-vector, the clipping
and the accounting are untouched: only how f(θ ± φz_k) is computed changes.

Used by the substitution path (:class:`~zoprivacy.optim.perturb.ParameterSubstitution`) for
unmasked low-rank matrices; every other read of a trainable tensor (``w.t()``, ``w @ x``, an
embedding with ``max_norm``, a masked direction, a linear layer over many rows) gets the
materialised W + a·z as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FACTORED_FUNCTIONS", "factored_call", "factoring_pays", "input_of", "weight_of"]

FACTORED_FUNCTIONS = (F.linear, F.embedding)
"""The torch functions evaluated in factored form (their ``weight`` argument is the matrix)."""


def weight_of(func: Any, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The ``weight`` argument of a call to one of :data:`FACTORED_FUNCTIONS`, else None."""
    if func not in FACTORED_FUNCTIONS:
        return None
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def input_of(args: tuple, kwargs: dict[str, Any]) -> Any:
    """The ``input`` argument (x, or the indices of an embedding) of a factored call."""
    return args[0] if args else kwargs.get("input")


def factoring_pays(func: Any, args: tuple, kwargs: dict[str, Any], weight: torch.Tensor) -> bool:
    """Whether the factored form of this call moves less memory than materialising W + a·z.

    Materialised: one pass writing the m·n values (W is read by the call either way).
    Factored: a pass over the input's rows (x V) and one over the output's (adding the rank-r
    product), rows·(m + n) values. On one CPU core both cost ~1 ns per value (MiniLM and SmolLM2
    shapes, ``benchmarks/step_time_paths.py``), so the smaller count wins. An embedding reads
    only the looked-up rows: always factored.
    """
    if func is F.embedding:
        return True
    x = input_of(args, kwargs)
    m, n = weight.shape
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
    return rows * (m + n) < m * n


def factored_call(
    func: Any,
    args: tuple,
    kwargs: dict[str, Any],
    factors: tuple[torch.Tensor, torch.Tensor],
    alpha: float,
    swap: Callable[[Any], Any],
) -> Any:
    """``func(*args, **kwargs)`` with its weight W replaced by W + alpha·(U/√r)Vᵀ, computed as
    the call at W plus a rank-r correction (``factors`` = (U/√r, V)). ``swap`` substitutes the
    call's other trainable arguments (a bias) by their perturbed values; the input and W are
    passed as they are (the caller checks that the input is not a trainable tensor). Returns
    ``NotImplemented`` where the factored form does not apply (an embedding with ``max_norm``,
    which renormalises W in place)."""
    u, v = factors
    if func is F.embedding:
        if _argument(args, kwargs, 3, "max_norm") is not None:
            return NotImplemented
        out = func(*args, **kwargs)
        rows = F.embedding(input_of(args, kwargs), u)
        return _add_product(out, rows, v, alpha)
    x = input_of(args, kwargs)
    rest = {k: val if k in ("input", "weight") else swap(val) for k, val in kwargs.items()}
    out = func(*args[:2], *(swap(a) for a in args[2:]), **rest)
    return _add_product(out, x.to(v.dtype) @ v, u, alpha)


def _argument(args: tuple, kwargs: dict[str, Any], position: int, name: str) -> Any:
    return args[position] if len(args) > position else kwargs.get(name)


def _add_product(out: torch.Tensor, left: torch.Tensor, factor: torch.Tensor, alpha: float):
    """``out + alpha·left @ factorᵀ``, in place on ``out`` (a fresh result of the call) where
    its layout allows one fused ``addmm_``."""
    factor = factor.to(out.dtype)
    left = left.to(out.dtype)
    if out.is_contiguous() and left.is_contiguous():
        out.view(-1, out.shape[-1]).addmm_(left.view(-1, left.shape[-1]), factor.T, alpha=alpha)
        return out
    return out + alpha * (left @ factor.T)
