"""The noise of the releases: Algorithm 1's Gaussian v and the size release's Laplace.

* :mod:`~zoprivacy.noise.source`: :class:`NoiseSource`, the generator the optimizer draws v from
  (OS entropy, or a seed that makes the run reproducible and not private);
* :mod:`~zoprivacy.noise.samplers`: the exact integer samplers (discrete Gaussian and Laplace of
  Canonne, Kamath and Steinke 2020) and the grid that makes a float release safe.
"""

from zoprivacy.noise.source import NoiseSource, PredictableNoiseWarning, sample_noise

__all__ = ["NoiseSource", "PredictableNoiseWarning", "sample_noise"]
