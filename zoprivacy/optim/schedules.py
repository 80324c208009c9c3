"""Stage-wise hyper-parameter schedules (DP-ZOSO) and the privacy cost of a σ schedule.

DP-ZOSO runs DP zeroth-order fine-tuning in stages, each with its own perturbation scale φ,
learning rate η, number of directions K, clip norm c and noise multiplier σ. In
:class:`~zoprivacy.DPAggZO`, ``num_directions``, ``clip_norm``, ``noise_multiplier``
and ``perturbation_scale`` accept any callable ``f(step) -> value``; :class:`Stagewise` is the
piecewise-constant one::

    from zoprivacy.optim.schedules import Stagewise
    opt = DPAggZO(params, lr, num_directions=Stagewise([200], [4, 16]),
                  perturbation_scale=Stagewise([200, 600], [1e-2, 3e-3, 1e-3]),
                  clip_norm=1.0, noise_multiplier=Stagewise([200], [1.2, 0.9]), ...)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, Stagewise([200], [1.0, 0.3]))
    # call lr_sched.step() after each opt.step(); lrs are per param group, as in torch

Accounting: the optimizer charges its accountant with the σ of every step, so a σ schedule is a
composition of heterogeneous subsampled-Gaussian steps; :func:`schedule_epsilon` computes the
same total before training (e.g. to choose the schedule), by composing the RDP of each distinct
(σ, q) run of steps with the size release.

Checkpoints: :class:`Stagewise` serialises itself (:meth:`Stagewise.state_dict`,
:func:`schedule_from_state_dict`), so ``DPAggZO.state_dict()`` saves the whole schedule and
``load_state_dict`` restores it into an optimizer built without it, or checks that the
optimizer's own schedule is the same one. Any other callable is not saved: pass the same
callable when resuming.
"""

from __future__ import annotations

import bisect
import itertools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Stagewise", "schedule_epsilon", "schedule_from_state_dict", "stage_lengths"]


class Stagewise:
    """Piecewise-constant schedule: ``values[i]`` for ``boundaries[i-1] <= step < boundaries[i]``.

    Args:
        boundaries: strictly increasing step indices (ints ≥ 1) where a new stage starts.
        values: one value per stage (``len(boundaries) + 1``).

    ``Stagewise([100, 300], [a, b, c])(step)`` is ``a`` for steps 0-99, ``b`` for 100-299 and
    ``c`` from 300 on. Picklable, comparable and serialisable (:meth:`state_dict`), so it can
    be logged with a run's config and saved in a checkpoint.
    """

    _TYPE = "Stagewise"

    def __init__(self, boundaries: Sequence[int], values: Sequence[Any]) -> None:
        bounds = list(boundaries)
        for b in bounds:
            if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1:
                raise ValueError(f"boundaries must be ints >= 1, got {boundaries!r}")
        if any(b2 <= b1 for b1, b2 in itertools.pairwise(bounds)):
            raise ValueError(f"boundaries must be strictly increasing, got {boundaries!r}")
        if len(values) != len(bounds) + 1:
            raise ValueError(
                f"need len(boundaries) + 1 = {len(bounds) + 1} values, got {len(values)}"
            )
        self.boundaries = [int(b) for b in bounds]
        self.values = list(values)

    def __call__(self, step: int) -> Any:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        return self.values[bisect.bisect_right(self.boundaries, int(step))]

    def stage(self, step: int) -> int:
        """Index of the stage containing ``step``."""
        return bisect.bisect_right(self.boundaries, int(step))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Stagewise)
            and self.boundaries == other.boundaries
            and self.values == other.values
        )

    def __hash__(self) -> int:
        return hash((tuple(self.boundaries), tuple(map(repr, self.values))))

    def __repr__(self) -> str:
        return f"Stagewise({self.boundaries}, {self.values})"

    def state_dict(self) -> dict[str, Any]:
        """``{"type": "Stagewise", "boundaries": [...], "values": [...]}`` (JSON-safe for
        number values); :meth:`from_state_dict` rebuilds an equal schedule."""
        return {
            "type": self._TYPE,
            "boundaries": list(self.boundaries),
            "values": list(self.values),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Stagewise:
        """The schedule saved by :meth:`state_dict` (validated like the constructor's input)."""
        if not isinstance(state, dict) or state.get("type") != cls._TYPE:
            raise ValueError(f"not a Stagewise state_dict: {state!r}")
        return cls(state["boundaries"], state["values"])


def schedule_from_state_dict(state: dict[str, Any]) -> Stagewise:
    """Rebuild a library schedule from its ``state_dict()`` (dispatches on ``state["type"]``)."""
    kind = state.get("type") if isinstance(state, dict) else None
    if kind == Stagewise._TYPE:
        return Stagewise.from_state_dict(state)
    raise ValueError(
        f"unknown schedule state {state!r}: only zoprivacy.Stagewise is serialisable; "
        "pass the same callable when resuming"
    )


def stage_lengths(schedule: Callable[[int], Any], steps: int) -> list[tuple[Any, int]]:
    """Run-length encoding of ``schedule(0..steps-1)``: ``[(value, count), ...]``."""
    runs: list[tuple[Any, int]] = []
    for t in range(int(steps)):
        value = schedule(t)
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1] + 1)
        else:
            runs.append((value, 1))
    return runs


def schedule_epsilon(
    *,
    noise_multiplier: float | Callable[[int], float],
    sample_rate: float,
    steps: int,
    delta: float,
    laplace_scale: float | None = None,
    orders: Sequence[float] | None = None,
) -> float:
    """ε after ``steps`` DP-AggZO steps whose σ follows ``noise_multiplier`` (a float or schedule).

    Composes (Lemma 7) the RDP of every step at its own σ, plus the Laplace size release when
    ``laplace_scale`` is given, and converts with Lemma 8, exactly as the
    :class:`~zoprivacy.accounting.RDPAccountant` the optimizer charges step by step does.
    """
    from zoprivacy.accounting import RDPAccountant

    accountant = RDPAccountant(orders=orders)
    if laplace_scale is not None:
        accountant.release_size(laplace_scale)
    schedule = noise_multiplier if callable(noise_multiplier) else (lambda _t: noise_multiplier)
    for sigma, count in stage_lengths(schedule, steps):
        accountant.step(noise_multiplier=float(sigma), sample_rate=sample_rate, steps=count)
    return accountant.get_epsilon(delta)
