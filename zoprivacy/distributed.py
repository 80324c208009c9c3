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

Sampling and the size release (:mod:`zoprivacy.data.distributed`, re-exported here):
:class:`DistributedPoissonSampler` gives each rank its share of one Poisson sample of rate q of
the whole data set, and :func:`release_size_distributed` releases ñ once, on rank 0.

Interface: the collectives take values, never the optimizer: the optimizer's public
configuration fingerprint (:meth:`zoprivacy.DPAggZO.config_fingerprint`), the list of trainable
tensors, and this rank's clipped rows (:class:`zoprivacy.optim.algorithm.Clipped`).

Failures: a rank whose closure raises makes every rank raise in the same step (the others with
:class:`PeerFailure`, ``recoverable=True``; the process group is still usable). A rank that dies
makes the others raise :class:`PeerFailure` (``recoverable=False``) as soon as gloo/NCCL notices
the closed connection, or at the latest after the process group's timeout
(``init_process_group(..., timeout=timedelta(seconds=...))``). In both cases no rank updates its
parameters or advances its step counter, and a checkpoint written before the step is untouched.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from zoprivacy.data.distributed import (
    DistributedPoissonSampler,
    distributed_poisson_loader,
    is_root,
    release_size_distributed,
)
from zoprivacy.optim.directions import draw_public_seed

if TYPE_CHECKING:
    from zoprivacy.optim.algorithm import Clipped

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

    def verify(self, fingerprint: bytes, params: Sequence[torch.Tensor]) -> None:
        """Check that every rank has the same configuration and bit-identical parameters.

        ``fingerprint``: the optimizer's :meth:`~zoprivacy.DPAggZO.config_fingerprint`;
        ``params``: its trainable tensors. A collective: every rank of the group must call it.
        Raises ``RuntimeError`` on every rank on a mismatch.
        """
        head = self._head(fingerprint, params, check_params=True)
        self._collective("parameter check", None, head, self._max)
        self._check_head(head, None)

    # ------------------------------------------------------------------ the step
    def reduce(
        self,
        step: int,
        agg: torch.Tensor,
        clipped: Clipped,
        loss_sum: float,
        *,
        fingerprint: bytes,
        params: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, int, float, float, float, float]:
        """C1 and C2: sum this rank's clipped records with every other rank's.

        Args: this rank's Δ_agg ([|B_r|, K], float64) and its :func:`~zoprivacy.optim.algorithm.
        clip_rows` result, its loss sum, the step's configuration fingerprint and the trainable
        tensors (hashed when a parameter check is due). Returns the global (Σ Δ̂_agg [K] float64
        CPU, |B|, loss sum, clip fraction, max clip error (eq. 26), batch clip error (eq. 27)).
        """
        from zoprivacy.optim.algorithm import batch_clip_error, scaled_sums

        self.last_step_bytes = 0
        self.last_step_collectives = 0
        batch, k = agg.shape
        due = self.check_every > 0 and step > 0 and step % self.check_every == 0
        head = self._head(
            fingerprint,
            params,
            check_params=due,
            scale=float(agg.abs().max()) if batch else 0.0,
            max_err=clipped.max_clip_error,
        )
        self._collective("all-reduce (max) of the step header", step, head, self._max)
        if float(head[0]) > 0:  # a peer's closure raised: take rank 0's parameters, then raise
            self._resync(step, params)
        self._check_head(head, step)
        scale, global_max_err = float(head[1]), float(head[2])

        body = torch.zeros(3 + 3 * k, dtype=torch.float64)
        body[0] = float(batch)
        body[1] = float(round(clipped.clip_fraction * batch))
        body[2] = loss_sum
        if batch:
            body[3 : 3 + k] = clipped.clipped.sum(dim=0)
            if scale > 0.0:  # eq. 27's sums at the common scale of every rank
                body[3 + k : 3 + 2 * k], body[3 + 2 * k :] = scaled_sums(
                    agg, clipped.clipped, scale
                )
        body = body.to(self.device)
        self._collective("all-reduce (sum) of the clipped K-sums", step, body, self._sum)
        body = body.cpu()

        total = round(float(body[0]))
        clip_fraction = float(body[1]) / total if total else 0.0
        batch_err = batch_clip_error(body[3 + k : 3 + 2 * k], body[3 + 2 * k :])
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

    def abort(self, step: int, params: Sequence[torch.Tensor]) -> None:
        """Tell the peers that this rank's step failed (instead of C1); never raises.

        Called by the optimizer when the closure raises, so that the other ranks raise
        :class:`PeerFailure` in the same step rather than waiting for the timeout. Then every
        rank takes rank 0's parameters (see :meth:`_resync`).
        """
        head = torch.zeros(_HEAD, dtype=torch.float64, device=self.device)
        head[0] = float(self.rank + 1)
        try:
            self._collective("abort", step, head, self._max)
            self._resync(step, params)
        except PeerFailure:
            pass

    def _resync(self, step: int, params: Sequence[torch.Tensor]) -> None:
        """Broadcast rank 0's parameters after a step that failed on some rank (O(d), rare).

        Undoing a perturbation by arithmetic is exact only up to rounding, and a rank whose
        closure raised undid fewer perturbations than its peers: without this, the ranks' parameters
        would differ in the last bits after a recoverable failure.
        """
        for p in params:
            buf = p.detach() if p.is_contiguous() else p.detach().contiguous()
            self._collective("parameter resync after a failed step", step, buf, self._broadcast)
            if buf.data_ptr() != p.data_ptr():
                with torch.no_grad():
                    p.copy_(buf)

    def broadcast(self, what: str, t: torch.Tensor) -> None:
        """A setup broadcast from group rank 0 (counted in :attr:`setup_bytes`)."""
        self._collective(what, None, t, self._broadcast)

    def all_max(self, what: str, t: torch.Tensor) -> None:
        """A setup all-reduce (MAX) (counted in :attr:`setup_bytes`)."""
        self._collective(what, None, t, self._max)

    # ------------------------------------------------------------------ internals
    def _head(
        self,
        fingerprint: bytes,
        params: Sequence[torch.Tensor],
        *,
        check_params: bool,
        scale: float = 0.0,
        max_err: float = 0.0,
    ) -> torch.Tensor:
        world = self.world_size.to_bytes(4, "little")
        config = _halves(hashlib.blake2b(fingerprint + world, digest_size=8).digest())
        digest = _halves(parameter_digest(params)) if check_params else (0.0, 0.0)
        values = [0.0, scale, max_err, *config, *digest]
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


def _halves(digest: bytes) -> tuple[float, float]:
    """8 bytes as two floats holding 32-bit integers (exact in float64)."""
    return float(int.from_bytes(digest[:4], "little")), float(int.from_bytes(digest[4:], "little"))


def _comm_device(process_group: Any) -> torch.device:
    """CUDA for an NCCL-only group (NCCL needs device tensors), else the CPU (gloo)."""
    backend = str(dist.get_backend(process_group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------- setup helpers
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
