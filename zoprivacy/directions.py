"""Public perturbation directions z_k of DP-AggZO (Algorithm 1, line 6), regenerated from seeds.

A direction is never stored whole. Each trainable tensor gets its own seed, derived
deterministically from ``(seed, step, k, tensor_index)`` with :class:`numpy.random.SeedSequence`,
and its slice of z_k is regenerated on demand, in place, into a caller-provided scratch buffer with
a :class:`torch.Generator` on the tensor's device. The seeds are public: they may be logged, and
anyone holding ``seed`` can replay every direction of a run.

z is generated directly in each parameter's dtype (``torch.randn(..., dtype=param.dtype)``), into
a byte scratch buffer viewed as that dtype, so no float32 copy or cast temporary of a tensor is
ever needed. A seed therefore gives different (but equally distributed) values for float16,
bfloat16, float32 and float64 tensors: low-precision directions are normals rounded to the
parameter's precision, and the same rounded values are used for the perturbation and the update.
CPU and CUDA generators are different algorithms: a run replayed on another device type sees
different directions.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "direction_tensor",
    "draw_public_seed",
    "fill_direction_",
    "iter_direction",
    "scratch_buffers",
    "tensor_seeds",
]

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
    """Fill the floating tensor ``out`` in place with N(0, 1) values from ``seed``; return it.

    ``generator`` (on ``out``'s device) is re-seeded and reused when given, which avoids creating
    a generator per tensor; its previous state is discarded.
    """
    if not out.is_floating_point():
        raise TypeError(f"direction buffers must be floating point, got {out.dtype}")
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

    ``scratch[param.device]`` is a flat uint8 buffer with at least as many bytes as the largest
    tensor on that device (:func:`scratch_buffers`); ``z`` is a view of it with ``param``'s dtype
    and shape, overwritten by the next item, so use it before advancing the iterator.
    """
    seeds = tensor_seeds(seed, step, k, len(params))
    for index, (param, tensor_seed) in enumerate(zip(params, seeds, strict=True)):
        nbytes = param.numel() * param.element_size()
        view = scratch[param.device][:nbytes].view(param.dtype).view(param.shape)
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
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Materialise one tensor slice of z_k, for inspection and tests.

    Pass the parameter's ``dtype`` and ``device`` to get exactly the values the optimizer uses.

    ``index`` is the tensor's position among the trainable tensors of the optimizer (param-group
    order, frozen tensors skipped), exactly as the optimizer counts them.
    """
    seeds = tensor_seeds(seed, step, k, index + 1)
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    return fill_direction_(out, seeds[index])


def scratch_buffers(params: Sequence[torch.Tensor]) -> dict[torch.device, torch.Tensor]:
    """One flat uint8 buffer per device, with the byte size of the largest tensor there."""
    sizes: dict[torch.device, int] = {}
    for p in params:
        sizes[p.device] = max(sizes.get(p.device, 0), p.numel() * p.element_size())
    return {dev: torch.empty(n, dtype=torch.uint8, device=dev) for dev, n in sizes.items()}
