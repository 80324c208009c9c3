"""Gaussian noise v ~ N(0, σ²c² I_K) of DP-AggZO (Algorithm 1, line 15).

The noise generator is separate from the direction seeds and can never be derived from them:

* ``noise_seed=None`` (the default, for real privacy): the noise is drawn from OS entropy with
  the exact, integer-arithmetic samplers of :mod:`zoprivacy.noise.samplers` (the discrete Gaussian
  of Canonne, Kamath and Steinke 2020 on a grid of step g = 2^(⌊log2 σc⌋ − 30)). No seed or
  generator state exists to store or leak. Two entry points:

  - :meth:`NoiseSource.sample` (``sample_noise(k, std, None)``): the discrete Gaussian plus a
    64-bit uniform dither inside the grid cell, to be added to a float sum by the caller;
  - :meth:`NoiseSource.add_noise` (the floating-point-safe release): rounds the clipped sum to
    the grid and adds integer discrete-Gaussian noise, so the released floats are an exact
    function of an integer vector and their low-order bits carry nothing else. The optimizer
    should call this one (``noisy_sum = self._noise.add_noise(sum, σc, sensitivity=c)``):
    adding any float noise to an unrounded float sum leaks through the last bits
    (``docs/threat_model.md``).

* ``noise_seed=<int>``: one :class:`torch.Generator` seeded once, whose state travels in
  ``state_dict()`` so a resumed run continues bit for bit (continuous float64 normals). The noise
  is then predictable by anyone who knows the seed, so a :class:`UserWarning` says the run must
  not be used for real privacy.

All sampling goes through :func:`sample_noise`, the single function to swap in tests.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from zoprivacy.noise import samplers as secure_noise

__all__ = ["NoiseSource", "PredictableNoiseWarning", "sample_noise"]


class PredictableNoiseWarning(UserWarning):
    """The noise comes from a user-given seed: it is reproducible, hence offers no privacy."""


def sample_noise(k: int, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """Return ``k`` independent samples of noise with standard deviation ``std`` (float64, CPU).

    ``generator=None`` (private): :func:`zoprivacy.noise.samplers.secure_gaussian`, a discrete
    Gaussian on the grid g = 2^(⌊log2 std⌋ − 30) plus a uniform 64-bit dither in the cell, drawn
    from OS entropy with integer arithmetic only. A :class:`torch.Generator` (reproducible, not
    private): float64 standard normals from it, scaled by ``std``.
    """
    if generator is None:
        return secure_noise.secure_gaussian(k, std)
    z = torch.randn(k, dtype=torch.float64, generator=generator)
    return z.mul_(std)


class NoiseSource:
    """Where the optimizer's noise comes from: OS entropy (exact discrete sampler), or one seeded
    generator."""

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
        """Draw the K-vector v with per-coordinate std ``std`` (float64, CPU).

        OS entropy: discrete Gaussian plus dither (:func:`sample_noise` with no generator).
        Seeded: float64 normals from the saved generator.
        """
        return sample_noise(k, std, self._generator)

    def add_noise(
        self, values: torch.Tensor, std: float, *, sensitivity: float | None = None
    ) -> torch.Tensor:
        """Release ``values`` (the clipped K-sum) plus noise of std ``std`` (float64, CPU).

        OS entropy: :func:`zoprivacy.noise.samplers.snapped_noisy_sum`: ``values`` rounded to the
        grid g plus integer discrete-Gaussian noise, returned exactly as (n + Y)·g; with
        ``sensitivity=c`` the noise covers the rounding (noise multiplier ≥ std/c exactly).
        Seeded: ``values + sample(K, std)`` (reproducible, not private).
        """
        if self._generator is not None:
            x = values.detach().to(device="cpu", dtype=torch.float64)
            return x + sample_noise(x.numel(), std, self._generator)
        return secure_noise.snapped_noisy_sum(values, std, sensitivity=sensitivity)

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
