"""The canary audit: its statistics, the correct optimizer, and planted faults it must catch.

Every fault lives in a test-only subclass of DPAggZO that overrides one private method (``_clip``,
``_update``) or replaces the noise source, so the rest of the step is the real code. Settings are
chosen so that each audit takes a few seconds on one core: σ = 2 and δ = 1e-2 (the claimed ε is
then 1.13; the audit checks the accountant's (ε(δ), δ) promise at that δ like at any other), and
"gaussian" attacks only (the likelihood-ratio and norm tests), so that a flag is due to the planted
fault and not to the floating-point leak, which has tests of its own at the end.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

from zoprivacy import DPAggZO, secure_noise
from zoprivacy.accounting import compute_epsilon
from zoprivacy.audit import (
    AuditResult,
    clopper_pearson,
    epsilon_from_rates,
    gaussian_delta,
    gaussian_epsilon,
    run_audit,
)
from zoprivacy.noise import NoiseSource

GAUSSIAN = ("release:likelihood", "update:likelihood", "release:norm", "update:norm")
SIGMA, DELTA = 2.0, 1e-2


# ---------------------------------------------------------------------------- statistics helpers
@pytest.mark.parametrize("k, n", [(0, 50), (1, 50), (17, 50), (49, 50), (50, 50), (3, 1000)])
def test_clopper_pearson_matches_scipy_exact_interval(k, n):
    lo, hi = clopper_pearson(k, n, 0.95)
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert float(lo) == pytest.approx(ref.low, abs=1e-12)
    assert float(hi) == pytest.approx(ref.high, abs=1e-12)


def test_epsilon_from_rates_is_the_dp_inequality():
    # A perfect test (FPR = FNR = 0) is impossible to bound: +inf; a coin flip gives ε ≤ 0.
    first, second = epsilon_from_rates(np.array([0.01, 0.5]), np.array([0.5, 0.5]), 1e-5)
    assert first[0] == pytest.approx(math.log((1 - 1e-5 - 0.5) / 0.01))
    assert second[0] == pytest.approx(math.log((1 - 1e-5 - 0.01) / 0.5))
    assert first[1] < 0 and second[1] < 0


@pytest.mark.parametrize("mu", [0.25, 1.0, 3.0])
def test_gaussian_epsilon_inverts_the_exact_profile_and_is_below_the_rdp_claim(mu):
    for delta in (1e-2, 1e-5):
        eps = gaussian_epsilon(mu, delta)
        assert gaussian_delta(mu, eps) == pytest.approx(delta, rel=1e-6)
        claimed = compute_epsilon(noise_multiplier=1 / mu, sample_rate=1.0, steps=1, delta=delta)
        assert eps < claimed


# ---------------------------------------------------------------------------- the correct optimizer
def test_correct_optimizer_stays_below_the_claim():
    result = run_audit(
        num_directions=8,
        noise_multiplier=SIGMA,
        trials=200,
        delta=DELTA,
        seed=1,
        attacks=GAUSSIAN,
    )
    assert isinstance(result, AuditResult)
    assert not result.violation
    assert result.epsilon_lower <= result.epsilon_claimed
    assert result.epsilon_tight < result.epsilon_claimed
    assert result.mu_claimed == pytest.approx(1 / SIGMA)
    # the canary moves the release by exactly c along u, and the noise has std σc
    assert abs(result.shift - 1.0) < 4 * result.shift_stderr
    assert result.noise_std == pytest.approx(SIGMA, rel=0.15)
    assert result.selection_trials + result.evaluation_trials == 200
    lo, hi = result.fpr_interval
    assert lo <= result.false_positive_rate <= hi
    # the same trials at a smaller δ: a larger claim, and still no violation
    strict = result.reanalyse(delta=1e-5)
    assert strict.delta == 1e-5 and strict.trials == result.trials
    assert strict.epsilon_claimed > result.epsilon_claimed
    assert strict.epsilon_lower <= strict.epsilon_claimed
    assert strict.epsilon_tight == pytest.approx(gaussian_epsilon(1 / SIGMA, 1e-5))
    assert "_data" not in result.to_dict() and result.to_dict()["violation"] is False
    only = result.reanalyse(attacks=("release:norm",))
    assert set(only.by_attack) == {"release:norm"} and only.attack.endswith("release:norm")
    with pytest.raises(ValueError):
        result.reanalyse(attacks=("release:float",))  # not among the audited attacks


def test_subsampled_multi_step_audit_uses_the_mixture_likelihood():
    result = run_audit(
        num_directions=2,
        noise_multiplier=1.0,
        trials=100,
        delta=DELTA,
        sample_rate=0.5,
        steps=3,
        background_records=2,
        seed=2,
        attacks=GAUSSIAN,
    )
    assert result.epsilon_claimed == pytest.approx(
        compute_epsilon(noise_multiplier=1.0, sample_rate=0.5, steps=3, delta=DELTA)
    )
    assert result.epsilon_lower <= result.epsilon_claimed
    assert result.epsilon_tight is None and result.mu_claimed is None
    assert abs(result.shift - 0.5) < 4 * result.shift_stderr  # canary present half the time


def test_audit_follows_the_optimizers_direction_kind():
    """With Rademacher directions the attacker's u must come from the same kind of z."""
    result = run_audit(
        num_directions=4,
        noise_multiplier=1.0,
        trials=60,
        delta=DELTA,
        seed=6,
        optimizer_kwargs={"directions": "rademacher"},
        attacks=GAUSSIAN,
    )
    assert not result.violation
    assert abs(result.shift - 1.0) < 4 * result.shift_stderr


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(num_directions=0), ValueError),
        (dict(num_directions=1.5), TypeError),
        (dict(noise_multiplier=0.0), ValueError),
        (dict(noise_multiplier=math.nan), ValueError),
        (dict(trials=10), ValueError),
        (dict(delta=1.0), ValueError),
        (dict(sample_rate=1.5), ValueError),
        (dict(attacks=("nope",)), ValueError),
    ],
)
def test_bad_arguments_are_refused(kwargs, error):
    base = dict(num_directions=1, noise_multiplier=1.0, trials=20, delta=1e-5, seed=0)
    with pytest.raises(error):
        run_audit(**{**base, **kwargs})


# ---------------------------------------------------------------------------- planted faults
class _FakeNoiseBase:
    """Test-only noise sources: the optimizer releases through ``add_noise``; these add the
    (possibly faulty) ``sample`` to the float sum, which is what the planted faults need."""

    def add_noise(self, values, std, *, sensitivity=None):
        return values.to(torch.float64) + self.sample(values.numel(), std)


class _ScaledNoise(_FakeNoiseBase):
    """OS-entropy noise with the std multiplied by factor(K): the 'noise / K' family of bugs."""

    reproducible = False

    def __init__(self, factor):
        self.inner, self.factor = NoiseSource(), factor

    def sample(self, k, std):
        return self.inner.sample(k, std * self.factor(k))

    def state_dict(self):
        return {"mode": "os_entropy"}


class NoiseOverK(DPAggZO):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._noise = _ScaledNoise(lambda k: 1.0 / k)


class NoiseOverSqrtK(DPAggZO):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._noise = _ScaledNoise(lambda k: 1.0 / math.sqrt(k))


class ClipPerCoordinate(DPAggZO):
    """Clips each coordinate of Δ_agg to [−c, c] instead of its L2 norm: sensitivity c·√K."""

    def _clip(self, agg):
        c = self.clip_norm
        _, *diagnostics = super()._clip(agg)
        return (agg.clamp(-c, c), *diagnostics)


class NormaliseByBatch(DPAggZO):
    """Divides the update by the private |B| (no update for an empty batch, as MeZO does)."""

    def _clip(self, agg):
        self._fault_batch = agg.shape[0]
        return super()._clip(agg)

    def _update(self, entries, step, scratch, gens, coefs):
        if self._fault_batch == 0:
            return
        scale = self.expected_batch_size / self._fault_batch
        super()._update(entries, step, scratch, gens, coefs * scale)


class _DirectionSeededNoise(_FakeNoiseBase):
    """Noise from a generator seeded with the public direction seed (and the step)."""

    reproducible = False

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def sample(self, k, std):
        gen = torch.Generator().manual_seed(self.optimizer.seed + self.optimizer.steps_taken)
        return torch.randn(k, dtype=torch.float64, generator=gen) * std

    def state_dict(self):
        return {"mode": "os_entropy"}


class NoiseFromDirectionSeed(DPAggZO):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._noise = _DirectionSeededNoise(self)


class ClipBeforeMean(DPAggZO):
    """Clips (Δ_1..Δ_K) to c and then divides by K: sensitivity c/K, more private, less useful."""

    def _clip(self, agg):
        k = self.num_directions
        clipped, *diagnostics = super()._clip(agg * k)
        return (clipped / k, *diagnostics)


@pytest.mark.parametrize(
    "cls, k, trials, extra, attack",
    [
        # σ_eff = σ/K: the release is K times less noisy than the accountant assumes
        (NoiseOverK, 8, 200, {}, "likelihood"),
        # σ_eff = σ/√K (μ = 2 instead of 0.5)
        (NoiseOverSqrtK, 16, 300, {}, "likelihood"),
        # the canary contributes c·sign(w), norm c·√K, along a known direction
        (ClipPerCoordinate, 32, 150, {}, "likelihood"),
        # noisy_sum is right, but the update is S/|B|: with D0 empty there is no update at
        # all, which the attacker sees in θ_{t+1} − θ_t (update channel, not the release)
        (NormaliseByBatch, 8, 200, {}, "update:"),
        # the same with one background record: D0 updates by 2·S/b, D1 by S/b
        (NormaliseByBatch, 8, 200, {"background_records": 1}, "update:"),
        # the audit holds the public seed fixed across trials, so noise derived from it repeats
        # exactly: the releases of D0 and of D1 are two points, one c apart
        (NoiseFromDirectionSeed, 8, 100, {}, ""),
    ],
    ids=[
        "noise/K",
        "noise/sqrtK",
        "clip-per-coordinate",
        "normalise-by-|B|-empty",
        "|B|-m1",
        "seed",
    ],
)
def test_planted_fault_is_flagged(cls, k, trials, extra, attack):
    result = run_audit(
        num_directions=k,
        noise_multiplier=SIGMA,
        trials=trials,
        delta=DELTA,
        seed=3,
        optimizer_cls=cls,
        attacks=GAUSSIAN,
        **extra,
    )
    assert result.violation, result.summary()
    assert attack in result.attack


def test_seed_reuse_makes_the_noise_constant():
    result = run_audit(
        num_directions=4,
        noise_multiplier=SIGMA,
        trials=40,
        delta=DELTA,
        seed=3,
        optimizer_cls=NoiseFromDirectionSeed,
        attacks=("release:likelihood",),
    )
    assert result.noise_std == 0.0 and result.violation


def test_clipping_before_the_mean_is_not_a_leak_but_the_shift_shows_it():
    """Clipping (Δ_1..Δ_K) before dividing by K caps a record at c/K: the release is *more*
    private than claimed, so no privacy audit can flag it. The audit's shift diagnostic does: the
    canary moves the release by c/K instead of c."""
    k = 8
    result = run_audit(
        num_directions=k,
        noise_multiplier=1.0,
        trials=200,
        delta=DELTA,
        seed=4,
        optimizer_cls=ClipBeforeMean,
        attacks=GAUSSIAN,
    )
    assert not result.violation
    assert result.shift < 1.0 - 4 * result.shift_stderr
    assert abs(result.shift - 1.0 / k) < 4 * result.shift_stderr


# ---------------------------------------------------------------------------- floating point
class _GridNoise(_FakeNoiseBase):
    """Discrete Gaussian on the grid, without dither (what add_noise adds)."""

    reproducible = False

    def sample(self, k, std):
        grid = secure_noise.noise_grid(std)
        sigma2 = (Fraction(std) / Fraction(grid)) ** 2
        values = [secure_noise.discrete_gaussian(sigma2) * grid for _ in range(k)]
        return torch.tensor(values, dtype=torch.float64)

    def state_dict(self):
        return {"mode": "os_entropy"}


class GridNoiseOnRawSum(DPAggZO):
    """Grid noise added to the unrounded float sum: the output reveals the sum modulo g."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._noise = _GridNoise()


class SnappedRelease(DPAggZO):
    """Emulates the proposed hook (``noisy_sum = self._noise.add_noise(sum, σc, sensitivity=c)``)
    with the hooks a subclass has: clipped rows rounded to the grid (so their float sum is exact
    and on the grid) and integer noise on the grid, hence an exact release."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._noise = _GridNoise()

    def _clip(self, agg):
        clipped, *diagnostics = super()._clip(agg)
        if self.noise_multiplier == 0:
            return (clipped, *diagnostics)
        grid = secure_noise.noise_grid(self.noise_multiplier * self.clip_norm)
        return (torch.round(clipped / grid) * grid, *diagnostics)


def _float_audit(cls, trials=100):
    return run_audit(
        num_directions=8,
        noise_multiplier=4.0,
        trials=trials,
        delta=DELTA,
        seed=5,
        optimizer_cls=cls,
        attacks=("release:float", "release:grid"),
    )


def test_grid_noise_on_an_unrounded_sum_is_caught():
    result = _float_audit(GridNoiseOnRawSum, trials=60)
    assert result.violation and "release:grid" in result.attack


def test_exact_grid_release_resists_the_float_attack():
    result = _float_audit(SnappedRelease)
    assert not result.violation, result.summary()
    assert max(result.by_attack.values()) < result.epsilon_claimed


def test_dpaggzo_release_resists_the_float_attack():
    result = _float_audit(DPAggZO)
    assert not result.violation, result.summary()
