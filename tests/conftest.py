"""Shared test configuration: one thread per process (2 shared cores), hypothesis profiles."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import itertools

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ------------------------------------------------------------------ shared models and data
# Test files build their small models and regression data through these helpers (directly, or via
# the fixtures of the same name) instead of each carrying its own copy.
def seeded_mlp(*sizes: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A Linear (one size pair) or Linear-Tanh-...-Linear stack, built under ``seed`` without
    touching the global RNG state of the test."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            if i:
                layers.append(torch.nn.Tanh())
            layers.append(torch.nn.Linear(a, b))
    model = layers[0] if len(layers) == 1 else torch.nn.Sequential(*layers)
    return model.to(dtype)


def regression_data(
    n: int, dim: int, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` records x ~ N(0, I_dim) with targets x·w + 0.1·noise for a fixed w."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w = torch.linspace(-2.0, 3.0, dim, dtype=torch.float64)
    y = x @ w + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def squared_errors(model: torch.nn.Module, batch) -> torch.Tensor:
    """Per-record squared errors of a (x, y) batch; the empty Poisson batch gives shape [0]."""
    from zoprivacy import is_empty_batch

    if is_empty_batch(batch):
        return torch.zeros(0)
    x, y = batch
    return (model(x).squeeze(-1) - y) ** 2


@pytest.fixture
def make_mlp():
    """Factory fixture: ``make_mlp(4, 8, 1, seed=0, dtype=...)`` (see :func:`seeded_mlp`)."""
    return seeded_mlp


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """family -> a tiny random model saved with its tokenizer, as ``save_pretrained`` writes
    (:mod:`tests.tiny_hf`; built once per session)."""
    pytest.importorskip("transformers")
    from tests.tiny_hf import _families, _tokenizer

    out = {}
    for family, (build, pad, side) in _families().items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build()
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        _tokenizer(pad=pad, side=side).save_pretrained(folder)
        out[family] = folder
    return out
