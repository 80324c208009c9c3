"""Cost of one Gaussian direction pass over every trainable tensor of a packaged model.

One pass regenerates z_k for all tensors, as the update does once per direction (the probe
does it twice). Three generators, timed in interleaved rounds on the same buffers:

* ``whole_tensor``: direction stream v1, one ``torch.randn`` per tensor from its seed (what
  zoprivacy did before the chunked generator; serial whatever the thread count);
* ``chunked_1``: the current stream (:data:`zoprivacy.optim.directions.GAUSSIAN_CHUNK`-value chunks,
  each seeded separately) with one generation thread;
* ``chunked_N``: the same values with ``N`` = ``--threads`` generation threads.

Clock: wall time (several threads), medians of ``--repeats`` rounds, load average stored.
Writes ``results/generation.json``.

Run: ``python -m benchmarks.generation [--models minilm smollm2] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import RESULTS, machine


def _shapes(model: str) -> list[torch.Size]:
    from zoprivacy.tasks.packaged import load_minilm_classifier, load_smollm2

    if model == "minilm":
        net, _ = load_minilm_classifier(2, seed=0)
    else:
        net, _ = load_smollm2()
    return [p.shape for p in net.parameters()]


def run(model: str, threads: int, repeats: int) -> dict[str, Any]:
    from benchmarks._directions import scratch_buffers
    from zoprivacy.optim.directions import DirectionStream, set_generation_threads

    tensors = [torch.empty(shape) for shape in _shapes(model)]
    scratch = scratch_buffers(tensors)
    buf = scratch[torch.device("cpu")]
    stream = DirectionStream(tensors, seed=1, step=0)
    gen = torch.Generator()

    def whole_tensor() -> None:
        for index, seed in enumerate(stream.seeds(0)):
            view = stream.view(buf, index)
            gen.manual_seed(seed)
            torch.randn(view.shape, generator=gen, out=view)

    def chunked() -> None:
        for _ in stream.iter(0, scratch):
            pass

    configs = {"whole_tensor": (whole_tensor, 1), "chunked_1": (chunked, 1)}
    configs[f"chunked_{threads}"] = (chunked, threads)
    times: dict[str, list[float]] = {name: [] for name in configs}
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    try:
        for fn, n in configs.values():  # warm-up (page faults, pool start)
            set_generation_threads(n)
            fn()
        for _ in range(repeats):
            for name, (fn, n) in configs.items():
                set_generation_threads(n)
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    finally:
        set_generation_threads(None)
        torch.set_num_threads(1)
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["whole_tensor"]
    return {
        "model": model,
        "values": sum(t.numel() for t in tensors),
        "tensors": len(tensors),
        "threads": threads,
        "repeats": repeats,
        "seconds": med,
        "all_seconds": times,
        "over_whole_tensor": {name: v / base for name, v in med.items()},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", help="output folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        row = run(model, args.threads, args.repeats)
        rows.append(row)
        print(
            f"[{model}] {row['values'] / 1e6:.1f}M values: "
            + "  ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row["seconds"].items()),
            flush=True,
        )
    payload = {"machine": machine(), "method": __doc__, "rows": rows}
    target = out / "generation.json"
    target.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
