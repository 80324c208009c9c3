"""``zoprivacy finetune --threads N`` (N > 1) runs with OMP_WAIT_POLICY=PASSIVE (issue 16).

OpenMP reads the variable when torch loads its runtime, so the command re-executes itself with
it set. The subprocess tests run the real ``main`` as the program through a probe module that
prints the variable as the process starts, before anything is imported: a re-executed command
prints twice (unset, then PASSIVE), and ``-m`` survives the re-execution.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from zoprivacy import cli

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import os, sys
print("OMP_WAIT_POLICY=" + os.environ.get("OMP_WAIT_POLICY", "<unset>"), flush=True)
from zoprivacy.cli import main
sys.exit(main())
"""


def _run_probe(tmp_path, *argv, policy=None):
    (tmp_path / "omp_probe.py").write_text(textwrap.dedent(PROBE))
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    done = subprocess.run(
        [sys.executable, "-m", "omp_probe", *argv], env=env, capture_output=True, text=True,
        timeout=120, cwd=tmp_path,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("OMP_WAIT_POLICY=")]
    return done, lines


def test_finetune_with_threads_reexecutes_with_passive_wait(tmp_path):
    done, lines = _run_probe(tmp_path, "finetune", "--threads", "2", "--help")
    assert done.returncode == 0, done.stderr
    assert lines == ["OMP_WAIT_POLICY=<unset>", "OMP_WAIT_POLICY=PASSIVE"]
    assert done.stdout.count("usage:") == 1 and "--threads" in done.stdout
    assert "OMP_WAIT_POLICY" not in done.stderr  # no warning: the variable took effect


@pytest.mark.parametrize(
    ("argv", "policy", "expected"),
    [
        (("finetune", "--threads=1", "--help"), None, "<unset>"),  # one thread: nothing to do
        (("finetune", "--threads", "2", "--help"), "ACTIVE", "ACTIVE"),  # the user's value wins
    ],
)
def test_no_reexecution_when_not_needed(tmp_path, argv, policy, expected):
    done, lines = _run_probe(tmp_path, *argv, policy=policy)
    assert done.returncode == 0, done.stderr
    assert lines == [f"OMP_WAIT_POLICY={expected}"]


def test_in_process_call_warns_once_and_keeps_the_process(monkeypatch):
    """main(argv) called from Python cannot replace the caller's process: it warns, once."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setitem(cli._STATE, "warned", False)

    def no_exec(*_args):
        raise AssertionError("main(argv) must not re-execute the caller's process")

    monkeypatch.setattr(os, "execve", no_exec)
    with pytest.warns(UserWarning, match="OMP_WAIT_POLICY=PASSIVE"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["finetune", "--threads", "3", "--help"])
    assert exit_info.value.code == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.ensure_passive_wait(4)  # already warned: silent
    assert not caught


@pytest.mark.parametrize(
    ("argv", "threads"),
    [
        (["finetune", "--threads", "4"], 4),
        (["finetune", "--threads=3", "--steps", "2"], 3),
        (["finetune", "--threads", "2", "--threads", "1"], 1),
        (["finetune", "--threads", "two"], None),
        (["finetune", "--threads"], None),
        (["epsilon", "--threads", "2"], None),
        ([], None),
    ],
)
def test_requested_threads(argv, threads):
    assert cli.requested_threads(argv) == threads
