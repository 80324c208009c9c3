"""DP-AggZO optimizer: the update against independent re-implementations, directions, resume."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

import zoprivacy.noise.source
from zoprivacy.noise.source import PredictableNoiseWarning
from zoprivacy.optim.directions import direction_tensor, fill_direction_, tensor_seeds
from zoprivacy.optim.optimizer import DPZO, DPAggZO, MeZO, NotPrivateWarning
from zoprivacy.optim.stats import StepStats

pytestmark = [
    pytest.mark.filterwarnings("ignore::zoprivacy.optim.optimizer.NotPrivateWarning"),
    pytest.mark.filterwarnings("ignore::zoprivacy.noise.source.PredictableNoiseWarning"),
]


# ---------------------------------------------------------------- a tiny model, written twice
def record_losses(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Per-record loss of a one-layer tanh regression, as a pure function of the tensors."""
    return ((torch.tanh(x @ w.T + b) - y) ** 2).sum(dim=1)


def make_problem(dtype=torch.float64, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(3, 5, generator=g, dtype=dtype) * 0.5)
    b = torch.nn.Parameter(torch.randn(3, generator=g, dtype=dtype) * 0.1)
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    y = torch.randn(n, 3, generator=g, dtype=dtype)
    return w, b, x, y


def z_of(shape, seed, step, k, index, dtype=torch.float64):
    return direction_tensor(shape, seed=seed, step=step, k=k, index=index, dtype=dtype).double()


# ---------------------------------------------------------------- K = 1 (DPZO) reference
def test_dpzo_matches_direct_reimplementation(monkeypatch):
    """One DPZO step equals Algorithm 1 with K = 1 written out independently in float64.

    Covers clipping (c chosen so that some records are clipped), injected noise, two param groups
    with different lr and weight decay, and a frozen tensor that must be skipped and not counted.
    """
    w, b, x, y = make_problem()
    frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.float64), requires_grad=False)
    injected = torch.tensor([0.37], dtype=torch.float64)
    seen_std = []

    def fake_noise(k, std, generator):
        seen_std.append(std)
        return injected.clone() * std

    def fake_release(self, values, std, *, sensitivity=None):  # the OS-entropy release path
        return values.to(torch.float64) + fake_noise(values.numel(), std, None)

    monkeypatch.setattr(zoprivacy.noise.source.NoiseSource, "add_noise", fake_release)
    lr1, wd1, lr2 = 0.1, 0.01, 0.05
    c, sigma, bsz, phi, seed = 3.0, 1.3, 4.0, 1e-3, 11
    opt = DPZO(
        [{"params": [w], "lr": lr1, "weight_decay": wd1}, {"params": [frozen, b], "lr": lr2}],
        0.123,
        clip_norm=c,
        noise_multiplier=sigma,
        expected_batch_size=bsz,
        perturbation_scale=phi,
        seed=seed,
    )
    w0, b0 = w.detach().clone(), b.detach().clone()

    def closure():
        return record_losses(w * frozen[:, None], b, x, y)

    for step in range(2):
        wr, br = w.detach().clone(), b.detach().clone()
        zw, zb = z_of(w.shape, seed, step, 0, 0), z_of(b.shape, seed, step, 0, 1)
        plus = record_losses(wr + phi * zw, br + phi * zb, x, y)
        minus = record_losses(wr - phi * zw, br - phi * zb, x, y)
        delta = (plus - minus) / (2 * phi)
        clipped = torch.clamp(delta, -c, c)  # scalar clipping is clamping
        s = clipped.sum() + injected[0] * sigma * c
        w_expected = wr * (1 - lr1 * wd1) - lr1 / bsz * s * zw
        b_expected = br - lr2 / bsz * s * zb

        stats = opt.step(closure)
        assert isinstance(stats, StepStats)
        assert stats.step == step and stats.batch_size == 6 and stats.num_directions == 1
        assert torch.allclose(stats.noisy_sum, s.reshape(1), rtol=1e-9, atol=1e-12)
        assert torch.allclose(w.detach(), w_expected, rtol=0, atol=1e-12)
        assert torch.allclose(b.detach(), b_expected, rtol=0, atol=1e-12)
        assert stats.clip_fraction == pytest.approx(float((delta.abs() > c).double().mean()))
        assert 0 < stats.clip_fraction < 1  # the test really exercises clipping
        assert stats.loss == pytest.approx(float((plus + minus).mean() / 2), rel=1e-12)
    assert seen_std == [sigma * c, sigma * c]
    assert torch.equal(frozen, torch.ones(3, dtype=torch.float64))
    assert not torch.equal(w.detach(), w0) and not torch.equal(b.detach(), b0)


def test_mezo_matches_direct_reimplementation():
    """MeZO with K = 2: θ ← θ − η/(K|B|) Σ_x Σ_k Δ_k(x) z_k, no clipping, no noise."""
    w, b, x, y = make_problem(seed=1)
    lr, phi, seed, K = 0.2, 1e-3, 5, 2
    opt = MeZO([w, b], lr, num_directions=K, perturbation_scale=phi, seed=seed)
    for step in range(2):
        wr, br = w.detach().clone(), b.detach().clone()
        w_exp, b_exp = wr.clone(), br.clone()
        total = 0.0
        for k in range(K):
            zw, zb = z_of(w.shape, seed, step, k, 0), z_of(b.shape, seed, step, k, 1)
            d = (
                record_losses(wr + phi * zw, br + phi * zb, x, y)
                - record_losses(wr - phi * zw, br - phi * zb, x, y)
            ) / (2 * phi)
            g = d.sum() / (K * x.shape[0])
            total += float(d.sum()) / K
            w_exp -= lr * g * zw
            b_exp -= lr * g * zb
        stats = opt.step(lambda: record_losses(w, b, x, y))
        assert stats.normalizer == x.shape[0] and not stats.private and stats.noise_std == 0.0
        assert float(stats.noisy_sum.sum()) == pytest.approx(total, rel=1e-9)
        assert torch.allclose(w.detach(), w_exp, rtol=0, atol=1e-12)
        assert torch.allclose(b.detach(), b_exp, rtol=0, atol=1e-12)


def test_k4_update_lies_in_span_of_the_directions():
    """θ_new − θ_old = −(η/b) Σ_k S_k z_k: least squares on the K directions leaves ~0 residual,
    and the coefficients are −(η/b)·S with S the released noisy sum (real OS-entropy noise)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    x, y = torch.randn(7, 6), torch.randn(7, 2)
    params = list(model.parameters())
    K, lr, bsz, seed = 4, 0.05, 5.0, 123
    opt = DPAggZO(
        params,
        lr,
        num_directions=K,
        clip_norm=2.0,
        noise_multiplier=0.8,
        expected_batch_size=bsz,
        seed=seed,
    )
    before = torch.cat([p.detach().flatten() for p in params]).double()
    stats = opt.step(lambda: ((model(x) - y) ** 2).sum(1))
    after = torch.cat([p.detach().flatten() for p in params]).double()
    update = after - before
    zmat = torch.stack(
        [
            torch.cat(
                [z_of(p.shape, seed, 0, k, i, p.dtype).flatten() for i, p in enumerate(params)]
            )
            for k in range(K)
        ],
        dim=1,
    )
    coef = torch.linalg.lstsq(zmat, update[:, None]).solution[:, 0]
    residual = torch.linalg.vector_norm(update - zmat @ coef) / torch.linalg.vector_norm(update)
    assert residual < 1e-5
    assert torch.allclose(coef, -lr / bsz * stats.noisy_sum, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- unbiasedness
def test_unbiased_for_quadratic_loss():
    """L(θ;x) = ½‖θ−x‖², no clipping (c huge), no noise, b = |B|: E[update] = −η∇L̄(θ).

    The central difference is exact for a quadratic, so one step's update is
    −η (1/K) Σ_k z_k z_kᵀ g with g = mean_x(θ − x), whose coordinate i has variance
    η²(‖g‖² + g_i²)/K. Over N independent steps (fresh directions each, θ reset), each coordinate
    of the mean update is checked with a z-score bound of 4.5 (per-coordinate false alarm ~7e-6).
    """
    d, n, K, lr, N = 6, 5, 4, 0.1, 1200
    g_ = torch.Generator().manual_seed(3)
    theta0 = torch.randn(d, generator=g_, dtype=torch.float64)
    xs = torch.randn(n, d, generator=g_, dtype=torch.float64)
    theta = torch.nn.Parameter(theta0.clone())
    opt = DPAggZO(
        [theta],
        lr,
        num_directions=K,
        clip_norm=1e12,
        noise_multiplier=0.0,
        expected_batch_size=n,
        seed=2024,
    )

    def closure():
        return 0.5 * ((theta - xs) ** 2).sum(dim=1)

    total = torch.zeros(d, dtype=torch.float64)
    for _ in range(N):
        with torch.no_grad():
            theta.copy_(theta0)
        opt.step(closure)
        total += theta.detach() - theta0
    mean_update = total / N
    g = (theta0 - xs).mean(0)
    std = lr * torch.sqrt((g.dot(g) + g**2) / (K * N))
    zscores = (mean_update + lr * g) / std
    assert zscores.abs().max() < 4.5, zscores
    # and the estimator is not trivially zero: the mean update is close to −η g in norm
    assert torch.linalg.vector_norm(mean_update + lr * g) < 0.2 * torch.linalg.vector_norm(lr * g)


# ---------------------------------------------------------------- directions
def test_tensor_seeds_are_prefix_stable_and_distinct():
    long = tensor_seeds(7, 3, 2, 10)
    assert tensor_seeds(7, 3, 2, 4) == long[:4]
    assert len(set(long)) == 10
    assert tensor_seeds(7, 3, 3, 1) != long[:1]
    assert tensor_seeds(7, 4, 2, 1) != long[:1]
    assert tensor_seeds(8, 3, 2, 1) != long[:1]
    assert all(0 <= s < 2**63 for s in long)


def test_directions_are_standard_normal_and_reproducible():
    z = direction_tensor((200, 500), seed=1, step=0, k=0, index=0)
    assert z.dtype == torch.float32
    assert torch.equal(z, direction_tensor((200, 500), seed=1, step=0, k=0, index=0))
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    other = direction_tensor((200, 500), seed=1, step=0, k=1, index=0)
    assert abs(float((z * other).mean())) < 5 / math.sqrt(n)  # uncorrelated across k
    with pytest.raises(TypeError, match="floating"):
        fill_direction_(torch.empty(3, dtype=torch.int64), 1)


def test_seed_none_draws_and_stores_a_public_seed():
    p = torch.nn.Parameter(torch.zeros(3))
    a = MeZO([p], 0.1)
    b = MeZO([p], 0.1)
    assert isinstance(a.seed, int) and a.seed != b.seed
    assert a.state_dict()["zoprivacy"]["seed"] == a.seed


# ---------------------------------------------------------------- RNG handling
def test_rng_restored_between_plus_and_minus():
    """Random draws inside the closure are identical for θ+φz_k and θ−φz_k, fresh across k."""
    p = torch.nn.Parameter(torch.zeros(4))
    draws = []

    def closure():
        draws.append(torch.rand(5))
        return (p * 0).sum().reshape(1) + draws[-1][:1]

    opt = MeZO([p], 0.1, num_directions=3, seed=0)
    opt.step(closure)
    assert len(draws) == 6
    for k in range(3):
        assert torch.equal(draws[2 * k], draws[2 * k + 1])
    assert not torch.equal(draws[0], draws[2]) and not torch.equal(draws[2], draws[4])


def test_dropout_sees_the_same_mask_for_both_evaluations():
    """With dropout in train mode, Δ is a true finite difference (|Δ| = O(‖∇L‖), not O(1/φ))."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1)
    )
    model.train()
    x = torch.randn(10, 8)
    opt = MeZO(model.parameters(), 0.0, num_directions=4, perturbation_scale=1e-4, seed=1)
    stats = opt.step(lambda: model(x).squeeze(1) ** 2)
    # with different masks the differences would be ~ (L(mask1) − L(mask2)) / 2φ ≈ 1e3 per record
    assert stats.noisy_sum.abs().max() < 50


# ---------------------------------------------------------------- state dict / resume
def _run(model, opt, x, y, steps):
    out = []
    for _ in range(steps):
        out.append(opt.step(lambda: ((model(x) - y) ** 2).sum(1)).noisy_sum)
    return out


def _make(model, **kw):
    return DPAggZO(
        [
            {"params": [model.weight], "weight_decay": 0.1},
            {"params": [model.bias], "lr": 0.02},
        ],
        0.05,
        num_directions=3,
        clip_norm=0.7,
        noise_multiplier=1.1,
        expected_batch_size=6,
        **kw,
    )


def test_resume_is_bit_identical():
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    base = torch.nn.Linear(4, 3)
    full = copy.deepcopy(base)
    sums_full = _run(full, _make(full, seed=9, noise_seed=42), x, y, 6)

    first = copy.deepcopy(base)
    opt1 = _make(first, seed=9, noise_seed=42)
    sums_first = _run(first, opt1, x, y, 3)
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)

    second = copy.deepcopy(first)
    with pytest.warns(PredictableNoiseWarning):  # loading seeded noise says so again
        opt2 = _make(second, seed=1, noise_seed=None)  # constructor values are overwritten
        opt2.load_state_dict(state)
    assert opt2.seed == 9 and opt2.steps_taken == 3
    sums_second = _run(second, opt2, x, y, 3)
    assert torch.equal(full.weight, second.weight) and torch.equal(full.bias, second.bias)
    for a, b in zip(sums_full, sums_first + sums_second, strict=True):
        assert torch.equal(a, b)
    assert opt2.param_groups[1]["lr"] == 0.02 and opt2.param_groups[0]["weight_decay"] == 0.1


def test_os_entropy_state_carries_no_noise_state():
    model = torch.nn.Linear(2, 1)
    opt = _make(model, seed=3)
    sd = opt.state_dict()["zoprivacy"]
    assert sd["noise"] == {"mode": "os_entropy"}
    other = _make(torch.nn.Linear(2, 1), seed=4)
    other.load_state_dict(opt.state_dict())
    assert other.seed == 3 and other.is_private


def test_load_rejects_foreign_state():
    model = torch.nn.Linear(2, 1)
    opt = _make(model, seed=3)
    sd = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="zoprivacy"):
        opt.load_state_dict(sd)
    bad = opt.state_dict()
    bad["zoprivacy"]["noise_multiplier"] = -1.0
    with pytest.raises(ValueError, match="noise_multiplier"):
        opt.load_state_dict(bad)
    assert opt.noise_multiplier == 1.1


# ---------------------------------------------------------------- presets and dtypes
def test_presets_are_the_same_class():
    p = torch.nn.Parameter(torch.zeros(2))
    dpzo = DPZO([p], 0.1, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2)
    mezo = MeZO([p], 0.1, num_directions=3)
    assert isinstance(dpzo, DPAggZO) and isinstance(mezo, DPAggZO)
    assert dpzo.num_directions == 1 and dpzo.is_private
    assert mezo.clip_norm is None and mezo.noise_multiplier == 0 and mezo.is_mezo
    assert mezo.num_directions == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_smoke(dtype):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(dtype)
    x, y = torch.randn(5, 8, dtype=dtype), torch.randn(5, 4, dtype=dtype)
    opt = DPAggZO(
        model.parameters(),
        0.05,
        num_directions=4,
        clip_norm=1.0,
        noise_multiplier=0.5,
        expected_batch_size=5,
        perturbation_scale=1e-2,
        seed=0,
    )
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        stats = opt.step(lambda: ((model(x) - y) ** 2).float().sum(1))
        assert math.isfinite(stats.loss) and torch.isfinite(stats.noisy_sum).all()
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert p.dtype == dtype and torch.isfinite(p).all() and not torch.equal(p, p0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 8])
def test_perturbation_drift_is_rounding_only(dtype, K):
    """With a zero update (constant loss), the probe leaves θ within 3K ulps of max|θ| (the
    documented drift); a wrong undo would leave O(φ) = 1e-3 offsets."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((torch.randn(4096, generator=g) * 0.05).to(dtype))
    p0 = p.detach().clone()
    opt = MeZO([p], 0.1, num_directions=K, seed=5)
    stats = opt.step(lambda: torch.zeros(2))
    assert torch.equal(stats.noisy_sum, torch.zeros(K, dtype=torch.float64))
    drift = (p.detach().double() - p0.double()).abs().max()
    ulp = torch.finfo(dtype).eps * float(p0.double().abs().max())
    assert drift <= 3 * K * ulp


def test_not_private_warnings_and_private_silence():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.warns(NotPrivateWarning, match="MeZO"):
        MeZO([p], 0.1)
    with pytest.warns(NotPrivateWarning, match="noiseless"):
        DPAggZO([p], 0.1, num_directions=2, clip_norm=1, noise_multiplier=0, expected_batch_size=1)
    with pytest.warns(PredictableNoiseWarning, match="must not be used for real privacy"):
        DPAggZO(
            [p],
            0.1,
            num_directions=2,
            clip_norm=1,
            noise_multiplier=1,
            expected_batch_size=1,
            noise_seed=3,
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = DPAggZO(
            [p], 0.1, num_directions=2, clip_norm=1, noise_multiplier=1, expected_batch_size=1
        )
    assert opt.is_private


def test_stats_are_frozen():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = MeZO([p], 0.1)
    stats = opt.step(lambda: (p**2).sum().reshape(1))
    with pytest.raises(AttributeError):
        stats.loss = 0.0  # type: ignore[misc]
    assert np.isfinite(stats.loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_and_rng_restore():
    """Directions come from a CUDA generator, the CUDA RNG is restored between + and −."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 2).to(dev)
    x, y = torch.randn(5, 6, device=dev), torch.randn(5, 2, device=dev)
    draws = []

    def closure():
        draws.append(torch.rand(4, device=dev))
        return ((model(x) - y) ** 2).sum(1)

    opt = DPAggZO(
        model.parameters(),
        0.1,
        num_directions=3,
        clip_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=5,
        seed=1,
    )
    before = [p.detach().clone() for p in model.parameters()]
    stats = opt.step(closure)
    for k in range(3):
        assert torch.equal(draws[2 * k], draws[2 * k + 1])
    assert not torch.equal(draws[0], draws[2])
    z = direction_tensor(model.weight.shape, seed=1, step=0, k=0, index=0, device=dev)
    assert z.device.type == "cuda"
    assert stats.noisy_sum.device.type == "cpu" and stats.batch_size == 5
    assert all(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), before, strict=True))
