"""Poisson sampling and the size release of a data-parallel run (Algorithm 1, lines 1-4).

Sampling: :class:`DistributedPoissonSampler` partitions the records across ranks (record i
belongs to rank i mod W); each rank decides the inclusion of its own records with its own
generator seeded from OS entropy. Every record is then kept independently with probability q, so
the union of the ranks' batches is exactly a Poisson sample of rate q of the whole data set,
which is what the privacy analysis (Lemma 5) assumes. Every rank passes the *whole* data set.

Size release: :func:`release_size_distributed` releases ñ once, on group rank 0, and broadcasts
it (:mod:`zoprivacy.distributed` holds the collectives). These names are also importable from
:mod:`zoprivacy.distributed`.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from zoprivacy.data.poisson import (
    GeneratorLike,
    PoissonBatchSampler,
    check_loader_kwargs,
    empty_safe_loader,
    num_records_of,
    release_size,
)

__all__ = [
    "DistributedPoissonSampler",
    "distributed_poisson_loader",
    "group_rank_size",
    "is_root",
    "release_size_distributed",
]


def group_rank_size(process_group: Any) -> tuple[int, int]:
    """(group rank, group size) of this process in ``process_group`` (None: the default group)."""
    from zoprivacy.distributed import DataParallel

    if isinstance(process_group, DataParallel):
        return process_group.rank, process_group.world_size
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
    group = dist.group.WORLD if process_group is None else process_group
    return dist.get_rank(group), dist.get_world_size(group)


def is_root(process_group: Any) -> bool:
    """True when there is no group (one process) or on group rank 0."""
    if process_group is None:
        return True
    return group_rank_size(process_group)[0] == 0


def release_size_distributed(
    num_records: int,
    laplace_scale: float | None,
    *,
    accountant: Any | None,
    process_group: Any,
) -> float:
    """The size release of a data-parallel run: once, on group rank 0, broadcast to all.

    Rank 0 releases ñ = max(1, n + Lap(ψ)) with OS-entropy noise and charges its accountant;
    every other rank charges its own accountant copy identically (no noise drawn) and receives
    ñ. ``laplace_scale=None`` treats n as public (ñ = n). Every rank must pass the size of the
    whole data set; a rank whose n differs from rank 0's makes every rank raise ``ValueError``.
    """
    from zoprivacy.distributed import DataParallel, PeerFailure

    dp = DataParallel.wrap(process_group)
    buf = torch.zeros(3, dtype=torch.float64)
    error: BaseException | None = None
    if dp.is_root:
        try:
            if laplace_scale is None:
                noisy = float(num_records)
            else:
                noisy = release_size(num_records, laplace_scale, accountant=accountant)
            buf[0], buf[1] = noisy, float(num_records)
        except BaseException as exc:
            error = exc
            buf[2] = 1.0
    buf = buf.to(dp.device)
    dp.broadcast("broadcast of the noisy dataset size", buf)
    if error is not None:
        raise error
    noisy, root_n, failed = buf.cpu().tolist()
    if failed:
        raise PeerFailure(
            "group rank 0 failed to release the dataset size", peer_rank=0, recoverable=True
        )
    if not dp.is_root and laplace_scale is not None and accountant is not None:
        accountant.release_size(laplace_scale)
    flag = torch.tensor(
        [float(dp.rank + 1) if float(num_records) != root_n else 0.0],
        dtype=torch.float64,
        device=dp.device,
    )
    dp.all_max("dataset size check", flag)
    bad = int(flag.item())
    if bad:
        raise ValueError(
            f"group rank {bad - 1} has a dataset of a different size than rank 0 "
            f"({int(root_n)} records): with process_group, every rank passes the whole data "
            "set (each rank samples only the records it owns)"
        )
    return noisy


# ---------------------------------------------------------------------- sampling
def _rank_generator(generator: GeneratorLike, rank: int) -> GeneratorLike:
    """An explicit generator/seed gives each rank its own independent stream; None stays None."""
    if generator is None:
        return None  # PoissonBatchSampler seeds each process from OS entropy
    if isinstance(generator, np.random.Generator):
        base = int(generator.integers(0, 2**63))
    elif isinstance(generator, torch.Generator):
        base = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    elif isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        base = operator.index(generator)
    else:
        raise TypeError(
            "generator must be None, an int seed, a numpy.random.Generator or a torch.Generator, "
            f"got {type(generator).__name__}"
        )
    return np.random.default_rng(np.random.SeedSequence(base, spawn_key=(rank,)))


class DistributedPoissonSampler(Sampler[list[int]]):
    """This rank's part of a Poisson sample of rate q of the whole data set.

    Records are partitioned across ranks: record i belongs to rank i mod ``world_size``. Each step
    every rank keeps each of its own records independently with probability q (a
    :class:`~zoprivacy.data.PoissonBatchSampler` over its records), with its own generator. The
    union of the ranks' batches therefore keeps every record of the data set independently with
    probability q: exactly the Poisson sample of rate q that a single process would draw. A rank
    may get an empty batch (``[]``) while others do not; it still takes part in the step.

    Args:
        num_records: size n of the whole data set (the same on every rank).
        sample_rate: q in (0, 1].
        rank, world_size: this process's group rank and the group size.
        steps: batches per pass (as in :class:`~zoprivacy.data.PoissonBatchSampler`).
        generator: None (default): each process seeds its own generator from OS entropy, so the
            ranks' draws are independent and not derivable from any public seed. An int seed (or
            a generator) is for tests: each rank derives its own stream from it and the rank,
            and a :class:`~zoprivacy.data.poisson.PredictableSamplingWarning` is raised.
    """

    def __init__(
        self,
        num_records: int,
        sample_rate: float,
        *,
        rank: int,
        world_size: int,
        steps: int | None = None,
        generator: GeneratorLike = None,
    ) -> None:
        for name, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world={world_size}")
        if isinstance(num_records, bool) or not isinstance(num_records, numbers.Integral):
            raise TypeError(f"num_records must be an int, got {type(num_records).__name__}")
        if num_records < 0:
            raise ValueError(f"num_records must be >= 0, got {num_records}")
        self.num_records = int(num_records)
        self.rank = int(rank)
        self.world_size = int(world_size)
        owned = len(range(self.rank, self.num_records, self.world_size))
        self._local = PoissonBatchSampler(
            owned, sample_rate, steps=steps, generator=_rank_generator(generator, self.rank)
        )
        self.sample_rate = self._local.sample_rate
        self.steps = self._local.steps

    @property
    def owned_records(self) -> range:
        """The indices of the records this rank samples."""
        return range(self.rank, self.num_records, self.world_size)

    def sample_batch(self) -> list[int]:
        """Draw this rank's part of one Poisson batch (sorted global indices, possibly empty)."""
        return [self.rank + i * self.world_size for i in self._local.sample_batch()]

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.sample_batch()

    def __len__(self) -> int:
        return self.steps

    def __repr__(self) -> str:
        return (
            f"DistributedPoissonSampler(num_records={self.num_records}, "
            f"sample_rate={self.sample_rate}, rank={self.rank}, world_size={self.world_size}, "
            f"steps={self.steps})"
        )


def distributed_poisson_loader(
    dataset: Any,
    sample_rate: float,
    *,
    steps: int,
    process_group: Any = None,
    rank: int | None = None,
    world_size: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    generator: GeneratorLike = None,
    **dataloader_kwargs: Any,
) -> DataLoader:
    """:func:`~zoprivacy.data.poisson_loader` for one rank of a data-parallel run.

    ``dataset`` is the whole data set (the same on every rank); the loader yields this rank's
    part of each Poisson batch (:class:`DistributedPoissonSampler`), an empty one as
    :data:`~zoprivacy.data.EMPTY_BATCH`. Rank and world size come from ``process_group``
    (default: the default group) unless given.
    """
    check_loader_kwargs(dataloader_kwargs, "distributed_poisson_loader")
    if rank is None or world_size is None:
        group_rank, group_size = group_rank_size(process_group)
        rank = group_rank if rank is None else rank
        world_size = group_size if world_size is None else world_size
    num_records = num_records_of(dataset)
    sampler = DistributedPoissonSampler(
        num_records, sample_rate, rank=rank, world_size=world_size, steps=steps, generator=generator
    )
    return empty_safe_loader(dataset, sampler, collate_fn, **dataloader_kwargs)
