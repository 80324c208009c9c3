"""Empirical privacy audit of DP-AggZO (long run) and the cost of the exact noise samplers.

Three parts, one JSON (``benchmarks/results/audit.json``) and one figure (``audit.png``):

1. **How close the audit gets** (q = 1, one step, δ = 1e-5 and δ = 1e-2): for K ∈ {1, 8, 64}
   and a few σ, :func:`zoprivacy.audit.run_audit` on the real optimizer with many trials,
   analysed with the likelihood-ratio and norm attacks only (the Gaussian mechanism as specified,
   exact arithmetic). Reported next to each other: ``epsilon_claimed`` (the accountant: RDP +
   Lemma 8), ``epsilon_tight`` (the exact Gaussian mechanism μ = 1/σ: no test can beat it),
   ``epsilon_lower`` (rigorous 95% bound, threshold chosen on a held-out half) and
   ``epsilon_lower_gdp`` (the ε of the 95% lower bound on μ, the yardstick when the mechanism is
   Gaussian).
2. **Subsampled** (q < 1, one step, δ = 1e-5 and δ = 1e-2): q ∈ {0.5, 0.1}, K ∈ {1, 8, 64},
   same attacks. ``epsilon_tight`` is now the exact one-step subsampled Gaussian
   (:func:`zoprivacy.accounting.subsampled_gaussian_epsilon`), and ``epsilon_lower_family`` the ε of
   the 95% upper bound ``noise_multiplier_upper`` (σ̂) on the noise multiplier of the rate-q
   family (the analogue of ``epsilon_lower_gdp``). σ = 1 for q = 0.5 and σ = 0.5 for q = 0.1
   (at q = 0.1 and σ = 1 the canary is too faint for a few thousand trials to say much).
3. **Floating point**: the same trials analysed with the float attacks (``release:float``,
   ``release:grid``): the optimizer's ``noisy_sum + v`` in float64 leaks; an emulation of the
   proposed ``NoiseSource.add_noise`` hook (clipped sum and noise on the grid, exact) does not.
4. **Cost of the exact noise**: time per call of ``sample_noise(K, σc, None)`` (discrete Gaussian
   + dither, OS entropy), of ``NoiseSource.add_noise`` (snapped, exact) and of the previous path
   (``torch.randn`` from a generator seeded with 64 OS-entropy bits) for K = 1 … 256, next to
   one DP-AggZO step of the audit's tiny model.

Run: ``python -m benchmarks.audit`` (about 15-20 minutes of one core) or ``--quick`` (seconds,
for smoke tests; writes ``audit_quick.json``). ``--out DIR`` writes elsewhere.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
import warnings
from pathlib import Path

import torch

from benchmarks._common import RESULTS, machine, write_json
from zoprivacy import DPAggZO
from zoprivacy.audit import run_audit
from zoprivacy.noise import samplers as secure_noise
from zoprivacy.noise.source import NoiseSource, sample_noise

GAUSSIAN = ("release:likelihood", "update:likelihood", "release:norm", "update:norm")
FLOAT = ("release:float", "release:grid")

FULL = {
    "configs": [  # (K, σ, trials per dataset)
        (1, 1.0, 10000),
        (1, 2.0, 10000),
        (8, 1.0, 5000),
        (8, 2.0, 5000),
        (64, 1.0, 1000),
        (64, 2.0, 1000),
    ],
    "subsampled_configs": [  # (q, σ, K, trials per dataset)
        (0.5, 1.0, 1, 20000),
        (0.5, 1.0, 8, 4000),
        (0.5, 1.0, 64, 1000),
        (0.1, 0.5, 1, 20000),
        (0.1, 0.5, 8, 4000),
        (0.1, 0.5, 64, 1000),
    ],
    "float_configs": [(8, 4.0, 500)],
    "noise_k": [1, 2, 4, 8, 16, 32, 64, 128, 256],
    "noise_repeats": 30,
}
QUICK = {
    "configs": [(1, 1.0, 60), (8, 2.0, 40)],
    "subsampled_configs": [(0.5, 1.0, 1, 60), (0.1, 0.5, 8, 40)],
    "float_configs": [(8, 4.0, 30)],
    "noise_k": [1, 8],
    "noise_repeats": 3,
}


class _GridNoise:
    reproducible = False

    def sample(self, k, std):
        from fractions import Fraction

        grid = secure_noise.noise_grid(std)
        sigma2 = (Fraction(std) / Fraction(grid)) ** 2
        return torch.tensor(
            [secure_noise.discrete_gaussian(sigma2) * grid for _ in range(k)], dtype=torch.float64
        )

    def add_noise(self, values, std, *, sensitivity=None):
        """The optimizer releases through ``add_noise``: grid noise on the (snapped) sum."""
        return values.to(torch.float64) + self.sample(values.numel(), std)

    def state_dict(self):
        return {"mode": "os_entropy"}


class SnappedRelease(DPAggZO):
    """Emulation of the proposed hook with the subclass hooks available: clipped rows rounded to
    the grid (so their float sum is exact) plus integer noise on the grid (exact release)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._noise = _GridNoise()

    def _clip(self, agg):
        clipped, *diagnostics = super()._clip(agg)
        if self.noise_multiplier == 0:
            return (clipped, *diagnostics)
        grid = secure_noise.noise_grid(self.noise_multiplier * self.clip_norm)
        return (torch.round(clipped / grid) * grid, *diagnostics)


def _row(result, **extra):
    d = result.to_dict()
    keep = [
        "num_directions",
        "noise_multiplier",
        "sample_rate",
        "delta",
        "trials",
        "evaluation_trials",
        "epsilon_claimed",
        "epsilon_tight",
        "epsilon_lower",
        "epsilon_lower_gdp",
        "epsilon_lower_family",
        "noise_multiplier_upper",
        "tight_reference",
        "mu_claimed",
        "mu_lower",
        "attack",
        "false_positive_rate",
        "false_negative_rate",
        "fpr_interval",
        "fnr_interval",
        "by_attack",
        "shift",
        "shift_stderr",
        "noise_std",
        "violation",
        "seconds",
    ]
    row = {key: d[key] for key in keep}
    row["lower_over_claimed"] = d["epsilon_lower"] / d["epsilon_claimed"]
    row["lower_over_tight"] = (
        d["epsilon_lower"] / d["epsilon_tight"] if d["epsilon_tight"] else None
    )
    row["gdp_over_claimed"] = d["epsilon_lower_gdp"] / d["epsilon_claimed"]
    tight, family = d["epsilon_tight"], d["epsilon_lower_family"]
    row["tight_over_claimed"] = tight / d["epsilon_claimed"] if tight is not None else None
    row["family_over_tight"] = family / tight if tight and family is not None else None
    row["family_over_claimed"] = family / d["epsilon_claimed"] if family is not None else None
    sigma_hat = d["noise_multiplier_upper"]
    row["sigma_upper_over_sigma"] = (
        sigma_hat / d["noise_multiplier"] if sigma_hat is not None else None
    )
    row.update(extra)
    return row


def _audits(plan, log):
    gaussian_rows, float_rows = [], []
    for k, sigma, trials in plan["configs"]:
        result = run_audit(num_directions=k, noise_multiplier=sigma, trials=trials, delta=1e-5)
        for delta in (1e-5, 1e-2):
            ideal = result.reanalyse(delta=delta, attacks=GAUSSIAN)
            gaussian_rows.append(_row(ideal, implementation="DPAggZO"))
            log(
                f"K={k:3d} σ={sigma:g} δ={delta:g}: ε_lower={ideal.epsilon_lower:.3f} "
                f"ε_gdp={ideal.epsilon_lower_gdp:.3f} tight={ideal.epsilon_tight:.3f} "
                f"claimed={ideal.epsilon_claimed:.3f} ({result.seconds:.0f} s)"
            )
        fp = result.reanalyse(delta=1e-2, attacks=FLOAT)
        float_rows.append(_row(fp, implementation="DPAggZO (noisy_sum + v in float64)"))
        log(f"   float attacks on the same trials (δ=0.01): {fp.summary()}")
    for k, sigma, trials in plan["float_configs"]:
        for cls, name in (
            (DPAggZO, "DPAggZO (noisy_sum + v in float64)"),
            (SnappedRelease, "exact grid release (add_noise hook, emulated)"),
        ):
            result = run_audit(
                num_directions=k,
                noise_multiplier=sigma,
                trials=trials,
                delta=1e-2,
                optimizer_cls=cls,
                attacks=FLOAT + GAUSSIAN,
            )
            float_rows.append(_row(result, implementation=name))
            log(f"   {name}: {result.summary()}")
    return gaussian_rows, float_rows


def _subsampled(plan, log):
    rows = []
    for q, sigma, k, trials in plan["subsampled_configs"]:
        result = run_audit(
            num_directions=k,
            noise_multiplier=sigma,
            trials=trials,
            delta=1e-5,
            sample_rate=q,
            attacks=GAUSSIAN,
        )
        for delta in (1e-5, 1e-2):
            r = result.reanalyse(delta=delta)
            rows.append(_row(r, implementation="DPAggZO"))
            log(
                f"q={q:g} K={k:3d} σ={sigma:g} δ={delta:g}: ε_lower={r.epsilon_lower:.3f} "
                f"ε_family={r.epsilon_lower_family:.3f} (σ̂={r.noise_multiplier_upper:.3f}) "
                f"tight={r.epsilon_tight:.3f} claimed={r.epsilon_claimed:.3f} "
                f"({result.seconds:.0f} s)"
            )
    return rows


def _time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _old_randn(k, std):
    gen = torch.Generator(device="cpu")
    gen.manual_seed(secrets.randbits(64))
    return torch.randn(k, dtype=torch.float64, generator=gen).mul_(std)


def _tiny_step(k: int, std: float) -> None:
    theta = torch.nn.Parameter(torch.zeros(k + 1, dtype=torch.float64))
    canary = torch.zeros(k + 1, dtype=torch.float64)
    canary[0] = 1.0
    opt = DPAggZO(
        [theta], 0.1, num_directions=k, clip_norm=1.0, noise_multiplier=std, expected_batch_size=1.0
    )
    opt.step(lambda: (theta @ canary).reshape(1))


def _noise_costs(plan, log):
    rows, std, repeats = [], 2.0, plan["noise_repeats"]
    source = NoiseSource()
    for k in plan["noise_k"]:
        x = torch.randn(k, dtype=torch.float64)
        row = {
            "K": k,
            "secure_sample_ms": 1e3 * _time(lambda k=k: sample_noise(k, std, None), repeats),
            "snapped_add_noise_ms": 1e3
            * _time(lambda x=x: source.add_noise(x, std, sensitivity=1.0), repeats),
            "torch_randn_ms": 1e3 * _time(lambda k=k: _old_randn(k, std), repeats),
            "tiny_model_step_ms": 1e3 * _time(lambda k=k: _tiny_step(k, std), max(3, repeats // 3)),
        }
        rows.append(row)
        log(
            f"K={k:3d}: secure sample {row['secure_sample_ms']:.3f} ms, snapped "
            f"{row['snapped_add_noise_ms']:.3f} ms, torch.randn {row['torch_randn_ms']:.3f} ms, "
            f"one tiny-model step {row['tiny_model_step_ms']:.1f} ms"
        )
    return rows


def _plot(payload, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(16, 9.6))
    axes = grid[0]
    for ax, delta in zip(axes[:2], (1e-5, 1e-2), strict=True):
        rows = [r for r in payload["gaussian"] if r["delta"] == delta]
        labels = [f"K={r['num_directions']}\nσ={r['noise_multiplier']:g}" for r in rows]
        xs = range(len(rows))
        width = 0.2
        series = [
            ("epsilon_claimed", "claimed (RDP + Lemma 8)"),
            ("epsilon_tight", "tight (exact Gaussian)"),
            ("epsilon_lower_gdp", "audit: ε of μ_lower (GDP)"),
            ("epsilon_lower", "audit: rigorous ε_lower (95%)"),
        ]
        for i, (key, label) in enumerate(series):
            ax.bar([x + (i - 1.5) * width for x in xs], [r[key] for r in rows], width, label=label)
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("ε")
        ax.set_title(f"q = 1, one step, δ = {delta:g}")
        ax.legend(fontsize=8)
    for ax, delta in zip(grid[1][:2], (1e-5, 1e-2), strict=True):
        rows = [r for r in payload["subsampled"] if r["delta"] == delta]
        labels = [
            f"q={r['sample_rate']:g} K={r['num_directions']}\nσ={r['noise_multiplier']:g}"
            for r in rows
        ]
        xs = range(len(rows))
        width = 0.2
        series = [
            ("epsilon_claimed", "claimed (RDP + Lemma 8)"),
            ("epsilon_tight", "tight (exact subsampled Gaussian)"),
            ("epsilon_lower_family", "audit: ε of σ̂ (rate-q family)"),
            ("epsilon_lower", "audit: rigorous ε_lower (95%)"),
        ]
        for i, (key, label) in enumerate(series):
            ax.bar([x + (i - 1.5) * width for x in xs], [r[key] for r in rows], width, label=label)
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("ε")
        ax.set_title(f"q < 1, one step, δ = {delta:g}")
        ax.legend(fontsize=8)
    ax = grid[1][2]
    rows = [r for r in payload["subsampled"] if r["delta"] == 1e-5]
    rows += [r for r in payload["gaussian"] if r["delta"] == 1e-5]
    labels = [
        f"q={r.get('sample_rate', 1.0):g} K={r['num_directions']}\nσ={r['noise_multiplier']:g}"
        for r in rows
    ]
    ratios = [r["sigma_upper_over_sigma"] for r in rows]
    ax.bar(range(len(rows)), [x if x is not None and x < 1e3 else float("nan") for x in ratios])
    ax.axhline(1.0, color="k", lw=1)
    ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
    ax.set_ylabel("σ̂ / σ (95% upper bound; ≥ 1 expected)")
    ax.set_title("Family bound on the noise multiplier")
    ax = axes[2]
    noise = payload["noise_cost"]
    ks = [r["K"] for r in noise]
    for key, label in (
        ("secure_sample_ms", "sample_noise (discrete Gaussian + dither)"),
        ("snapped_add_noise_ms", "add_noise (exact grid release)"),
        ("torch_randn_ms", "torch.randn (previous path)"),
        ("tiny_model_step_ms", "one DP-AggZO step, tiny model"),
    ):
        ax.loglog(ks, [r[key] for r in noise], marker="o", label=label)
    ax.set_xlabel("K")
    ax.set_ylabel("ms per step")
    ax.set_title("Noise cost per step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few trials (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    plan = QUICK if args.quick else FULL
    name = "audit_quick" if args.quick else "audit"
    log = print
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gaussian, float_rows = _audits(plan, log)
        subsampled = _subsampled(plan, log)
        noise = _noise_costs(plan, log)
    payload = {
        "machine": machine(),
        "plan": plan,
        "gaussian": gaussian,
        "subsampled": subsampled,
        "float": float_rows,
        "noise_cost": noise,
        "seconds": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.out == RESULTS:
        path = write_json(f"{name}.json", payload)
    else:
        import json

        path = args.out / f"{name}.json"
        path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    _plot(payload, args.out / f"{name}.png")
    log(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
