"""Per-sample loss functions, encoders and the per-sample check for Hugging Face models.

A DP-AggZO closure must return one loss per record (``Tensor[|B|]``). Typical use::

    from functools import partial
    from zoprivacy import tasks

    batch, label_ids = tasks.encode_prompts(tokenizer, texts, labels)
    losses = partial(tasks.prompt_classification_losses, model, label_token_ids=label_ids)
    tasks.check_per_sample(losses, batch)          # once, before training
    stats = opt.step(lambda: losses(batch))
"""

from zoprivacy.tasks.check import (
    PerSampleViolation,
    batch_size_of,
    check_per_sample,
    select_records,
)
from zoprivacy.tasks.encoding import (
    TensorDictDataset,
    collate_trimmed,
    encode_causal_lm,
    encode_classification,
    encode_prompts,
    label_token_ids,
    trim_padding,
)
from zoprivacy.tasks.losses import (
    answer_hidden_states,
    answer_positions,
    causal_lm_target_losses,
    class_labels,
    decoder_and_head,
    lm_head_logits,
    per_record_losses,
    prompt_classification_losses,
    sequence_classification_losses,
)

__all__ = [
    "PerSampleViolation",
    "TensorDictDataset",
    "answer_hidden_states",
    "answer_positions",
    "batch_size_of",
    "causal_lm_target_losses",
    "check_per_sample",
    "class_labels",
    "collate_trimmed",
    "decoder_and_head",
    "encode_causal_lm",
    "encode_classification",
    "encode_prompts",
    "label_token_ids",
    "lm_head_logits",
    "per_record_losses",
    "prompt_classification_losses",
    "select_records",
    "sequence_classification_losses",
    "trim_padding",
]
