"""Zero-drift substitution path, in-place fallback, Rademacher directions, forward differences,
batched directions: each against the plain in-place path or a direct re-implementation."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from zoprivacy.optim.directions import RADEMACHER_CHUNK_WORDS, direction_tensor, fill_direction_
from zoprivacy.optim.optimizer import DPAggZO, MeZO

pytestmark = [
    pytest.mark.filterwarnings("ignore::zoprivacy.optim.optimizer.NotPrivateWarning"),
    pytest.mark.filterwarnings("ignore::zoprivacy.noise.source.PredictableNoiseWarning"),
]


def _mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)
    ).to(dtype)


def _data(dtype=torch.float64, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g).to(dtype), torch.randn(n, 3, generator=g).to(dtype)


def _losses(model, x, y):
    return lambda: ((model(x) - y) ** 2).float().sum(1)


def _opt(params, **kw):
    base = dict(
        num_directions=3,
        clip_norm=2.0,
        noise_multiplier=0.7,
        expected_batch_size=5,
        seed=11,
        noise_seed=5,
    )
    base.update(kw)
    lr = base.pop("lr", 0.05)
    return DPAggZO(params, lr, **base)


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------- zero drift
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hooks_leave_parameters_bit_exact(dtype):
    """lr = 0: 50 steps × K = 4 (400 perturbed evaluations) leave θ bit for bit; the in-place
    path, given the same work, drifts."""
    x, y = _data(dtype)
    drift = {}
    for path in ("auto", "inplace"):
        model = _mlp(dtype)
        before = _snapshot(model)
        opt = MeZO(model.parameters(), 0.0, num_directions=4, seed=3, perturbation=path)
        for _ in range(50):
            stats = opt.step(_losses(model, x, y))
        assert stats.perturbation_path == ("hooks" if path == "auto" else "inplace")
        drift[path] = max(
            float((p.detach().double() - b.double()).abs().max())
            for p, b in zip(model.parameters(), before, strict=True)
        )
        if path == "auto":
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert drift["auto"] == 0.0 and drift["inplace"] > 0.0


def test_hooks_match_inplace_numerics():
    """float64: the two paths evaluate the same points, so S and θ agree to rounding."""
    x, y = _data()
    results = {}
    for path in ("hooks", "inplace"):
        model = _mlp()
        opt = _opt(model.parameters(), perturbation=path)
        sums = [opt.step(_losses(model, x, y)).noisy_sum for _ in range(3)]
        results[path] = (
            torch.stack(sums),
            torch.cat([p.detach().flatten() for p in model.parameters()]),
        )
    assert torch.allclose(results["hooks"][0], results["inplace"][0], rtol=1e-7, atol=1e-9)
    assert torch.allclose(results["hooks"][1], results["inplace"][1], rtol=0, atol=1e-12)


def test_exception_leaves_parameters_bit_exact():
    x, y = _data(torch.float32)
    model = _mlp(torch.float32)
    opt = _opt(model.parameters())
    opt.step(_losses(model, x, y))
    before = _snapshot(model)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return _losses(model, x, y)()

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert opt.steps_taken == 1


# ---------------------------------------------------------------- what the substitution sees
class TiedLM(torch.nn.Module):
    """Embedding whose weight is also read directly (not through a module call) as the head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 8).double()
        self.mix = torch.nn.Linear(8, 8).double()

    def forward(self, ids, rows):
        h = torch.tanh(self.mix(self.emb(ids).mean(1)))
        return h @ self.emb.weight[rows].T  # the tied "head", read outside any module


def test_tied_weight_read_twice_is_perturbed_consistently():
    model = TiedLM()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 1]])
    rows = torch.tensor([2, 9])
    labels = torch.tensor([0, 1, 1])

    def closure():
        return F.cross_entropy(model(ids, rows), labels, reduction="none")

    sums = {}
    for path in ("auto", "inplace"):
        for p, p0 in zip(model.parameters(), TiedLM().parameters(), strict=True):
            p.data.copy_(p0)
        opt = _opt(model.parameters(), perturbation=path, lr=0.0)
        stats = opt.step(closure)
        sums[path] = stats.noisy_sum
        if path == "auto":
            assert stats.perturbation_path == "hooks"
            # embedding read twice per evaluation: 2 generations, the Linear's 2 tensors once
            assert stats.generations == 3 * 2 * (2 + 2)
    assert torch.allclose(sums["auto"], sums["inplace"], rtol=1e-8, atol=1e-10)


def test_escaping_view_is_not_overwritten():
    """A closure that keeps w.t() (a view of the substituted tensor) while other tensors are
    substituted still computes with the right values."""
    x, y = _data()
    model = torch.nn.Linear(6, 3).double()
    w, b = model.weight, model.bias

    def closure():
        wt = w.t()  # view of the perturbed w, kept across the next substitution
        shifted = b + 0.0  # substitutes b (would reuse the buffer)
        return ((x @ wt + shifted - y) ** 2).sum(1)

    sums = {}
    for path in ("auto", "inplace"):
        with torch.no_grad():
            w.copy_(torch.linspace(-1, 1, 18, dtype=torch.float64).view(3, 6))
            b.zero_()
        sums[path] = _opt([w, b], perturbation=path, lr=0.0).step(closure).noisy_sum
    assert torch.allclose(sums["auto"], sums["inplace"], rtol=1e-8, atol=1e-10)


def test_auto_falls_back_in_place_for_hidden_reads():
    """A tensor read with torch functions disabled (as TorchScript or a C++ extension would) is
    moved to the in-place path: same result as the in-place path, path 'mixed'."""
    x, y = _data()
    model = torch.nn.Linear(6, 3).double()

    def closure():
        out = F.linear(x, model.weight)
        with torch._C.DisableTorchFunction():
            out = out + model.bias  # hidden from the substitution
        return ((out - y) ** 2).sum(1)

    init = [p.detach().clone() for p in model.parameters()]
    sums = {}
    for path in ("auto", "inplace"):
        for p, p0 in zip(model.parameters(), init, strict=True):
            p.data.copy_(p0)
        opt = _opt(model.parameters(), perturbation=path)
        stats = opt.step(closure)
        sums[path] = (stats.noisy_sum, model.bias.detach().clone())
        if path == "auto":
            assert stats.perturbation_path == "mixed" and opt.inplace_tensors == (1,)
            assert opt.step(closure).perturbation_path == "mixed"  # remembered
    assert torch.allclose(sums["auto"][0], sums["inplace"][0], rtol=1e-8, atol=1e-10)
    with pytest.warns(RuntimeWarning, match="not read through torch functions"):
        _opt(model.parameters(), perturbation="hooks").step(closure)


def test_empty_batch_does_not_settle_the_path():
    x, y = _data()
    model = _mlp()
    opt = _opt(model.parameters())
    assert opt.step(lambda: torch.zeros(0)).perturbation_path == "hooks"
    assert opt.inplace_tensors == ()
    assert opt.step(_losses(model, x, y)).perturbation_path == "hooks"


def test_generation_counts():
    """Per tensor and step: hooks 2K + K, in place 3K + K, forward differences K + K."""
    x, y = _data()
    n, k = 6, 3
    counts = {}
    for path, diff in (("auto", "central"), ("inplace", "central"), ("auto", "forward")):
        model = _mlp()
        opt = _opt(model.parameters(), perturbation=path, difference=diff, num_directions=k)
        counts[(path, diff)] = opt.step(_losses(model, x, y)).generations
    assert counts[("auto", "central")] == n * 3 * k
    assert counts[("inplace", "central")] == n * 4 * k
    assert counts[("auto", "forward")] == n * 2 * k


# ---------------------------------------------------------------- Rademacher
@pytest.mark.parametrize("n", [1, 7, 8, 63, 1000, 2 * 64 * RADEMACHER_CHUNK_WORDS + 13])
def test_rademacher_values_and_balance(n):
    z = direction_tensor((n,), seed=3, step=1, k=2, index=0, kind="rademacher")
    assert set(z.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(z, direction_tensor((n,), seed=3, step=1, k=2, index=0, kind="rademacher"))
    if n >= 1000:
        assert abs(float(z.mean())) < 5 / math.sqrt(n)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        zd = direction_tensor((n,), seed=3, step=1, k=2, index=0, kind="rademacher", dtype=dtype)
        assert torch.equal(zd.float(), z)  # the signs do not depend on the dtype


def test_rademacher_second_moment_is_identity():
    d, m = 6, 4000
    zs = torch.stack(
        [direction_tensor((d,), seed=1, step=0, k=k, index=0, kind="rademacher") for k in range(m)]
    ).double()
    second = zs.T @ zs / m
    assert torch.allclose(second, torch.eye(d, dtype=torch.float64), atol=5 / math.sqrt(m))
    with pytest.raises(ValueError, match="contiguous"):
        fill_direction_(torch.empty(4, 4).t(), 1, kind="rademacher")
    with pytest.raises(ValueError, match="directions must be one of"):
        DPAggZO(
            [torch.nn.Parameter(torch.zeros(2))],
            0.1,
            num_directions=1,
            clip_norm=1.0,
            noise_multiplier=1.0,
            expected_batch_size=1,
            directions="sphere",
        )


def test_rademacher_update_uses_the_public_directions():
    """θ_new − θ_old = −(η/b) Σ_k S_k z_k with z_k = direction_tensor(..., kind='rademacher')."""
    x, y = _data()
    model = torch.nn.Linear(6, 3).double()
    before = [p.detach().clone() for p in model.parameters()]
    lr, b, seed = 0.05, 5.0, 7
    opt = _opt(model.parameters(), directions="rademacher", lr=lr, seed=seed)
    stats = opt.step(_losses(model, x, y))
    for i, (p, p0) in enumerate(zip(model.parameters(), before, strict=True)):
        expected = p0.clone()
        for k in range(3):
            z = direction_tensor(
                p.shape, seed=seed, step=0, k=k, index=i, dtype=p.dtype, kind="rademacher"
            )
            expected -= lr / b * float(stats.noisy_sum[k]) * z
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-13)


# ---------------------------------------------------------------- forward differences
def test_forward_differences_match_direct_reimplementation(monkeypatch):
    import zoprivacy.noise.source

    monkeypatch.setattr(
        zoprivacy.noise.source.NoiseSource,
        "add_noise",
        lambda self, values, std, sensitivity=None: values.to(torch.float64),
    )
    x, y = _data()
    model = torch.nn.Linear(6, 3).double()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    phi, c, seed, k = 1e-4, 0.5, 9, 3
    calls = []

    def closure():
        calls.append(1)
        return ((model(x) - y) ** 2).sum(1)

    opt = _opt(
        model.parameters(),
        difference="forward",
        perturbation_scale=phi,
        clip_norm=c,
        num_directions=k,
        seed=seed,
        lr=0.1,
    )
    stats = opt.step(closure)
    assert len(calls) == k + 1

    def loss(w, b):
        return ((x @ w.T + b - y) ** 2).sum(1)

    base = loss(w0, b0)
    cols = []
    for kk in range(k):
        zw = direction_tensor(w0.shape, seed=seed, step=0, k=kk, index=0, dtype=torch.float64)
        zb = direction_tensor(b0.shape, seed=seed, step=0, k=kk, index=1, dtype=torch.float64)
        cols.append((loss(w0 + phi * zw, b0 + phi * zb) - base) / phi)
    agg = torch.stack(cols, 1) / k
    norms = agg.norm(dim=1, keepdim=True)
    clipped = agg * torch.clamp(c / norms, max=1.0)
    assert torch.allclose(stats.noisy_sum, clipped.sum(0), rtol=1e-6, atol=1e-9)
    assert (clipped.norm(dim=1) <= c * (1 + 1e-12)).all()  # sensitivity still c
    assert stats.loss == pytest.approx(float(base.mean()), rel=1e-12)
    assert stats.difference == "forward"


def test_forward_differences_replay_the_rng_for_every_evaluation():
    p = torch.nn.Parameter(torch.zeros(4))
    draws = []

    def closure():
        draws.append(torch.rand(3))
        return (p * 0).sum().reshape(1) + draws[-1][:1]

    MeZO([p], 0.1, num_directions=3, difference="forward", seed=0).step(closure)
    assert len(draws) == 4 and all(torch.equal(draws[0], d) for d in draws)


# ---------------------------------------------------------------- batched directions
@pytest.mark.parametrize("difference", ["central", "forward"])
def test_batched_directions_match_sequential(difference):
    x, y = _data()
    results = {}
    for batched in (None, 2):
        model = _mlp()
        opt = _opt(
            model.parameters(), batched_directions=batched, difference=difference, num_directions=5
        )
        stats = opt.step(_losses(model, x, y))
        results[batched] = (stats, torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert results[2][0].perturbation_path == "batched"
    assert torch.allclose(results[2][0].noisy_sum, results[None][0].noisy_sum, rtol=1e-6, atol=1e-8)
    assert torch.allclose(results[2][1], results[None][1], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="inplace"):
        _opt(_mlp().parameters(), batched_directions=2, perturbation="inplace")


# ---------------------------------------------------------------- memory
def _peak(fn):
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
    return peak


@pytest.mark.parametrize(
    ("perturbation", "directions", "difference", "slack"),
    [
        ("auto", "gaussian", "central", 256 << 10),
        ("auto", "rademacher", "forward", 1 << 20),
        ("inplace", "gaussian", "central", 256 << 10),
        ("inplace", "rademacher", "central", 1 << 20),
    ],
)
def test_peak_memory_is_one_scratch_and_flat_in_k(perturbation, directions, difference, slack):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 256)
    )
    x, y = torch.randn(4, 512), torch.randn(4, 256)
    largest = 512 * 1024 * 4
    peaks = {}
    for k in (1, 32):
        opt = _opt(
            model.parameters(),
            num_directions=k,
            directions=directions,
            difference=difference,
            perturbation=perturbation,
            expected_batch_size=4,
            lr=1e-3,
        )
        closure = _losses(model, x, y)
        opt.step(closure)
        peaks[k] = _peak(lambda o=opt, c=closure: o.step(c))
        assert opt.perturbation_path == ("hooks" if perturbation == "auto" else "inplace")
    assert largest <= peaks[1] <= largest + slack
    assert peaks[32] - peaks[1] <= 64 * 1024, peaks


def test_options_are_validated_and_saved():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="perturbation"):
        _opt([p], perturbation="fast")
    with pytest.raises(ValueError, match="difference"):
        _opt([p], difference="backward")
    opt = _opt([p], directions="rademacher", difference="forward", perturbation="inplace")
    sd = opt.state_dict()["zoprivacy"]
    assert (sd["directions"], sd["difference"], sd["perturbation"]) == (
        "rademacher",
        "forward",
        "inplace",
    )
    other = _opt([torch.nn.Parameter(torch.zeros(3))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other.load_state_dict(opt.state_dict())
    assert (other.directions, other.difference, other.perturbation) == (
        "rademacher",
        "forward",
        "inplace",
    )


# ---------------------------------------------------------------- benchmark scripts
def test_benchmark_scripts_run_quick(tmp_path):
    import json

    from benchmarks import drift, step_time_paths

    drift.main(["--quick", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "drift_quick.json").read_text())["rows"]
    assert {r["path"] for r in rows if r["max_ulps"] == 0} >= {"hooks", "hooks_forward"}
    assert all(r["max_ulps"] > 0 for r in rows if r["path"] == "inplace")
    step_time_paths.main(["--quick", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "step_time_paths_quick.json").read_text())
    row = next(iter(payload["paths"].values()))["rows"][0]
    assert row["paths"]["hooks"]["perturbation_path"] == "hooks"
    assert (tmp_path / "step_time_paths_quick.png").exists()
    paired_dir = tmp_path / "paired"
    step_time_paths.main(
        ["--quick", "--paired-forwards", "--paths", "hooks_lowrank", "--out", str(paired_dir)]
    )
    payload = json.loads((paired_dir / "step_time_paths_quick.json").read_text())
    for row in next(iter(payload["paths"].values()))["rows"]:
        entry = row["paths"]["hooks_lowrank"]
        assert len(entry["paired_2k_forward_seconds"]) == row["repeats"]
        assert entry["over_paired_2k_forward"] > 0
    assert "paired" in step_time_paths.markdown_tables(payload)


def test_threads_section_runs_on_the_packaged_minilm():
    """The wall-clock threads section, at its smallest: batch 2, K = 1, one repeat."""
    import argparse

    from benchmarks import step_time_paths
    from zoprivacy.optim.directions import generation_threads

    args = argparse.Namespace(
        threads=2, threads_batches=[2], threads_ks=[1], repeats=1, forward_repeats=1
    )
    rows = step_time_paths.run_threads(args)
    assert [(r["batch"], r["K"], r["threads"]) for r in rows] == [(2, 1, 2)]
    paths = rows[0]["paths"]
    assert set(paths) == set(step_time_paths.THREAD_PATHS)
    assert all(p["wall_seconds"] > 0 and p["over_2k_forward"] > 0 for p in paths.values())
    assert paths["hooks"]["paper_reference"] == "paper"
    assert torch.get_num_threads() == 1 and generation_threads() == 1  # restored


def test_generation_benchmark_times_the_three_generators(tmp_path):
    import json

    from benchmarks import generation

    generation.main(["--models", "minilm", "--repeats", "1", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "generation.json").read_text())["rows"][0]
    assert row["values"] > 20_000_000 and set(row["seconds"]) == {
        "whole_tensor",
        "chunked_1",
        "chunked_2",
    }
    assert row["over_whole_tensor"]["whole_tensor"] == 1.0
