"""The closure contract of a DP-AggZO step: checks on what the closure returns.

A closure returns the per-record losses of the current batch, a 1-D floating tensor of shape
[|B|], finite, the same |B| at every evaluation of a step (``docs/design.md``, "One step").
The errors raised here are *bad-output* errors: :func:`explain_bad_output` adds to them, in a
real step, that the step was already charged and how to find such bugs for free
(:meth:`zoprivacy.DPAggZO.check_closure`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from zoprivacy.optim.directions import DirectionStream
from zoprivacy.optim.perturb import Prober, ScratchPool, capture_rng, restore_rng

__all__ = [
    "check_batched",
    "check_closure_argument",
    "check_losses",
    "dry_run",
    "evaluate",
    "explain_bad_output",
    "loss_difference",
]

_MAX_LISTED = 10


def _bad(kind: type[Exception], message: str) -> Exception:
    exc = kind(message)
    exc.bad_closure_output = True  # type: ignore[attr-defined]
    return exc


def explain_bad_output(exc: BaseException, step: int, *, charged: bool) -> None:
    """Append to a bad-output error what it cost and how to find such bugs for free (defect 5).

    Errors raised inside the closure itself are left as they are.
    """
    if not getattr(exc, "bad_closure_output", False) or not exc.args:
        return
    cost = (
        f"DPAggZO step {step} was already charged to the accountant: the closure had read the "
        "data before its output could be checked, so this step's privacy budget is spent. "
        if charged
        else ""
    )
    exc.args = (
        f"{exc.args[0]}. {cost}Find such closure bugs for free, on a batch you declare public "
        "or synthetic, with DPAggZO.check_closure(losses, batch) (or "
        "PrivateTraining.dry_run(batch)) before training",
        *exc.args[1:],
    )


def check_closure_argument(closure: object) -> None:
    """The ``closure`` passed to ``DPAggZO.step``: required and callable."""
    if closure is None:
        raise ValueError(
            "DPAggZO.step needs a closure returning the per-record losses (shape [|B|]) of "
            "the current batch, evaluated without backward(): opt.step(lambda: losses(model))"
        )
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")


def where(k: int, sign: int) -> str:
    """The evaluation point, as error messages name it."""
    if sign == 0:
        return "the unperturbed θ (forward differences)"
    return f"direction k={k} (θ{'+' if sign > 0 else '-'}φ·z_k)"


def _indices(mask: torch.Tensor) -> str:
    idx = mask.nonzero().flatten().tolist()
    more = f" (and {len(idx) - _MAX_LISTED} more)" if len(idx) > _MAX_LISTED else ""
    return f"{idx[:_MAX_LISTED]}{more}"


def loss_difference(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Δ_k as computed (line 9), refused when it overflows float64."""
    bad = ~torch.isfinite(delta)
    if bool(bad.any()):
        raise _bad(
            ValueError,
            f"the loss difference overflows float64 for records {_indices(bad)} at "
            f"direction k={k}; the losses are too large: rescale the loss",
        )
    return delta


def evaluate(closure: Callable[[], object], point: str, batch: int | None) -> torch.Tensor:
    """Call the closure once and check its output; returns the losses as float64 on CPU."""
    return check_losses(closure(), point, batch)


def check_losses(out: object, point: str, batch: int | None) -> torch.Tensor:
    """``out`` as float64 CPU losses, or a bad-output error naming the problem and the fix."""
    if not isinstance(out, torch.Tensor):
        raise _bad(
            TypeError,
            f"closure must return a torch.Tensor of per-record losses, got "
            f"{type(out).__name__} at {point}",
        )
    if out.dim() != 1:
        raise _bad(
            ValueError,
            f"closure must return a 1-D tensor of shape [|B|] (one loss per record, e.g. "
            f"reduction='none'), got shape {tuple(out.shape)} at {point}",
        )
    if not out.is_floating_point():
        raise _bad(
            TypeError, f"closure must return floating-point losses, got {out.dtype} at {point}"
        )
    if batch is not None and out.numel() != batch:
        raise _bad(
            ValueError,
            f"closure returned {out.numel()} losses at {point} but {batch} at the first "
            "evaluation of the step: every evaluation of one step must see the same batch",
        )
    losses = out.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        raise _bad(
            ValueError,
            f"closure returned NaN/inf losses for records {_indices(bad)} at {point}; fix the "
            "loss (e.g. log(0), float16 overflow) or lower perturbation_scale",
        )
    return losses


def check_batched(out: object, points: list[tuple[int, int]], batch: int | None) -> torch.Tensor:
    """Check the vmapped output [len(points), |B|] row by row; returns float64 CPU rows."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(points):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _bad(
            ValueError,
            f"batched_directions: the vmapped closure returned {shape}, expected "
            f"[{len(points)}, |B|] (one 1-D tensor of per-record losses per point)",
        )
    rows = [check_losses(out[j], where(k, s), batch) for j, (k, s) in enumerate(points)]
    return torch.stack(rows)


def dry_run(
    losses: Callable[[Any], torch.Tensor],
    batch: Any,
    params: Sequence[torch.Tensor],
    stream: DirectionStream,
    phi: float,
    inplace: Sequence[bool],
) -> None:
    """Evaluate ``losses(batch)`` at θ, θ + φz_0 and θ − φz_0 of ``stream`` and check each output.

    The machinery of a real step (:class:`~zoprivacy.optim.perturb.Prober`, the torch RNG reset
    between the points); tensors perturbed in place (``inplace``) are restored from a copy, so
    the parameters are left bit-identical. Used by :meth:`zoprivacy.DPAggZO.check_closure`.
    """
    from zoprivacy.tasks.check import batch_size_of

    size = batch_size_of(batch)
    saved = [p.detach().clone() if f else None for p, f in zip(params, inplace, strict=True)]
    pool = ScratchPool(params)
    prober = Prober(params, stream, phi, inplace, pool)
    devices = sorted({p.device for p in params if p.device.type == "cuda"}, key=str)
    rng = capture_rng(devices)
    try:
        for sign in (0, +1, -1):
            restore_rng(rng, devices)
            point = where(0, sign)
            prober.evaluate(lambda p=point: evaluate(lambda: losses(batch), p, size), 0, sign)
    finally:
        prober.restore()
        for p, copy in zip(params, saved, strict=True):
            if copy is not None:
                p.copy_(copy)
        pool.release_all()
