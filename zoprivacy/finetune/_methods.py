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
#: stays constant when K changes); DPZO clips its scalar at β. K, T, the expected batch size
#: and the clip norms of DPZO and DP-AdamW are fixed, not selected on data; η (and β for
#: DP-AggZO) are the validation selection of :data:`SELECTED` for the default task, BBC News.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dpaggzo": {"directions": 64, "clip_beta": 0.4, "lr": 3.0, "steps": 1000},
    "dpzo": {"directions": 1, "clip_beta": 0.8, "lr": 3.0, "steps": 1000},
    "mezo": {"directions": 16, "clip_beta": None, "lr": 1.0, "steps": 1000},
    "dpadamw": {"directions": None, "clip_beta": 1.0, "lr": 0.05, "steps": 1000},
    "adamw": {"directions": None, "clip_beta": None, "lr": 0.01, "steps": 1000},
    "zeroshot": {"directions": None, "clip_beta": None, "lr": None, "steps": 0},
}

#: The hyper-parameters chosen on each packaged task's *validation* split (200 records carved
#: from the training records by the public seed 0; never the test split), by
#: ``python -m benchmarks.select_defaults`` (``benchmarks/results/default_selection.json``, which
#: lists every grid point's validation accuracy). A run on the user's own files takes the BBC
#: values: they were chosen on public data, never on the user's.
SELECTED: dict[str, dict[str, dict[str, float]]] = {
    "bbc_news": {
        "dpaggzo": {"lr": 3.0, "clip_beta": 0.4},
        "dpzo": {"lr": 3.0},
        "mezo": {"lr": 1.0},
        "dpadamw": {"lr": 0.05},
        "adamw": {"lr": 0.01},
    },
    "rotten_tomatoes": {
        "dpaggzo": {"lr": 3.0, "clip_beta": 0.8},
        "dpzo": {"lr": 3.0},
        "mezo": {"lr": 3.0},
        "dpadamw": {"lr": 0.01},
        "adamw": {"lr": 0.05},
    },
}


def method_defaults(method: str, task: str | None) -> dict[str, Any]:
    """:data:`METHOD_DEFAULTS` of ``method`` with the validation selection of packaged ``task``
    (``None``: the user's own data, which takes the default task's selection)."""
    chosen = SELECTED.get(task or "bbc_news", SELECTED["bbc_news"]).get(method, {})
    return {**METHOD_DEFAULTS[method], **chosen}


#: Trainable selection per model.
TRAINABLE_DEFAULTS = {"minilm": "classifier", "smollm2": "head"}
