"""The finetune job's public feature-cache helpers, the SmolLM2 frozen-prefix cache, and
``--validation-size`` (the split and the report).

SmolLM2 is loaded once for the module (a few seconds from its cache); every SmolLM2 check runs on
a handful of short records.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from zoprivacy import tasks
from zoprivacy.cli import main
from zoprivacy.optim.optimizer import DPAggZO
from zoprivacy.tasks import packaged

pytest.importorskip("transformers")
try:
    packaged.package_dir("minilm")
    packaged.package_dir("rotten_tomatoes")
except packaged.PackageNotInstalled as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"packaged model/data missing: {exc}", allow_module_level=True)

from zoprivacy import finetune
from zoprivacy.tasks.prefix import PrefixCache

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def rt_small():
    return finetune.load_task("rotten_tomatoes", per_class_train=3, test_size=8, seed=0)


@pytest.fixture(scope="module")
def smollm2(rt_small):
    try:
        return finetune.load_classifier(
            "smollm2", rt_small, trainable="head", max_length=24, seed=0
        )
    except finetune.SetupError as exc:
        pytest.skip(str(exc))


def _reselect(clf: finetune.Classifier, trainable: str) -> finetune.Classifier:
    """The same loaded SmolLM2 with another trainable selection (no second load)."""
    return finetune.Classifier(clf.loaded, trainable=trainable, max_length=clf.max_length)


def _all_records(dataset) -> dict[str, torch.Tensor]:
    return tasks.collate_trimmed([dataset[i] for i in range(len(dataset))])


# ---------------------------------------------------------------------------------------------
# public helpers (MiniLM)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainable", ["classifier", "head+last1"])
def test_minilm_prefix_then_suffix_is_the_full_model(rt_small, trainable):
    clf = finetune.load_classifier("minilm", rt_small, trainable=trainable, max_length=24, seed=0)
    assert clf.layers is clf.model.bert.encoder.layer
    assert isinstance(clf.prefix, PrefixCache) and clf.prefix.layers is clf.layers
    assert clf.cache_from is None and clf.cached_features is None and not clf.cache_active
    first = clf.cache_plan()
    # the first layer with a trainable tensor (len(layers): only the head is trainable)
    expected = next(
        (
            i
            for i, layer in enumerate(clf.layers)
            if any(p.requires_grad for p in layer.parameters())
        ),
        len(clf.layers),
    )
    assert first == expected == clf.prefix.first_trainable
    enc = clf.encode(rt_small.test_texts, rt_small.test_labels)
    feats = clf.prefix_features(enc, batch_size=3)  # several blocks, padded to the longest
    assert feats["hidden"].shape[0] == len(rt_small.test_texts)
    assert ("attention_mask" in feats) == (first < len(clf.layers))
    with torch.inference_mode():
        full = clf.full_logits(enc)
        fast = clf.suffix_logits(feats)
    assert full.shape == (len(rt_small.test_texts), 2)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    train = clf.encode(rt_small.train_texts, rt_small.train_labels)
    clf.build_cache(train)
    assert clf.cache_active and clf.cache_from == first
    assert clf.cached_features["hidden"].shape[0] == len(rt_small.train_texts)
    assert clf.verify_cache(enc)


def test_no_frozen_prefix_is_a_clear_error(rt_small):
    clf = finetune.load_classifier("minilm", rt_small, trainable="all", max_length=16, seed=0)
    assert clf.cache_plan() is None
    enc = clf.encode(rt_small.train_texts, rt_small.train_labels)
    with pytest.raises(RuntimeError, match="--no-cache"):
        clf.build_cache(enc)
    with pytest.raises(RuntimeError, match="no frozen prefix"):
        clf.prefix_features(enc)
    with pytest.raises(RuntimeError, match="build_cache"):
        clf.cached_dataset(enc["labels"])


# ---------------------------------------------------------------------------------------------
# SmolLM2: the cached path computes the full model's losses and steps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainable", ["head", "head+last1"])
def test_smollm2_cached_losses_equal_the_full_model(smollm2, rt_small, trainable):
    clf = smollm2 if trainable == "head" else _reselect(smollm2, trainable)
    n_layers = len(clf.layers)
    assert clf.cache_plan() == (n_layers if trainable == "head" else n_layers - 1)
    enc = clf.encode(rt_small.train_texts, rt_small.train_labels)
    full = tasks.prompt_classification_losses(clf.model, enc, label_token_ids=clf.label_word_ids)
    clf.build_cache(enc)
    assert clf.verify_cache(clf.encode(rt_small.test_texts, rt_small.test_labels))
    feats = clf.cached_features
    assert feats["hidden"].shape[-1] == clf.model.config.hidden_size
    assert feats["hidden"].dim() == (2 if trainable == "head" else 3)
    batch = _all_records(clf.cached_dataset(enc["labels"]))
    torch.testing.assert_close(clf.losses(batch), full, atol=1e-5, rtol=1e-5)
    tasks.check_per_sample(clf.losses, batch)


def test_smollm2_embeddings_trainable_means_no_cache(smollm2):
    assert _reselect(smollm2, "all").cache_plan() is None
    assert _reselect(smollm2, "last2").cache_plan() == len(smollm2.layers) - 2
    _reselect(smollm2, "head")  # restore the module fixture's selection


def test_smollm2_cached_step_matches_an_uncached_step(smollm2, rt_small):
    clf = _reselect(smollm2, "head")
    enc = tasks.trim_padding(clf.encode(rt_small.train_texts, rt_small.train_labels))
    clf.build_cache(enc)
    cached = _all_records(clf.cached_dataset(enc["labels"]))
    params = clf.trainable_parameters()
    start = [p.detach().clone() for p in params]

    def one_step(batch):
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fixed noise_seed warns that noise is reproducible
            opt = DPAggZO(
                params,
                0.5,
                num_directions=4,
                clip_norm=0.5,
                noise_multiplier=1.0,
                expected_batch_size=4.0,
                seed=11,
                noise_seed=5,
            )
            stats = opt.step(lambda: clf.losses(batch))
        return [p.detach().clone() for p in params], stats.noisy_sum.clone()

    plain_params, plain_sum = one_step({k: v for k, v in enc.items()})
    fast_params, fast_sum = one_step(cached)
    torch.testing.assert_close(fast_sum, plain_sum, atol=1e-6, rtol=1e-6)
    for a, b in zip(fast_params, plain_params, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    assert not torch.equal(plain_params[0], start[0])  # the step moved the norm
    with torch.no_grad():
        for p, s in zip(params, start, strict=True):
            p.copy_(s)


# ---------------------------------------------------------------------------------------------
# --validation-size
# ---------------------------------------------------------------------------------------------


def test_validation_split_is_disjoint_and_leaves_the_test_split_alone():
    plain = finetune.load_task("bbc_news", per_class_train=400, test_size=300, seed=0)
    task = finetune.load_task(
        "bbc_news", per_class_train=400, test_size=300, validation_size=120, seed=0
    )
    ids = task.indices
    assert len(ids["validation"]) == len(task.validation_texts) == 120
    assert len(ids["test"]) == len(task.test_texts) == 300
    assert len(ids["train"]) == len(task.train_texts)
    train, val, test = (set(ids[k]) for k in ("train", "validation", "test"))
    assert not train & val and not train & test and not val & test
    assert test == set(plain.indices["test"]) and task.test_texts == plain.test_texts
    # every class keeps at most 400 training records; the validation is stratified
    assert max(task.train_labels.count(c) for c in range(task.num_labels)) <= 400
    assert set(task.validation_labels) == set(range(task.num_labels))
    data = packaged.load_bbc_news()
    assert [data.texts[i] for i in ids["validation"]] == task.validation_texts
    without = finetune.load_task("bbc_news", per_class_train=400, test_size=300, seed=0)
    assert without.validation_texts == [] and without.indices["validation"] == []


def test_validation_size_that_leaves_no_training_record_is_a_setup_error():
    with pytest.raises(finetune.SetupError, match="--validation-size"):
        finetune.load_task(
            "bbc_news", per_class_train=4, test_size=500, validation_size=5000, seed=0
        )


def test_finetune_reports_validation_accuracy(tmp_path):
    out = tmp_path / "run"
    argv = ["finetune", "--task", "rotten_tomatoes", "--train-per-class", "6", "--test-size"]
    argv += ["8", "--validation-size", "6", "--max-length", "16", "--steps", "2"]
    argv += ["--batch-size", "4", "--directions", "2", "--no-progress", "--no-pld"]
    assert main([*argv, "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["validation_records"] == 6
    assert 0.0 <= report["validation_accuracy"] <= 1.0
    assert report["config"]["validation_size"] == 6
    assert json.loads((out / "config.json").read_text())["validation_size"] == 6
    assert "validation records" in (out / "README.md").read_text()


def test_negative_validation_size_is_one_line_exit_2(tmp_path, capsys):
    code = main(["finetune", "--validation-size", "-1", "--output", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--validation-size" in err[0]


def _finetune(out, *options: str) -> dict:
    """Run a tiny ``zoprivacy finetune`` on Rotten Tomatoes (3 steps, K = 2) into ``out``."""
    argv = ["finetune", "--task", "rotten_tomatoes", "--steps", "3", "--batch-size", "4"]
    argv += ["--directions", "2", "--no-progress", "--no-pld", "--output", str(out), *options]
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text())


def test_finetune_smollm2_head_trains_on_the_cache(tmp_path, smollm2):
    report = _finetune(
        tmp_path / "smol", "--model", "smollm2", "--train-per-class", "3", "--test-size", "4",
        "--max-length", "24",
    )  # fmt: skip
    assert report["frozen_prefix_cache"] is True
    assert report["trainable"] == "head" and report["trainable_parameters"] == 576
    assert report["steps"] == 3 and report["epsilon_spent"] <= 2.0 + 1e-9


# ---------------------------------------------------------------------------------------------
# evaluation through the cache (the job evaluates the test split from one prefix pass)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainable", ["classifier", "head+last1"])
def test_accuracy_from_prefix_features_is_the_full_models(rt_small, trainable):
    clf = finetune.load_classifier("minilm", rt_small, trainable=trainable, max_length=24, seed=0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # move the trainable tensors away from the start (a trained model)
        for p in clf.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen), alpha=0.5)
    enc = clf.encode(rt_small.test_texts, rt_small.test_labels)
    feats = clf.prefix_features(enc, batch_size=3)
    with torch.inference_mode():
        full = clf.full_logits(enc).argmax(-1)
    expected = float((full == enc["labels"]).float().mean())
    assert clf.accuracy(enc) == expected
    assert clf.accuracy(enc, features=feats, batch_size=3) == expected
    with pytest.raises(ValueError, match="prefix_features"):
        clf.accuracy(enc, features={k: v[:-1] for k, v in feats.items()})


def test_finetune_test_accuracy_through_the_cache_is_the_full_models(tmp_path, rt_small):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    report = _finetune(
        out, "--train-per-class", "6", "--test-size", "8", "--max-length", "24", "--lr", "30"
    )
    assert report["frozen_prefix_cache"] is True
    task = finetune.load_task("rotten_tomatoes", per_class_train=6, test_size=8, seed=0)
    clf = finetune.load_classifier("minilm", task, trainable="classifier", max_length=24, seed=0)
    enc = clf.encode(task.test_texts, task.test_labels)
    assert report["test_accuracy_before"] == clf.accuracy(enc)
    weights = load_file(out / "trainable_weights.safetensors")
    assert set(weights) == set(clf.trainable_state())
    assert not any(torch.equal(weights[k], v) for k, v in clf.trainable_state().items())
    assert clf.model.load_state_dict(weights, strict=False).unexpected_keys == []
    assert report["test_accuracy_after"] == clf.accuracy(enc)
