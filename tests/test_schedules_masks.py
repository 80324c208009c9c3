"""DP-ZOSO schedules (φ, K, c, σ per stage, accountant charged per step) and DP-ZOPO masks
(only the masked coordinates are perturbed and updated)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from zoprivacy import accounting
from zoprivacy.optim.directions import direction_tensor
from zoprivacy.optim.masks import (
    FixedMask,
    MagnitudeMask,
    RandomMask,
    magnitude_masks,
    pack_mask,
    unpack_mask,
)
from zoprivacy.optim.optimizer import DPAggZO
from zoprivacy.optim.schedules import Stagewise, schedule_epsilon, stage_lengths

pytestmark = [
    pytest.mark.filterwarnings("ignore::zoprivacy.optim.optimizer.NotPrivateWarning"),
    pytest.mark.filterwarnings("ignore::zoprivacy.noise.source.PredictableNoiseWarning"),
]


def _problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2))
    x, y = torch.randn(6, 10), torch.randn(6, 2)
    return model, (lambda: ((model(x) - y) ** 2).sum(1))


class RecordingAccountant:
    def __init__(self):
        self.calls = []

    def step(self, *, noise_multiplier, sample_rate, steps=1):
        self.calls.append((noise_multiplier, sample_rate, steps))


# ---------------------------------------------------------------- schedules
def test_stagewise_values_and_validation():
    s = Stagewise([3, 5], [1.0, 0.5, 0.25])
    assert [s(t) for t in range(7)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert s.stage(4) == 1 and s == Stagewise([3, 5], [1.0, 0.5, 0.25])
    assert stage_lengths(s, 7) == [(1.0, 3), (0.5, 2), (0.25, 2)]
    for bad in ([3, 3], [0], [2.5]):
        with pytest.raises(ValueError):
            Stagewise(bad, [1] * (len(bad) + 1))
    with pytest.raises(ValueError, match="values"):
        Stagewise([3], [1.0])


def test_schedules_drive_every_step_and_the_accountant():
    model, closure = _problem()
    acc = RecordingAccountant()
    opt = DPAggZO(
        model.parameters(),
        0.01,
        num_directions=Stagewise([2], [2, 5]),
        clip_norm=Stagewise([3], [1.0, 0.5]),
        noise_multiplier=Stagewise([1, 3], [2.0, 1.0, 0.8]),
        perturbation_scale=Stagewise([2], [1e-2, 1e-3]),
        expected_batch_size=6,
        accountant=acc,
        sample_rate=0.1,
        seed=0,
    )
    assert opt.scheduled == (
        "num_directions",
        "clip_norm",
        "noise_multiplier",
        "perturbation_scale",
    )
    seen = []
    for _ in range(4):
        assert opt.num_directions == (2 if opt.steps_taken < 2 else 5)
        st = opt.step(closure)
        seen.append(
            (
                st.num_directions,
                st.clip_norm,
                st.noise_multiplier,
                st.perturbation_scale,
                st.noise_std,
                st.noisy_sum.numel(),
            )
        )
    assert seen == [
        (2, 1.0, 2.0, 1e-2, 2.0, 2),
        (2, 1.0, 1.0, 1e-2, 1.0, 2),
        (5, 1.0, 1.0, 1e-3, 1.0, 5),
        (5, 0.5, 0.8, 1e-3, 0.4, 5),
    ]
    assert acc.calls == [(2.0, 0.1, 1), (1.0, 0.1, 1), (1.0, 0.1, 1), (0.8, 0.1, 1)]


def test_heterogeneous_sigma_is_accounted_like_its_composition():
    sigma = Stagewise([30], [1.5, 0.9])
    acc = accounting.RDPAccountant()
    acc.release_size(20.0)
    model, _ = _problem()
    opt = DPAggZO(
        model.parameters(),
        0.01,
        num_directions=2,
        clip_norm=1.0,
        noise_multiplier=sigma,
        expected_batch_size=6,
        accountant=acc,
        sample_rate=0.05,
        seed=0,
    )
    for _ in range(50):
        opt.step(lambda: torch.zeros(0))  # empty batches: still steps, still charged
    eps = schedule_epsilon(
        noise_multiplier=sigma, sample_rate=0.05, steps=50, delta=1e-5, laplace_scale=20.0
    )
    assert acc.get_epsilon(1e-5) == pytest.approx(eps, rel=1e-12)
    low = schedule_epsilon(
        noise_multiplier=1.5, sample_rate=0.05, steps=50, delta=1e-5, laplace_scale=20.0
    )
    high = schedule_epsilon(
        noise_multiplier=0.9, sample_rate=0.05, steps=50, delta=1e-5, laplace_scale=20.0
    )
    assert low < eps < high  # neither the first nor the last σ alone


def test_bad_schedule_values_fail_before_charging():
    model, closure = _problem()
    acc = RecordingAccountant()
    opt = DPAggZO(
        model.parameters(),
        0.01,
        num_directions=2,
        clip_norm=1.0,
        noise_multiplier=Stagewise([1], [1.0, 0.0]),
        expected_batch_size=6,
        accountant=acc,
        sample_rate=0.1,
    )
    opt.step(closure)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="infinite privacy cost"):
        opt.step(closure)
    assert len(acc.calls) == 1 and opt.steps_taken == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="num_directions"):
        DPAggZO(
            model.parameters(),
            0.1,
            num_directions=lambda t: 0,
            clip_norm=1.0,
            noise_multiplier=1.0,
            expected_batch_size=1,
        )
    opt2 = DPAggZO(
        model.parameters(),
        0.1,
        num_directions=Stagewise([1], [1, -1]),
        clip_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=1,
    )
    opt2.step(closure)
    with pytest.raises(ValueError, match=r"num_directions \(at step 1\)"):
        opt2.step(closure)


def test_resume_with_schedules_is_bit_identical():
    model, closure = _problem()
    init = copy.deepcopy(model.state_dict())

    def make(m):
        return DPAggZO(
            m.parameters(),
            0.05,
            num_directions=Stagewise([2], [2, 3]),
            clip_norm=1.0,
            noise_multiplier=1.0,
            perturbation_scale=Stagewise([3], [1e-2, 1e-3]),
            expected_batch_size=6,
            seed=4,
            noise_seed=9,
        )

    opt = make(model)
    for _ in range(5):
        opt.step(closure)
    full = [p.detach().clone() for p in model.parameters()]

    model.load_state_dict(init)
    opt = make(model)
    for _ in range(2):
        opt.step(closure)
    state = opt.state_dict()
    assert state["zoprivacy"]["scheduled"] == ["num_directions", "perturbation_scale"]
    resumed = make(model)
    resumed.load_state_dict(state)
    for _ in range(3):
        resumed.step(closure)
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), full, strict=True))
    # a user callable is not saved: resuming without it names the fix
    state["zoprivacy"]["schedules"] = {}
    constant = DPAggZO(
        model.parameters(),
        0.05,
        num_directions=2,
        clip_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=6,
    )
    with pytest.raises(ValueError, match="same schedule"):
        constant.load_state_dict(state)


def test_torch_lr_scheduler_drives_the_learning_rate():
    model, closure = _problem()
    opt = DPAggZO(
        model.parameters(),
        0.1,
        num_directions=1,
        clip_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=6,
        seed=0,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Stagewise([2], [1.0, 0.0]))
    for _ in range(2):
        opt.step(closure)
        sched.step()
    frozen = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)  # lr is 0 now: the update is skipped, hooks leave θ bit-exact
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), frozen, strict=True))


# ---------------------------------------------------------------- masks
@pytest.mark.parametrize("n", [1, 7, 8, 9, 100, 1 << 19])
def test_pack_unpack_roundtrip(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.3
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_mask(packed, (n,)), mask)


def test_magnitude_and_random_masks():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(40, 50, generator=g)
    big = MagnitudeMask(0.1)(0, 0, p)
    small = MagnitudeMask(0.1, largest=False)(0, 0, p)
    assert big.sum() == 200 and small.sum() == 200
    assert p.abs()[big].min() > p.abs()[~big].max()
    assert p.abs()[small].max() < p.abs()[~small].min()
    sampled = MagnitudeMask(0.1, sample_size=500)(0, 0, p)  # threshold from a strided sample
    assert 100 < int(sampled.sum()) < 300
    r = RandomMask(0.25, seed=3, every=2)
    a, b, c = r(0, 1, p), r(1, 1, p), r(2, 1, p)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, r(0, 2, p))
    assert abs(float(a.float().mean()) - 0.25) < 0.05
    assert MagnitudeMask(1.0)(0, 0, p) is None
    with pytest.raises(ValueError):
        MagnitudeMask(0.0)


@pytest.mark.parametrize("perturbation", ["auto", "inplace"])
@pytest.mark.parametrize(
    "mask_factory",
    [lambda: MagnitudeMask(0.2), lambda: RandomMask(0.3, seed=1)],
    ids=["magnitude", "random"],
)
def test_masked_coordinates_move_and_the_others_do_not(perturbation, mask_factory):
    """The probe perturbs exactly the masked coordinates (seen inside the closure) and the update
    moves exactly those: no silent no-op through an advanced-indexing copy."""
    model, _ = _problem()
    x, y = torch.randn(6, 10), torch.randn(6, 2)
    rule = mask_factory()
    params = list(model.parameters())
    masks = [rule(0, i, p.detach()) for i, p in enumerate(params)]
    before = [p.detach().clone() for p in params]
    seen = []

    def closure():
        seen.append([(p + 0).detach().clone() for p in params])  # what this evaluation reads
        return ((model(x) - y) ** 2).sum(1)

    opt = DPAggZO(
        params,
        0.5,
        num_directions=3,
        clip_norm=10.0,
        noise_multiplier=0.5,
        expected_batch_size=6,
        seed=2,
        noise_seed=0,
        mask=rule,
        perturbation=perturbation,
        perturbation_scale=1e-2,
    )
    opt.step(closure)
    for evaluation in seen:
        for value, p0, m in zip(evaluation, before, masks, strict=True):
            moved = value != p0
            assert not moved[~m].any()  # unmasked coordinates are never perturbed
            if m.any():  # masked ones are (z = 0 has probability 0)
                assert moved[m].float().mean() > 0.9
    for p, p0, m in zip(params, before, masks, strict=True):
        assert torch.equal(p.detach()[~m], p0[~m])
        if m.any():
            assert (p.detach()[m] != p0[m]).float().mean() > 0.9
    assert sum(int(m.sum()) for m in masks) > 0
    assert opt.state_dict()["zoprivacy"]["masked"]


def test_masked_update_is_the_masked_direction_sum():
    model, closure = _problem()
    params = list(model.parameters())
    masks = magnitude_masks([p.detach() for p in params], 0.5)
    before = [p.detach().clone() for p in params]
    lr, b, seed = 0.1, 6.0, 8
    opt = DPAggZO(
        params,
        lr,
        num_directions=2,
        clip_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=b,
        seed=seed,
        noise_seed=0,
        mask=FixedMask(masks),
    )
    stats = opt.step(closure)
    for i, (p, p0, m) in enumerate(zip(params, before, masks, strict=True)):
        expected = p0.clone()
        for k in range(2):
            z = direction_tensor(p.shape, seed=seed, step=0, k=k, index=i) * m
            expected -= lr / b * float(stats.noisy_sum[k]) * z
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        DPAggZO(
            params,
            0.1,
            num_directions=1,
            clip_norm=1.0,
            noise_multiplier=1.0,
            expected_batch_size=1,
            mask=lambda t, i, p: torch.ones(3, dtype=torch.bool),
        ).step(closure)


# ---------------------------------------------------------------- checkpoints: schedules and masks
def _ckpt_opt(params, *, schedules=True, mask=None, seed=4):
    extra = {}
    if schedules:
        extra = dict(
            num_directions=Stagewise([2], [2, 3]),
            clip_norm=Stagewise([3], [1.0, 0.5]),
            perturbation_scale=Stagewise([1, 4], [1e-2, 3e-3, 1e-3]),
        )
    else:  # what make_private's resume builds: the saved current values as constants
        extra = dict(num_directions=1, clip_norm=9.0, perturbation_scale=0.5)
    return DPAggZO(
        params,
        0.05,
        noise_multiplier=0.8,
        expected_batch_size=6,
        seed=seed,
        noise_seed=9,
        mask=mask,
        **extra,
    )


@pytest.mark.parametrize(
    "mask_factory",
    [
        lambda params: MagnitudeMask(0.3),
        lambda params: RandomMask(0.4, seed=4, every=2),
        lambda params: FixedMask(magnitude_masks([p.detach() for p in params], 0.5)),
    ],
    ids=["magnitude", "random", "fixed"],
)
def test_schedules_and_masks_are_restored_from_the_checkpoint_bit_identically(mask_factory):
    """A run with Stagewise schedules and a library mask, checkpointed after 2 of 6 steps and
    resumed into an optimizer built WITHOUT the schedule and mask objects (plain constants,
    mask=None), ends bit-identical to the uninterrupted run."""
    model, closure = _problem()
    init = copy.deepcopy(model.state_dict())
    params = list(model.parameters())
    rule = mask_factory(params)
    opt = _ckpt_opt(params, mask=rule)
    full_stats = [opt.step(closure) for _ in range(6)]
    full = [p.detach().clone() for p in params]

    model.load_state_dict(init)
    opt = _ckpt_opt(params, mask=copy.deepcopy(rule))
    for _ in range(2):
        opt.step(closure)
    state = copy.deepcopy(opt.state_dict())
    zo = state["zoprivacy"]
    assert set(zo["schedules"]) == {"num_directions", "clip_norm", "perturbation_scale"}
    assert zo["mask"]["type"] == type(rule).__name__
    buffer = io.BytesIO()
    torch.save(state, buffer)  # what a checkpoint file holds
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    resumed = _ckpt_opt(params, schedules=False, mask=None)
    resumed.load_state_dict(state)
    assert resumed.scheduled == ("num_directions", "clip_norm", "perturbation_scale")
    assert resumed.num_directions == 3 and resumed.clip_norm == 1.0
    stats = [resumed.step(closure) for _ in range(4)]
    assert all(torch.equal(p, f) for p, f in zip(params, full, strict=True))
    for s, ref in zip(stats, full_stats[2:], strict=True):
        assert torch.equal(s.noisy_sum, ref.noisy_sum)
        assert (s.num_directions, s.clip_norm, s.perturbation_scale) == (
            ref.num_directions,
            ref.clip_norm,
            ref.perturbation_scale,
        )
    assert [s.num_directions for s in full_stats] == [2, 2, 3, 3, 3, 3]
    # built with the same objects: accepted (equal, not identical)
    again = _ckpt_opt(params, mask=copy.deepcopy(rule))
    again.load_state_dict(state)
    assert again.state_dict()["zoprivacy"]["mask"]["type"] == type(rule).__name__


def test_a_resume_with_another_schedule_or_mask_raises():
    model, closure = _problem()
    params = list(model.parameters())
    opt = _ckpt_opt(params, mask=MagnitudeMask(0.3))
    opt.step(closure)
    state = opt.state_dict()

    other = DPAggZO(
        params,
        0.05,
        num_directions=Stagewise([3], [2, 3]),  # another boundary: another trajectory
        clip_norm=Stagewise([3], [1.0, 0.5]),
        perturbation_scale=Stagewise([1, 4], [1e-2, 3e-3, 1e-3]),
        noise_multiplier=0.8,
        expected_batch_size=6,
        mask=MagnitudeMask(0.3),
    )
    before = other.state_dict()["zoprivacy"]
    with pytest.raises(ValueError, match=r"num_directions schedule is Stagewise\(\[2\]"):
        other.load_state_dict(state)
    assert other.state_dict()["zoprivacy"] == before  # nothing changed
    with pytest.raises(ValueError, match="mask is MagnitudeMask"):
        _ckpt_opt(params, mask=MagnitudeMask(0.5)).load_state_dict(state)
    with pytest.raises(ValueError, match="mask is MagnitudeMask"):
        _ckpt_opt(params, mask=RandomMask(0.3, seed=0)).load_state_dict(state)
    with pytest.raises(ValueError, match="without a mask"):
        unmasked = _ckpt_opt(params)
        unmasked.step(closure)
        _ckpt_opt(params, mask=MagnitudeMask(0.3)).load_state_dict(unmasked.state_dict())
    # constant when saved, a schedule now: refused
    constant = _ckpt_opt(params, schedules=False)
    with pytest.raises(ValueError, match="constant"):
        _ckpt_opt(params).load_state_dict(constant.state_dict())
    # a user callable is checked against the value saved for the current step
    custom = DPAggZO(
        params,
        0.05,
        num_directions=lambda t: 2,
        clip_norm=1.0,
        noise_multiplier=0.8,
        expected_batch_size=6,
    )
    custom.step(closure)
    state = custom.state_dict()
    assert state["zoprivacy"]["schedules"] == {}
    wrong = DPAggZO(
        params,
        0.05,
        num_directions=lambda t: 5,
        clip_norm=1.0,
        noise_multiplier=0.8,
        expected_batch_size=6,
    )
    with pytest.raises(ValueError, match="gives 5 at step 1"):
        wrong.load_state_dict(state)


def test_library_schedules_and_masks_serialise_to_equal_objects():
    from zoprivacy.optim.masks import mask_from_state_dict
    from zoprivacy.optim.schedules import schedule_from_state_dict

    s = Stagewise([3, 9], [1e-2, 3e-3, 1e-3])
    assert schedule_from_state_dict(s.state_dict()) == s
    assert Stagewise.from_state_dict(s.state_dict()) == s
    with pytest.raises(ValueError, match="same callable"):
        schedule_from_state_dict({"type": "Cosine"})
    p = torch.randn(7, 9)
    for m in (MagnitudeMask(0.2, largest=False), RandomMask(0.3, seed=5, every=3)):
        back = mask_from_state_dict(m.state_dict())
        assert back == m and torch.equal(back(4, 1, p), m(4, 1, p))
    assert MagnitudeMask(0.2) != MagnitudeMask(0.3) and RandomMask(0.3, seed=1) != RandomMask(
        0.3, seed=2
    )
    fixed = FixedMask([p > 0, None, torch.zeros(5, dtype=torch.bool)])
    back = mask_from_state_dict(fixed.state_dict())
    assert back == fixed and back.digest == fixed.digest
    assert torch.equal(back(0, 0, p), p > 0) and back(0, 1, p) is None
    assert FixedMask([p < 0]) != fixed and FixedMask([p < 0]).digest != fixed.digest
    with pytest.raises(ValueError, match="same mask callable"):
        mask_from_state_dict({"type": "TopK"})


def test_random_mask_streams_are_independent_of_the_direction_seeds():
    """RandomMask(seed=s) with the optimizer's own seed s: mask (t, index=j) must not reuse the
    seed of direction (t, k=j, tensor 0)."""
    from zoprivacy.optim.directions import tensor_seeds

    mask = RandomMask(0.5, seed=11)
    p = torch.empty(64)
    seed_dir = tensor_seeds(11, 0, 1, 1)[0]
    gen = torch.Generator().manual_seed(seed_dir)
    same_seed = torch.empty(64, dtype=torch.bool).bernoulli_(0.5, generator=gen)
    assert not torch.equal(mask(0, 1, p), same_seed)


def test_public_names_are_re_exported_from_the_package():
    import zoprivacy
    from zoprivacy import (  # noqa: F401  (the import itself is the test)
        FixedMask,
        LabelWordHead,
        MagnitudeMask,
        PrefixCache,
        RandomMask,
        Stagewise,
        schedule_epsilon,
    )
    from zoprivacy.optim import masks, schedules
    from zoprivacy.tasks import prefix

    for name in (
        "PrefixCache",
        "LabelWordHead",
        "Stagewise",
        "schedule_epsilon",
        "MagnitudeMask",
        "RandomMask",
        "FixedMask",
    ):
        assert name in zoprivacy.__all__, name
    assert zoprivacy.Stagewise is schedules.Stagewise
    assert zoprivacy.schedule_epsilon is schedules.schedule_epsilon
    assert zoprivacy.PrefixCache is prefix.PrefixCache
    assert zoprivacy.LabelWordHead is prefix.LabelWordHead
    assert (zoprivacy.MagnitudeMask, zoprivacy.RandomMask, zoprivacy.FixedMask) == (
        masks.MagnitudeMask,
        masks.RandomMask,
        masks.FixedMask,
    )
    assert all(hasattr(zoprivacy, name) for name in zoprivacy.__all__)


def test_make_private_passes_the_options_and_resumes_them_from_its_checkpoint(tmp_path):
    """make_private with Stagewise K/c/φ, a mask and the speed options; a checkpoint after 2 of
    5 steps resumed by make_private WITHOUT the schedules or the mask ends bit-identical."""
    from zoprivacy import make_private

    torch.manual_seed(0)
    x = torch.randn(40, 10)
    data = torch.utils.data.TensorDataset(x, x[:, :2].sum(1))
    init = copy.deepcopy(_problem()[0].state_dict())
    options = dict(
        num_directions=Stagewise([2], [3, 2]),
        clip_norm=Stagewise([3], [1.0, 0.5]),
        perturbation_scale=Stagewise([1], [1e-2, 1e-3]),
        mask=RandomMask(0.5, seed=3),
        directions="rademacher",
        difference="forward",
        perturbation="hooks",
    )
    common = dict(
        target_epsilon=8.0, target_delta=1e-5, steps=5, lr=0.05, sample_rate=0.3,
        noise_seed=5, seed=2, sampling_generator=6,
        size_fraction=0.0,  # n public: b = q·n is the same in every run (no random ñ)
    )  # fmt: skip

    def run(model, training, steps):
        out = []
        for batch, _ in zip(training.loader, range(steps), strict=False):
            xb, yb = batch if isinstance(batch, list | tuple) else (None, None)

            def closure(xb=xb, yb=yb):
                if xb is None:
                    return torch.zeros(0)
                return (model(xb).sum(1) - yb) ** 2

            out.append(training.optimizer.step(closure))
        return out

    model = _problem()[0]
    model.load_state_dict(init)
    full = make_private(model, data, **common, **options)
    assert (full.optimizer.directions, full.optimizer.difference) == ("rademacher", "forward")
    assert full.optimizer.perturbation == "hooks" and full.optimizer.scheduled == (
        "num_directions",
        "clip_norm",
        "perturbation_scale",
    )
    stats = run(model, full, 5)
    assert [s.num_directions for s in stats] == [3, 3, 2, 2, 2]
    assert all(s.directions == "rademacher" and s.difference == "forward" for s in stats)
    final = [p.detach().clone() for p in model.parameters()]

    model.load_state_dict(init)
    first = make_private(model, data, **common, **options)
    run(model, first, 2)
    state = first.save(tmp_path / "checkpoint.pt")  # starts the run's journal beside it
    model.load_state_dict(init)  # the checkpoint restores the parameters
    resumed = make_private(model, data, **common, num_directions=1, clip_norm=1.0, checkpoint=state)
    assert resumed.optimizer.scheduled == ("num_directions", "clip_norm", "perturbation_scale")
    assert resumed.optimizer._mask == RandomMask(0.5, seed=3)
    tail = run(model, resumed, 3)
    assert [s.num_directions for s in tail] == [2, 2, 2]
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), final, strict=True))
    # passing another mask or schedule on resume is refused
    with pytest.raises(ValueError, match="mask is RandomMask"):
        make_private(
            model, data, **common, num_directions=1, clip_norm=1.0, checkpoint=state,
            mask=RandomMask(0.5, seed=4),
        )  # fmt: skip
    with pytest.raises(ValueError, match="clip_norm schedule"):
        make_private(
            model, data, **common, num_directions=1, clip_norm=Stagewise([2], [1.0, 0.5]),
            checkpoint=state,
        )  # fmt: skip
