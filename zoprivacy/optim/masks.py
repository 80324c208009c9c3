"""Coordinate masks for pruned zeroth-order steps (DP-ZOPO): perturb and update a subset only.

With ``DPAggZO(..., mask=m)`` the direction of trainable tensor ``i`` at step ``t`` is
``m_{t,i} ⊙ z_{t,k,i}``: the 2K perturbed evaluations and the update touch only the coordinates
whose mask bit is set, and every other coordinate keeps its exact value (weight decay, when
``weight_decay > 0``, still shrinks every trainable coordinate). The estimator then targets the
gradient restricted to the mask: E[(m⊙z)(m⊙z)ᵀ] = diag(m).

Contract of a mask ``m``: a callable ``m(step, index, param) -> Tensor[bool] | None`` (None: no
mask for that tensor), called once per trainable tensor at the start of every step, before any
perturbation, with the tensor's current values. ``index`` is the tensor's position among the
optimizer's trainable tensors. The result must have ``param``'s shape.

Privacy: a mask must be a function of public information only: the step, the public seeds, the
(public) pretrained weights, or the current parameters θ_t, which are themselves a
post-processing of the public initial weights, the public direction seeds and the released noisy
sums S. A mask computed from the training data would leak it and is not covered by the
accounting.

Memory: the optimizer keeps each tensor's mask for the step packed to one bit per coordinate
(:func:`pack_mask`), i.e. 1/32 of the trainable float32 bytes (1/16 for bfloat16), and unpacks
it in chunks of 512 KiB when it applies it; building a mask from θ costs at most one bool tensor
of the tensor's size at a time (a quarter of a float32 scratch buffer) at the start of the step.

Masks provided here:

* :class:`MagnitudeMask` (per tensor, from the current parameters): the ``density`` fraction of
  coordinates with the largest (or smallest) |θ|.
* :class:`RandomMask` (public randomness): each coordinate kept with probability ``density``,
  from a public seed, redrawn every ``every`` steps.
* :class:`FixedMask`: given boolean masks (e.g. magnitudes of the public pretrained weights,
  :func:`magnitude_masks`).

Checkpoints: the three classes serialise themselves (``state_dict()``,
:func:`mask_from_state_dict`; a :class:`FixedMask` saves its masks packed to bits), so
``DPAggZO.state_dict()`` saves the mask and ``load_state_dict`` restores it into an optimizer
built without one, or checks that the optimizer's own mask is the same. Any other mask callable
is not saved: pass the same callable when resuming.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "FixedMask",
    "MagnitudeMask",
    "MaskFn",
    "RandomMask",
    "apply_packed_mask_",
    "bit_table",
    "magnitude_masks",
    "mask_from_state_dict",
    "pack_mask",
    "unpack_mask",
]

MaskFn = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]

_CHUNK = 1 << 18  # coordinates per chunk when masks are built or packed
# RandomMask's SeedSequence spawn keys carry this tag as a third word: the direction seeds use
# two-word keys (step, k) (zoprivacy.optim.directions),
# so a RandomMask given the optimizer's own seed
# still draws from streams independent of the directions.
_RANDOM_MASK_TAG = 0x6D61736B  # "mask"
_WEIGHTS: dict[torch.device, torch.Tensor] = {}


_BIT_TABLES: dict[torch.device, torch.Tensor] = {}


def bit_table(device: torch.device) -> torch.Tensor:
    """[256, 8] bool table: row b holds the bits of byte b, least significant first."""
    table = _BIT_TABLES.get(device)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = bits.to(dtype=torch.bool, device=device).contiguous()
        _BIT_TABLES[device] = table
    return table


_MASK_CHUNK = 1 << 16  # packed mask bytes unpacked per chunk (524,288 coordinates)


def apply_packed_mask_(out: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Zero the coordinates of ``out`` whose bit in ``packed`` is 0 (``out`` contiguous)."""
    flat = out.view(-1)
    n = flat.numel()
    if packed.numel() != (n + 7) // 8:
        raise ValueError(f"packed mask has {packed.numel()} bytes, expected {(n + 7) // 8}")
    table = bit_table(out.device)
    full = n // 8
    if full:
        step = min(_MASK_CHUNK, full)
        index = torch.empty(step, dtype=torch.int64, device=out.device)
        for start in range(0, full, step):
            stop = min(full, start + step)
            idx = index[: stop - start]
            idx.copy_(packed[start:stop])
            bits = table.index_select(0, idx)
            flat[8 * start : 8 * stop].view(-1, 8).mul_(bits)
    tail = n - 8 * full
    if tail:
        flat[8 * full :].mul_(table[packed[full].long()][:tail])
    return out


def _check_density(density: object) -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density must be a real number in (0, 1], got {density!r}")
    d = float(density)
    if not (0.0 < d <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {d}")
    return d


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask to ``ceil(n/8)`` bytes: bit ``j`` of byte ``b`` is ``mask[8b + j]``."""
    if mask.dtype != torch.bool:
        raise TypeError(f"a mask must be a bool tensor, got {mask.dtype}")
    flat = mask.reshape(-1)
    n = flat.numel()
    out = torch.zeros((n + 7) // 8, dtype=torch.uint8, device=mask.device)
    weights = _WEIGHTS.get(mask.device)
    if weights is None:
        weights = (2 ** torch.arange(8)).to(dtype=torch.uint8, device=mask.device)
        _WEIGHTS[mask.device] = weights
    full = n // 8
    for start in range(0, full, _CHUNK):
        stop = min(full, start + _CHUNK)
        block = flat[8 * start : 8 * stop].view(-1, 8).to(torch.uint8) * weights
        out[start:stop] = block.sum(dim=1, dtype=torch.uint8)
    tail = n - 8 * full
    if tail:
        out[full] = (flat[8 * full :].to(torch.uint8) * weights[:tail]).sum(dtype=torch.uint8)
    return out


def unpack_mask(packed: torch.Tensor, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """The boolean mask of ``shape`` packed in ``packed`` (inverse of :func:`pack_mask`)."""
    n = math.prod(shape)
    if packed.numel() != (n + 7) // 8:
        raise ValueError(f"packed mask has {packed.numel()} bytes, expected {(n + 7) // 8}")
    bits = bit_table(packed.device).index_select(0, packed.long()).reshape(-1)
    return bits[:n].reshape(tuple(shape))


def _kth_abs(param: torch.Tensor, k: int, sample_size: int) -> float:
    """The k-th smallest |θ| (1-based); estimated on an evenly strided sample for big tensors."""
    flat = param.detach().reshape(-1)
    n = flat.numel()
    if n > sample_size:
        stride = -(-n // sample_size)
        sample = flat[::stride].abs().float()
        k = min(sample.numel(), max(1, round(k * sample.numel() / n)))
        return float(torch.kthvalue(sample, k).values)
    return float(torch.kthvalue(flat.abs().float(), k).values)


class MagnitudeMask:
    """Keep the ``density`` fraction of each tensor's coordinates with the largest |θ|.

    Args:
        density: fraction of coordinates kept per tensor, in (0, 1].
        largest: True keeps the largest magnitudes, False the smallest (sparse-MeZO style).
        sample_size: tensors with more coordinates get their threshold from an evenly strided
            sample of about this many coordinates (the kept fraction is then approximate), so
            that no full-size sorted copy is made.

    The threshold is the k-th order statistic of |θ| (k = ceil(density·n)); ties at the
    threshold are all kept, so slightly more than k coordinates may be kept.
    """

    def __init__(self, density: float, *, largest: bool = True, sample_size: int = 1 << 20) -> None:
        self.density = _check_density(density)
        self.largest = bool(largest)
        if isinstance(sample_size, bool) or not isinstance(sample_size, numbers.Integral):
            raise TypeError(f"sample_size must be an int, got {sample_size!r}")
        if sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {sample_size}")
        self.sample_size = int(sample_size)

    def __call__(self, step: int, index: int, param: torch.Tensor) -> torch.Tensor | None:
        n = param.numel()
        if n == 0 or self.density >= 1.0:
            return None
        keep = max(1, math.ceil(self.density * n))
        if self.largest:
            threshold = _kth_abs(param, n - keep + 1, self.sample_size)
        else:
            threshold = _kth_abs(param, keep, self.sample_size)
        flat = param.detach().reshape(-1)
        out = torch.empty(n, dtype=torch.bool, device=param.device)
        for start in range(0, n, _CHUNK):
            part = flat[start : start + _CHUNK].abs()
            if self.largest:
                torch.ge(part, threshold, out=out[start : start + _CHUNK])
            else:
                torch.le(part, threshold, out=out[start : start + _CHUNK])
        return out.view(param.shape)

    def __repr__(self) -> str:
        return f"MagnitudeMask(density={self.density}, largest={self.largest})"

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe configuration; :func:`mask_from_state_dict` rebuilds an equal mask."""
        return {
            "type": "MagnitudeMask",
            "density": self.density,
            "largest": self.largest,
            "sample_size": self.sample_size,
        }

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.state_dict() == other.state_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.state_dict().items()))


class RandomMask:
    """Keep each coordinate with probability ``density``, from public randomness.

    The mask of tensor ``index`` at step ``t`` is drawn with a generator seeded from
    ``SeedSequence(seed, spawn_key=(t // every, index, TAG))``: it is public (anyone with
    ``seed`` can replay it), the same for ``every`` consecutive steps, and independent of the
    direction seeds even when ``seed`` is the optimizer's own direction seed (those use two-word
    spawn keys). It is drawn on the tensor's device (CPU and CUDA give different masks).
    """

    def __init__(self, density: float, *, seed: int, every: int = 1) -> None:
        self.density = _check_density(density)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.seed = int(seed)
        self.every = int(every)

    def __call__(self, step: int, index: int, param: torch.Tensor) -> torch.Tensor | None:
        if self.density >= 1.0:
            return None
        key = (step // self.every, index, _RANDOM_MASK_TAG)
        word = np.random.SeedSequence(self.seed, spawn_key=key)
        gen = torch.Generator(device=param.device)
        gen.manual_seed(int(word.generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1))
        out = torch.empty(param.shape, dtype=torch.bool, device=param.device)
        return out.bernoulli_(self.density, generator=gen)

    def __repr__(self) -> str:
        return f"RandomMask(density={self.density}, seed={self.seed}, every={self.every})"

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe configuration; :func:`mask_from_state_dict` rebuilds an equal mask."""
        return {
            "type": "RandomMask",
            "density": self.density,
            "seed": self.seed,
            "every": self.every,
        }

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.state_dict() == other.state_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.state_dict().items()))


class FixedMask:
    """The same given masks at every step: ``{index: bool tensor}`` or a list (None: no mask)."""

    def __init__(
        self, masks: Mapping[int, torch.Tensor | None] | Sequence[torch.Tensor | None]
    ) -> None:
        items = masks.items() if isinstance(masks, Mapping) else enumerate(masks)
        self.masks: dict[int, torch.Tensor] = {}
        for index, mask in items:
            if mask is None:
                continue
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask {index} must be a bool tensor, got {mask!r}")
            self.masks[int(index)] = mask
        self._digest: str | None = None

    def __call__(self, step: int, index: int, param: torch.Tensor) -> torch.Tensor | None:
        return self.masks.get(index)

    def state_dict(self) -> dict[str, Any]:
        """``{"type": "FixedMask", "masks": {index: (shape, packed bits)}}`` (CPU uint8 tensors,
        1 bit per coordinate); :func:`mask_from_state_dict` rebuilds an equal mask."""
        return {
            "type": "FixedMask",
            "masks": {
                i: (list(m.shape), pack_mask(m.detach()).cpu()) for i, m in self.masks.items()
            },
        }

    @property
    def digest(self) -> str:
        """A short hex digest of the indices, shapes and bits of the masks (for comparisons;
        computed once, as the masks are fixed)."""
        if self._digest is None:
            h = hashlib.blake2b(digest_size=8)
            for i in sorted(self.masks):
                m = self.masks[i]
                h.update(repr((i, tuple(m.shape))).encode())
                h.update(pack_mask(m.detach()).cpu().numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and self.masks.keys() == other.masks.keys()
            and all(
                m.shape == other.masks[i].shape and torch.equal(m.cpu(), other.masks[i].cpu())
                for i, m in self.masks.items()
            )
        )

    __hash__ = None  # type: ignore[assignment]  # holds tensors: compared by value

    def __repr__(self) -> str:
        return f"FixedMask(tensors={sorted(self.masks)}, digest={self.digest})"


def mask_from_state_dict(
    state: Mapping[str, Any], device: torch.device | str | None = None
) -> MagnitudeMask | RandomMask | FixedMask:
    """Rebuild a library mask from its ``state_dict()`` (dispatches on ``state["type"]``).

    ``device``: where a :class:`FixedMask`'s boolean masks are unpacked (default CPU; the
    optimizer moves each mask to its tensor's device when it applies it).
    """
    kind = state.get("type") if isinstance(state, Mapping) else None
    if kind == "MagnitudeMask":
        return MagnitudeMask(
            state["density"], largest=state["largest"], sample_size=state["sample_size"]
        )
    if kind == "RandomMask":
        return RandomMask(state["density"], seed=state["seed"], every=state["every"])
    if kind == "FixedMask":
        masks = {}
        for i, (shape, packed) in state["masks"].items():
            masks[int(i)] = unpack_mask(packed.to(device or "cpu"), shape).clone()
        return FixedMask(masks)
    raise ValueError(
        f"unknown mask state {state!r}: only MagnitudeMask, RandomMask and FixedMask are "
        "serialisable; pass the same mask callable when resuming"
    )


def magnitude_masks(
    params: Sequence[torch.Tensor], density: float, *, largest: bool = True
) -> list[torch.Tensor | None]:
    """:class:`MagnitudeMask` applied once to ``params`` (e.g. the public pretrained weights)."""
    rule = MagnitudeMask(density, largest=largest)
    return [rule(0, i, p) for i, p in enumerate(params)]
