"""make_private: calibration, the single size release, the budget guard, checkpoints, the
journal kept by default (no resume path under-counts) and the free dry run."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

import zoprivacy
from tests.conftest import regression_data, seeded_mlp
from tests.conftest import squared_errors as _losses
from zoprivacy import PrivacyBudgetExceeded, PrivateTraining, make_private
from zoprivacy.accounting import compute_epsilon
from zoprivacy.run.checkpoint import UnjournaledResumeWarning
from zoprivacy.run.journal import JournalError

N = 400


@pytest.fixture
def dataset():
    return TensorDataset(*regression_data(N, 5, seed=0, dtype=torch.float32))


def _model():
    return seeded_mlp(5, 1, seed=1)


def _setup(model, dataset, **kw):
    args = dict(
        target_epsilon=2.0,
        target_delta=1e-5,
        steps=20,
        num_directions=4,
        clip_norm=5.0,
        lr=0.05,
        expected_batch_size=16,
        seed=3,
    )
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zoprivacy.PredictableNoiseWarning)
        warnings.simplefilter("ignore", zoprivacy.data.poisson.PredictableSamplingWarning)
        return make_private(model, dataset, **args)


def test_full_run_spends_at_most_the_budget_and_the_next_step_is_refused(dataset):
    model = _model()
    run = _setup(model, dataset)
    assert run.accountant.size_released and run.accountant.steps == 0
    assert run.expected_batch_size == pytest.approx(16.0)  # b = q·ñ with q = 16/ñ
    assert run.sample_rate == pytest.approx(16.0 / run.noisy_dataset_size)
    for batch in run.loader:
        run.optimizer.step(lambda batch=batch: _losses(model, batch))
    assert run.steps_done == 20 and run.accountant.steps == 20
    spent = run.epsilon_spent()
    expected = compute_epsilon(
        noise_multiplier=run.plan.noise_multiplier,
        sample_rate=run.sample_rate,
        steps=20,
        delta=1e-5,
        laplace_scale=run.plan.laplace_scale,
        orders=run.plan.orders,
    )
    assert spent == pytest.approx(expected, rel=1e-12)
    assert 1.99 < spent <= 2.0

    before = [p.detach().clone() for p in model.parameters()]
    called = []
    with pytest.raises(PrivacyBudgetExceeded):
        run.optimizer.step(lambda: called.append(1) or _losses(model, next(iter(run.loader))))
    assert not called  # refused before touching data
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_sample_rate_path_and_public_size_without_release(dataset):
    run = _setup(_model(), dataset, expected_batch_size=None, sample_rate=0.05, size_fraction=0.0)
    assert run.noisy_dataset_size == N and not run.accountant.size_released
    assert run.expected_batch_size == pytest.approx(0.05 * N)
    assert run.plan.laplace_scale is None


def test_checkpoint_resumes_the_same_trajectory_without_a_second_release(
    dataset, tmp_path, monkeypatch
):
    fixed = [dataset[i * 7 : i * 7 + 9] for i in range(10)]  # fixed batches: isolate the optimizer

    def same_release(n, psi, *, accountant):  # both runs see the same ñ (and charge it)
        accountant.release_size(psi)
        return n + 3.5

    monkeypatch.setattr(zoprivacy.run.private, "release_size", same_release)
    model_a = _model()
    run_a = _setup(model_a, dataset, steps=10, noise_seed=11)
    model_b = copy.deepcopy(model_a)
    for batch in fixed:
        run_a.optimizer.step(lambda batch=batch: _losses(model_a, batch))

    run_b = _setup(model_b, dataset, steps=10, noise_seed=11)
    for batch in fixed[:4]:
        run_b.optimizer.step(lambda batch=batch: _losses(model_b, batch))
    path = run_b.save(tmp_path / "ckpt.pt")
    released_n = run_b.noisy_dataset_size

    def no_release(*_a, **_k):
        raise AssertionError("resume must not release the size again")

    monkeypatch.setattr(zoprivacy.run.private, "release_size", no_release)
    model_c = _model()  # fresh weights: the checkpoint restores them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zoprivacy.PredictableNoiseWarning)
        run_c = make_private(
            model_c,
            dataset,
            target_epsilon=2.0,
            target_delta=1e-5,
            steps=10,
            num_directions=4,
            clip_norm=5.0,
            lr=0.05,
            expected_batch_size=16,
            checkpoint=path,
        )
    assert run_c.noisy_dataset_size == released_n
    assert run_c.accountant.steps == 4 and run_c.steps_left == 6 and len(run_c.loader) == 6
    for batch in fixed[4:]:
        run_c.optimizer.step(lambda batch=batch: _losses(model_c, batch))
    for a, c in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(a, c)
    assert run_c.epsilon_spent() == pytest.approx(run_a.epsilon_spent(), rel=1e-12)


def test_save_is_atomic(dataset, tmp_path, monkeypatch):
    run = _setup(_model(), dataset)
    path = run.save(tmp_path / "ckpt.pt")
    good = path.read_bytes()

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        run.save(path)
    assert path.read_bytes() == good
    # no temporary file left (the journal was started beside the first checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ckpt.pt.journal"]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (dict(target_epsilon=0.0), "target_epsilon"),
        (dict(target_delta=2.0), "target_delta"),
        (dict(sample_rate=0.1), "exactly one"),
        (dict(expected_batch_size=-1.0), "expected_batch_size"),
        (dict(steps=-1), "steps"),
        (dict(size_fraction=1.5), "size_fraction"),
    ],
)
def test_bad_arguments_are_named_and_nothing_is_released(dataset, override, match, monkeypatch):
    monkeypatch.setattr(
        zoprivacy.run.private, "release_size", lambda *a, **k: pytest.fail("released")
    )
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises((ValueError, TypeError), match=match):
        _setup(model, dataset, **override)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_no_trainable_parameter_is_an_error(dataset):
    model = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        _setup(model, dataset)


# ------------------------------------------------------------------ defect 1: journal by default
def _steps(run, model, count):
    """Take ``count`` steps (fewer if the loader ends); returns how many released S_t."""
    done = 0
    for batch in run.loader:
        if done == count:
            break
        run.optimizer.step(lambda batch=batch: _losses(model, batch))
        done += 1
    return done


def _resume(dataset, checkpoint, **kw):
    model = _model()
    return model, _setup(model, dataset, checkpoint=checkpoint, **kw)


def test_a_crash_after_the_checkpoint_is_charged_not_released_again(dataset, tmp_path):
    """Issue 14, defect 1: 10 steps, checkpoint after step 5, the process dies after step 10,
    resume with the default journal=None and finish the 20-step plan. Before the fix, 25
    releases were made and 20 charged (ε 2.000 reported, 2.078 true)."""
    model = _model()
    run = _setup(model, dataset)
    made = _steps(run, model, 5)
    run.save(tmp_path / "c.pt")
    made += _steps(run, model, 5)  # the process dies here: steps 6-10 are not in the checkpoint
    del run
    model, resumed = _resume(dataset, tmp_path / "c.pt")
    assert resumed.recovery.replayed == 5 and resumed.steps_done == 10
    made += _steps(resumed, model, 20)
    true_epsilon = compute_epsilon(
        noise_multiplier=resumed.plan.noise_multiplier,
        sample_rate=resumed.sample_rate,
        steps=made,
        delta=1e-5,
        laplace_scale=resumed.plan.laplace_scale,
        orders=resumed.plan.orders,
    )
    assert made == 20 and resumed.accountant.steps == made
    assert resumed.epsilon_spent() == pytest.approx(true_epsilon, rel=1e-12)
    assert resumed.epsilon_spent() <= 2.0


def test_every_checkpoint_records_its_journal(dataset, tmp_path):
    model = _model()
    run = _setup(model, dataset)
    assert run.journal is None and run.state_dict()["journal"] is None  # none before a save
    _steps(run, model, 2)
    run.save(tmp_path / "a.pt")
    _steps(run, model, 3)
    run.save(tmp_path / "b.pt")  # the journal stays beside the first checkpoint
    journal = (tmp_path / "a.pt.journal").resolve()
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    assert records[0]["type"] == "header" and records[0]["origin"] == "checkpoint"
    assert [r["type"] for r in records[1:]] == ["begin", "release"] * 3
    for name, position in (("a.pt", 1), ("b.pt", 7)):
        info = torch.load(tmp_path / name, weights_only=False)["journal"]
        assert info == {"path": str(journal), "run": records[0]["run"], "records": position}
    assert not (tmp_path / "b.pt.journal").exists()


def test_a_checkpoint_without_a_journal_is_refused_unless_journal_false(dataset, tmp_path):
    model = _model()
    run = _setup(model, dataset)
    _steps(run, model, 3)
    state = run.state_dict()  # taken before any save(): no journal yet
    fresh = _model()
    before = [p.detach().clone() for p in fresh.parameters()]
    with pytest.raises(JournalError, match=r"records no journal.*released a second time.*False"):
        _setup(fresh, dataset, checkpoint=state)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters(), strict=True))
    with pytest.warns(UnjournaledResumeWarning, match="released a second time"):
        model, resumed = _resume(dataset, state, journal=False)
    assert resumed.steps_done == 3 and resumed.unjournaled == "journal=False"
    resumed.save(tmp_path / "c.pt")  # an opted-out run starts no journal and says so
    assert not (tmp_path / "c.pt.journal").exists()
    info = torch.load(tmp_path / "c.pt", weights_only=False)["journal"]
    assert info == {"unjournaled": "journal=False"}
    with pytest.raises(JournalError, match=r"opted out.*journal=False"):
        _resume(dataset, tmp_path / "c.pt")


def test_a_missing_journal_is_refused_with_the_risk_and_the_opt_out(dataset, tmp_path):
    model = _model()
    run = _setup(model, dataset)
    run.save(tmp_path / "c.pt")
    (tmp_path / "c.pt.journal").unlink()
    with pytest.raises(JournalError, match=r"is missing.*not be charged.*journal=False"):
        _resume(dataset, tmp_path / "c.pt")
    with pytest.warns(UnjournaledResumeWarning):
        _, resumed = _resume(dataset, tmp_path / "c.pt", journal=False)
    assert resumed.steps_done == 0 and resumed.journal is None


def test_journal_false_cannot_skip_steps_its_journal_records(dataset, tmp_path):
    model = _model()
    run = _setup(model, dataset)
    run.save(tmp_path / "c.pt")
    _steps(run, model, 2)
    with pytest.raises(JournalError, match="2 step\\(s\\) begun after this checkpoint"):
        _resume(dataset, tmp_path / "c.pt", journal=False)


def test_a_moved_journal_is_given_by_its_new_path(dataset, tmp_path):
    model = _model()
    run = _setup(model, dataset)
    run.save(tmp_path / "c.pt")
    _steps(run, model, 2)
    (tmp_path / "c.pt.journal").rename(tmp_path / "moved.journal")
    _, resumed = _resume(dataset, tmp_path / "c.pt", journal=tmp_path / "moved.journal")
    assert resumed.recovery.replayed == 2 and resumed.accountant.steps == 2


def test_a_fresh_run_refuses_to_overwrite_another_runs_journal(dataset, tmp_path):
    model = _model()
    run = _setup(model, dataset)
    run.save(tmp_path / "c.pt")
    _steps(run, model, 1)
    again = _setup(_model(), dataset)  # a new run saving under the same path
    with pytest.raises(JournalError, match="another run"):
        again.save(tmp_path / "c.pt")


def test_a_journal_path_holding_a_run_needs_resume_true(dataset, tmp_path):
    log = tmp_path / "j.jsonl"
    model = _model()
    run = _setup(model, dataset, journal=log)
    _steps(run, model, 2)  # dies before its first checkpoint
    with pytest.raises(JournalError, match=r"already holds a run.*resume=True.*new journal path"):
        _setup(_model(), dataset, journal=log)
    resumed = _setup(_model(), dataset, journal=log, resume=True)
    assert resumed.steps_done == 2 and resumed.accountant.steps == 2
    assert resumed.noisy_dataset_size == run.noisy_dataset_size
    fresh = _setup(_model(), dataset, journal=tmp_path / "new.jsonl", resume=True)
    assert fresh.steps_done == 0  # nothing to continue there: a new run


def test_data_parallel_checkpoints_are_unjournaled_and_resume_needs_journal_false(
    dataset, tmp_path
):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = _model()
        run = _setup(model, dataset, process_group=dist.group.WORLD, sampling_generator=4)
        _steps(run, model, 2)
        run.save(tmp_path / "c.pt")
        assert not (tmp_path / "c.pt.journal").exists()
        assert run.state_dict()["journal"] == {"unjournaled": "process_group"}
        with pytest.raises(JournalError, match=r"data-parallel runs keep no journal.*False"):
            _resume(dataset, tmp_path / "c.pt", process_group=dist.group.WORLD)
        with pytest.raises(JournalError, match="data-parallel"):
            _resume(dataset, tmp_path / "c.pt")  # also in one process
        with pytest.warns(UnjournaledResumeWarning):
            _, resumed = _resume(
                dataset, tmp_path / "c.pt", process_group=dist.group.WORLD, journal=False
            )
        assert resumed.steps_done == 2
    finally:
        dist.destroy_process_group()


def test_private_training_is_built_with_keywords(dataset):
    run = _setup(_model(), dataset)
    fields = [getattr(run, f.name) for f in dataclasses.fields(PrivateTraining)]
    with pytest.raises(TypeError):
        PrivateTraining(*fields)


# ------------------------------------------------------------------ defect 5: a free dry run
def test_dry_run_charges_nothing_and_changes_nothing(dataset, tmp_path):
    log = tmp_path / "j.jsonl"
    model = _model()
    run = _setup(model, dataset, journal=log)
    _steps(run, model, 1)
    accountant = copy.deepcopy(run.accountant.state_dict())
    journal = log.read_bytes()
    params = [p.detach().clone() for p in model.parameters()]
    public = TensorDataset(*regression_data(6, 5, seed=99, dtype=torch.float32))[:]
    run.dry_run(lambda batch: _losses(model, batch), public)
    assert run.accountant.state_dict() == accountant
    assert log.read_bytes() == journal
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert run.steps_done == 1
    with pytest.raises((ValueError, TypeError)):  # a wrong shape is found for free
        run.dry_run(lambda batch: _losses(model, batch).sum(), public)
    assert run.accountant.state_dict() == accountant and run.steps_done == 1
