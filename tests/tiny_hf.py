"""Tiny random Hugging Face models of several families, saved with a word-level tokenizer.

Shared by the tests of the user-model loader, the Hugging Face export and the finetune job on
the user's own model folders (the ``folders`` fixture in ``tests/conftest.py`` builds them once).
"""

from __future__ import annotations

import transformers

WORDS = (
    "[PAD] [UNK] [EOS] Text Label : good bad film fine dull loved it a the plot acting "
    "positive negative neutral sports politics very not"
).split()
TEXTS = ["good film", "bad plot", "loved it", "dull acting very dull", "a fine film", "not good"]
LABELS = [0, 1, 0, 1, 0, 1]
NAMES = ("positive", "negative")
TINY = {"vocab_size": len(WORDS), "max_position_embeddings": 64}


def _tokenizer(*, pad: bool, side: str = "right"):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"unk_token": "[UNK]", "eos_token": "[EOS]"}
    if pad:
        special["pad_token"] = "[PAD]"
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, padding_side=side, **special
    )


def _families():
    """family -> (model built from a tiny config, tokenizer with a pad token?, padding side)."""
    t = transformers
    enc = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
    enc |= {"intermediate_size": 32, "pad_token_id": 0, **TINY}
    dec = {"bos_token_id": 2, "eos_token_id": 2}
    return {
        "bert": (lambda: t.BertModel(t.BertConfig(**enc), add_pooling_layer=False), True, "right"),
        "roberta": (
            lambda: t.RobertaForSequenceClassification(t.RobertaConfig(num_labels=2, **enc)),
            True,
            "right",
        ),
        "gpt2": (
            lambda: t.GPT2LMHeadModel(
                t.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, **dec, **TINY)
            ),
            False,
            "right",
        ),
        "opt": (
            lambda: t.OPTForCausalLM(
                t.OPTConfig(
                    hidden_size=16,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    ffn_dim=32,
                    word_embed_proj_dim=16,
                    pad_token_id=0,
                    **dec,
                    **TINY,
                )
            ),
            True,
            "left",
        ),
        "llama": (
            lambda: t.LlamaForCausalLM(
                t.LlamaConfig(
                    hidden_size=16,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    intermediate_size=32,
                    **dec,
                    **TINY,
                )
            ),
            False,
            "left",
        ),
    }
