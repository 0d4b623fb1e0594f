"""benchmarks/quality.py: time to target, the per-budget summary, a tiny lock-step run, and the
dashboard section built from several invocations."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import dashboard, quality


def _curve(points):
    return [{"step": s, "seconds": t, "fvu": f} for s, t, f in points]


def _cfg(points):
    curve = _curve(points)
    return {"curve": curve, "final": curve[-1]}


def test_time_to_target_interpolates_and_reports_never():
    curve = _curve([(10, 1.0, 0.5), (20, 2.0, 0.3), (30, 4.0, 0.1)])
    assert quality.time_to_target(curve, 0.6) == 1.0  # already there at the first evaluation
    assert quality.time_to_target(curve, 0.4) == pytest.approx(1.5)
    assert quality.time_to_target(curve, 0.2) == pytest.approx(3.0)
    assert quality.time_to_target(curve, 0.05) is None


def test_time_to_quality_takes_each_anchors_better_precision():
    configs = {
        "fastsae-topk": _cfg([(10, 1.0, 0.30), (20, 2.0, 0.10)]),
        "fastsae-topk-bf16": _cfg([(10, 0.5, 0.30), (20, 1.0, 0.10)]),
        "sparsify": _cfg([(10, 3.0, 0.40), (20, 8.0, 0.20)]),  # better than its bf16 run
        "sparsify-bf16": _cfg([(10, 2.0, 0.40), (20, 4.0, 0.25)]),
        "sae_lens": _cfg([(10, 5.0, 0.30), (20, 9.0, 0.16)]),
        "sae_lens-bf16": _cfg([(10, 4.0, 0.30), (20, 8.0, 0.15)]),  # better than its fp32 run
    }
    tq = quality.time_to_quality(configs)
    assert tq["best_anchor_configs"] == {"sparsify": "sparsify", "sae_lens": "sae_lens-bf16"}
    assert tq["target_fvu"] == 0.20  # the worse of the two best configurations
    # sae_lens-bf16 reaches 0.20 at 4 + 4 * (0.10 / 0.15) s; sparsify only at its last point (8 s)
    best = 4.0 + 4.0 * (0.10 / 0.15)
    assert tq["time_to_target_s"]["sae_lens-bf16"] == pytest.approx(best)
    assert tq["time_to_target_s"]["fastsae-topk"] == pytest.approx(1.5)
    assert tq["speedup_vs_best_anchor"] == pytest.approx(best / 1.5)
    assert tq["speedup_bf16_vs_best_anchor"] == pytest.approx(best / 0.75)
    assert quality.time_to_quality({"fastsae-topk": configs["fastsae-topk"]}) is None


def test_summarize_gives_every_budget_its_own_target():
    short = {
        "fastsae-topk": _cfg([(10, 1.0, 0.30)]),
        "sparsify": _cfg([(10, 2.0, 0.50)]),
    }
    long = {
        "fastsae-topk": _cfg([(10, 1.0, 0.30), (50, 5.0, 0.10)]),
        "sparsify": _cfg([(10, 2.0, 0.50), (50, 10.0, 0.20)]),
    }
    results = [
        {"source": "s", "d_sae": 64, "steps": 10, "configs": short},
        {"source": "s", "d_sae": 64, "steps": 50, "configs": long},
    ]
    summ = quality.summarize(results)["s/64"]
    assert summ["target_fvu"] == 0.20  # the headline: the longest budget
    assert summ["speedup_vs_best_anchor"] == pytest.approx(10.0 / 3.0)  # fastsae at 0.20: 3 s
    assert summ["per_budget"][10]["target_fvu"] == 0.50
    assert summ["per_budget"][10]["speedup_vs_best_anchor"] == pytest.approx(2.0 / 1.0)
    assert summ["per_budget"][50]["best_anchor_fvu"] == 0.20
    assert summ["per_budget"][50]["fastsae_topk_fvu"] == 0.10


def test_run_budget_trains_in_lock_step_on_identical_batches(monkeypatch):
    # the benchmark's CPU path (auto -> torch), not the Triton interpreter tests/conftest.py enables
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    d, n = 16, 64
    basis = torch.randn(n, d)
    codes = torch.rand(3000, n) * (torch.rand(3000, n) < 0.06)
    data = {"train": codes[:2000] @ basis, "held_out": codes[2000:] @ basis}
    res = quality.run_budget("toy", data, n, 30, 128, ["fastsae-topk", "sparsify"], 10)
    assert res["skipped"] == {}
    assert set(res["configs"]) == {"fastsae-topk", "sparsify"}
    for name, c in res["configs"].items():
        assert [p["step"] for p in c["curve"]] == [10, 20, 30], name
        assert c["curve"][-1]["fvu"] < c["curve"][0]["fvu"], name
        assert c["final"]["seconds"] > 0
    fastsae = res["configs"]["fastsae-topk"]["final"]
    assert 0 < fastsae["l0"] <= quality.K  # top-k: at most k per held-out row
    assert 0 <= fastsae["dead_pct"] <= 100
    assert "l0" in res["configs"]["sparsify"]["final"]  # the anchors' codes are measured too


def test_dashboard_shows_the_newest_result_of_each_budget(tmp_path):
    def result(steps, fvu, anchors=True):
        configs = {"fastsae-topk": _cfg([(steps, 1.0, fvu)])}
        if anchors:
            configs["sparsify"] = _cfg([(steps, 2.0, 0.5)])
        return {
            "source": "s",
            "d_sae": 64,
            "k": 4,
            "batch_size": 8,
            "steps": steps,
            "configs": configs,
        }

    env = {"device": "cpu-test", "run_id": "r", "commit": "abc", "threads": 1}
    runs = [
        {"environment": {**env, "run_id": "old"}, "results": [result(10, 0.4), result(50, 0.3)]},
        {"environment": {**env, "run_id": "new"}, "results": [result(10, 0.2)]},
        # fastsae alone (an architecture check) does not hide the comparison with the anchors
        {"environment": {**env, "run_id": "archs"}, "results": [result(10, 0.25, anchors=False)]},
    ]
    picked = dashboard.newest_quality_results(runs)
    assert [(r["environment"]["run_id"], res["steps"]) for r, res in picked] == [
        ("new", 10),
        ("old", 50),
        ("archs", 10),
    ]
    (tmp_path / "quality-cpu-test.json").write_text(json.dumps({"runs": runs}))
    out = tmp_path / "site"
    out.mkdir()
    html = "".join(dashboard.quality_section(out, tmp_path))
    assert "0.2000" in html and "0.3000" in html and "0.2500" in html and "0.4000" not in html
    assert "2.00x" in html  # 2 s for sparsify against 1 s for fastsae, at the 10-step budget
    for png in ("quality-s-64-10.png", "quality-s-64-50.png", "quality-s-64-10-archs.png"):
        assert (out / png).exists(), png


def test_fastsae_runs_leave_the_anchors_glibc_defaults(monkeypatch):
    """keep_freed_memory is process-wide and the anchors share the process: the benchmark's
    fastsae trainers must not turn it on (the anchors' users run with glibc's defaults)."""
    from fastsae import ops

    calls = []
    monkeypatch.setattr(ops, "keep_freed_memory", lambda: calls.append(1) or True)
    x = torch.randn(64, 16)
    runner = quality.fastsae_runner("fastsae-topk", x, 64, 3, "topk", backend="torch")
    runner.step()
    assert calls == []
