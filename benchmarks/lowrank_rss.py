"""Peak RSS across consecutive low-rank steps (the glibc heap growth found on 2026-12-08).

Four DP-AggZO steps (K = ``--k``, fresh optimizer each, low-rank and Rademacher directions) of
full SmolLM2 fine-tuning on ``--batch`` prompts, one thread; per step: process CPU seconds, minor
page faults and the process's peak RSS so far. Run once as is and once with
``MALLOC_MMAP_THRESHOLD_=65536`` (every allocation above 64 KiB mmapped, so the heap cannot
retain freed memory): growth that vanishes there is glibc heap retention, not live tensors.

    python -m benchmarks.lowrank_rss --tag default
    MALLOC_MMAP_THRESHOLD_=65536 python -m benchmarks.lowrank_rss --tag mmap_threshold_64k
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from benchmarks import step_time_paths as stp
from benchmarks._common import RESULTS, machine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--paths", nargs="+", default=["hooks_lowrank", "hooks_rademacher"])
    parser.add_argument("--tag", required=True)
    parser.add_argument("--out", default=str(RESULTS / "direction_kinds"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    work = stp.smollm2_workload(batch_size=args.batch)
    stp.set_trainable(work.model, None)
    params = [p for p in work.model.parameters() if p.requires_grad]
    closure = work.closure()
    rows = []
    for path in args.paths:
        for step in range(4):
            opt = stp.make_optimizer(path, params, args.k, work.batch_size)
            before = resource.getrusage(resource.RUSAGE_SELF)
            seconds, _ = stp.cpu_time(lambda o=opt: o.step(closure))
            after = resource.getrusage(resource.RUSAGE_SELF)
            rows.append({
                "path": path, "step": step, "cpu_seconds": seconds,
                "minor_faults": after.ru_minflt - before.ru_minflt,
                "peak_rss_mib": after.ru_maxrss / 1024,
            })  # fmt: skip
            print(rows[-1], flush=True)
    payload = {
        "machine": machine(),
        "method": __doc__,
        "env": {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_")},
        "config": {"k": args.k, "batch": args.batch, "model": work.name},
        "rows": rows,
    }
    path = os.path.join(args.out, f"lowrank_rss_{args.tag}.json")
    with open(path, "w") as f:
        f.write(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
