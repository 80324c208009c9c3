"""Data-parallel private training with DP-AggZO under torchrun (CPU with gloo, GPUs with NCCL).

    torchrun --nproc_per_node=2 examples/distributed_train.py
    torchrun --nproc_per_node=8 examples/distributed_train.py --steps 200   # one 8-GPU node

Every rank builds the same model (same seed) and passes the *whole* data set to
``make_private(..., process_group=...)``: rank 0 releases the noisy dataset size once, every rank
gets the same σ and b, and each rank's loader yields its own part of every Poisson batch (records
i with i mod world_size == rank). The closure returns the losses of this rank's records only;
the optimizer sums the clipped K-vectors over the ranks, rank 0 draws the noise, and every rank
applies the same update, with O(K) floats of communication per step. Only rank 0 prints and
writes the checkpoint, which resumes on any number of processes (``--resume``).
"""

from __future__ import annotations

import argparse
import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from zoprivacy import is_empty_batch, make_private


def synthetic(n: int, seed: int) -> TensorDataset:
    """A linearly separable two-class problem in 16 dimensions (a stand-in for real data)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, generator=torch.Generator().manual_seed(0))
    x = torch.randn(n, 16, generator=g)
    return TensorDataset(x, (x @ w > 0).long())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument("--checkpoint", default=None, help="write the run here (rank 0)")
    parser.add_argument("--resume", default=None, help="resume from this checkpoint")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a peer is "
                        "declared gone")  # fmt: skip
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    rank = dist.get_rank()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)

    train, test = synthetic(4096, seed=1), synthetic(1024, seed=2)
    torch.manual_seed(0)  # the same initial weights on every rank (checked by the optimizer)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 2)).to(device).eval()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # calibration notes, printed by rank 0
        run = make_private(
            model,
            train,
            target_epsilon=args.epsilon,
            target_delta=1e-5,
            steps=args.steps,
            num_directions=8,
            clip_norm=1.0,
            lr=0.5,
            expected_batch_size=512,
            checkpoint=args.resume,
            # Data-parallel runs keep no journal. This example checkpoints only when its run has
            # ended, so no release can follow the checkpoint; resuming says so with journal=False.
            journal=False,
            process_group=dist.group.WORLD,
        )

    def accuracy() -> float:
        with torch.no_grad():
            x, y = (t.to(device) for t in test.tensors)
            return (model(x).argmax(dim=1) == y).float().mean().item()

    before = accuracy()
    if rank == 0:
        print(
            f"world size {dist.get_world_size()}, σ = {run.plan.noise_multiplier:.3f}, "
            f"q = {run.sample_rate:.4f}, b = q·ñ = {run.expected_batch_size:.1f}, "
            f"steps left {run.steps_left}",
            flush=True,
        )

    for batch in run.loader:

        def closure(batch=batch) -> torch.Tensor:
            if is_empty_batch(batch):  # this rank has no record in this step: still take part
                return torch.zeros(0, device=device)
            x, y = (t.to(device) for t in batch)
            return F.cross_entropy(model(x), y, reduction="none")

        stats = run.optimizer.step(closure)
        if rank == 0 and (stats.step + 1) % 20 == 0:
            print(f"step {stats.step + 1}: ε spent {run.epsilon_spent():.3f}", flush=True)

    if args.checkpoint:
        run.save(args.checkpoint)  # rank 0 writes; the other ranks return at once
    if rank == 0:
        dp = run.optimizer.data_parallel
        print(
            f"done: {run.steps_done} steps, ε spent {run.epsilon_spent():.3f} (δ = 1e-5), "
            f"held-out accuracy {before:.3f} -> {accuracy():.3f}, "
            f"{dp.last_step_bytes} bytes per step in {dp.last_step_collectives} collectives",
            flush=True,
        )
    # Leave together: a rank that tears its gloo group down while rank 0 is still saving and
    # evaluating can abort at exit ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
