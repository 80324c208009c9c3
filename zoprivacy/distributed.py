"""Data-parallel DP-AggZO on ``torch.distributed`` (gloo on CPUs, NCCL on GPUs, ``torchrun``).

One DP-AggZO step releases a K-vector, so data parallelism needs only O(K) floats per step,
whatever the model size. With ``DPAggZO(..., process_group=group)`` every rank holds the whole
model and

1. evaluates the 2K perturbed losses of *its own* records (its closure returns only those), with
   the same public direction seeds as every other rank;
2. clips its own records' Δ_agg(x) to c and sums them;
3. joins three small collectives (:class:`DataParallel`):

   * C1, ``all_reduce(MAX)`` of 11 floats: a failure flag (a rank whose closure raised tells the
     others, which then fail at once instead of waiting for a timeout), the largest |Δ_agg| entry
     (the common scale of eq. 27), the largest relative clipping error (eq. 26), and digests of
     the configuration (hyper-parameters, seed, step count) and, when a check is due, of the
     parameters, sent as (x, −x) so that MAX detects any disagreement;
   * C2, ``all_reduce(SUM)`` of 3K + 3 floats: |B|, the number of clipped records, the loss sum,
     Σ Δ̂_agg(x) and the two scaled K-sums Σ (Δ_agg − Δ̂_agg)/s and Σ Δ_agg/s of eq. 27;
   * C3, ``broadcast`` from group rank 0 of K + 1 floats: rank 0 alone draws the noise
     v ~ N(0, σ²c² I_K) from its :class:`~zoprivacy.noise.NoiseSource` and broadcasts the
     release S = Σ Δ̂_agg + v (plus a status flag). The noise is drawn once per step, never once
     per rank (which would multiply it) and never from a seed the ranks share.

4. applies the update θ ← θ − (η/b) Σ_k S_k z_k with rank 0's S, so parameters stay bit-identical
   on every rank (the same float operations on the same values, on the same device type).

Payload per step (float64): (11 + 3K + 3 + K + 1)·8 = (4K + 15)·8 bytes handed to the
collectives per rank: 152 bytes at K = 1, 632 at K = 16, 2168 at K = 64, for any model size
(:attr:`DataParallel.last_step_bytes` counts them).

Trust: the ranks see each other's un-noised clipped sums and diagnostics (only S is a DP
release), so every rank must be inside the data owner's trust domain, as it is anyway since it
reads raw records.

Sampling: :class:`DistributedPoissonSampler` partitions the records across ranks (record i
belongs to rank i mod W); each rank decides the inclusion of its own records with its own
generator seeded from OS entropy. Every record is then kept independently with probability q, so
the union of the ranks' batches is exactly a Poisson sample of rate q of the whole data set,
which is what the privacy analysis (Lemma 5) assumes. Every rank passes the *whole* data set.

Failures: a rank whose closure raises makes every rank raise in the same step (the others with
:class:`PeerFailure`, ``recoverable=True``; the process group is still usable). A rank that dies
makes the others raise :class:`PeerFailure` (``recoverable=False``) as soon as gloo/NCCL notices
the closed connection, or at the latest after the process group's timeout
(``init_process_group(..., timeout=timedelta(seconds=...))``). In both cases no rank updates its
parameters or advances its step counter, and a checkpoint written before the step is untouched.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler, default_collate

from zoprivacy.data.poisson import (
    _FORBIDDEN_LOADER_KWARGS,
    GeneratorLike,
    PoissonBatchSampler,
    _EmptySafeCollate,
    _EmptySafeDataset,
    release_size,
)
from zoprivacy.optim.directions import draw_public_seed

__all__ = [
    "DataParallel",
    "DistributedPoissonSampler",
    "PeerFailure",
    "broadcast_parameters",
    "distributed_poisson_loader",
    "is_root",
    "parameter_digest",
    "release_size_distributed",
]

_HEAD = 11  # floats in C1: fail, scale, max_err, config digest (2), param digest (2), negatives
_CHUNK = 1 << 24  # bytes hashed per piece (CUDA tensors are copied to the CPU piece by piece)


class PeerFailure(RuntimeError):
    """Another rank of the process group failed during a data-parallel step.

    Attributes:
        step: the optimizer step (None during setup).
        peer_rank: the group rank that reported a failure, when known.
        recoverable: True when the peer raised cleanly and told the group (the process group is
            still usable and every rank can retry or stop together); False when a peer is gone or
            timed out (the process group is broken: stop and restart from the last checkpoint).
    """

    def __init__(
        self,
        message: str,
        *,
        step: int | None = None,
        peer_rank: int | None = None,
        recoverable: bool = False,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.peer_rank = peer_rank
        self.recoverable = recoverable


class DataParallel:
    """The collectives of one data-parallel DP-AggZO run over ``process_group``.

    Built by ``DPAggZO(..., process_group=...)`` from a process group, or passed there directly to
    set options: ``DPAggZO(..., process_group=DataParallel(group, check_every=100))``.

    Args:
        process_group: a ``torch.distributed`` process group (e.g. ``dist.group.WORLD``) this
            process belongs to; ``init_process_group`` must have been called.
        check_every: every this many steps, the parameters' digest (a hash of their bytes, O(d)
            local work, 16 bytes of communication) is compared across ranks at the start of the
            step; 0 (default) checks them only when the optimizer is built. The configuration
            digest (hyper-parameters, seed, step count) is compared at every step.

    Counters (payload bytes handed to the collectives by this rank; a ring all-reduce puts about
    2(W−1)/W times that on the wire per rank): :attr:`total_bytes`, :attr:`total_collectives`,
    :attr:`setup_bytes` (construction checks and the size release), and
    :attr:`last_step_bytes`, :attr:`last_step_collectives` (the last step, 0 before any).
    """

    def __init__(self, process_group: Any, *, check_every: int = 0) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "process_group needs torch.distributed to be initialised: call "
                "torch.distributed.init_process_group('gloo' or 'nccl', timeout=...) first "
                "(torchrun sets the environment it reads)"
            )
        if process_group is None:
            raise ValueError("process_group is None: pass e.g. torch.distributed.group.WORLD")
        if isinstance(check_every, bool) or not isinstance(check_every, numbers.Integral):
            raise TypeError(f"check_every must be an int >= 0, got {check_every!r}")
        if check_every < 0:
            raise ValueError(f"check_every must be an int >= 0, got {check_every}")
        rank = dist.get_rank(process_group)
        if rank < 0:
            raise ValueError("this process is not a member of process_group")
        self.group = process_group
        self.rank: int = rank
        self.world_size: int = dist.get_world_size(process_group)
        self.check_every = int(check_every)
        self.device = _comm_device(process_group)
        self.total_bytes = 0
        self.total_collectives = 0
        self.setup_bytes = 0
        self.last_step_bytes = 0
        self.last_step_collectives = 0

    @classmethod
    def wrap(cls, process_group: Any) -> DataParallel:
        """``process_group`` itself if it is a :class:`DataParallel`, else a new one around it."""
        return process_group if isinstance(process_group, cls) else cls(process_group)

    @property
    def is_root(self) -> bool:
        """True on group rank 0, the rank that draws the noise and writes checkpoints."""
        return self.rank == 0

    def __repr__(self) -> str:
        return (
            f"DataParallel(rank={self.rank}, world_size={self.world_size}, "
            f"device={self.device}, check_every={self.check_every})"
        )

    # ------------------------------------------------------------------ setup
    def agree_on_seed(self, seed: int | None) -> int:
        """The public direction seed: rank 0's (drawn from OS entropy there when ``seed`` is None).

        A rank that passed an explicit seed keeps it; :meth:`verify` then fails on every rank if
        it differs from rank 0's.
        """
        value = seed if seed is not None else (draw_public_seed() if self.is_root else -1)
        buf = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._collective("broadcast of the direction seed", None, buf, self._broadcast)
        return int(buf.item()) if seed is None else seed

    def verify(self, optimizer: Any) -> None:
        """Check that every rank has the same configuration and bit-identical parameters.

        A collective: every rank of the group must call it. Raises ``RuntimeError`` on every
        rank on a mismatch.
        """
        head = self._head(optimizer, check_params=True)
        self._collective("parameter check", None, head, self._max)
        self._check_head(head, None)

    # ------------------------------------------------------------------ the step
    def reduce(
        self,
        optimizer: Any,
        step: int,
        agg: torch.Tensor,
        clipped: torch.Tensor,
        clip_fraction: float,
        max_err: float,
        loss_sum: float,
    ) -> tuple[torch.Tensor, int, float, float, float, float]:
        """C1 and C2: sum this rank's clipped records with every other rank's.

        Args: this rank's Δ_agg and Δ̂_agg ([|B_r|, K], float64), its clip fraction, eq. 26 error
        and loss sum. Returns the global (Σ Δ̂_agg [K] float64 CPU, |B|, loss sum,
        clip fraction, max clip error (eq. 26), batch clip error (eq. 27)).
        """
        self.last_step_bytes = 0
        self.last_step_collectives = 0
        batch = agg.shape[0]
        local_scale = float(agg.abs().max()) if batch else 0.0
        due = self.check_every > 0 and step > 0 and step % self.check_every == 0
        head = self._head(optimizer, check_params=due, scale=local_scale, max_err=max_err)
        self._collective("all-reduce (max) of the step header", step, head, self._max)
        if float(head[0]) > 0:  # a peer's closure raised: take rank 0's parameters, then raise
            self._resync(optimizer, step)
        self._check_head(head, step)
        scale, global_max_err = float(head[1]), float(head[2])

        k = agg.shape[1]
        body = torch.zeros(3 + 3 * k, dtype=torch.float64)
        body[0] = float(batch)
        body[1] = float(round(clip_fraction * batch))
        body[2] = loss_sum
        if batch:
            body[3 : 3 + k] = clipped.sum(dim=0)
            if scale > 0.0:
                body[3 + k : 3 + 2 * k] = ((agg - clipped) / scale).sum(dim=0)
                body[3 + 2 * k :] = (agg / scale).sum(dim=0)
        body = body.to(self.device)
        self._collective("all-reduce (sum) of the clipped K-sums", step, body, self._sum)
        body = body.cpu()

        total = round(float(body[0]))
        clip_fraction = float(body[1]) / total if total else 0.0
        num = float(torch.linalg.vector_norm(body[3 + k : 3 + 2 * k]))
        den = float(torch.linalg.vector_norm(body[3 + 2 * k :]))
        if num == 0.0:
            batch_err = 0.0
        elif den == 0.0:
            batch_err = math.inf
        else:
            batch_err = num / den
        summed = body[3 : 3 + k].clone()
        return summed, total, float(body[2]), clip_fraction, global_max_err, batch_err

    def release(
        self,
        step: int,
        summed: torch.Tensor,
        draw: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> torch.Tensor:
        """C3: rank 0 releases ``draw(summed)`` (the sum plus noise, if any) and broadcasts it.

        ``draw`` is called on rank 0 only, once. Every rank returns rank 0's S (float64, CPU), so
        every rank applies the bit-identical update.
        """
        k = summed.numel()
        buf = torch.zeros(k + 1, dtype=torch.float64)
        error: BaseException | None = None
        if self.is_root:
            try:
                released = summed if draw is None else draw(summed)
                buf[:k] = released
            except BaseException as exc:  # tell the peers, then raise it here
                error = exc
                buf[k] = 1.0
        buf = buf.to(self.device)
        self._collective("broadcast of the noisy sum", step, buf, self._broadcast)
        if error is not None:
            raise error
        buf = buf.cpu()
        if float(buf[k]) != 0.0:
            raise PeerFailure(
                f"DPAggZO step {step}: group rank 0 failed to draw the noise; nothing was "
                "released or updated on any rank",
                step=step,
                peer_rank=0,
                recoverable=True,
            )
        return buf[:k].clone()

    def abort(self, optimizer: Any, step: int) -> None:
        """Tell the peers that this rank's step failed (instead of C1); never raises.

        Called by the optimizer when the closure raises, so that the other ranks raise
        :class:`PeerFailure` in the same step rather than waiting for the timeout. Then every
        rank takes rank 0's parameters (see :meth:`_resync`).
        """
        head = torch.zeros(_HEAD, dtype=torch.float64, device=self.device)
        head[0] = float(self.rank + 1)
        try:
            self._collective("abort", step, head, self._max)
            self._resync(optimizer, step)
        except PeerFailure:
            pass

    def _resync(self, optimizer: Any, step: int) -> None:
        """Broadcast rank 0's parameters after a step that failed on some rank (O(d), rare).

        Undoing a perturbation by arithmetic is exact only up to rounding, and a rank whose
        closure raised undid fewer perturbations than its peers: without this, the ranks' parameters
        would differ in the last bits after a recoverable failure.
        """
        for p in _trainable(optimizer):
            buf = p.detach() if p.is_contiguous() else p.detach().contiguous()
            self._collective("parameter resync after a failed step", step, buf, self._broadcast)
            if buf.data_ptr() != p.data_ptr():
                with torch.no_grad():
                    p.copy_(buf)

    # ------------------------------------------------------------------ internals
    def _head(
        self,
        optimizer: Any,
        *,
        check_params: bool,
        scale: float = 0.0,
        max_err: float = 0.0,
    ) -> torch.Tensor:
        config = _halves(_config_digest(optimizer, self.world_size))
        params = _halves(parameter_digest(_trainable(optimizer))) if check_params else (0.0, 0.0)
        values = [0.0, scale, max_err, *config, *params]
        values += [-v for v in values[3:]]
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    def _check_head(self, head: torch.Tensor, step: int | None) -> None:
        h = head.cpu().tolist()
        where = "while building DPAggZO" if step is None else f"at step {step}"
        if h[0] > 0:
            peer = int(h[0]) - 1
            raise PeerFailure(
                f"DPAggZO {where}: group rank {peer} failed in its closure (it raised); no rank "
                "released anything or took the step, every rank now holds rank 0's parameters, "
                "and the process group is still usable",
                step=step,
                peer_rank=peer,
                recoverable=True,
            )
        if h[3:5] != [-v for v in h[7:9]]:
            raise RuntimeError(
                f"DPAggZO {where}: the ranks disagree on the optimizer configuration "
                "(hyper-parameters, direction seed, step count, noise mode, param groups or "
                "trainable tensor shapes/dtypes): every rank must build DPAggZO with the same "
                "arguments and load the same checkpoint"
            )
        if h[5:7] != [-v for v in h[9:11]]:
            raise RuntimeError(
                f"DPAggZO {where}: the parameters are not bit-identical on every rank. Load the "
                "same weights on every rank (seed the initialisation identically, or call "
                "zoprivacy.distributed.broadcast_parameters(params, group) before building the "
                "optimizer); during training, run every rank on the same device type and dtype"
            )

    def _max(self, t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)

    def _sum(self, t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)

    def _broadcast(self, t: torch.Tensor) -> None:
        dist.broadcast(t, group=self.group, group_src=0)

    def _collective(
        self, what: str, step: int | None, t: torch.Tensor, op: Callable[[torch.Tensor], None]
    ) -> None:
        nbytes = t.numel() * t.element_size()
        self.total_bytes += nbytes
        self.total_collectives += 1
        if step is None:
            self.setup_bytes += nbytes
        else:
            self.last_step_bytes += nbytes
            self.last_step_collectives += 1
        try:
            op(t)
        except RuntimeError as exc:  # DistBackendError/DistNetworkError: timeout, closed peer
            where = "while building DPAggZO" if step is None else f"at step {step}"
            raise PeerFailure(
                f"DPAggZO {where}: the {what} failed on group rank {self.rank} of "
                f"{self.world_size}: a peer rank is gone (its process died or its connection "
                "was lost) or did not reach this step within the process group's timeout. "
                "Nothing was released or updated here; the process group is unusable: stop "
                "every rank and restart from the last checkpoint (checkpoints are written "
                f"between steps, so it is intact). Cause: {type(exc).__name__}: {exc}",
                step=step,
                recoverable=False,
            ) from exc


# ---------------------------------------------------------------------- digests
def parameter_digest(params: Iterable[torch.Tensor]) -> bytes:
    """An 8-byte BLAKE2b digest of the tensors' bytes, in order (CUDA tensors hashed piecewise)."""
    h = hashlib.blake2b(digest_size=8)
    for p in params:
        raw = p.detach().reshape(-1).view(torch.uint8)
        for start in range(0, raw.numel(), _CHUNK):
            h.update(raw[start : start + _CHUNK].cpu().numpy())
    return h.digest()


def _config_digest(optimizer: Any, world_size: int) -> bytes:
    groups = [(float(g["lr"]), float(g["weight_decay"])) for g in optimizer.param_groups]
    tensors = [(tuple(p.shape), str(p.dtype)) for p in _trainable(optimizer)]
    items = (
        optimizer.num_directions,
        optimizer.clip_norm,
        optimizer.noise_multiplier,
        optimizer.expected_batch_size,
        optimizer.perturbation_scale,
        optimizer.sample_rate,
        optimizer.seed,
        optimizer.steps_taken,
        optimizer.is_private,
        world_size,
        groups,
        tensors,
        # how a step is computed: every rank must evaluate the same points with the same
        # estimator, or the summed K-vectors would mix different quantities
        getattr(optimizer, "perturbation", None),
        getattr(optimizer, "directions", None),
        getattr(optimizer, "difference", None),
        getattr(optimizer, "_batched", None),
        _describe(getattr(optimizer, "_mask", None)),
        tuple(
            (name, _describe(optimizer._spec[name])) for name in getattr(optimizer, "scheduled", ())
        ),
    )
    return hashlib.blake2b(repr(items).encode(), digest_size=8).digest()


def _describe(obj: Any) -> Any:
    """A rank-independent description of a mask or schedule for the configuration check.

    The library's masks and schedules are described by their whole configuration (a
    :class:`~zoprivacy.FixedMask` by a digest of its bits, computed once); any other
    callable by its qualified name only (its behaviour cannot be compared across processes).
    """
    if obj is None:
        return None
    from zoprivacy.optim.masks import FixedMask, MagnitudeMask, RandomMask
    from zoprivacy.optim.schedules import Stagewise

    kind = type(obj)
    if kind is FixedMask:
        return ("FixedMask", obj.digest)  # hashed once (the masks are fixed)
    if kind in (Stagewise, MagnitudeMask, RandomMask):
        return repr(sorted(obj.state_dict().items()))
    name = getattr(obj, "__qualname__", None) or kind.__qualname__
    return (getattr(obj, "__module__", None) or kind.__module__, name)


def _halves(digest: bytes) -> tuple[float, float]:
    """8 bytes as two floats holding 32-bit integers (exact in float64)."""
    return float(int.from_bytes(digest[:4], "little")), float(int.from_bytes(digest[4:], "little"))


def _trainable(optimizer: Any) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]


def _comm_device(process_group: Any) -> torch.device:
    """CUDA for an NCCL-only group (NCCL needs device tensors), else the CPU (gloo)."""
    backend = str(dist.get_backend(process_group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------- setup helpers
def _group_rank_size(process_group: Any) -> tuple[int, int]:
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
    return _group_rank_size(process_group)[0] == 0


def broadcast_parameters(params: Iterable[torch.Tensor], process_group: Any) -> None:
    """Copy group rank 0's values of ``params`` to every rank (O(d) communication, once).

    For models whose initialisation differs across ranks (e.g. a freshly initialised head):
    call it on every rank before building the optimizer.
    """
    group = process_group.group if isinstance(process_group, DataParallel) else process_group
    with torch.no_grad():
        for p in params:
            buf = p.detach()
            contiguous = buf.is_contiguous()
            if not contiguous:
                buf = buf.contiguous()
            dist.broadcast(buf, group=group, group_src=0)
            if not contiguous:
                p.copy_(buf)


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
    dp._collective("broadcast of the noisy dataset size", None, buf, dp._broadcast)
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
    dp._collective("dataset size check", None, flag, dp._max)
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
    bad = [k for k in _FORBIDDEN_LOADER_KWARGS if k in dataloader_kwargs]
    if bad:
        raise TypeError(
            f"distributed_poisson_loader does not accept {', '.join(bad)}: batches are Poisson "
            "samples (set sample_rate and steps instead)"
        )
    if rank is None or world_size is None:
        group_rank, group_size = _group_rank_size(process_group)
        rank = group_rank if rank is None else rank
        world_size = group_size if world_size is None else world_size
    try:
        num_records = len(dataset)
    except TypeError as exc:
        raise TypeError("dataset must be map-style (support len() and indexing)") from exc
    sampler = DistributedPoissonSampler(
        num_records, sample_rate, rank=rank, world_size=world_size, steps=steps, generator=generator
    )
    return DataLoader(
        _EmptySafeDataset(dataset),
        batch_sampler=sampler,
        collate_fn=_EmptySafeCollate(default_collate if collate_fn is None else collate_fn),
        **dataloader_kwargs,
    )
