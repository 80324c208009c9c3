"""Gaussian noise v ~ N(0, σ²c² I_K) of DP-AggZO (Algorithm 1, line 15).

The noise generator is separate from the direction seeds and can never be derived from them:

* ``noise_seed=None`` (the default, for real privacy): every step draws a fresh 64-bit seed from
  the operating system's entropy pool (:func:`secrets.randbits`, i.e. ``os.urandom``) and seeds a
  new :class:`torch.Generator` with it. The seed is never stored or returned. A PRNG seeded from OS
  entropy is an interim choice; a later issue replaces it with a CSPRNG discrete Gaussian. All
  sampling goes through :func:`sample_noise`, the single function to swap.
* ``noise_seed=<int>``: one generator seeded once, whose state travels in ``state_dict()`` so a
  resumed run continues bit for bit. The noise is then predictable by anyone who knows the seed, so
  a :class:`UserWarning` says the run must not be used for real privacy.
"""

from __future__ import annotations

import secrets
import warnings
from typing import Any

import torch

__all__ = ["NoiseSource", "PredictableNoiseWarning", "sample_noise"]


class PredictableNoiseWarning(UserWarning):
    """The noise comes from a user-given seed: it is reproducible, hence offers no privacy."""


def sample_noise(k: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """Return ``k`` independent N(0, std²) samples as a float64 CPU tensor.

    Float64 standard normals from ``generator`` (a CPU generator) scaled by ``std``.
    """
    z = torch.randn(k, dtype=torch.float64, generator=generator)
    return z.mul_(std)


class NoiseSource:
    """Where the optimizer's noise comes from: OS entropy per step, or one seeded generator."""

    def __init__(self, noise_seed: int | None = None) -> None:
        self._seed: int | None = None
        self._generator: torch.Generator | None = None
        if noise_seed is not None:
            self._seed = _check_noise_seed(noise_seed)
            self._generator = torch.Generator(device="cpu")
            self._generator.manual_seed(self._seed)
            _warn_predictable(self._seed)

    @property
    def reproducible(self) -> bool:
        """True when the noise comes from a user-given seed (no privacy)."""
        return self._generator is not None

    def sample(self, k: int, std: float) -> torch.Tensor:
        """Draw the K-vector v ~ N(0, std² I_K) (float64, CPU)."""
        if self._generator is not None:
            return sample_noise(k, std, self._generator)
        fresh = torch.Generator(device="cpu")
        fresh.manual_seed(secrets.randbits(64))
        return sample_noise(k, std, fresh)

    def state_dict(self) -> dict[str, Any]:
        """Seeded mode: the seed and generator state. OS-entropy mode: nothing secret, no state."""
        if self._generator is None:
            return {"mode": "os_entropy"}
        return {"mode": "seeded", "seed": self._seed, "state": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (an OS-entropy checkpoint switches to OS entropy)."""
        mode = state.get("mode")
        if mode == "os_entropy":
            self._seed = None
            self._generator = None
        elif mode == "seeded":
            seed = _check_noise_seed(state["seed"])
            gen = torch.Generator(device="cpu")
            gen.set_state(state["state"])
            self._seed, self._generator = seed, gen
            _warn_predictable(seed)
        else:
            raise ValueError(f"noise state has unknown mode {mode!r}; expected a state_dict()")


def _check_noise_seed(noise_seed: object) -> int:
    if isinstance(noise_seed, bool) or not isinstance(noise_seed, int):
        raise TypeError(
            f"noise_seed must be None (OS entropy) or an int, got {type(noise_seed).__name__}"
        )
    if noise_seed < 0:
        raise ValueError(f"noise_seed must be a non-negative int, got {noise_seed}")
    return noise_seed


def _warn_predictable(seed: int) -> None:
    warnings.warn(
        f"noise_seed={seed} makes the privacy noise reproducible and therefore predictable: "
        "the run offers no differential privacy and must not be used for real privacy. "
        "Pass noise_seed=None to draw the noise from OS entropy.",
        PredictableNoiseWarning,
        stacklevel=3,
    )
