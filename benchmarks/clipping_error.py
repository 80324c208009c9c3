"""Clipping error of DP-AggZO against K (the paper's Figures 3 and 4, eqs. 26 and 27).

For one batch of real training records and a fixed checkpoint, each record's aggregated
zeroth-order vector Δ_agg(x) = (1/K)(Δ_1(x), …, Δ_K(x)) is clipped at c = β/√K, and the
optimizer's own diagnostics give

* the maximum individual clipping error max_x ‖Δ_agg(x) − Δ̂_agg(x)‖/‖Δ_agg(x)‖ (eq. 26), and
* the batch clipping error ‖Σ_x (Δ_agg(x) − Δ̂_agg(x))‖/‖Σ_x Δ_agg(x)‖ (eq. 27),

for K in {1, 2, 4, …, 256} and a few β. The model is the packaged MiniLM with only the
classification head perturbed, read from the frozen-prefix cache of
:mod:`benchmarks.utility` (BBC News, the public split of seed 0). Two checkpoints: the freshly
initialised head (seed 0) and the same head after a short non-private AdamW fine-tune on the
training split (the "fine-tuned" checkpoint the paper's figures start from is a pre-trained
model; here the body is pre-trained and the head is not, so both ends are shown).

Each point is the mean (and min/max) over ``--direction-seeds`` draws of the K directions;
the step runs with lr = 0, σ = 0 (nothing is updated or released: these are non-private
diagnostics of one batch and are not covered by any DP guarantee).

    python -m benchmarks.clipping_error           # ~1 min after utility's feature cache exists
    python -m benchmarks.clipping_error --quick --out /tmp/c
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._common import RESULTS, machine
from benchmarks.utility import PER_CLASS_TRAIN, VALIDATION_SIZE, TaskFeatures

KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BETAS = (0.2, 0.8, 3.2)


def finetune_head(feats: TaskFeatures, steps: int, lr: float, seed: int) -> float:
    """Non-private AdamW on the head (mini-batches of 64); returns the test accuracy."""
    clf = feats.classifier
    head = clf.model.classifier
    head.load_state_dict(feats.initial_head(seed))
    train = feats.features["train"]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    n = train["labels"].shape[0]
    for _ in range(steps):
        idx = torch.randint(n, (64,), generator=gen)
        logits = head(train["hidden"][idx])
        loss = F.cross_entropy(logits, train["labels"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return feats.accuracy("test")


def clip_errors(
    feats: TaskFeatures, batch: dict[str, torch.Tensor], k: int, beta: float, seed: int
) -> dict[str, float]:
    from zoprivacy.optim.optimizer import DPAggZO

    clf = feats.classifier
    clf.model.eval()
    params = clf.trainable_parameters()
    before = [p.detach().clone() for p in params]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = DPAggZO(
            params,
            lr=0.0,
            num_directions=k,
            clip_norm=beta / math.sqrt(k),
            noise_multiplier=0.0,
            expected_batch_size=float(batch["labels"].shape[0]),
            seed=seed,
        )
        stats = opt.step(lambda: clf.losses(batch))
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b), "lr = 0 must leave the head unchanged"
    return {
        "batch_clip_error": stats.batch_clip_error,
        "max_clip_error": stats.max_clip_error,
        "clip_fraction": stats.clip_fraction,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clipping_error")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--task", default="bbc_news")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--direction-seeds", type=int, default=5)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/zoprivacy-utility-cache"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.monotonic()
    ks, betas, name = KS, BETAS, "clipping_error"
    if args.quick:
        feats = TaskFeatures(
            "rotten_tomatoes",
            per_class_train=8,
            validation_size=8,
            test_size=16,
            max_length=32,
            cache_dir=None,
        )
        ks, betas, name = (1, 4), (0.8,), "clipping_error_quick"
        args.batch, args.direction_seeds, args.finetune_steps = 8, 1, 2
    else:
        feats = TaskFeatures(
            args.task,
            per_class_train=PER_CLASS_TRAIN,
            validation_size=VALIDATION_SIZE[args.task],
            test_size=None,
            max_length=None,
            cache_dir=args.cache_dir,
        )
    train = feats.features["train"]
    gen = torch.Generator().manual_seed(1234)
    idx = torch.randperm(train["labels"].shape[0], generator=gen)[: args.batch]
    batch = {"hidden": train["hidden"][idx].clone(), "labels": train["labels"][idx].clone()}

    rows: list[dict[str, Any]] = []
    checkpoints = {}
    for checkpoint in ("initial", "finetuned"):
        clf = feats.classifier
        if checkpoint == "initial":
            clf.model.classifier.load_state_dict(feats.initial_head(0))
            acc = feats.accuracy("test")
        else:
            acc = finetune_head(feats, args.finetune_steps, 0.01, 0)
        checkpoints[checkpoint] = {
            "test_accuracy": acc,
            "description": "fresh head, seed 0"
            if checkpoint == "initial"
            else f"head after {args.finetune_steps} non-private AdamW steps (lr 0.01, batch 64)",
        }
        for beta in betas:
            for k in ks:
                draws = [clip_errors(feats, batch, k, beta, s) for s in range(args.direction_seeds)]
                row: dict[str, Any] = {"checkpoint": checkpoint, "beta": beta, "K": k}
                row["clip_norm"] = beta / math.sqrt(k)
                for key in ("batch_clip_error", "max_clip_error", "clip_fraction"):
                    values = [d[key] for d in draws]
                    row[key] = sum(values) / len(values)
                    row[key + "_min"] = min(values)
                    row[key + "_max"] = max(values)
                rows.append(row)
                print(
                    f"{checkpoint:9s} β={beta:<4g} K={k:<4d} batch {row['batch_clip_error']:.4f} "
                    f"max {row['max_clip_error']:.4f} clipped {row['clip_fraction']:.2f}"
                )
    payload = {
        "machine": machine(),
        "config": {
            "task": feats.task,
            "model": "minilm (classification head perturbed; frozen-prefix cache)",
            "batch": args.batch,
            "batch_indices_seed": 1234,
            "ks": list(ks),
            "betas": list(betas),
            "clip_norm": "beta / sqrt(K)",
            "direction_seeds": args.direction_seeds,
            "perturbation_scale": 1e-3,
            "checkpoints": checkpoints,
            "wall_seconds": time.monotonic() - started,
            "warning": "non-private diagnostics of one private batch (no noise)",
        },
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    plot(rows, ks, betas, args.out / f"{name}.png")
    return 0


def plot(rows: list[dict[str, Any]], ks, betas, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"initial": "--", "finetuned": "-"}
    for ax, key, title in (
        (axes[0], "batch_clip_error", "batch clipping error (eq. 27)"),
        (axes[1], "max_clip_error", "max individual clipping error (eq. 26)"),
    ):
        for i, beta in enumerate(betas):
            for checkpoint, style in styles.items():
                sel = [r for r in rows if r["beta"] == beta and r["checkpoint"] == checkpoint]
                if not sel:
                    continue
                ax.plot(
                    [r["K"] for r in sel],
                    [r[key] for r in sel],
                    style,
                    marker="o",
                    color=f"C{i}",
                    label=f"β={beta:g}, {checkpoint}",
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (clip norm β/√K)")
        top = max([1.0] + [r[key] for r in rows if math.isfinite(r[key])])
        ax.set_ylim(-0.02, top + 0.05)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
