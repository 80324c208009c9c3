"""make_private: calibration, the single size release, the budget guard, checkpoints."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

import zoprivacy
from zoprivacy import PrivacyBudgetExceeded, is_empty_batch, make_private
from zoprivacy.accounting import compute_epsilon

N = 400


@pytest.fixture
def dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    return TensorDataset(x, y)


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(5, 1)


def _losses(model, batch):
    if is_empty_batch(batch):
        return torch.zeros(0)
    x, y = batch
    return (model(x).squeeze(-1) - y) ** 2


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
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left


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
