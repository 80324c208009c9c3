"""The ``zoprivacy`` command line: privacy accounting now, fine-tuning jobs as they land.

    zoprivacy epsilon   --noise-multiplier S --sample-rate Q --steps T --delta D [--laplace-scale P]
    zoprivacy calibrate --epsilon E --delta D --sample-rate Q --steps T [--size-fraction F]

Each prints a small table (σ, ψ, ε by RDP, ε by PLD, best order) or, with ``--json``, one JSON
object. Bad input gives one line on stderr and exit status 2, never a traceback.

``zoprivacy finetune --threads N`` with N > 1 runs with ``OMP_WAIT_POLICY=PASSIVE`` unless the
variable is set: OpenMP reads it once, when torch loads its runtime, so the command re-executes
itself with the variable set (:func:`ensure_passive_wait`). Otherwise OpenMP's idle threads spin
between parallel regions and hold the cores, which slows the direction generator's threads and
any other process on the machine (``benchmarks/README_speed.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from zoprivacy import checks as check
from zoprivacy.accounting import OrderRangeWarning, calibrate, epsilon_and_order
from zoprivacy.accounting.pld import pld_epsilon

#: Sub-commands registered by other modules: name -> (add_arguments, run).
_EXTRA_COMMANDS: dict[str, tuple[Callable, Callable]] = {}


def pld_epsilon_or_none(**run: Any) -> float | None:
    """ε of ``run`` (:func:`zoprivacy.accounting.pld.pld_epsilon`'s arguments) by the PLD
    accountant, or None when dp-accounting is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pld_epsilon(**run)
    except ImportError:
        return None


#: What a table shows for a value that is None, by key (the JSON output has null).
_NOT_COMPUTED = {
    "laplace_scale": "none (no size release: --laplace-scale not given)",
    "epsilon_pld": "n/a (pip install dp-accounting)",
}


def _fmt(value: object, key: str = "", *, no_pld: bool = False) -> str:
    if value is None:
        if key == "epsilon_pld" and no_pld:
            return "not computed (--no-pld)"
        return _NOT_COMPUTED.get(key, "none")
    if isinstance(value, float):
        return str(value) if math.isinf(value) or math.isnan(value) else f"{value:.6g}"
    return str(value)


def _print_table(rows: list[tuple[str, object]], *, no_pld: bool = False) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {_fmt(value, key, no_pld=no_pld)}")


def _check_flags(args: argparse.Namespace, *names: str) -> None:
    """Check the values of ``names`` with :mod:`zoprivacy.checks`, naming the flag on error."""
    for name in names:
        value = getattr(args, name)
        if value is not None:
            getattr(check, name)(value, "--" + name.replace("_", "-"))


def _cmd_epsilon(args: argparse.Namespace) -> dict:
    _check_flags(args, "noise_multiplier", "sample_rate", "steps", "delta", "laplace_scale")
    run = {
        "noise_multiplier": args.noise_multiplier,
        "laplace_scale": args.laplace_scale,
        "sample_rate": args.sample_rate,
        "steps": args.steps,
        "delta": args.delta,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OrderRangeWarning)
        eps, order = epsilon_and_order(**run)
    pld = None if args.no_pld else pld_epsilon_or_none(**run)
    return {**run, "epsilon_rdp": eps, "epsilon_pld": pld, "best_order": order}


def _cmd_calibrate(args: argparse.Namespace) -> dict:
    _check_flags(args, "epsilon", "delta", "sample_rate", "size_fraction")
    if args.steps < 1:  # with no step there is nothing to calibrate (σ would come out 0)
        raise ValueError(f"--steps must be an int >= 1 (the steps σ is calibrated for), got "
                         f"{args.steps}")  # fmt: skip
    plan = calibrate(
        epsilon=args.epsilon,
        delta=args.delta,
        sample_rate=args.sample_rate,
        steps=args.steps,
        size_fraction=args.size_fraction,
    )
    facts = {
        "target_epsilon": plan.target_epsilon,
        "delta": plan.delta,
        "sample_rate": plan.sample_rate,
        "steps": plan.steps,
        "size_fraction": plan.size_fraction,
        "noise_multiplier": plan.noise_multiplier,
        "laplace_scale": plan.laplace_scale,
    }
    keys = ("noise_multiplier", "sample_rate", "steps", "delta", "laplace_scale")
    pld = None if args.no_pld else pld_epsilon_or_none(**{k: facts[k] for k in keys})
    return {**facts, "epsilon_rdp": plan.epsilon, "epsilon_pld": pld,
            "best_order": plan.best_order}  # fmt: skip


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line on stderr (exit 2), with a pointer to --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="zoprivacy",
        description="Differentially private zeroth-order fine-tuning (DP-AggZO): accounting "
        "and jobs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("epsilon", help="ε of a run: size release + T subsampled-Gaussian steps")
    p.add_argument("--noise-multiplier", type=float, required=True, help="σ")
    p.add_argument("--sample-rate", type=float, required=True, help="Poisson rate q in (0, 1]")
    p.add_argument("--steps", type=int, required=True, help="number of steps T")
    p.add_argument("--delta", type=float, required=True, help="δ in (0, 1)")
    p.add_argument("--laplace-scale", type=float, default=None, help="ψ of the size release")
    p.set_defaults(run=_cmd_epsilon)

    p = sub.add_parser("calibrate", help="σ and ψ for a target (ε, δ)")
    p.add_argument("--epsilon", type=float, required=True, help="target ε > 0")
    p.add_argument("--delta", type=float, required=True, help="δ in (0, 1)")
    p.add_argument("--sample-rate", type=float, required=True, help="Poisson rate q in (0, 1]")
    p.add_argument("--steps", type=int, required=True, help="number of steps T")
    p.add_argument(
        "--size-fraction", type=float, default=0.05, help="share of ε for the size release"
    )
    p.set_defaults(run=_cmd_calibrate)

    for name in ("epsilon", "calibrate"):
        sp = sub.choices[name]
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.add_argument("--no-pld", action="store_true", help="skip the PLD column (faster)")

    for name, (add_arguments, run) in _EXTRA_COMMANDS.items():
        sp = sub.add_parser(name, help=getattr(add_arguments, "__doc__", None))
        add_arguments(sp)
        sp.set_defaults(run=run)
    return parser


def register_command(name: str, add_arguments: Callable, run: Callable) -> None:
    """Register a sub-command (used by optional modules such as the fine-tuning job)."""
    _EXTRA_COMMANDS[name] = (add_arguments, run)


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--delta -1e-5`` as ``--delta=-1e-5``: argparse takes a token such as ``-1e-5`` for an
    option and says "expected one argument"; joined, the value check names the problem."""
    out: list[str] = []
    for token in argv:
        previous = out[-1] if out else ""
        if _is_number(token) and token.startswith("-") and previous.startswith("--"):
            if "=" not in previous:
                out[-1] = f"{previous}={token}"
                continue
        out.append(token)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


#: The value ``zoprivacy finetune --threads N`` (N > 1) gives an unset ``OMP_WAIT_POLICY``.
OMP_WAIT_POLICY = "PASSIVE"
_STATE = {"program": False, "warned": False}  # main() runs as the program; warned once


def requested_threads(argv: Sequence[str]) -> int | None:
    """N of ``finetune ... --threads N`` (or ``--threads=N``) in ``argv`` (the last one, as
    argparse takes it); None for another command, without the flag or with a non-integer value
    (argparse reports that). A cheap scan, run before anything is parsed or loaded."""
    tokens = list(argv)
    if not tokens or tokens[0] != "finetune":
        return None
    value = None
    for i, token in enumerate(tokens):
        if token == "--threads" and i + 1 < len(tokens):
            value = tokens[i + 1]
        elif token.startswith("--threads="):
            value = token.split("=", 1)[1]
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def ensure_passive_wait(threads: int | None) -> None:
    """With more than one thread and ``OMP_WAIT_POLICY`` unset: re-execute the command with
    ``OMP_WAIT_POLICY=PASSIVE`` when :func:`main` runs as the program (``zoprivacy ...`` or
    ``python -m zoprivacy.cli ...``; does not return), else warn once that it cannot be set in
    this process (torch, hence OpenMP, is loaded already) and how to set it."""
    if threads is None or threads <= 1 or "OMP_WAIT_POLICY" in os.environ:
        return
    orig_argv = getattr(sys, "orig_argv", None)
    if _STATE["program"] and os.name == "posix" and orig_argv:
        sys.stdout.flush()
        sys.stderr.flush()
        env = {**os.environ, "OMP_WAIT_POLICY": OMP_WAIT_POLICY}
        os.execve(sys.executable, [sys.executable, *orig_argv[1:]], env)
    if not _STATE["warned"]:
        _STATE["warned"] = True
        warnings.warn(
            f"zoprivacy finetune: {threads} threads with OMP_WAIT_POLICY unset, and it cannot "
            "be set in this process (OpenMP read it when torch loaded): idle OpenMP threads "
            "will spin and hold the cores. Start Python with OMP_WAIT_POLICY=PASSIVE in the "
            "environment (the zoprivacy command sets it itself).",
            UserWarning,
            stacklevel=2,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``, as the program); returns the
    exit status."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    _STATE["program"] = argv is None
    ensure_passive_wait(requested_threads(tokens))
    _load_optional_commands()
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(tokens))
    try:
        result = args.run(args)
    except (ValueError, TypeError, ImportError, RuntimeError) as exc:
        print(f"zoprivacy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(result, int):
        return result
    if getattr(args, "json", False):
        print(json.dumps({k: _json_safe(v) for k, v in result.items()}, indent=2))
    else:
        _print_table(list(result.items()), no_pld=getattr(args, "no_pld", False))
    return 0


def _load_optional_commands() -> None:
    """Import modules that register extra sub-commands; missing optional deps are skipped."""
    import importlib

    for module in ("zoprivacy.finetune",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and not exc.name.startswith("zoprivacy"):
                continue  # an optional dependency is missing; the command is simply absent
            if exc.name == module:
                continue
            raise


if __name__ == "__main__":  # pragma: no cover
    # `python -m zoprivacy.cli`: run the imported module, where zoprivacy.finetune registers its
    # sub-command (this file's __main__ copy would not see it)
    from zoprivacy.cli import main as _main

    sys.exit(_main())
