"""zoprivacy: differentially private zeroth-order fine-tuning (DP-AggZO, Bao et al. 2025).

Main entry points: :class:`DPAggZO` (with presets :class:`DPZO` and :class:`MeZO`),
:func:`make_private` for one-call setup, and :mod:`zoprivacy.accounting` for the privacy maths.
DP-ZOSO schedules (:class:`Stagewise`, :func:`schedule_epsilon`), DP-ZOPO masks
(:class:`MagnitudeMask`, :class:`RandomMask`, :class:`FixedMask`) and the speed helpers
:class:`PrefixCache` and :class:`LabelWordHead` are re-exported here.
"""

from zoprivacy import accounting
from zoprivacy.accounting import PrivacyBudgetExceeded
from zoprivacy.data import (
    EMPTY_BATCH,
    PoissonBatchSampler,
    expected_batch_size,
    is_empty_batch,
    poisson_loader,
    release_size,
)
from zoprivacy.noise import PredictableNoiseWarning
from zoprivacy.optim.masks import FixedMask, MagnitudeMask, RandomMask
from zoprivacy.optim.optimizer import DPZO, DPAggZO, MeZO, NotPrivateWarning
from zoprivacy.optim.schedules import Stagewise, schedule_epsilon
from zoprivacy.optim.stats import StepStats
from zoprivacy.run import AbandonedStepWarning, PrivateTraining, make_private
from zoprivacy.tasks.prefix import LabelWordHead, PrefixCache

__version__ = "0.1.0"

__all__ = [
    "DPZO",
    "EMPTY_BATCH",
    "AbandonedStepWarning",
    "DPAggZO",
    "FixedMask",
    "LabelWordHead",
    "MagnitudeMask",
    "MeZO",
    "NotPrivateWarning",
    "PoissonBatchSampler",
    "PredictableNoiseWarning",
    "PrefixCache",
    "PrivacyBudgetExceeded",
    "PrivateTraining",
    "RandomMask",
    "Stagewise",
    "StepStats",
    "__version__",
    "accounting",
    "expected_batch_size",
    "is_empty_batch",
    "make_private",
    "poisson_loader",
    "release_size",
    "schedule_epsilon",
]
