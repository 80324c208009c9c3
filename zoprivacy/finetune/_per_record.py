"""Per-record gradients for ``--method dpadamw`` when Opacus's layer hooks cannot give them.

DP-AdamW (DP-SGD's clipping and noise, the paper's first-order baseline) clips the gradient of
*each record's* loss, g_i = ∇ℓ_i, to norm C before summing and adding noise: the sensitivity of
the sum is C only if every row Opacus clips is one record. Opacus's ``GradSampleModule`` computes
g_i layer by layer from each layer's input and output gradient, and takes the layer input's first
dimension as the record index. A model that reshapes its activations before a layer breaks that:
OPT's decoder layer flattens ``[B, T, H]`` to ``[B·T, H]`` before ``final_layer_norm``, ``fc1``
and ``fc2`` (transformers' ``OPTDecoderLayer.forward``), so those layers' rows are *tokens*,
B·T of them, and each is scaled by B·T instead of B (``loss_reduction="mean"``).

:func:`rows_are_records` detects this (a layer whose per-sample gradient does not have one row
per record), and :func:`per_record_gradients` is the exact fallback that holds for any
architecture: one backward pass per record, g_i = ∇ℓ_i of that record alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["per_record_gradients", "record", "rows_are_records"]


def record(batch: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Record ``i`` of a collated batch, as a batch of one (tensors sliced on dimension 0)."""
    return {k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in batch.items()}


def rows_are_records(params: Sequence[torch.Tensor], records: int) -> bool:
    """Whether every parameter's ``grad_sample`` has exactly one row per record."""
    for p in params:
        sample = getattr(p, "grad_sample", None)
        if sample is None or sample.shape[0] != records:
            return False
    return True


def per_record_gradients(
    losses: Callable[[Mapping[str, Any]], torch.Tensor],
    batch: Mapping[str, Any],
    params: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The per-record losses ``[B]`` and, for each parameter, ``[B, *p.shape]`` with row i the
    gradient of record i's loss alone (``losses`` maps a batch to its per-record losses)."""
    size = _size(batch)
    values: list[torch.Tensor] = []
    rows: list[list[torch.Tensor]] = [[] for _ in params]
    for i in range(size):
        loss = losses(record(batch, i)).sum()
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        for row, p, g in zip(rows, params, grads, strict=True):
            row.append(torch.zeros_like(p) if g is None else g.detach())
        values.append(loss.detach())
    return torch.stack(values), [torch.stack(row) for row in rows]


def _size(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if torch.is_tensor(value):
            return int(value.shape[0])
    raise ValueError("a batch needs at least one tensor")
