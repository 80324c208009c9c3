"""Poisson sampling, the empty-batch convention and the private size release (zoprivacy.data)."""

from __future__ import annotations

import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from zoprivacy.data import poisson as data
from zoprivacy.data.poisson import (
    EMPTY_BATCH,
    EmptyBatch,
    PoissonBatchSampler,
    PredictableSamplingWarning,
    expected_batch_size,
    is_empty_batch,
    poisson_loader,
    release_size,
)

torch.set_num_threads(1)


def seeded_sampler(n: int, q: float, steps: int, seed: int = 0) -> PoissonBatchSampler:
    with pytest.warns(PredictableSamplingWarning, match="predictable"):
        return PoissonBatchSampler(n, q, steps=steps, generator=seed)


def inclusion_matrix(sampler: PoissonBatchSampler) -> np.ndarray:
    x = np.zeros((len(sampler), sampler.num_records), dtype=np.int8)
    for t, batch in enumerate(sampler):
        x[t, batch] = 1
    return x


# --------------------------------------------------------------------------------------------
# the sampler's distribution
# --------------------------------------------------------------------------------------------


def test_inclusion_frequency_is_q_for_every_record():
    n, q, steps = 200, 0.1, 3000
    x = inclusion_matrix(seeded_sampler(n, q, steps))
    counts = x.sum(axis=0)
    # Each count is Binomial(steps, q): 5 standard deviations, Bonferroni-safe for 200 records.
    sd = math.sqrt(steps * q * (1 - q))
    assert np.all(np.abs(counts - steps * q) < 5 * sd), counts
    # and the pooled frequency is q to within 5 sd of the pooled binomial
    assert abs(counts.sum() / (n * steps) - q) < 5 * math.sqrt(q * (1 - q) / (n * steps))


def test_batch_size_is_binomial():
    n, q, steps = 500, 0.05, 4000
    sizes = np.array([len(b) for b in seeded_sampler(n, q, steps, seed=1)])
    mean_sd = math.sqrt(n * q * (1 - q) / steps)
    assert abs(sizes.mean() - n * q) < 5 * mean_sd
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.1)


def test_inclusions_independent_across_records_and_steps():
    n, q, steps = 100, 0.3, 3000
    x = inclusion_matrix(seeded_sampler(n, q, steps, seed=2)).astype(float)
    # Within a step: two distinct records are included together with probability q².
    both = (x.T @ x) / steps
    off_diag = both[~np.eye(n, dtype=bool)]
    sd_pair = math.sqrt(q * q * (1 - q * q) / steps)
    assert abs(off_diag.mean() - q * q) < 5 * sd_pair / math.sqrt(n)
    assert np.all(np.abs(off_diag - q * q) < 6 * sd_pair)
    # Across steps: a record in step t is in step t+1 with probability q (no memory).
    lagged = (x[:-1] * x[1:]).sum() / x[:-1].sum()
    assert abs(lagged - q) < 5 * math.sqrt(q * (1 - q) / x[:-1].sum())


def test_batches_are_sorted_unique_in_range():
    for batch in seeded_sampler(50, 0.5, 200, seed=3):
        assert batch == sorted(set(batch))
        assert all(isinstance(i, int) and 0 <= i < 50 for i in batch)


def test_sample_rate_one_takes_everything():
    assert list(seeded_sampler(7, 1.0, 3)) == [list(range(7))] * 3


def test_empty_batches_are_yielded_not_skipped():
    sampler = seeded_sampler(10, 1e-4, 200, seed=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 200
    assert sum(b == [] for b in batches) > 190


def test_zero_records_gives_empty_batches():
    assert list(seeded_sampler(0, 0.5, 4)) == [[], [], [], []]


def test_len_and_default_steps():
    with pytest.warns(PredictableSamplingWarning):
        assert len(PoissonBatchSampler(10, 0.01, generator=0)) == 100
    with pytest.warns(PredictableSamplingWarning):
        assert len(PoissonBatchSampler(10, 0.7, generator=0)) == 1


def test_a_batch_is_two_vectorised_draws_for_a_million_records(monkeypatch):
    """The work per batch does not grow with n: one binomial size and one choice of indices."""
    with pytest.warns(PredictableSamplingWarning):
        sampler = PoissonBatchSampler(1_000_000, 0.01, steps=20, generator=5)
    calls: list[str] = []
    batch_rng = sampler._batch_rng

    class Counting:
        def __init__(self, rng):
            self.rng = rng

        def __getattr__(self, name):
            calls.append(name)
            return getattr(self.rng, name)

    monkeypatch.setattr(sampler, "_batch_rng", lambda index: Counting(batch_rng(index)))
    sizes = [len(b) for b in sampler]
    assert calls == ["binomial", "choice"] * 20
    assert 9_000 < np.mean(sizes) < 11_000


# --------------------------------------------------------------------------------------------
# where the randomness comes from
# --------------------------------------------------------------------------------------------


def test_default_generator_is_os_entropy_and_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = PoissonBatchSampler(1000, 0.5, steps=2)
        b = PoissonBatchSampler(1000, 0.5, steps=2)
    # Two independent OS-seeded samplers agree with probability 2^-2000.
    assert list(a) != list(b)


def test_explicit_seed_warns_and_reproduces():
    assert list(seeded_sampler(100, 0.2, 5, seed=9)) == list(seeded_sampler(100, 0.2, 5, seed=9))
    assert list(seeded_sampler(100, 0.2, 5, seed=9)) != list(seeded_sampler(100, 0.2, 5, seed=8))


@pytest.mark.parametrize(
    "generator", [np.random.default_rng(0), torch.Generator().manual_seed(0)], ids=["np", "torch"]
)
def test_generator_objects_are_accepted_and_warn(generator):
    with pytest.warns(PredictableSamplingWarning):
        sampler = PoissonBatchSampler(20, 0.5, steps=3, generator=generator)
    assert len(list(sampler)) == 3


def test_each_pass_draws_new_batches():
    sampler = seeded_sampler(1000, 0.5, 3)
    assert list(sampler) != list(sampler)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"num_records": -1}, ValueError, "num_records"),
        ({"num_records": 2.5}, TypeError, "num_records"),
        ({"num_records": True}, TypeError, "num_records"),
        ({"sample_rate": 0.0}, ValueError, "sample_rate"),
        ({"sample_rate": 1.5}, ValueError, "sample_rate"),
        ({"sample_rate": float("nan")}, ValueError, "sample_rate"),
        ({"sample_rate": "0.1"}, TypeError, "sample_rate"),
        ({"steps": -1}, ValueError, "steps"),
        ({"steps": 1.0}, TypeError, "steps"),
        ({"generator": "seed"}, TypeError, "generator"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs, error, name):
    args = {"num_records": 10, "sample_rate": 0.1, "steps": 5} | kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PredictableSamplingWarning)
        with pytest.raises(error, match=name):
            PoissonBatchSampler(args.pop("num_records"), args.pop("sample_rate"), **args)


# --------------------------------------------------------------------------------------------
# the loader and the empty-batch convention
# --------------------------------------------------------------------------------------------


def test_empty_batch_sentinel():
    assert EmptyBatch() is EMPTY_BATCH
    assert len(EMPTY_BATCH) == 0 and not EMPTY_BATCH
    assert list(EMPTY_BATCH) == [] and dict(EMPTY_BATCH) == {}
    assert EMPTY_BATCH.to("cpu") is EMPTY_BATCH
    assert EMPTY_BATCH.pin_memory() is EMPTY_BATCH
    assert pickle.loads(pickle.dumps(EMPTY_BATCH)) is EMPTY_BATCH
    assert type(EMPTY_BATCH)({}) is EMPTY_BATCH  # what torch's pin_memory does to mappings
    with pytest.raises(KeyError):
        EMPTY_BATCH["input_ids"]


def test_is_empty_batch():
    assert is_empty_batch(EMPTY_BATCH)
    assert is_empty_batch({}) and is_empty_batch([]) and is_empty_batch(torch.zeros(0, 3))
    assert not is_empty_batch({"x": torch.zeros(1)}) and not is_empty_batch(torch.zeros(2))


def test_loader_with_tensor_dataset_and_default_collate():
    x = torch.arange(40.0).reshape(20, 2)
    y = torch.arange(20)
    with pytest.warns(PredictableSamplingWarning):
        loader = poisson_loader(TensorDataset(x, y), 0.3, steps=50, generator=0)
    assert len(loader) == 50
    seen = 0
    for batch in loader:
        if batch is EMPTY_BATCH:
            continue
        bx, by = batch
        assert torch.equal(bx, x[by])  # records stay whole and aligned
        seen += len(by)
    assert 0.2 * 20 * 50 < seen < 0.4 * 20 * 50


def test_loader_empty_batches_come_out_empty_without_calling_collate():
    calls = []

    def collate(records):
        calls.append(len(records))
        return {"x": torch.stack([r["x"] for r in records])}

    records = [{"x": torch.tensor([float(i)])} for i in range(5)]
    with pytest.warns(PredictableSamplingWarning):
        loader = poisson_loader(records, 1e-3, steps=30, collate_fn=collate, generator=1)
    batches = list(loader)
    assert len(batches) == 30
    assert all(b is EMPTY_BATCH for b in batches if not b)
    assert sum(b is EMPTY_BATCH for b in batches) >= 25
    assert 0 not in calls


def test_loader_custom_collate_and_kwargs():
    records = [{"text": f"r{i}", "label": i % 2} for i in range(30)]

    def collate(batch):
        texts = [r["text"] for r in batch]
        return {"text": texts, "label": torch.tensor([r["label"] for r in batch])}

    with pytest.warns(PredictableSamplingWarning):
        loader = poisson_loader(
            records, 0.5, steps=5, collate_fn=collate, generator=2, num_workers=0
        )
    for batch in loader:
        if batch:
            texts, labels = batch["text"], batch["label"].tolist()
            assert [int(t[1:]) % 2 for t in texts] == labels


class BatchFetchDataset:
    """Fetches through ``__getitems__`` (as Hugging Face datasets do) and fails on no key."""

    def __init__(self, n):
        self.n = n
        self.fetched: list[list[int]] = []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        raise AssertionError("fetches must go through __getitems__")

    def __getitems__(self, keys):
        if not keys:
            raise IndexError("empty fetch")
        self.fetched.append(list(keys))
        return [{"x": torch.tensor(k)} for k in keys]


def test_loader_uses_batched_fetch_and_never_fetches_nothing():
    ds = BatchFetchDataset(8)
    with pytest.warns(PredictableSamplingWarning):
        batches = list(poisson_loader(ds, 0.05, steps=60, generator=3))
    assert any(b is EMPTY_BATCH for b in batches)
    full = [b for b in batches if b]
    assert full and [b["x"].tolist() for b in full] == ds.fetched


def test_loader_with_hf_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"x": list(range(10)), "y": [i % 2 for i in range(10)]})
    with pytest.warns(PredictableSamplingWarning):
        loader = poisson_loader(ds, 0.01, steps=20, generator=0)
    assert all(b is EMPTY_BATCH or len(b["x"]) > 0 for b in loader)


@pytest.mark.parametrize("bad", ["batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"])
def test_loader_refuses_arguments_that_replace_poisson_sampling(bad):
    with pytest.raises(TypeError, match=bad):
        poisson_loader(list(range(5)), 0.5, steps=2, **{bad: None})


def test_loader_requires_map_style_dataset():
    with pytest.raises(TypeError, match="map-style"):
        poisson_loader(iter(range(5)), 0.5, steps=2)


# --------------------------------------------------------------------------------------------
# the private size release
# --------------------------------------------------------------------------------------------


def test_release_size_is_clamped_at_one():
    values = [release_size(0, 50.0) for _ in range(400)]
    assert min(values) == 1.0
    assert sum(v == 1.0 for v in values) > 100  # about half the draws fall below 1
    assert all(isinstance(v, float) and v >= 1.0 for v in values)


def test_release_size_seeded_is_reproducible_and_warns():
    with pytest.warns(PredictableSamplingWarning):
        a = release_size(100, 2.0, generator=7)
    with pytest.warns(PredictableSamplingWarning):
        b = release_size(100, 2.0, generator=7)
    assert a == b and a != 100.0


class RecordingAccountant:
    def __init__(self, fail: bool = False):
        self.calls: list[float] = []
        self.fail = fail

    def release_size(self, laplace_scale: float) -> None:
        self.calls.append(laplace_scale)
        if self.fail:
            raise RuntimeError("size already released")


def test_release_size_charges_the_accountant_once_before_drawing(monkeypatch):
    order = []
    accountant = RecordingAccountant()
    real = data._os_entropy_laplace

    def traced(scale):
        order.append(("draw", len(accountant.calls)))
        return real(scale)

    monkeypatch.setattr(data, "_os_entropy_laplace", traced)
    release_size(50, 3.0, accountant=accountant)
    assert accountant.calls == [3.0]
    assert order == [("draw", 1)]  # the charge came first


def test_release_size_draws_nothing_when_the_accountant_refuses(monkeypatch):
    def forbidden(scale):
        raise AssertionError("noise drawn although the accountant refused")

    monkeypatch.setattr(data, "_os_entropy_laplace", forbidden)
    with pytest.raises(RuntimeError, match="already released"):
        release_size(50, 3.0, accountant=RecordingAccountant(fail=True))


@pytest.mark.parametrize(
    ("n", "psi", "error", "name"),
    [
        (-1, 1.0, ValueError, "num_records"),
        (3.0, 1.0, TypeError, "num_records"),
        (10, 0.0, ValueError, "laplace_scale"),
        (10, -2.0, ValueError, "laplace_scale"),
        (10, float("inf"), ValueError, "laplace_scale"),
        (10, float("nan"), ValueError, "laplace_scale"),
        (10, None, TypeError, "laplace_scale"),
    ],
)
def test_release_size_rejects_bad_input_before_charging(n, psi, error, name):
    accountant = RecordingAccountant()
    with pytest.raises(error, match=name):
        release_size(n, psi, accountant=accountant)
    assert accountant.calls == []


def test_expected_batch_size():
    assert expected_batch_size(0.01, 12_808.4) == pytest.approx(128.084)
    with pytest.raises(ValueError, match="noisy_size"):
        expected_batch_size(0.1, 0.0)
    with pytest.raises(ValueError, match="sample_rate"):
        expected_batch_size(0.0, 100.0)
