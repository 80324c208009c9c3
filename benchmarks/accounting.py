"""Calibration speed and tightness: zoprivacy vs Opacus and dp-accounting on the paper's runs.

For each artifact run (ε, q, T) at δ = 1e-5 this times finding the noise multiplier for the
Gaussian steps alone (no size release, so every library answers the same question):

- zoprivacy ``get_noise_multiplier`` (RDP, precision 1e-6 relative);
- Opacus ``get_noise_multiplier`` with ``accountant="rdp"`` at its default tolerance (0.01 in ε)
  and at a tolerance matched to ours (1e-6·ε), and with ``accountant="prv"``;
- dp-accounting's ``calibrate_dp_mechanism`` with its ``RdpAccountant``.

Each σ is then re-evaluated with zoprivacy's RDP accountant on an extended order list, so
tightness is compared on one ruler (smaller σ at ε <= target is tighter). It also records the
full DP-AggZO calibration (5% of ε to the size release) next to the artifact's split.

Run: ``python -m benchmarks.accounting`` → ``benchmarks/results/accounting.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

from benchmarks._common import RESULTS, machine, write_json
from zoprivacy.accounting import calibrate, epsilon_and_order, get_noise_multiplier
from zoprivacy.accounting.orders import DEFAULT_ORDERS, extended_orders

RUNS = [
    (2.0, 0.0208, 500),
    (2.0, 0.0416, 1000),
    (2.0, 0.0416, 5000),
    (0.5, 0.0416, 500),
    (0.5, 0.0416, 1000),
    (6.0, 0.0416, 1000),
]
DELTA = 1e-5


def _timed(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
    times, value = [], float("nan")
    for _ in range(repeats):
        _clear_caches()
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return value, statistics.median(times)


def _clear_caches() -> None:
    """zoprivacy caches σ-free weights within a calibration; start every timing cold."""
    from zoprivacy.accounting import rdp

    rdp._integer_weights.cache_clear()
    rdp._fractional_weights.cache_clear()


def _methods(eps: float, q: float, steps: int) -> dict[str, Callable[[], float]]:
    from opacus.accountants.utils import get_noise_multiplier as opacus_sigma

    def opacus(accountant: str, tol: float) -> Callable[[], float]:
        def run() -> float:
            return opacus_sigma(
                target_epsilon=eps,
                target_delta=DELTA,
                sample_rate=q,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=tol,
            )

        return run

    def dp_accounting() -> float:
        import dp_accounting as dpa
        from dp_accounting import mechanism_calibration, rdp

        def event(sigma: float):
            return dpa.SelfComposedDpEvent(
                dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps
            )

        return mechanism_calibration.calibrate_dp_mechanism(
            lambda: rdp.RdpAccountant(),
            event,
            eps,
            DELTA,
            mechanism_calibration.LowerEndpointAndGuess(0.0, 1.0),
            tol=1e-6 * eps,
        )

    return {
        "zoprivacy_rdp": lambda: get_noise_multiplier(
            target_epsilon=eps, target_delta=DELTA, sample_rate=q, steps=steps
        ),
        "opacus_rdp_default_tol": opacus("rdp", 0.01),
        "opacus_rdp_tol_1e-6": opacus("rdp", 1e-6 * eps),
        "opacus_prv": opacus("prv", 0.01),
        "dp_accounting_rdp": dp_accounting,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one run, one repeat (smoke test)")
    args = parser.parse_args(argv)
    runs = RUNS[:1] if args.quick else RUNS
    repeats = 1 if args.quick else args.repeats
    ruler = extended_orders(extended_orders(DEFAULT_ORDERS))
    rows = []
    for eps, q, steps in runs:
        methods = {
            k: v
            for k, v in _methods(eps, q, steps).items()
            if not (args.quick and k == "opacus_prv")
        }
        samples: dict[str, list[float]] = {name: [] for name in methods}
        sigmas: dict[str, float] = {}
        # Interleave the methods round by round, so load from other processes hits all alike.
        for round_ in range(repeats):
            for name, fn in methods.items():
                if "prv" in name and round_ > 0:
                    continue  # PRV takes seconds per call; one timing is enough
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sigmas[name], seconds = _timed(fn, 1)
                samples[name].append(seconds)
        for name in methods:
            sigma = sigmas[name]
            seconds = statistics.median(samples[name])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                achieved, _ = epsilon_and_order(
                    noise_multiplier=sigma,
                    sample_rate=q,
                    steps=steps,
                    delta=DELTA,
                    orders=ruler,
                    warn_at_edge=False,
                )
            rows.append(
                dict(
                    epsilon=eps,
                    sample_rate=q,
                    steps=steps,
                    method=name,
                    sigma=sigma,
                    seconds=seconds,
                    epsilon_on_zoprivacy_rdp=achieved,
                )
            )
            print(
                f"ε={eps:<4} q={q:<7} T={steps:<5} {name:<24} σ={sigma:.6f} "
                f"{seconds * 1e3:9.2f} ms  ε(σ)={achieved:.6f}"
            )
    full = []
    for eps, q, steps in runs:
        plan = calibrate(epsilon=eps, delta=DELTA, sample_rate=q, steps=steps)
        from opacus.accountants.utils import get_noise_multiplier as opacus_sigma

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            artifact = opacus_sigma(
                target_epsilon=0.95 * eps,
                target_delta=DELTA,
                sample_rate=q,
                steps=steps,
                accountant="rdp",
            )
        full.append(
            dict(
                epsilon=eps,
                sample_rate=q,
                steps=steps,
                sigma_joint_lemma5=plan.noise_multiplier,
                laplace_scale=plan.laplace_scale,
                sigma_artifact_split=artifact,
                noise_saving=1 - plan.noise_multiplier / artifact,
            )
        )
    speedups = []
    for eps, q, steps in runs:
        cell = {
            r["method"]: r
            for r in rows
            if (r["epsilon"], r["sample_rate"], r["steps"]) == (eps, q, steps)
        }
        ours = cell["zoprivacy_rdp"]["seconds"]
        speedups.append(
            {
                "run": [eps, q, steps],
                "vs_opacus_rdp_default_tol": cell["opacus_rdp_default_tol"]["seconds"] / ours,
                "vs_opacus_rdp_tol_1e-6": cell["opacus_rdp_tol_1e-6"]["seconds"] / ours,
                "vs_dp_accounting_rdp": cell["dp_accounting_rdp"]["seconds"] / ours,
            }
        )
    payload = {
        "machine": machine(),
        "delta": DELTA,
        "repeats": repeats,
        "rows": rows,
        "speedups": speedups,
        "dpaggzo_calibration": full,
    }
    path = write_json("accounting.json" if not args.quick else "accounting_quick.json", payload)
    print(f"wrote {path}")
    if not args.quick:
        _plot(rows, runs)


def _plot(rows: list[dict], runs: list[tuple]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows})
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(methods)
    for m_idx, method in enumerate(methods):
        times = [
            next(
                r["seconds"]
                for r in rows
                if r["method"] == method and (r["epsilon"], r["sample_rate"], r["steps"]) == run
            )
            for run in runs
        ]
        ax.bar([i + m_idx * width for i in range(len(runs))], times, width, label=method)
    ax.set_yscale("log")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(runs))])
    ax.set_xticklabels([f"ε={e}\nq={q}\nT={t}" for e, q, t in runs], fontsize=8)
    ax.set_ylabel("calibration time (s, log)")
    ax.set_title("Finding σ for a target (ε, δ=1e-5)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "accounting.png", dpi=120)


if __name__ == "__main__":
    main()
