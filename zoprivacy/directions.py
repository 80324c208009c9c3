"""Public perturbation directions z_k of DP-AggZO (Algorithm 1, line 6), regenerated from seeds.

A direction is never stored whole. Each trainable tensor gets its own seed, derived
deterministically from ``(seed, step, k, tensor_index)`` with :class:`numpy.random.SeedSequence`,
and its slice of z_k is regenerated on demand, in place, into a caller-provided scratch buffer with
a :class:`torch.Generator` on the tensor's device. The seeds are public: they may be logged, and
anyone holding ``seed`` can replay every direction of a run.

Generation is always in float32 (then cast to the parameter's dtype when added), so the same seed
gives the same z for float16, bfloat16, float32 and float64 parameters on a given device type.
CPU and CUDA generators are different algorithms: a run replayed on another device type sees
different directions.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "DIRECTION_DTYPE",
    "direction_tensor",
    "draw_public_seed",
    "fill_direction_",
    "iter_direction",
    "tensor_seeds",
]

DIRECTION_DTYPE = torch.float32
"""dtype in which z_k is generated (then cast to each parameter's dtype)."""

_SEED_MASK = (1 << 63) - 1


def draw_public_seed() -> int:
    """Draw a fresh public direction seed (63 bits) from OS entropy."""
    return secrets.randbits(63)


def tensor_seeds(seed: int, step: int, k: int, num_tensors: int) -> list[int]:
    """Seeds of the ``num_tensors`` per-tensor slices of direction ``k`` at step ``step``.

    Derived with ``SeedSequence(entropy=seed, spawn_key=(step, k))``: distinct ``(step, k)`` pairs
    give statistically independent streams, and the result depends on nothing but its arguments.
    Seed ``i`` does not depend on ``num_tensors`` (``tensor_seeds(s, t, k, n)[:m]`` equals
    ``tensor_seeds(s, t, k, m)``), so a tensor's seed is a function of ``(seed, step, k, i)``.
    """
    if num_tensors == 0:
        return []
    words = np.random.SeedSequence(entropy=seed, spawn_key=(step, k)).generate_state(
        num_tensors, dtype=np.uint64
    )
    return [int(w) & _SEED_MASK for w in words]


def fill_direction_(
    out: torch.Tensor, seed: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fill ``out`` (float32) in place with standard normal values from ``seed`` and return it.

    ``generator`` (on ``out``'s device) is re-seeded and reused when given, which avoids creating
    a generator per tensor; its previous state is discarded.
    """
    if out.dtype != DIRECTION_DTYPE:
        raise TypeError(f"direction buffers must be {DIRECTION_DTYPE}, got {out.dtype}")
    if generator is None:
        generator = torch.Generator(device=out.device)
    generator.manual_seed(seed)
    torch.randn(out.shape, generator=generator, out=out)
    return out


def iter_direction(
    params: Sequence[torch.Tensor],
    *,
    seed: int,
    step: int,
    k: int,
    scratch: dict[torch.device, torch.Tensor],
    generators: dict[torch.device, torch.Generator] | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(index, param, z)`` for every tensor of direction ``k`` at step ``step``.

    ``z`` is a float32 view into ``scratch[param.device]`` (a flat buffer at least as large as the
    largest tensor on that device) shaped like ``param``; it is overwritten by the next item, so
    use it before advancing the iterator.
    """
    seeds = tensor_seeds(seed, step, k, len(params))
    for index, (param, tensor_seed) in enumerate(zip(params, seeds, strict=True)):
        buf = scratch[param.device]
        view = buf[: param.numel()].view(param.shape)
        gen = None if generators is None else generators.get(param.device)
        fill_direction_(view, tensor_seed, gen)
        yield index, param, view


def direction_tensor(
    shape: Sequence[int] | torch.Size,
    *,
    seed: int,
    step: int,
    k: int,
    index: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Materialise one tensor slice of z_k (float32), for inspection and tests.

    ``index`` is the tensor's position among the trainable tensors of the optimizer (param-group
    order, frozen tensors skipped), exactly as the optimizer counts them.
    """
    seeds = tensor_seeds(seed, step, k, index + 1)
    out = torch.empty(tuple(shape), dtype=DIRECTION_DTYPE, device=device)
    return fill_direction_(out, seeds[index])
