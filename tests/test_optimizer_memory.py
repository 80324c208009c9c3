"""Peak extra memory of one DP-AggZO step does not grow with K (docs/design.md, Memory).

How it is measured: ``tracemalloc`` does not see torch's allocator, and process RSS is dominated
by the interpreter and by allocator caching. Instead the step runs under
``torch.profiler.profile(profile_memory=True)``, which records one ``[memory]`` event per CPU
allocation (+bytes) and deallocation (−bytes) made by torch's allocator, whoever makes it (the
optimizer, the closure, temporaries inside kernels). Replaying the events in time order gives the
live torch bytes at every instant; its maximum is the step's peak extra memory over what was
allocated before the step. The parameters themselves already exist, so a full copy of θ or of a
z_k would show up as at least the model's size.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tests.conftest import seeded_mlp
from zoprivacy.optim.optimizer import DPAggZO

pytestmark = pytest.mark.filterwarnings("ignore::zoprivacy.noise.source.PredictableNoiseWarning")


def _peak_live_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    assert events, "the profiler recorded no allocation: the measurement would be vacuous"
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda ev: ev[0]):
        live += nbytes
        peak = max(peak, live)
    return peak


def _model(dtype=torch.float32):
    # ~3 MiB of float32 parameters, largest tensor 2 MiB (half that in bfloat16)
    return seeded_mlp(512, 1024, 256, seed=0, dtype=dtype)


def _measure(K: int, dtype: torch.dtype) -> tuple[int, int, int]:
    model = _model(dtype)
    x, y = torch.randn(4, 512, dtype=dtype), torch.randn(4, 256, dtype=dtype)
    opt = DPAggZO(
        model.parameters(),
        0.01,
        num_directions=K,
        clip_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=4,
        seed=0,
        noise_seed=0,
    )

    def closure():
        return ((model(x) - y) ** 2).sum(1)

    opt.step(closure)  # warm-up (lazy initialisation inside torch)
    peak = _peak_live_bytes(lambda: opt.step(closure))
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    return peak, max(sizes), sum(sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_memory_does_not_grow_with_k(dtype):
    """Low precision included: z is generated in the parameter's dtype, so no cast temporary."""
    peak1, largest, total = _measure(1, dtype)
    peak32, _, _ = _measure(32, dtype)
    # the one scratch buffer is there (the measurement sees real allocations) ...
    assert peak1 >= largest
    # ... and nothing else of parameter size: activations of 4 records are ~20 KiB
    assert peak1 <= largest + 256 * 1024 < total
    # K = 32 adds only K·|B| float64 loss values and a few small temporaries
    assert peak32 - peak1 <= 64 * 1024, (peak1, peak32)


def test_measurement_detects_a_full_copy():
    """The method is not blind: cloning the parameters inside a step shows up in the peak."""
    model = _model()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    kept = []
    peak = _peak_live_bytes(lambda: kept.extend(p.detach().clone() for p in model.parameters()))
    assert peak >= total
