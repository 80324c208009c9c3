"""The write-ahead journal: replay instead of re-release, abandoned steps charged, torn tails.

The subprocess SIGKILL test in ``test_kill_resume.py`` covers random kill points; these tests
pin each case deterministically in one process (a "crash" is dropping the objects and resuming
from what is on disk).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zoprivacy.run.private as private
from tests.conftest import regression_data, seeded_mlp, squared_errors
from zoprivacy import PoissonBatchSampler, PredictableNoiseWarning, make_private
from zoprivacy.accounting import RDPAccountant
from zoprivacy.data.poisson import PredictableSamplingWarning
from zoprivacy.run.journal import JournalError, StepJournal, params_digest
from zoprivacy.run.private import AbandonedStepWarning

N, DIM = 24, 4


def _data():
    return torch.utils.data.TensorDataset(*regression_data(N, DIM, seed=5))


def _model():
    return seeded_mlp(DIM, 1, seed=1, dtype=torch.float64)


def _run(model, dataset, *, steps=8, **kwargs):
    args = dict(
        target_epsilon=4.0,
        target_delta=1e-5,
        steps=steps,
        num_directions=3,
        clip_norm=1.0,
        lr=0.05,
        sample_rate=0.5,
        seed=7,
        noise_seed=3,
        sampling_generator=4,
    )
    args.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PredictableSamplingWarning)
        warnings.simplefilter("ignore", PredictableNoiseWarning)
        return make_private(model, dataset, **args)


def _closure(model, batch, calls=None):
    def closure():
        if calls is not None:
            calls.append(1)
        return squared_errors(model, batch)

    return closure


def _train(training, model, until, *, save_at=(), path=None, calls=None):
    for batch in training.loader:
        if training.steps_done >= until:
            break
        training.optimizer.step(_closure(model, batch, calls))
        if training.steps_done in save_at:
            training.save(path)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(autouse=True)
def seeded_size_release(monkeypatch):
    """ñ from a fixed seed (tests only), so that separate runs are comparable bit for bit."""
    real = private.release_size

    def seeded(n, psi, *, accountant=None, generator=None):
        return real(n, psi, accountant=accountant, generator=12345)

    monkeypatch.setattr(private, "release_size", seeded)


@pytest.fixture(scope="module")
def reference16():
    """Parameters after 8 steps of a run planned for 16 (room for abandoned charges)."""
    mp = pytest.MonkeyPatch()
    real = private.release_size
    mp.setattr(
        private, "release_size", lambda n, psi, **kw: real(n, psi, **{**kw, "generator": 12345})
    )
    model = _model()
    training = _run(model, _data(), steps=16)
    _train(training, model, 8)
    mp.undo()
    return _flat(model)


@pytest.fixture
def reference():
    model = _model()
    training = _run(model, _data())
    _train(training, model, 8)
    return _flat(model), training.accountant.state_dict()


def test_steps_after_the_checkpoint_are_replayed_not_released_again(tmp_path, reference):
    ckpt, log = tmp_path / "c.pt", tmp_path / "j.jsonl"
    model = _model()
    training = _run(model, _data(), journal=log)
    _train(training, model, 6, save_at={3}, path=ckpt)  # dies after step 6, checkpoint at 3
    assert [r["type"] for r in _records(log)][:2] == ["header", "size"]
    del training

    model = _model()
    calls: list[int] = []
    resumed = _run(model, _data(), checkpoint=ckpt, journal=log)
    assert resumed.recovery.replayed == 3 and resumed.recovery.abandoned == 0
    assert resumed.steps_done == 6 and resumed.accountant.steps == 6
    _train(resumed, model, 8, calls=calls)
    assert len(calls) == 2 * 3 * 2  # only steps 7 and 8 touched data (2K evaluations each)
    flat, accountant = reference
    assert torch.equal(_flat(model), flat)  # bit for bit, batches and noise included
    assert resumed.accountant.state_dict() == accountant


def test_a_run_that_died_before_its_first_checkpoint_reuses_its_size_release(
    tmp_path, reference, monkeypatch
):
    log = tmp_path / "j.jsonl"
    model = _model()
    training = _run(model, _data(), journal=log)
    noisy_n = training.noisy_dataset_size
    _train(training, model, 4)  # no checkpoint at all
    del training

    def no_second_release(*args, **kwargs):
        raise AssertionError("the size was released a second time")

    monkeypatch.setattr(private, "release_size", no_second_release)
    model = _model()
    with pytest.raises(JournalError, match=r"already holds a run.*resume=True.*new journal path"):
        _run(model, _data(), journal=log)  # starting afresh on it must be explicit
    resumed = _run(model, _data(), journal=log, resume=True)
    assert resumed.noisy_dataset_size == noisy_n
    assert resumed.recovery.replayed == 4 and resumed.steps_done == 4
    assert resumed.accountant.size_released
    _train(resumed, model, 8)
    flat, accountant = reference
    assert torch.equal(_flat(model), flat)
    assert resumed.accountant.state_dict() == accountant


def test_a_step_that_died_mid_way_is_charged_and_never_applied(tmp_path, reference):
    ckpt, log = tmp_path / "c.pt", tmp_path / "j.jsonl"
    model = _model()
    training = _run(model, _data(), journal=log, steps=12)
    _train(training, model, 2, save_at={2}, path=ckpt)

    def dies():
        raise MemoryError("killed mid-step")

    with pytest.raises(MemoryError):
        training.optimizer.step(dies)
    assert [r["type"] for r in _records(log)][-1] == "begin"
    del training

    model = _model()
    with pytest.warns(AbandonedStepWarning, match=r"1 step\(s\) that died mid-way \(steps \[2\]\)"):
        resumed = _run(model, _data(), journal=log, steps=12, checkpoint=ckpt)
    assert resumed.recovery.abandoned == 1 and resumed.recovery.abandoned_steps == (2,)
    assert resumed.steps_done == 2 and resumed.accountant.steps == 3  # charged, not applied
    # the charge is exactly one more step of the same mechanism
    sigma, q = resumed.optimizer.noise_multiplier, resumed.sample_rate
    expected = RDPAccountant(orders=resumed.accountant.orders)
    expected.release_size(resumed.plan.laplace_scale)
    expected.step(noise_multiplier=sigma, sample_rate=q, steps=3)
    # (equal up to the order of the float sums: 2 steps + 1 charged vs 3 at once)
    assert resumed.epsilon_spent() == pytest.approx(expected.get_epsilon(resumed.plan.delta), 1e-12)


def test_abandoned_charges_cap_the_steps_the_budget_still_allows(tmp_path):
    ckpt, log = tmp_path / "c.pt", tmp_path / "j.jsonl"
    model = _model()
    training = _run(model, _data(), journal=log, steps=6)  # σ calibrated for exactly 6 steps
    _train(training, model, 1, save_at={1}, path=ckpt)

    def dies():
        raise RuntimeError("crash")

    for _ in range(2):  # two attempts at step 1 die
        with pytest.raises(RuntimeError):
            training.optimizer.step(dies)
    del training
    model = _model()
    with pytest.warns(AbandonedStepWarning, match="The budget allows 3 of the 5 planned"):
        resumed = _run(model, _data(), journal=log, steps=6, checkpoint=ckpt)
    assert resumed.steps_left == 3 and len(resumed.loader) == 3
    _train(resumed, model, 6)
    assert resumed.steps_done == 4
    assert resumed.epsilon_spent() <= resumed.plan.target_epsilon


def test_a_torn_last_record_is_dropped(tmp_path, reference):
    ckpt, log = tmp_path / "c.pt", tmp_path / "j.jsonl"
    model = _model()
    training = _run(model, _data(), journal=log)
    _train(training, model, 5, save_at={3}, path=ckpt)
    del training
    with open(log, "ab") as fh:  # the process died inside write(): half a begin record
        fh.write(b'{"type":"begin","st')
    model = _model()
    resumed = _run(model, _data(), checkpoint=ckpt, journal=log)
    assert resumed.recovery.replayed == 2 and resumed.recovery.abandoned == 0
    assert log.read_bytes().endswith(b"\n")
    _train(resumed, model, 8)
    assert torch.equal(_flat(model), reference[0])


def test_journal_mismatches_are_refused_before_the_model_changes(tmp_path):
    ckpt, log, other = tmp_path / "c.pt", tmp_path / "j.jsonl", tmp_path / "o.jsonl"
    model = _model()
    training = _run(model, _data(), journal=log)
    _train(training, model, 2, save_at={2}, path=ckpt)
    _run(_model(), _data(), journal=other)  # another run's journal

    fresh = _model()
    before = _flat(fresh)
    with pytest.raises(JournalError, match="belongs to another run"):
        _run(fresh, _data(), checkpoint=ckpt, journal=other)
    assert torch.equal(_flat(fresh), before)
    with torch.no_grad():
        fresh.weight.add_(1.0)
    with pytest.raises(JournalError, match="started from other parameters"):
        _run(fresh, _data(), journal=log, resume=True)  # no checkpoint, other initial model
    with pytest.raises(JournalError, match="already holds records"):
        StepJournal.create(log, digest=params_digest(fresh.parameters()))
    with pytest.raises(ValueError, match=r"not supported with process_group.*journal=False"):
        _run(_model(), _data(), journal=tmp_path / "x.jsonl", process_group=object())


def test_a_journal_truncated_below_the_checkpoint_is_refused(tmp_path):
    ckpt, log = tmp_path / "c.pt", tmp_path / "j.jsonl"
    model = _model()
    training = _run(model, _data(), journal=log)
    _train(training, model, 3, save_at={3}, path=ckpt)
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:4]))
    with pytest.raises(JournalError, match="truncated or replaced"):
        _run(_model(), _data(), checkpoint=ckpt, journal=log)


def test_the_journal_holds_no_secret_of_an_os_entropy_run(tmp_path):
    """OS-entropy noise and sampling: the journal has S_t but no noise or sampler state, and the
    checkpoint's sampler state has no key."""
    ckpt, log = tmp_path / "c.pt", tmp_path / "j.jsonl"
    model = _model()
    training = _run(model, _data(), journal=log, noise_seed=None, sampling_generator=None)
    _train(training, model, 2, save_at={2}, path=ckpt)
    releases = [r for r in _records(log) if r["type"] == "release"]
    assert len(releases) == 2 and all(r["noise"] is None for r in releases)
    state = torch.load(ckpt, weights_only=False)
    assert state["sampler"] == {"mode": "os_entropy", "position": 2}


def test_sampler_batches_depend_only_on_the_key_and_the_index():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = PoissonBatchSampler(100, 0.3, steps=6, generator=9)
        first = list(a)
        b = PoissonBatchSampler(100, 0.3, steps=3, generator=9, position=3)
        assert list(b) == first[3:]
        c = PoissonBatchSampler(100, 0.3, steps=3, generator=10)
        c.load_state_dict(a.state_dict(), position=2)
        assert list(c) == first[2:5]
        assert list(a) != first  # a second pass continues with new batches
    secret = PoissonBatchSampler(100, 0.3)
    assert "key" not in secret.state_dict() and not secret.seeded
    with pytest.raises(ValueError, match="unknown mode"):
        secret.load_state_dict({"mode": "bogus"})


class _Death(BaseException):
    """The process dies here (nothing after it runs)."""


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    plan=st.lists(
        st.tuples(st.integers(0, 7), st.sampled_from(["mid-step", "after-release", "between"])),
        min_size=1,
        max_size=3,
    ),
    saves=st.sets(st.integers(1, 7), max_size=3),
)
def test_any_crash_schedule_ends_at_the_unbroken_run(tmp_path_factory, reference16, plan, saves):
    """Random deaths (mid-step, right after the release record, between steps) and checkpoints:
    the resumed run ends bit-identical to the unbroken one, and the accountant holds exactly one
    charge per attempt that read data."""
    tmp = tmp_path_factory.mktemp("sched")
    ckpt, log = tmp / "c.pt", tmp / "j.jsonl"
    crashes = dict(plan)
    attempts = 0
    while True:
        model = _model()
        kwargs = {"checkpoint": ckpt} if ckpt.exists() else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AbandonedStepWarning)
            run = _run(model, _data(), journal=log, steps=16, resume=True, **kwargs)
        journal = run.optimizer._journal
        try:
            for batch in run.loader:
                t = run.steps_done
                if t >= 8:
                    break
                kind = crashes.pop(t, None)
                closure = _closure(model, batch)
                if kind == "mid-step":

                    def closure():
                        raise _Death

                elif kind == "after-release":

                    def dying_release(*args, journal=journal, **kw):
                        StepJournal.release(journal, *args, **kw)
                        raise _Death

                    journal.release = dying_release
                attempts += 1
                run.optimizer.step(closure)
                if run.steps_done in saves:
                    run.save(ckpt)
                if kind == "between":
                    raise _Death
            break
        except _Death:
            continue
    assert torch.equal(_flat(model), reference16)
    assert run.steps_done == 8
    abandoned = sum(1 for kind in dict(plan).values() if kind == "mid-step")
    charged = sum(
        e["steps"] for e in run.accountant.history if e["mechanism"] == "subsampled_gaussian"
    )
    assert charged == 8 + abandoned


def test_a_journal_that_does_not_continue_the_checkpoint_is_refused_before_any_change(tmp_path):
    ckpt, log = tmp_path / "c.pt", tmp_path / "j.jsonl"
    model = _model()
    training = _run(model, _data(), journal=log)
    _train(training, model, 4, save_at={2}, path=ckpt)
    lines = log.read_text().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    # drop the begin record of step 2: its release now has no begin
    kept = [line for line, r in zip(lines, records, strict=True) if (r["type"], r.get("step"))
            != ("begin", 2)]  # fmt: skip
    log.write_text("".join(kept))
    fresh = _model()
    before = _flat(fresh)
    with pytest.raises(JournalError, match=r"does not follow|without its begin"):
        _run(fresh, _data(), checkpoint=ckpt, journal=log)
    assert torch.equal(_flat(fresh), before)  # the checkpoint was not loaded into the model
