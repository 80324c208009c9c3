"""Shared-prefix caching on the packaged models: same losses, per-record, same optimizer steps."""

from __future__ import annotations

import functools

import pytest
import torch

from zoprivacy import tasks
from zoprivacy.optim.optimizer import DPAggZO
from zoprivacy.tasks.packaged import PackageNotInstalled, load_minilm_classifier, load_smollm2
from zoprivacy.tasks.prefix import LabelWordHead, PrefixCache, find_embeddings, find_layers

pytestmark = pytest.mark.filterwarnings("ignore::zoprivacy.noise.source.PredictableNoiseWarning")

TEXTS = ["a gripping, beautiful film", "dull and far too long", "fine.", "I loved every minute"]
LABELS = [1, 0, 1, 1]


def _train_only(model, modules):
    for p in model.parameters():
        p.requires_grad_(False)
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)


@pytest.fixture(scope="module")
def minilm():
    try:
        model, tok = load_minilm_classifier(2, seed=0)
    except PackageNotInstalled as exc:
        pytest.skip(str(exc))
    return model, tok


@pytest.fixture(scope="module")
def smollm2():
    try:
        model, tok = load_smollm2()
    except PackageNotInstalled as exc:
        pytest.skip(str(exc))
    return model, tok


def _step(model, losses, batch, seed=3, extra=()):
    """One DP-AggZO step (K = 2) on the model's trainable tensors and ``extra`` ones."""
    params = [*[p for p in model.parameters() if p.requires_grad], *extra]
    opt = DPAggZO(
        params,
        1e-3,
        num_directions=2,
        clip_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=4,
        seed=seed,
        noise_seed=1,
    )
    return opt.step(lambda: losses(batch))


def test_minilm_prefix_cache_is_exact_and_per_record(minilm):
    model, tok = minilm
    layers_name, layers = find_layers(model)
    assert layers_name == "bert.encoder.layer" and len(layers) == 6
    assert find_embeddings(model, layers_name)[0] == "bert.embeddings"
    _train_only(model, [model.classifier, model.bert.pooler, *layers[-2:]])
    batch = tasks.encode_classification(tok, TEXTS, LABELS, 32)
    plain = functools.partial(tasks.sequence_classification_losses, model)
    cache = PrefixCache(model)
    assert cache.enabled and cache.first_trainable == 4
    cached = cache.wrap(plain)
    assert torch.equal(cached(batch), plain(batch))
    assert torch.equal(cached(batch), plain(batch))
    assert (cache.misses, cache.hits) == (1, 1)
    tasks.check_per_sample(cached, batch, atol=1e-6, rtol=1e-6)

    before = [p.detach().clone() for p in model.parameters()]
    a = _step(model, cached, batch)
    after_cached = [p.detach().clone() for p in model.parameters()]
    for p, p0 in zip(model.parameters(), before, strict=True):
        p.data.copy_(p0)
    b = _step(model, plain, batch)
    assert torch.equal(a.noisy_sum, b.noisy_sum)  # 1 full + 3 suffix forwards = 4 full ones
    for p, p1 in zip(model.parameters(), after_cached, strict=True):
        assert torch.equal(p, p1)
    for p, p0 in zip(model.parameters(), before, strict=True):
        p.data.copy_(p0)


def test_cache_is_keyed_on_the_batch(minilm):
    model, tok = minilm
    _train_only(model, [model.classifier, model.bert.encoder.layer[-1]])
    cache = PrefixCache(model)
    plain = functools.partial(tasks.sequence_classification_losses, model)
    cached = cache.wrap(plain)
    batch = tasks.encode_classification(tok, TEXTS, LABELS, 32)
    other = tasks.encode_classification(tok, TEXTS[::-1], LABELS[::-1], 32)
    cached(batch)
    assert torch.equal(cached(other), plain(other)) and cache.misses == 2
    other["input_ids"][0, 1] = 1000  # modified in place: the version counter changes
    assert torch.equal(cached(other), plain(other)) and cache.misses == 3
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            cached(batch)
    finally:
        model.eval()
    _train_only(model, [model.bert.embeddings, model.classifier])
    cache.refresh()
    assert not cache.enabled and torch.equal(cached(batch), plain(batch))


def test_smollm2_label_word_head_with_cached_prefix(smollm2):
    model, tok = smollm2
    ids = tasks.label_token_ids(tok, [" negative", " positive"])
    batch, _ = tasks.encode_prompts(tok, TEXTS, LABELS)
    head = LabelWordHead(model, ids)
    layers = model.model.layers
    _train_only(model, [*layers[-2:], model.model.norm])
    reference = tasks.prompt_classification_losses(model, batch, ids)
    plain = functools.partial(head.losses, model)
    assert torch.allclose(plain(batch), reference, rtol=1e-6, atol=1e-6)
    cache = PrefixCache(model)
    assert cache.first_trainable == len(layers) - 2
    cached = cache.wrap(plain)
    assert torch.equal(cached(batch), plain(batch)) and cache.hits == 0
    tasks.check_per_sample(cached, batch, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in model.model.embed_tokens.parameters())
    # the tied LM head keeps the embeddings trainable: nothing can be cached then
    model.lm_head.weight.requires_grad_(True)
    assert PrefixCache(model).first_trainable == 0
    model.lm_head.weight.requires_grad_(False)

    before = [p.detach().clone() for p in [*model.parameters(), head.weight]]
    stats = _step(model, cached, batch, seed=5, extra=[head.weight])
    assert stats.perturbation_path == "hooks" and cache.hits == 4  # 3 in the step, 1 above
    assert not torch.equal(head.weight, before[-1])
    assert torch.equal(model.model.embed_tokens.weight, before[0])
    for p, p0 in zip([*model.parameters(), head.weight], before, strict=True):
        p.data.copy_(p0)


def test_precomputed_features_then_run_from_is_the_full_model(minilm):
    """features() once over the records, then run_from() per batch: the full model's losses and
    gradients, for any block size, and a clear error when nothing is frozen."""
    model, tok = minilm
    layers = model.bert.encoder.layer
    _train_only(model, [model.classifier, model.bert.pooler, layers[-1]])
    records = tasks.encode_classification(tok, TEXTS, LABELS, 32)
    plain = functools.partial(tasks.sequence_classification_losses, model)
    cache = PrefixCache(model)
    feats = cache.features(plain, records, batch_size=3)  # two blocks of different lengths
    assert set(feats) == {"hidden", "input_ids", "token_type_ids", "attention_mask"}
    assert feats["hidden"].shape[:2] == feats["attention_mask"].shape and cache.misses == 0
    whole = cache.features(plain, records, batch_size=4)
    real = whole["attention_mask"].bool()  # padding positions hold no record's state
    length = real.shape[1]
    torch.testing.assert_close(feats["hidden"][:, :length][real], whole["hidden"][real])
    assert torch.equal(feats["attention_mask"][:, :length], whole["attention_mask"])
    rows = [3, 0, 2]
    batch = tasks.select_records({**feats, "labels": records["labels"]}, rows)
    batch = tasks.trim_padding(batch)
    inputs = {k: v for k, v in batch.items() if k != "hidden"}
    fast = cache.run_from(batch["hidden"], plain, inputs)
    torch.testing.assert_close(fast, plain(tasks.select_records(records, rows)), atol=1e-6, rtol=0)

    def grads(fn):
        model.zero_grad()
        fn().sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    def logits_loss(b):
        return torch.nn.functional.cross_entropy(
            model(**{k: v for k, v in b.items() if k != "labels"}).logits,
            b["labels"],
            reduction="none",
        )

    full = tasks.trim_padding(tasks.select_records(records, rows))
    for a, b in zip(
        grads(lambda: cache.run_from(batch["hidden"], logits_loss, inputs)),
        grads(lambda: logits_loss(full)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    model.zero_grad()
    _train_only(model, [layers[0], model.classifier])
    cache.refresh()
    with pytest.raises(RuntimeError, match="no frozen prefix"):
        cache.features(plain, records)
    with pytest.raises(RuntimeError, match="no frozen prefix"):
        cache.run_from(feats["hidden"], plain, records)
