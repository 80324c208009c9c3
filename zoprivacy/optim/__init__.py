"""The optimizer: Algorithm 1's step and what it is made of.

* :mod:`~zoprivacy.optim.optimizer`: :class:`DPAggZO` (state, validation, checkpoints) and its
  presets :class:`DPZO` (K = 1) and :class:`MeZO` (no clipping, no noise);
* :mod:`~zoprivacy.optim.directions`: the public random directions z_k, regenerated from seeds;
* :mod:`~zoprivacy.optim.perturb`: how θ ± φz_k is evaluated (substitution hooks or in place);
* :mod:`~zoprivacy.optim.masks` and :mod:`~zoprivacy.optim.schedules`: the DP-ZOPO and DP-ZOSO
  variants;
* :mod:`~zoprivacy.optim.stats`: what one step returns.
"""

from zoprivacy.optim.optimizer import DPZO, DPAggZO, MeZO, NotPrivateWarning

__all__ = ["DPZO", "DPAggZO", "MeZO", "NotPrivateWarning"]
