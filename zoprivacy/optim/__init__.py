"""The optimizer: Algorithm 1's step and what it is made of.

* :mod:`~zoprivacy.optim.optimizer`: :class:`DPAggZO` (state, validation, checkpoints);
* :mod:`~zoprivacy.optim.presets`: :class:`DPZO` (K = 1) and :class:`MeZO` (no clipping, no
  noise);
* :mod:`~zoprivacy.optim.algorithm`: Algorithm 1's step as pure functions;
  :mod:`~zoprivacy.optim.config` (per-step values and argument checks),
  :mod:`~zoprivacy.optim.closure` (the closure contract), :mod:`~zoprivacy.optim.state`
  (checkpoints);
* :mod:`~zoprivacy.optim.directions`: the public random directions z_k, regenerated from seeds;
* :mod:`~zoprivacy.optim.perturb`: how θ ± φz_k is evaluated (substitution hooks or in place);
* :mod:`~zoprivacy.optim.masks` and :mod:`~zoprivacy.optim.schedules`: the DP-ZOPO and DP-ZOSO
  variants;
* :mod:`~zoprivacy.optim.stats`: what one step returns.
"""

from zoprivacy.optim.optimizer import DPAggZO, NotPrivateWarning
from zoprivacy.optim.presets import DPZO, MeZO

__all__ = ["DPZO", "DPAggZO", "MeZO", "NotPrivateWarning"]
