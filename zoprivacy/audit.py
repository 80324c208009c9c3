"""Empirical privacy audit of the whole DP-AggZO step with a canary record.

:func:`run_audit` plays the distinguishing game of differential privacy many times with the real
optimizer and turns the attacker's success into a statistical *lower* bound on ε. If the
implementation keeps its promise, the bound stays below the ε the accountant claims; a bound above
the claim is evidence of a privacy bug (with 95% confidence).

The game
--------
* Model: one float64 parameter vector θ ∈ R^d, d = K + 1, starting at 0, trained with ``lr = 1``.
* Neighbouring datasets: D0 holds ``background_records`` records whose loss does not depend on θ
  (so they contribute Δ = 0 exactly and only change |B|); D1 = D0 plus the canary, whose loss is
  L(θ) = A·θ_0 with A = 10^6·c·K. Its finite differences are Δ_k = A·z_k[0], so
  ‖Δ_agg‖ ≈ 10^6·c·√K and clipping brings it to exactly c·u with u = w/‖w‖, w_k = z_k[0]: the
  largest contribution one record may make, along a direction the attacker computes from the
  *public* seed (:func:`zoprivacy.optim.directions.direction_tensor`).
* Each trial builds a fresh optimizer (same public seed, noise from OS entropy, i.e. the private
  path) and runs ``steps`` steps on D0 or on D1, with Poisson batches drawn by the library's
  :class:`~zoprivacy.data.PoissonBatchSampler` (rate q; with q < 1 the canary is in a step's batch
  with probability q). The normaliser is the public b = q·|D1|.
* What the attacker sees, per step: the release ``stats.noisy_sum`` and the parameter update
  θ_{t+1} − θ_t, which it maps back to K numbers R̂ = −(b/η)·Z⁺(θ_{t+1} − θ_t) with the public
  directions Z (for a correct step R̂ = S; normalising by the private |B| or any other change to
  the update shows up here even when ``noisy_sum`` is right).

The tests (attacks)
-------------------
Each attack is a real-valued statistic of what the attacker sees, thresholded:

* ``release:likelihood`` / ``update:likelihood``: the Neyman-Pearson likelihood ratio for the
  correct mechanism, with y_t = ⟨R_t, u_t⟩/c: Σ_t y_t for q = 1, and
  Σ_t log(1 − q + q·exp((y_t − ½)/σ²)) for q < 1 (the canary is in each batch with probability q);
* ``release:norm`` / ``update:norm``: Σ_t ‖R_t‖/c (catches scale changes such as |B|-dependent
  normalisation);
* ``release:last`` / ``update:last`` (runs with more than one publication): y of the last one
  alone, the attacker who sees only the final model (catches a fault confined to the end of a
  run, e.g. a resume that restores less noise);
* ``release:float``: how many coordinates of the first release cannot be written as
  fl(x₁ + v) for any float v, where x₁ is the canary's clipped vector as the optimizer computes it
  (obtained by a noiseless dry run of the same class). Float noise added to an unrounded float sum
  makes some outputs impossible under D1 but possible under D0 (Mironov 2012's idea applied to the
  Gaussian sum); exact grid releases are immune;
* ``release:grid``: how many released coordinates lie exactly on the public noise grid
  g = :func:`~zoprivacy.noise.samplers.noise_grid` (σc) (grid noise added to a sum that was not
  rounded to the grid reveals the sum modulo g).

Both directions of every statistic are tried. Any statistic is sound: it only uses public
information and the releases.

From rates to ε, and the multiple-threshold problem
---------------------------------------------------
An (ε, δ)-DP mechanism forces every test to satisfy FPR + e^ε·FNR ≥ 1 − δ and
FNR + e^ε·FPR ≥ 1 − δ, so ε ≥ log((1 − δ − FNR)/FPR) and ε ≥ log((1 − δ − FPR)/FNR). The trials
are split in two halves. The *selection* half picks the attack, its direction, the threshold and
which of the two inequalities to use, maximising the bound computed on that half. The
*evaluation* half then measures FPR and FNR at that single choice, with Clopper-Pearson 95%
two-sided intervals (:func:`clopper_pearson`, :func:`scipy.stats.beta`); plugging in both upper
ends gives ``epsilon_lower``. Each upper end holds with probability ≥ 97.5%, so by the union
bound ``epsilon_lower`` is a valid lower bound with probability ≥ 95%, whatever was tried on the
selection half. ``by_attack`` repeats this per attack (each value is a 95% bound on its own; their
maximum is not).

The tight reference
-------------------
With q = 1 the correct T-step mechanism is exactly a Gaussian mechanism with μ = √T/σ
(μ-GDP, Dong, Roth, Su 2019), whose exact privacy profile is
δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Balle and Wang 2018). ``epsilon_tight`` is that ε at the
audit's δ: no test can beat it, and it is below ``epsilon_claimed`` (RDP converted with Lemma 8).
``mu_lower`` is the 95% lower bound μ ≥ Φ⁻¹(1 − FPR) − Φ⁻¹(FNR) at a threshold chosen on the
selection half (valid for the claim "the mechanism is μ-GDP"), and ``epsilon_lower_gdp`` is the ε
of a μ_lower-GDP mechanism at δ: not a rigorous (ε, δ) lower bound in general, but the right
yardstick when the mechanism really is Gaussian, where it gets close to ``epsilon_tight`` with a
few thousand trials while ``epsilon_lower`` needs about 1/δ trials to get there.

With q < 1 and one step the correct mechanism is, along the canary's direction, the pair
P = (1 − q)·N(0, σ²) + q·N(1, σ²) (canary present) and Q = N(0, σ²) (absent), in units of c.
Its exact privacy profile under add/remove adjacency (both orderings) has a closed form in Φ
(:func:`subsampled_gaussian_delta`; ``epsilon_tight`` = :func:`subsampled_gaussian_epsilon`),
and so has its trade-off curve β(α) = (1 − q)(1 − α) + q·Φ(Φ⁻¹(1 − α) − 1/σ)
(:func:`subsampled_gaussian_tradeoff`). The analogue of ``mu_lower`` is the family bound: at a
threshold chosen on the selection half, the evaluation half's upper ends (FPR_hi, FNR_hi) give
the largest 1/σ' for which the point lies on or above the curve of rate q,
1/σ' = Φ⁻¹(1 − FPR_hi) − Φ⁻¹((FNR_hi − (1 − q)(1 − FPR_hi))/q), hence ``noise_multiplier_upper``
σ̂ = σ': with 95% confidence no subsampled Gaussian of rate q with noise above σ̂ produced the
trials (a correct implementation has σ̂ ≳ σ; σ̂ < σ is evidence of a leak), and
``epsilon_lower_family`` = :func:`subsampled_gaussian_epsilon` (q, σ̂, δ), the yardstick that
gets close to ``epsilon_tight``. At q = 1 the same formula is the GDP μ (σ̂ = √T/μ_lower and
``epsilon_lower_family`` = ``epsilon_lower_gdp``). The information per trial falls with q (the
canary is absent from most D1 runs), so the family bound needs more trials at small q. For
q < 1 and T > 1 there is no closed form: ``epsilon_tight`` comes from dp-accounting's PLD
accountant (:func:`subsampled_gaussian_epsilon_pld`, an upper estimate within its
discretisation; None when dp-accounting is not installed) and the family bound is not
computed.

The maths behind these references lives in :mod:`zoprivacy.accounting`:
:mod:`~zoprivacy.accounting.hypothesis_test` (Clopper-Pearson, rates → ε),
:mod:`~zoprivacy.accounting.profile` (exact profiles), :mod:`~zoprivacy.accounting.tradeoff`
(trade-off curve, family bound) and :mod:`~zoprivacy.accounting.pld`; this module keeps the game
and re-exports the public functions it has always offered.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from zoprivacy import checks as check
from zoprivacy.accounting import RDPAccountant
from zoprivacy.accounting.hypothesis_test import clopper_pearson, epsilon_from_rates
from zoprivacy.accounting.pld import subsampled_gaussian_epsilon_pld
from zoprivacy.accounting.profile import (
    gaussian_delta,
    gaussian_epsilon,
    subsampled_gaussian_delta,
    subsampled_gaussian_epsilon,
)
from zoprivacy.accounting.tradeoff import mu_from_rates, subsampled_gaussian_tradeoff
from zoprivacy.audit_targets import (
    AdamWTarget,
    Canary,
    MakePrivateTarget,
    Mechanism,
    OptimizerTarget,
    ResumeTarget,
)
from zoprivacy.noise.samplers import noise_grid
from zoprivacy.optim.directions import draw_public_seed
from zoprivacy.optim.optimizer import DPAggZO

__all__ = [
    "AuditResult",
    "audit_dpadamw",
    "audit_make_private",
    "clopper_pearson",
    "epsilon_from_rates",
    "gaussian_delta",
    "gaussian_epsilon",
    "run_audit",
    "subsampled_gaussian_delta",
    "subsampled_gaussian_epsilon",
    "subsampled_gaussian_epsilon_pld",
    "subsampled_gaussian_tradeoff",
]


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Outcome of :func:`run_audit`.

    Rates are those of the chosen test on the evaluation half: a false positive is a D0 run the
    test calls D1; a false negative is a D1 run it calls D0. Intervals are Clopper-Pearson, 95%
    two-sided. ``shift`` (± ``shift_stderr``) and ``noise_std`` are diagnostics from all trials, in
    units of c: the mean of y_t = ⟨R_t, u_t⟩/c under D1 minus under D0 (expected: q) and its
    standard deviation under D0 (expected: σ); a fault that shrinks the canary or the noise shows
    up there even when it does not hurt privacy.

    The tight reference (see the module docstring): ``epsilon_tight`` is the exact ε at δ of the
    correct mechanism and ``tight_reference`` says how it was obtained: ``"gaussian"`` (q = 1,
    μ = √T/σ), ``"subsampled_gaussian"`` (q < 1, T = 1, :func:`subsampled_gaussian_epsilon`),
    ``"pld"`` (q < 1, T > 1, dp-accounting's PLD, pessimistic by at most its discretisation) or
    None (q < 1, T > 1 without dp-accounting). ``noise_multiplier_upper`` (σ̂) is the 95% upper
    bound on the noise multiplier σ' of the subsampled-Gaussian family at the audited q
    (σ' = √T/μ for q = 1, where 1/σ̂ = ``mu_lower``/√T); a correct implementation has σ̂ ≳ σ, a
    σ̂ < σ says the mechanism is less private than a subsampled Gaussian with noise σ.
    ``epsilon_lower_family`` is the tight ε at δ of that family member (= ``epsilon_lower_gdp``
    for q = 1). Both are None for q < 1 with T > 1.
    """

    num_directions: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    trials: int
    selection_trials: int
    evaluation_trials: int
    epsilon_lower: float
    epsilon_claimed: float
    epsilon_tight: float | None
    mu_claimed: float | None
    mu_lower: float
    epsilon_lower_gdp: float
    attack: str
    threshold: float
    false_positive_rate: float
    false_negative_rate: float
    fpr_interval: tuple[float, float]
    fnr_interval: tuple[float, float]
    by_attack: dict[str, float]
    shift: float
    shift_stderr: float
    noise_std: float
    confidence: float
    seconds: float
    tight_reference: str | None = None
    noise_multiplier_upper: float | None = None
    epsilon_lower_family: float | None = None
    path: str = "optimizer"
    _data: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def violation(self) -> bool:
        """True when the 95% lower bound exceeds the claimed ε: the implementation leaks more."""
        return self.epsilon_lower > self.epsilon_claimed

    def reanalyse(
        self,
        *,
        delta: float | None = None,
        attacks: tuple[str, ...] | None = None,
        confidence: float | None = None,
    ) -> AuditResult:
        """The same trials analysed at another δ, with a subset of the attacks and/or at another
        confidence (the claim, the selection of the test and the bounds are all redone on the
        same two halves)."""
        data = self._data
        if confidence is not None:
            data = dataclasses.replace(data, confidence=_confidence(confidence))
        if attacks is not None:
            unknown = set(attacks) - set(data.stats0)
            if unknown or not attacks:
                raise ValueError(f"unknown attacks {sorted(unknown)}; have {sorted(data.stats0)}")
            data = dataclasses.replace(
                data,
                stats0={a: data.stats0[a] for a in attacks},
                stats1={a: data.stats1[a] for a in attacks},
            )
        return _analyse(data, self.delta if delta is None else delta)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_data"}
        out["violation"] = self.violation
        return out

    def summary(self) -> str:
        tight = ""
        if self.epsilon_tight is not None:
            tight = f", tight ({self.tight_reference}) {self.epsilon_tight:.3f}"
        family = ""
        if self.noise_multiplier_upper is not None and self.epsilon_lower_family is not None:
            family = (
                f"; σ̂={self.noise_multiplier_upper:.3f} (q={self.sample_rate:g} family)"
                f" → ε_family={self.epsilon_lower_family:.3f}"
            )
        return (
            f"K={self.num_directions} σ={self.noise_multiplier:g} q={self.sample_rate:g} "
            f"T={self.steps} δ={self.delta:g}: ε_lower={self.epsilon_lower:.3f} "
            f"(attack {self.attack}, FPR={self.false_positive_rate:.4f}, "
            f"FNR={self.false_negative_rate:.4f}, {self.evaluation_trials} evaluation trials per "
            f"dataset), ε_claimed={self.epsilon_claimed:.3f}{tight}; μ_lower={self.mu_lower:.3f}"
            f" → ε_gdp={self.epsilon_lower_gdp:.3f}{family}; shift={self.shift:.3f}c, "
            f"noise std={self.noise_std:.3f}c{'  VIOLATION' if self.violation else ''}"
        )


# ---------------------------------------------------------------------------- selection/evaluation
@dataclasses.dataclass(frozen=True)
class _Test:
    attack: str
    sign: float
    threshold: float
    form: int  # 0: log((1−δ−FNR)/FPR), 1: log((1−δ−FPR)/FNR), 2: 1/σ' of the rate-q family
    q: float = 1.0  # form 2 only; q = 1 is the GDP μ


def _counts(s0: np.ndarray, s1: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    """False positives (D0 with s > τ) and false negatives (D1 with s ≤ τ) per threshold."""
    s0, s1 = np.sort(s0), np.sort(s1)
    fp = s0.size - np.searchsorted(s0, thresholds, side="right")
    fn = np.searchsorted(s1, thresholds, side="right")
    return fp, fn


def _select(
    stats0: Mapping[str, np.ndarray],
    stats1: Mapping[str, np.ndarray],
    delta: float,
    confidence: float,
    gdp: bool,
    q: float = 1.0,
) -> _Test | None:
    """The test maximising the bound on the selection half: the (ε, δ) bound (``gdp=False``) or
    1/σ' of the rate-q subsampled-Gaussian family (``gdp=True``; q = 1: the GDP μ).

    For the family bound each threshold is scored by the value the evaluation half would give if
    its rates were the selection half's upper Clopper-Pearson ends (the interval applied twice).
    This only changes which test is chosen, not the validity of the bound computed on the
    evaluation half; it penalises thresholds where the bound is ill-conditioned, above all the
    low tail where 1/σ' is a difference of two small rates, and (with q < 1) would otherwise
    often win on the selection half by chance and give nothing on the evaluation half."""
    best: tuple[float, _Test] | None = None
    for name in stats0:
        for sign in (1.0, -1.0):
            s0, s1 = sign * stats0[name], sign * stats1[name]
            thresholds = np.unique(np.concatenate([s0, s1, [-np.inf]]))
            fp, fn = _counts(s0, s1, thresholds)
            _, fp_up = clopper_pearson(fp, s0.size, confidence)
            _, fn_up = clopper_pearson(fn, s1.size, confidence)
            if gdp:
                _, fp_up = clopper_pearson(fp_up * s0.size, s0.size, confidence)
                _, fn_up = clopper_pearson(fn_up * s1.size, s1.size, confidence)
                values = [mu_from_rates(fp_up, fn_up, q)]
            else:
                values = list(epsilon_from_rates(fp_up, fn_up, delta))
            for form, value in enumerate(values):
                i = int(np.argmax(value))
                if best is None or value[i] > best[0]:
                    best = (
                        float(value[i]),
                        _Test(name, sign, float(thresholds[i]), 2 if gdp else form, q),
                    )
    return None if best is None else best[1]


def _evaluate(
    test: _Test, stats0: Mapping[str, np.ndarray], stats1: Mapping[str, np.ndarray], delta, conf
) -> dict[str, Any]:
    s0, s1 = test.sign * stats0[test.attack], test.sign * stats1[test.attack]
    fp, fn = _counts(s0, s1, np.array([test.threshold]))
    fp_lo, fp_up = clopper_pearson(fp, s0.size, conf)
    fn_lo, fn_up = clopper_pearson(fn, s1.size, conf)
    if test.form == 2:
        value = float(mu_from_rates(fp_up, fn_up, test.q)[0])
    else:
        value = float(epsilon_from_rates(fp_up, fn_up, delta)[test.form][0])
    return {
        "value": max(value, 0.0),
        "fpr": float(fp[0] / s0.size),
        "fnr": float(fn[0] / s1.size),
        "fpr_interval": (float(fp_lo[0]), float(fp_up[0])),
        "fnr_interval": (float(fn_lo[0]), float(fn_up[0])),
    }


# ---------------------------------------------------------------------------- the statistics
def _unreachable(observed: np.ndarray, x: np.ndarray) -> np.ndarray:
    """True where no float v near ``observed − x`` gives fl(x + v) == observed."""
    v0 = observed - x
    reachable = np.zeros(observed.shape, dtype=bool)
    for v in (v0, np.nextafter(v0, np.inf), np.nextafter(v0, -np.inf)):
        reachable |= (x + v) == observed
    return ~reachable


def _projections(mech: Mechanism, values: np.ndarray, c: float) -> np.ndarray:
    """y = ⟨R, u⟩/c per trial and row ([trials, rows])."""
    return np.einsum("nsk,sk->ns", values, mech.directions) / c


def _statistics(
    mech: Mechanism, c: float, releases: np.ndarray, updates: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-trial statistics; ``releases``/``updates`` are [trials, rows, K]."""
    out: dict[str, np.ndarray] = {}
    q, sigma = mech.sample_rate, mech.noise_multiplier
    for channel, values in (("release", releases), ("update", updates)):
        y = _projections(mech, values, c)
        if q >= 1.0:
            out[f"{channel}:likelihood"] = y.sum(axis=1)
        else:
            llr = np.logaddexp(math.log1p(-q), math.log(q) + (y - 0.5) / sigma**2)
            out[f"{channel}:likelihood"] = llr.sum(axis=1)
        out[f"{channel}:norm"] = np.linalg.norm(values, axis=2).sum(axis=1) / c
        if y.shape[1] > 1:  # the last publication alone (the final-model threat model)
            out[f"{channel}:last"] = y[:, -1]
    if mech.canary_sum is not None:
        x1 = mech.canary_sum[None, :]
        out["release:float"] = _unreachable(releases[:, 0, :], x1).sum(axis=1).astype(float)
        scaled = releases / noise_grid(sigma * c)  # exact: the grid is a power of two
        out["release:grid"] = (scaled == np.round(scaled)).sum(axis=(1, 2)).astype(float)
    return out


# ---------------------------------------------------------------------------- the trials
@dataclasses.dataclass(frozen=True)
class _TrialData:
    """What the trials produced; enough to redo the analysis at another δ."""

    path: str
    num_directions: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    trials: int
    stats0: dict[str, np.ndarray]
    stats1: dict[str, np.ndarray]
    y0: np.ndarray
    y1: np.ndarray
    accountant: dict[str, Any]
    confidence: float
    seconds: float


def _play(target: Any, s: _Settings, path: str, attacks) -> _TrialData:
    """``s.trials`` runs of ``target`` on D0 and on D1 each, and their statistics."""
    k, c, steps, trials, confidence = s.k, s.c, s.steps, s.trials, s.confidence
    start = time.perf_counter()
    views: tuple[list, list] = ([], [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotPrivateWarning (dry run), seeded sampling
        for _ in range(trials):
            for d in (0, 1):
                views[d].append(target.run(d == 1))
    mech = target.mechanism
    rel = [np.stack([v[0] for v in views[d]]) for d in (0, 1)]
    stats = [_statistics(mech, c, rel[d], np.stack([v[1] for v in views[d]])) for d in (0, 1)]
    if attacks is not None:
        unknown = set(attacks) - set(stats[0])
        if unknown or not attacks:
            raise ValueError(f"unknown attacks {sorted(unknown)}; choose from {sorted(stats[0])}")
        stats = [{a: s[a] for a in attacks} for s in stats]
    return _TrialData(
        path=path,
        num_directions=k,
        noise_multiplier=mech.noise_multiplier,
        sample_rate=mech.sample_rate,
        steps=steps,
        clip_norm=c,
        trials=trials,
        stats0=stats[0],
        stats1=stats[1],
        y0=_projections(mech, rel[0], c),
        y1=_projections(mech, rel[1], c),
        accountant=views[1][0][2],
        confidence=confidence,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------- entry points
@dataclasses.dataclass(frozen=True)
class _Settings:
    """The validated arguments every entry point shares."""

    k: int
    steps: int
    trials: int
    background: int
    c: float
    q: float
    delta: float
    confidence: float
    seed: int


def _settings(args: Mapping[str, Any], *, min_background: int = 0) -> _Settings:
    """The shared arguments of an entry point (its ``locals()``), checked."""
    seed = args.get("seed")
    return _Settings(
        k=check.integer("num_directions", args.get("num_directions", 4), minimum=1),
        steps=check.integer("steps", args["steps"], minimum=1),
        trials=check.integer("trials", args["trials"], minimum=20),
        background=check.integer(
            "background_records", args["background_records"], minimum=min_background
        ),
        c=check.real("clip_norm", args["clip_norm"], positive=True),
        q=check.sample_rate(args.get("sample_rate", 1.0)),
        delta=check.delta(args["delta"]),
        confidence=_confidence(args["confidence"]),
        seed=draw_public_seed() if seed is None else check.integer("seed", seed, minimum=0),
    )


def _audit(target_for, s: _Settings, path: str, attacks) -> AuditResult:
    """Build the canary and the target, play the trials, analyse them at δ."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = target_for(s)
    return _analyse(_play(target, s, path, attacks), s.delta)


def _canary(s: _Settings, kind: str = "gaussian") -> Canary:
    return Canary(k=s.k, c=s.c, steps=s.steps, seed=s.seed, kind=kind)


def run_audit(
    *,
    num_directions: int,
    noise_multiplier: float,
    trials: int,
    delta: float,
    sample_rate: float = 1.0,
    steps: int = 1,
    clip_norm: float = 1.0,
    seed: int | None = None,
    background_records: int = 0,
    optimizer_cls: type[DPAggZO] = DPAggZO,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    attacks: tuple[str, ...] | None = None,
    confidence: float = 0.95,
) -> AuditResult:
    """Audit ``optimizer_cls`` (default: :class:`~zoprivacy.DPAggZO`) with a canary.

    Runs ``trials`` independent trainings of ``steps`` steps on each of the neighbouring datasets
    D0 and D1 = D0 + canary (see the module docstring), with noise from OS entropy, and returns
    a 95%-confidence lower bound on ε from the best attack (chosen on half of the trials,
    evaluated on the other half), next to the accountant's ε for the same σ, q, steps and δ (no
    size release).

    Args:
        num_directions: K.
        noise_multiplier: σ (> 0).
        trials: runs per dataset (≥ 20); half select the test, half evaluate it.
        delta: δ of the claimed and the audited guarantee.
        sample_rate: q; the canary is in each step's Poisson batch with probability q.
        steps: steps per run (T).
        clip_norm: c.
        seed: public direction seed and seed of the batch sampling (reproducible batches); None:
            both from OS entropy. The privacy noise always comes from OS entropy.
        background_records: records in D0 (each contributes Δ = 0; they matter only for |B|).
        optimizer_cls: the optimizer class to audit (a subclass with a planted fault, in tests).
        optimizer_kwargs: extra keyword arguments for ``optimizer_cls``.
        attacks: names of the statistics to use (default: all, see the module docstring).
        confidence: confidence of the intervals and of the bound (default 0.95).
    """
    s = _settings(locals())
    sigma = check.real("noise_multiplier", noise_multiplier, positive=True)
    kwargs = dict(optimizer_kwargs or {})

    def target(s: _Settings) -> OptimizerTarget:
        rng = None if seed is None else np.random.default_rng([s.seed, 1])
        canary = _canary(s, kwargs.get("directions", "gaussian"))
        return OptimizerTarget(
            canary,
            sigma=sigma,
            q=s.q,
            steps=s.steps,
            background=s.background,
            cls=optimizer_cls,
            kwargs=kwargs,
            rng=rng,
        )

    return _audit(target, s, "optimizer", attacks)


def audit_make_private(
    *,
    num_directions: int,
    target_epsilon: float,
    trials: int,
    delta: float,
    sample_rate: float = 1.0,
    steps: int = 1,
    clip_norm: float = 1.0,
    background_records: int = 1,
    size_fraction: float = 0.05,
    restarts: int = 0,
    journal: bool = True,
    seed: int | None = None,
    make_private: Callable[..., Any] | None = None,
    attacks: tuple[str, ...] | None = None,
    confidence: float = 0.95,
) -> AuditResult:
    """Audit :func:`zoprivacy.make_private`'s loop with a canary, and its crash recovery.

    Each trial calls ``make_private`` on D0 or D1 (records 0.0 and the canary 1.0; the size ñ is
    released with ``size_fraction`` of ε) with budget (``target_epsilon``, δ) at ``sample_rate``
    and runs its Poisson loader to the end with ``optimizer.step``
    (:class:`~zoprivacy.audit_targets.MakePrivateTarget`; ``path="make_private"``). The claim is
    the run's own accountant's ε at δ (size release included); σ is make_private's calibrated
    one.

    With ``restarts`` ≥ 1 (``path="resume"``), each run is checkpointed before its first step,
    killed after step 0 and resumed from the checkpoint ``restarts`` times, the last resume
    finishing the run (:class:`~zoprivacy.audit_targets.ResumeTarget`). The attacker sees every
    publication of every process: the releases and updates of the steps each one ran, and the
    model of a resume that replayed step 0 from the journal. ``journal=True`` uses
    make_private's default crash safety (step 0 is replayed, never released again);
    ``journal=False`` passes the opt-out, so every restart releases step 0 again. The claim is
    the final process's accountant.

    ``make_private``: the function to call (default: the library's; a wrapper planting a fault,
    in tests). Other arguments as in :func:`run_audit`; D0 needs a record
    (``background_records`` ≥ 1)."""
    s = _settings(locals(), min_background=1)
    options = dict(
        epsilon=check.epsilon(target_epsilon, "target_epsilon"),
        delta=s.delta,
        q=s.q,
        steps=s.steps,
        background=s.background,
        size_fraction=check.size_fraction(size_fraction),
        make_private=make_private,
    )
    if check.integer("restarts", restarts, minimum=0) == 0:
        return _audit(
            lambda s: MakePrivateTarget(_canary(s), **options), s, "make_private", attacks
        )
    options.update(restarts=restarts, journal=bool(journal))
    return _audit(lambda s: ResumeTarget(_canary(s), **options), s, "resume", attacks)


def audit_dpadamw(
    *,
    target_epsilon: float,
    trials: int,
    delta: float,
    steps: int = 1,
    clip_norm: float = 1.0,
    background_records: int = 1,
    make_trainer: Callable[..., Any] | None = None,
    attacks: tuple[str, ...] | None = None,
    confidence: float = 0.95,
) -> AuditResult:
    """Audit the ``zoprivacy finetune`` DP-AdamW baseline with a canary (``path="dpadamw"``).

    Each trial builds the job's trainer (``make_trainer`` with ``method="dpadamw"``: its
    planner, Opacus's ``DPOptimizer``, its Poisson loader) for budget (``target_epsilon``, δ) on
    D0 or D1 and runs it to the end (:class:`~zoprivacy.audit_targets.AdamWTarget`). The
    expected batch size is far above ñ, so q = 1 in every trial (the job sets q = b/ñ, which
    would otherwise differ between trials). The release is the noisy gradient (K = 4); the
    claim is the trainer's accountant. ``make_trainer``: the function to call (default:
    :func:`zoprivacy.finetune.make_trainer`; a wrapper planting a fault, in tests)."""
    s = _settings(locals(), min_background=1)
    epsilon = check.epsilon(target_epsilon, "target_epsilon")

    def target(s: _Settings) -> AdamWTarget:
        return AdamWTarget(
            c=s.c,
            epsilon=epsilon,
            delta=s.delta,
            batch_size=_Q1_BATCH_SIZE,
            steps=s.steps,
            background=s.background,
            make_trainer=make_trainer,
        )

    return _audit(target, s, "dpadamw", attacks)


_Q1_BATCH_SIZE = 1e12  # above any ñ: q = min(1, b/ñ) = 1


# ---------------------------------------------------------------------------- analysis
def _analyse(data: _TrialData, delta: float) -> AuditResult:
    delta = check.delta(delta)
    conf = data.confidence
    half = data.trials // 2
    sel0 = {a: s[:half] for a, s in data.stats0.items()}
    sel1 = {a: s[:half] for a, s in data.stats1.items()}
    ev0 = {a: s[half:] for a, s in data.stats0.items()}
    ev1 = {a: s[half:] for a, s in data.stats1.items()}

    test = _select(sel0, sel1, delta, conf, gdp=False)
    main = _evaluate(test, ev0, ev1, delta, conf)
    gdp_test = _select(sel0, sel1, delta, conf, gdp=True)
    mu_lower = _evaluate(gdp_test, ev0, ev1, delta, conf)["value"]
    by_attack = {}
    for name in data.stats0:
        one = _select({name: sel0[name]}, {name: sel1[name]}, delta, conf, gdp=False)
        by_attack[name] = _evaluate(one, {name: ev0[name]}, {name: ev1[name]}, delta, conf)["value"]
    sigma, q, t_steps = data.noise_multiplier, data.sample_rate, data.steps
    tight, reference = _tight_epsilon(q, sigma, t_steps, delta)
    noise_upper, epsilon_family = _family_bound(data, (sel0, sel1), (ev0, ev1), mu_lower, delta)
    y0, y1 = data.y0, data.y1
    return AuditResult(
        path=data.path,
        num_directions=data.num_directions,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=t_steps,
        clip_norm=data.clip_norm,
        delta=delta,
        trials=data.trials,
        selection_trials=half,
        evaluation_trials=data.trials - half,
        epsilon_lower=main["value"],
        epsilon_claimed=_claimed(data.accountant, delta),
        epsilon_tight=tight,
        tight_reference=reference,
        mu_claimed=math.sqrt(t_steps) / sigma if q >= 1.0 else None,
        mu_lower=mu_lower,
        epsilon_lower_gdp=gaussian_epsilon(mu_lower, delta),
        noise_multiplier_upper=noise_upper,
        epsilon_lower_family=epsilon_family,
        attack=test.attack if test.sign > 0 else f"-{test.attack}",
        threshold=test.sign * test.threshold,
        false_positive_rate=main["fpr"],
        false_negative_rate=main["fnr"],
        fpr_interval=main["fpr_interval"],
        fnr_interval=main["fnr_interval"],
        by_attack=by_attack,
        shift=float(y1.mean() - y0.mean()),
        shift_stderr=float(math.sqrt(y0.var() / y0.size + y1.var() / y1.size)),
        noise_std=float(y0.std()),
        confidence=conf,
        seconds=data.seconds,
        _data=data,
    )


def _family_bound(
    data: _TrialData, selection, evaluation, mu_lower: float, delta: float
) -> tuple[float | None, float | None]:
    """σ̂, the 95% upper bound on the noise multiplier of the rate-q subsampled-Gaussian family,
    and the tight ε at δ of that family member (see the module docstring)."""
    q, t_steps, conf = data.sample_rate, data.steps, data.confidence
    if q >= 1.0:  # T Gaussian steps are one Gaussian with μ = √T/σ: σ' = √T/μ
        return _reciprocal(mu_lower) * math.sqrt(t_steps), gaussian_epsilon(mu_lower, delta)
    if t_steps > 1:  # the T-fold composed trade-off curve has no closed form to invert
        return None, None
    family_test = _select(*selection, delta, conf, gdp=True, q=q)
    noise_upper = _reciprocal(_evaluate(family_test, *evaluation, delta, conf)["value"])
    return noise_upper, subsampled_gaussian_epsilon(q, noise_upper, delta)


def _claimed(state: dict[str, Any], delta: float) -> float:
    """The ε at δ of the accountant a run ended with (what the run reports)."""
    accountant = RDPAccountant()
    accountant.load_state_dict({**state, "budget": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


def _tight_epsilon(
    q: float, sigma: float, steps: int, delta: float
) -> tuple[float | None, str | None]:
    """The tight ε of the correct mechanism's T Gaussian steps at δ (no size release), and
    where it comes from."""
    if q >= 1.0:
        return gaussian_epsilon(math.sqrt(steps) / sigma, delta), "gaussian"
    if steps == 1:
        return subsampled_gaussian_epsilon(q, sigma, delta), "subsampled_gaussian"
    pld = subsampled_gaussian_epsilon_pld(q, sigma, steps, delta)
    return (None, None) if pld is None else (pld, "pld")


def _reciprocal(mu: float) -> float:
    """1/μ with 1/0 = inf (no evidence) and 1/inf = 0 (a perfect test)."""
    return math.inf if mu <= 0.0 else 1.0 / mu


def _confidence(confidence: object) -> float:
    value = check.real("confidence", confidence, positive=True)
    if not 0.5 < value < 1.0:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    return value
