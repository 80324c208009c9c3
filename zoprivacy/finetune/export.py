"""The fine-tuned model in the Hugging Face ecosystem's own formats, with a DP model card.

* Full or partial fine-tuning: :func:`save_hf_model` writes ``save_pretrained``'s folder
  (config, safetensors weights, tokenizer) that ``AutoModelForSequenceClassification`` /
  ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads as is.
* LoRA (a ``peft.PeftModel``): the adapter folder (``adapter_config.json``,
  ``adapter_model.safetensors``, with the classifier head and any freshly initialised module as
  peft ``modules_to_save``) that ``PeftModel.from_pretrained(base, out_dir)`` loads on the base.

Both carry the tokenizer, ``README.md`` (:func:`model_card`: YAML front matter as the Hub reads
it, and the privacy guarantee in the body) and, for a prompt-based causal LM, the prompt and
label words in ``zoprivacy_task.json``. The weights are a post-processing of the mechanism's
releases (the noisy K-vectors, Algorithm 1 line 15), so they carry the run's guarantee.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["CARD_FILE", "TASK_FILE", "is_adapter", "model_card", "save_hf_model"]

CARD_FILE = "README.md"
TASK_FILE = "zoprivacy_task.json"


def is_adapter(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (saved as an adapter folder)."""
    try:
        import peft
    except ImportError:  # pragma: no cover - peft is an optional dependency
        return False
    return isinstance(model, peft.PeftModel)


def save_hf_model(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    card: str,
    task: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (full model or PEFT adapter), ``tokenizer`` and the model ``card``.

    The folder is written beside ``out_dir`` and renamed into place, so a reader never sees a
    half-written model.

    Args:
        model: a transformers model, or a ``peft.PeftModel`` (then only the adapter and the
            ``modules_to_save`` are written; the base model is the public one).
        tokenizer: its tokenizer.
        out_dir: the folder to create.
        card: the ``README.md`` text (:func:`model_card`).
        task: public task description written to ``zoprivacy_task.json`` (e.g. ``kind``,
            ``prompt``, ``label_words``, ``label_names``); ``None``: no file.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: ``out_dir`` exists, is not empty, and ``overwrite`` is False.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")  # replaces peft's own card
        if task is not None:
            (tmp / TASK_FILE).write_text(json.dumps(dict(task), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _front_matter(
    base_model: str, kind: str, adapter: bool, private: bool, tags: Sequence[str]
) -> str:
    from huggingface_hub import ModelCardData

    all_tags = ["zoprivacy", "zeroth-order"] + (["differential-privacy", "dp-aggzo"] * private)
    all_tags += [t for t in tags if t not in all_tags]
    data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        base_model=base_model,
        pipeline_tag="text-classification" if kind == "classifier" else "text-generation",
        tags=all_tags,
    )
    return f"---\n{data.to_yaml()}\n---\n"


#: Hub ids of the packaged presets (``--model minilm|smollm2``), for ``base_model``.
PACKAGED_HUB_IDS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def model_card(
    *,
    base_model: str,
    kind: str,
    method: str,
    trainable: str,
    epsilon: float | None,
    delta: float | None,
    accountant: str = "zoprivacy's Rényi-DP (RDP) accountant",
    steps: int | None = None,
    sample_rate: float | None = None,
    noise_multiplier: float | None = None,
    clip_norm: float | None = None,
    adapter: bool = False,
    label_names: Sequence[str] | None = None,
    prompt: str | None = None,
    label_words: Sequence[str] | None = None,
    metrics: Mapping[str, float] | None = None,
    held_out_private: bool = False,
    tags: Sequence[str] = (),
) -> str:
    """A Hugging Face model card: YAML front matter, then the DP guarantee and how to load.

    The front matter (``huggingface_hub.ModelCardData``) has ``library_name`` (``transformers``,
    or ``peft`` for an adapter), ``base_model`` (a packaged name becomes its Hub id),
    ``pipeline_tag`` and ``tags`` (``differential-privacy`` for a private run). The body states
    ε, δ, the accountant, the add/remove-one neighbouring notion, what the guarantee covers and
    what it does not.

    Args:
        base_model: the public model fine-tuned (``--model``).
        kind: ``"classifier"`` or ``"causal"``.
        method: the training method (``dpaggzo``, ``dpzo``, ``dpadamw``, ``mezo``, ...).
        trainable: the ``--trainable`` selection.
        epsilon, delta: the run's guarantee; ``epsilon=None``: not private.
        accountant: how ε was computed.
        steps, sample_rate, noise_multiplier, clip_norm: the mechanism's public parameters.
        adapter: the folder holds a PEFT adapter.
        label_names, prompt, label_words: the public task (label set, causal LM prompt).
        metrics: evaluation figures to state; pass only figures from public data (test file) or
            mark ``held_out_private``.
        held_out_private: the test figures come from a split carved from the private training
            data (no public test file): the card says they are not covered.
        tags: more Hub tags.

    Returns:
        The ``README.md`` text.
    """
    base = PACKAGED_HUB_IDS.get(base_model, base_model)
    private = epsilon is not None
    lines = [
        _front_matter(base, kind, adapter, private, tags),
        f"# {base} fine-tuned with {method} (zoprivacy)",
        "",
        f"{'LoRA adapter' if adapter else 'Model'} trained by zeroth-order fine-tuning of "
        f"`{base}` as a {'sequence classifier' if kind == 'classifier' else 'causal LM'}; "
        f"trainable selection `{trainable}`.",
        *_task_lines(label_names, prompt, label_words),
        "",
        "## Privacy guarantee",
        "",
    ]
    if private:
        mechanism = (steps, sample_rate, noise_multiplier, clip_norm)
        lines += _guarantee_lines(epsilon, delta, accountant, method, mechanism, held_out_private)
    else:
        lines.append(
            f"**None.** `{method}` is not differentially private: the weights can reveal the "
            "training records."
        )
    lines += _metric_lines(metrics, held_out_private)
    lines += _loading_lines(base, kind, adapter, label_names)
    return "\n".join(lines) + "\n"


def _task_lines(
    label_names: Sequence[str] | None, prompt: str | None, label_words: Sequence[str] | None
) -> list[str]:
    lines = []
    if label_names is not None:
        lines.append(f"Labels (public): {', '.join(f'`{n}`' for n in label_names)}.")
    if prompt is not None:
        lines.append(
            f"Prompt: `{prompt!r}`"
            + (f"; label words {list(label_words)}." if label_words else ".")
        )
    return ["", *lines] if lines else []


def _guarantee_lines(
    epsilon: float,
    delta: float | None,
    accountant: str,
    method: str,
    mechanism: tuple[Any, ...],
    held_out_private: bool,
) -> list[str]:
    """docs/design.md: ñ = n + Lap(ψ) once, then T subsampled-Gaussian steps, composed (Lemma 5)."""
    steps, q, sigma, c = mechanism
    known = [
        f"{name} = {_fmt(v)}"
        for name, v in (("T", steps), ("q", q), ("σ", sigma), ("c", c))
        if v is not None
    ]
    lines = [
        f"The weights in this folder are **(ε = {_fmt(epsilon)}, δ = {_fmt(delta)})-"
        "differentially private** with respect to the records of the training data, under "
        "**add/remove-one** neighbouring data sets (two data sets are neighbours when one is "
        f"the other with one record added or removed). ε is computed by {accountant} for the "
        "composition of the one release of the noisy training-set size (Laplace noise) and "
        f"every Poisson-subsampled Gaussian step of {method} "
        f"({', '.join(known) if known else 'see the run report'}; Bao et al., USENIX Security "
        "2025, Lemma 5).",
        "",
        "Covered: these weights and anything computed from them alone (e.g. predictions on new "
        "inputs).",
        "",
        "Public, not protected: the base model and its tokenizer, the label set, the prompt and "
        "label words, the seeds, the hyper-parameters.",
        "",
        "Not covered:",
        "",
        "- a person with several records is protected only as a group (add/remove-one protects "
        "one record, not one person);",
        "- the data the base model was pre-trained on;",
        "- hyper-parameters or label sets chosen by looking at the private data;",
        "- training diagnostics (per-step losses, clip fractions, batch sizes, timings): never "
        "publish them with the weights;",
    ]
    if held_out_private:
        lines.append(
            "- the held-out accuracy below: it is computed, without noise, on a split of the "
            "private training data;"
        )
    return lines


def _metric_lines(metrics: Mapping[str, float] | None, held_out_private: bool) -> list[str]:
    if not metrics:
        return []
    where = (
        "a held-out split of the private data (not covered)"
        if held_out_private
        else ("the public test data")
    )
    return ["", "## Evaluation", "", f"On {where}:", ""] + [
        f"- {name}: {_fmt(value)}" for name, value in metrics.items()
    ]


def _loading_lines(
    base: str, kind: str, adapter: bool, label_names: Sequence[str] | None
) -> list[str]:
    auto = "AutoModelForSequenceClassification" if kind == "classifier" else "AutoModelForCausalLM"
    if adapter:
        labels = f", num_labels={len(label_names)}" if kind == "classifier" and label_names else ""
        code = [
            "from peft import PeftModel",
            f"from transformers import {auto}, AutoTokenizer",
            "",
            f'base = {auto}.from_pretrained("{base}"{labels})',
            'model = PeftModel.from_pretrained(base, "THIS_FOLDER")',
        ]
    else:
        code = [
            f"from transformers import {auto}, AutoTokenizer",
            "",
            f'model = {auto}.from_pretrained("THIS_FOLDER")',
        ]
    code.append('tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")')
    extra = []
    if kind == "causal":
        extra = [
            "",
            f"A prompt-based classifier reads the next-token logits of the label words after "
            f"the prompt (both in `{TASK_FILE}`).",
        ]
    return ["", "## Loading", "", "```python", *code, "```", *extra]
