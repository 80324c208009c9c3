"""Hugging Face outputs (zoprivacy.finetune.export): what from_pretrained reloads is the model
that was trained, for full, partial and LoRA fine-tuning; the model card's front matter parses."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_user_model import _load, _losses_fn
from tests.tiny_hf import LABELS, NAMES, TEXTS
from zoprivacy import tasks
from zoprivacy.finetune.export import TASK_FILE, model_card, save_hf_model
from zoprivacy.finetune.user_model import select_trainable
from zoprivacy.optim.optimizer import DPAggZO

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
yaml = pytest.importorskip("yaml")
pytestmark = [
    pytest.mark.filterwarnings("ignore::zoprivacy.noise.source.PredictableNoiseWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def _trained(folders, family, spec):
    """The loaded model after two DP-AggZO steps on ``spec`` (every trainable tensor moved)."""
    loaded = _load(folders, family)
    selection = select_trainable(loaded, spec, seed=5)
    _, closure = _losses_fn(loaded)
    opt = DPAggZO(
        selection.parameters(),
        0.5,
        num_directions=2,
        clip_norm=1.0,
        noise_multiplier=0.5,
        expected_batch_size=len(TEXTS),
        seed=1,
        noise_seed=2,
    )
    for _ in range(2):
        opt.step(closure)
    return loaded, selection


@torch.no_grad()
def _class_logits(model, tokenizer, loaded):
    """Class logits of TEXTS: the classifier's, or the label words' after the prompt."""
    if loaded.kind == "classifier":
        batch = tasks.encode_classification(tokenizer, TEXTS, LABELS, 16)
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    batch, ids = tasks.encode_prompts(
        tokenizer, TEXTS, LABELS, loaded.template, loaded.label_words, max_length=16
    )
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows = torch.arange(len(TEXTS))
    return logits[rows, tasks.answer_positions(batch["attention_mask"])][:, ids]


def _card(kind="classifier", adapter=False, **kw):
    args = {"base_model": "minilm", "kind": kind, "method": "dpaggzo", "trainable": "head"}
    args |= {"epsilon": 2.0, "delta": 1e-5, "steps": 100, "sample_rate": 0.01}
    args |= {"noise_multiplier": 1.25, "clip_norm": 1.0, "adapter": adapter}
    return model_card(**(args | kw))


@pytest.mark.parametrize(("family", "spec"), [("bert", "head+last1"), ("llama", "head+bias")])
def test_full_or_partial_fine_tuning_reloads_with_from_pretrained(
    folders,
    tmp_path,
    family,
    spec,
):
    loaded, selection = _trained(folders, family, spec)
    task = {"kind": loaded.kind, "prompt": loaded.prompt, "label_words": loaded.label_words}
    out = save_hf_model(
        selection.model, loaded.tokenizer, tmp_path / "model", card=_card(), task=task
    )
    auto = (
        transformers.AutoModelForSequenceClassification
        if loaded.kind == "classifier"
        else transformers.AutoModelForCausalLM
    )
    again = auto.from_pretrained(out, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.pad_token == loaded.tokenizer.pad_token
    assert tok.padding_side == loaded.tokenizer.padding_side
    expected = _class_logits(selection.model, loaded.tokenizer, loaded)
    assert torch.equal(_class_logits(again, tok, loaded), expected)
    assert again.config.id2label == {0: "positive", 1: "negative"} or loaded.kind == "causal"
    saved = json.loads((out / TASK_FILE).read_text())
    assert saved["prompt"] == loaded.prompt
    assert tuple(saved["label_words"] or ()) == (loaded.label_words or ())


@pytest.mark.parametrize(
    ("family", "spec"), [("bert", "lora:r=2,targets=query+value"), ("opt", "lora:r=2")]
)
def test_lora_writes_an_adapter_that_peft_reloads_on_the_base(
    folders,
    tmp_path,
    family,
    spec,
):
    loaded, selection = _trained(folders, family, spec)
    out = save_hf_model(
        selection.model, loaded.tokenizer, tmp_path / "adapter", card=_card(adapter=True)
    )
    assert (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()  # the base is public, not re-published
    # a base with a differently seeded fresh head: the saved head and pooler must replace it
    base = _load(folders, family, seed=123).model
    again = peft.PeftModel.from_pretrained(base, out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    expected = _class_logits(selection.model, loaded.tokenizer, loaded)
    torch.testing.assert_close(_class_logits(again, tok, loaded), expected, rtol=0, atol=1e-6)


def test_an_existing_folder_is_not_overwritten_by_default(folders, tmp_path):
    loaded = _load(folders, "bert")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf_model(loaded.model, loaded.tokenizer, tmp_path / "model", card=_card())
    assert (tmp_path / "model" / "keep.txt").read_text() == "x"
    save_hf_model(loaded.model, loaded.tokenizer, tmp_path / "model", card=_card(), overwrite=True)
    assert not (tmp_path / "model" / "keep.txt").exists()
    assert (tmp_path / "model" / "config.json").is_file()


def _front_matter(card):
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_model_card_front_matter_and_guarantee():
    meta, body = _front_matter(_card(label_names=NAMES, metrics={"test accuracy": 0.75}))
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["pipeline_tag"] == "text-classification"
    assert "differential-privacy" in meta["tags"]
    assert "ε = 2," in body and "δ = 1e-05" in body
    assert "add/remove-one" in body and "RDP" in body
    assert "Not covered" in body and "public test data" in body
    from huggingface_hub import ModelCard

    hub = ModelCard(_card())  # the Hub's own parser reads the same metadata
    assert hub.data.library_name == "transformers"
    assert "differential-privacy" in hub.data.tags


def test_model_card_variants():
    meta, body = _front_matter(_card(kind="causal", adapter=True, base_model="/models/opt"))
    assert meta["library_name"] == "peft" and meta["base_model"] == "/models/opt"
    assert meta["pipeline_tag"] == "text-generation"
    assert "PeftModel.from_pretrained" in body
    meta, body = _front_matter(_card(epsilon=None, delta=None, method="mezo"))
    assert "differential-privacy" not in meta["tags"] and "**None.**" in body
    _, body = _front_matter(_card(held_out_private=True, metrics={"accuracy": 0.5}))
    assert "held-out split of the private data (not covered)" in body
    assert "the held-out accuracy below" in body
