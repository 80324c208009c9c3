"""Privacy invariants of DP-AggZO (docs/design.md): sensitivity c, noise σc, normalisation by b,
empty batches, independence of the noise from the public direction seed, accountant hook.

The release tests run for every direction kind: the directions are public, so the released
K-vector, its clipping and its noise must be the same mechanism whatever their distribution."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

import zoprivacy.noise.source
from zoprivacy.accounting import PrivacyBudgetExceeded
from zoprivacy.optim.directions import direction_tensor
from zoprivacy.optim.optimizer import DPAggZO, MeZO

pytestmark = [
    pytest.mark.filterwarnings("ignore::zoprivacy.optim.optimizer.NotPrivateWarning"),
    pytest.mark.filterwarnings("ignore::zoprivacy.noise.source.PredictableNoiseWarning"),
]

D = 5

KINDS = {
    "gaussian": {},
    "rademacher": {"directions": "rademacher"},
    "lowrank": {"directions": "lowrank", "direction_rank": 2, "direction_refresh": 2},
}
"""The direction options of each kind; a low-rank θ is a D × 3 matrix (its first column is read
by the losses), so that its directions are really low-rank products."""


def _param(values, kind):
    """θ as a Parameter: the vector ``values``, or (lowrank) a D × 3 matrix with it as column 0."""
    if kind == "lowrank":
        return torch.nn.Parameter(values.reshape(-1, 1).repeat(1, 3).clone())
    return torch.nn.Parameter(values.clone())


def _vec(theta):
    """The D values the losses read: θ itself, or the first column of a matrix θ."""
    return theta.reshape(theta.shape[0], -1)[:, 0]


def _opt(theta, *, K, c=1.0, sigma=1.0, b=4.0, seed=7, noise_seed=None, lr=0.1, **kw):
    return DPAggZO(
        [theta],
        lr,
        num_directions=K,
        clip_norm=c,
        noise_multiplier=sigma,
        expected_batch_size=b,
        seed=seed,
        noise_seed=noise_seed,
        **kw,
    )


def _adversarial_closure(theta, records):
    """Per-record losses a·tanh(w·θ) + e·(w·θ)² + f·sin(3 w·θ): arbitrary scales and shapes."""
    ws = torch.tensor([r[0] for r in records], dtype=torch.float64).reshape(-1, D)
    coef = torch.tensor([r[1:] for r in records], dtype=torch.float64).reshape(-1, 3)

    def closure():
        u = ws @ _vec(theta)
        return coef[:, 0] * torch.tanh(u) + coef[:, 1] * u**2 + coef[:, 2] * torch.sin(3 * u)

    return closure


_scale = st.one_of(
    st.floats(-1e120, 1e120, allow_nan=False),
    st.sampled_from([0.0, 1e-300, -1e100, 1e100, 1.0]),
)
_record = st.tuples(
    st.lists(st.floats(-3, 3, allow_nan=False), min_size=D, max_size=D), _scale, _scale, _scale
)


@settings(max_examples=30, deadline=None)
@given(
    K=st.sampled_from([1, 8, 64]),
    records=st.lists(_record, min_size=1, max_size=5),
    c=st.sampled_from([1e-3, 0.5, 4.0]),
    drop=st.integers(0, 4),
    kind=st.sampled_from(sorted(KINDS)),
)
def test_one_record_moves_S_by_at_most_c(K, records, c, drop, kind):
    """Neighbouring batches (one record removed), identical directions and identical seeded
    noise: ‖S − S'‖ ≤ c(1 + 1e-12) whatever the losses and K."""
    drop = drop % len(records)
    theta0 = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sums = []
    for batch in (records, records[:drop] + records[drop + 1 :]):
        theta = _param(theta0, kind)
        opt = _opt(theta, K=K, c=c, sigma=0.7, noise_seed=99, **KINDS[kind])
        closure = _adversarial_closure(theta, batch) if batch else (lambda: torch.zeros(0))
        sums.append(opt.step(closure).noisy_sum)
    assert float(torch.linalg.vector_norm(sums[0] - sums[1])) <= c * (1 + 1e-12)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("K", [1, 8, 64])
def test_sensitivity_bound_is_attained_by_a_huge_record(K, kind):
    """A record with a huge loss is clipped to exactly norm c in all K coordinates together
    (per-coordinate clipping would give up to c√K)."""
    theta0 = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    small = ([0.1, 0.2, 0.0, -0.1, 0.3], 1.0, 0.5, 0.0)
    huge = ([1.0, -2.0, 0.5, 1.5, -1.0], 1e100, 1e90, -1e100)
    sums = []
    for batch in ([small, huge], [small]):
        theta = _param(theta0, kind)
        opt = _opt(theta, K=K, c=0.25, sigma=2.0, noise_seed=5, **KINDS[kind])
        stats = opt.step(_adversarial_closure(theta, batch))
        assert stats.noisy_sum.shape == (K,) and stats.noisy_sum.dtype == torch.float64
        assert stats.noise_std == 0.5 and stats.normalizer == 4.0 and stats.directions == kind
        sums.append(stats.noisy_sum)
    assert float(torch.linalg.vector_norm(sums[0] - sums[1])) == pytest.approx(0.25, rel=1e-12)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_noise_std_is_sigma_c_per_coordinate(kind):
    """Zero losses, OS-entropy noise: S = v. n = 100·64 draws; Σv²/(σc)² ~ χ²_n (two-sided
    p > 1e-6) and |mean| < 5 standard errors. A wrong scale (e.g. σ instead of σc, or /K) fails."""
    sigma, c, K, steps = 1.5, 0.4, 64, 100
    theta = _param(torch.zeros(3, dtype=torch.float64), kind)
    opt = _opt(theta, K=K, c=c, sigma=sigma, **KINDS[kind])
    v = torch.cat([opt.step(lambda: torch.zeros(3)).noisy_sum for _ in range(steps)])
    n = v.numel()
    stat = float((v**2).sum()) / (sigma * c) ** 2
    p = 2 * min(sps.chi2.cdf(stat, n), sps.chi2.sf(stat, n))
    assert p > 1e-6, (stat, n)
    assert abs(float(v.mean())) < 5 * sigma * c / math.sqrt(n)
    # coordinates are not coupled: lag-1 correlation across coordinates ~ 0
    corr = float((v[:-1] * v[1:]).mean()) / (sigma * c) ** 2
    assert abs(corr) < 5 / math.sqrt(n)


def _deltas_closure(theta, scales):
    """Records whose loss is s·θ₀: Δ_k = s·z_k[0]; s = 0 records add nothing to Σ Δ̂."""
    s = torch.tensor(scales, dtype=torch.float64)
    return lambda: s * _vec(theta)[0]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_update_is_normalised_by_b(kind):
    """Same seeds, no noise: halving b doubles the update exactly (up to rounding)."""
    updates = []
    for b in (4.0, 8.0):
        theta = _param(torch.ones(D, dtype=torch.float64), kind)
        opt = _opt(theta, K=3, c=10.0, sigma=0.0, b=b, **KINDS[kind])
        opt.step(_deltas_closure(theta, [1.0, -0.5, 2.0]))
        updates.append(theta.detach() - 1)
    assert torch.allclose(updates[0], 2 * updates[1], rtol=1e-12, atol=0)
    assert updates[1].abs().max() > 0


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_update_does_not_depend_on_actual_batch_size(sigma, kind):
    """Adding a record with Δ = 0 changes |B| but not Σ Δ̂: the DP update is identical (same
    seeded noise). MeZO (normalised by |B|) is not, which shows the check tells them apart."""
    results = {}
    for name, scales in (("two", [1.0, -0.5]), ("three", [1.0, -0.5, 0.0])):
        theta = _param(torch.ones(D, dtype=torch.float64), kind)
        opt = _opt(theta, K=2, c=10.0, sigma=sigma, noise_seed=3, **KINDS[kind])
        stats = opt.step(_deltas_closure(theta, scales))
        results[name] = (theta.detach().clone(), stats)
    assert results["two"][1].batch_size == 2 and results["three"][1].batch_size == 3
    assert torch.equal(results["two"][0], results["three"][0])
    mezo = {}
    for name, scales in (("two", [1.0, -0.5]), ("three", [1.0, -0.5, 0.0])):
        theta = torch.nn.Parameter(torch.ones(D, dtype=torch.float64))
        MeZO([theta], 0.1, num_directions=2, seed=7).step(_deltas_closure(theta, scales))
        mezo[name] = theta.detach().clone()
    assert not torch.equal(mezo["two"], mezo["three"])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_empty_batch_releases_pure_noise_and_updates(monkeypatch, kind):
    injected = torch.tensor([0.3, -1.2, 0.8], dtype=torch.float64)
    monkeypatch.setattr(
        zoprivacy.noise.source.NoiseSource,
        "add_noise",
        lambda self, values, std, sensitivity=None: values.to(torch.float64) + injected * std,
    )
    theta = _param(torch.linspace(-1, 1, D, dtype=torch.float64), kind)
    theta0 = theta.detach().clone()
    lr, b, c, sigma, seed = 0.1, 4.0, 0.5, 2.0, 7
    opt = _opt(theta, K=3, c=c, sigma=sigma, b=b, lr=lr, seed=seed, **KINDS[kind])
    stats = opt.step(lambda: torch.zeros(0))
    assert torch.equal(stats.noisy_sum, injected * sigma * c)
    expected = theta0.clone()
    lowrank = {"rank": 2, "refresh": 2} if kind == "lowrank" else {}
    for k in range(3):
        z = direction_tensor(
            theta0.shape, seed=seed, step=0, k=k, index=0, dtype=torch.float64, kind=kind,
            **lowrank,
        )  # fmt: skip
        expected -= lr / b * float(stats.noisy_sum[k]) * z
    assert torch.allclose(theta.detach(), expected, rtol=0, atol=1e-14)
    assert stats.batch_size == 0 and opt.steps_taken == 1 and stats.step == 0
    assert stats.clip_fraction == 0.0 and stats.batch_clip_error == 0.0
    assert stats.max_clip_error == 0.0 and math.isnan(stats.loss)


def test_empty_batch_with_os_noise_still_moves_parameters():
    theta = torch.nn.Parameter(torch.zeros(D))
    opt = _opt(theta, K=4)
    stats = opt.step(lambda: torch.zeros(0))
    assert stats.noisy_sum.abs().min() > 0 and theta.detach().abs().max() > 0
    assert opt.steps_taken == 1


def test_mezo_empty_batch_only_counts():
    """No update and no weight decay (which would shrink θ by 5%); only the probe's rounding
    drift (documented, ~1 ulp) may remain."""
    theta = torch.nn.Parameter(torch.ones(D))
    opt = MeZO([theta], 0.1, num_directions=2, weight_decay=0.5)
    stats = opt.step(lambda: torch.zeros(0))
    assert torch.allclose(theta.detach(), torch.ones(D), rtol=0, atol=1e-6)
    assert opt.steps_taken == 1
    assert stats.normalizer == 0.0


def _noise_of(seed, noise_seed, K=6):
    theta = torch.nn.Parameter(torch.zeros(2))
    return _opt(theta, K=K, seed=seed, noise_seed=noise_seed).step(lambda: torch.zeros(2)).noisy_sum


def test_noise_is_independent_of_the_direction_seed():
    # same direction seed, different noise seeds: different noise
    assert not torch.equal(_noise_of(1, 10), _noise_of(1, 11))
    # different direction seeds, same noise seed: the very same noise (noise ignores `seed`)
    assert torch.equal(_noise_of(1, 10), _noise_of(2, 10))
    # OS entropy: same direction seed twice, and seeds s, s': all different
    assert not torch.equal(_noise_of(1, None), _noise_of(1, None))
    assert not torch.equal(_noise_of(1, None), _noise_of(2, None))
    # and neither the direction seed nor the global torch RNG reproduces the OS-entropy noise
    torch.manual_seed(0)
    a = _noise_of(1, None)
    torch.manual_seed(0)
    assert not torch.equal(a, _noise_of(1, None))


def test_noise_seed_reproduces_noise_and_warns():
    with pytest.warns(zoprivacy.noise.source.PredictableNoiseWarning):
        a = _noise_of(1, 123)
    assert torch.equal(a, _noise_of(5, 123))


# ---------------------------------------------------------------- accountant hook
class FakeAccountant:
    def __init__(self, budget_steps, log):
        self.budget_steps, self.log, self.calls = budget_steps, log, []

    def step(self, *, noise_multiplier, sample_rate, steps=1):
        self.log.append("charge")
        if len(self.calls) + steps > self.budget_steps:
            raise PrivacyBudgetExceeded("over budget")
        self.calls.append((noise_multiplier, sample_rate, steps))


def test_accountant_charged_before_data_and_stops_at_budget():
    log = []
    acct = FakeAccountant(2, log)
    theta = torch.nn.Parameter(torch.ones(D))
    opt = _opt(theta, K=2, sigma=1.3, accountant=acct, sample_rate=0.01)

    def closure():
        log.append("data")
        return theta.sum().reshape(1)

    opt.step(closure)
    opt.step(closure)
    assert acct.calls == [(1.3, 0.01, 1)] * 2
    assert log[:5] == ["charge", "data", "data", "data", "data"]
    before = theta.detach().clone()
    n_log = len(log)
    with pytest.raises(PrivacyBudgetExceeded):
        opt.step(closure)
    assert log[n_log:] == ["charge"]  # the closure never ran
    assert torch.equal(theta.detach(), before) and opt.steps_taken == 2


def test_failed_step_is_still_charged():
    acct = FakeAccountant(10, [])
    theta = torch.nn.Parameter(torch.ones(D))
    opt = _opt(theta, K=2, accountant=acct, sample_rate=0.5)
    with pytest.raises(ValueError):
        opt.step(lambda: torch.full((2,), float("nan")))
    assert len(acct.calls) == 1 and opt.steps_taken == 0


def test_accountant_requires_sample_rate_and_privacy():
    theta = torch.nn.Parameter(torch.ones(D))
    acct = FakeAccountant(1, [])
    with pytest.raises(ValueError, match="sample_rate"):
        _opt(theta, K=1, accountant=acct)
    with pytest.raises(ValueError, match="noise_multiplier"):
        _opt(theta, K=1, sigma=0.0, accountant=acct, sample_rate=0.1)
    with pytest.raises(TypeError, match="accountant"):
        _opt(theta, K=1, accountant=object(), sample_rate=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _opt(theta, K=1, accountant=acct, sample_rate=0.1)


def test_real_accountant_stops_the_run_before_touching_data():
    from zoprivacy.accounting.accountant import RDPAccountant

    acct = RDPAccountant(budget=(1.0, 1e-5))
    theta = torch.nn.Parameter(torch.ones(D))
    opt = _opt(theta, K=2, sigma=1.5, accountant=acct, sample_rate=0.1)
    calls = []

    def closure():
        calls.append(1)
        return theta.sum().reshape(1)

    with pytest.raises(PrivacyBudgetExceeded):
        for _ in range(1000):
            opt.step(closure)
    assert 0 < opt.steps_taken < 1000 and acct.steps == opt.steps_taken
    assert len(calls) == 4 * opt.steps_taken  # the refused step never called the closure
    assert acct.get_epsilon(1e-5) <= 1.0
