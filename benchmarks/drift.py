"""Parameter drift of the perturbation paths: max |θ − θ₀| in ulps after 1,000 evaluation cycles.

An evaluation cycle is one direction's probe: θ + φz then θ − φz (central differences), or
θ + φz (forward differences). With ``lr = 0`` the update is skipped, so whatever θ holds after
the run is left over by the probe alone: the zero-drift substitution path must leave θ bit for
bit, the in-place path (+φz, −2φz, +φz; the paper's loop writes ``param.data += s * z``) leaves
rounding residue that accumulates with the number of cycles.

Setting: a 2-layer MLP (Linear 256→256, tanh, Linear 256→128: 98,688 parameters, PyTorch's
default initialisation, |θ| up to 1/16), 8 records, squared loss, φ = 1e-3, K = 10 directions
per step × 100 steps = 1,000 cycles, in float32, bfloat16 and float16, one thread.

Metric per parameter element: |θ − θ₀| / ulp(θ₀), where ulp(x) is the gap from |x| to the next
representable number of the dtype; reported: the maximum, the mean, the share of elements that
changed, and the largest absolute change.

Paths: ``hooks`` (default ``perturbation="auto"``, Gaussian), ``hooks_rademacher``,
``hooks_forward``, ``inplace`` (``perturbation="inplace"``), ``inplace_rademacher``,
``inplace_forward`` and ``paper`` (:class:`benchmarks.step_time.PaperStyleDPAggZO`, Gaussian,
central, with ``lr = 0``).

Run: ``python -m benchmarks.drift`` → ``benchmarks/results/drift.json`` and ``.png`` (about a
minute). ``--cycles`` changes the number of cycles, ``--quick`` runs 40 cycles into
``drift_quick.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import torch  # noqa: E402

from benchmarks._common import RESULTS, machine  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PATHS = {
    "hooks": {},
    "hooks_rademacher": {"directions": "rademacher"},
    "hooks_forward": {"difference": "forward"},
    "inplace": {"perturbation": "inplace"},
    "inplace_rademacher": {"perturbation": "inplace", "directions": "rademacher"},
    "inplace_forward": {"perturbation": "inplace", "difference": "forward"},
    "paper": None,
}
K = 10
PHI = 1e-3


def ulps(theta: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
    """|θ − θ₀| in units of the last place of θ₀ (in θ₀'s dtype), as float64."""
    mag = theta0.detach().abs()
    up = torch.nextafter(mag, torch.full_like(mag, float("inf")))
    gap = up.double() - mag.double()
    return (theta.detach().double() - theta0.detach().double()).abs() / gap


def build(dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 128)
        ).to(dtype)
        x, y = torch.randn(8, 256).to(dtype), torch.randn(8, 128).to(dtype)

    def closure() -> torch.Tensor:
        return ((model(x) - y) ** 2).float().sum(1)

    return model, closure


def run(path: str, dtype: torch.dtype, cycles: int) -> dict[str, Any]:
    from benchmarks.step_time import PaperStyleDPAggZO
    from zoprivacy.optim.optimizer import DPAggZO

    model, closure = build(dtype)
    params = list(model.parameters())
    theta0 = [p.detach().clone() for p in params]
    steps = max(1, cycles // K)
    common = dict(num_directions=K, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=8)
    if PATHS[path] is None:
        opt: Any = PaperStyleDPAggZO(params, 0.0, perturbation_scale=PHI, seed=0, **common)
    else:
        opt = DPAggZO(
            params, 0.0, perturbation_scale=PHI, seed=0, noise_seed=0, **common, **PATHS[path]
        )
    started = time.process_time()
    taken = None
    for _ in range(steps):
        stats = opt.step(closure)
        taken = getattr(stats, "perturbation_path", "paper")
    seconds = time.process_time() - started
    u = torch.cat([ulps(p, p0).flatten() for p, p0 in zip(params, theta0, strict=True)])
    diff = torch.cat(
        [
            (p.detach().double() - p0.double()).abs().flatten()
            for p, p0 in zip(params, theta0, strict=True)
        ]
    )
    return {
        "path": path,
        "perturbation_path": taken,
        "cycles": steps * K,
        "max_ulps": float(u.max()),
        "mean_ulps": float(u.mean()),
        "changed_fraction": float((diff > 0).double().mean()),
        "max_abs": float(diff.max()),
        "cpu_seconds": seconds,
    }


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    names = list(PATHS)
    dtypes = list(DTYPES)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(dtypes)
    for j, dt in enumerate(dtypes):
        vals = [
            next(r["max_ulps"] for r in rows if r["path"] == n and r["dtype"] == dt) for n in names
        ]
        xs = [i + (j - 1) * width for i in range(len(names))]
        ax.bar(xs, [max(v, 1e-2) for v in vals], width, label=dt, color=f"C{j}")
        for x, v in zip(xs, vals, strict=True):
            ax.text(x, max(v, 1e-2) * 1.15, "0" if v == 0 else f"{v:.0f}", ha="center", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_ylabel("max |θ − θ₀| in ulps (0 drawn at 0.01)")
    ax.set_title(
        f"drift after {rows[0]['cycles']} evaluation cycles (lr = 0), MLP "
        f"{payload['config']['params']:,} parameters, φ = {PHI}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="output folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    cycles = 40 if args.quick else args.cycles
    rows = []
    for dt_name, dtype in DTYPES.items():
        for path in PATHS:
            row = {"dtype": dt_name, **run(path, dtype, cycles)}
            rows.append(row)
            print(
                f"{dt_name:9} {path:19} ({row['perturbation_path']:8}) max {row['max_ulps']:9.1f}"
                f" ulps, mean {row['mean_ulps']:.3g}, changed {row['changed_fraction']:.1%}, "
                f"max |Δθ| {row['max_abs']:.3g}",
                flush=True,
            )
    model, _ = build(torch.float32)
    payload = {
        "machine": machine(),
        "method": __doc__,
        "config": {
            "params": sum(p.numel() for p in model.parameters()),
            "cycles": cycles,
            "K": K,
            "perturbation_scale": PHI,
        },
        "rows": rows,
        "max_ulps": {f"{r['path']}/{r['dtype']}": r["max_ulps"] for r in rows},
    }
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    target = out / ("drift_quick.json" if args.quick else "drift.json")
    target.write_text(json.dumps(payload, indent=1) + "\n")
    plot(payload, target.with_suffix(".png"))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
