"""Smoke tests of the memory, step-time and audit benchmarks: their ``--quick`` modes (tiny models).

Each writes its JSON and PNG into a temporary folder (``--out``), never into
``benchmarks/results``; the memory benchmark still runs every configuration in its own
subprocess, as the full run does.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import audit, memory_vs_k, step_time
from benchmarks._common import RESULTS

ROW_KEYS = {
    "method",
    "K",
    "peak_rss_mib",
    "extra_step_mib",
    "model_params",
    "batch",
    "seq_len",
    "seconds_per_step",
    "torch_peak_step_mib",
    "rss_method",
}


def _no_quick_files_in_results() -> None:
    for name in ("memory_vs_k_quick.json", "step_time_quick.json", "audit_quick.json"):
        assert not (RESULTS / name).exists(), f"a quick run wrote {name} into benchmarks/results"


def test_memory_vs_k_quick(tmp_path):
    memory_vs_k.main(["--quick", "--out", str(tmp_path), "--profile-max-k", "1"])
    payload = json.loads((tmp_path / "memory_vs_k_quick.json").read_text())
    assert (tmp_path / "memory_vs_k_quick.png").stat().st_size > 0
    assert {"machine", "config", "rows", "ratios"} <= payload.keys()
    rows = payload["rows"]
    assert [(r["method"], r["K"]) for r in rows] == [
        ("inference", None),
        ("dpaggzo", 1),
        ("dpaggzo", 4),
        ("dpadamw", None),
    ]
    for row in rows:
        assert ROW_KEYS <= row.keys()
        assert row["peak_rss_mib"] > 0 and row["seconds_per_step"] > 0
        assert row["peak_rss_mib"] >= row["extra_step_mib"]
        assert row["model_params"] == 32 * 64 + 64 + 64 * 2 + 2
        assert row["batch"] == 4
    assert rows[1]["torch_peak_step_mib"] is not None  # K = 1 is profiled ...
    assert rows[2]["torch_peak_step_mib"] is None  # ... K = 4 is not (--profile-max-k 1)
    ratios = payload["ratios"]
    assert set(ratios["dpadamw_over_dpaggzo_extra"]) == {"1", "4"}
    assert ratios["dpaggzo_extra_max_over_min"] >= 1.0
    # the allocator control, merged into the same file
    memory_vs_k.main(["--quick", "--out", str(tmp_path), "--control-only", "--control-ks", "1"])
    merged = json.loads((tmp_path / "memory_vs_k_quick.json").read_text())
    control = [r for r in merged["rows"] if r["method"] == memory_vs_k.CONTROL]
    assert [r["K"] for r in control] == [1] and len(merged["rows"]) == len(rows) + 1
    assert control[0]["malloc_mmap_threshold"] == "65536"
    assert set(merged["ratios"]["control_mmap64k_extra_mib"]) == {"1"}
    _no_quick_files_in_results()


def test_step_time_quick(tmp_path):
    step_time.main(["--quick", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "step_time_quick.json").read_text())
    assert (tmp_path / "step_time_quick.png").stat().st_size > 0
    assert {"machine", "config", "forward_seconds", "rows", "ratios"} <= set(payload)
    assert payload["forward_seconds"] > 0
    assert [r["K"] for r in payload["rows"]] == [1, 4]
    for row in payload["rows"]:
        for key in (
            "dpaggzo_seconds",
            "paper_seconds",
            "floor_seconds",
            "dpaggzo_over_floor",
            "paper_over_floor",
            "speedup_vs_paper",
        ):
            assert row[key] > 0, key
        assert {"generate_direction", "add", "paper_generate_direction", "paper_add"} <= set(
            row["components"]
        )
        fractions = row["breakdown"]["fraction"]
        assert {"forward", "generate", "add", "clip_noise", "other"} <= fractions.keys()
        assert sum(fractions[k] for k in ("forward", "generate", "add", "clip_noise", "other")) == (
            pytest.approx(1.0)
        )
    assert set(payload["ratios"]["speedup_vs_paper"]) == {"1", "4"}
    _no_quick_files_in_results()


@pytest.mark.parametrize(
    "directions, difference",
    [("gaussian", "central"), ("rademacher", "central"), ("gaussian", "forward")],
)
def test_paper_style_loop_restores_parameters_and_releases_k_values(directions, difference):
    """With lr = 0 the paper-style loop only perturbs and restores (up to rounding), and leaves
    the global torch RNG where it was."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(5, 8), torch.randn(5, 3)
    opt = step_time.PaperStyleDPAggZO(
        list(model.parameters()),
        0.0,
        num_directions=3,
        clip_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=5,
        directions=directions,
        difference=difference,
    )
    rng = torch.get_rng_state()
    released = opt.step(lambda: ((model(x) - y) ** 2).sum(1))
    assert released.shape == (3,) and released.dtype == torch.float64
    assert torch.equal(torch.get_rng_state(), rng)
    for p, q in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=0)


def test_clip_and_noise_bounds_each_record():
    """Without noise, each record contributes at most c: the released sum has norm <= |B|·c."""
    gen = torch.Generator().manual_seed(0)
    agg = torch.randn(6, 4, dtype=torch.float64) * 100
    released = step_time.clip_and_noise(agg, 0.5, 0.0, gen)
    assert torch.linalg.vector_norm(released) <= 6 * 0.5 + 1e-12
    small = torch.full((2, 4), 1e-3, dtype=torch.float64)
    torch.testing.assert_close(step_time.clip_and_noise(small, 0.5, 0.0, gen), small.sum(0))


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact ε of a μ-GDP Gaussian mechanism at δ (Balle & Wang 2018, Thm. 8), by root
    finding on δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def excess(eps: float) -> float:
        return norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu) - delta

    return brentq(excess, 0.0, 100.0, xtol=1e-12)


def test_audit_quick(tmp_path):
    """The canary audit's quick plan: every configured row is there, the q = 1 tight reference
    is the exact Gaussian ε (computed here with scipy), never above the accountant's claim (RDP
    is an upper bound), q < 1 rows use the subsampled reference, and the float rows say so."""
    path = audit.main(["--quick", "--out", str(tmp_path)])
    payload = json.loads(path.read_text())
    assert path == tmp_path / "audit_quick.json"
    assert (tmp_path / "audit_quick.png").stat().st_size > 0
    plan = audit.QUICK
    gaussian, subsampled = payload["gaussian"], payload["subsampled"]
    assert {(r["num_directions"], r["noise_multiplier"]) for r in gaussian} == {
        (k, s) for k, s, _ in plan["configs"]
    }
    assert {(r["sample_rate"], r["noise_multiplier"], r["num_directions"]) for r in subsampled} == {
        (q, s, k) for q, s, k, _ in plan["subsampled_configs"]
    }
    for row in gaussian:
        assert row["sample_rate"] == 1.0 and row["tight_reference"] == "gaussian"
        expected = _gaussian_epsilon(1 / row["noise_multiplier"], row["delta"])
        assert row["epsilon_tight"] == pytest.approx(expected, rel=1e-6)
    for row in gaussian + subsampled:
        assert 0 < row["epsilon_tight"] <= row["epsilon_claimed"], row
        assert row["noise_multiplier_upper"] > 0
    for row in subsampled:
        assert row["sample_rate"] < 1 and row["tight_reference"] == "subsampled_gaussian"
        # subsampling amplifies: below the q = 1 mechanism's exact ε at the same σ and δ
        assert row["epsilon_tight"] < _gaussian_epsilon(1 / row["noise_multiplier"], row["delta"])
    assert {r["K"] for r in payload["noise_cost"]} == set(plan["noise_k"])
    assert any("float" in r["implementation"] for r in payload["float"])
    _no_quick_files_in_results()
