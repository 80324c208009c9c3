"""Low-rank directions (LOZO, Chen et al., ICLR 2025) and the one-generation direction buffer.

References are computed here from the documented definitions (numpy SeedSequence spawn keys,
torch.randn), not from the optimizer's code: the update, lazy sampling of V, the E[z zᵀ] = I
scaling, resume, refusal of other options, and the generation counts per step. The privacy
tests of every direction kind are in tests/test_optimizer_privacy.py (KINDS).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from tests.conftest import regression_data, seeded_mlp, squared_errors
from zoprivacy import DPAggZO
from zoprivacy.optim.directions import DirectionStream, direction_tensor

pytestmark = [
    pytest.mark.filterwarnings("ignore::zoprivacy.optim.optimizer.NotPrivateWarning"),
    pytest.mark.filterwarnings("ignore::zoprivacy.noise.source.PredictableNoiseWarning"),
]

MASK63 = (1 << 63) - 1


def _seed(seed, key, i):
    """Word i of SeedSequence(entropy=seed, spawn_key=key), as the directions module documents."""
    words = np.random.SeedSequence(entropy=seed, spawn_key=key).generate_state(i + 1, np.uint64)
    return int(words[i]) & MASK63


def _randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _reference_z(shape, *, seed, step, k, i, rank, refresh, dtype=torch.float64):
    """z_{k,i}: (U/√r) Vᵀ for a matrix, a Gaussian slice otherwise (the documented recipe)."""
    if len(shape) != 2:
        return _randn(shape, _seed(seed, (step, k), i), dtype)
    u = _randn((shape[0], rank), _seed(seed, (step, k, 1), i), dtype) * rank**-0.5
    v = _randn((shape[1], rank), _seed(seed, (step // refresh, k, 2), i), dtype)
    return u @ v.T


def _model():
    return seeded_mlp(6, 4, 1, seed=3, dtype=torch.float64)


def _opt(model, **kw):
    options = dict(
        num_directions=3, clip_norm=2.0, noise_multiplier=0.7, expected_batch_size=8.0, seed=11,
        noise_seed=5, directions="lowrank", direction_rank=2, direction_refresh=3,
    )  # fmt: skip
    options.update(kw)
    return DPAggZO([p for p in model.parameters()], 0.05, **options)


def _closure(model, step=0):
    data = regression_data(8, 6, seed=100 + step)
    return lambda: squared_errors(model, data)


def test_update_is_theta_minus_lr_over_b_sum_S_k_U_k_V_k():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = _opt(model, perturbation="inplace")
    opt.step(_closure(model))  # step 0, then check step 1 (a second step of the same V period)
    before = [p.detach().clone() for p in model.parameters()]
    stats = opt.step(_closure(model, 1))
    assert stats.directions == "lowrank" and stats.noisy_sum.shape == (3,)
    for i, (p, p0) in enumerate(zip(model.parameters(), before, strict=True)):
        expected = p0.clone()
        for k in range(3):
            z = _reference_z(p.shape, seed=11, step=1, k=k, i=i, rank=2, refresh=3)
            expected -= 0.05 / 8.0 * float(stats.noisy_sum[k]) * z
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-12), i


def test_direction_tensor_matches_the_documented_recipe():
    for shape, i in (((4, 6), 0), ((4,), 1), ((1, 4), 2), ((2, 3, 2), 3)):
        for step in (0, 2, 3, 7):
            got = direction_tensor(
                shape, seed=9, step=step, k=1, index=i, dtype=torch.float64, kind="lowrank",
                rank=3, refresh=3,
            )  # fmt: skip
            ref = _reference_z(shape, seed=9, step=step, k=1, i=i, rank=3, refresh=3)
            assert torch.allclose(got, ref, rtol=0, atol=1e-14), (shape, step)


@pytest.mark.parametrize("refresh", [1, 3])
def test_lazy_sampling_keeps_the_row_space_for_refresh_steps(refresh):
    """With V fixed, z_t = U_t Vᵀ/√r: the rows of z over a period span the same r-dimensional
    space (rank r stacked), and a new period (or another k) brings a new one (rank 2r)."""
    r, shape = 2, (8, 10)

    def z(step, k=0):
        return direction_tensor(
            shape, seed=4, step=step, k=k, index=0, dtype=torch.float64, kind="lowrank",
            rank=r, refresh=refresh,
        )  # fmt: skip

    def rank(*zs):
        return int(torch.linalg.matrix_rank(torch.cat(zs)))

    assert rank(z(0)) == r
    for step in range(1, 7):
        same_period = step // refresh == 0
        assert rank(z(0), z(step)) == (r if same_period else 2 * r), step
        assert not torch.equal(z(0), z(step))  # U is fresh at every step
    assert rank(z(0, 0), z(0, 1)) == 2 * r  # each direction k has its own V


def test_second_moment_is_identity():
    """E[vec(z) vec(z)ᵀ] = I for z = U Vᵀ/√r (Monte Carlo on a 3 × 4 matrix, r = 2): every entry
    within 6 standard errors of the identity; the unscaled U Vᵀ (second moment r·I) would fail."""
    n, r = 3000, 2
    zs = torch.stack(
        [
            direction_tensor(
                (3, 4), seed=s, step=0, k=0, index=0, dtype=torch.float64, kind="lowrank",
                rank=r,
            ).reshape(-1)
            for s in range(n)
        ]
    )  # fmt: skip
    outer = zs[:, :, None] * zs[:, None, :]
    mean, se = outer.mean(0), outer.std(0) / math.sqrt(n)
    assert ((mean - torch.eye(12)).abs() <= 6 * se).all()
    assert ((mean - r * torch.eye(12)).abs() > 6 * se).any()
    assert zs.mean(0).abs().max() < 6 / math.sqrt(n) * zs.std(0).max()


def test_resume_is_bit_identical_mid_period():
    """4 steps with ν = 3 against 2 steps, a checkpoint (mid-period) and 2 more steps through
    from_state_dict (and through load_state_dict into an optimizer built with the defaults)."""
    model = _model()
    init = copy.deepcopy(model.state_dict())
    opt = _opt(model)
    for t in range(4):
        opt.step(_closure(model, t))
    final = [p.detach().clone() for p in model.parameters()]
    for how in ("from_state_dict", "load_state_dict"):
        model.load_state_dict(init)
        first = _opt(model)
        for t in range(2):
            first.step(_closure(model, t))
        state = copy.deepcopy(first.state_dict())
        assert state["zoprivacy"]["direction_rank"] == 2
        assert state["zoprivacy"]["direction_refresh"] == 3
        params = list(model.parameters())
        if how == "from_state_dict":
            resumed = DPAggZO.from_state_dict(params, state)
        else:
            resumed = DPAggZO(
                params, 1.0, num_directions=3, clip_norm=2.0, noise_multiplier=0.7,
                expected_batch_size=8.0,
            )  # fmt: skip
            resumed.load_state_dict(state)
        assert (resumed.directions, resumed.direction_rank, resumed.direction_refresh) == (
            "lowrank",
            2,
            3,
        )
        for t in range(2, 4):
            resumed.step(_closure(model, t))
        assert all(torch.equal(p, f) for p, f in zip(model.parameters(), final, strict=True))


@pytest.mark.parametrize(
    "mine",
    [
        dict(direction_rank=3),
        dict(direction_refresh=1),
        dict(directions="rademacher", direction_rank=None, direction_refresh=None),
        dict(direction_rank=None, direction_refresh=None),  # lowrank with the defaults (2, 1)
    ],
)
def test_a_checkpoint_with_other_direction_options_is_refused(mine):
    model = _model()
    state = _opt(model).state_dict()
    other = _opt(model, **mine)
    before = (other.directions, other.direction_rank, other.direction_refresh)
    with pytest.raises(ValueError, match="checkpoint's directions are 'lowrank'"):
        other.load_state_dict(state)
    assert (other.directions, other.direction_rank, other.direction_refresh) == before


def test_options_are_checked_and_fingerprinted():
    model = _model()
    with pytest.raises(ValueError, match="directions='lowrank' only"):
        _opt(model, directions="gaussian")
    with pytest.raises(ValueError, match="direction_rank"):
        _opt(model, direction_rank=0)
    with pytest.raises(ValueError, match="direction_refresh"):
        _opt(model, direction_refresh=0)
    with pytest.raises(TypeError, match="direction_buffer"):
        _opt(model, directions="gaussian", direction_rank=None, direction_refresh=None,
             direction_buffer=1)  # fmt: skip
    base = _opt(model).config_fingerprint()
    assert _opt(model).config_fingerprint() == base
    assert _opt(model, direction_rank=3).config_fingerprint() != base
    assert _opt(model, direction_refresh=4).config_fingerprint() != base
    defaults = _opt(model, direction_rank=None, direction_refresh=None)
    assert (defaults.direction_rank, defaults.direction_refresh) == (2, 1)


def test_low_rank_directions_are_generated_once_per_step_and_kept():
    """K·n generations per step on every path (a matrix's two factors count once); the step keeps
    K·r(m + n) values per matrix and K copies of the other tensors."""
    for path in ("auto", "inplace"):
        model = _model()
        stats = _opt(model, perturbation=path).step(_closure(model))
        assert stats.generations == 3 * 4, path  # K = 3, four tensors
    params = [p.detach() for p in _model().parameters()]  # (4, 6), (4,), (1, 4), (1,)
    stream = DirectionStream(params, seed=1, step=0, kind="lowrank", rank=2, refresh=1)
    out = [torch.empty_like(p) for p in params]
    for k in range(3):
        for _ in range(3):  # probe +, probe −, update
            for i in range(4):
                stream.fill(k, i, out[i])
    assert stream.generations == 12
    values = 3 * (2 * (4 + 6) + 4 + 2 * (1 + 4) + 1)
    assert stream.kept_bytes() == values * 8


@pytest.mark.parametrize("num_directions", [None, 2])
def test_the_kept_slices_of_a_step_share_one_allocation(num_directions):
    """All kept slices of direction k ((U/√r, V) of matrices, whole slices of other tensors)
    live in one tensor per device and dtype, and with ``num_directions`` those of all K
    directions do, with the values of separately drawn slices: thousands of small tensors made
    glibc's heap grow by ~0.75 GiB per step (benchmarks/lowrank_rss.py), and one allocation per
    direction slowed a MiniLM step's forward passes at K = 64."""
    params = [torch.zeros(4, 6), torch.zeros(4), torch.zeros(3, 5), torch.zeros(2, 2)]
    stream = DirectionStream(
        params, seed=1, step=0, kind="lowrank", rank=2, refresh=1, num_directions=num_directions
    )
    out = [torch.empty_like(p) for p in params]
    step_storages = set()
    for k in range(2):
        for i in range(4):
            stream.fill(k, i, out[i])
            ref = _reference_z(params[i].shape, seed=1, step=0, k=k, i=i, rank=2, refresh=1)
            assert torch.allclose(out[i].double(), ref, rtol=1e-6, atol=1e-6)
        storages = {t.untyped_storage().data_ptr() for i in range(4) for t in stream._kept[(k, i)]}
        assert len(storages) == 1, k
        step_storages |= storages
    assert len(step_storages) == (1 if num_directions else 2)
    per_direction = 2 * (4 + 6) + 2 * (3 + 5) + 2 * (2 + 2) + 4  # factors + the vector's slice
    assert stream.kept_bytes() == 2 * per_direction * 4


@pytest.mark.parametrize("path", ["auto", "inplace"])
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_direction_buffer_generates_each_z_once_per_pair_with_identical_results(kind, path):
    """Without the buffer a central step generates 3K·n slices (hooks) or 4K·n (in place); with
    it 2K·n on both paths (K·n for the pairs, K·n for the update), and the parameters end
    bit-identical."""
    results = {}
    for buffer in (False, True):
        model = _model()
        opt = _opt(
            model, directions=kind, direction_rank=None, direction_refresh=None,
            perturbation=path, direction_buffer=buffer,
        )  # fmt: skip
        stats = [opt.step(_closure(model, t)) for t in range(2)]
        results[buffer] = ([s.generations for s in stats], [p.detach() for p in model.parameters()])
    k, n = 3, 4
    assert results[False][0] == [(3 if path == "auto" else 4) * k * n] * 2
    assert results[True][0] == [2 * k * n] * 2
    assert all(torch.equal(a, b) for a, b in zip(results[False][1], results[True][1], strict=True))


def test_direction_buffer_holds_one_direction():
    params = [torch.zeros(5, 7), torch.zeros(3)]
    stream = DirectionStream(params, seed=2, step=0, buffer=True)
    out = [torch.empty_like(p) for p in params]
    for k in range(4):
        for i in range(2):
            stream.fill(k, i, out[i])
            stream.fill(k, i, out[i])
            assert torch.equal(out[i], direction_tensor(params[i].shape, seed=2, step=0, k=k,
                                                        index=i))  # fmt: skip
        assert stream.kept_bytes() == (35 + 3) * 4  # the current direction only
    assert stream.generations == 8


def test_direction_buffer_with_one_direction_generates_once():
    """K = 1: the update reuses the buffered z_0, so a step generates n slices in all."""
    model = _model()
    opt = _opt(
        model, num_directions=1, directions="gaussian", direction_rank=None,
        direction_refresh=None, direction_buffer=True,
    )  # fmt: skip
    assert opt.step(_closure(model)).generations == 4


@pytest.mark.parametrize("path", ["hooks", "inplace"])
def test_probes_are_the_loss_differences_along_the_reference_directions(path):
    """The fused probe θ ± φ(U/√r)Vᵀ (one addmm per matrix, never the product alone) gives
    the central differences of the reference directions, on both perturbation paths (no noise,
    no clipping: S = Σ_x Δ_agg(x))."""
    model = _model()
    closure = _closure(model)
    opt = _opt(model, perturbation=path, noise_multiplier=0.0, clip_norm=1e9)
    phi = opt.perturbation_scale
    params = list(model.parameters())
    base = [p.detach().clone() for p in params]
    expected = torch.zeros(3, dtype=torch.float64)
    for k in range(3):
        zs = [
            _reference_z(p.shape, seed=11, step=0, k=k, i=i, rank=2, refresh=3)
            for i, p in enumerate(params)
        ]
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, p0, z in zip(params, base, zs, strict=True):
                    p.copy_(p0 + sign * phi * z)
            losses.append(closure())
        expected[k] = ((losses[0] - losses[1]) / (2 * phi)).sum() / 3  # Δ_agg = Δ/K (line 12)
    with torch.no_grad():
        for p, p0 in zip(params, base, strict=True):
            p.copy_(p0)
    stats = opt.step(closure)
    assert torch.allclose(stats.noisy_sum.double(), expected, rtol=1e-9, atol=1e-9)
