"""Generation targets of the ``zoprivacy finetune`` job (``--target-column``, a causal LM).

Training minimises the per-record mean token loss of the target span
(:func:`zoprivacy.tasks.causal_lm_target_losses`, the paper's SQuAD/DROP setting with MeZO's
prompt + answer format); :func:`target_losses_with_grad` is the same loss with autograd, for the
first-order baselines. Evaluation (:func:`evaluate_generation`) reports the mean test loss and the
exact match of greedy decoding: the model continues each test prompt, one argmax token at a time,
for at most the target's length (+ EOS), and the decoded continuation, stripped of surrounding
white space, must equal the stripped target.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from zoprivacy import tasks

__all__ = ["evaluate_generation", "greedy_exact_match", "target_losses_with_grad"]

IGNORE_INDEX = -100


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)


def target_losses_with_grad(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """:func:`zoprivacy.tasks.causal_lm_target_losses` with autograd (``[B]``, float32): the
    mean over each record's own target tokens of the next-token cross-entropy."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device).long()
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask)).logits
    targets = labels[:, 1:]
    token = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, reduction="none", ignore_index=-100
    )
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token.sum(dim=1) / counts


def _split(row_ids: torch.Tensor, row_labels: torch.Tensor, row_mask: torch.Tensor):
    """A record's prompt ids and target ids (padding dropped)."""
    real = row_mask.bool()
    ids, labels = row_ids[real], row_labels[real]
    answer = labels != IGNORE_INDEX
    start = int(answer.nonzero()[0]) if answer.any() else len(ids)
    return ids[:start], ids[start:]


@torch.no_grad()
def greedy_continuation(model: torch.nn.Module, prompt: torch.Tensor, steps: int, eos: Any):
    """Up to ``steps`` greedy (argmax) tokens after ``prompt`` (stops after EOS)."""
    device = next(model.parameters()).device
    ids = prompt.to(device)[None]
    out: list[int] = []
    for _ in range(steps):
        mask = torch.ones_like(ids)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
        token = int(logits[0, -1].argmax())
        if eos is not None and token == eos:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return out


def greedy_exact_match(classifier: Any, encoded: Mapping[str, torch.Tensor]) -> float:
    """Share of records whose greedy continuation equals the target (both stripped)."""
    tok = classifier.tokenizer
    eos = tok.eos_token_id
    hits = 0
    n = encoded["input_ids"].shape[0]
    for i in range(n):
        prompt, answer = _split(
            encoded["input_ids"][i], encoded["labels"][i], encoded["attention_mask"][i]
        )
        target = [t for t in answer.tolist() if t != eos]
        produced = greedy_continuation(classifier.model, prompt, len(target) + 1, eos)
        same = tok.decode(produced, skip_special_tokens=True).strip()
        hits += int(same == tok.decode(target, skip_special_tokens=True).strip())
    return hits / n if n else float("nan")


def evaluate_generation(classifier: Any, encoded: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``{"loss": mean target loss, "exact_match": greedy exact match}`` (eval mode)."""
    model = classifier.model
    was_training = model.training
    model.eval()
    try:
        losses = []
        n = encoded["input_ids"].shape[0]
        for start in range(0, n, 16):
            block = tasks.trim_padding({k: v[start : start + 16] for k, v in encoded.items()})
            losses.append(tasks.causal_lm_target_losses(model, block).double().cpu())
        loss = float(torch.cat(losses).mean()) if losses else float("nan")
        return {"loss": loss, "exact_match": greedy_exact_match(classifier, encoded)}
    finally:
        model.train(was_training)
