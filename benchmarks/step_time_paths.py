"""Step time of every DP-AggZO path against 2K forward passes and a paper-style loop.

Sections (``--sections``, default all three):

* ``paths``: for K in {1, 4, 16, 64} (``--ks``) and both packaged models (``--models``), the
  median process-CPU time of one step of each configuration below, the forward time (median of
  ``--forward-repeats`` closure calls, measured in the same time window), and per step an
  instrumented breakdown. Reported: ``over_2k_forward`` = step / (2K × forward) for every path
  (also for forward differences, whose own floor is K + 1 forwards: ``over_floor``), with
  ``--paired-forwards`` also ``over_paired_2k_forward`` (the median over rounds of step / 2K plain
  forwards timed just before it, which machine-speed drift between timings does not move), and
  ``speedup_vs_paper`` = paper-style step / step at identical maths (same directions, same
  difference).

  ============================  =================================================================
  path                          configuration
  ============================  =================================================================
  ``paper``                     ``step_time.PaperStyleDPAggZO`` (Gaussian, central): the paper
                                artifact's loop (MeZO-derived): ``torch.manual_seed(seed_k)``, a new
                                ``torch.normal`` tensor per parameter, regenerated for each of the
                                three in-place perturbations (+φ, −2φ, +φ) and the update (4K
                                generations), applied as ``param.data += scale * z``
  ``paper_rademacher``          the same loop with ``torch.randint(0, 2, ...) * 2 - 1`` directions
  ``paper_forward``             the same loop with forward differences (K + 1 forwards, 3K gens)
  ``inplace``                   DPAggZO(perturbation="inplace"): the previous default
  ``hooks``                     DPAggZO() (zero drift, Gaussian, central): the new default
  ``hooks_rademacher``          DPAggZO(directions="rademacher")
  ``hooks_forward``             DPAggZO(difference="forward")
  ``hooks_rademacher_forward``  DPAggZO(directions="rademacher", difference="forward")
  ``hooks_buffer``              DPAggZO(direction_buffer=True): each Gaussian z_k generated once
                                for both probes (2K generations instead of 3K)
  ``hooks_lowrank``             DPAggZO(directions="lowrank", direction_rank=2): factors generated
                                once per step and kept (K generations)
  ============================  =================================================================

  Speed-ups at identical maths: hooks and inplace vs paper, hooks_rademacher vs
  paper_rademacher, hooks_forward vs paper_forward.

  Breakdown (instrumented, nested timers with the children's time subtracted): ``forward``
  (closure calls, minus the substitution work done inside them), ``generate``
  (:func:`~zoprivacy.optim.directions.fill_direction_`),
  ``write`` (forming θ ± φz for the substitution,
  in-place adds and restores, the update's adds), ``clip`` (``DPAggZO._clip``) and ``other``
  (the rest: closure checks, RNG state, noise, Python).

* ``prefix``: :class:`zoprivacy.PrefixCache` on the trainable top of each model (MiniLM:
  pooler + classifier + the last N layers; SmolLM2: the last N layers + final norm +
  :class:`~zoprivacy.LabelWordHead`): step time without and with the cache (default
  path, K = ``--prefix-k``), and the speed-up.
* ``batched``: ``batched_directions=m`` on the same small trainable tops, with the prefix cache,
  against the sequential probe.
* ``threads``: full fine-tuning of MiniLM with ``--threads`` torch threads (default 2) and
  expected batch ``--threads-batches`` (default 16 and 64, the job's and the paper's batch),
  **wall-clock** medians (several threads make process CPU time count every core): the
  paper-style loop, the default path with the chunked Gaussian generator on all threads
  (``hooks``) and on one (``hooks_serial``, ``set_generation_threads(1)``: what a serial
  ``torch.randn`` costs), Rademacher (``hooks_rademacher`` against ``paper_rademacher``), the
  direction buffer (``hooks_buffer``) and low-rank directions (``hooks_lowrank``), for K in
  ``--threads-ks`` (default 4, 16). ``over_2k_forward`` divides by 2K plain forward passes timed
  back to back in the same interleaved rounds (``over_2k_single_forward`` by 2K
  times the median single forward, for comparison). Needs an otherwise idle machine: the load
  average before and after each K is stored.

Workloads: MiniLM: the packaged all-MiniLM-L6-v2 classifier, all 22.7M parameters trainable in
``paths``, one fixed batch of 16 Rotten Tomatoes training sentences (max_length 64, 47 tokens),
as in ``benchmarks/step_time.py``. SmolLM2: SmolLM2-135M-Instruct (134.5M parameters, the
embedding tied to the LM head) on 4 prompts ("Review: <text>\\nSentiment:", max_length 24),
prompt-classification loss over " negative"/" positive". Parameters are copied out of the
memory-mapped checkpoints first. c = 1, σ = 1, b = batch, φ = 1e-3, lr = 1e-6, one thread.

Clock: process CPU time (``time.process_time``), because the machine is shared: wall time also
counts other processes (wall times are in the JSON). Each K's paths are measured in one time
window, interleaved over ``--repeats`` rounds (1 round at K = 64 unless ``--repeats-64``).

Run (about 1.5 h of CPU on one core for everything): ``nohup python -m benchmarks.step_time_paths
&`` → ``benchmarks/results/step_time_paths.json`` and ``.png``. Sections and models can be run
separately; results are merged into the existing JSON. ``--quick``: a tiny MLP, K in {1, 2}
(smoke test), written to ``step_time_paths_quick.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402  (after the thread settings)

from benchmarks._common import RESULTS, machine  # noqa: E402
from benchmarks.step_time import PaperStyleDPAggZO  # noqa: E402

KS = (1, 4, 16, 64)
CLIP = 1.0
SIGMA = 1.0
PHI = 1e-3
LR = 1e-6
PATHS = (
    "paper",
    "paper_rademacher",
    "paper_forward",
    "inplace",
    "hooks",
    "hooks_rademacher",
    "hooks_forward",
    "hooks_rademacher_forward",
    "hooks_buffer",
    "hooks_lowrank",
)
REFERENCE = {
    "inplace": "paper",
    "hooks": "paper",
    "hooks_buffer": "paper",
    "hooks_lowrank": "paper",
    "hooks_rademacher": "paper_rademacher",
    "hooks_forward": "paper_forward",
}
THREAD_PATHS = (
    "paper",
    "hooks",
    "hooks_serial",
    "paper_rademacher",
    "hooks_rademacher",
    "hooks_buffer",
    "hooks_lowrank",
)
THREAD_REFERENCE = {
    "hooks": "paper",
    "hooks_serial": "paper",
    "hooks_rademacher": "paper_rademacher",
    "hooks_buffer": "paper",
    "hooks_lowrank": "paper",
}
OPTIONS = {
    "inplace": {"perturbation": "inplace"},
    "hooks": {},
    "hooks_serial": {},
    "hooks_rademacher": {"directions": "rademacher"},
    "hooks_forward": {"difference": "forward"},
    "hooks_rademacher_forward": {"directions": "rademacher", "difference": "forward"},
    "hooks_buffer": {"direction_buffer": True},
    "hooks_lowrank": {"directions": "lowrank", "direction_rank": 2},
}


# ---------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    model: Any
    batch: dict[str, torch.Tensor]
    losses: Callable[[Any], torch.Tensor]  # batch -> per-record losses
    extra: dict[str, Any]

    @property
    def batch_size(self) -> int:
        return int(self.batch["input_ids"].shape[0])

    def closure(self) -> Callable[[], torch.Tensor]:
        return functools.partial(self.losses, self.batch)


def _detach_from_checkpoint(model: Any) -> None:
    with torch.no_grad():  # copy out of the memory-mapped checkpoint (lazy pages, CoW)
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


def minilm_workload(batch_size: int = 16, max_length: int = 64) -> Workload:
    from zoprivacy import tasks
    from zoprivacy.tasks.packaged import load_minilm_classifier, load_rotten_tomatoes, make_splits

    model, tok = load_minilm_classifier(2, seed=0)
    _detach_from_checkpoint(model)
    data = load_rotten_tomatoes()
    train = make_splits(data.texts, data.labels, test_size=1000, seed=0).train
    batch = tasks.encode_classification(
        tok, train.texts[:batch_size], train.labels[:batch_size], max_length
    )
    losses = functools.partial(tasks.sequence_classification_losses, model)
    return Workload("all-MiniLM-L6-v2 classifier", model, batch, losses, {})


def smollm2_workload(batch_size: int = 4, max_length: int = 24) -> Workload:
    from zoprivacy import tasks
    from zoprivacy.tasks.packaged import load_rotten_tomatoes, load_smollm2, make_splits

    model, tok = load_smollm2()
    _detach_from_checkpoint(model)
    data = load_rotten_tomatoes()
    train = make_splits(data.texts, data.labels, test_size=1000, seed=0).train
    batch, ids = tasks.encode_prompts(
        tok, train.texts[:batch_size], train.labels[:batch_size], max_length=max_length
    )
    losses = functools.partial(tasks.prompt_classification_losses, model, label_token_ids=ids)
    return Workload("SmolLM2-135M-Instruct (prompt)", model, batch, losses, {"label_ids": ids})


def tiny_workload() -> Workload:
    import torch.nn.functional as F

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)
        ).eval()
        x, y = torch.randn(4, 32), torch.randint(0, 2, (4,))

    def losses(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return F.cross_entropy(model(batch["x"]), batch["labels"], reduction="none").clone()

    return Workload("MLP 32-64-2 (quick)", model, {"input_ids": x, "x": x, "labels": y}, losses, {})


def set_trainable(model: Any, modules: Sequence[Any] | None) -> int:
    """Make ``modules`` trainable (all parameters when None); returns the trainable count."""
    for p in model.parameters():
        p.requires_grad_(modules is None)
    for module in modules or ():
        for p in module.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


class Breakdown:
    """Nested process-CPU timers: each category gets its own time minus its children's."""

    CATEGORIES = ("forward", "generate", "write", "clip")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[float] = []
        self._patches: list[tuple[Any, str, Any]] = []

    def reset(self) -> None:
        self.seconds = defaultdict(float)

    def wrap(self, category: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            self._stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.process_time() - start
                children = self._stack.pop()
                self.seconds[category] += elapsed - children
                if self._stack:
                    self._stack[-1] += elapsed

        return timed

    def install(self) -> None:
        import zoprivacy.optim.directions as directions
        from zoprivacy.optim.optimizer import DPAggZO
        from zoprivacy.optim.perturb import Prober

        targets = [
            (directions, "fill_direction_", "generate"),
            (directions, "lowrank_factors", "generate"),
            (Prober, "_provide", "write"),
            (Prober, "_move", "write"),
            (Prober, "restore", "write"),
            (DPAggZO, "_update", "write"),
            (DPAggZO, "_clip", "clip"),
        ]
        for owner, name, category in targets:
            original = getattr(owner, name)
            self._patches.append((owner, name, original))
            setattr(owner, name, self.wrap(category, original))

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()


def cpu_time(fn: Callable[[], Any]) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def forward_time(closure: Callable[[], Any], repeats: int) -> dict[str, float]:
    closure()
    runs = [cpu_time(closure) for _ in range(repeats)]
    return {
        "cpu": statistics.median(r[0] for r in runs),
        "wall": statistics.median(r[1] for r in runs),
    }


def make_optimizer(path: str, params: list[torch.Tensor], k: int, batch: int, **extra: Any):
    from zoprivacy.optim.optimizer import DPAggZO

    common = dict(
        num_directions=k,
        clip_norm=CLIP,
        noise_multiplier=SIGMA,
        expected_batch_size=batch,
        perturbation_scale=PHI,
    )
    if path.startswith("paper"):
        kind = "rademacher" if path == "paper_rademacher" else "gaussian"
        diff = "forward" if path == "paper_forward" else "central"
        return PaperStyleDPAggZO(
            params, LR, seed=0, directions=kind, difference=diff, noise_seed=1, **common
        )
    return DPAggZO(params, LR, seed=0, noise_seed=0, **common, **OPTIONS[path], **extra)


def _add_speedups(entries: dict[str, dict], reference: dict[str, str], clock: str) -> None:
    """Give each path of ``reference`` its speed-up over its paper-style path (same maths)."""
    for path, ref in reference.items():
        entries[path]["speedup_vs_paper"] = entries[ref][clock] / entries[path][clock]
        entries[path]["paper_reference"] = ref


def run_paths(work: Workload, ks: Sequence[int], args: argparse.Namespace) -> list[dict]:
    params = [p for p in work.model.parameters() if p.requires_grad]
    closure = work.closure()
    breakdown = Breakdown()
    timed_closure = breakdown.wrap("forward", closure)
    rows = []
    paths = args.paths or PATHS
    for path in paths:  # warm-up: every code path once at K = 1
        make_optimizer(path, params, 1, work.batch_size).step(closure)
    for k in ks:
        fwd = forward_time(closure, args.forward_repeats)
        repeats = args.repeats_64 if k >= 64 else args.repeats
        times: dict[str, list[tuple[float, float]]] = defaultdict(list)
        parts: dict[str, list[dict[str, float]]] = defaultdict(list)
        paired: dict[str, list[float]] = defaultdict(list)
        info: dict[str, dict[str, Any]] = {}
        for _ in range(repeats):
            for path in paths:
                if args.paired_forwards:  # 2K plain forwards just before this step
                    paired[path].append(cpu_time(lambda n=2 * k: [closure() for _ in range(n)])[0])
                opt = make_optimizer(path, params, k, work.batch_size)
                if path.startswith("paper"):
                    times[path].append(cpu_time(lambda o=opt: o.step(closure)))
                    continue
                breakdown.reset()
                breakdown.install()
                try:
                    holder: list[Any] = []
                    times[path].append(
                        cpu_time(lambda o=opt, h=holder: h.append(o.step(timed_closure)))
                    )
                finally:
                    breakdown.uninstall()
                total = times[path][-1][0]
                sec = {c: breakdown.seconds.get(c, 0.0) for c in Breakdown.CATEGORIES}
                sec["other"] = total - sum(sec.values())
                parts[path].append(sec)
                stats = holder[0]
                info[path] = {
                    "perturbation_path": stats.perturbation_path,
                    "generations": stats.generations,
                }
        row: dict[str, Any] = {
            "K": k,
            "forward_seconds": fwd["cpu"],
            "forward_wall_seconds": fwd["wall"],
            "repeats": repeats,
            "paths": {},
            "loadavg": os.getloadavg(),
        }
        for path in paths:
            cpu = statistics.median(t[0] for t in times[path])
            evaluations = k + 1 if path.endswith("forward") else 2 * k
            entry: dict[str, Any] = {
                "seconds": cpu,
                "wall_seconds": statistics.median(t[1] for t in times[path]),
                "all_seconds": [t[0] for t in times[path]],
                "over_2k_forward": cpu / (2 * k * fwd["cpu"]),
                "over_floor": cpu / (evaluations * fwd["cpu"]),
                "floor": f"{evaluations} forwards",
            }
            if paired[path]:
                entry["paired_2k_forward_seconds"] = paired[path]
                entry["over_paired_2k_forward"] = statistics.median(
                    t[0] / f for t, f in zip(times[path], paired[path], strict=True)
                )
            if path in parts:
                med = {c: statistics.median(p[c] for p in parts[path]) for c in parts[path][0]}
                entry["breakdown_seconds"] = med
                entry["breakdown_fraction"] = {c: v / cpu for c, v in med.items()}
                # the Gaussian goal's floor: 2K forwards plus the generations the path needs
                entry["over_2k_forward_plus_generation"] = cpu / (
                    2 * k * fwd["cpu"] + med["generate"]
                )
                entry.update(info[path])
            row["paths"][path] = entry
        present = {a: b for a, b in REFERENCE.items() if a in paths and b in paths}
        _add_speedups(row["paths"], present, "seconds")
        rows.append(row)
        p = row["paths"]
        print(
            f"[{work.name}] K={k:<3} fwd {fwd['cpu'] * 1e3:7.1f} ms | "
            + "  ".join(f"{name} {p[name]['over_2k_forward']:.2f}" for name in paths)
            + " | speed-up "
            + "  ".join(f"{a} {p[a]['speedup_vs_paper']:.2f}" for a in present),
            flush=True,
        )
    return rows


def run_threads(args: argparse.Namespace) -> list[dict]:
    """Wall-clock step time of full MiniLM fine-tuning with ``args.threads`` torch threads."""
    from zoprivacy.optim.directions import set_generation_threads

    torch.set_num_threads(args.threads)
    rows = []
    try:
        for batch in args.threads_batches:
            work = minilm_workload(batch_size=batch)
            set_trainable(work.model, None)
            params = [p for p in work.model.parameters() if p.requires_grad]
            closure = work.closure()
            for path in THREAD_PATHS:  # warm-up
                make_optimizer(path, params, 1, batch).step(closure)
            for k in args.threads_ks:
                load_before = os.getloadavg()
                fwd = forward_time(closure, args.forward_repeats)
                times: dict[str, list[float]] = defaultdict(list)
                for _ in range(args.repeats):
                    # the reference: 2K plain forward passes, timed in the same rounds
                    times["forwards"].append(
                        cpu_time(lambda c=closure, n=2 * k: [c() for _ in range(n)])[1]
                    )
                    for path in THREAD_PATHS:
                        opt = make_optimizer(path, params, k, batch)
                        set_generation_threads(1 if path == "hooks_serial" else None)
                        try:
                            times[path].append(cpu_time(lambda o=opt, c=closure: o.step(c))[1])
                        finally:
                            set_generation_threads(None)
                forwards = statistics.median(times["forwards"])
                entries: dict[str, Any] = {}
                for path in THREAD_PATHS:
                    wall = statistics.median(times[path])
                    entries[path] = {
                        "wall_seconds": wall,
                        "all_wall_seconds": times[path],
                        "over_2k_forward": wall / forwards,
                        "over_2k_single_forward": wall / (2 * k * fwd["wall"]),
                    }
                _add_speedups(entries, THREAD_REFERENCE, "wall_seconds")
                rows.append(
                    {
                        "batch": batch,
                        "seq_len": int(work.batch["input_ids"].shape[1]),
                        "K": k,
                        "threads": args.threads,
                        "two_k_forwards_wall_seconds": forwards,
                        "all_two_k_forwards_wall_seconds": times["forwards"],
                        "forward_wall_seconds": fwd["wall"],
                        "forward_cpu_seconds": fwd["cpu"],
                        "repeats": args.repeats,
                        "loadavg_before": load_before,
                        "loadavg_after": os.getloadavg(),
                        "paths": entries,
                    }
                )
                print(
                    f"[threads={args.threads} batch={batch}] K={k:<3} fwd "
                    f"{fwd['wall'] * 1e3:7.1f} ms | "
                    + "  ".join(
                        f"{name} {entries[name]['over_2k_forward']:.2f}" for name in THREAD_PATHS
                    )
                    + " | speed-up "
                    + "  ".join(
                        f"{name} {entries[name]['speedup_vs_paper']:.2f}"
                        for name in THREAD_REFERENCE
                    ),
                    flush=True,
                )
    finally:
        torch.set_num_threads(1)
    return rows


def _step_seconds(
    work: Workload,
    losses: Callable[[], torch.Tensor],
    params: list[torch.Tensor],
    k: int,
    repeats: int,
    **options: Any,
) -> tuple[float, str]:
    from zoprivacy.optim.optimizer import DPAggZO

    def make() -> Any:
        return DPAggZO(
            params,
            LR,
            num_directions=k,
            clip_norm=CLIP,
            noise_multiplier=SIGMA,
            expected_batch_size=work.batch_size,
            perturbation_scale=PHI,
            seed=0,
            noise_seed=0,
            **options,
        )

    make().step(losses)  # warm-up
    runs, path = [], ""
    for _ in range(repeats):
        opt = make()
        runs.append(cpu_time(lambda o=opt: o.step(losses))[0])
        path = opt.perturbation_path
    return statistics.median(runs), path


def _tops(work: Workload) -> list[tuple[str, list[Any], Callable[[Any], torch.Tensor]]]:
    """(name, trainable modules, losses) of the small trainable tops measured with caching."""
    model = work.model
    if "MiniLM" in work.name:
        layers = model.bert.encoder.layer
        head = [model.classifier, model.bert.pooler]
        return [
            ("head", head, work.losses),
            ("head+last1", [*head, *layers[-1:]], work.losses),
            ("head+last2", [*head, *layers[-2:]], work.losses),
        ]
    from zoprivacy.tasks.prefix import LabelWordHead

    label_head = work.extra.get("label_head")
    if label_head is None:
        label_head = LabelWordHead(model, work.extra["label_ids"])
        work.extra["label_head"] = label_head
    layers = model.model.layers
    losses = functools.partial(label_head.losses, model)
    return [
        ("norm+labelhead", [model.model.norm, label_head], losses),
        ("last1+norm+labelhead", [*layers[-1:], model.model.norm, label_head], losses),
        ("last2+norm+labelhead", [*layers[-2:], model.model.norm, label_head], losses),
        ("last4+norm+labelhead", [*layers[-4:], model.model.norm, label_head], losses),
    ]


def run_prefix(work: Workload, args: argparse.Namespace) -> list[dict]:
    from zoprivacy.tasks.prefix import PrefixCache

    rows = []
    for name, modules, losses in _tops(work):
        trainable = set_trainable(work.model, [m for m in modules if m is not None])
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        params = list({id(p): p for p in params}.values())
        batch = work.batch
        plain = functools.partial(losses, batch)
        cache = PrefixCache(work.model)
        cached_fn = cache.wrap(losses)
        cached = functools.partial(cached_fn, batch)
        for k in args.prefix_ks:
            t_plain, _ = _step_seconds(work, plain, params, k, args.repeats)
            t_cached, path = _step_seconds(work, cached, params, k, args.repeats)
            fwd = forward_time(plain, args.forward_repeats)
            row = {
                "trainable": name,
                "trainable_params": trainable,
                "cached_layers": cache.num_cached_layers,
                "K": k,
                "forward_seconds": fwd["cpu"],
                "uncached_seconds": t_plain,
                "cached_seconds": t_cached,
                "speedup": t_plain / t_cached,
                "uncached_over_2k_forward": t_plain / (2 * k * fwd["cpu"]),
                "cached_over_2k_forward": t_cached / (2 * k * fwd["cpu"]),
                "perturbation_path": path,
            }
            rows.append(row)
            print(
                f"[{work.name}] prefix {name:<22} K={k:<3} cached {cache.num_cached_layers} "
                f"layers: {t_plain:.3f} s -> {t_cached:.3f} s ({row['speedup']:.2f}x)",
                flush=True,
            )
    set_trainable(work.model, None)
    return rows


def run_batched(work: Workload, args: argparse.Namespace) -> list[dict]:
    from zoprivacy.tasks.prefix import PrefixCache

    rows = []
    k = args.batched_k
    for name, modules, losses in _tops(work)[:2]:
        set_trainable(work.model, modules)
        params = list({id(p): p for m in modules for p in m.parameters()}.values())
        cache = PrefixCache(work.model)
        cached = functools.partial(cache.wrap(losses), work.batch)
        t_seq, _ = _step_seconds(work, cached, params, k, args.repeats)
        for m in args.batched_ms:
            t_bat, path = _step_seconds(work, cached, params, k, args.repeats, batched_directions=m)
            nbytes = sum(p.numel() * p.element_size() for p in params)
            row = {
                "trainable": name,
                "K": k,
                "m": m,
                "sequential_seconds": t_seq,
                "batched_seconds": t_bat,
                "speedup": t_seq / t_bat,
                "stack_mib": 2 * m * nbytes / 2**20,
                "perturbation_path": path,
            }
            rows.append(row)
            print(
                f"[{work.name}] batched {name:<22} K={k} m={m:<3}: {t_seq:.3f} s -> "
                f"{t_bat:.3f} s ({row['speedup']:.2f}x, stacks {row['stack_mib']:.1f} MiB)",
                flush=True,
            )
    set_trainable(work.model, None)
    return rows


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(payload.get("paths", {}))
    rows_of_panels = max(1, -(-len(models) // 2)) + 1
    fig, axes = plt.subplots(rows_of_panels, 2, figsize=(13, 4.5 * rows_of_panels), squeeze=False)
    styles = {
        "paper": ("k", "s--"),
        "paper_rademacher": ("0.5", "s--"),
        "paper_forward": ("0.7", "s:"),
        "inplace": ("C3", "o-"),
        "hooks": ("C0", "o-"),
        "hooks_rademacher": ("C2", "o-"),
        "hooks_forward": ("C1", "^-"),
        "hooks_rademacher_forward": ("C4", "^-"),
        "hooks_buffer": ("C5", "d-"),
        "hooks_lowrank": ("C6", "d-"),
    }
    for ax, model in zip(axes[:-1].flat, models, strict=False):
        rows = payload["paths"][model]["rows"]
        ks = [r["K"] for r in rows]
        for name in (n for n in PATHS if all(n in r["paths"] for r in rows)):
            color, style = styles[name]
            ax.plot(
                ks,
                [r["paths"][name]["over_2k_forward"] for r in rows],
                style,
                color=color,
                label=name,
            )
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.axhline(1.15, color="C0", lw=0.6, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("K")
        ax.set_ylabel("step time / (2K × forward time)")
        ax.set_title(
            f"{model}: {payload['paths'][model]['config']['trainable_params']:,} "
            f"trainable, batch {payload['paths'][model]['config']['batch']}, 1 thread",
            fontsize=9,
        )
        ax.legend(fontsize=7, ncol=2)
    ax = axes[-1][0]
    if models:
        model = models[0]
        rows = payload["paths"][model]["rows"]
        row = next((r for r in rows if r["K"] == 16), rows[-1])
        names = [n for n in row["paths"] if "breakdown_fraction" in row["paths"][n]]
        bottom = [0.0] * len(names)
        for cat in (*Breakdown.CATEGORIES, "other"):
            vals = [max(0.0, row["paths"][n]["breakdown_seconds"][cat]) for n in names]
            ax.bar(names, vals, bottom=bottom, label=cat)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.axhline(
            2 * row["K"] * row["forward_seconds"], color="k", ls=":", lw=0.8, label="2K forwards"
        )
        ax.set_ylabel("CPU seconds per step")
        ax.set_title(f"{model}, K = {row['K']}: where a step goes", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.legend(fontsize=7)
    ax = axes[-1][1]
    labels, values, colors = [], [], []
    for i, (model, rows) in enumerate(payload.get("prefix", {}).items()):
        for r in rows:
            labels.append(f"{model.split()[0][:7]} {r['trainable']} K={r['K']}")
            values.append(r["speedup"])
            colors.append(f"C{i}")
    for model, rows in payload.get("batched", {}).items():
        for r in rows:
            labels.append(f"{model.split()[0][:7]} batched m={r['m']} {r['trainable']}")
            values.append(r["speedup"])
            colors.append("C5")
    if labels:
        ax.barh(labels, values, color=colors)
        for y, v in enumerate(values):
            ax.text(v * 1.05, y, f"{v:.3g}x", va="center", fontsize=6)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("speed-up of the step (log scale)")
        ax.set_title(
            "prefix caching (vs uncached) and batched directions (vs sequential)", fontsize=9
        )
        ax.tick_params(axis="y", labelsize=6)
    else:
        ax.axis("off")  # no prefix or batched rows in this file
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_tables(payload: dict[str, Any]) -> str:
    """Markdown tables of the ``paths`` rows (step / 2K forwards, the speed-up over the paper
    loop, the generations per step, and ⟨step / the closure time inside that step⟩, a ratio
    that machine-speed drift between the forward and the step timings does not move) and of
    the ``threads`` rows (wall clock)."""
    out = []
    for name, block in payload.get("paths", {}).items():
        rows = block["rows"]
        out += [f"{name} (process CPU time, 1 thread; step / 2K forwards, speed-up vs paper, "
                "generations per step)", "",
                "| path | " + " | ".join(f"K = {r['K']}" for r in rows) + " |",
                "|---|" + "---|" * len(rows)]  # fmt: skip
        for path in (p for p in PATHS if all(p in r["paths"] for r in rows)):
            cells = []
            for r in rows:
                e = r["paths"][path]
                cell = f"{e['over_2k_forward']:.2f}"
                if "speedup_vs_paper" in e:
                    cell += f" ({e['speedup_vs_paper']:.2f}×)"
                if "over_2k_forward_plus_generation" in e and path in ("hooks", "hooks_buffer"):
                    cell += f" [{e['over_2k_forward_plus_generation']:.2f}]"
                if "generations" in e:
                    cell += f" {{{e['generations']}}}"
                if "breakdown_seconds" in e:
                    cell += f" ⟨{e['seconds'] / e['breakdown_seconds']['forward']:.2f}⟩"
                if "over_paired_2k_forward" in e:
                    cell += f" paired {e['over_paired_2k_forward']:.2f}"
                cells.append(cell)
            out.append(f"| {path} | " + " | ".join(cells) + " |")
        out.append("")
    for r in payload.get("threads", {}).get("rows", []):
        entries = r["paths"]
        out.append(
            f"threads {r['threads']}, batch {r['batch']}, K = {r['K']} (wall): "
            + ", ".join(
                f"{p} {e['over_2k_forward']:.2f}"
                + (f" ({e['speedup_vs_paper']:.2f}×)" if "speedup_vs_paper" in e else "")
                for p, e in entries.items()
            )
        )
    return "\n".join(out)


def _builder(build: Callable[..., Workload], batch: int | None) -> Callable[[], Workload]:
    """``build`` at its own batch size (None) or at ``batch``, then named after the batch."""
    if batch is None:
        return build

    def named() -> Workload:
        work = build(batch_size=batch)
        work.name = f"{work.name}, batch {batch}"
        return work

    return named


def _store_paths(payload, work: Workload, rows, trainable: int, args, seconds: float) -> None:
    """Merge a workload's new rows into ``payload["paths"]`` (a K measured again replaces its
    old row)."""
    previous = payload.get("paths", {}).get(work.name, {}).get("rows", [])
    measured = {r["K"] for r in rows}
    rows = sorted([r for r in previous if r["K"] not in measured] + rows, key=lambda r: r["K"])
    payload.setdefault("paths", {})[work.name] = {
        "config": {
            "trainable_params": trainable,
            "batch": work.batch_size,
            "seq_len": int(work.batch["input_ids"].shape[1]),
            "ks": [r["K"] for r in rows],
            "paths": args.paths or list(PATHS),
            "repeats": args.repeats,
            "repeats_64": args.repeats_64,
            "clock": "process CPU time",
            "wall_seconds": seconds,
        },
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--plot-only",
        action="store_true",
        help="redraw the PNG from the JSON and print its markdown tables",
    )
    parser.add_argument("--quick", action="store_true", help="tiny MLP, K in {1, 2}")
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    parser.add_argument(
        "--paths", nargs="+", choices=PATHS, help="paths section: only these paths (default all)"
    )
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        help="paths section: batch sizes (default MiniLM 16, SmolLM2 4; others are named "
        "'<model>, batch N' in the JSON)",
    )
    parser.add_argument("--sections", nargs="+", default=["paths", "prefix", "batched"])
    parser.add_argument("--ks", type=int, nargs="+", help="K values (default 1 4 16 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--paired-forwards",
        action="store_true",
        help="paths section: time 2K plain forwards just before every step and report "
        "over_paired_2k_forward (median of step / its paired forwards; robust to the machine's "
        "speed drifting between the forward and the step timings)",
    )
    parser.add_argument("--repeats-64", type=int, default=1)
    parser.add_argument("--forward-repeats", type=int, default=5)
    parser.add_argument("--prefix-ks", type=int, nargs="+", default=[16])
    parser.add_argument("--batched-k", type=int, default=16)
    parser.add_argument("--batched-ms", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--threads", type=int, default=2, help="threads section: torch threads")
    parser.add_argument("--threads-batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads-ks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--out", help="output folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    name = "step_time_paths_quick.json" if args.quick else "step_time_paths.json"
    target = out / name
    payload: dict[str, Any] = json.loads(target.read_text()) if target.exists() else {}
    if args.plot_only:
        plot(payload, target.with_suffix(".png"))
        print(markdown_tables(payload))
        return
    payload["machine"] = machine()
    payload.setdefault("method", __doc__)
    ks = args.ks or ((1, 2) if args.quick else KS)
    if args.quick:
        args.repeats, args.forward_repeats, args.prefix_ks = 1, 2, [2]
        works = {"tiny": tiny_workload}
        args.sections = ["paths"]
    else:
        builders = {"minilm": minilm_workload, "smollm2": smollm2_workload}
        works = {}
        for key in (m for m in builders if m in args.models):
            for batch in args.batches or [None]:
                works[key if batch is None else f"{key}-{batch}"] = _builder(builders[key], batch)
    if "threads" in args.sections and not args.quick:
        started = time.perf_counter()
        rows = run_threads(args)
        previous = payload.get("threads", {}).get("rows", [])
        measured = {(r["batch"], r["K"], r["threads"]) for r in rows}
        rows = [r for r in previous if (r["batch"], r["K"], r["threads"]) not in measured] + rows
        payload["threads"] = {
            "config": {
                "model": "all-MiniLM-L6-v2 classifier, all parameters trainable",
                "clock": "wall time (torch threads = generation threads = --threads)",
                "wall_seconds": time.perf_counter() - started,
            },
            "rows": sorted(rows, key=lambda r: (r["threads"], r["batch"], r["K"])),
        }
        target.write_text(json.dumps(payload, indent=1, default=float) + "\n")
        args.sections = [x for x in args.sections if x != "threads"]
    for key, build in works.items():
        started = time.perf_counter()
        work = build()
        if "paths" in args.sections:
            trainable = set_trainable(work.model, None)
            rows = run_paths(work, ks, args)
            _store_paths(payload, work, rows, trainable, args, time.perf_counter() - started)
        if "prefix" in args.sections and key != "tiny":
            payload.setdefault("prefix", {})[work.name] = run_prefix(work, args)
        if "batched" in args.sections and key != "tiny":
            payload.setdefault("batched", {})[work.name] = run_batched(work, args)
        target.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    plot(payload, target.with_suffix(".png"))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
