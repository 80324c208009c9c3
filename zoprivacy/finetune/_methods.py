"""The methods of ``zoprivacy finetune`` and their defaults (one place for both).

Private methods (``dpaggzo``, ``dpzo``, ``dpadamw``) share one accounting
(:func:`zoprivacy.run.plan.plan_run`); ``mezo`` and ``adamw`` are the non-private references;
``zeroshot`` only evaluates.
"""

from __future__ import annotations

from typing import Any

METHODS = ("dpaggzo", "dpzo", "mezo", "dpadamw", "adamw", "zeroshot")
ZO_METHODS = ("dpaggzo", "dpzo", "mezo")
FIRST_ORDER_METHODS = ("dpadamw", "adamw")
PRIVATE_METHODS = ("dpaggzo", "dpzo", "dpadamw")
TRAINING_METHODS = ZO_METHODS + FIRST_ORDER_METHODS

#: Per-method defaults (K, clip norm c, learning rate η, steps T). The clip norm of DP-AggZO is
#: β/√K with β = ``clip_beta`` (the paper's parametrisation: the noise σ·c·√K on the update
#: stays constant when K changes); DPZO clips its scalar at β.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dpaggzo": {"directions": 64, "clip_beta": 0.8, "lr": 1.0, "steps": 1000},
    "dpzo": {"directions": 1, "clip_beta": 0.8, "lr": 1.0, "steps": 1000},
    "mezo": {"directions": 16, "clip_beta": None, "lr": 0.3, "steps": 1000},
    "dpadamw": {"directions": None, "clip_beta": 1.0, "lr": 0.01, "steps": 1000},
    "adamw": {"directions": None, "clip_beta": None, "lr": 0.01, "steps": 1000},
    "zeroshot": {"directions": None, "clip_beta": None, "lr": None, "steps": 0},
}

#: Trainable selection per model.
TRAINABLE_DEFAULTS = {"minilm": "classifier", "smollm2": "head"}
