"""Write-ahead journal of a private run: no step is released twice, no charge is lost.

A checkpoint is a snapshot; between two snapshots a run keeps stepping. If it dies there, the
steps after the last checkpoint *ran*: each touched the data and (if it got that far) released
its noisy K-vector S_t (Algorithm 1, line 15). Resuming from the checkpoint alone would run
those steps again on fresh batches and fresh noise, a second release of the same step that the
restored accountant never saw. The journal closes that gap. It is an append-only file of JSON
lines, each written with ``fsync`` before the run goes on:

* ``header``: a run id, a digest of the trainable parameters the journal starts from, and its
  ``origin``: ``"start"`` (kept from step 0, ``make_private(journal=PATH)``) or ``"checkpoint"``
  (started by a run's first checkpoint, :mod:`~zoprivacy.run.checkpoint`);
* ``size``: the noisy dataset size ñ and its Laplace scale ψ, right after the one release (so a
  run that dies before its first checkpoint reuses ñ instead of drawing it again);
* ``begin`` (step t, σ_t, q): after the accountant is charged and *before* the closure runs,
  i.e. before any data of step t is touched;
* ``release`` (step t, S_t, the group learning rates and weight decays, the seeded noise state):
  after S_t is computed and *before* the update is applied.

On resume (:func:`recover`) the records after the checkpoint's position are replayed:

* a ``begin`` followed by its ``release``: the step is **replayed**, its update recomputed from the
  recorded S_t and the public direction seeds. That is post-processing of a release already
  made (no data is read, no noise drawn), so the run continues exactly where it was, bit for bit,
  and the accountant is charged once for the step, as the dead process had been;
* a ``begin`` with no ``release`` after it: the step was **abandoned** mid-way (killed, or an
  exception in the closure). Its S_t was never written and its update never applied, but the
  step did read the data and how it failed may depend on it (an out-of-memory kill on a large
  batch), so it is charged as a spent step. The next attempt at step t is a new release and is
  charged again. This is conservative: it can only overstate ε.

A torn last line (the process died inside ``write``) was never acknowledged by ``fsync``: the
run had not gone past it, so it is dropped and the file truncated to its last complete record.

Nothing secret is written: S_t is the mechanism's output, the direction seeds are public, and the
noise state is recorded only for seeded (test) noise, whose seed is already in the checkpoint.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "JournalError",
    "Recovery",
    "StepJournal",
    "charge_unreplayable",
    "journal_for_resume",
    "open_checkpoint_journal",
    "params_digest",
    "plan_recovery",
    "recover",
]

_FORMAT = "zoprivacy.run.journal/1"


class JournalError(RuntimeError):
    """The journal does not belong to this run, is corrupt, or is missing records."""


def params_digest(params: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the trainable tensors' shapes, dtypes and bytes (identifies the initial model)."""
    h = hashlib.sha256()
    for p in params:
        t = p.detach().to("cpu").contiguous()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().to("cpu").contiguous()
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "data": base64.b64encode(t.view(torch.uint8).numpy().tobytes()).decode("ascii"),
    }


def _decode_tensor(obj: dict[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, obj["dtype"])
    raw = bytearray(base64.b64decode(obj["data"]))
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(obj["shape"]).clone()


def _encode_noise(state: dict[str, Any] | None) -> dict[str, Any] | None:
    if state is None or state.get("mode") != "seeded":
        return None
    return {"mode": "seeded", "seed": state["seed"], "state": _encode_tensor(state["state"])}


def _decode_noise(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    if obj is None:
        return None
    return {"mode": "seeded", "seed": obj["seed"], "state": _decode_tensor(obj["state"])}


class StepJournal:
    """An append-only, fsync'ed journal file (see the module docstring for the records).

    Open it with :meth:`create` for a new run or :meth:`open` to continue one; both leave the
    file positioned for appending. :attr:`records` is the number of complete records in the
    file: a checkpoint stores it, and :func:`recover` replays what came after.

    Only one process may write a journal (data-parallel runs are not supported yet).
    """

    def __init__(self, path: Path, records: list[dict[str, Any]]) -> None:
        self.path = path
        self._records = records

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | os.PathLike, *, digest: str, origin: str = "start") -> StepJournal:
        """Start a new journal at ``path`` (which must not hold one already), from parameters
        with ``digest``, at the run's ``origin`` (``"start"`` or ``"checkpoint"``)."""
        path = Path(path)
        if path.exists() and path.stat().st_size > 0:
            raise JournalError(
                f"journal {path} already holds records of a run: resume that run (pass its "
                "checkpoint, or the same journal with the same initial model), or choose a new "
                "journal path"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        journal = cls(path, [])
        if origin not in ("start", "checkpoint"):
            raise ValueError(f"origin must be 'start' or 'checkpoint', got {origin!r}")
        journal._append(
            {
                "type": "header",
                "format": _FORMAT,
                "run": uuid.uuid4().hex,
                "digest": digest,
                "origin": origin,
            }
        )
        _fsync_dir(path.parent)
        return journal

    @classmethod
    def open(cls, path: str | os.PathLike) -> StepJournal:
        """Open an existing journal, dropping a torn last line (never acknowledged)."""
        path = Path(path)
        if not path.exists():
            raise JournalError(f"journal {path} not found")
        raw = path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):  # torn tail: the write was never fsync'ed, the run never went on
            with open(path, "r+b") as fh:
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
        records = []
        for number, line in enumerate(raw[:end].splitlines(), start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise JournalError(f"journal {path}: record {number} is corrupt ({exc})") from None
        if not records or records[0].get("type") != "header" or records[0].get("format") != _FORMAT:
            raise JournalError(f"{path} is not a zoprivacy journal (no header record)")
        return cls(path, records)

    # ------------------------------------------------------------------ reading
    @property
    def records(self) -> int:
        """Number of complete records (the header included)."""
        return len(self._records)

    @property
    def run_id(self) -> str:
        return str(self._records[0]["run"])

    @property
    def digest(self) -> str:
        """Digest of the initial trainable parameters (:func:`params_digest`)."""
        return str(self._records[0]["digest"])

    @property
    def origin(self) -> str:
        """``"start"`` (kept from step 0) or ``"checkpoint"`` (started at a checkpoint)."""
        return str(self._records[0].get("origin", "start"))

    def entries(self, start: int = 0) -> list[dict[str, Any]]:
        """Copies of the records from index ``start`` on."""
        return [dict(r) for r in self._records[start:]]

    def size_release(self) -> tuple[float, float] | None:
        """(ñ, ψ) of the recorded size release, or None."""
        for r in self._records:
            if r["type"] == "size":
                return float(r["noisy_size"]), float(r["laplace_scale"])
        return None

    # ------------------------------------------------------------------ writing
    def _append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        with open(self.path, "ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self._records.append(record)

    def size(self, noisy_size: float, laplace_scale: float) -> None:
        """Record the one release of ñ (call right after it, before anything else)."""
        if self.size_release() is not None:
            raise JournalError("the journal already records a size release; reuse that ñ")
        self._append({"type": "size", "noisy_size": noisy_size, "laplace_scale": laplace_scale})

    def begin(self, step: int, *, noise_multiplier: float, sample_rate: float) -> None:
        """Write-ahead record of step ``step``: call after charging, before touching data."""
        self._append(
            {
                "type": "begin",
                "step": int(step),
                "noise_multiplier": float(noise_multiplier),
                "sample_rate": float(sample_rate),
            }
        )

    def release(
        self,
        step: int,
        noisy_sum: torch.Tensor,
        *,
        lrs: Sequence[float],
        weight_decays: Sequence[float],
        noise_state: dict[str, Any] | None,
    ) -> None:
        """Record step ``step``'s released S_t: call before applying the update."""
        self._append(
            {
                "type": "release",
                "step": int(step),
                "noisy_sum": _encode_tensor(noisy_sum),
                "lrs": [float(x) for x in lrs],
                "weight_decays": [float(x) for x in weight_decays],
                "noise": _encode_noise(noise_state),
            }
        )


@dataclasses.dataclass(frozen=True)
class Recovery:
    """What :func:`recover` did: steps replayed from their recorded release, and steps
    abandoned mid-way (charged, never applied)."""

    replayed: int
    abandoned: int
    abandoned_steps: tuple[int, ...]


def journal_for_resume(
    info: dict[str, Any] | None, path: str | os.PathLike | None, params: Iterable[torch.Tensor]
) -> StepJournal | None:
    """The journal of a resumed run, from the checkpoint's ``info`` (``{"run", "records"}`` or
    None) and the journal ``path`` given now: the checkpoint's journal (which must be given back,
    belong to the same run and reach the checkpoint's position), or, for a checkpoint taken
    without one, a new journal started from the checkpoint's ``params``."""
    if info is None:
        if path is None:
            return None
        return StepJournal.create(path, digest=params_digest(params), origin="checkpoint")
    if path is None:
        raise JournalError(
            "this run kept a write-ahead journal: pass journal=<its path> to resume it (without "
            "it, the steps that ran after this checkpoint would be released a second time)"
        )
    return open_checkpoint_journal(info, path)


def open_checkpoint_journal(info: dict[str, Any], path: str | os.PathLike) -> StepJournal:
    """Open the journal at ``path`` of a checkpoint that recorded ``info`` (``{"run",
    "records"}``): it must belong to the same run and reach the checkpoint's position."""
    log = StepJournal.open(path)
    if log.run_id != info["run"]:
        raise JournalError(
            f"journal {path} belongs to another run (run id {log.run_id}, the checkpoint's is "
            f"{info['run']}): pass this run's journal"
        )
    if log.records < int(info["records"]):
        raise JournalError(
            f"journal {path} has {log.records} records but the checkpoint was taken at record "
            f"{info['records']}: the journal was truncated or replaced; restore it"
        )
    return log


def _check_position(journal: StepJournal, start: int) -> None:
    if not 0 < start <= journal.records:
        raise JournalError(
            f"the checkpoint is at journal position {start}, but the journal has "
            f"{journal.records} records: this is not the journal of that checkpoint (or it was "
            "truncated); restore the right journal file"
        )


def plan_recovery(
    journal: StepJournal, start: int, first_step: int
) -> list[tuple[str, dict[str, Any]]]:
    """Check the records after position ``start`` and list what :func:`recover` will do:
    ``("charge", begin)`` and ``("replay", release)`` in order. Nothing is changed, so a caller
    can refuse a bad journal before it touches the model. ``first_step`` is the checkpoint's
    step count; every ``begin`` must be for the step the run is at."""
    _check_position(journal, start)
    actions: list[tuple[str, dict[str, Any]]] = []
    step = first_step
    pending: dict[str, Any] | None = None
    for rec in journal.entries(start):
        kind = rec.get("type")
        if kind == "size":
            raise JournalError("the journal records a size release after the checkpoint")
        if kind == "begin":
            if int(rec["step"]) != step:
                raise JournalError(
                    f"journal step {rec['step']} does not follow the checkpoint's {step} steps: "
                    "the checkpoint and journal disagree"
                )
            sigma = float(rec["noise_multiplier"])
            if not (sigma > 0 and math.isfinite(sigma)):
                raise JournalError(f"journal record {rec} has an invalid noise multiplier")
            actions.append(("charge", rec))
            pending = rec
        elif kind == "release":
            if pending is None or int(rec["step"]) != int(pending["step"]):
                raise JournalError(f"journal release of step {rec['step']} without its begin")
            actions.append(("replay", rec))
            pending = None
            step += 1
        else:
            raise JournalError(f"unknown journal record {kind!r}")
    return actions


def recover(optimizer: Any, journal: StepJournal, start: int) -> Recovery:
    """Bring ``optimizer`` (restored from a checkpoint taken at journal position ``start``) and
    its accountant up to date with the journal's later records (module docstring).

    Each ``begin`` charges the optimizer's accountant once (σ_t, q as recorded), as the process
    that wrote it had been charged; a completed step is then replayed with
    ``optimizer.replay_release``. A ``begin`` not followed by its ``release`` is an abandoned
    step: charged, never applied. Raises :class:`JournalError` (before changing anything) if the
    records do not continue the optimizer's step count.
    """
    actions = plan_recovery(journal, start, optimizer.steps_taken)
    accountant = optimizer.accountant
    replayed = 0
    for action, rec in actions:
        if action == "charge":
            if accountant is not None:
                _force_step(accountant, rec)
        else:
            optimizer.replay_release(
                _decode_tensor(rec["noisy_sum"]),
                lrs=rec["lrs"],
                weight_decays=rec["weight_decays"],
                noise_state=_decode_noise(rec["noise"]),
            )
            replayed += 1
    # a begin is abandoned unless its release comes right after it
    abandoned = [
        int(rec["step"])
        for i, (action, rec) in enumerate(actions)
        if action == "charge" and (i + 1 == len(actions) or actions[i + 1][0] != "replay")
    ]
    return Recovery(replayed, len(abandoned), tuple(abandoned))


def _force_step(accountant: Any, rec: dict[str, Any]) -> None:
    """Charge a recorded step whatever the budget says: it was charged (and fitted) when it ran,
    and the data was read, so the charge must be recorded."""
    budget, accountant.budget = accountant.budget, None
    try:
        accountant.step(
            noise_multiplier=float(rec["noise_multiplier"]), sample_rate=float(rec["sample_rate"])
        )
    finally:
        accountant.budget = budget


def charge_unreplayable(accountant: Any, journal: StepJournal, start: int) -> Recovery:
    """For optimizers whose release cannot be recorded compactly (DP-AdamW releases a noisy
    d-dimensional gradient, not K numbers): the journal holds only ``begin`` records, and every
    step begun after the checkpoint at position ``start`` is charged to ``accountant`` as
    abandoned (its update is lost with the process; running it again is a new release)."""
    _check_position(journal, start)
    steps = []
    for rec in journal.entries(start):
        if rec.get("type") != "begin":
            raise JournalError(
                f"unexpected journal record {rec.get('type')!r} after the checkpoint"
            )
        _force_step(accountant, rec)
        steps.append(int(rec["step"]))
    return Recovery(0, len(steps), tuple(steps))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
