"""Turn texts into the dict-of-tensors batches that the loss functions read.

Each ``encode_*`` helper tokenises a whole data set at once (padded to its longest record) and
returns a dict of tensors with one row per record. Wrap it in :class:`TensorDictDataset` to feed
:func:`zoprivacy.data.poisson_loader`, with :func:`collate_trimmed` as the collate function so that
every batch is cut down to its own longest record (less compute; padding never changes a loss).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = [
    "TensorDictDataset",
    "collate_trimmed",
    "encode_causal_lm",
    "encode_classification",
    "encode_prompts",
    "label_token_ids",
    "trim_padding",
]

DEFAULT_TEMPLATE = "Review: {s}\nSentiment:"
DEFAULT_LABEL_WORDS = (" negative", " positive")


def _check_texts_labels(texts: Sequence[str], labels: Sequence[int] | None) -> None:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"texts and labels differ in length: {len(texts)} != {len(labels)}")


def _require_pad_token(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        raise ValueError(
            "the tokenizer has no pad token: set tokenizer.pad_token = tokenizer.eos_token "
            "(zoprivacy.tasks.packaged.load_smollm2 does this)"
        )


def encode_classification(
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    max_length: int,
    *,
    pairs: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenise texts (or, with ``pairs``, NLI-style text pairs, in the tokenizer's own pair
    encoding) for ``AutoModelForSequenceClassification``.

    Returns:
        ``{"input_ids", "attention_mask", ["token_type_ids"], "labels"}``, tensors with one row
        per text, truncated to ``max_length`` tokens and padded to the longest one.
    """
    _check_texts_labels(texts, labels)
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"texts and pairs differ in length: {len(texts)} != {len(pairs)}")
    _require_pad_token(tokenizer)
    enc = tokenizer(
        list(texts),
        None if pairs is None else list(pairs),
        truncation=True,
        max_length=max_length,
        padding="longest",
        return_tensors="pt",
    )
    batch = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    batch["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
    return batch


def label_token_ids(tokenizer: Any, label_words: Sequence[str]) -> list[int]:
    """The vocabulary id of each label word; each word must be exactly one token.

    Raises:
        ValueError: a word is several tokens (its pieces are named) or two words share an id.
    """
    ids: list[int] = []
    for word in label_words:
        pieces = tokenizer.encode(word, add_special_tokens=False)
        if len(pieces) != 1:
            names = tokenizer.convert_ids_to_tokens(pieces)
            raise ValueError(
                f"label word {word!r} is {len(pieces)} tokens {names}, not one: choose a word "
                "that is a single token (mind the leading space)"
            )
        ids.append(int(pieces[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {list(label_words)} do not map to distinct tokens: {ids}")
    return ids


def _fit_prompt(tokenizer: Any, template: str, text: str, max_length: int | None) -> str:
    """Fill the template, shortening ``text`` (never the template) to fit ``max_length``."""
    prompt = template.format(s=text)
    if max_length is None:
        return prompt
    if len(tokenizer(prompt)["input_ids"]) <= max_length:
        return prompt
    overhead = len(tokenizer(template.format(s=""))["input_ids"])
    budget = max_length - overhead
    if budget <= 0:
        raise ValueError(f"max_length={max_length} leaves no room for the text in the template")
    pieces = tokenizer.encode(text, add_special_tokens=False)
    while budget > 0:
        short = tokenizer.decode(pieces[:budget])
        prompt = template.format(s=short)
        if len(tokenizer(prompt)["input_ids"]) <= max_length:
            return prompt
        budget -= 1
    return template.format(s="")


def encode_prompts(
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    template: str = DEFAULT_TEMPLATE,
    label_words: Sequence[str] = DEFAULT_LABEL_WORDS,
    *,
    max_length: int | None = None,
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Build prompts for :func:`zoprivacy.tasks.prompt_classification_losses`.

    Each text fills ``template`` (its ``{s}``); the model should continue the prompt with
    ``label_words[label]``. With ``max_length``, the *text* is shortened so the prompt's end
    (where the answer is read) always survives.

    Returns:
        ``(batch, label_token_ids)``: ``batch`` has ``input_ids``, ``attention_mask`` and
        ``labels`` (class indices), padded on the tokenizer's padding side.

    Raises:
        ValueError: a label word is not a single token, or labels are out of range.
    """
    _check_texts_labels(texts, labels)
    _require_pad_token(tokenizer)
    if "{s}" not in template:
        raise ValueError(f"template must contain '{{s}}', got {template!r}")
    ids = label_token_ids(tokenizer, label_words)
    bad = [y for y in labels if not 0 <= int(y) < len(ids)]
    if bad:
        raise ValueError(f"labels must be in [0, {len(ids)}) (one per label word), got {bad[:5]}")
    prompts = [_fit_prompt(tokenizer, template, t, max_length) for t in texts]
    enc = tokenizer(prompts, padding="longest", return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    batch["labels"] = torch.as_tensor([int(y) for y in labels], dtype=torch.long)
    return batch, ids


def encode_causal_lm(
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    max_length: int | None = None,
    append_eos: bool = True,
) -> dict[str, torch.Tensor]:
    """Prompt + answer sequences for :func:`zoprivacy.tasks.causal_lm_target_losses`.

    ``labels`` holds the answer's token ids (and the EOS token when ``append_eos``) and ``-100``
    on the prompt and on padding. With ``max_length`` the *prompt* is cut from the left so the
    answer survives.

    Raises:
        ValueError: a target is empty, or ``max_length`` leaves no room for an answer.
    """
    _check_texts_labels(prompts, targets)
    _require_pad_token(tokenizer)
    rows: list[tuple[list[int], list[int]]] = []
    for prompt, target in zip(prompts, targets, strict=True):
        p_ids = tokenizer(prompt)["input_ids"]
        t_ids = tokenizer.encode(target, add_special_tokens=False)
        if append_eos and tokenizer.eos_token_id is not None:
            t_ids = [*t_ids, tokenizer.eos_token_id]
        if not t_ids:
            raise ValueError(f"target {target!r} has no token")
        if max_length is not None:
            if len(t_ids) >= max_length:
                raise ValueError(
                    f"max_length={max_length} leaves no room for the prompt before the "
                    f"{len(t_ids)}-token answer {target!r}"
                )
            p_ids = p_ids[max(0, len(p_ids) + len(t_ids) - max_length) :]
        if not p_ids:
            raise ValueError("every record needs at least one prompt token before the answer")
        rows.append((p_ids, t_ids))
    length = max(len(p) + len(t) for p, t in rows)
    pad = tokenizer.pad_token_id
    left = getattr(tokenizer, "padding_side", "right") == "left"
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (p_ids, t_ids) in enumerate(rows):
        n = len(p_ids) + len(t_ids)
        start = length - n if left else 0
        input_ids[i, start : start + n] = torch.tensor(p_ids + t_ids)
        attention_mask[i, start : start + n] = 1
        labels[i, start + len(p_ids) : start + n] = torch.tensor(t_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def trim_padding(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the sequence columns that are padding in every record of ``batch``.

    Works for left and right padding: keeps the columns from the first to the last one where any
    record's ``attention_mask`` is 1. Every tensor whose first two dimensions equal the mask's
    shape is cut the same way; other values are left as they are. A batch without an
    ``attention_mask`` is returned unchanged (as a dict).
    """
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] == 0:
        return dict(batch)
    used = torch.nonzero(mask.bool().any(dim=0)).flatten()
    if used.numel() == 0:
        return dict(batch)
    first, last = int(used[0]), int(used[-1]) + 1
    if first == 0 and last == mask.shape[1]:
        return dict(batch)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == mask.shape:
            out[key] = value[:, first:last]
        else:
            out[key] = value
    return out


def collate_trimmed(records: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack records (dicts of tensors) into a batch and cut it to its own longest record."""
    if len(records) == 0:
        raise ValueError("collate_trimmed got no record (poisson_loader never calls it so)")
    keys = records[0].keys()
    batch = {k: torch.stack([torch.as_tensor(r[k]) for r in records]) for k in keys}
    return trim_padding(batch)


class TensorDictDataset(Dataset):
    """Map-style dataset over a dict of equally long tensors: record ``i`` is ``{k: v[i]}``.

    ``TensorDictDataset(encode_prompts(...)[0])`` with :func:`zoprivacy.data.poisson_loader` and
    ``collate_fn=collate_trimmed`` gives batches ready for the loss functions.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"tensors must share their first dimension, got {sizes}")
        self.tensors = dict(tensors)
        self._size = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}
