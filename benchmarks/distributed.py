"""Data-parallel DP-AggZO: communication per step and step time from 1 to 2 processes.

Two gloo processes on this machine (CPU, one thread each), joined through a FileStore.

* ``bytes``: payload bytes that one rank hands to the collectives in one step
  (:attr:`zoprivacy.distributed.DataParallel.last_step_bytes`), measured on a real 2-process
  step for a flat float32 parameter of d ∈ {10³, 10⁵, 10⁶} entries and K ∈ {1, 4, 16, 64}; next
  to it, the 4d bytes that a data-parallel first-order method (DP-SGD with DDP) all-reduces.
* ``scaling``: seconds per step of a small sequence classifier (each record: 16 tokens of
  dimension 128 through a per-token MLP 128-512-512, mean-pooled, linear head to 2 classes; 330k
  float32 parameters; like a transformer, the forward cost grows with tokens × parameters),
  K = 8, σ = 1, c = 1, a fixed global batch of 64 records split across the ranks (record i on
  rank i mod W), in three set-ups, each in fresh processes: one process without a process group,
  one process in a world-1 gloo group (the cost of the collectives without a peer), and two
  processes. For each: the median step (wall clock, and CPU time of the process), the median
  step with an empty batch on every rank (the work every rank repeats whatever the batch:
  regenerating the 4K directions, plus the collectives), and the median time of the three
  collectives alone. On a loaded machine the wall clock of 2 processes mostly measures the
  competition for cores; the CPU time per step shows how the work divides, i.e. what the wall
  clock would be with one free core per process.

Run: ``python -m benchmarks.distributed`` → ``benchmarks/results/distributed.json`` and
``.png``. ``--quick``: fewer sizes and steps (smoke test, ``distributed_quick.json``).
The machine has 2 cores shared with other work: 2 processes compete with everything else, so the
speed-up measured here is a lower bound on what 2 dedicated cores or GPUs give.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import torch  # noqa: E402  (after the thread settings)

from benchmarks._common import RESULTS, machine, write_json  # noqa: E402
from zoprivacy.optim.algorithm import clip_rows  # noqa: E402

SIZES = (1_000, 100_000, 1_000_000)
KS = (1, 4, 16, 64)
SCALING_K = 8
GLOBAL_BATCH = 64
TOKENS = 16
DIM = 128
WIDTH = 512


# ---------------------------------------------------------------------- workers
def _worker(task: str, rank: int, world: int, out_dir: str, args: dict[str, Any]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    out = Path(out_dir)
    result: dict[str, Any] = {}
    try:
        if args.get("group", True):
            dist.init_process_group(
                "gloo",
                init_method=f"file://{out / 'store'}",
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=120),
            )
        result = {"bytes": _bytes_task, "scaling": _scaling_task}[task](rank, world, args)
        if args.get("group", True):
            dist.barrier()
            dist.destroy_process_group()
    except BaseException as exc:  # reported by the parent
        result = {"error": f"{type(exc).__name__}: {exc}"}
    (out / f"{task}-{rank}.json").write_text(json.dumps(result))


def _launch(task: str, world: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=_worker, args=(task, r, world, tmp, args)) for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        results = [json.loads((Path(tmp) / f"{task}-{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(results):
        if "error" in res:
            raise RuntimeError(f"{task} rank {r}: {res['error']}")
    return results


def _group(args: dict[str, Any]) -> Any:
    import torch.distributed as dist

    return dist.group.WORLD if args.get("group", True) else None


def _bytes_task(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    from zoprivacy import DPAggZO

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=gen), torch.randn(16, generator=gen)
    mine = torch.arange(rank, 16, world)
    rows = []
    for d in args["sizes"]:
        theta = torch.zeros(d, requires_grad=True)
        for k in args["ks"]:
            opt = DPAggZO([theta], 1e-3, num_directions=k, clip_norm=1.0, noise_multiplier=1.0,
                          expected_batch_size=16.0, seed=1, process_group=_group(args))  # fmt: skip
            opt.step(lambda theta=theta: (x[mine] @ theta[:8] - y[mine]) ** 2)
            dp = opt.data_parallel
            rows.append(
                {
                    "params": d,
                    "K": k,
                    "bytes_per_step": dp.last_step_bytes,
                    "collectives_per_step": dp.last_step_collectives,
                    "setup_bytes": dp.setup_bytes,
                    "ddp_gradient_bytes": 4 * d,
                }
            )
    return {"rows": rows}


class TokenMLP(torch.nn.Module):
    """Per-token MLP, mean-pooled over the tokens, then a linear head (a tiny stand-in for a
    transformer classifier: forward FLOPs ≈ 2 · tokens · parameters per record)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(DIM, WIDTH),
            torch.nn.Tanh(),
            torch.nn.Linear(WIDTH, WIDTH),
            torch.nn.Tanh(),
        )
        self.head = torch.nn.Linear(WIDTH, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=1))


def _model() -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TokenMLP().eval()


def _scaling_task(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    import torch.nn.functional as F

    from zoprivacy import DPAggZO

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, TOKENS, DIM, generator=gen)
    y = torch.randint(0, 2, (GLOBAL_BATCH,), generator=gen)
    mine = torch.arange(rank, GLOBAL_BATCH, world)
    xb, yb = x[mine], y[mine]
    model = _model()
    opt = DPAggZO(model.parameters(), 1e-3, num_directions=SCALING_K, clip_norm=1.0,
                  noise_multiplier=1.0, expected_batch_size=float(GLOBAL_BATCH), seed=2,
                  process_group=_group(args))  # fmt: skip

    def full() -> torch.Tensor:
        return F.cross_entropy(model(xb), yb, reduction="none")

    def empty() -> torch.Tensor:
        return torch.zeros(0)

    def timed(closure: Any, steps: int) -> tuple[list[float], list[float]]:
        wall, cpu = [], []
        for _ in range(steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            opt.step(closure)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        return wall, cpu

    steps = args["steps"]
    timed(full, 2)  # warm-up
    step_times, step_cpu = timed(full, steps)
    empty_times, empty_cpu = timed(empty, steps)
    forward_times = []
    with torch.no_grad():
        for _ in range(steps):
            start = time.perf_counter()
            full()
            forward_times.append(time.perf_counter() - start)
    comm_times = []
    dp = opt.data_parallel
    if dp is not None:
        agg = torch.zeros(len(mine), SCALING_K, dtype=torch.float64)
        clipped = clip_rows(agg, opt.clip_norm)
        fingerprint = opt.config_fingerprint()
        params = [p for p in model.parameters() if p.requires_grad]
        for _ in range(5 * steps):
            start = time.perf_counter()
            summed = dp.reduce(
                opt.steps_taken, agg, clipped, 0.0, fingerprint=fingerprint, params=params
            )[0]
            dp.release(opt.steps_taken, summed, None)
            comm_times.append(time.perf_counter() - start)
    return {
        "records_per_rank": len(mine),
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": statistics.median(step_times),
        "step_cpu_s": statistics.median(step_cpu),
        "empty_step_s": statistics.median(empty_times),
        "empty_step_cpu_s": statistics.median(empty_cpu),
        "forward_s": statistics.median(forward_times),
        "collectives_s": statistics.median(comm_times) if comm_times else 0.0,
        "bytes_per_step": dp.last_step_bytes if dp is not None else 0,
    }


# ---------------------------------------------------------------------- main
def run(quick: bool) -> dict[str, Any]:
    sizes, ks = (SIZES[:2], KS[:2]) if quick else (SIZES, KS)
    steps = 3 if quick else 10
    load_before = os.getloadavg()
    start = time.perf_counter()
    bytes_rows = _launch("bytes", 2, {"sizes": list(sizes), "ks": list(ks)})[0]["rows"]
    scaling = {
        "1 process, no group": _launch("scaling", 1, {"steps": steps, "group": False})[0],
        "1 process, gloo group": _launch("scaling", 1, {"steps": steps})[0],
        "2 processes, gloo group": _launch("scaling", 2, {"steps": steps}),
    }
    two = scaling["2 processes, gloo group"]
    one = scaling["1 process, no group"]
    slowest = max(r["step_s"] for r in two)
    summary = {
        "speedup_2_over_1": one["step_s"] / slowest,
        "cpu_time_speedup_2_over_1": one["step_cpu_s"] / max(r["step_cpu_s"] for r in two),
        "ideal_speedup_given_replicated_work": one["step_s"]
        / (one["empty_step_s"] + (one["step_s"] - one["empty_step_s"]) / 2),
        "replicated_share_of_1_process_step": one["empty_step_s"] / one["step_s"],
    }
    return {
        "benchmark": "distributed",
        "machine": machine(),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "wall_s": time.perf_counter() - start,
        "bytes_formula": "(4K + 15) * 8 bytes of float64 per rank per step, 3 collectives",
        "bytes": bytes_rows,
        "scaling_setting": {
            "model": f"per-token MLP {DIM}-{WIDTH}-{WIDTH}, mean pool, head {WIDTH}-2, float32",
            "tokens_per_record": TOKENS,
            "K": SCALING_K,
            "global_batch": GLOBAL_BATCH,
            "timed_steps": steps,
            "threads_per_process": 1,
        },
        "scaling": scaling,
        "summary": summary,
    }


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = payload["bytes"]
    for d in sorted({r["params"] for r in rows}):
        sel = [r for r in rows if r["params"] == d]
        left.plot([r["K"] for r in sel], [r["bytes_per_step"] for r in sel], "o-",
                  label=f"DP-AggZO, d = {d:.0e}")  # fmt: skip
        left.axhline(4 * d, ls=":", color="gray")
        left.text(1, 4 * d * 1.15, f"DDP gradient, d = {d:.0e}", fontsize=7, color="gray")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("K (directions)")
    left.set_ylabel("bytes per rank per step")
    left.set_title("Communication per step (2 gloo processes)")
    left.legend(fontsize=7)

    names = list(payload["scaling"])
    width = 0.38
    for i, name in enumerate(names):
        res = payload["scaling"][name]
        res = max(res, key=lambda r: r["step_s"]) if isinstance(res, list) else res
        for shift, suffix, alpha, label in ((-width / 2, "", 0.45, "wall clock"),
                                            (width / 2, "_cpu", 1.0, "CPU time")):  # fmt: skip
            total, floor = res[f"step{suffix}_s"], res[f"empty_step{suffix}_s"]
            first = i == 0
            right.bar(i + shift, floor, width, color="tab:orange", alpha=alpha,
                      label=f"empty-batch step ({label})" if first else None)  # fmt: skip
            right.bar(i + shift, total - floor, width, bottom=floor, color="tab:blue",
                      alpha=alpha, label=f"rest of step ({label})" if first else None)  # fmt: skip
    pos = range(len(names))
    right.set_xticks(list(pos), [n.replace(", ", "\n") for n in names], fontsize=8)
    right.set_ylabel("seconds per step (median, slowest rank)")
    setting = payload["scaling_setting"]
    right.set_title(f"330k-parameter token classifier, K = {setting['K']}, 2 shared CPU cores",
                    fontsize=9)  # fmt: skip
    right.legend(fontsize=7, loc="upper right", title="orange: repeated on every rank",
                 title_fontsize=7)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: fewer sizes and steps")
    args = parser.parse_args()
    payload = run(args.quick)
    name = "distributed_quick" if args.quick else "distributed"
    path = write_json(f"{name}.json", payload)
    plot(payload, RESULTS / f"{name}.png")
    print(json.dumps(payload["summary"], indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
