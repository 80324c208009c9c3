"""DPAggZO.from_state_dict, DPAggZO.check_closure and the cost stated by a bad closure's error."""

import pytest
import torch

from tests.conftest import regression_data, seeded_mlp, squared_errors
from zoprivacy import DPAggZO, MagnitudeMask, Stagewise
from zoprivacy.accounting import RDPAccountant
from zoprivacy.tasks.check import PerSampleViolation

KW = {
    "num_directions": 3,
    "clip_norm": 1.0,
    "noise_multiplier": 1.0,
    "expected_batch_size": 8.0,
    "perturbation_scale": 1e-3,
}


def _closure(model, batch):
    return lambda: squared_errors(model, batch)


def _values(model):
    return [p.detach().clone() for p in model.parameters()]


def _bit_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- from_state_dict
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"clip_norm": Stagewise([2], [1.0, 0.5]), "mask": MagnitudeMask(0.5)},
        {"directions": "rademacher", "difference": "forward", "perturbation": "inplace"},
    ],
)
def test_from_state_dict_continues_the_same_trajectory(options):
    """A rebuilt optimizer continues bit for bit: every setting comes from the checkpoint."""
    data = regression_data(8, 4, dtype=torch.float32)
    kw = {**KW, **options}
    ref = seeded_mlp(4, 3, 1)
    opt = DPAggZO(ref.parameters(), 0.05, seed=7, noise_seed=3, weight_decay=0.01, **kw)
    for _ in range(4):
        opt.step(_closure(ref, data))

    model = seeded_mlp(4, 3, 1)
    first = DPAggZO(model.parameters(), 0.05, seed=7, noise_seed=3, weight_decay=0.01, **kw)
    for _ in range(2):
        first.step(_closure(model, data))
    state = first.state_dict()
    again = DPAggZO.from_state_dict(model.parameters(), state)
    assert again.steps_taken == 2
    assert again.param_groups[0]["weight_decay"] == 0.01
    for name in ("directions", "difference", "perturbation", "seed", "scheduled"):
        assert getattr(again, name) == getattr(first, name)
    for _ in range(2):
        again.step(_closure(model, data))
    assert _bit_equal(_values(model), _values(ref))


def test_from_state_dict_checks_given_schedules_and_keywords():
    model = seeded_mlp(4, 3, 1)
    opt = DPAggZO(model.parameters(), 0.05, seed=1, **{**KW, "clip_norm": lambda t: 1.0})
    state = opt.state_dict()
    with pytest.raises(ValueError, match="same schedule"):
        DPAggZO.from_state_dict(model.parameters(), state)  # a foreign callable is not saved
    with pytest.raises(ValueError, match=r"gives 2\.0 at step 0"):
        DPAggZO.from_state_dict(model.parameters(), state, clip_norm=lambda t: 2.0)
    rebuilt = DPAggZO.from_state_dict(model.parameters(), state, clip_norm=lambda t: 1.0)
    assert rebuilt.scheduled == ("clip_norm",)
    with pytest.raises(TypeError, match="unknown keyword"):
        DPAggZO.from_state_dict(model.parameters(), state, lr=0.1)
    with pytest.raises(ValueError, match="not from DPAggZO"):
        DPAggZO.from_state_dict(model.parameters(), {"state": {}})


def test_from_state_dict_charges_the_given_accountant():
    model = seeded_mlp(4, 3, 1)
    opt = DPAggZO(model.parameters(), 0.05, seed=1, sample_rate=0.5, **KW)
    accountant = RDPAccountant()
    again = DPAggZO.from_state_dict(model.parameters(), opt.state_dict(), accountant=accountant)
    again.step(_closure(model, regression_data(4, 4, dtype=torch.float32)))
    assert accountant.steps == 1
    assert again.sample_rate == 0.5


# ---------------------------------------------------------------- check_closure
@pytest.mark.parametrize("perturbation", ["auto", "hooks", "inplace"])
def test_check_closure_is_free_and_leaves_everything_unchanged(perturbation):
    model = seeded_mlp(4, 3, 1)
    accountant = RDPAccountant()
    opt = DPAggZO(
        model.parameters(),
        0.05,
        seed=1,
        noise_seed=5,
        accountant=accountant,
        sample_rate=0.1,
        perturbation=perturbation,
        **KW,
    )
    before = _values(model)
    noise_before = opt.state_dict()["zoprivacy"]["noise"]["state"]
    calls = []

    def losses(batch):
        calls.append(1)
        return squared_errors(model, batch)

    opt.check_closure(losses, regression_data(6, 4, dtype=torch.float32))
    assert calls  # it really ran the closure
    assert _bit_equal(_values(model), before)
    assert accountant.steps == 0
    assert opt.steps_taken == 0
    assert torch.equal(opt.state_dict()["zoprivacy"]["noise"]["state"], noise_before)


@pytest.mark.parametrize(
    ("losses", "error", "fragment"),
    [
        (lambda m, b: squared_errors(m, b).sum(), ValueError, "1-D tensor"),
        (lambda m, b: squared_errors(m, b).tolist(), TypeError, "torch.Tensor"),
        (lambda m, b: squared_errors(m, b) / 0.0, ValueError, "NaN/inf"),
        (lambda m, b: squared_errors(m, b) - squared_errors(m, b).mean(), PerSampleViolation, ""),
    ],
)
def test_check_closure_names_the_problem(losses, error, fragment):
    model = seeded_mlp(4, 3, 1)
    opt = DPAggZO(model.parameters(), 0.05, seed=1, **KW)
    before = _values(model)
    with pytest.raises(error, match=fragment):
        opt.check_closure(lambda b: losses(model, b), regression_data(6, 4, dtype=torch.float32))
    assert _bit_equal(_values(model), before)
    assert opt.steps_taken == 0


def test_check_closure_finds_non_finite_losses_at_the_perturbed_point_only():
    model = seeded_mlp(4, 3, 1)
    theta = _values(model)

    def losses(batch):
        out = squared_errors(model, batch)
        at_theta = all(torch.equal(p, q) for p, q in zip(model.parameters(), theta, strict=True))
        return out if at_theta else out * float("inf")

    opt = DPAggZO(model.parameters(), 0.05, seed=1, perturbation="inplace", **KW)
    with pytest.raises(ValueError, match=r"θ\+φ·z_k"):
        opt.check_closure(losses, regression_data(6, 4, dtype=torch.float32))
    assert _bit_equal(_values(model), theta)


# ---------------------------------------------------------------- the cost of a bad closure
def test_bad_closure_output_on_a_charged_step_says_it_was_charged():
    """Defect 5: the step is charged (data was read), and the message says so and names the
    free check."""
    model = seeded_mlp(4, 3, 1)
    accountant = RDPAccountant()
    opt = DPAggZO(model.parameters(), 0.05, seed=1, accountant=accountant, sample_rate=0.1, **KW)
    data = regression_data(6, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="1-D tensor") as info:
        opt.step(lambda: squared_errors(model, data)[:, None])
    message = str(info.value)
    assert "already charged to the accountant" in message
    assert "DPAggZO.check_closure" in message and "PrivateTraining.dry_run" in message
    assert accountant.steps == 1  # the charge itself is right: data was read
    assert opt.steps_taken == 0


def test_an_exception_raised_inside_the_closure_is_not_rewritten():
    model = seeded_mlp(4, 3, 1)
    opt = DPAggZO(model.parameters(), 0.05, seed=1, **KW)

    def closure():
        raise ValueError("my own error")

    with pytest.raises(ValueError) as info:
        opt.step(closure)
    assert str(info.value) == "my own error"


# ---------------------------------------------------------------- defect 2: one resolution per step
class _AdaptiveClip:
    """A clip-norm schedule that is not a pure function of the step (adaptive clipping)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, step):
        return self.value


def test_the_clip_norm_is_the_one_resolved_before_the_closure_ran(monkeypatch):
    """Defect 2: a schedule changed inside the loss must not change this step's clipping: the
    rows are clipped to the c the noise is sized for."""
    from zoprivacy.noise.source import NoiseSource

    seen = []

    def spy(self, values, *, std, sensitivity):
        seen.append((values.clone(), std, sensitivity))
        return values

    monkeypatch.setattr(NoiseSource, "add_noise", spy)
    model = seeded_mlp(4, 3, 1)
    schedule = _AdaptiveClip(1e-3)
    opt = DPAggZO(model.parameters(), 0.05, seed=1, **{**KW, "clip_norm": schedule})
    x, y = regression_data(1, 4, dtype=torch.float32)

    def closure():
        schedule.value = 1000.0  # e.g. adaptive clipping updated from the losses
        return squared_errors(model, (x, y * 100))

    stats = opt.step(closure)
    (summed, std, sensitivity) = seen[0]
    assert sensitivity == 1e-3 and std == KW["noise_multiplier"] * 1e-3
    assert stats.clip_norm == 1e-3 and stats.noise_std == std
    assert float(summed.norm()) <= 1e-3 * (1 + 1e-12)  # one record: its clipped row
    assert stats.clip_fraction == 1.0
    assert opt.clip_norm == 1000.0  # the next step resolves the new value


def test_an_lr_changed_inside_the_closure_does_not_affect_this_step():
    data = regression_data(6, 4, dtype=torch.float32)
    ref = seeded_mlp(4, 3, 1)
    ref_opt = DPAggZO(ref.parameters(), 0.05, seed=1, noise_seed=2, **KW)
    ref_opt.step(lambda: squared_errors(ref, data))

    model = seeded_mlp(4, 3, 1)
    opt = DPAggZO(model.parameters(), 0.05, seed=1, noise_seed=2, **KW)

    def closure():
        opt.param_groups[0]["lr"] = 10.0
        return squared_errors(model, data)

    opt.step(closure)
    assert _bit_equal(_values(model), _values(ref))


def test_the_mask_is_called_once_per_tensor_per_step():
    model = seeded_mlp(4, 3, 1)
    calls = []

    def mask(step, index, param):
        calls.append((step, index))
        return torch.ones_like(param, dtype=torch.bool)

    opt = DPAggZO(model.parameters(), 0.05, seed=1, mask=mask, **KW)
    data = regression_data(6, 4, dtype=torch.float32)
    for _ in range(3):
        opt.step(lambda: squared_errors(model, data))
    n = len(list(model.parameters()))
    assert sorted(calls) == [(t, i) for t in range(3) for i in range(n)]
