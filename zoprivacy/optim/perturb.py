"""Evaluating a closure at θ ± φ·z_k: zero-drift substitution ("hooks") or in-place writes.

Two ways to evaluate the per-record losses at a perturbed point, chosen per trainable tensor:

* **hooks** (zero drift): θ is never written. While the closure runs, a
  :class:`torch.overrides.TorchFunctionMode` (:class:`ParameterSubstitution`) watches every torch
  function call; when an argument *is* a trainable tensor (module forwards such as ``F.linear``
  and ``F.embedding``, ``weight[rows]``, ``w * x``, ``w.t()``, ... including tied weights read by
  several modules and weights read outside any module), that call receives instead a tensor built
  just for it in a scratch buffer: z_{k,i} is regenerated from its per-tensor seed and
  θ_i + s·φ·z_{k,i} is formed in place over it (``torch.add(θ, z, alpha=s·φ, out=z)``, the same
  floating-point operation the in-place path performs). Nothing has to be undone: parameters are
  bit-exact after any number of evaluations and after any exception, in every dtype.
  Cost per evaluation: one generation per *read* of each tensor (2K + K per central step, against
  4K in place; 2K on both paths with ``direction_buffer``, K with low-rank directions, see
  :class:`~zoprivacy.optim.directions.DirectionStream`), plus one pass writing θ_i ± φz_{k,i}
  per read (low-rank embeddings and small-input linear layers skip it: the call is evaluated
  from the factors, :mod:`zoprivacy.optim.factored`), plus a Python check of the arguments of
  every torch call (a few µs each; about 250 calls per MiniLM forward, within the timing noise).
* **in place**: θ_i += s·φ·z_{k,i} before the call and undone by arithmetic afterwards
  (+φ, −2φ, +φ per direction), which leaves rounding drift of a few ulps per step (see
  ``benchmarks/drift.py``). Used for tensors the substitution cannot see.

What the substitution cannot see (and the in-place path handles): reads that bypass torch
functions (TorchScript or ``torch.compile``-d code that reads parameters from C++, custom C++
extensions reading raw pointers, ``param.numpy()``), and closures that run the model in another
thread. With ``perturbation="auto"`` the optimizer finds out on the first perturbed evaluation
with at least one record: any trainable tensor that was not read through a torch function is
moved to the in-place path from then on (path ``"mixed"``, or ``"inplace"`` if none was seen)
and that evaluation is redone. A tensor that is read both through torch functions and through a
hidden path cannot be detected; use ``perturbation="inplace"`` for such models.

Memory (hooks): one scratch buffer per device with the byte size of the largest trainable tensor
there, shared with the in-place path and the update. A call that reads several trainable tensors
at once (``F.linear(x, W, b)``) places them in that buffer, largest first, while they fit; the
others (typically a bias) get a temporary of their own size for the duration of the call. If a
call returns a view of the buffer (``w.t()``, ``w.to(w.dtype)``, ``w.detach()``), the buffer is
handed over to that view and a fresh one is allocated at the next read, so a view kept by the
closure is never overwritten.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from zoprivacy.optim.directions import DirectionStream
from zoprivacy.optim.factored import factored_call, factoring_pays, input_of, weight_of

__all__ = [
    "PERTURBATION_PATHS",
    "ParameterSubstitution",
    "PathDiscovery",
    "Prober",
    "ScratchPool",
    "capture_rng",
    "check_perturbation",
    "restore_rng",
]

PERTURBATION_PATHS = ("auto", "hooks", "inplace")
"""Values of ``DPAggZO(perturbation=...)``."""

_ALIGN = 64  # byte alignment of the tensors placed side by side in one scratch buffer


def check_perturbation(value: object) -> str:
    if value not in PERTURBATION_PATHS:
        raise ValueError(f"perturbation must be one of {PERTURBATION_PATHS}, got {value!r}")
    return str(value)


def _metadata_functions() -> frozenset[Any]:
    """Torch functions that read only a tensor's metadata: they get the real parameter."""
    t = torch.Tensor
    names = (
        "dtype",
        "shape",
        "device",
        "requires_grad",
        "is_leaf",
        "ndim",
        "layout",
        "is_cuda",
        "is_sparse",
        "is_quantized",
        "is_meta",
        "is_mkldnn",
        "grad",
        "grad_fn",
        "names",
        "_version",
        "output_nr",
    )
    funcs: set[Any] = set()
    for name in names:
        descriptor = getattr(t, name, None)
        getter = getattr(descriptor, "__get__", None)
        if getter is not None:
            funcs.add(getter)
    for name in (
        "size",
        "dim",
        "numel",
        "nelement",
        "is_floating_point",
        "is_complex",
        "element_size",
        "stride",
        "get_device",
        "is_contiguous",
        "__len__",
        "data_ptr",
        "storage_offset",
        "__hash__",
        "requires_grad_",
        "register_hook",
        "untyped_storage",
    ):
        fn = getattr(t, name, None)
        if fn is not None:
            funcs.add(fn)
    return frozenset(funcs)


_METADATA = _metadata_functions()


class ScratchPool:
    """One flat uint8 buffer per device (the largest tracked tensor's bytes), allocated lazily.

    ``buffer(device)`` returns the current buffer; :meth:`release_if_aliased` hands it over to a
    view that escaped a call, after which the next ``buffer`` call allocates a fresh one.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self._capacity: dict[torch.device, int] = {}
        for p in params:
            nbytes = p.numel() * p.element_size()
            self._capacity[p.device] = max(self._capacity.get(p.device, 0), nbytes)
        self._buffers: dict[torch.device, torch.Tensor | None] = {}
        self.handed_over = 0

    def buffer(self, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(device)
        if buf is None:
            buf = torch.empty(self._capacity[device], dtype=torch.uint8, device=device)
            self._buffers[device] = buf
        return buf

    def buffers(self) -> dict[torch.device, torch.Tensor]:
        """The buffer of every device (the ``scratch`` dict of the in-place path and the update)."""
        return {dev: self.buffer(dev) for dev in self._capacity}

    def release_if_aliased(self, out: Any) -> None:
        if isinstance(out, np.ndarray):  # e.g. param.numpy(): may share the buffer's memory
            self._buffers = {}
            self.handed_over += 1
            return
        live = {
            buf.untyped_storage().data_ptr(): dev
            for dev, buf in self._buffers.items()
            if buf is not None
        }
        if not live:
            return
        for t in _tensors_in(out):
            try:
                ptr = t.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError, TypeError):
                continue
            dev = live.get(ptr)
            if dev is not None:
                self._buffers[dev] = None
                self.handed_over += 1

    def release_all(self) -> None:
        self._buffers = {}


def _tensors_in(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    found: list[torch.Tensor] = []
    items = out.values() if isinstance(out, dict) else out if isinstance(out, list | tuple) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, list | tuple):
            found.extend(x for x in item if isinstance(x, torch.Tensor))
    return found


def _find(args: Sequence[Any], kwargs: dict[str, Any], ids: dict[int, int]) -> list[int] | None:
    hits: list[int] | None = None
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            index = ids.get(id(value))
            if index is not None:
                hits = [index] if hits is None else [*hits, index]
        elif isinstance(value, list | tuple):
            for item in value:
                if isinstance(item, torch.Tensor):
                    index = ids.get(id(item))
                    if index is not None:
                        hits = [index] if hits is None else [*hits, index]
    return hits


def _swap(value: Any, ids: dict[int, int], values: dict[int, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        index = ids.get(id(value))
        return value if index is None else values[index]
    if isinstance(value, list):
        return [_swap(v, ids, values) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_swap(v, ids, values) for v in value)
    return value


class ParameterSubstitution(TorchFunctionMode):
    """While active, torch calls that receive a tracked tensor receive ``provide(index)`` instead.

    Args:
        params: all trainable tensors (indices as in the optimizer).
        tracked: which of them to substitute.
        provide: ``provide(indices) -> {index: tensor}``, the values for one call (built fresh
            for each call unless the provider caches them).
        after: called with each substituted call's output (e.g. to detect escaping views).
        factored: ``factored(func, args, kwargs, indices)`` evaluates a call itself (the
            low-rank probes of :mod:`zoprivacy.optim.factored`) or returns ``NotImplemented``,
            and the call gets substituted values as usual.

    ``seen`` collects the indices substituted since the last :meth:`reset`. Calls that only read
    metadata (``.shape``, ``.dtype``, ``.size()``, ...) get the real tensor and are not counted.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        tracked: Sequence[bool],
        provide: Callable[[list[int]], dict[int, torch.Tensor]],
        after: Callable[[Any], None] | None = None,
        factored: Callable[[Any, tuple, dict, list[int]], Any] | None = None,
    ) -> None:
        super().__init__()
        self.ids = {id(p): i for i, (p, on) in enumerate(zip(params, tracked, strict=True)) if on}
        self.provide = provide
        self.after = after
        self.factored = factored
        self.seen: set[int] = set()
        self.calls = 0

    def reset(self) -> None:
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        hits = _find(args, kwargs, self.ids) if self.ids else None
        if hits is None or func in _METADATA:
            return func(*args, **kwargs)
        unique = list(dict.fromkeys(hits))
        self.seen.update(unique)
        self.calls += 1
        if self.factored is not None:
            out = self.factored(func, args, kwargs, unique)
            if out is not NotImplemented:
                return out
        values = self.provide(unique)
        out = func(
            *[_swap(a, self.ids, values) for a in args],
            **{k: _swap(v, self.ids, values) for k, v in kwargs.items()},
        )
        if self.after is not None:
            self.after(out)
        return out


class Prober:
    """Evaluates a closure at θ + s·φ·z_k (s ∈ {+1, −1, 0}) for one step.

    Args:
        params: the trainable tensors.
        stream: the step's :class:`~zoprivacy.optim.directions.DirectionStream`.
        phi: the perturbation scale φ.
        inplace: which tensors use the in-place path (the others are substituted).
        pool: the step's :class:`ScratchPool`.

    :meth:`evaluate` moves the in-place tensors to the requested point (undoing the previous
    one first) and runs the closure under the substitution for the other tensors;
    :meth:`restore` undoes whatever in-place perturbation is left (call it in ``finally``).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        stream: DirectionStream,
        phi: float,
        inplace: Sequence[bool],
        pool: ScratchPool,
    ) -> None:
        self.params = list(params)
        self.stream = stream
        self.phi = phi
        self.pool = pool
        self.inplace = list(inplace)
        self.offsets = [0] * len(self.params)  # units of φ·z_{current_k} each tensor carries
        self.current_k = 0
        self._point: tuple[int, int] = (0, 0)
        self._mode = self._substitution()
        self.nbytes = [p.numel() * p.element_size() for p in self.params]

    # ------------------------------------------------------------------ configuration
    def set_inplace(self, indices: Sequence[int]) -> None:
        """Move ``indices`` to the in-place path (only while no in-place offset is applied)."""
        if any(self.offsets):
            raise RuntimeError("cannot change paths while a perturbation is applied in place")
        for i in indices:
            self.inplace[i] = True
        self._mode = self._substitution()

    def _substitution(self) -> ParameterSubstitution:
        factored = self._factored if self.stream.kind == "lowrank" else None
        tracked = [not x for x in self.inplace]
        return ParameterSubstitution(
            self.params, tracked, self._provide, self.pool.release_if_aliased, factored
        )

    @property
    def seen(self) -> set[int]:
        """Tensors substituted during the last :meth:`evaluate`."""
        return self._mode.seen

    @property
    def path(self) -> str:
        """``"hooks"`` (no tensor in place), ``"inplace"`` (all) or ``"mixed"``."""
        if not any(self.inplace):
            return "hooks"
        return "inplace" if all(self.inplace) else "mixed"

    def unseen(self) -> list[int]:
        """Substituted-path tensors that the last evaluation did not read through torch calls."""
        return [i for i, ip in enumerate(self.inplace) if not ip and i not in self._mode.seen]

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, fn: Callable[[], Any], k: int, sign: int) -> Any:
        """``fn()`` evaluated at θ + sign·φ·z_k."""
        if any(self.inplace):
            self._move_to(k, sign)
        self._mode.reset()
        if sign == 0 or all(self.inplace):
            return fn()
        self._point = (k, sign)
        with self._mode:
            return fn()

    def restore(self) -> None:
        """Undo every in-place offset (θ restored up to rounding)."""
        if not any(self.offsets):
            return
        scratch = self.pool.buffers()
        k = self.current_k
        for i, p in enumerate(self.params):
            if self.offsets[i]:
                self.stream.add_(k, i, p, -self.offsets[i] * self.phi, scratch[p.device])
                self.offsets[i] = 0

    def _move(self, k: int, units: int) -> None:
        scratch = self.pool.buffers()
        self.current_k = k
        for i, p in enumerate(self.params):
            if not self.inplace[i]:
                continue
            self.stream.add_(k, i, p, units * self.phi, scratch[p.device])
            self.offsets[i] += units

    def _move_to(self, k: int, sign: int) -> None:
        units = next((o for o, ip in zip(self.offsets, self.inplace, strict=True) if ip), 0)
        if units and self.current_k != k:
            self._move(self.current_k, -units)
            units = 0
        if units != sign:
            self._move(k, sign - units)

    def _provide(self, indices: list[int]) -> dict[int, torch.Tensor]:
        k, sign = self._point
        alpha = sign * self.phi
        used: dict[torch.device, int] = {}
        values: dict[int, torch.Tensor] = {}
        for i in sorted(indices, key=lambda j: -self.nbytes[j]):
            p = self.params[i]
            dev = p.device
            start = used.get(dev, 0)
            buf = self.pool.buffer(dev)
            if start + self.nbytes[i] <= buf.numel():
                region = buf[start : start + self.nbytes[i]]
                used[dev] = -(-(start + self.nbytes[i]) // _ALIGN) * _ALIGN
            else:  # the buffer is taken by a larger tensor of this call: a temporary
                region = torch.empty(self.nbytes[i], dtype=torch.uint8, device=dev)
            values[i] = self.stream.perturbed(k, i, p.detach(), alpha, self.stream.view(region, i))
        return values

    def _factored(self, func: Any, args: tuple, kwargs: dict, indices: list[int]) -> Any:
        """A linear layer or embedding whose weight has a low-rank slice, evaluated from the
        factors (:mod:`zoprivacy.optim.factored`); ``NotImplemented`` for any other call."""
        weight = weight_of(func, args, kwargs)
        ids = self._mode.ids
        index = None if weight is None else ids.get(id(weight))
        if index is None:
            return NotImplemented
        if id(input_of(args, kwargs)) in ids or not factoring_pays(func, args, kwargs, weight):
            return NotImplemented
        factors = self.stream.factors(self._point[0], index)
        if factors is None:
            return NotImplemented
        others = [i for i in indices if i != index]
        values = self._provide(others) if others else {}

        def swap(value: Any) -> Any:
            return _swap(value, ids, values)

        return factored_call(func, args, kwargs, factors, self._point[1] * self.phi, swap)

    # ------------------------------------------------------------------ batched directions
    def evaluate_batched(
        self, fn: Callable[[], Any], points: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """``fn()`` at every point (k, sign) at once, vmapped over stacked perturbed copies.

        Needs every tensor on the substitution path. Each z_k is generated once per tensor for
        all the points that use it. Memory: len(points) copies of the trainable tensors.
        """
        if any(self.inplace):
            raise RuntimeError("batched directions need every trainable tensor on the hooks path")
        scratch = self.pool.buffers()
        stacks: list[torch.Tensor] = []
        for i, p in enumerate(self.params):
            stack = torch.empty((len(points), *p.shape), dtype=p.dtype, device=p.device)
            done: dict[int, torch.Tensor] = {}
            for j, (k, sign) in enumerate(points):
                z = done.get(k)
                if z is None:
                    z = self.stream.fill(k, i, self.stream.view(scratch[p.device], i))
                    done = {k: z}  # the scratch holds one z at a time
                torch.add(p.detach(), z, alpha=sign * self.phi, out=stack[j])
            stacks.append(stack)
        seen: set[int] = set()

        def run(*slices: torch.Tensor) -> Any:
            lookup = dict(enumerate(slices))
            mode = ParameterSubstitution(self.params, [True] * len(self.params), lambda idx: lookup)
            with mode:
                out = fn()
            seen.update(mode.seen)
            return out

        out = torch.func.vmap(run, randomness="same")(*stacks)
        self._mode.seen = seen
        return out


def capture_rng(cuda_devices: list[torch.device]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The torch RNG state (CPU, and CUDA for ``cuda_devices``) before an evaluation."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda_devices]


def restore_rng(
    state: tuple[torch.Tensor, list[torch.Tensor]], cuda_devices: list[torch.device]
) -> None:
    """Reset the torch RNG to :func:`capture_rng`'s state (same randomness at θ ± φz_k)."""
    torch.set_rng_state(state[0])
    for dev, s in zip(cuda_devices, state[1], strict=True):
        torch.cuda.set_rng_state(s, dev)


class PathDiscovery:
    """Which trainable tensors are perturbed in place: the discovery of ``perturbation="auto"``.

    On the first perturbed evaluation with at least one record, any tensor the substitution did
    not see moves to the in-place path (and that evaluation is redone). With ``fixed`` (a
    data-parallel run or batched directions, where every rank and point must take the same path)
    nothing moves: unseen tensors only raise a warning naming ``label``'s path.
    """

    def __init__(self, perturbation: str, *, fixed: bool, label: str = "hooks") -> None:
        self.perturbation = check_perturbation(perturbation)
        self.fixed = fixed
        self.label = label
        self.inplace: frozenset[int] | None = None  # None: not known yet
        self._layout: tuple[int, ...] = ()
        self._checked = False

    def flags(self, params: Sequence[torch.Tensor]) -> list[bool]:
        """Which of ``params`` use the in-place path this step (a new trainable set: find out
        again)."""
        layout = tuple(id(p) for p in params)
        if layout != self._layout:
            self._layout, self.inplace, self._checked = layout, None, False
        if self.perturbation == "inplace":
            return [True] * len(params)
        inplace = self.inplace or frozenset()
        return [i in inplace for i in range(len(params))]

    def discover(
        self, prober: Prober, out: torch.Tensor, redo: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """After a perturbed evaluation: settle which tensors the substitution cannot see."""
        if self._checked or self.perturbation == "inplace" or out.numel() == 0:
            return out
        self._checked = True
        unseen = prober.unseen()
        if self.perturbation == "auto" and not self.fixed:
            self.inplace = frozenset(unseen)
            if unseen:
                prober.set_inplace(unseen)
                return redo()  # that evaluation missed their perturbation: run it again
            return out
        self.inplace = frozenset()
        warn_unseen(prober.params, unseen, self.label)
        return out


def warn_unseen(params: Sequence[torch.Tensor], unseen: Sequence[int], path: str) -> None:
    """Warn that some trainable tensors were not read through torch functions."""
    if not unseen:
        return
    listed = ", ".join(f"#{i} {tuple(params[i].shape)}" for i in list(unseen)[:8])
    more = f" and {len(unseen) - 8} more" if len(unseen) > 8 else ""
    warnings.warn(
        f"perturbation path {path!r}: trainable tensors {listed}{more} were not read through "
        "torch functions in a perturbed evaluation. They are either unused by the loss (then "
        "nothing is wrong) or read in a way the substitution cannot see (TorchScript, a C++ "
        "extension, another thread): then pass perturbation='inplace'.",
        RuntimeWarning,
        stacklevel=4,
    )
