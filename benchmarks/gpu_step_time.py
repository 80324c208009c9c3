"""Step time over 2K forward passes on a GPU, for each direction kind (issue 16).

For each packaged model (MiniLM classifier, SmolLM2 prompt classifier; ``--models``), each dtype
(bf16 and fp32; ``--dtypes``) and each direction configuration below, with full fine-tuning (all
parameters trainable), expected batch 16 and K = 16 on the default (zero-drift) perturbation
path, this measures the median wall time of one DP-AggZO step and of one forward pass (the
closure), and reports ``step_over_2k_forward`` = step / (2K × forward) with the generation count
per step from :attr:`zoprivacy.StepStats.generations`:

====================  ================================================  ========================
row                   configuration                                     generations per step
====================  ================================================  ========================
``gaussian``          ``DPAggZO()``                                     3K·n
``rademacher``        ``DPAggZO(directions="rademacher")``              3K·n
``lowrank``           ``DPAggZO(directions="lowrank", direction_rank=2)``  K·n
``gaussian_buffer``   ``DPAggZO(direction_buffer=True)``                2K·n
====================  ================================================  ========================

(n trainable tensors; a central step on the substitution path.) Timings are wall clock with
``torch.cuda.synchronize()`` before and after each timed call (the step reads its losses back to
the CPU anyway), after one warm-up step per configuration (path discovery, kernel caches). Each
configuration's steps are followed by forward passes in the same window; the forward time is the
median over all of them. The whole run is expected to take 1-3 minutes on one H100 (an estimate:
it has not run on a GPU yet; the first SmolLM2 load converts the packaged GGUF file, 20-40 s).

Run: ``python -m benchmarks.gpu_step_time --output DIR`` → ``DIR/gpu_step_time.json`` (device
name, torch and CUDA versions, one row per model × dtype × configuration). ``--quick``: a tiny
MLP on the CPU, K = 2, batch 4 (a smoke test, ``gpu_step_time_quick.json``). The data are public
(Rotten Tomatoes sentences), so the timings may be published.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402  (after the thread settings)

from benchmarks._common import RESULTS, machine  # noqa: E402
from benchmarks.step_time_paths import (  # noqa: E402
    Workload,
    minilm_workload,
    set_trainable,
    smollm2_workload,
    tiny_workload,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "gaussian": {},
    "rademacher": {"directions": "rademacher"},
    "lowrank": {"directions": "lowrank", "direction_rank": 2},
    "gaussian_buffer": {"direction_buffer": True},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODELS: dict[str, Callable[[int], Workload]] = {
    "minilm": lambda batch: minilm_workload(batch_size=batch),
    "smollm2": lambda batch: smollm2_workload(batch_size=batch),
}
CLIP, SIGMA, PHI, LR = 1.0, 1.0, 1e-3, 1e-7


def device_facts(device: torch.device) -> dict[str, Any]:
    """The device's name and the software that drives it (public)."""
    if device.type != "cuda":
        return {"type": device.type, "name": platform.processor() or platform.machine()}
    props = torch.cuda.get_device_properties(device)
    return {
        "type": "cuda",
        "name": torch.cuda.get_device_name(device),
        "capability": list(torch.cuda.get_device_capability(device)),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` with the device synchronised on both sides, and its result."""
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def on_device(work: Workload, device: torch.device, dtype: torch.dtype) -> Workload:
    """``work`` with its model (all parameters trainable) and batch on ``device`` in ``dtype``.

    A packaged model's loss is ``functools.partial(fn, model, ...)``: a copy of the model is
    moved and bound. The quick MLP's loss closes over its model, which is moved in place (and
    its float inputs cast to ``dtype``)."""
    losses = work.losses
    bound = isinstance(losses, functools.partial)
    model = copy.deepcopy(work.model) if bound else work.model
    model = model.to(device=device, dtype=dtype).eval()
    set_trainable(model, None)
    if bound:
        losses = functools.partial(losses.func, model, *losses.args[1:], **losses.keywords)

    def move(v: Any) -> Any:
        if not torch.is_tensor(v):
            return v
        cast = not bound and v.is_floating_point()
        return v.to(device=device, dtype=dtype) if cast else v.to(device)

    batch = {k: move(v) for k, v in work.batch.items()}
    return Workload(work.name, model, batch, losses, work.extra)


def measure(
    work: Workload, name: str, k: int, repeats: int, device: torch.device
) -> tuple[dict[str, Any], list[float]]:
    """One configuration: warm-up step, then ``repeats`` × (step, 2 forwards); the row and the
    forward times of this window."""
    from zoprivacy import DPAggZO, PredictableNoiseWarning

    warnings.simplefilter("ignore", PredictableNoiseWarning)  # noise_seed=0: timing only
    params = [p for p in work.model.parameters() if p.requires_grad]
    opt = DPAggZO(
        params, LR, num_directions=k, clip_norm=CLIP, noise_multiplier=SIGMA,
        expected_batch_size=work.batch_size, perturbation_scale=PHI, seed=0, noise_seed=0,
        **CONFIGS[name],
    )  # fmt: skip
    closure = work.closure()
    opt.step(closure)  # warm-up: path discovery, kernel and allocator caches
    steps, forwards, stats = [], [], None
    with torch.no_grad():
        for _ in range(repeats):
            seconds, stats = timed(lambda: opt.step(closure), device)
            steps.append(seconds)
            forwards += [timed(closure, device)[0] for _ in range(2)]
    assert stats is not None
    row = {
        "directions": name,
        "options": CONFIGS[name],
        "step_seconds": statistics.median(steps),
        "step_seconds_all": steps,
        "generations_per_step": stats.generations,
        "perturbation_path": stats.perturbation_path,
        "trainable_tensors": len(params),
    }
    return row, forwards


def run_model(
    work: Workload, model_key: str, dtype_key: str, args: argparse.Namespace, device: torch.device
) -> list[dict[str, Any]]:
    """Every configuration on one model and dtype; ratios against this run's forward median."""
    moved = on_device(work, device, DTYPES[dtype_key])
    with torch.no_grad():
        forwards = [timed(moved.closure(), device)[0] for _ in range(3)][1:]  # first: warm-up
    rows = []
    for name in args.configs:
        row, window = measure(moved, name, args.k, args.repeats, device)
        forwards += window
        rows.append(row)
    forward = statistics.median(forwards)
    params = sum(p.numel() for p in moved.model.parameters())
    for row in rows:
        row.update(model=model_key, workload=work.name, dtype=dtype_key, parameters=params,
                   forward_seconds=forward,
                   step_over_2k_forward=row["step_seconds"] / (2 * args.k * forward))  # fmt: skip
    del moved
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for the JSON")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--batch-size", type=int, default=16, help="records per step (16)")
    parser.add_argument("-k", "--k", type=int, default=16, help="directions K (16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per config (3)")
    parser.add_argument("--quick", action="store_true", help="tiny MLP on the CPU (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.k, args.repeats, args.batch_size = "cpu", 2, 2, 4
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_step_time: no CUDA device (use --quick for the CPU smoke run)")
    started = time.perf_counter()
    loaders = {"mlp": lambda _batch: tiny_workload()} if args.quick else MODELS
    keys = ["mlp"] if args.quick else args.models
    rows: list[dict[str, Any]] = []
    for key in keys:
        work = loaders[key](args.batch_size)
        for dtype_key in args.dtypes:
            rows += run_model(work, key, dtype_key, args, device)
            last = rows[-len(args.configs) :]
            ratios = ", ".join(f"{r['directions']} {r['step_over_2k_forward']:.2f}x" for r in last)
            print(f"{key} {dtype_key}: {ratios}", flush=True)
        del work
    payload = {
        "benchmark": "gpu_step_time",
        "device": device_facts(device),
        "torch": torch.__version__,
        "machine": machine(),
        "num_directions": args.k,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "trainable": "all parameters (full fine-tuning)",
        "clock": "wall, device synchronised around each timed call",
        "seconds_total": time.perf_counter() - started,
        "rows": rows,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / ("gpu_step_time_quick.json" if args.quick else "gpu_step_time.json")
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
