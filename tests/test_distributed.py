"""Data-parallel DP-AggZO on torch.distributed: 2 gloo processes on the CPU.

Each multi-process test starts two spawned workers (one thread each) that join a gloo group
through a FileStore in ``tmp_path``, run a scenario, and write their results to ``tmp_path``;
the test process checks them against a single-process run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

from tests.conftest import seeded_mlp
from zoprivacy import DPAggZO, MagnitudeMask, RandomMask, Stagewise, is_empty_batch, make_private
from zoprivacy.data.poisson import PredictableSamplingWarning
from zoprivacy.distributed import DataParallel, DistributedPoissonSampler, parameter_digest

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TIMEOUT_S = 20  # process-group timeout of the workers
N = 48
# Global batches of the equality scenario. Record i belongs to rank i % 2: step 1 leaves rank 1
# empty, step 2 is empty on both ranks, step 4 leaves rank 0 empty.
BATCHES = [list(range(12)), [0, 2, 4, 6], [], [1, 3, 5, 7, 8, 13], [9, 11, 21]]
DP_CONFIG = dict(
    lr=0.05,
    num_directions=4,
    clip_norm=4.0,
    noise_multiplier=0.7,
    expected_batch_size=6.0,
    seed=11,
    noise_seed=123,
    weight_decay=0.01,
)
MEZO_CONFIG = dict(lr=0.01, num_directions=2, clip_norm=None, noise_multiplier=0.0, seed=7)
PRIVATE_ARGS = dict(
    target_epsilon=4.0,
    target_delta=1e-5,
    steps=10,
    num_directions=2,
    clip_norm=1.0,
    lr=0.05,
    sample_rate=0.25,
    seed=5,
)


# Per option: (rank 0's, rank 1's) DPAggZO keywords that differ in that option only.
_OPTION_MISMATCHES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "directions": ({}, {"directions": "rademacher"}),
    "difference": ({}, {"difference": "forward"}),
    "perturbation": ({}, {"perturbation": "inplace"}),
    "batched_directions": ({}, {"batched_directions": 2}),
    "mask": ({"mask": MagnitudeMask(0.5)}, {"mask": MagnitudeMask(0.25)}),
    "schedule": (
        {"num_directions": Stagewise([3], [4, 2])},
        {"num_directions": Stagewise([2], [4, 2])},
    ),
}


# ---------------------------------------------------------------------- shared model and data
def _data(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    return x, x @ w + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)


def _model() -> torch.nn.Module:
    """float64, so that the finite differences (loss rounding × 1/(2φ)) are exact enough to
    compare runs whose forward passes see different batch compositions."""
    return seeded_mlp(5, 8, 1, seed=1, dtype=torch.float64)


def _losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).squeeze(-1) - y) ** 2


def _batch_losses(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    if is_empty_batch(batch):
        return torch.zeros(0)
    x, y = batch
    return _losses(model, x, y)


def _run_steps(
    config: dict[str, Any], batches: list[list[int]], process_group: Any = None
) -> tuple[torch.nn.Module, DPAggZO, list[Any], list[int]]:
    """Steps on ``batches`` (each rank keeps its own records); counts the noise draws."""
    x, y = _data()
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = DPAggZO(model.parameters(), process_group=process_group, **config)
    draws = [0]
    add_noise = opt._noise.add_noise  # the optimizer releases S through NoiseSource.add_noise

    def counted(values: torch.Tensor, std: float, **kwargs: Any) -> torch.Tensor:
        draws[0] += 1
        return add_noise(values, std, **kwargs)

    opt._noise.add_noise = counted
    rank, world = (0, 1) if process_group is None else (dist.get_rank(), dist.get_world_size())
    stats = []
    for batch in batches:
        mine = torch.tensor([i for i in batch if i % world == rank], dtype=torch.long)
        stats.append(opt.step(lambda mine=mine: _losses(model, x[mine], y[mine])))
    return model, opt, stats, draws


def _stats_dict(stats: list[Any]) -> list[dict[str, Any]]:
    keys = ("noisy_sum", "batch_size", "loss", "clip_fraction", "batch_clip_error")
    return [{k: getattr(s, k) for k in (*keys, "max_clip_error", "normalizer")} for s in stats]


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------------- worker scenarios
def _scenario_equal(rank: int, out: Path, result: dict[str, Any]) -> None:
    group = dist.group.WORLD
    for name, config in (("dp", DP_CONFIG), ("mezo", MEZO_CONFIG)):
        model, opt, stats, draws = _run_steps(config, BATCHES, DataParallel(group, check_every=1))
        result[name] = {
            "params": _params(model),
            "stats": _stats_dict(stats),
            "draws": draws[0],
            "bytes": opt.data_parallel.last_step_bytes,
            "collectives": opt.data_parallel.last_step_collectives,
            "state": opt.state_dict()["zoprivacy"]["step"],
        }
    # seed=None: rank 0 draws the direction seed and every rank gets it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = DPAggZO(_model().parameters(), lr=0.1, num_directions=1, clip_norm=None,
                      noise_multiplier=0.0, process_group=group)  # fmt: skip
        result["drawn_seed"] = opt.seed
        # A rank with a different learning rate: every rank refuses to build the optimizer.
        try:
            DPAggZO(_model().parameters(), lr=0.1 + rank, num_directions=1, clip_norm=None,
                    noise_multiplier=0.0, process_group=group)  # fmt: skip
            result["config_error"] = None
        except RuntimeError as exc:
            result["config_error"] = str(exc)
        # A rank with another step recipe (directions, difference, path, mask, schedule,
        # batching): every rank refuses, before any step mixes different estimates.
        result["option_errors"] = {}
        for name, option in _OPTION_MISMATCHES.items():
            mine = option[rank]
            try:
                DPAggZO(_model().parameters(), process_group=group, **{**DP_CONFIG, **mine})
                result["option_errors"][name] = None
            except RuntimeError as exc:
                result["option_errors"][name] = str(exc)
    # Parameters that drift apart are caught by the check (on every rank).
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = DPAggZO(model.parameters(), process_group=group, **MEZO_CONFIG)
    if rank == 1:
        with torch.no_grad():
            model[0].bias[0] += 1e-6
    try:
        opt.data_parallel.verify(opt.config_fingerprint(), list(model.parameters()))
        result["desync_error"] = None
    except RuntimeError as exc:
        result["desync_error"] = str(exc)
    # make_private: two steps, a checkpoint from rank 0, a resume on the same two ranks.
    x, y = _data(64)
    for resume in (False, True):
        model = _model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = make_private(
                model,
                TensorDataset(x, y),
                sampling_generator=4,
                process_group=group,
                checkpoint=out / "run.pt" if resume else None,
                # data-parallel runs keep no journal: a resume accepts that explicitly
                journal=False if resume else None,
                **PRIVATE_ARGS,
            )
        for batch, _ in zip(run.loader, range(2), strict=False):
            run.optimizer.step(lambda m=model, b=batch: _batch_losses(m, b))
        run.save(out / "run.pt")
        dist.barrier()  # the file is complete before any rank reads it
        key = "resumed" if resume else "private"
        result[key] = {
            "steps": run.steps_done,
            "digest": parameter_digest(model.parameters()),
            "accountant": run.accountant.state_dict(),
        }


def _scenario_crash(rank: int, out: Path, result: dict[str, Any]) -> None:
    x, y = _data(64)
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = make_private(
            model,
            TensorDataset(x, y),
            sampling_generator=9,
            process_group=dist.group.WORLD,
            **PRIVATE_ARGS,
        )
    batches = iter(run.loader)
    batch = next(batches)
    run.optimizer.step(lambda: _batch_losses(model, batch))
    run.save(out / "ckpt.pt")
    result["params_1"] = _params(model)
    result["accountant_1"] = run.accountant.state_dict()
    result["noisy_n"] = run.noisy_dataset_size
    result["sigma"] = run.optimizer.noise_multiplier
    result["b"] = run.expected_batch_size

    batch = next(batches)

    def failing() -> torch.Tensor:
        if rank == 1:
            raise ValueError("bad record on rank 1")
        return _batch_losses(model, batch)

    try:
        run.optimizer.step(failing)
    except Exception as exc:
        result["clean"] = {
            "type": type(exc).__name__,
            "message": str(exc),
            "recoverable": getattr(exc, "recoverable", None),
            "peer": getattr(exc, "peer_rank", None),
        }
    result["steps_after_clean"] = run.optimizer.steps_taken
    result["digest_after_clean"] = parameter_digest(model.parameters())
    _dump(out, "crash", rank, result)  # rank 1 dies below

    def dying() -> torch.Tensor:
        if rank == 1:
            os._exit(3)
        return _batch_losses(model, batch)

    try:
        run.optimizer.step(dying)
        result["dead"] = None
    except Exception as exc:
        result["dead"] = {
            "type": type(exc).__name__,
            "message": str(exc),
            "recoverable": getattr(exc, "recoverable", None),
        }
    result["steps_after_dead"] = run.optimizer.steps_taken
    result["no_barrier"] = True


SCENARIOS: dict[str, Callable[[int, Path, dict[str, Any]], None]] = {
    "equal": _scenario_equal,
    "crash": _scenario_crash,
}


def _dump(out: Path, scenario: str, rank: int, result: dict[str, Any]) -> None:
    tmp = out / f".{scenario}-{rank}.pt"
    torch.save(result, tmp)
    os.replace(tmp, out / f"{scenario}-{rank}.pt")


def _worker(scenario: str, rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    result: dict[str, Any] = {}
    code = 0
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{out / 'store'}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=TIMEOUT_S),
        )
        SCENARIOS[scenario](rank, out, result)
        if not result.get("no_barrier"):
            dist.barrier()
    except BaseException:
        result["error"] = traceback.format_exc()
        code = 1
    _dump(out, scenario, rank, result)
    sys.stdout.flush()
    os._exit(code)  # no teardown: a dead peer must not make this process hang


def _launch(scenario: str, tmp_path: Path, limit_s: float = 90.0) -> tuple[list, list]:
    ctx = mp.get_context("spawn")
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        procs = [
            ctx.Process(target=_worker, args=(scenario, r, str(tmp_path))) for r in range(WORLD)
        ]
        for p in procs:
            p.start()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + limit_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    assert not hung, f"ranks {hung} of scenario {scenario!r} hung for {limit_s} s"
    results = []
    for r in range(WORLD):
        path = tmp_path / f"{scenario}-{r}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else None)
    for r, res in enumerate(results):
        assert res is None or "error" not in res, f"rank {r} failed:\n{res['error']}"
    return [p.exitcode for p in procs], results


# ---------------------------------------------------------------------- tests
def test_two_processes_equal_one_process_on_the_same_batch_seeds_and_noise(tmp_path):
    codes, (r0, r1) = _launch("equal", tmp_path)
    assert codes == [0, 0]
    for name, config in (("dp", DP_CONFIG), ("mezo", MEZO_CONFIG)):
        model, _, stats, draws = _run_steps(config, BATCHES)
        ref = _stats_dict(stats)
        assert r0[name]["draws"] == draws[0] and r1[name]["draws"] == 0
        # Bit-identical parameters on both ranks (also checked inside the run at every step).
        for a, b in zip(r0[name]["params"], r1[name]["params"], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(r0[name]["params"], _params(model), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for t, (mine, want) in enumerate(zip(r0[name]["stats"], ref, strict=True)):
            assert mine["batch_size"] == want["batch_size"] == len(BATCHES[t])
            torch.testing.assert_close(mine["noisy_sum"], want["noisy_sum"], rtol=1e-9, atol=1e-12)
            assert mine["normalizer"] == want["normalizer"]
            for key in ("loss", "clip_fraction", "max_clip_error", "batch_clip_error"):
                assert mine[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12, nan_ok=True)
        for t in range(len(BATCHES)):  # both ranks report the same global stats
            assert torch.equal(r0[name]["stats"][t]["noisy_sum"], r1[name]["stats"][t]["noisy_sum"])
        assert r0[name]["state"] == r1[name]["state"] == len(BATCHES)
        # O(K) communication: 3 collectives of (4K + 15) float64 per step, whatever the model.
        k = config["num_directions"]
        assert r0[name]["bytes"] == r1[name]["bytes"] == (4 * k + 15) * 8
        assert r0[name]["collectives"] == 3
    # The noise is drawn once per step, on rank 0 only (the single process draws as often).
    assert r0["dp"]["draws"] == len(BATCHES) and r1["dp"]["draws"] == 0
    assert any(0 < s["clip_fraction"] < 1 for s in r0["dp"]["stats"])
    assert r0["drawn_seed"] == r1["drawn_seed"]
    for r in (r0, r1):
        assert "disagree on the optimizer configuration" in r["config_error"]
        assert "not bit-identical" in r["desync_error"]
        assert set(r["option_errors"]) == set(_OPTION_MISMATCHES)
        for name, error in r["option_errors"].items():
            assert error is not None and "disagree on the optimizer configuration" in error, name
    # A checkpoint of a 2-process run resumes on 2 processes (and, below, on 1).
    assert r0["private"]["steps"] == 2 and r0["resumed"]["steps"] == 4
    for key in ("private", "resumed"):
        assert r0[key] == r1[key]
    history = r0["resumed"]["accountant"]["history"]
    assert [h["mechanism"] for h in history] == ["laplace", "subsampled_gaussian"]
    assert history[1]["steps"] == 4


def test_a_failing_or_dead_rank_fails_the_other_quickly_and_the_checkpoint_loads(tmp_path):
    codes, (r0, r1) = _launch("crash", tmp_path)
    assert codes == [0, 3], codes
    # The setup: one size release, the same ñ, σ, b and accountant on both ranks.
    assert r0["noisy_n"] == r1["noisy_n"] and r0["sigma"] == r1["sigma"] and r0["b"] == r1["b"]
    assert r0["accountant_1"] == r1["accountant_1"]
    assert [h["mechanism"] for h in r0["accountant_1"]["history"]].count("laplace") == 1
    for a, b in zip(r0["params_1"], r1["params_1"], strict=True):
        assert torch.equal(a, b)
    # A closure that raises on rank 1: rank 1 gets its error, rank 0 a PeerFailure in the same
    # step (the recoverable kind, which only the peer's abort message produces, not a timeout).
    assert r1["clean"]["type"] == "ValueError"
    assert r0["clean"]["type"] == "PeerFailure" and r0["clean"]["recoverable"] is True
    assert r0["clean"]["peer"] == 1 and "step 1" in r0["clean"]["message"]
    assert r0["steps_after_clean"] == r1["steps_after_clean"] == 1
    assert r0["digest_after_clean"] == r1["digest_after_clean"]
    # Rank 1 dies inside its closure: rank 0 fails with a clear error that names the dead peer
    # (the peer-gone detection, not the process group's timeout, which says nothing of a peer).
    dead = r0["dead"]
    assert dead["type"] == "PeerFailure" and dead["recoverable"] is False
    assert "step 1" in dead["message"] and "peer rank is gone" in dead["message"]
    assert r0["steps_after_dead"] == 1
    # The checkpoint written by rank 0 after the first step resumes in one process.
    x, y = _data(64)
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = make_private(model, TensorDataset(x, y), checkpoint=tmp_path / "ckpt.pt",
                           journal=False, **PRIVATE_ARGS)  # fmt: skip
    assert run.steps_done == 1 and run.process_group is None
    assert run.accountant.state_dict() == r0["accountant_1"]
    for a, b in zip(_params(model), r0["params_1"], strict=True):
        assert torch.equal(a, b)
    batch = next(iter(run.loader))
    run.optimizer.step(lambda: _batch_losses(model, batch))
    assert run.steps_done == 2


def test_torchrun_example_runs_on_two_cpu_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "distributed_train.py"), "--steps", "4",
           "--checkpoint", str(tmp_path / "run.pt")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ε spent" in proc.stdout and "bytes per step" in proc.stdout
    state = torch.load(tmp_path / "run.pt", weights_only=False)
    assert state["optimizer"]["zoprivacy"]["step"] == 4


# ---------------------------------------------------------------------- the sampler (in-process)
def _samplers(n: int, q: float, world: int, steps: int, seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PredictableSamplingWarning)
        return [
            DistributedPoissonSampler(n, q, rank=r, world_size=world, steps=steps, generator=seed)
            for r in range(world)
        ]


def test_ranks_partition_the_records():
    samplers = _samplers(10, 0.5, 3, 1)
    owned = [list(s.owned_records) for s in samplers]
    assert sorted(i for o in owned for i in o) == list(range(10))
    assert [len(o) for o in owned] == [4, 3, 3]


def test_union_of_the_ranks_batches_is_a_poisson_sample_of_the_whole_data_set():
    n, q, world, steps = 30, 0.3, 3, 3000
    samplers = _samplers(n, q, world, steps)
    included = np.zeros((steps, n), dtype=bool)
    for r, sampler in enumerate(samplers):
        for t, batch in enumerate(sampler):
            assert all(i % world == r for i in batch) and batch == sorted(batch)
            included[t, batch] = True
    freq = included.mean(axis=0)  # every record kept with probability q
    assert np.all(np.abs(freq - q) < 5 * np.sqrt(q * (1 - q) / steps))
    sizes = included.sum(axis=1)  # |B| ~ Binomial(n, q): independent across ranks
    assert abs(sizes.mean() - n * q) < 0.15
    assert abs(sizes.var() / (n * q * (1 - q)) - 1) < 0.1
    # Ranks draw independently: records 0 and 1 (ranks 0 and 1, same seed) are uncorrelated.
    assert abs(np.corrcoef(included[:, 0], included[:, 1])[0, 1]) < 0.08
    # The same seed gives the same batches (tests only); a rank may be empty.
    again = _samplers(n, q, world, 5)
    assert [list(s) for s in again] == [list(s) for s in _samplers(n, q, world, 5)]


def test_sampler_arguments_are_checked():
    with pytest.raises(ValueError, match="rank"):
        DistributedPoissonSampler(10, 0.5, rank=2, world_size=2)
    with pytest.raises(ValueError, match="sample_rate"):
        DistributedPoissonSampler(10, 1.5, rank=0, world_size=2)
    with pytest.raises(TypeError, match="generator"):
        DistributedPoissonSampler(10, 0.5, rank=0, world_size=2, generator="seed")  # type: ignore[arg-type]


def test_the_configuration_digest_covers_the_step_options():
    """One process: each step option (and each mask/schedule setting) changes the digest that
    the ranks compare; equal library objects built separately give the same digest."""
    from zoprivacy.optim.masks import FixedMask

    def digest(**options: Any) -> bytes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = DPAggZO(_model().parameters(), **{**DP_CONFIG, **options})
        return opt.config_fingerprint()

    base = digest()
    variants = {name: digest(**option[1]) for name, option in _OPTION_MISMATCHES.items()}
    variants["mask_kind"] = digest(mask=RandomMask(0.5, seed=0))
    variants["mask_seed"] = digest(mask=RandomMask(0.5, seed=1))
    shapes = [p.shape for p in _model().parameters()]
    variants["fixed"] = digest(mask=FixedMask([torch.ones(s, dtype=torch.bool) for s in shapes]))
    variants["fixed_other_bits"] = digest(
        mask=FixedMask([torch.zeros(s, dtype=torch.bool) for s in shapes])
    )
    variants["clip_schedule"] = digest(clip_norm=Stagewise([2], [4.0, 1.0]))
    assert len({base, *variants.values()}) == len(variants) + 1
    for option in _OPTION_MISMATCHES.values():  # separately built equal objects agree
        assert digest(**option[0]) == digest(**option[0])
    assert digest(mask=MagnitudeMask(0.5)) == digest(mask=MagnitudeMask(0.5))


def test_process_group_needs_an_initialised_torch_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        DPAggZO([torch.zeros(2, requires_grad=True)], 0.1, num_directions=1, clip_norm=1.0,
                noise_multiplier=1.0, expected_batch_size=4.0, process_group=object())  # fmt: skip
