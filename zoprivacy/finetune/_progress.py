"""What ``zoprivacy finetune`` prints while it runs: a line per phase and the step progress.

On a terminal the steps show as a tqdm bar. When stderr is not a terminal (``scripts/main.sh``,
a log file, CI), tqdm would stay silent, so :class:`Progress` prints a plain line instead every
:data:`LINE_EVERY_SECONDS` seconds and at the last step: the step and the public values of the
bar (ε spent; the private loss and clip fraction only with ``--show-private-diagnostics``).
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["LINE_EVERY_SECONDS", "Progress", "say"]

#: Seconds between two progress lines when stderr is not a terminal.
LINE_EVERY_SECONDS = 10.0


def say(message: str) -> None:
    """One line on stderr, flushed (phases and progress; stdout holds the summary)."""
    print(message, file=sys.stderr, flush=True)


def _is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """The step progress: a tqdm bar on a terminal, else periodic lines (see the module)."""

    def __init__(self, total: int, done: int, label: str, *, enabled: bool = True) -> None:
        self.total, self.done, self.label = total, done, label
        self.lines = enabled and not _is_terminal()
        self._last = time.monotonic()
        self._bar: Any = None
        if enabled and not self.lines:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=done, desc=label, unit="step", file=sys.stderr,
                dynamic_ncols=True,
            )  # fmt: skip
        elif self.lines:
            say(f"training: {label}, steps {done + 1}-{total}")

    def update(self, values: dict[str, str]) -> None:
        """One step done; ``values``: the public (and asked-for) values to show."""
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)
            self._bar.update(1)
            return
        now = time.monotonic()
        if self.lines and (now - self._last >= LINE_EVERY_SECONDS or self.done == self.total):
            self._last = now
            shown = "".join(f", {k} {v}" for k, v in values.items())
            say(f"{self.label}: step {self.done}/{self.total}{shown}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
