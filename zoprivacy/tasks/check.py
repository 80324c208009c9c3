"""``check_per_sample``: test that a loss closure really computes one loss per record.

The privacy guarantee assumes record ``i``'s loss depends on record ``i`` alone. A closure that
averages over the batch, normalises by batch statistics, or lets padding leak across records
breaks the sensitivity bound silently. This check runs the closure on the full batch, on each
record alone and on a random half of the batch, and demands the same per-record losses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from zoprivacy.data.poisson import EMPTY_BATCH, is_empty_batch
from zoprivacy.tasks.encoding import trim_padding

__all__ = ["PerSampleViolation", "batch_size_of", "check_per_sample", "select_records"]


class PerSampleViolation(AssertionError):
    """A loss closure's value for some record depends on the other records of the batch."""


def batch_size_of(batch: Any) -> int:
    """Number of records in a batch: a tensor, a dict/tuple/list of tensors, or an empty batch."""
    if is_empty_batch(batch):
        return 0
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise ValueError("a 0-d tensor is not a batch")
        return batch.shape[0]
    if isinstance(batch, Mapping):
        values = list(batch.values())
    elif isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        values = list(batch)
    else:
        raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")
    sizes = {v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"cannot tell the batch size: tensor leading dimensions {sorted(sizes)}")
    return sizes.pop()


def select_records(batch: Any, indices: Sequence[int]) -> Any:
    """The sub-batch made of ``indices``: every tensor (and per-record list) sliced along dim 0.

    Non-per-record entries (scalars, tensors of another length) are kept as they are. A dict
    batch with an ``attention_mask`` is re-trimmed to its longest remaining record.
    """
    size = batch_size_of(batch)
    index = torch.as_tensor(list(indices), dtype=torch.long)

    def take(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            return value[index.to(value.device)]
        if isinstance(value, list) and len(value) == size:
            return [value[i] for i in index.tolist()]
        return value

    if isinstance(batch, torch.Tensor):
        return take(batch)
    if isinstance(batch, Mapping):
        return trim_padding({k: take(v) for k, v in batch.items()})
    items = [take(v) for v in batch]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*items)
    return type(batch)(items)


def _as_losses(value: Any, expected: int, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        kind = type(value).__name__
        raise PerSampleViolation(f"{what}: the closure returned {kind}, not a tensor")
    if value.dim() != 1 or value.shape[0] != expected:
        raise PerSampleViolation(
            f"{what}: the closure returned shape {tuple(value.shape)}, expected [{expected}] "
            "(one loss per record)"
        )
    return value.detach().to("cpu", torch.float64)


def check_per_sample(
    losses_fn: Callable[[Any], torch.Tensor],
    batch: Any,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    seed: int = 0,
    check_empty: bool = True,
) -> None:
    """Check that ``losses_fn(batch)[i]`` depends on record ``i`` only.

    Compares the full-batch losses with (1) each record's loss computed alone, and (2) the losses
    of a random half of the batch (chosen with ``seed``); with ``check_empty`` it also checks that
    the empty batch (:data:`zoprivacy.data.EMPTY_BATCH`) gives a tensor of shape ``[0]``, as every
    Poisson-sampled run will ask for it. Sub-batches are formed by :func:`select_records` (dict
    batches are re-trimmed, so padding must be handled through the attention mask).

    Args:
        losses_fn: ``batch -> Tensor[|batch|]``, e.g. ``functools.partial(losses, model)``.
        batch: a batch with at least two records.
        atol, rtol: tolerance ``|full_i - sub_i| <= atol + rtol·|full_i|``.
        seed: seed of the random half (public: this is a test, not training).
        check_empty: also check the empty batch.

    Raises:
        PerSampleViolation (an ``AssertionError``): naming the records whose losses changed and
            by how much, a wrong output shape, or non-finite losses.
        ValueError: the batch has fewer than two records.
    """
    size = batch_size_of(batch)
    if size < 2:
        raise ValueError(f"check_per_sample needs a batch of at least 2 records, got {size}")
    full = _as_losses(losses_fn(batch), size, "full batch")
    bad_values = torch.nonzero(~torch.isfinite(full)).flatten().tolist()
    if bad_values:
        raise PerSampleViolation(f"non-finite losses for records {bad_values}: {full.tolist()}")

    problems: list[str] = []

    def compare(indices: list[int], what: str) -> None:
        sub = _as_losses(losses_fn(select_records(batch, indices)), len(indices), what)
        ref = full[indices]
        diff = (sub - ref).abs()
        limit = atol + rtol * ref.abs()
        for j in torch.nonzero(~(diff <= limit)).flatten().tolist():
            problems.append(
                f"record {indices[j]} ({what}): {sub[j].item():.8g} vs {ref[j].item():.8g} "
                f"in the full batch, difference {diff[j].item():.3g}"
            )

    for i in range(size):
        compare([i], "alone")
    rng = np.random.default_rng(seed)
    half = sorted(rng.choice(size, size=max(1, size // 2), replace=False).tolist())
    compare(half, f"in the half {half}")
    if problems:
        raise PerSampleViolation(
            "per-record losses depend on the other records of the batch (atol="
            f"{atol}, rtol={rtol}):\n  " + "\n  ".join(problems)
        )
    if check_empty:
        empty = losses_fn(EMPTY_BATCH)
        _as_losses(empty, 0, "empty batch (EMPTY_BATCH)")
