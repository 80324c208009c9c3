"""The ``zoprivacy`` command line: privacy accounting now, fine-tuning jobs as they land.

    zoprivacy epsilon   --noise-multiplier S --sample-rate Q --steps T --delta D [--laplace-scale P]
    zoprivacy calibrate --epsilon E --delta D --sample-rate Q --steps T [--size-fraction F]

Each prints a small table (σ, ψ, ε by RDP, ε by PLD, best order) or, with ``--json``, one JSON
object. Bad input gives one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Callable, Sequence

from zoprivacy.accounting import OrderRangeWarning, calibrate, epsilon_and_order
from zoprivacy.accounting.pld import pld_epsilon

#: Sub-commands registered by other modules: name -> (add_arguments, run).
_EXTRA_COMMANDS: dict[str, tuple[Callable, Callable]] = {}


def _pld_or_none(skip: bool, **run: object) -> float | None:
    """ε of ``run`` by the PLD accountant, or None when skipped or dp-accounting is missing."""
    if skip:
        return None
    try:
        return pld_epsilon(**run)
    except ImportError:
        return None


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a (pip install dp-accounting)"
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    return f"{value:.6g}"


def _print_table(rows: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        text = _fmt(value) if isinstance(value, float) or value is None else str(value)
        print(f"{key:<{width}}  {text}")


def _cmd_epsilon(args: argparse.Namespace) -> dict:
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
    return {
        **run,
        "epsilon_rdp": eps,
        "epsilon_pld": _pld_or_none(args.no_pld, **run),
        "best_order": order,
    }


def _cmd_calibrate(args: argparse.Namespace) -> dict:
    plan = calibrate(
        epsilon=args.epsilon,
        delta=args.delta,
        sample_rate=args.sample_rate,
        steps=args.steps,
        size_fraction=args.size_fraction,
    )
    pld = _pld_or_none(
        args.no_pld,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        delta=plan.delta,
        laplace_scale=plan.laplace_scale,
    )
    return {
        "target_epsilon": plan.target_epsilon,
        "delta": plan.delta,
        "sample_rate": plan.sample_rate,
        "steps": plan.steps,
        "size_fraction": plan.size_fraction,
        "noise_multiplier": plan.noise_multiplier,
        "laplace_scale": plan.laplace_scale,
        "epsilon_rdp": plan.epsilon,
        "epsilon_pld": pld,
        "best_order": plan.best_order,
    }


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


def main(argv: Sequence[str] | None = None) -> int:
    _load_optional_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
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
        _print_table(list(result.items()))
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
    sys.exit(main())
