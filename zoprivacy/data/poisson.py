"""Poisson batch sampling and the private release of the dataset size.

DP-AggZO (Bao et al., USENIX Security 2025, Algorithm 1) draws every batch by *Poisson sampling*:
at each step every record is kept independently with probability ``q`` (the sample rate), so the
batch size ``|B|`` is random, private, and may be zero. The privacy analysis (the subsampled
Gaussian term of Lemma 5) relies on exactly this sampling scheme, so

* batches are drawn here with a fresh, independent draw per record per step;
* by default the draws come from a generator seeded from OS entropy: batch selection must never be
  derivable from a public seed (an explicit seed is allowed for tests, and warns);
* an empty batch is a real step: it is yielded, never skipped (see :class:`EmptyBatch`).

The optimizer normalises by the *expected* batch size ``b = q·ñ`` where ``ñ = n + Lap(ψ)`` is a
noisy release of the dataset size (Algorithm 1, lines 1-2), charged once to the accountant
(:func:`release_size`, :func:`expected_batch_size`).

Empty-batch convention
----------------------
:func:`poisson_loader` never calls the user's collate function on an empty index list (most collate
functions crash on ``[]``). An empty batch comes out as the singleton :data:`EMPTY_BATCH`, an
instance of :class:`EmptyBatch`: an empty, read-only mapping with ``len() == 0`` that is falsy,
iterates over nothing, and returns itself from ``.to(...)``/``.pin_memory()``. A loss closure
therefore handles it with one line::

    def closure():
        if not batch:                      # EMPTY_BATCH (or an empty dict after moving devices)
            return torch.zeros(0)
        ...

The closures built by :mod:`zoprivacy.tasks` already do this.
"""

from __future__ import annotations

import numbers
import operator
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from zoprivacy import checks as check

__all__ = [
    "EMPTY_BATCH",
    "EmptyBatch",
    "PoissonBatchSampler",
    "PredictableSamplingWarning",
    "check_loader_kwargs",
    "empty_safe_loader",
    "expected_batch_size",
    "is_empty_batch",
    "num_records_of",
    "poisson_loader",
    "release_size",
]

GeneratorLike = int | np.random.Generator | torch.Generator | None


class PredictableSamplingWarning(UserWarning):
    """An explicit seed or generator was given: the random draws it controls are predictable.

    Fine for tests and reproducible experiments; never use it for a run whose privacy matters,
    since anyone who knows the seed knows which records were in each batch (or the size noise).
    """


class _SizeAccountant(Protocol):
    def release_size(self, laplace_scale: float) -> Any: ...


def _numpy_generator(generator: GeneratorLike, what: str) -> np.random.Generator:
    """Turn ``generator`` into a numpy Generator; ``None`` means seeded from OS entropy."""
    if generator is None:
        # A 128-bit seed from the OS CSPRNG: nothing public determines the stream.
        return np.random.default_rng(secrets.randbits(128))
    warnings.warn(
        f"an explicit generator/seed was given, so {what} is predictable from it; "
        "use generator=None (OS entropy) for any run whose privacy matters",
        PredictableSamplingWarning,
        stacklevel=3,
    )
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return np.random.default_rng(seed)
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return np.random.default_rng(operator.index(generator))
    raise TypeError(
        "generator must be None, an int seed, a numpy.random.Generator or a torch.Generator, "
        f"got {type(generator).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# Poisson sampling
# ---------------------------------------------------------------------------------------------


class PoissonBatchSampler(Sampler[list[int]]):
    """Batch sampler for Poisson subsampling: each record is kept independently with prob. ``q``.

    Every step draws a fresh batch: the number of records is ``Binomial(n, q)`` and, given that
    number, the records are a uniformly random subset; this is exactly the distribution of ``n``
    independent Bernoulli(``q``) inclusions, drawn in time proportional to the batch size (fast
    for millions of records). Batches are sorted lists of indices; an empty batch is yielded as
    ``[]`` and counts as a step, as the privacy analysis requires.

    Batch ``t`` (the ``t``-th draw, counted by :attr:`position`) comes from its own stream,
    ``PCG64(SeedSequence(key, spawn_key=(t,)))``, where ``key`` is a 128-bit secret. So a batch
    depends only on (key, t): a seeded run resumed at step ``t`` (:meth:`load_state_dict`, or
    ``position=t``) draws exactly the batches an unbroken run would, however far a prefetching
    ``DataLoader`` had read ahead before the crash. The key of an OS-entropy sampler is never
    saved (:meth:`state_dict` holds no secret); a resumed private run draws a fresh key, which
    leaves the distribution of every later batch unchanged (the draws are independent per step).

    Args:
        num_records: dataset size ``n`` (``int >= 0``).
        sample_rate: inclusion probability ``q`` in ``(0, 1]``.
        steps: number of batches one pass over the sampler yields (its ``len()``). ``None`` means
            ``max(1, round(1 / q))``, one expected epoch. Each new iteration continues with new
            batches (it does not repeat the previous pass).
        generator: ``None`` (default) takes the key from OS entropy, so batch selection is not
            derivable from any public seed. An int seed, ``numpy.random.Generator`` or
            ``torch.Generator`` (one 128-bit draw from it gives the key) makes batches
            reproducible (tests only) and warns with :class:`PredictableSamplingWarning`.
        position: index of the first batch to draw (default 0).
    """

    def __init__(
        self,
        num_records: int,
        sample_rate: float,
        *,
        steps: int | None = None,
        generator: GeneratorLike = None,
        position: int = 0,
    ) -> None:
        self.num_records: int = check.integer("num_records", num_records)
        self.sample_rate: float = check.sample_rate(sample_rate)
        steps = None if steps is None else check.integer("steps", steps)
        if steps is None:
            steps = max(1, round(1.0 / self.sample_rate))
        self.steps: int = steps
        self.position: int = check.integer("position", position)
        self._key, self.seeded = _sampling_key(generator, "batch selection")

    def _batch_rng(self, index: int) -> np.random.Generator:
        return np.random.Generator(
            np.random.PCG64(np.random.SeedSequence(self._key, spawn_key=(index,)))
        )

    def sample_batch(self) -> list[int]:
        """Draw the next Poisson batch (a sorted list of record indices, possibly empty)."""
        n, q = self.num_records, self.sample_rate
        index = self.position
        self.position = index + 1
        if q >= 1.0:
            return list(range(n))
        rng = self._batch_rng(index)
        size = int(rng.binomial(n, q))
        if size == 0:
            return []
        idx = rng.choice(n, size=size, replace=False, shuffle=False)
        idx.sort()
        return idx.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.sample_batch()

    def __len__(self) -> int:
        return self.steps

    def state_dict(self) -> dict[str, Any]:
        """``{"mode", "position"}``, plus the key only for a seeded sampler (never a secret)."""
        state: dict[str, Any] = {
            "mode": "seeded" if self.seeded else "os_entropy",
            "position": self.position,
        }
        if self.seeded:
            state["key"] = self._key
        return state

    def load_state_dict(self, state: Mapping[str, Any], *, position: int | None = None) -> None:
        """Continue a :meth:`state_dict`: a seeded one restores its key (so the batches are the
        same as in the saved run), an OS-entropy one keeps this sampler's fresh key.

        Args:
            state: from :meth:`state_dict`.
            position: the next batch index to draw (default: the saved one). A resumed run passes
                its step count, the index of the batch its next step uses.
        """
        mode = state.get("mode")
        if mode not in ("seeded", "os_entropy"):
            raise ValueError(f"sampler state has unknown mode {mode!r}; expected a state_dict()")
        pos = check.integer("position", state.get("position", 0) if position is None else position)
        if mode == "seeded":
            key = state.get("key")
            if isinstance(key, bool) or not isinstance(key, numbers.Integral) or key < 0:
                raise ValueError(f"seeded sampler state needs a non-negative int key, got {key!r}")
            self._key, self.seeded = int(key), True
        self.position = pos  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"PoissonBatchSampler(num_records={self.num_records}, "
            f"sample_rate={self.sample_rate}, steps={self.steps}, position={self.position}, "
            f"{'seeded' if self.seeded else 'os_entropy'})"
        )


def _sampling_key(generator: GeneratorLike, what: str) -> tuple[int, bool]:
    """The 128-bit key of a sampler and whether it is seeded (predictable) or from OS entropy."""
    if generator is None:
        return secrets.randbits(128), False
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        seed = operator.index(generator)
        if seed < 0:
            raise ValueError(f"generator seed must be >= 0, got {seed}")
        _numpy_generator(generator, what)  # validates and warns
        return seed, True
    rng = _numpy_generator(generator, what)  # validates the type and warns
    words = rng.integers(0, 2**32, size=4, dtype=np.uint64)
    return int(sum(int(w) << (32 * i) for i, w in enumerate(words))), True


# ---------------------------------------------------------------------------------------------
# empty batches and the loader
# ---------------------------------------------------------------------------------------------


class EmptyBatch(Mapping):
    """The batch that :func:`poisson_loader` yields when a Poisson draw selects no record.

    A singleton (:data:`EMPTY_BATCH`): an empty read-only mapping, ``len() == 0``, falsy, with
    ``.to(...)`` and ``.pin_memory()`` returning itself so device-moving code passes it through.
    It survives pickling (DataLoader workers) as the same singleton. A closure should return a
    loss tensor of shape ``[0]`` for it; the optimizer then releases pure noise for that step.
    """

    _instance: EmptyBatch | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> EmptyBatch:
        # Accepts (and ignores) an empty mapping so ``type(batch)({})`` in torch's
        # pin_memory code still gives back the singleton.
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __getitem__(self, key: Any) -> Any:
        raise KeyError(key)

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def to(self, *args: Any, **kwargs: Any) -> EmptyBatch:
        """Return ``self`` (there is nothing to move)."""
        return self

    def pin_memory(self, *args: Any, **kwargs: Any) -> EmptyBatch:
        """Return ``self`` (there is nothing to pin)."""
        return self

    def __reduce__(self) -> tuple[type, tuple]:
        return (EmptyBatch, ())

    def __repr__(self) -> str:
        return "EMPTY_BATCH"


EMPTY_BATCH = EmptyBatch()
"""The singleton empty batch; see :class:`EmptyBatch`."""


def is_empty_batch(batch: Any) -> bool:
    """True for :data:`EMPTY_BATCH`, for an empty dict/list/tuple, and for tensors of length 0."""
    if isinstance(batch, EmptyBatch):
        return True
    if isinstance(batch, torch.Tensor):
        return batch.dim() > 0 and batch.shape[0] == 0
    if isinstance(batch, Mapping | Sequence) and not isinstance(batch, str | bytes):
        return len(batch) == 0
    return False


class _EmptySafeCollate:
    """Collate wrapper: an empty record list gives :data:`EMPTY_BATCH`, never ``collate([])``."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, records: list[Any]) -> Any:
        if len(records) == 0:
            return EMPTY_BATCH
        return self.collate_fn(records)


class _EmptySafeDataset(Dataset):
    """Delegating view of a map-style dataset that answers an empty fetch without touching it.

    Some datasets (Hugging Face ``datasets.Dataset``) fetch through ``__getitems__``, whose
    behaviour on an empty key list is not guaranteed; this wrapper returns ``[]`` for it.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        if len(indices) == 0:
            return []
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is not None:
            return list(getitems(indices))
        return [self.dataset[i] for i in indices]


FORBIDDEN_LOADER_KWARGS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")
"""``DataLoader`` options that would replace Poisson sampling; the Poisson loaders refuse them."""


def check_loader_kwargs(dataloader_kwargs: dict[str, Any], who: str) -> None:
    """Refuse the ``DataLoader`` options of :data:`FORBIDDEN_LOADER_KWARGS` (``who`` names the
    loader in the message)."""
    bad = [k for k in FORBIDDEN_LOADER_KWARGS if k in dataloader_kwargs]
    if bad:
        raise TypeError(
            f"{who} does not accept {', '.join(bad)}: batches are Poisson samples "
            "(set sample_rate and steps instead)"
        )


def num_records_of(dataset: Any) -> int:
    """``len(dataset)`` of a map-style dataset, or a TypeError saying what is needed."""
    try:
        return len(dataset)
    except TypeError as exc:
        raise TypeError("dataset must be map-style (support len() and indexing)") from exc


def empty_safe_loader(
    dataset: Any,
    batch_sampler: Sampler[list[int]],
    collate_fn: Callable[[list[Any]], Any] | None = None,
    **dataloader_kwargs: Any,
) -> DataLoader:
    """A ``DataLoader`` over ``batch_sampler``'s index lists in which an empty list is yielded as
    :data:`EMPTY_BATCH` without calling ``collate_fn`` or touching the dataset."""
    return DataLoader(
        _EmptySafeDataset(dataset),
        batch_sampler=batch_sampler,
        collate_fn=_EmptySafeCollate(default_collate if collate_fn is None else collate_fn),
        **dataloader_kwargs,
    )


def poisson_loader(
    dataset: Any,
    sample_rate: float,
    *,
    steps: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    generator: GeneratorLike = None,
    **dataloader_kwargs: Any,
) -> DataLoader:
    """A ``DataLoader`` whose batches are Poisson samples of ``dataset`` (Algorithm 1).

    Works with any map-style dataset (``len`` + integer indexing): a torch ``Dataset``, a
    Hugging Face ``datasets.Dataset``, a plain list. Iterating yields ``steps`` batches, each
    collated by ``collate_fn`` (default ``torch.utils.data.default_collate``), except that an
    empty batch is yielded as :data:`EMPTY_BATCH` without calling ``collate_fn`` (see the module
    docstring for how a closure handles it).

    Args:
        dataset: map-style dataset of ``n`` records.
        sample_rate: inclusion probability ``q`` in ``(0, 1]``.
        steps: number of batches per pass (``len(loader)``).
        collate_fn: turns a non-empty list of records into a batch.
        generator: as in :class:`PoissonBatchSampler` (``None``: OS entropy).
        **dataloader_kwargs: passed to ``DataLoader`` (``num_workers``, ``pin_memory``, ...);
            ``batch_size``, ``shuffle``, ``sampler``, ``batch_sampler`` and ``drop_last`` are
            refused because they would replace Poisson sampling.
    """
    check_loader_kwargs(dataloader_kwargs, "poisson_loader")
    if steps is None:
        raise TypeError("steps must be an int (the number of batches), got None")
    num_records = num_records_of(dataset)
    sampler = PoissonBatchSampler(num_records, sample_rate, steps=steps, generator=generator)
    return empty_safe_loader(dataset, sampler, collate_fn, **dataloader_kwargs)


# ---------------------------------------------------------------------------------------------
# private size release
# ---------------------------------------------------------------------------------------------


def _os_entropy_laplace(scale: float) -> float:
    """round(Laplace(0, scale)) from OS entropy, sampled exactly with integer arithmetic.

    :func:`zoprivacy.noise.samplers.rounded_laplace`: n + round(L) = round(n + L) is
    post-processing of the Laplace mechanism (same 1/ψ pure DP, same RDP curve), and an integer
    has no low-order bits that could reveal n (unlike a float ``n + scale·(e1 − e2)``, open to
    Mironov's 2012 attack).
    """
    from zoprivacy.noise.samplers import rounded_laplace

    return float(rounded_laplace(scale))


def release_size(
    num_records: int,
    laplace_scale: float,
    *,
    accountant: _SizeAccountant | None = None,
    generator: GeneratorLike = None,
) -> float:
    """Release the dataset size privately: ``ñ = max(1, n + Lap(ψ))`` (Algorithm 1, lines 1-2).

    Adding or removing one record changes ``n`` by 1, so the Laplace mechanism with scale
    ``ψ`` is ``1/ψ``-DP (pure); its Rényi-DP cost is the first term of Lemma 5, which the
    accountant adds to the ``T`` subsampled-Gaussian steps. From OS entropy the noise is
    ``round(Lap(ψ))``, drawn exactly (so ``ñ`` is an integer-valued float): ``round(n + L)`` is
    post-processing of ``n + L`` and keeps its guarantee, without floating-point leaks. Clamping to
    at least 1 is post-processing (it keeps ``b = q·ñ`` positive) and costs nothing.

    Args:
        num_records: the true size ``n`` (``int >= 0``).
        laplace_scale: ``ψ > 0``, finite (e.g. ``plan.laplace_scale`` from
            ``accounting.calibrate``).
        accountant: if given, ``accountant.release_size(laplace_scale)`` is called *before* any
            noise is drawn (it raises if a size was already released or the budget is exceeded,
            and then nothing is released).
        generator: ``None`` (default) draws the noise from the OS CSPRNG. An int seed or a
            generator makes the noise reproducible (tests only) and warns with
            :class:`PredictableSamplingWarning`.

    Returns:
        ``ñ`` as a float ``>= 1``.
    """
    n = check.integer("num_records", num_records)
    psi = check.laplace_scale(laplace_scale)
    if accountant is not None:
        accountant.release_size(psi)
    if generator is None:
        noise = _os_entropy_laplace(psi)
    else:
        noise = float(_numpy_generator(generator, "the size noise").laplace(0.0, psi))
    return max(1.0, float(n) + noise)  # type: ignore[operator]


def expected_batch_size(sample_rate: float, noisy_size: float) -> float:
    """The expected batch size ``b = q·ñ`` used to normalise every step (never the true ``|B|``).

    Args:
        sample_rate: ``q`` in ``(0, 1]``.
        noisy_size: ``ñ`` from :func:`release_size` (positive and finite).
    """
    q = check.sample_rate(sample_rate)
    size = check.real("noisy_size", noisy_size, positive=True)
    return q * size
