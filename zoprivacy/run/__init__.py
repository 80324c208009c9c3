"""A private run: the planner, :func:`make_private` and its crash-safe write-ahead journal.

* :mod:`~zoprivacy.run.plan`: :func:`plan_run`, the one sequence size release → calibration →
  budgeted accountant that every private entry point uses;
* :mod:`~zoprivacy.run.private`: :func:`make_private` and :class:`PrivateTraining`;
* :mod:`~zoprivacy.run.journal`: the step journal that makes resuming after a crash charge
  every release that was made;
* :mod:`~zoprivacy.run.checkpoint`: atomic checkpoints and which journal a run keeps and a
  resume replays (no resume path under-counts).
"""

from zoprivacy.run.checkpoint import UnjournaledResumeWarning
from zoprivacy.run.plan import RunPlan, plan_run
from zoprivacy.run.private import AbandonedStepWarning, PrivateTraining, make_private

__all__ = [
    "AbandonedStepWarning",
    "PrivateTraining",
    "RunPlan",
    "UnjournaledResumeWarning",
    "make_private",
    "plan_run",
]
