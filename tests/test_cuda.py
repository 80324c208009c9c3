"""CUDA readiness (issue 16): the optimizer, the direction kinds, the perturbation paths, prefix
caching and the fine-tuning job on a CUDA device.

Every test but the benchmark smoke test is marked ``cuda`` and skipped without a device; run
them with ``pytest -m cuda`` (``scripts/gpu_check.sh`` does, on a fresh GPU machine). The
references are computed here from the public definitions (``direction_tensor`` for z_k, a
``functional_call`` at θ ± φz_k for Δ_k, Algorithm 1 lines 12 and 16 written out), not from the
optimizer's code paths. The ``_check_*`` helpers take the device, so they can also be exercised
on a CPU while editing this file.
"""

from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch

from tests.conftest import regression_data, seeded_mlp
from zoprivacy import DPAggZO, PrefixCache
from zoprivacy.optim.directions import DIRECTION_KINDS, DirectionStream, direction_tensor

pytestmark = [
    pytest.mark.filterwarnings("ignore::zoprivacy.optim.optimizer.NotPrivateWarning"),
    pytest.mark.filterwarnings("ignore::zoprivacy.noise.source.PredictableNoiseWarning"),
]

HAS_CUDA = torch.cuda.is_available()


def on_cuda(fn):
    """Mark a test ``cuda`` and skip it when no CUDA device is available."""
    fn = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")(fn)
    return pytest.mark.cuda(fn)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


# ---------------------------------------------------------------------------------------------
# the optimizer: one step against Algorithm 1 written out
# ---------------------------------------------------------------------------------------------
K, LR, PHI, SEED, B = 3, 0.05, 1e-3, 17, 8.0


def _mlp_and_data(device, dtype=torch.float64):
    model = seeded_mlp(5, 7, 1, seed=2, dtype=dtype).to(device)
    x, y = regression_data(8, 5, seed=4, dtype=dtype)
    return model, x.to(device), y.to(device)


def _losses_at(model, x, y, shift):
    """Per-record squared errors with every trainable tensor θ_i replaced by θ_i + shift_i."""
    named = {n: p.detach() + shift[i] for i, (n, p) in enumerate(model.named_parameters())}
    out = torch.func.functional_call(model, named, (x,))
    return (out.squeeze(-1) - y) ** 2


def _reference_step(model, x, y, kind, rank=None, refresh=None):
    """S = Σ_x Δ_agg(x) (c = ∞, σ = 0) and θ − (η/b) Σ_k S_k z_k, from direction_tensor."""
    params = [p.detach() for p in model.parameters()]
    zs = [
        [
            direction_tensor(p.shape, seed=SEED, step=0, k=k, index=i, dtype=p.dtype,
                             device=p.device, kind=kind, rank=rank, refresh=refresh)
            for i, p in enumerate(params)
        ]
        for k in range(K)
    ]  # fmt: skip
    deltas = []
    for z in zs:
        plus = _losses_at(model, x, y, [PHI * t for t in z])
        minus = _losses_at(model, x, y, [-PHI * t for t in z])
        deltas.append((plus - minus).double() / (2 * PHI))
    summed = (torch.stack(deltas, dim=1) / K).sum(dim=0).cpu()  # lines 10-12, no clipping
    updated = [
        p - (LR / B) * sum(float(summed[k]) * zs[k][i] for k in range(K))
        for i, p in enumerate(params)
    ]
    return summed, updated


def _noiseless(model, kind, **options):
    return DPAggZO(
        list(model.parameters()), LR, num_directions=K, clip_norm=1e9, noise_multiplier=0.0,
        expected_batch_size=B, perturbation_scale=PHI, seed=SEED, directions=kind, **options,
    )  # fmt: skip


def _check_step_matches_reference(device, kind):
    model, x, y = _mlp_and_data(device)
    options = {"direction_rank": 2, "direction_refresh": 2} if kind == "lowrank" else {}
    summed, updated = _reference_step(
        model, x, y, kind, options.get("direction_rank"), options.get("direction_refresh")
    )
    stats = _noiseless(model, kind, **options).step(lambda: (model(x).squeeze(-1) - y) ** 2)
    assert stats.noisy_sum.device.type == "cpu" and stats.noisy_sum.dtype == torch.float64
    torch.testing.assert_close(stats.noisy_sum, summed, rtol=1e-6, atol=1e-9)
    for p, ref in zip(model.parameters(), updated, strict=True):
        assert p.device == torch.device(device)
        torch.testing.assert_close(p.detach(), ref, rtol=1e-9, atol=1e-12)


@on_cuda
@pytest.mark.parametrize("kind", DIRECTION_KINDS)
def test_step_on_cuda_matches_algorithm_1(kind):
    """Lines 5-16 on CUDA parameters: S and the update equal the written-out algorithm."""
    _check_step_matches_reference(_device(), kind)


def _private_step(device, kind):
    model, x, y = _mlp_and_data(device, torch.float32)
    options = {"direction_rank": 2} if kind == "lowrank" else {}
    opt = DPAggZO(
        list(model.parameters()), LR, num_directions=K, clip_norm=1.0, noise_multiplier=1.3,
        expected_batch_size=B, seed=SEED, noise_seed=9, directions=kind, **options,
    )  # fmt: skip
    stats = opt.step(lambda: (model(x).squeeze(-1) - y) ** 2)
    return stats, [p.device for p in model.parameters()]


def _check_release_structure(device, kind):
    stats, devices = _private_step(device, kind)
    cpu_stats, _ = _private_step("cpu", kind)
    assert all(d == torch.device(device) for d in devices)  # parameters stay on the device
    for s in (stats, cpu_stats):  # the release: a float64 CPU K-vector, noise std σ·c
        assert s.noisy_sum.shape == (K,) and s.noisy_sum.dtype == torch.float64
        assert s.noisy_sum.device.type == "cpu" and torch.isfinite(s.noisy_sum).all()
    public = ("num_directions", "noise_std", "normalizer", "clip_norm", "noise_multiplier",
              "directions", "batch_size", "generations", "perturbation_path")  # fmt: skip
    for name in public:
        assert getattr(stats, name) == getattr(cpu_stats, name), name


@on_cuda
@pytest.mark.parametrize("kind", DIRECTION_KINDS)
def test_private_step_on_cuda_releases_what_the_cpu_step_releases(kind):
    """Same K-vector release (float64 on the CPU, noise and clipping arithmetic there), same
    public facts and generation count as on the CPU; the parameters never leave the device."""
    _check_release_structure(_device(), kind)


# ---------------------------------------------------------------------------------------------
# the three direction kinds on the device
# ---------------------------------------------------------------------------------------------
def _check_directions(device, kind, draws=2000):
    shape = (4, 3)
    options = {"rank": 2, "refresh": 1} if kind == "lowrank" else {}
    one = functools.partial(direction_tensor, shape, seed=5, step=1, index=0,
                            dtype=torch.float32, device=device, kind=kind, **options)  # fmt: skip
    z = one(k=0)
    assert z.device == torch.device(device) and z.dtype == torch.float32
    assert torch.equal(z, one(k=0)) and not torch.equal(z, one(k=1))  # a function of the seed
    if kind == "rademacher":
        assert bool(((z == 1) | (z == -1)).all())
    samples = torch.stack([one(k=k).flatten() for k in range(draws)]).double()
    second = samples.T @ samples / draws  # E[z zᵀ] = I
    assert float(samples.mean(dim=0).abs().max()) < 0.15
    assert float((second.diagonal() - 1).abs().max()) < 0.3
    assert float((second - torch.diag(second.diagonal())).abs().max()) < 0.2


def _check_stream_on_device(device, kind):
    """The optimizer's DirectionStream writes the same values as direction_tensor, on device."""
    p = torch.zeros(6, 5, device=device)
    options = {"rank": 3, "refresh": 2} if kind == "lowrank" else {}
    stream = DirectionStream([p], seed=8, step=3, kind=kind, **options)
    out = stream.fill(1, 0, torch.empty_like(p))
    ref = direction_tensor(p.shape, seed=8, step=3, k=1, index=0, device=device, kind=kind,
                           **options)  # fmt: skip
    assert out.device == p.device and torch.equal(out, ref)


@on_cuda
@pytest.mark.parametrize("kind", DIRECTION_KINDS)
def test_directions_are_generated_on_the_device(kind):
    _check_directions(_device(), kind)
    _check_stream_on_device(_device(), kind)


# ---------------------------------------------------------------------------------------------
# perturbation paths: a failing closure leaves θ as it was
# ---------------------------------------------------------------------------------------------
def _check_failing_closure(device, perturbation):
    model, x, y = _mlp_and_data(device, torch.float32)
    opt = DPAggZO(
        list(model.parameters()), LR, num_directions=K, clip_norm=1.0, noise_multiplier=1.0,
        expected_batch_size=B, seed=SEED, noise_seed=1, perturbation=perturbation,
    )  # fmt: skip
    opt.step(lambda: (model(x).squeeze(-1) - y) ** 2)  # the path is discovered
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return (model(x).squeeze(-1) - y) ** 2

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert opt.steps_taken == 1
    for p, b in zip(model.parameters(), before, strict=True):
        assert p.device == b.device
        if perturbation == "inplace":  # restored by arithmetic: to rounding (documented)
            torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)
        else:  # zero drift: θ never written
            assert torch.equal(p, b)
    return opt.perturbation_path


@on_cuda
@pytest.mark.parametrize("perturbation", ["auto", "hooks", "inplace"])
def test_failing_closure_leaves_cuda_parameters_unchanged(perturbation):
    path = _check_failing_closure(_device(), perturbation)
    assert path == ("inplace" if perturbation == "inplace" else "hooks")


# ---------------------------------------------------------------------------------------------
# prefix caching on a tiny BERT
# ---------------------------------------------------------------------------------------------
def _tiny_bert(device):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(config)
    model = model.double().to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for module in (model.classifier, model.bert.pooler, model.bert.encoder.layer[-1]):
        for p in module.parameters():
            p.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(6, 10, dtype=torch.long)
    mask[3:, 7:] = 0
    batch = {
        "input_ids": torch.randint(1, 64, (6, 10), generator=g),
        "attention_mask": mask,
        "token_type_ids": torch.zeros(6, 10, dtype=torch.long),
        "labels": torch.tensor([0, 1, 1, 0, 1, 0]),
    }
    return model, {k: v.to(device) for k, v in batch.items()}


def _check_prefix_cache(device):
    from zoprivacy import tasks

    model, batch = _tiny_bert(device)
    plain_model = copy.deepcopy(model)
    cache = PrefixCache(model)
    assert cache.enabled and cache.first_trainable == 2
    cached = cache.wrap(functools.partial(tasks.sequence_classification_losses, model))
    plain = functools.partial(tasks.sequence_classification_losses, plain_model)
    torch.testing.assert_close(cached(batch), plain(batch), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cached(batch), plain(batch), rtol=1e-12, atol=1e-12)
    assert (cache.misses, cache.hits) == (1, 1)
    results = []
    for net, losses in ((model, cached), (plain_model, plain)):
        params = [p for p in net.parameters() if p.requires_grad]
        opt = DPAggZO(
            params, 1e-2, num_directions=2, clip_norm=1.0, noise_multiplier=1.0,
            expected_batch_size=6, perturbation_scale=1e-2, seed=3, noise_seed=1,
        )  # fmt: skip
        stats = opt.step(lambda losses=losses: losses(batch))
        results.append((stats.noisy_sum, [p.detach().clone() for p in params]))
    assert cache.hits >= 2 * 2  # the step's perturbed evaluations skipped the frozen layers
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-9, atol=1e-9)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert a.device == torch.device(device)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@on_cuda
def test_prefix_cache_on_cuda_matches_the_full_model():
    _check_prefix_cache(_device())


# ---------------------------------------------------------------------------------------------
# the fine-tuning job
# ---------------------------------------------------------------------------------------------
@on_cuda
def test_finetune_job_runs_on_cuda(tmp_path):
    from tests.test_finetune import TINY
    from zoprivacy.cli import main
    from zoprivacy.tasks.packaged import PackageNotInstalled, package_dir

    try:
        package_dir("minilm"), package_dir("rotten_tomatoes")
    except PackageNotInstalled as exc:
        pytest.skip(str(exc))
    out = tmp_path / "run"
    argv = ["finetune", *TINY, "--steps", "3", "--device", "cuda", "--output", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["device"].startswith("cuda") and report["completed"]


# ---------------------------------------------------------------------------------------------
# the GPU benchmark's CPU smoke run (no device needed)
# ---------------------------------------------------------------------------------------------
def test_gpu_step_time_quick_smoke(tmp_path):
    """``--quick``: a tiny MLP on the CPU; the JSON holds every kind's ratio and the documented
    generation count per central step on the substitution path (n trainable tensors): 3K·n
    (Gaussian, Rademacher), 2K·n (direction buffer), K·n (low rank)."""
    from benchmarks import gpu_step_time

    path = gpu_step_time.main(["--quick", "--output", str(tmp_path)])
    payload = json.loads(path.read_text())
    assert payload["device"]["type"] == "cpu" and payload["torch"] == torch.__version__
    rows = payload["rows"]
    k, n = payload["num_directions"], 4  # the MLP 32-64-2 has two weights and two biases
    expected = {"gaussian": 3 * k * n, "rademacher": 3 * k * n, "gaussian_buffer": 2 * k * n,
                "lowrank": k * n}  # fmt: skip
    assert {r["directions"] for r in rows} == set(expected)
    for row in rows:
        assert row["generations_per_step"] == expected[row["directions"]], row
        assert row["perturbation_path"] == "hooks"
        assert row["step_over_2k_forward"] > 0 and math.isfinite(row["step_over_2k_forward"])
        assert row["step_seconds"] > 0 and row["forward_seconds"] > 0
