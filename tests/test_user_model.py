"""Any Hugging Face folder as a model of the job (zoprivacy.finetune.user_model), offline.

Tiny random models of five families (BERT, RoBERTa, GPT-2, OPT, Llama; hidden 16, 2 layers) are
saved with a tiny word-level tokenizer into temporary folders, as ``save_pretrained`` writes them.
"""

from __future__ import annotations

import pytest
import torch

from tests.tiny_hf import LABELS, NAMES, TEXTS, TINY, WORDS, _families, _tokenizer  # noqa: F401
from zoprivacy import tasks
from zoprivacy.finetune._setup import SetupError
from zoprivacy.finetune.user_model import (
    LoraOptions,
    detect_kind,
    load_model,
    lora_default_targets,
    parse_trainable_spec,
    select_trainable,
)
from zoprivacy.optim.optimizer import DPAggZO

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = [
    pytest.mark.filterwarnings("ignore::zoprivacy.noise.source.PredictableNoiseWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

KIND = {"bert": "classifier", "roberta": "classifier", "gpt2": "causal", "opt": "causal"}
KIND["llama"] = "causal"


def _load(folders, family, **kw):
    kw.setdefault("label_names", NAMES)
    return load_model(str(folders[family]), seed=kw.pop("seed", 0), **kw)


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize("family", sorted(KIND))
def test_kind_is_detected_from_the_config(folders, family):
    config = transformers.AutoConfig.from_pretrained(folders[family], local_files_only=True)
    assert detect_kind(config) == KIND[family]
    loaded = _load(folders, family)
    assert loaded.kind == KIND[family]
    assert loaded.model_type == family
    assert not loaded.model.training
    expected = (
        transformers.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
        if KIND[family] == "classifier"
        else transformers.MODEL_FOR_CAUSAL_LM_MAPPING
    )
    assert type(loaded.model) is expected[type(loaded.model.config)]


def test_kind_override_makes_a_causal_lm_a_classifier_with_a_fresh_head(folders):
    loaded = _load(folders, "gpt2", kind="classifier")
    assert isinstance(loaded.model, transformers.GPT2ForSequenceClassification)
    assert loaded.fresh_modules == ("score",)
    # the pad token (eos, set here) is what GPT-2 uses to find each record's last token
    assert loaded.model.config.pad_token_id == loaded.tokenizer.pad_token_id == 2


def test_fresh_head_is_seeded_by_the_public_seed_only(folders):
    before = torch.random.get_rng_state()
    a = _load(folders, "bert", seed=3)
    b = _load(folders, "bert", seed=3)
    c = _load(folders, "bert", seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    assert a.fresh_modules == ("bert.pooler.dense", "classifier")
    head = "classifier.weight"
    sa, sb, sc = (dict(m.model.named_parameters()) for m in (a, b, c))
    assert sa[head].shape == (2, 16)
    assert torch.equal(sa[head], sb[head]) and not torch.equal(sa[head], sc[head])
    assert torch.equal(sa["bert.encoder.layer.0.attention.self.query.weight"],
                       sc["bert.encoder.layer.0.attention.self.query.weight"])  # fmt: skip
    assert a.model.config.id2label == {0: "positive", 1: "negative"}


def test_a_saved_head_is_kept_and_a_wrong_label_count_refused(folders):
    saved = transformers.RobertaForSequenceClassification.from_pretrained(folders["roberta"])
    loaded = _load(folders, "roberta", seed=9)
    assert loaded.fresh_modules == ()
    for name, p in saved.named_parameters():
        assert torch.equal(p, dict(loaded.model.named_parameters())[name]), name
    with pytest.raises(SetupError, match="head of 2 labels"):
        _load(folders, "roberta", label_names=("a", "b", "c"))


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_causal_lm_pad_token_padding_side_and_label_words(folders, family):
    loaded = _load(folders, family)
    tok = loaded.tokenizer
    assert tok.pad_token is not None
    if family != "opt":  # saved without a pad token: eos
        assert tok.pad_token == tok.eos_token
    assert tok.padding_side == _families()[family][2]  # as the tokenizer was saved
    assert loaded.label_words == (" positive", " negative")
    assert loaded.label_word_ids == [WORDS.index("positive"), WORDS.index("negative")]
    batch, ids = tasks.encode_prompts(
        tok, TEXTS, LABELS, loaded.template, loaded.label_words, max_length=16
    )
    assert ids == loaded.label_word_ids
    assert tasks.prompt_classification_losses(loaded.model, batch, ids).shape == (len(TEXTS),)


def test_prompt_braces_and_placeholder(folders):
    loaded = _load(folders, "gpt2", prompt="{json} Text: {text} Label:")
    assert loaded.template.format(s="good") == "{json} Text: good Label:"
    with pytest.raises(SetupError, match="placeholder"):
        _load(folders, "gpt2", prompt="Text: {s}")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"label_names": ("very good", "bad")}, "--label-words"),
        ({"label_words": [" good film", " bad"]}, "--label-words.*2 tokens"),
        ({"label_words": [" good"]}, "one word per label"),
        ({"label_names": ("a", "a")}, "distinct"),
    ],
)
def test_bad_label_words_are_refused_clearly(folders, kw, match):
    with pytest.raises(SetupError, match=match):
        _load(folders, "gpt2", **kw)


def test_generation_target_needs_no_label_words(folders):
    loaded = _load(folders, "llama", label_names=None)
    assert loaded.label_names is None and loaded.label_words is None


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"kind": "encoder"}, "--model-kind"),
        ({"device": "tpu"}, "--device"),
        ({"dtype": "float64"}, "--dtype"),
    ],
)
def test_bad_options_name_the_flag(folders, kw, match):
    with pytest.raises(SetupError, match=match):
        _load(folders, "bert", **kw)


def test_a_missing_folder_is_refused_without_download(tmp_path):
    with pytest.raises(SetupError, match="nothing is downloaded"):
        load_model(str(tmp_path / "nope"), label_names=NAMES)
    with pytest.raises(SetupError, match="nothing is downloaded"):
        load_model("some-org/some-model", label_names=NAMES)


# ------------------------------------------------------------------ trainable selection


def test_parse_trainable_spec():
    assert parse_trainable_spec("head+last2") == ({"head"}, 2, None)
    assert parse_trainable_spec("bias,classifier") == ({"bias", "classifier"}, 0, None)
    assert parse_trainable_spec("lora") == (set(), 0, LoraOptions())
    parts, last, lora = parse_trainable_spec("head+lora:r=4,alpha=8,targets=q_proj+v_proj")
    assert (parts, last) == ({"head"}, 0)
    assert lora == LoraOptions(r=4, alpha=8.0, targets=("q_proj", "v_proj"))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("head+top", "unknown part 'top'"),
        ("last0", "N >= 1"),
        ("lora:r=0", "bad LoRA option 'r=0'"),
        ("lora:rank=4", "bad LoRA option"),
        ("lora:r=8+head", "lora last"),
        ("", "names nothing"),
    ],
)
def test_bad_trainable_specs_name_the_flag(spec, match):
    with pytest.raises(SetupError, match=rf"--trainable.*{match}"):
        parse_trainable_spec(spec)


def _plain_names(selection):
    return {n.removeprefix("base_model.model.") for n in selection.names}


def _is_bias(name):
    return name.rsplit(".", 1)[-1] == "bias"


@pytest.mark.parametrize(
    ("family", "spec", "expected"),
    [
        ("bert", "classifier", lambda n: n.startswith("classifier.")),
        ("bert", "head", lambda n: n.startswith(("classifier.", "bert.pooler."))),
        ("bert", "last1", lambda n: n.startswith("bert.encoder.layer.1.")),
        (
            "roberta",
            "head+last1",
            lambda n: n.startswith(("classifier.", "roberta.encoder.layer.1.")),
        ),
        ("gpt2", "head", lambda n: n.startswith("transformer.ln_f.")),
        ("opt", "head", lambda n: n.startswith("model.decoder.final_layer_norm.")),
        ("llama", "head+last1", lambda n: n.startswith(("model.norm.", "model.layers.1."))),
        ("bert", "bias", _is_bias),
        ("opt", "bias", _is_bias),
        ("gpt2", "all", lambda n: True),
    ],
)
def test_select_trainable_marks_exactly_the_named_parts(folders, family, spec, expected):
    loaded = _load(folders, family)
    selection = select_trainable(loaded, spec)
    every = dict(loaded.model.named_parameters())
    wanted = {n for n in every if expected(n)}
    assert wanted and set(selection.names) == wanted
    assert all(p.requires_grad == (n in wanted) for n, p in every.items())
    assert selection.num_trainable() == sum(every[n].numel() for n in wanted)


@pytest.mark.parametrize(
    ("family", "targets"),
    [("bert", ("query", "value")), ("gpt2", ("c_attn",)), ("opt", ("q_proj", "v_proj"))],
)
def test_lora_trains_only_the_adapters_on_default_targets(folders, family, targets):
    loaded = _load(folders, family)
    assert lora_default_targets(loaded.model) == targets
    selection = select_trainable(loaded, "lora:r=2,alpha=4", seed=1)
    assert isinstance(selection.model, peft.PeftModel) and loaded.model is selection.model
    assert selection.names and all(".lora_" in n for n in selection.names)
    # A and B on every target of both layers
    assert len(selection.names) == 2 * len(targets) * 2
    assert selection.model.peft_config["default"].r == 2


def test_lora_with_head_saves_and_trains_the_classifier_copy(folders):
    loaded = _load(folders, "bert")
    selection = select_trainable(loaded, "classifier+lora:targets=query")
    heads = {n for n in selection.names if ".lora_" not in n}
    assert heads == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
    frozen_save = selection.model.peft_config["default"].modules_to_save
    assert {"classifier", "bert.pooler.dense"} <= set(frozen_save)  # fresh modules kept


@pytest.mark.parametrize(
    ("family", "spec", "match"),
    [
        ("llama", "bias", "selects no parameter"),
        ("gpt2", "classifier", "classifier applies to a classifier"),
        ("bert", "last3", "only 2 layers"),
        ("opt", "lora:targets=query", r"not linear modules.*q_proj"),
    ],
)
def test_selection_errors_name_the_flag(folders, family, spec, match):
    with pytest.raises(SetupError, match=rf"--trainable.*{match}|{match}"):
        select_trainable(_load(folders, family), spec)


def _losses_fn(loaded):
    if loaded.kind == "classifier":
        batch = tasks.encode_classification(loaded.tokenizer, TEXTS, LABELS, 16)
        return batch, lambda: tasks.sequence_classification_losses(loaded.model, batch)
    batch, ids = tasks.encode_prompts(
        loaded.tokenizer, TEXTS, LABELS, loaded.template, loaded.label_words, max_length=16
    )
    return batch, lambda: tasks.prompt_classification_losses(loaded.model, batch, ids)


@pytest.mark.parametrize(
    ("family", "spec"),
    [("bert", "head+last1"), ("roberta", "bias"), ("gpt2", "lora:r=2"), ("llama", "head")],
)
def test_one_dpaggzo_step_moves_only_the_trainable_tensors(folders, family, spec):
    loaded = _load(folders, family)
    selection = select_trainable(loaded, spec)
    model = selection.model
    _, closure = _losses_fn(loaded)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = DPAggZO(
        selection.parameters(),
        0.05,
        num_directions=2,
        clip_norm=1.0,
        noise_multiplier=0.5,
        expected_batch_size=len(TEXTS),
        seed=1,
        noise_seed=2,
    )
    opt.step(closure)
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (name in selection.names), name


# ------------------------------------------------------------------ packaged presets


def _packaged(name, **kw):
    from zoprivacy.tasks.packaged import PackageNotInstalled, package_dir

    try:
        package_dir(name)
    except PackageNotInstalled as exc:
        pytest.skip(str(exc))
    return load_model(name, **kw)


def test_minilm_preset_is_the_packaged_classifier():
    from zoprivacy.tasks.packaged import load_minilm_classifier

    loaded = _packaged("minilm", label_names=NAMES, seed=7)
    reference, _ = load_minilm_classifier(2, seed=7)
    assert loaded.kind == "classifier" and loaded.fresh_modules == ("classifier",)
    ours = dict(loaded.model.named_parameters())
    for name, p in reference.named_parameters():
        assert torch.equal(p, ours[name]), name
    assert loaded.model.config.id2label == {0: "positive", 1: "negative"}
    with pytest.raises(SetupError, match="minilm is a classifier"):
        load_model("minilm", kind="causal", label_names=NAMES)


@pytest.fixture(scope="module")
def minilm():
    return _packaged("minilm", label_names=NAMES)


@pytest.fixture(scope="module")
def smollm2():
    return _packaged("smollm2", label_names=("negative", "positive"))


def _historical_selection(model, kind: str, spec: str) -> list[str]:
    """The job's selection before issue 15 (its Classifier._select, kept as the reference):
    MiniLM classifier / head (+ pooler) / lastN / all; SmolLM2 head = final norm."""
    parts = set(spec.split("+"))
    last = max([int(p[4:]) for p in parts if p.startswith("last")] or [0])
    chosen = [model] if "all" in parts else []
    if kind == "minilm":
        if "classifier" in parts:
            chosen.append(model.classifier)
        if "head" in parts:
            chosen += [model.bert.pooler, model.classifier]
        layers = model.bert.encoder.layer
    else:
        if "head" in parts:
            chosen.append(model.model.norm)
        layers = model.model.layers
    chosen += list(layers[len(layers) - last :]) if last else []
    wanted = {id(p) for module in chosen for p in module.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in wanted]


@pytest.mark.parametrize("spec", ["classifier", "head", "last2", "head+last1", "all"])
def test_minilm_selection_matches_the_jobs_historical_selection(minilm, spec):
    loaded = minilm
    reference = _historical_selection(loaded.model, "minilm", spec)
    assert select_trainable(loaded, spec).names == reference


@pytest.mark.parametrize("spec", ["head", "head+last1"])
def test_smollm2_preset_is_a_causal_lm_with_the_jobs_historical_selection(smollm2, spec):
    loaded = smollm2
    assert loaded.kind == "causal" and loaded.model_type == "llama"
    assert len(loaded.label_word_ids) == 2
    reference = _historical_selection(loaded.model, "smollm2", spec)
    assert select_trainable(loaded, spec).names == reference


# ------------------------------------------------------------------ device, dtype, per record


@pytest.mark.parametrize("family", ["bert", "gpt2", "opt", "llama"])
def test_losses_are_per_record_with_the_tokenizers_padding(folders, family):
    """Left (OPT, Llama) or right padding: each record's loss depends on that record only."""
    loaded = _load(folders, family)
    batch, _ = _losses_fn(loaded)
    if loaded.kind == "classifier":
        fn = lambda b: tasks.sequence_classification_losses(loaded.model, b)  # noqa: E731
    else:
        ids = loaded.label_word_ids
        fn = lambda b: tasks.prompt_classification_losses(loaded.model, b, ids)  # noqa: E731
    tasks.check_per_sample(fn, batch)


def test_dtype_and_device_follow_the_options(folders):
    loaded = _load(folders, "llama", dtype="bfloat16", device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.model.parameters()} == {expected}
    selection = select_trainable(loaded, "lora:r=2")
    assert {p.device.type for p in selection.parameters()} == {expected}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_refused(folders):
    with pytest.raises(SetupError, match="--device 'cuda:1': CUDA is not available"):
        _load(folders, "bert", device="cuda:1")
