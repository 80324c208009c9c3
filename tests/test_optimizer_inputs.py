"""Bad input never changes a parameter: constructor arguments and closure outputs."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import seeded_mlp
from zoprivacy.optim.optimizer import DPAggZO, MeZO

pytestmark = [
    pytest.mark.filterwarnings("ignore::zoprivacy.optim.optimizer.NotPrivateWarning"),
    pytest.mark.filterwarnings("ignore::zoprivacy.noise.source.PredictableNoiseWarning"),
]

GOOD = {
    "num_directions": 3,
    "clip_norm": 1.0,
    "noise_multiplier": 1.0,
    "expected_batch_size": 4.0,
    "perturbation_scale": 1e-3,
}


def _model():
    return seeded_mlp(4, 8, 1, seed=0)


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------- constructor
@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("lr", -0.1, ValueError),
        ("lr", math.nan, ValueError),
        ("lr", math.inf, ValueError),
        ("lr", "0.1", TypeError),
        ("num_directions", 0, ValueError),
        ("num_directions", -2, ValueError),
        ("num_directions", 2.0, TypeError),
        ("num_directions", True, TypeError),
        ("num_directions", math.nan, TypeError),
        ("clip_norm", 0.0, ValueError),
        ("clip_norm", -1.0, ValueError),
        ("clip_norm", math.nan, ValueError),
        ("clip_norm", math.inf, ValueError),
        ("clip_norm", "1", TypeError),
        ("noise_multiplier", -0.5, ValueError),
        ("noise_multiplier", math.nan, ValueError),
        ("noise_multiplier", math.inf, ValueError),
        ("expected_batch_size", 0.0, ValueError),
        ("expected_batch_size", -3, ValueError),
        ("expected_batch_size", math.nan, ValueError),
        ("expected_batch_size", None, ValueError),
        ("perturbation_scale", 0.0, ValueError),
        ("perturbation_scale", -1e-3, ValueError),
        ("perturbation_scale", math.nan, ValueError),
        ("weight_decay", -0.1, ValueError),
        ("weight_decay", math.nan, ValueError),
        ("seed", -1, ValueError),
        ("seed", 1.5, TypeError),
        ("noise_seed", -1, ValueError),
        ("noise_seed", "x", TypeError),
        ("sample_rate", 0.0, ValueError),
        ("sample_rate", 1.5, ValueError),
        ("sample_rate", math.nan, ValueError),
    ],
)
def test_bad_constructor_argument(name, value, error):
    model = _model()
    before = _snapshot(model)
    kwargs = dict(GOOD)
    lr = 0.1
    if name == "lr":
        lr = value
    else:
        kwargs[name] = value
    with pytest.raises(error, match=name):
        DPAggZO(model.parameters(), lr, **kwargs)
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, p0)


def test_clip_none_with_noise_is_an_error():
    with pytest.raises(ValueError, match="clip_norm"):
        DPAggZO(_model().parameters(), 0.1, **{**GOOD, "clip_norm": None})


def test_bad_param_group_values_and_no_trainable_params():
    model = _model()
    w, b = model[0].weight, model[0].bias
    with pytest.raises(ValueError, match="lr"):
        DPAggZO([{"params": [w], "lr": -1.0}], 0.1, **GOOD)
    with pytest.raises(ValueError, match="weight_decay"):
        DPAggZO([{"params": [w], "weight_decay": math.nan}], 0.1, **GOOD)
    opt = DPAggZO([w], 0.1, **GOOD)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [b], "lr": math.inf})
    assert len(opt.param_groups) == 1
    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    with pytest.raises(ValueError, match="requires_grad"):
        DPAggZO([frozen], 0.1, **GOOD)


# ---------------------------------------------------------------- closure
class CountingClosure:
    """Correct per-record losses, except that call number `bad_call` returns `make_bad(losses)`."""

    def __init__(self, model, bad_call, make_bad):
        self.model, self.bad_call, self.make_bad, self.calls = model, bad_call, make_bad, 0
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)

    def __call__(self):
        self.calls += 1
        losses = (self.model(self.x).squeeze(1) - self.y) ** 2
        if self.calls == self.bad_call:
            return self.make_bad(losses)
        return losses


def _raise(_):
    raise RuntimeError("data loader died")


def _with(value, idx):
    def make(losses):
        out = losses.clone()
        out[list(idx)] = value
        return out

    return make


BAD_OUTPUTS = [
    # (call that goes wrong, transform, exception, message fragments)
    (3, _raise, RuntimeError, ["data loader died"]),
    (4, _raise, RuntimeError, ["data loader died"]),
    (1, lambda t: t.sum(), ValueError, ["1-D", "k=0"]),
    (2, lambda t: t[:, None].expand(6, 2), ValueError, ["1-D", "(6, 2)", "k=0"]),
    (4, _with(math.nan, [1, 3]), ValueError, ["[1, 3]", "k=1", "θ-φ"]),
    (5, _with(math.inf, [0]), ValueError, ["[0]", "k=2", "θ+φ"]),
    (3, _with(-math.inf, [5]), ValueError, ["[5]", "k=1"]),
    (2, lambda t: t[:5], ValueError, ["5 losses", "k=0", "6 at the first"]),
    (6, lambda t: torch.cat([t, t]), ValueError, ["12 losses", "k=2"]),
    (3, lambda t: t.tolist(), TypeError, ["torch.Tensor", "list"]),
    (1, lambda t: None, TypeError, ["NoneType"]),
    (2, lambda t: t.long(), TypeError, ["floating"]),
]


@pytest.mark.parametrize(("bad_call", "make_bad", "error", "fragments"), BAD_OUTPUTS)
@pytest.mark.parametrize("mode", ["dp", "mezo"])
def test_bad_closure_output_restores_parameters(bad_call, make_bad, error, fragments, mode):
    model = _model()
    if mode == "dp":
        opt = DPAggZO(model.parameters(), 0.1, **GOOD, seed=1)
    else:
        opt = MeZO(model.parameters(), 0.1, num_directions=3, seed=1)
    closure = CountingClosure(model, 10**9, None)
    opt.step(closure)  # a good step first: the failing one is not the first
    before = _snapshot(model)
    closure = CountingClosure(model, bad_call, make_bad)
    with pytest.raises(error) as info:
        opt.step(closure)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert closure.calls == bad_call  # it stopped at the bad evaluation
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert torch.allclose(p, p0, rtol=0, atol=1e-6), (p - p0).abs().max()
    assert opt.steps_taken == 1
    # and the optimizer still works afterwards, continuing at the step index that failed
    stats = opt.step(CountingClosure(model, 10**9, None))
    assert stats.step == 1


def test_closure_none_or_not_callable():
    model = _model()
    opt = DPAggZO(model.parameters(), 0.1, **GOOD)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="closure"):
        opt.step(None)
    with pytest.raises(TypeError, match="callable"):
        opt.step(torch.zeros(3))  # type: ignore[arg-type]
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, p0)
    assert opt.steps_taken == 0


def test_overflowing_loss_difference_is_reported():
    """Finite but huge losses of opposite sign: L+ − L− overflows float64."""
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = DPAggZO([theta], 0.1, **GOOD)
    calls = []

    def closure():
        calls.append(1)
        sign = 1.0 if len(calls) % 2 else -1.0
        return torch.tensor([1.0, sign * 1.7e308], dtype=torch.float64) + 0 * theta.sum()

    with pytest.raises(ValueError, match=r"overflows float64 for records \[1\]"):
        opt.step(closure)
    assert torch.allclose(theta.detach(), torch.zeros(2, dtype=torch.float64), atol=1e-15)
