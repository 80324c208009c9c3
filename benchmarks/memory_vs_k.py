"""Peak memory of one DP-AggZO step for K in 1..256, against Opacus DP-AdamW, DPZO and inference.

Configurations (``--configs MODEL/TRAINABLE``, the paper's Table 3 on both packaged models):

* ``minilm/all``: the all-MiniLM-L6-v2 classifier (22.7M parameters, float32), every parameter
  trainable (full fine-tuning), one fixed batch of 16 Rotten Tomatoes training sentences
  tokenised with ``max_length=64`` (padded to the longest: 55 tokens);
* ``minilm/classifier``: the same model and batch, only the classification head trainable (the
  utility rows' selection);
* ``smollm2/all``: SmolLM2-135M-Instruct (134.5M parameters, float32) answering with the label
  words " negative"/" positive" through a :class:`~zoprivacy.LabelWordHead` (a module,
  so Opacus sees it), every parameter trainable; one batch of **4** prompts
  ``"Review: {s}\nSentiment:"`` with ``max_length=32`` (31 tokens). The batch is small so that
  K = 256 (512 forward passes, 768 regenerations of 134.5M-entry directions) stays affordable;
* ``smollm2/head``: the same, only the final norm trainable (the ``zoprivacy finetune`` default
  ``head`` of the utility rows; the label-word rows stay frozen).

All use clip c = 1, σ = 1, b = the batch size, φ = 1e-3. The closure runs the whole model in
every configuration (no frozen-prefix cache), so the head rows measure the optimizer against
Opacus on the same forward pass, not the cache.

Each configuration runs in a fresh subprocess (``--worker``), single-threaded, so that no
allocator cache or lazily loaded code of one configuration inflates another:

1. load the model and build the batch (and import everything the step needs), ``gc.collect()``,
   read the resident set size: the *baseline*;
2. one warm-up step. For DP-AggZO the warm-up is a K = 1 step (every code path of a K-step, at
   1/K of the cost: a K = 256 step alone is 512 forward passes);
3. reset the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, the counter that
   ``getrusage().ru_maxrss`` and ``VmHWM`` report), run the measured step, read ``VmHWM``:
   ``peak_rss_mib``. ``extra_step_mib = peak_rss_mib − baseline``: everything a training step
   needs on top of the loaded model and batch, including state that persists across steps
   (Adam's moments, allocated in the warm-up). Without a writable ``clear_refs`` a psutil sampling
   thread (1 ms) is used instead (``rss_method`` in the JSON says which);
4. optionally one more step under ``torch.profiler`` (``profile_memory=True``): replaying its
   allocation events gives ``torch_peak_step_mib``, the peak of torch allocations made during the
   step net of what was live before it (transient memory only: no allocator caching, no Python).

Methods: ``dpaggzo`` (this library, K = 1..256), ``dpzo`` (:class:`zoprivacy.DPZO`, the K = 1
preset, clip c on the scalar; the same code path as ``dpaggzo`` K = 1, measured in its own
worker), ``dpadamw`` (Opacus 1.6 ``GradSampleModule``
with hook-computed per-sample gradients + ``DPOptimizer`` around ``torch.optim.AdamW``, same
batch, clip and σ; the model in train mode because Opacus only records activations of training
modules; dropout is then on, as in real DP fine-tuning) and ``inference`` (one forward pass of
the batch under ``torch.inference_mode``, for reference).

Allocator control (``dpaggzo_mmap64k`` rows, ``--control-ks``, default K in {1, 16, 64}): the
same DP-AggZO measurement in workers started with ``MALLOC_MMAP_THRESHOLD_=65536``, which makes
glibc serve every allocation of 64 KiB or more (all activations and the scratch buffer) with its
own ``mmap`` that is unmapped on free, instead of from the heap, where freed blocks stay resident
and fragmented. If RSS grows with K by default but not under the control, while the torch
allocations stay flat, the growth is heap memory glibc keeps, not memory the step holds.
``--control-only`` runs just these rows and merges them into an existing JSON.

Memory-mapped weights: the packaged loader returns parameters that are views of a copy-on-write
``mmap`` of ``model.safetensors``. Pages never read (most rows of the 44.7 MiB word-embedding
matrix: a forward pass only reads the rows of the batch's tokens) are not resident, and the first
in-place write of a trainer faults them in, which a first run of this benchmark counted as about
40 MiB of "step" memory for DP-AggZO (and not for inference). The workload therefore copies every
parameter and buffer into ordinary memory (``tensor.data = tensor.data.clone()``) before the
baseline, as any training loop that moves the model to its device would.

Opacus and Hugging Face BERT: wrapped as-is, the step fails in ``clip_and_accumulate`` with
"stack expects each tensor to be equal size, but got [16] ... and [1]": BERT takes its position
ids from a ``[1, L]`` buffer, so the hook computes a per-sample gradient of the position
embedding with batch dimension 1. Passing ``position_ids`` explicitly, expanded to ``[B, L]``,
fixes it (same logits); no layer has to be frozen.

Run: ``python -m benchmarks.memory_vs_k`` → ``benchmarks/results/memory_vs_k.json`` and ``.png``
(one panel per configuration). ``--configs``, ``--methods`` and ``--ks`` choose what runs;
``--merge`` keeps the rows of the existing JSON that are not re-run (the committed file merges
the first MiniLM full fine-tuning run with the later configurations; ``config.runs`` lists each
run with its machine and date). Ratios per configuration are in ``ratios_by_config``.
``--quick``: a tiny MLP on random data, K in {1, 4}, writes ``memory_vs_k_quick.json`` (in
``--out`` when given), for the smoke test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, machine, write_json

REPO = Path(__file__).resolve().parent.parent
KS = (1, 4, 16, 64, 256)
QUICK_KS = (1, 4)
BATCH = 16
MAX_LENGTH = 64
CLIP = 1.0
SIGMA = 1.0
LR = 1e-6
PROFILE_MAX_K = 64
CONTROL = "dpaggzo_mmap64k"
CONTROL_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
CONTROL_KS = (1, 16, 64)
_MARK = "RESULT "
_MIB = 2.0**20

ENV_ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


# ---------------------------------------------------------------------------------------------
# the workload, shared with benchmarks/step_time.py
# ---------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """A model, its fixed batch, and the two ways of computing its loss."""

    name: str
    model: Any
    batch_size: int
    seq_len: int | None
    losses: Callable[[], Any]  # per-record losses [B] under inference_mode: the ZO closure
    train_loss: Callable[[Any], Any]  # mean loss of a (wrapped) module, with autograd


#: The (model, trainable selection) configurations of the full run. ``all`` is full fine-tuning;
#: ``classifier`` (MiniLM) and ``head`` (SmolLM2: the final norm) are the selections of the
#: utility rows (``benchmarks/utility.py`` and the ``zoprivacy finetune`` defaults).
CONFIGS = (("minilm", "all"), ("minilm", "classifier"), ("smollm2", "all"), ("smollm2", "head"))
#: SmolLM2 batch: kept small so that K = 256 stays affordable (512 forward passes per step).
SMOLLM2_BATCH = 4
SMOLLM2_MAX_LENGTH = 32
SMOLLM2_TEMPLATE = ("Review: {s}\nSentiment:", (" negative", " positive"))


def _own_memory(model: Any) -> None:
    """Copy parameters and buffers out of the memory-mapped checkpoint (module docstring)."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


def real_workload(model_name: str = "minilm", trainable: str = "all") -> Workload:
    """A packaged model + 16 (MiniLM) or 4 (SmolLM2) Rotten Tomatoes training records.

    ``trainable``: ``all`` (full fine-tuning), ``classifier`` (MiniLM's classification head) or
    ``head`` (SmolLM2's final norm; the label-word rows stay frozen, as in ``zoprivacy
    finetune``).
    """
    if model_name == "smollm2":
        return _smollm2_workload(trainable)
    if model_name != "minilm":
        raise ValueError(f"unknown model {model_name!r}; use minilm or smollm2")
    import torch
    import torch.nn.functional as F

    from zoprivacy.tasks import encode_classification, sequence_classification_losses
    from zoprivacy.tasks.packaged import load_minilm_classifier, load_rotten_tomatoes, make_splits

    model, tokenizer = load_minilm_classifier(2, seed=0)
    _own_memory(model)
    if trainable not in ("all", "classifier"):
        raise ValueError(f"minilm trainable must be all or classifier, got {trainable!r}")
    for name, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or name.startswith("classifier."))
    data = load_rotten_tomatoes()
    train = make_splits(data.texts, data.labels, test_size=1000, seed=0).train
    batch = encode_classification(tokenizer, train.texts[:BATCH], train.labels[:BATCH], MAX_LENGTH)
    rows, seq_len = batch["input_ids"].shape
    # Explicit [B, L] position ids: identical logits, and Opacus sees a batch dimension (module
    # docstring). The zeroth-order closure uses the plain batch.
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs["position_ids"] = torch.arange(seq_len).expand(rows, seq_len).contiguous()
    labels = batch["labels"]

    def losses() -> Any:
        return sequence_classification_losses(model, batch)

    def train_loss(module: Any) -> Any:
        return F.cross_entropy(module(**inputs).logits, labels)

    name = "all-MiniLM-L6-v2 classifier"
    return Workload(name, model, rows, seq_len, losses, train_loss)


def _smollm2_workload(trainable: str) -> Workload:
    """SmolLM2-135M-Instruct, prompt classification through a :class:`LabelWordHead`.

    The model and the label-word head sit in one module (``PromptClassifier``) whose forward
    gives the ``[B, 2]`` label-word logits at each record's answer position: Opacus wraps it
    as a whole, and its ``parameters()`` are the trainable set of both methods (the tied
    embedding counted once).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    from zoprivacy import tasks
    from zoprivacy.tasks.packaged import load_rotten_tomatoes, load_smollm2, make_splits
    from zoprivacy.tasks.prefix import LabelWordHead

    if trainable not in ("all", "head"):
        raise ValueError(f"smollm2 trainable must be all or head, got {trainable!r}")
    lm, tokenizer = load_smollm2()
    _own_memory(lm)
    data = load_rotten_tomatoes()
    train = make_splits(data.texts, data.labels, test_size=1000, seed=0).train
    template, words = SMOLLM2_TEMPLATE
    n = SMOLLM2_BATCH
    batch, ids = tasks.encode_prompts(
        tokenizer, train.texts[:n], train.labels[:n], template, words, max_length=SMOLLM2_MAX_LENGTH
    )
    head = LabelWordHead(lm, ids)

    class PromptClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm
            self.label_head = head

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            batch = {"input_ids": input_ids, "attention_mask": attention_mask}
            return self.label_head(tasks.answer_hidden_states(self.lm, batch))

    model = PromptClassifier().eval()
    for p in model.parameters():
        p.requires_grad_(trainable == "all")
    if trainable == "head":
        lm.model.norm.weight.requires_grad_(True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]

    def losses() -> Any:
        return head.losses(lm, batch)

    def train_loss(module: Any) -> Any:
        return F.cross_entropy(module(**inputs), labels)

    rows, seq_len = batch["input_ids"].shape
    return Workload("SmolLM2-135M-Instruct (prompt)", model, rows, seq_len, losses, train_loss)


def tiny_workload() -> Workload:
    """A 2-layer MLP on 4 random records: runs in milliseconds, for the smoke tests."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)
        ).eval()
    x = torch.randn(4, 32, generator=gen)
    y = torch.randint(0, 2, (4,), generator=gen)

    def losses() -> Any:
        with torch.inference_mode():
            return F.cross_entropy(model(x), y, reduction="none")

    def train_loss(module: Any) -> Any:
        return F.cross_entropy(module(x), y)

    return Workload("MLP 32-64-2 (quick)", model, 4, None, losses, train_loss)


def param_stats(model: Any) -> dict[str, float]:
    sizes = [p.numel() * p.element_size() for p in model.parameters() if p.requires_grad]
    return {
        "model_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "model_param_mib": sum(sizes) / _MIB,
        "largest_param_mib": max(sizes) / _MIB,
    }


# ---------------------------------------------------------------------------------------------
# memory measurement (inside a worker)
# ---------------------------------------------------------------------------------------------


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def rss_mib() -> float:
    value = _status_mib("VmRSS")
    if value is not None:
        return value
    import psutil

    return psutil.Process().memory_info().rss / _MIB


class PeakRSS:
    """Peak RSS (MiB) over a ``with`` block: kernel high-water mark reset, else a 1 ms sampler."""

    def __init__(self) -> None:
        self.peak = float("nan")
        self.method = "clear_refs+VmHWM"
        self._stop = threading.Event()
        self._samples: list[float] = []
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            if _status_mib("VmHWM") is None:
                raise OSError("no VmHWM")
        except OSError:
            self.method = "psutil sampler (1 ms)"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._samples.append(rss_mib())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            self.peak = _status_mib("VmHWM")  # type: ignore[assignment]
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max([*self._samples, rss_mib()])


def torch_peak_mib(fn: Callable[[], object]) -> float:
    """Peak live bytes of torch CPU allocations made during ``fn()``, from profiler events."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    del prof
    return peak / _MIB


def _step_fn(
    method: str, work: Workload, k: int | None
) -> tuple[Callable[[], object], Callable[[], object]]:
    """(warm-up step, measured step) of a method; all imports happen here, before the baseline."""
    import torch

    if method == "inference":
        return work.losses, work.losses
    if method in ("dpaggzo", CONTROL):
        from zoprivacy.optim.optimizer import DPAggZO

        params = [p for p in work.model.parameters() if p.requires_grad]

        def make(num: int) -> Callable[[], object]:
            opt = DPAggZO(
                params,
                LR,
                num_directions=num,
                clip_norm=CLIP,
                noise_multiplier=SIGMA,
                expected_batch_size=work.batch_size,
                seed=0,
            )
            return lambda: opt.step(work.losses)

        return make(1), make(k)  # type: ignore[arg-type]
    if method == "dpzo":
        from zoprivacy.optim.optimizer import DPZO

        params = [p for p in work.model.parameters() if p.requires_grad]
        opt = DPZO(
            params,
            LR,
            clip_norm=CLIP,
            noise_multiplier=SIGMA,
            expected_batch_size=work.batch_size,
            seed=0,
        )
        return (lambda: opt.step(work.losses)), (lambda: opt.step(work.losses))
    if method == "dpadamw":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        warnings.filterwarnings("ignore", message="Full backward hook")
        work.model.train()
        module = GradSampleModule(work.model)
        opt = DPOptimizer(
            torch.optim.AdamW(module.parameters(), lr=LR),
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            expected_batch_size=work.batch_size,
        )

        def step() -> None:
            loss = work.train_loss(module)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, step
    raise ValueError(f"unknown method {method!r}")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    if spec["quick"]:
        work = tiny_workload()
    else:
        work = real_workload(spec.get("model", "minilm"), spec.get("trainable", "all"))
    warm, measured = _step_fn(spec["method"], work, spec.get("K"))
    load_peak = _status_mib("VmHWM")
    gc.collect()
    baseline = rss_mib()
    file_before = _status_mib("RssFile")
    warm()
    gc.collect()
    with PeakRSS() as peak:
        start = time.perf_counter()
        measured()
        seconds = time.perf_counter() - start
    file_after = _status_mib("RssFile")
    torch_peak = None
    if spec["profile"]:
        gc.collect()
        torch_peak = torch_peak_mib(measured)
    return {
        "method": spec["method"],
        "K": spec.get("K"),
        "peak_rss_mib": peak.peak,
        "extra_step_mib": peak.peak - baseline,
        "baseline_rss_mib": baseline,
        "load_peak_rss_mib": load_peak,
        "file_backed_rss_growth_mib": (
            None if file_before is None or file_after is None else file_after - file_before
        ),
        "torch_peak_step_mib": torch_peak,
        "seconds_per_step": seconds,
        "batch": work.batch_size,
        "seq_len": work.seq_len,
        **param_stats(work.model),
        "rss_method": peak.method,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "model": work.name,
        "model_key": spec.get("model", "tiny" if spec["quick"] else "minilm"),
        "trainable": spec.get("trainable", "all"),
    }


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def run_worker(module: str, spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run ``python -m module --worker spec`` in a fresh single-threaded process; its result."""
    env = {**os.environ, **ENV_ONE_THREAD, **spec.get("env", {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", module, "--worker", json.dumps(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"worker {spec} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1][len(_MARK) :])


def save(name: str, payload: dict[str, Any], out: str | None) -> Path:
    """``write_json`` into ``benchmarks/results``, or the same JSON into ``out`` when given."""
    if out is None:
        return write_json(name, payload)
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def config_key(row: dict[str, Any]) -> str:
    """``"model/trainable"`` of a row; rows of the first run (MiniLM only) are ``minilm/all``."""
    return f"{row.get('model_key', 'minilm')}/{row.get('trainable', 'all')}"


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ratios quoted in the README, for the rows of one configuration."""
    zo = {r["K"]: r["extra_step_mib"] for r in rows if r["method"] == "dpaggzo"}
    adamw = next((r["extra_step_mib"] for r in rows if r["method"] == "dpadamw"), None)
    infer = next((r["extra_step_mib"] for r in rows if r["method"] == "inference"), None)
    dpzo = next((r["extra_step_mib"] for r in rows if r["method"] == "dpzo"), None)
    largest = rows[0]["largest_param_mib"]
    out: dict[str, Any] = {
        "dpaggzo_extra_max_over_min": max(zo.values()) / min(zo.values()) if zo else None,
        "largest_param_mib": largest,
        "dpaggzo_extra_median_mib": statistics.median(zo.values()) if zo else None,
        "dpadamw_extra_mib": adamw,
        "inference_extra_mib": infer,
        "dpzo_extra_mib": dpzo,
    }
    if adamw is not None:
        out["dpadamw_over_dpaggzo_extra"] = {str(k): adamw / v for k, v in zo.items()}
        if dpzo is not None:
            out["dpadamw_over_dpzo_extra"] = adamw / dpzo
    if infer is not None:
        out["dpaggzo_extra_minus_inference_extra_mib"] = {str(k): v - infer for k, v in zo.items()}
    torch_zo = {
        r["K"]: r["torch_peak_step_mib"]
        for r in rows
        if r["method"] == "dpaggzo" and r["torch_peak_step_mib"] is not None
    }
    if len(torch_zo) > 1:
        out["dpaggzo_torch_peak_max_over_min"] = max(torch_zo.values()) / min(torch_zo.values())
    adamw_torch = next((r["torch_peak_step_mib"] for r in rows if r["method"] == "dpadamw"), None)
    if adamw_torch is not None and torch_zo:
        out["dpadamw_over_dpaggzo_torch_peak"] = {
            str(k): adamw_torch / v for k, v in torch_zo.items()
        }
    control = {r["K"]: r["extra_step_mib"] for r in rows if r["method"] == CONTROL}
    if control:
        out["control_mmap64k_extra_mib"] = {str(k): v for k, v in control.items()}
        out["control_mmap64k_extra_max_over_min"] = max(control.values()) / min(control.values())
    for k in (16, 256):
        if k in zo and adamw is not None:
            out[f"dpadamw_over_dpaggzo_extra_K{k}"] = adamw / zo[k]
    return out


def _configs(text: str) -> list[tuple[str, str]]:
    out = []
    for part in filter(None, (t.strip() for t in text.split(","))):
        model, _, trainable = part.partition("/")
        if (model, trainable) not in CONFIGS:
            known = ", ".join(f"{m}/{t}" for m, t in CONFIGS)
            raise SystemExit(f"--configs: unknown {part!r}; choose from {known}")
        out.append((model, trainable))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny MLP, K in {1, 4} (smoke test)")
    parser.add_argument("--out", help="folder for the JSON and PNG (default benchmarks/results)")
    parser.add_argument("--ks", type=int, nargs="+", help="K values (default 1 4 16 64 256)")
    parser.add_argument(
        "--configs",
        default=",".join(f"{m}/{t}" for m, t in CONFIGS),
        help="MODEL/TRAINABLE configurations of the full run, comma-separated (default all: "
        + ", ".join(f"{m}/{t}" for m, t in CONFIGS)
        + ")",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of the existing JSON for configurations (and methods/K) not re-run",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["inference", "dpaggzo", "dpzo", "dpadamw"],
        help="methods of the full run (default inference dpaggzo dpzo dpadamw)",
    )
    parser.add_argument(
        "--profile-max-k",
        type=int,
        default=PROFILE_MAX_K,
        help="also run a torch-profiler step for K up to this (it costs a step)",
    )
    parser.add_argument(
        "--control-ks",
        type=int,
        nargs="*",
        help="K values of the allocator control: DP-AggZO with MALLOC_MMAP_THRESHOLD_=65536 "
        "(default none; the minilm/all control of the first run is kept by --merge)",
    )
    parser.add_argument(
        "--control-only",
        action="store_true",
        help="run only the allocator control and merge it into the existing JSON",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(_MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    ks = args.ks or (QUICK_KS if args.quick else KS)
    control_ks = args.control_ks if args.control_ks is not None else []
    name = "memory_vs_k_quick" if args.quick else "memory_vs_k"
    path_in = (RESULTS if args.out is None else Path(args.out)) / f"{name}.json"
    if args.quick:
        configs = [("tiny", "all")]
        methods = ["inference", "dpaggzo", "dpadamw"]
    else:
        configs = _configs(args.configs)
        methods = args.methods
    specs: list[dict[str, Any]] = []
    for model, trainable in configs:
        where = {} if args.quick else {"model": model, "trainable": trainable}
        control = [{"method": CONTROL, "K": k, "env": CONTROL_ENV, **where} for k in control_ks]
        if args.control_only:
            specs += control
            continue
        for method in methods:
            if method == "dpaggzo":
                specs += [{"method": "dpaggzo", "K": k, **where} for k in ks]
            elif method == "dpzo":
                specs.append({"method": "dpzo", "K": 1, **where})
            else:
                specs.append({"method": method, **where})
        specs += control
    previous = None
    if args.control_only or args.merge:
        previous = json.loads(path_in.read_text())
    rows = []
    started = time.perf_counter()
    for spec in specs:
        spec |= {
            "quick": args.quick,
            "profile": spec["method"] not in ("dpaggzo", CONTROL)
            or spec["K"] <= args.profile_max_k,
        }
        row = run_worker("benchmarks.memory_vs_k", spec)
        rows.append(row)
        torch_peak = row["torch_peak_step_mib"]
        print(
            f"{config_key(row):<20} {row['method']:<15} K={row['K']!s:<4} extra "
            f"{row['extra_step_mib']:8.1f} MiB  peak RSS {row['peak_rss_mib']:8.1f} MiB  torch "
            f"peak {'-' if torch_peak is None else f'{torch_peak:.1f}'} MiB  "
            f"{row['seconds_per_step']:7.2f} s/step",
            flush=True,
        )
    if previous is not None:
        done = {(config_key(r), r["method"], r["K"]) for r in rows}
        kept = [r for r in previous["rows"] if (config_key(r), r["method"], r["K"]) not in done]
        all_rows = kept + rows
        payload = previous
        payload["rows"] = all_rows
        payload["config"].setdefault("runs", []).append(
            {
                "machine": machine(),
                "configs": [f"{m}/{t}" for m, t in configs],
                "specs": [
                    f"{s.get('model')}/{s.get('trainable')} {s['method']} K={s.get('K')}"
                    for s in specs
                ],
                "wall_seconds": time.perf_counter() - started,
            }
        )
    else:
        all_rows = rows
        first = rows[0]
        payload = {
            "machine": machine(),
            "config": {
                "batch": first["batch"]
                if args.quick
                else {"minilm": BATCH, "smollm2": SMOLLM2_BATCH},
                "seq_len": first["seq_len"],
                "max_length": None
                if args.quick
                else {"minilm": MAX_LENGTH, "smollm2": SMOLLM2_MAX_LENGTH},
                "model": first["model"],
                "model_params": first["model_params"],
                "largest_param_mib": first["largest_param_mib"],
                "clip_norm": CLIP,
                "noise_multiplier": SIGMA,
                "ks": list(ks),
                "dpaggzo_warmup_k": 1,
                "profile_max_k": args.profile_max_k,
                "threads_per_process": 1,
                "quick": args.quick,
                "control_ks": list(control_ks),
                "control_env": CONTROL_ENV,
                "wall_seconds": time.perf_counter() - started,
            },
            "rows": rows,
        }
    by_config: dict[str, list[dict[str, Any]]] = {}
    for r in all_rows:
        by_config.setdefault(config_key(r), []).append(r)
    if args.quick:
        payload["ratios"] = ratios(all_rows)
    else:
        payload["ratios_by_config"] = {k: ratios(v) for k, v in by_config.items()}
        payload["ratios"] = payload["ratios_by_config"].get("minilm/all", {})
    path = save(f"{name}.json", payload, args.out)
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path}")


def plot(payload: dict[str, Any], path: Path) -> None:
    """One panel per configuration: extra memory of a step against K, baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_config: dict[str, list[dict[str, Any]]] = {}
    for r in payload["rows"]:
        by_config.setdefault(config_key(r), []).append(r)
    keys = sorted(by_config)
    cols = min(2, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 4.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        _panel(ax, key, by_config[key])
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(ax: Any, key: str, rows: list[dict[str, Any]]) -> None:
    zo = sorted((r for r in rows if r["method"] == "dpaggzo"), key=lambda r: r["K"])
    ks = [r["K"] for r in zo]
    ax.plot(ks, [r["extra_step_mib"] for r in zo], "o-", label="DP-AggZO (peak RSS − baseline)")
    prof = [(r["K"], r["torch_peak_step_mib"]) for r in zo if r["torch_peak_step_mib"] is not None]
    if prof:
        ax.plot(*zip(*prof, strict=True), "s--", ms=4, label="DP-AggZO (torch allocations)")
    control = sorted((r for r in rows if r["method"] == CONTROL), key=lambda r: r["K"])
    if control:
        ax.plot(
            [r["K"] for r in control],
            [r["extra_step_mib"] for r in control],
            "^-.",
            ms=5,
            label="DP-AggZO, MALLOC_MMAP_THRESHOLD_=65536 (RSS)",
        )
    for method, style, label in (
        ("dpadamw", "r-", "Opacus DP-AdamW"),
        ("dpzo", "g--", "DPZO (K = 1)"),
        ("inference", "k:", "inference forward only"),
    ):
        value = next((r["extra_step_mib"] for r in rows if r["method"] == method), None)
        if value is not None:
            ax.axhline(value, color=style[0], ls=style[1:], label=f"{label} ({value:.0f} MiB)")
    first = rows[0]
    ax.axhline(
        first["largest_param_mib"],
        color="grey",
        ls="-.",
        lw=0.8,
        label="largest trainable tensor (scratch buffer)",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if ks:
        ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (directions per step)")
    ax.set_ylabel("extra memory of a step (MiB, log)")
    ax.set_title(
        f"{first['model']} [{key}], {first['model_params'] / 1e6:.3g}M trainable, "
        f"batch {first['batch']}×{first['seq_len']}",
        fontsize=9,
    )
    ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
