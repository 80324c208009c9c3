"""Low-rank probes in factored form (zoprivacy.optim.factored): a linear layer or an embedding at
W + a·(U/√r)Vᵀ is computed as the call at W plus a rank-r correction.

References: the same torch call at the materialised point W + a·u vᵀ (float64), and the in-place
path, which writes θ ± φz into the parameters. The factored path must never write the m × n
product of a matrix it handles, must handle tied weights and trainable biases, and must leave the
parameters bit-exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoprivacy import DPAggZO
from zoprivacy.optim import perturb
from zoprivacy.optim.directions import DirectionStream
from zoprivacy.optim.factored import factored_call, factoring_pays, weight_of

pytestmark = [
    pytest.mark.filterwarnings("ignore::zoprivacy.optim.optimizer.NotPrivateWarning"),
    pytest.mark.filterwarnings("ignore::zoprivacy.noise.source.PredictableNoiseWarning"),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


@pytest.mark.parametrize("x_shape", [(5,), (3, 5), (2, 4, 5), "transposed"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("alpha", [1e-3, -0.5])
def test_a_factored_linear_is_the_linear_at_the_perturbed_weight(x_shape, with_bias, alpha):
    w, u, v = _randn(7, 5, seed=0), _randn(7, 2, seed=1), _randn(5, 2, seed=2)
    x = _randn(5, 3, seed=3).T if x_shape == "transposed" else _randn(*x_shape, seed=3)
    bias, perturbed_bias = (_randn(7, seed=4), _randn(7, seed=5)) if with_bias else (None, None)

    def swap(value):  # the caller's substitution of the other trainable arguments
        return perturbed_bias if value is bias and bias is not None else value

    expected = F.linear(x, w + alpha * u @ v.T, perturbed_bias)
    got = factored_call(F.linear, (x, w, bias), {}, (u, v), alpha, swap)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    # keyword arguments: the weight is passed as it is, the bias substituted
    got = factored_call(F.linear, (), dict(input=x, weight=w, bias=bias), (u, v), alpha, swap)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_a_factored_embedding_is_the_lookup_at_the_perturbed_weight():
    w, u, v = _randn(9, 4, seed=0), _randn(9, 3, seed=1), _randn(4, 3, seed=2)
    idx = torch.tensor([[0, 8, 3], [3, 3, 1]])
    expected = F.embedding(idx, w + 0.25 * u @ v.T, padding_idx=0)
    got = factored_call(F.embedding, (idx, w), {"padding_idx": 0}, (u, v), 0.25, lambda t: t)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_an_embedding_with_max_norm_is_left_to_the_materialised_path():
    """max_norm renormalises the weight in place: the factored form would touch θ itself."""
    w, u, v = _randn(9, 4, seed=0), _randn(9, 3, seed=1), _randn(4, 3, seed=2)
    before = w.clone()
    out = factored_call(
        F.embedding, (torch.tensor([1]), w, None, 0.1), {}, (u, v), 0.1, lambda t: t
    )
    assert out is NotImplemented and torch.equal(w, before)
    assert weight_of(F.linear, (torch.ones(2), torch.ones(3)), {}) is None  # not a matrix
    assert weight_of(torch.matmul, (torch.ones(2, 2), torch.ones(2, 2)), {}) is None


class TiedLM(torch.nn.Module):
    """Embedding, a linear layer with a bias, a layer norm, and an output layer tied to the
    embedding (as SmolLM2's lm_head), plus one matrix read outside F.linear (``w.t()``)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(11, 6, dtype=torch.float64)
            self.hidden = torch.nn.Linear(6, 6, dtype=torch.float64)
            self.norm = torch.nn.LayerNorm(6, dtype=torch.float64)
            self.side = torch.nn.Parameter(torch.randn(6, 6, dtype=torch.float64) * 0.3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(self.embed(tokens)))
        h = self.norm(h @ self.side.t())
        return F.linear(h, self.embed.weight)  # tied output layer

    def losses(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(tokens)
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(-1)


def test_factoring_pays_when_the_rows_move_less_memory_than_the_matrix():
    """Materialising writes m·n values; the factored form passes over rows·(m + n) values."""
    w = torch.zeros(100, 50)
    assert factoring_pays(F.linear, (torch.zeros(33, 50), w), {}, w)  # 33·150 < 5000
    assert not factoring_pays(F.linear, (torch.zeros(2, 17, 50), w), {}, w)  # 34·150 > 5000
    assert factoring_pays(F.linear, (), {"input": torch.zeros(50), "weight": w}, w)
    # an embedding reads only its looked-up rows: always factored, whatever the batch
    assert factoring_pays(F.embedding, (torch.zeros(10_000, dtype=torch.long), w), {}, w)


def _run(path, monkeypatch, closure_error=False, always_factor=True):
    model = TiedLM()
    tokens = torch.randint(0, 11, (8, 5), generator=_gen(1))
    targets = torch.randint(0, 11, (8, 5), generator=_gen(2))
    calls = {"materialised_matrix": 0}
    real = DirectionStream.perturbed

    def counting(self, k, index, base, alpha, out):
        calls["materialised_matrix"] += base.dim() == 2
        return real(self, k, index, base, alpha, out)

    monkeypatch.setattr(DirectionStream, "perturbed", counting)
    if always_factor:  # this model's linear layers are small: factor them anyway
        monkeypatch.setattr(perturb, "factoring_pays", lambda *args: True)
    opt = DPAggZO(
        list(model.parameters()), 0.05, num_directions=3, clip_norm=1e9, noise_multiplier=0.0,
        expected_batch_size=8.0, seed=5, noise_seed=1, directions="lowrank", direction_rank=2,
        perturbation=path,
    )  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    evaluations = []

    def closure():
        evaluations.append(1)
        if closure_error and len(evaluations) == 4:
            raise RuntimeError("closure failed mid-step")
        return model.losses(tokens, targets)

    if closure_error:
        with pytest.raises(RuntimeError, match="mid-step"):
            opt.step(closure)
        return model, before, None, calls
    return model, before, opt.step(closure), calls


def test_factored_probes_equal_the_in_place_probes_with_tied_weights(monkeypatch):
    _, _, inplace, _ = _run("inplace", monkeypatch)
    _, _, hooks, calls = _run("hooks", monkeypatch)
    assert torch.allclose(hooks.noisy_sum, inplace.noisy_sum, rtol=1e-9, atol=1e-12)
    # only the matrix read outside F.linear / F.embedding (side.t()) was materialised: once per
    # probe (2 per direction), never the embedding, the tied output layer or the hidden layer
    assert calls["materialised_matrix"] == 2 * 3


def test_a_linear_layer_over_many_rows_is_materialised(monkeypatch):
    """With the cost rule, the hidden layer (6 × 6 over 40 rows: 40·12 > 36) and the tied output
    layer (11 × 6 over 40 rows: 40·17 > 66) are materialised; the embedding lookup is factored."""
    _, _, inplace, _ = _run("inplace", monkeypatch, always_factor=False)
    _, _, hooks, calls = _run("hooks", monkeypatch, always_factor=False)
    assert torch.allclose(hooks.noisy_sum, inplace.noisy_sum, rtol=1e-9, atol=1e-12)
    assert calls["materialised_matrix"] == 3 * 2 * 3  # side, hidden, output layer


def test_a_closure_failing_mid_step_leaves_the_parameters_bit_exact(monkeypatch):
    model, before, _, _ = _run("hooks", monkeypatch, closure_error=True)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
