"""Step time of DP-AggZO vs K, against the floor of 2K forward passes and a paper-style loop.

Setting (full run): the workload of :mod:`benchmarks.memory_vs_k` (all-MiniLM-L6-v2 classifier,
22.7M trainable parameters, one fixed batch of 16 Rotten Tomatoes sentences, max_length 64),
clip c = 1, σ = 1, b = 16, φ = 1e-3, one thread, one process.

* ``forward``: the closure (``sequence_classification_losses``, under ``torch.inference_mode``),
  median of ``--forward-repeats`` calls. A K-step needs 2K of them: the floor is 2K·forward.
* ``dpaggzo``: :meth:`zoprivacy.DPAggZO.step`, median of ``--repeats`` steps.
* ``paper``: :class:`PaperStyleDPAggZO` below, the same maths written the way the paper's
  artifact (derived from MeZO's trainer) does it: the direction z_k of every tensor comes from
  ``torch.manual_seed(seed_k)`` and a freshly allocated ``torch.normal(...)`` for each parameter,
  regenerated for each of the three perturbations (+φ, −2φ, +φ) and once more in the update
  (4K generations per step), applied as ``param.data += scale * z``; clipping, noise and update
  rule are those of DP-AggZO.

Clock: process CPU time (``time.process_time``; one thread, so it is the step's compute time),
because the machine is shared and wall time also counts the time other processes held the core
(wall times are in the JSON too). After one K = 1 warm-up step of each implementation, each K
gets its own time window: the forward time, the per-pass costs below, then ``--repeats`` rounds
of one DP-AggZO step and one paper-style step, interleaved, so that load changes affect both
alike and every ratio of a row compares numbers measured minutes apart at most. Reported per K:
seconds per step (median), step / (2K·forward) for both, and the speed-up of DP-AggZO over the
paper-style loop.

Breakdown of a DP-AggZO step (a model, not an instrumented step): each per-pass cost is timed
alone over all trainable tensors and multiplied by how often a step does it:

* ``forward``: 2K closure calls;
* ``generate``: 4K passes of ``iter_direction`` (seed derivation + ``torch.randn`` into the
  scratch buffer), of which ``seeds`` is the ``tensor_seeds`` part;
* ``add``: 4K passes of ``p.add_(z, alpha=...)`` (3K in the probe, K in the update);
* ``clip_noise``: clipping the [|B|, K] matrix and drawing the noise, once;
* ``other``: the measured step minus all of the above (closure checks, RNG state save/restore,
  float64 conversions, Python overhead).

Run: ``python -m benchmarks.step_time`` → ``benchmarks/results/step_time.json`` and ``.png``.
``--quick``: a tiny MLP, K in {1, 4}, one step each (smoke test), ``step_time_quick.json``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import machine
from benchmarks.memory_vs_k import CLIP, SIGMA, param_stats, real_workload, save, tiny_workload

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import torch  # noqa: E402  (after the thread settings)

from zoprivacy.optim.algorithm import clip_rows  # noqa: E402

KS = (1, 4, 16, 64)
QUICK_KS = (1, 4)
LR = 1e-6
PHI = 1e-3


class PaperStyleDPAggZO:
    """DP-AggZO written like the paper's artifact code (MeZO-style), for timing comparisons.

    Same maths as :class:`~zoprivacy.DPAggZO` (differences in float64, averaging over
    K, per-record L2 clipping to c, Gaussian noise σc on the K-vector, update −η/b Σ_k S_k z_k),
    but every z_k is drawn with ``torch.manual_seed(seed_k)`` and a freshly allocated tensor per
    parameter, regenerated for each in-place perturbation (+φ, −2φ, +φ) and for the update (4K
    generations per central step), applied as ``param.data += scale * z``.

    ``directions="rademacher"`` draws ``torch.randint(0, 2, ...) * 2 - 1`` instead of
    ``torch.normal``; ``difference="forward"`` evaluates L(θ) once and L(θ + φz_k) per direction
    (K + 1 forwards, 3K generations). The global torch RNG state is restored after the step.
    ``noise_seed=None`` draws the noise generator's seed from the OS.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lr: float,
        *,
        num_directions: int,
        clip_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        perturbation_scale: float = PHI,
        seed: int = 0,
        directions: str = "gaussian",
        difference: str = "central",
        noise_seed: int | None = None,
    ) -> None:
        if directions not in ("gaussian", "rademacher"):
            raise ValueError(f"directions must be 'gaussian' or 'rademacher', got {directions!r}")
        if difference not in ("central", "forward"):
            raise ValueError(f"difference must be 'central' or 'forward', got {difference!r}")
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr
        self.k = num_directions
        self.clip = clip_norm
        self.sigma = noise_multiplier
        self.b = expected_batch_size
        self.phi = perturbation_scale
        self.directions, self.difference = directions, difference
        self.seeds = torch.Generator().manual_seed(seed)  # public direction seeds
        noise_seed = secrets.randbits(63) if noise_seed is None else noise_seed
        self.noise = torch.Generator().manual_seed(noise_seed)  # private noise

    def _z(self, p: torch.Tensor) -> torch.Tensor:
        if self.directions == "gaussian":
            return torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
        return torch.randint(0, 2, p.size(), device=p.device, dtype=p.dtype) * 2 - 1

    def perturb(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for param in self.params:
            param.data += scale * self._z(param)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        seeds = torch.randint(0, 2**31 - 1, (self.k,), generator=self.seeds).tolist()
        rng = torch.get_rng_state()
        deltas = []
        if self.difference == "central":
            for seed in seeds:
                self.perturb(seed, self.phi)
                plus = closure().double()
                self.perturb(seed, -2 * self.phi)
                minus = closure().double()
                self.perturb(seed, self.phi)
                deltas.append((plus - minus) / (2 * self.phi))
        else:
            base = closure().double()
            for seed in seeds:
                self.perturb(seed, self.phi)
                deltas.append((closure().double() - base) / self.phi)
                self.perturb(seed, -self.phi)
        noisy_sum = clip_and_noise(
            torch.stack(deltas, dim=1) / self.k, self.clip, self.sigma, self.noise
        )
        for seed, coef in zip(seeds, (noisy_sum / self.b).tolist(), strict=True):
            torch.manual_seed(seed)
            for param in self.params:
                param.data -= (self.lr * coef) * self._z(param)
        torch.set_rng_state(rng)
        return noisy_sum


def clip_and_noise(
    agg: torch.Tensor, clip: float, sigma: float, generator: torch.Generator
) -> torch.Tensor:
    """Σ_x Δ_agg(x)·min(1, c/‖Δ_agg(x)‖) + N(0, σ²c² I_K), float64: line 13 by the package's
    :func:`~zoprivacy.optim.algorithm.clip_rows`, then the paper's float Gaussian noise (a timing
    baseline, not the package's exact release)."""
    noise = torch.randn(agg.shape[1], dtype=torch.float64, generator=generator) * (sigma * clip)
    return clip_rows(agg, clip).clipped.sum(dim=0) + noise


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def measure(fn: Callable[[], object], repeats: int) -> dict[str, Any]:
    """Median process CPU time (``cpu``) and wall time (``wall``) of ``repeats`` calls, seconds.

    With one thread, CPU time is what the step costs; wall time also counts the time other
    processes on the shared machine held the core.
    """
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {
        "cpu": statistics.median(cpu),
        "wall": statistics.median(wall),
        "cpu_all": cpu,
        "wall_all": wall,
    }


@torch.no_grad()
def components(params: list[torch.Tensor], batch: int, k: int, repeats: int) -> dict[str, Any]:
    """Per-pass costs of the pieces of a step, each timed alone (``measure`` dicts)."""
    from benchmarks._directions import iter_direction, scratch_buffers
    from zoprivacy.optim.directions import tensor_seeds

    scratch = scratch_buffers(params)
    gens = {dev: torch.Generator(device=dev) for dev in scratch}
    counter = iter(range(1, 10**9))

    def generate() -> None:
        for _ in iter_direction(
            params, seed=1, step=0, k=next(counter), scratch=scratch, generators=gens
        ):
            pass

    seeds = measure(lambda: tensor_seeds(1, 0, next(counter), len(params)), 20 * repeats)
    gen = measure(generate, repeats)
    views = [
        z.clone()
        for _, _, z in iter_direction(params, seed=1, step=0, k=0, scratch=scratch, generators=gens)
    ]
    sign = [1.0]

    def add() -> None:
        sign[0] = -sign[0]
        for p, z in zip(params, views, strict=True):
            p.add_(z, alpha=sign[0] * PHI)

    add_t = measure(add, 2 * repeats)  # even count: the parameters end where they started
    views.clear()

    def paper_generate() -> None:
        torch.manual_seed(next(counter))
        for p in params:
            torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)

    paper_gen = measure(paper_generate, repeats)
    torch.manual_seed(0)
    zs = [torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype) for p in params]

    def paper_add() -> None:
        sign[0] = -sign[0]
        for p, z in zip(params, zs, strict=True):
            p.data += (sign[0] * PHI) * z

    paper_add_t = measure(paper_add, 2 * repeats)
    zs.clear()
    gen_noise = torch.Generator().manual_seed(0)
    agg = torch.randn(batch, k, dtype=torch.float64)
    clip = measure(lambda: clip_and_noise(agg, CLIP, SIGMA, gen_noise), 50)
    return {
        "generate_direction": gen,
        "seeds": seeds,
        "add": add_t,
        "paper_generate_direction": paper_gen,
        "paper_add": paper_add_t,
        "clip_noise": clip,
    }


def breakdown(step: float, k: int, forward: float, comp: dict) -> dict[str, dict[str, float]]:
    """CPU seconds and fractions of a DP-AggZO step, modelled from the per-pass costs."""
    parts = {
        "forward": 2 * k * forward,
        "generate": 4 * k * comp["generate_direction"]["cpu"],
        "add": 4 * k * comp["add"]["cpu"],
        "clip_noise": comp["clip_noise"]["cpu"],
    }
    parts["other"] = step - sum(parts.values())
    parts["seeds_within_generate"] = 4 * k * comp["seeds"]["cpu"]
    return {"seconds": parts, "fraction": {name: value / step for name, value in parts.items()}}


def main(argv: list[str] | None = None) -> None:
    from zoprivacy.optim.optimizer import DPAggZO

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny MLP, K in {1, 4} (smoke test)")
    parser.add_argument("--out", help="folder for the JSON and PNG (default benchmarks/results)")
    parser.add_argument("--ks", type=int, nargs="+", help="K values (default 1 4 16 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per K and method")
    parser.add_argument("--forward-repeats", type=int, default=7, help="forward calls per K")
    parser.add_argument("--component-repeats", type=int, default=3, help="passes per piece and K")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ks = args.ks or (QUICK_KS if args.quick else KS)
    repeats = 1 if args.quick else args.repeats
    fwd_repeats = 3 if args.quick else args.forward_repeats
    comp_repeats = 1 if args.quick else args.component_repeats
    started = time.perf_counter()
    load_start = os.getloadavg()

    work = tiny_workload() if args.quick else real_workload()
    params = [p for p in work.model.parameters() if p.requires_grad]

    def make(cls: type, k: int) -> Any:
        return cls(
            params,
            LR,
            num_directions=k,
            clip_norm=CLIP,
            noise_multiplier=SIGMA,
            expected_batch_size=work.batch_size,
            perturbation_scale=PHI,
            seed=0,
        )

    for _ in range(3):
        work.losses()
    for cls in (DPAggZO, PaperStyleDPAggZO):  # warm-up
        make(cls, 1).step(work.losses)
    rows = []
    for k in ks:
        # Everything a row compares is measured in the same time window, so that load changes
        # on the shared machine between K values do not enter its ratios.
        fwd = measure(work.losses, fwd_repeats)
        comp = components(params, work.batch_size, k, comp_repeats)
        zo, paper = make(DPAggZO, k), make(PaperStyleDPAggZO, k)
        zo_runs, paper_runs = [], []
        for _ in range(repeats):
            zo_runs.append(measure(lambda o=zo: o.step(work.losses), 1))
            paper_runs.append(measure(lambda o=paper: o.step(work.losses), 1))
        zo_t = statistics.median(r["cpu"] for r in zo_runs)
        paper_t = statistics.median(r["cpu"] for r in paper_runs)
        floor = 2 * k * fwd["cpu"]
        paper_model = 2 * k * fwd["cpu"] + 4 * k * (
            comp["paper_generate_direction"]["cpu"] + comp["paper_add"]["cpu"]
        )
        row = {
            "K": k,
            "dpaggzo_seconds": zo_t,
            "paper_seconds": paper_t,
            "forward_seconds": fwd["cpu"],
            "floor_seconds": floor,
            "dpaggzo_over_floor": zo_t / floor,
            "paper_over_floor": paper_t / floor,
            "speedup_vs_paper": paper_t / zo_t,
            "dpaggzo_wall_seconds": statistics.median(r["wall"] for r in zo_runs),
            "paper_wall_seconds": statistics.median(r["wall"] for r in paper_runs),
            "forward_wall_seconds": fwd["wall"],
            "dpaggzo_cpu_all": [r["cpu"] for r in zo_runs],
            "paper_cpu_all": [r["cpu"] for r in paper_runs],
            "forward_cpu_all": fwd["cpu_all"],
            "paper_model_seconds": paper_model,
            "components": comp,
            "breakdown": breakdown(zo_t, k, fwd["cpu"], comp),
            "loadavg": os.getloadavg(),
        }
        rows.append(row)
        fr = row["breakdown"]["fraction"]
        print(
            f"K={k:<3} fwd {fwd['cpu'] * 1e3:6.1f} ms  DP-AggZO {zo_t:8.3f} s "
            f"({row['dpaggzo_over_floor']:.2f}x floor)  paper-style {paper_t:8.3f} s "
            f"({row['paper_over_floor']:.2f}x floor)  speed-up {row['speedup_vs_paper']:.2f}x  | "
            f"forward {fr['forward']:.0%} generate {fr['generate']:.0%} add {fr['add']:.0%} "
            f"other {fr['other']:.0%}  (CPU s; wall {row['dpaggzo_wall_seconds']:.2f} s)",
            flush=True,
        )

    forward = statistics.median(r["forward_seconds"] for r in rows)
    payload = {
        "machine": machine(),
        "config": {
            "model": work.name,
            **param_stats(work.model),
            "batch": work.batch_size,
            "seq_len": work.seq_len,
            "ks": list(ks),
            "repeats": repeats,
            "forward_repeats_per_k": fwd_repeats,
            "component_repeats": comp_repeats,
            "clip_norm": CLIP,
            "noise_multiplier": SIGMA,
            "perturbation_scale": PHI,
            "threads_per_process": 1,
            "clock": "process CPU time (time.process_time)",
            "quick": args.quick,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "wall_seconds": time.perf_counter() - started,
        },
        "forward_seconds": forward,
        "rows": rows,
        "ratios": {
            "dpaggzo_over_floor": {str(r["K"]): r["dpaggzo_over_floor"] for r in rows},
            "paper_over_floor": {str(r["K"]): r["paper_over_floor"] for r in rows},
            "speedup_vs_paper": {str(r["K"]): r["speedup_vs_paper"] for r in rows},
            "direction_pass_over_forward": statistics.median(
                (r["components"]["generate_direction"]["cpu"] + r["components"]["add"]["cpu"])
                / r["forward_seconds"]
                for r in rows
            ),
            "paper_direction_pass_over_forward": statistics.median(
                (
                    r["components"]["paper_generate_direction"]["cpu"]
                    + r["components"]["paper_add"]["cpu"]
                )
                / r["forward_seconds"]
                for r in rows
            ),
        },
    }
    name = "step_time_quick" if args.quick else "step_time"
    path = save(f"{name}.json", payload, args.out)
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path}")


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    ks = [r["K"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(ks, [r["dpaggzo_over_floor"] for r in rows], "o-", label="DP-AggZO")
    left.plot(ks, [r["paper_over_floor"] for r in rows], "s--", label="paper-style loop")
    left.axhline(1.0, color="k", ls=":", lw=0.8, label="floor: 2K forward passes")
    left.set_xscale("log", base=2)
    left.set_xticks(ks, [str(k) for k in ks])
    left.set_ylim(bottom=0)
    left.set_xlabel("K (directions per step)")
    left.set_ylabel("step time / (2K × forward time)")
    cfg = payload["config"]
    left.set_title(f"{cfg['model']}, batch {cfg['batch']}×{cfg['seq_len']}, 1 thread", fontsize=9)
    left.legend(fontsize=8)
    names = ["forward", "generate", "add", "clip_noise", "other"]
    bottom = [0.0] * len(rows)
    for name in names:
        values = [max(0.0, r["breakdown"]["fraction"][name]) for r in rows]
        right.bar([str(k) for k in ks], values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.set_ylim(0, 1.1)
    right.set_xlabel("K")
    right.set_ylabel("fraction of a DP-AggZO step")
    right.set_title("where a DP-AggZO step goes (per-pass costs × counts)", fontsize=9)
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
