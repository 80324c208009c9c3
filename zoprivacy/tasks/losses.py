"""Per-sample loss functions for Hugging Face models (one loss per record, never a batch mean).

DP-AggZO clips each record's vector of finite differences, so the optimizer's closure must return
``Tensor[|B|]`` where entry ``i`` depends on record ``i`` alone. Each function here takes
``(model, batch, ...)`` and returns such a tensor; bind the model to get the closure::

    losses = functools.partial(sequence_classification_losses, model)
    stats = opt.step(lambda: losses(batch))

Common rules:

* The forward pass runs under ``torch.inference_mode()``; the result is returned as an ordinary
  (non-inference) float tensor of shape ``[|B|]`` (float32, or float64 for a float64 model).
* The model should be in eval mode (as in MeZO): then every loss is a deterministic function of
  the record and ``θ``, and :func:`~zoprivacy.tasks.check_per_sample` can verify it. A model in
  training mode raises ``ValueError`` unless ``allow_training=True`` (dropout then relies on the
  optimizer replaying the RNG state between the ``θ+φz`` and ``θ-φz`` evaluations).
* Batches are dicts of tensors (what :func:`zoprivacy.tasks.collate_trimmed` or
  ``default_collate`` make from :class:`zoprivacy.tasks.TensorDictDataset` records), moved to the
  model's device. Padding is handled only through ``attention_mask`` (left or right), so padding
  never changes a record's loss.
* An empty batch (:data:`zoprivacy.data.EMPTY_BATCH`, an empty dict or a batch whose tensors have
  leading dimension 0) gives ``torch.zeros(0)`` without running the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from zoprivacy.data.poisson import is_empty_batch

__all__ = [
    "answer_hidden_states",
    "answer_positions",
    "causal_lm_target_losses",
    "class_labels",
    "decoder_and_head",
    "lm_head_logits",
    "per_record_losses",
    "prompt_classification_losses",
    "sequence_classification_losses",
]

IGNORE_INDEX = -100


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _batch_records(batch: Any) -> int:
    """Number of records in a dict-of-tensors batch (0 for an empty batch)."""
    if is_empty_batch(batch):
        return 0
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
    sizes = {k: v.shape[0] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim()}
    if not sizes:
        return 0
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch tensors disagree on the number of records: {sizes}")
    return next(iter(sizes.values()))


def _get(batch: Mapping[str, Any], key: str, device: torch.device) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"batch has no {key!r} (keys: {sorted(batch)})")
    value = batch[key]
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    return value.to(device, non_blocking=True)


def _model_inputs(batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        k: v.to(device, non_blocking=True)
        for k, v in batch.items()
        if k != "labels" and isinstance(v, torch.Tensor)
    }


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def per_record_losses(
    model: torch.nn.Module,
    batch: Any,
    compute: Callable[[torch.device, torch.dtype], torch.Tensor],
    *,
    allow_training: bool = False,
) -> torch.Tensor:
    """The frame every loss function of this module runs in (its "common rules").

    ``compute(device, dtype)`` gets the model's device and the loss dtype (float64 for a float64
    model, else float32) and returns the ``[B]`` losses. Around it: an empty batch gives
    ``torch.zeros(0)`` without calling ``compute``; a model in training mode raises
    ``ValueError`` unless ``allow_training``; ``compute`` runs under ``torch.inference_mode()``,
    and its result comes back as an ordinary (non-inference) tensor of the loss dtype.

    Args:
        model: the model ``compute`` runs (its first parameter gives device and dtype).
        batch: the dict-of-tensors batch (only its record count is read here).
        compute: the loss computation proper.
        allow_training: accept a model in training mode (dropout on).
    """
    device, param_dtype = _model_device_dtype(model)
    dtype = torch.float64 if param_dtype == torch.float64 else torch.float32
    if _batch_records(batch) == 0:
        return torch.zeros(0, dtype=dtype, device=device)
    if model.training and not allow_training:
        raise ValueError(
            "the model is in training mode: call model.eval() first (dropout makes each loss "
            "random), or pass allow_training=True to use dropout deliberately"
        )
    with torch.inference_mode():
        losses = compute(device, dtype)
    # clone() outside inference mode gives an ordinary tensor the optimizer can use freely.
    return losses.to(dtype).clone()


def class_labels(batch: Mapping[str, Any], num_classes: int, device: torch.device) -> torch.Tensor:
    """The batch's ``labels`` as class indices ``[B]`` (long, on ``device``), checked.

    Raises:
        ValueError: ``labels`` is not one-dimensional or holds a value outside
            ``[0, num_classes)``.
    """
    labels = _get(batch, "labels", device).long()
    if labels.dim() != 1:
        raise ValueError(f"labels must be class indices of shape [B], got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {labels.tolist()}")
    return labels


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A causal LM's decoder (``get_decoder()`` or ``.model``) and LM head
    (``get_output_embeddings()`` or ``.lm_head``).

    Raises:
        TypeError: the model exposes neither pair (not a causal LM).
    """
    decoder = None
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    head = None
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        head = get_head()
    if head is None:
        head = getattr(model, "lm_head", None)
    if not isinstance(decoder, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        raise TypeError(
            f"{type(model).__name__} does not expose a decoder (get_decoder()/.model) and an "
            "LM head (get_output_embeddings()/.lm_head); these losses need a causal LM"
        )
    return decoder, head


def _hidden_states(decoder: torch.nn.Module, batch: Mapping[str, Any], device: torch.device):
    input_ids = _get(batch, "input_ids", device)
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device, non_blocking=True)
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_position_ids(attention_mask),
        use_cache=False,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, attention_mask


def answer_hidden_states(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """A causal LM's last hidden state (after the final norm) at each record's answer position.

    Runs the decoder only (no LM head) on ``input_ids`` / ``attention_mask``, with position ids
    counted over real tokens, and gathers row ``i`` at :func:`answer_positions` ``[i]``.
    Runs in the caller's grad mode (wrap it in ``torch.inference_mode()`` for a loss).

    Returns:
        ``Tensor[B, H]`` on the model's device.
    """
    device, _ = _model_device_dtype(model)
    decoder, _ = decoder_and_head(model)
    hidden, mask = _hidden_states(decoder, batch, device)
    return hidden[torch.arange(hidden.shape[0], device=device), answer_positions(mask)]


def lm_head_logits(model: torch.nn.Module, hidden: torch.Tensor, rows: Any = None) -> torch.Tensor:
    """The LM head applied to ``hidden``, restricted to vocabulary ``rows`` (all when ``None``).

    Computes ``hidden @ lm_head.weight[rows].T (+ bias[rows])``, i.e. ``[..., len(rows)]``
    logits instead of ``[..., vocab]``, and applies the config's ``final_logit_softcapping``
    when it has one.
    """
    _, head = decoder_and_head(model)
    weight = head.weight if rows is None else head.weight[rows]
    bias = getattr(head, "bias", None)
    if bias is not None and rows is not None:
        bias = bias[rows]
    logits = F.linear(hidden, weight, bias)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def sequence_classification_losses(
    model: torch.nn.Module, batch: Mapping[str, Any], *, allow_training: bool = False
) -> torch.Tensor:
    """Per-record cross-entropy of an ``AutoModelForSequenceClassification``.

    Args:
        model: a sequence-classification model (logits ``[B, C]``), in eval mode.
        batch: dict with ``labels`` (class indices ``[B]``) and the model inputs
            (``input_ids``, ``attention_mask``, optionally ``token_type_ids``, ...).
        allow_training: accept a model in training mode (dropout on).

    Returns:
        ``Tensor[B]``: ``-log softmax(logits_i)[label_i]`` for each record.
    """

    def compute(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        labels = _get(batch, "labels", device).long()
        logits = model(**_model_inputs(batch, device)).logits
        return F.cross_entropy(logits.to(dtype), labels, reduction="none")

    return per_record_losses(model, batch, compute, allow_training=allow_training)


def answer_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (``attention_mask == 1``), for left or right padding."""
    length = attention_mask.shape[-1]
    arange = torch.arange(length, device=attention_mask.device).expand_as(attention_mask)
    pos = torch.where(attention_mask.bool(), arange, -1).amax(dim=-1)
    if (pos < 0).any():
        empty = torch.nonzero(pos < 0).flatten().tolist()
        raise ValueError(f"records {empty} have no real token (attention_mask all zero)")
    return pos


def prompt_classification_losses(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    label_token_ids: Sequence[int] | torch.Tensor,
    *,
    allow_training: bool = False,
) -> torch.Tensor:
    """Prompt-based classification with a causal LM (the MeZO / DP-AggZO setup).

    Each record is a prompt such as ``"Review: <text>\\nSentiment:"``; class ``j`` is the label
    word ``label_token_ids[j]`` (e.g. ``" negative"``, ``" positive"``). The loss is the
    cross-entropy over the label words' logits at the answer position, the record's last real
    token (found from ``attention_mask``, so left and right padding both work).

    Only what is needed is computed: the decoder (``model.get_decoder()``, i.e. ``model.model``)
    produces hidden states, the answer position's hidden state is gathered, and the LM head is
    applied restricted to the label rows (``lm_head.weight[label_token_ids]``), giving ``[B, C]``
    logits instead of ``[B, L, vocab]``. Position ids are counted over real tokens, so a padded
    record gets the same positions as when alone. A final-logit soft-cap in the config is
    applied; other output-layer tricks (logit scaling) are not.

    Args:
        model: a causal LM (e.g. ``LlamaForCausalLM``, possibly PEFT-wrapped), in eval mode.
        batch: dict with ``input_ids``, ``attention_mask`` and ``labels`` (class indices ``[B]``).
        label_token_ids: one vocabulary id per class.
        allow_training: accept a model in training mode (dropout on).

    Returns:
        ``Tensor[B]`` of per-record losses.
    """
    rows = torch.as_tensor(label_token_ids, dtype=torch.long).flatten()

    def compute(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        labels = class_labels(batch, rows.numel(), device)
        answer = answer_hidden_states(model, batch)
        logits = lm_head_logits(model, answer, rows.to(device))
        return F.cross_entropy(logits.to(dtype), labels, reduction="none")

    return per_record_losses(model, batch, compute, allow_training=allow_training)


def causal_lm_target_losses(
    model: torch.nn.Module, batch: Mapping[str, Any], *, allow_training: bool = False
) -> torch.Tensor:
    """Per-record mean next-token loss over the answer tokens only.

    ``labels`` has the shape of ``input_ids`` and holds the token id at answer positions and
    ``-100`` elsewhere (prompt and padding), as in Hugging Face's convention: position ``t`` is
    predicted from positions ``< t``. Each record's loss is the mean over *its own* answer tokens
    (not a token-weighted batch mean). Logits are computed only at the positions that predict an
    answer token.

    Args:
        model: a causal LM, in eval mode.
        batch: dict with ``input_ids``, ``attention_mask`` and ``labels`` (``[B, L]``).
        allow_training: accept a model in training mode (dropout on).

    Returns:
        ``Tensor[B]`` of per-record mean losses.

    Raises:
        ValueError: a record has no answer token (all its labels are ``-100``).
    """

    def compute(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        labels = _get(batch, "labels", device).long()
        input_ids = _get(batch, "input_ids", device)
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels {tuple(labels.shape)} must have the shape of input_ids "
                f"{tuple(input_ids.shape)}"
            )
        targets = labels[:, 1:]
        predict = targets != IGNORE_INDEX
        counts = predict.sum(dim=1)
        if (counts == 0).any():
            empty = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"records {empty} have no answer token (labels all -100)")
        hidden, _ = _hidden_states(decoder_and_head(model)[0], batch, device)
        rows, cols = torch.nonzero(predict, as_tuple=True)
        logits = lm_head_logits(model, hidden[rows, cols])  # positions cols predict cols + 1
        token_losses = F.cross_entropy(logits.to(dtype), targets[rows, cols], reduction="none")
        sums = torch.zeros(labels.shape[0], dtype=dtype, device=device)
        sums.index_add_(0, rows, token_losses)
        return sums / counts.to(dtype)

    return per_record_losses(model, batch, compute, allow_training=allow_training)
