"""Checkpoints of a private run and the write-ahead journal each one records.

A checkpoint (:meth:`zoprivacy.PrivateTraining.save`) is a snapshot; the run keeps stepping after
it. Steps that run between the last checkpoint and a crash touched the data and released their
S_t (Algorithm 1, line 15), so a resume must charge them and must not release them again. The
:mod:`~zoprivacy.run.journal` does that, and this module decides which journal a run keeps and
which one a resume replays, so that **no resume path can under-count**:

* every checkpoint records its journal: ``{"path", "run", "records"}`` (the absolute path, the
  run id and the record count at the snapshot), or ``{"unjournaled": reason}`` for a run that
  keeps none (``journal=False``, or data parallel), or nothing (``None``: a :meth:`state_dict`
  taken before the first :meth:`save`, or a checkpoint of an older zoprivacy);
* a resume opens and replays the recorded journal. A checkpoint without one, or whose journal is
  missing, is refused (:data:`RISK` says why) unless the caller passes ``journal=False``, which
  resumes anyway with an :class:`UnjournaledResumeWarning`. ``journal=False`` is refused too when
  the checkpoint's journal is there and records steps after the snapshot (they would be released
  a second time).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from zoprivacy.run.journal import (
    JournalError,
    StepJournal,
    open_checkpoint_journal,
    params_digest,
    plan_recovery,
)

__all__ = [
    "FORMAT",
    "RISK",
    "UnjournaledResumeWarning",
    "atomic_save",
    "atomic_write",
    "checkpoint_journal",
    "default_journal_path",
    "journal_record",
    "load_checkpoint",
    "resume_journal",
    "start_journal",
]

FORMAT = "zoprivacy.PrivateTraining/1"

RISK = (
    "steps that ran after this checkpoint and before the run stopped would not be charged to the "
    "accountant, and would be released a second time with fresh noise (ε under-counted)"
)

OPT_OUT = "journal=False"
DATA_PARALLEL = "process_group"


class UnjournaledResumeWarning(UserWarning):
    """A run was resumed with ``journal=False``: steps after the checkpoint may go uncharged."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write a file so that a crash leaves either the old file or the new one, never a torn one.

    ``write(tmp)`` fills a temporary file in the same folder, which is fsynced and then renamed
    over ``path`` (``os.replace`` is atomic on POSIX and Windows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` into an open file, through :func:`atomic_write`."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    return atomic_write(path, write)


def load_checkpoint(checkpoint: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """A :meth:`~zoprivacy.PrivateTraining.save` file (or its state dict), format checked."""
    state = checkpoint
    if not isinstance(state, dict):
        state = torch.load(Path(checkpoint), map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint is not a zoprivacy PrivateTraining checkpoint: {checkpoint}")
    return state


def default_journal_path(checkpoint_path: str | os.PathLike) -> Path:
    """``<checkpoint path>.journal``, absolute: where ``journal=None`` keeps the journal."""
    return Path(os.path.abspath(checkpoint_path)).with_name(Path(checkpoint_path).name + ".journal")


def journal_record(journal: StepJournal | None, unjournaled: str | None) -> dict[str, Any] | None:
    """What a checkpoint records about its journal (module docstring)."""
    if journal is not None:
        path = os.path.abspath(journal.path)
        return {"path": path, "run": journal.run_id, "records": journal.records}
    return None if unjournaled is None else {"unjournaled": unjournaled}


def resume_journal(
    info: dict[str, Any] | None,
    journal: str | os.PathLike | bool | None,
    *,
    step: int,
    process_group: Any = None,
) -> StepJournal | None:
    """The journal a resume from a checkpoint (recording ``info``, taken after ``step`` steps)
    replays and continues, or None for ``journal=False``. ``journal``: None (the recorded one),
    a path (the recorded journal, moved there) or False (resume without one, warned).

    Raises :class:`JournalError` (before anything changes) for a checkpoint without a journal,
    a missing journal, another run's journal, or records that do not continue the checkpoint.
    """
    if journal is False:
        _refuse_skipping(info, step)
        warnings.warn(
            f"resuming with journal=False: {RISK}. The resumed run keeps no journal either.",
            UnjournaledResumeWarning,
            stacklevel=4,
        )
        return None
    if info is None or "unjournaled" in info:
        raise JournalError(_unjournaled_message(info, process_group))
    path = journal if journal is not None else info.get("path")
    if path is None:
        raise JournalError(
            "this checkpoint does not record where its journal is (an older zoprivacy wrote "
            "it): pass journal=<its path>, or journal=False to resume without it, accepting "
            f"that {RISK}"
        )
    if not Path(path).exists():
        raise JournalError(
            f"the checkpoint's journal {path} is missing, so resuming is refused: {RISK}. "
            "Restore the file, pass journal=<its new path> if it moved, or journal=False to "
            "resume anyway, accepting that risk"
        )
    log = open_checkpoint_journal(info, path)
    plan_recovery(log, int(info["records"]), step)  # a bad tail is refused before any change
    return log


def _unjournaled_message(info: dict[str, Any] | None, process_group: Any) -> str:
    reason = None if info is None else info.get("unjournaled")
    if process_group is not None or reason == DATA_PARALLEL:
        why = "data-parallel runs keep no journal, so this checkpoint has none"
    elif reason == OPT_OUT:
        why = "this checkpoint was taken by a run that opted out of its journal (journal=False)"
    else:
        why = (
            "this checkpoint records no journal (a state_dict() taken before the run's first "
            "save(), or a checkpoint of an older zoprivacy)"
        )
    return (
        f"{why}, so resuming from it is refused: {RISK}. Pass journal=False to resume anyway, "
        "accepting that risk"
    )


def _refuse_skipping(info: dict[str, Any] | None, step: int) -> None:
    """``journal=False`` must not skip records that exist: they would be released again."""
    path = None if info is None else info.get("path")
    if path is None or not Path(path).exists():
        return
    log = open_checkpoint_journal(info, path)
    begun = sum(
        1 for action, _ in plan_recovery(log, int(info["records"]), step) if action == "charge"
    )
    if begun:
        raise JournalError(
            f"journal {path} records {begun} step(s) begun after this checkpoint: with "
            "journal=False they would be released a second time and not charged. Resume with "
            "the default journal=None to replay them"
        )


def start_journal(
    path: str | os.PathLike, params: Iterable[torch.Tensor], *, resume: bool
) -> tuple[StepJournal, bool]:
    """The journal of a run started with ``journal=PATH`` (no checkpoint): a new one, or, with
    ``resume=True``, the run recorded there (it died before its first checkpoint). Returns the
    journal and whether it was reopened."""
    digest = params_digest(params)
    log = _existing_run(path)
    if log is None:
        return StepJournal.create(path, digest=digest, origin="start"), False
    if not resume:
        raise JournalError(
            f"journal {path} already holds a run (run id {log.run_id}): pass resume=True to "
            "continue that run, or use a new journal path to start a new one"
        )
    if log.origin != "start":
        raise JournalError(
            f"journal {path} was started at a checkpoint: resume with checkpoint=<that "
            "checkpoint>, or use a new journal path for a new run"
        )
    if log.digest != digest:
        raise JournalError(
            f"journal {path} belongs to a run that started from other parameters: pass that "
            "run's checkpoint=, or use a new journal path for a new run"
        )
    return log, True


def checkpoint_journal(path: str | os.PathLike, params: Iterable[torch.Tensor]) -> StepJournal:
    """The journal a run with ``journal=None`` starts at its first checkpoint (at
    :func:`default_journal_path`); refused if ``path`` already holds another run's records."""
    if _existing_run(path) is not None:
        raise JournalError(
            f"{path} already holds the journal of another run, which checkpoints of that run "
            "need to resume: save this run's checkpoint under another path (or delete that "
            "journal if its run is abandoned)"
        )
    return StepJournal.create(path, digest=params_digest(params), origin="checkpoint")


def _existing_run(path: str | os.PathLike) -> StepJournal | None:
    """The run journaled at ``path``, or None. A file with only a header (its run never got
    further, e.g. it died while starting) is removed."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None
    log = StepJournal.open(path)
    if log.records > 1:
        return log
    path.unlink()
    return None
