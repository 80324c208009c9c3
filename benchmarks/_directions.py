"""Direction helpers only the benchmarks use: the paper-style loop regenerates each z_k
tensor by tensor into caller-owned scratch buffers (the optimizer uses
:class:`zoprivacy.optim.directions.DirectionStream`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from zoprivacy.optim.directions import fill_direction_, tensor_seeds

__all__ = ["iter_direction", "scratch_buffers"]


def _view(buffer: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    nbytes = param.numel() * param.element_size()
    return buffer[:nbytes].view(param.dtype).view(param.shape)


def iter_direction(
    params: Sequence[torch.Tensor],
    *,
    seed: int,
    step: int,
    k: int,
    scratch: dict[torch.device, torch.Tensor],
    generators: dict[torch.device, torch.Generator] | None = None,
    kind: str = "gaussian",
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(index, param, z)`` for every tensor of direction ``k`` at step ``step``.

    ``scratch[param.device]`` is a flat uint8 buffer with at least as many bytes as the largest
    tensor on that device (:func:`scratch_buffers`); ``z`` is a view of it with ``param``'s dtype
    and shape, overwritten by the next item, so use it before advancing the iterator.
    """
    seeds = tensor_seeds(seed, step, k, len(params))
    for index, (param, tensor_seed) in enumerate(zip(params, seeds, strict=True)):
        view = _view(scratch[param.device], param)
        gen = None if generators is None else generators.get(param.device)
        fill_direction_(view, tensor_seed, gen, kind=kind)
        yield index, param, view


def scratch_buffers(params: Sequence[torch.Tensor]) -> dict[torch.device, torch.Tensor]:
    """One flat uint8 buffer per device, with the byte size of the largest tensor there."""
    sizes: dict[torch.device, int] = {}
    for p in params:
        sizes[p.device] = max(sizes.get(p.device, 0), p.numel() * p.element_size())
    return {dev: torch.empty(n, dtype=torch.uint8, device=dev) for dev, n in sizes.items()}
