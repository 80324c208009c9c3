"""``zoprivacy finetune`` on your own model and data (issue 15), end to end and offline.

Tiny random models of several families (BERT, RoBERTa, GPT-2, OPT, Llama; the fixtures of
tests/test_user_model.py) are saved with ``save_pretrained`` and a tokenizer into temporary
folders and fine-tuned through ``zoprivacy finetune`` (``main(argv)``) from CSV, JSON Lines and
Parquet files written here. Each saved ``OUTPUT/model`` loads back with ``from_pretrained`` /
``PeftModel.from_pretrained`` and gives the trained in-memory model's predictions.
"""

from __future__ import annotations

import json
import re
import signal

import pytest
import torch

from tests.tiny_hf import _families, _tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pd = pytest.importorskip("pandas")

from zoprivacy.cli import main  # noqa: E402
from zoprivacy.finetune import _job, _train, _user  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::zoprivacy.noise.source.PredictableNoiseWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

GOOD = ["good film", "loved it", "a fine film", "very good acting", "loved the plot"]
BAD = ["bad plot", "dull acting", "not good", "very dull film", "bad acting"]
#: 53 training records: a number that must not appear in any output (it is private).
N_TRAIN = 53


def _records(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(n):
        good = (i + offset) % 2 == 0
        pool = GOOD if good else BAD
        rows.append(
            {"text": pool[(i // 2) % len(pool)], "label": "positive" if good else "negative"}
        )
    return rows


def _write(rows: list[dict], path):
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    return path


@pytest.fixture
def captured(monkeypatch):
    """The job's trained Classifier, as it is when the model folder is written."""
    seen = {}
    real = _user.write_model_folder

    def keep(cfg, root, classifier, report, data):
        seen["classifier"] = classifier
        return real(cfg, root, classifier, report, data)

    monkeypatch.setattr(_job, "write_model_folder", keep)
    return seen


def _files(tmp_path, suffix: str, *, generation: bool = False):
    train, test = _records(N_TRAIN), _records(12, offset=1)
    if generation:
        for row in train + test:
            row["answer"] = row.pop("label")
    return _write(train, tmp_path / f"train{suffix}"), _write(test, tmp_path / f"test{suffix}")


def _run(tmp_path, folder, train, test, *extra: str, name: str = "run"):
    out = tmp_path / name
    argv = ["finetune", "--model", str(folder), "--train-file", str(train), "--output", str(out)]
    if test is not None:
        argv += ["--test-file", str(test)]
    argv += ["--steps", "3", "--batch-size", "8", "--max-length", "16", "--no-progress", *extra]
    return main(argv), out


def _report(out) -> dict:
    return json.loads((out / "report.json").read_text())


def _no_training_count(*texts: str) -> None:
    pattern = re.compile(rf"(?<![\d.]){N_TRAIN}(?![\d.])")
    for text in texts:
        assert not pattern.search(text), "the training file's record count was shown"


def _encoded(classifier, path):
    rows = pd.read_csv(path) if path.suffix == ".csv" else pd.read_json(path, lines=True)
    names = list(classifier.label_names)
    return classifier.encode(list(rows["text"]), [names.index(v) for v in rows["label"]])


# ------------------------------------------------------------------ classification


def test_encoder_classifier_from_csv_reloads_with_the_same_predictions(
    tmp_path, folders, captured, capsys
):
    train, test = _files(tmp_path, ".csv")
    code, out = _run(tmp_path, folders["bert"], train, test, "--trainable", "classifier")
    assert code == 0
    streams = capsys.readouterr()
    report = _report(out)
    assert report["private"] and report["model_kind"] == "classifier"
    assert report["data"]["label_names"] == ["negative", "positive"]
    assert report["data"]["test"]["class_counts"] == {"negative": 6, "positive": 6}  # public
    assert not report["test_is_private"]
    _no_training_count(streams.out, streams.err, (out / "report.json").read_text())
    clf = captured["classifier"]
    batch = _encoded(clf, test)
    with torch.no_grad():
        expected = clf.full_logits(batch)
        again = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        got = again.eval()(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    accuracy = float((got.argmax(-1) == batch["labels"]).double().mean())
    assert accuracy == pytest.approx(report["test_accuracy_after"])
    card = (out / "model" / "README.md").read_text()
    assert card.startswith("---\n") and "differentially private" in card
    assert again.config.id2label == {0: "negative", 1: "positive"}


def test_prompt_classification_with_a_causal_lm_from_jsonl(tmp_path, folders, captured):
    train, test = _files(tmp_path, ".jsonl")
    code, out = _run(
        tmp_path, folders["llama"], train, test, "--trainable", "head", "--prompt",
        "Text : {text} Label :",
    )  # fmt: skip
    assert code == 0
    report = _report(out)
    assert report["model_kind"] == "causal" and report["trainable"] == "head"
    clf = captured["classifier"]
    batch = _encoded(clf, test)
    rows = torch.as_tensor(clf.label_word_ids)
    again = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    with torch.no_grad():
        expected = clf.full_logits(batch)
        last = batch["attention_mask"].shape[1] - 1  # left padding: the prompt ends last
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = again(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions)
        got = logits.logits[:, last][:, rows]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    task = json.loads((out / "model" / "zoprivacy_task.json").read_text())
    assert task["label_words"] == [" negative", " positive"]


def test_text_pairs_and_bias_on_roberta_from_parquet(tmp_path, folders, captured):
    rows = [{**r, "second": "a film"} for r in _records(N_TRAIN)]
    train = _write(rows, tmp_path / "train.parquet")
    test = _write([{**r, "second": "the plot"} for r in _records(10)], tmp_path / "test.parquet")
    code, out = _run(
        tmp_path, folders["roberta"], train, test, "--trainable", "bias", "--text-pair-column",
        "second", "--method", "mezo",
    )  # fmt: skip
    assert code == 0
    clf = captured["classifier"]
    assert clf.trainable_names and all(n.endswith("bias") for n in clf.trainable_names)
    batch = clf.encode(["good film"], [1], pairs=["a film"])
    pair = clf.tokenizer("good film", "a film", return_tensors="pt")["input_ids"]
    assert torch.equal(batch["input_ids"], pair)  # the tokenizer's own pair encoding
    again = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        torch.testing.assert_close(again(**inputs).logits, clf.full_logits(batch))


# ------------------------------------------------------------------ generation, LoRA


def test_generation_target_with_lora_reloads_as_a_peft_adapter(tmp_path, folders, captured):
    train, test = _files(tmp_path, ".parquet", generation=True)
    code, out = _run(
        tmp_path, folders["gpt2"], train, test, "--target-column", "answer", "--trainable",
        "lora:r=2", "--lr", "0.1",
    )  # fmt: skip
    assert code == 0
    report = _report(out)
    assert report["test_accuracy_after"] is None
    after = report["test_metrics_after"]
    assert set(after) == {"loss", "exact_match"} and 0 <= after["exact_match"] <= 1
    assert (out / "model" / "adapter_config.json").exists()
    clf = captured["classifier"]
    from zoprivacy import tasks

    rows = pd.read_parquet(test)
    batch = clf.encode(list(rows["text"]), targets=list(rows["answer"]))
    base = transformers.AutoModelForCausalLM.from_pretrained(folders["gpt2"])
    again = peft.PeftModel.from_pretrained(base, out / "model").eval()
    expected = tasks.causal_lm_target_losses(clf.model, batch)
    got = tasks.causal_lm_target_losses(again, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert float(expected.mean()) == pytest.approx(after["loss"], rel=1e-5)


def test_generation_target_first_order_on_opt(tmp_path, folders):
    train, test = _files(tmp_path, ".csv", generation=True)
    code, out = _run(
        tmp_path, folders["opt"], train, test, "--target-column", "answer", "--method",
        "adamw", "--trainable", "last1",
    )  # fmt: skip
    assert code == 0
    report = _report(out)
    assert not report["private"] and report["test_metrics_after"]["loss"] > 0


# ------------------------------------------------------------------ carved test, config, errors


def test_no_test_file_carves_a_test_part_that_is_said_to_be_private(tmp_path, folders, capsys):
    train, _ = _files(tmp_path, ".csv")
    code, out = _run(
        tmp_path, folders["bert"], train, None, "--labels", "negative,positive", "--test-size",
        "10", "--trainable", "classifier",
    )  # fmt: skip
    assert code == 0
    streams = capsys.readouterr()
    report = _report(out)
    assert report["test_is_private"] and report["test_records"] == 10
    assert "NOT covered" in report["data"]["test_note"]
    assert "not covered" in (out / "model" / "README.md").read_text().lower()
    assert "NOT covered" in (out / "README.md").read_text()
    assert "not covered" in streams.out
    _no_training_count(streams.out, streams.err, (out / "report.json").read_text())


def test_config_file_with_command_line_override(tmp_path, folders):
    train, test = _files(tmp_path, ".csv")
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "{folders["bert"]}"\ntrain-file = "{train}"\ntest_file = "{test}"\n'
        'trainable = "classifier"\nsteps = 5\nbatch-size = 8\nmax-length = 16\n'
        "no-progress = true\nepsilon = 3\n"
    )
    out = tmp_path / "run"
    code = main(["finetune", "--config", str(config), "--steps", "2", "--output", str(out)])
    assert code == 0
    report = _report(out)
    assert report["config"]["steps"] == 2 and report["steps"] == 2  # the flag wins
    assert report["config"]["epsilon"] == 3.0 and report["config_file"] == str(config)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--text-column", "body"], "body"),
        (["--labels", "negative,positive,neutral", "--label-column", "nope"], "nope"),
        (["--task", "bbc_news"], "--task"),
        (["--trainable", "lora:r=0"], "lora"),
    ],
)
def test_bad_files_and_options_fail_before_any_budget_is_spent(
    tmp_path, folders, capsys, extra, needle
):
    train, test = _files(tmp_path, ".csv")
    code, out = _run(tmp_path, folders["bert"], train, test, *extra)
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()  # ñ was never released


def test_user_options_need_a_train_file(tmp_path, capsys):
    code = main(["finetune", "--text-column", "x", "--output", str(tmp_path / "r")])
    assert code == 2 and "--train-file" in capsys.readouterr().err


# ------------------------------------------------------------------ resume, terminal output


def test_interrupt_then_resume_on_user_data(tmp_path, folders, monkeypatch, capsys):
    train, test = _files(tmp_path, ".jsonl")
    real_step = _train.ZerothOrderTrainer.step

    def step_then_ctrl_c(self, batch):
        result = real_step(self, batch)
        if self.steps_done == 1:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(_train.ZerothOrderTrainer, "step", step_then_ctrl_c)
    args = ("--trainable", "classifier", "--steps", "3")
    code, out = _run(tmp_path, folders["bert"], train, test, *args)
    assert code == 130 and "--resume" in capsys.readouterr().err
    monkeypatch.setattr(_train.ZerothOrderTrainer, "step", real_step)
    code = main(["finetune", "--output", str(out), "--resume", "--no-progress"])
    assert code == 0
    report = _report(out)
    assert report["steps"] == 3 and report["config"]["train_file"] == str(train)
    assert (out / "model" / "config.json").exists()


def test_progress_lines_off_a_terminal_show_public_values_only(tmp_path, folders, capsys):
    train, test = _files(tmp_path, ".csv")
    out = tmp_path / "run"
    code = main(
        ["finetune", "--model", str(folders["bert"]), "--train-file", str(train), "--test-file",
         str(test), "--output", str(out), "--steps", "3", "--batch-size", "8",
         "--trainable", "classifier"]
    )  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "reading the data" in err and "loading the model" in err
    assert "dpaggzo: step 3/3, ε " in err
    assert "loss" not in err.split("training:")[1].split("evaluating")[0]


def test_ctrl_c_while_caching_prints_the_resume_hint(tmp_path, folders, monkeypatch, capsys):
    from zoprivacy.finetune import _setup

    def interrupted(self, encoded, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(_setup.Classifier, "build_cache", interrupted)
    train, test = _files(tmp_path, ".csv")
    code, out = _run(tmp_path, folders["bert"], train, test, "--trainable", "classifier")
    assert code == 130
    err = capsys.readouterr().err
    assert f"--output {out} --resume" in err and "no privacy budget spent" in err


# ------------------------------------------------------------------ DP-AdamW per-record gradients


def _without_dropout(family: str, folder):
    """The family's tiny model, all dropout off (so a record's gradient is reproducible)."""
    build, pad, side = _families()[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build()
    for key, value in model.config.to_dict().items():
        if "drop" in key and isinstance(value, float):
            setattr(model.config, key, 0.0)
    model.save_pretrained(folder)
    _tokenizer(pad=pad, side=side).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family, hooks", [("opt", False), ("gpt2", True)])
def test_dpadamw_generation_clips_per_record_gradients(tmp_path, monkeypatch, family, hooks):
    """Issue 15: OPT flattens [B, T, H] to [B·T, H] before its MLP, so Opacus's layer hooks gave
    token rows ("Expected size 11 but got size 55"). Every row DP-AdamW clips must be the gradient
    of one record's loss alone, computed here by Hugging Face's own causal-LM loss."""
    folder = _without_dropout(family, tmp_path / family)
    seen = []
    real = _train.FirstOrderTrainer._grad_samples

    def spy(self, batch):
        losses = real(self, batch)
        model = self.classifier.model
        names = {id(p): n for n, p in model.named_parameters()}
        samples = {names[id(p)]: p.grad_sample.detach().clone() for p in self.params}
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen.append((dict(batch), samples, state, self.net is not self.module))
        return losses

    monkeypatch.setattr(_train.FirstOrderTrainer, "_grad_samples", spy)
    train, test = _files(tmp_path, ".csv", generation=True)
    code, _ = _run(
        tmp_path, folder, train, test, "--target-column", "answer", "--method", "dpadamw",
        "--trainable", "last1",
    )  # fmt: skip
    assert code == 0
    checked = 0
    for batch, samples, state, hooked in seen:
        assert hooked == hooks  # Opacus's hooks kept only where their rows are records
        reference = transformers.AutoModelForCausalLM.from_pretrained(folder)
        reference.load_state_dict(state)
        params = dict(reference.named_parameters())
        for i in range(batch["input_ids"].shape[0]):
            real_tokens = batch["attention_mask"][i].bool()
            ids, labels = batch["input_ids"][i][real_tokens], batch["labels"][i][real_tokens]
            loss = reference(input_ids=ids[None], labels=labels[None].long()).loss
            grads = torch.autograd.grad(loss, [params[n] for n in samples])
            for name, grad in zip(samples, grads, strict=True):
                torch.testing.assert_close(samples[name][i], grad, rtol=1e-4, atol=1e-5)
        checked += batch["input_ids"].shape[0] >= 2
    assert checked  # at least one batch of two or more records
