"""A running RDP accountant for a DP-AggZO run, with an optional budget guard (Lemmas 5, 7, 8)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from zoprivacy import checks as check
from zoprivacy.accounting.conversion import rdp_to_dp
from zoprivacy.accounting.errors import PrivacyBudgetExceeded
from zoprivacy.accounting.orders import DEFAULT_ORDERS
from zoprivacy.accounting.rdp import rdp_laplace, rdp_subsampled_gaussian


class RDPAccountant:
    """Tracks the RDP curve of everything released so far and converts it to (ε, δ).

    Releases are composed by adding RDP curves order by order (Lemma 7): at most one Laplace
    release of the dataset size (:meth:`release_size`) and any number of Poisson-subsampled
    Gaussian steps (:meth:`step`), possibly with different noise multipliers or sample rates.

    With ``budget=(epsilon, delta)``, :meth:`step` and :meth:`release_size` raise
    :class:`PrivacyBudgetExceeded` *before* recording a release whose cost would push ε above the
    budget, so a caller that charges the accountant before touching data never spends more.

    Example::

        acc = RDPAccountant(budget=(2.0, 1e-5))
        acc.release_size(laplace_scale=10.0)
        for _ in range(1000):
            acc.step(noise_multiplier=3.0, sample_rate=0.04)
        acc.get_epsilon(1e-5)
    """

    def __init__(
        self,
        *,
        orders: Sequence[float] | np.ndarray | None = None,
        budget: tuple[float, float] | None = None,
    ) -> None:
        self.orders = DEFAULT_ORDERS.copy() if orders is None else check.orders(orders)
        if budget is not None:
            if not (isinstance(budget, tuple | list) and len(budget) == 2):
                raise TypeError(f"budget must be a pair (epsilon, delta), got {budget!r}")
            budget = (
                check.epsilon(budget[0], "budget epsilon"),
                check.delta(budget[1], "budget delta"),
            )
        self.budget: tuple[float, float] | None = budget
        self._rdp = np.zeros_like(self.orders)
        self._history: list[dict[str, Any]] = []
        self._step_cache: dict[tuple[float, float], np.ndarray] = {}

    # ----------------------------------------------------------------------------- releases
    @property
    def history(self) -> list[dict[str, Any]]:
        """The releases so far, oldest first; consecutive identical steps are merged."""
        return [dict(entry) for entry in self._history]

    @property
    def steps(self) -> int:
        """Number of Gaussian steps charged so far."""
        return sum(e["steps"] for e in self._history if e["mechanism"] == "subsampled_gaussian")

    @property
    def size_released(self) -> bool:
        return any(e["mechanism"] == "laplace" for e in self._history)

    @property
    def rdp(self) -> np.ndarray:
        """The composed RDP curve, one value per entry of :attr:`orders`."""
        return self._rdp.copy()

    def _step_rdp(self, noise_multiplier: float, sample_rate: float) -> np.ndarray:
        key = (noise_multiplier, sample_rate)
        if key not in self._step_cache:
            self._step_cache[key] = rdp_subsampled_gaussian(
                sample_rate, noise_multiplier, self.orders
            )
        return self._step_cache[key]

    def _check_budget(self, new_rdp: np.ndarray, what: str, per_step: np.ndarray | None) -> None:
        if self.budget is None:
            return
        eps_budget, delta = self.budget
        eps, _ = rdp_to_dp(self.orders, new_rdp, delta, warn_at_edge=False)
        if eps <= eps_budget:
            return
        spent, _ = rdp_to_dp(self.orders, self._rdp, delta, warn_at_edge=False)
        allowed = (
            "" if per_step is None else f" {self._steps_allowed(per_step)} more such steps fit."
        )
        raise PrivacyBudgetExceeded(
            f"{what} would raise ε to {eps:.6g} > budget {eps_budget:.6g} (δ = {delta:g}); "
            f"ε spent so far is {spent:.6g} after {self.steps} steps.{allowed} Nothing was "
            "released: stop here, or start a new run with a larger budget or more noise."
        )

    def steps_allowed(self, *, noise_multiplier: float, sample_rate: float) -> int | None:
        """How many more steps with (σ, q) the budget allows (None: no budget)."""
        if self.budget is None:
            return None
        sigma = check.noise_multiplier(noise_multiplier)
        q = check.sample_rate(sample_rate)
        return self._steps_allowed(self._step_rdp(sigma, q))

    def _steps_allowed(self, per_step: np.ndarray) -> int:
        """Largest m such that m more identical steps stay within the budget (bisection)."""
        eps_budget, delta = self.budget  # type: ignore[misc]
        if not np.all(np.isfinite(per_step)):
            return 0  # a step with infinite RDP (e.g. no noise) never fits

        def fits(m: int) -> bool:
            rdp = self._rdp + m * per_step
            return rdp_to_dp(self.orders, rdp, delta, warn_at_edge=False)[0] <= eps_budget

        if not fits(0):
            return 0
        hi = 1
        while fits(hi):
            hi *= 2
            if hi > 1 << 40:
                return hi
        lo = hi // 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Charge ``steps`` Poisson-subsampled Gaussian releases (σ = noise_multiplier, q).

        Raises:
            PrivacyBudgetExceeded: if the budget would be exceeded; nothing is recorded.
        """
        sigma = check.noise_multiplier(noise_multiplier)
        q = check.sample_rate(sample_rate)
        t = check.steps(steps)
        if t == 0:
            return
        per_step = self._step_rdp(sigma, q)
        new_rdp = self._rdp + t * per_step
        self._check_budget(new_rdp, f"{t} step(s) with noise_multiplier={sigma:g}", per_step)
        self._rdp = new_rdp
        last = self._history[-1] if self._history else None
        if (
            last is not None
            and last["mechanism"] == "subsampled_gaussian"
            and last["noise_multiplier"] == sigma
            and last["sample_rate"] == q
        ):
            last["steps"] += t
        else:
            self._history.append(
                {
                    "mechanism": "subsampled_gaussian",
                    "noise_multiplier": sigma,
                    "sample_rate": q,
                    "steps": t,
                }
            )

    def release_size(self, laplace_scale: float) -> None:
        """Charge the one Laplace release of the dataset size (scale ψ, sensitivity 1).

        Raises:
            RuntimeError: if a size was already released (the noisy size must be released once
                and reused; a second draw would leak more).
            PrivacyBudgetExceeded: if the budget would be exceeded; nothing is recorded.
        """
        psi = check.laplace_scale(laplace_scale)
        if self.size_released:
            raise RuntimeError(
                "the dataset size was already released; reuse that noisy size (saved with the "
                "accountant's state) instead of releasing it again"
            )
        new_rdp = self._rdp + rdp_laplace(psi, self.orders)
        self._check_budget(new_rdp, f"the size release with laplace_scale={psi:g}", None)
        self._rdp = new_rdp
        self._history.append({"mechanism": "laplace", "laplace_scale": psi})

    # ----------------------------------------------------------------------------- queries
    def get_privacy_spent(self, delta: float) -> tuple[float, float]:
        """(ε, best order) of everything released so far, for the given δ (Lemma 8)."""
        d = check.delta(delta)
        if not self._history:
            return 0.0, math.nan
        only_laplace = [e for e in self._history if e["mechanism"] == "laplace"]
        if len(only_laplace) == len(self._history):  # the pure-DP bound 1/ψ may be better
            eps, order = rdp_to_dp(self.orders, self._rdp, d, warn_at_edge=False)
            pure = 1.0 / only_laplace[0]["laplace_scale"]
            return (pure, math.inf) if pure <= eps else (eps, order)
        return rdp_to_dp(self.orders, self._rdp, d)

    def get_epsilon(self, delta: float) -> float:
        """ε of everything released so far, for the given δ."""
        return self.get_privacy_spent(delta)[0]

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: orders, budget and the release history (JSON-friendly)."""
        return {
            "orders": self.orders.tolist(),
            "budget": None if self.budget is None else list(self.budget),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the RDP curve is recomputed from the history."""
        orders = check.orders(state["orders"])
        budget = state.get("budget")
        fresh = RDPAccountant(orders=orders, budget=None if budget is None else tuple(budget))
        for entry in state["history"]:
            if entry["mechanism"] == "laplace":
                fresh.release_size(entry["laplace_scale"])
            elif entry["mechanism"] == "subsampled_gaussian":
                fresh._rdp = fresh._rdp + entry["steps"] * fresh._step_rdp(
                    check.noise_multiplier(entry["noise_multiplier"]),
                    check.sample_rate(entry["sample_rate"]),
                )
                fresh._history.append(dict(entry))
            else:
                raise ValueError(f"unknown mechanism in accountant history: {entry!r}")
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        return (
            f"RDPAccountant(steps={self.steps}, size_released={self.size_released}, "
            f"budget={self.budget})"
        )
