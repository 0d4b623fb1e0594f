"""Regression detection on synthetic runs: same-run ratios only, 10% threshold."""

from __future__ import annotations

import json

from benchmarks import compare
from tests.benchmarks.rows import run


def _runs(*medians_per_run, **kwargs):
    return [
        run(m, f"2026010{i}T000000Z-r{i}", f"2026-01-0{i}T00:00:00Z", **kwargs)
        for i, m in enumerate(medians_per_run, 1)
    ]


def _kinds(findings):
    return sorted((f.kind, f.provider, f.other) for f in findings if f.kind != "new")


def test_a_ratio_that_grew_over_the_threshold_is_a_regression():
    # absolute times halve (a faster machine), but fastsae's time relative to the floor grows 20%
    runs = _runs({"fastsae-torch": 1.0, "floor": 1.0}, {"fastsae-torch": 0.6, "floor": 0.5})
    findings = compare.compare_runs(runs)
    assert _kinds(findings) == [("regression", "fastsae-torch", "floor")]
    (f,) = [f for f in findings if f.kind == "regression"]
    assert abs(f.change - 0.2) < 1e-9
    assert "REGRESSION" in f.describe()


def test_noise_below_the_threshold_and_absolute_slowdowns_are_not_flagged():
    runs = _runs({"fastsae-torch": 1.0, "floor": 1.0}, {"fastsae-torch": 2.1, "floor": 2.0})
    assert _kinds(compare.compare_runs(runs)) == []


def test_improvement_and_reference_is_median_of_window():
    runs = _runs(
        {"fastsae-torch": 9.0, "floor": 1.0},  # outside the window of 3
        {"fastsae-torch": 1.0, "floor": 1.0},
        {"fastsae-torch": 1.1, "floor": 1.0},
        {"fastsae-torch": 5.0, "floor": 1.0},
        {"fastsae-torch": 0.8, "floor": 1.0},
    )
    findings = compare.compare_runs(runs, window=3)
    (f,) = [f for f in findings if f.kind != "new"]
    assert f.kind == "improvement" and f.reference == 1.1


def test_only_fastsae_against_others_is_compared():
    # sparsify got slower relative to the floor: not ours, not flagged
    runs = _runs(
        {"fastsae-torch": 1.0, "sparsify": 2.0, "floor": 1.0},
        {"fastsae-torch": 1.0, "sparsify": 4.0, "floor": 1.0},
    )
    kinds = _kinds(compare.compare_runs(runs))
    assert kinds == [("improvement", "fastsae-torch", "sparsify")]


def test_errors_memory_and_thread_counts():
    first = run(
        {"fastsae-torch": 1.0, "floor": 1.0},
        "r1",
        "2026-01-01T00:00:00Z",
        memory={"fastsae-torch": 100.0},
    )
    second = run(
        {"fastsae-torch": 1.0, "floor": 1.0},
        "r2",
        "2026-01-02T00:00:00Z",
        memory={"fastsae-torch": 150.0},
        errors={"fastsae-triton": "RuntimeError"},
    )
    kinds = _kinds(compare.compare_runs([first, second]))
    assert kinds == [("error", "fastsae-triton", None), ("memory", "fastsae-torch", None)]
    # a run with another thread count has no history to compare with
    other = run({"fastsae-torch": 3.0, "floor": 1.0}, "r3", "2026-01-03T00:00:00Z", threads=8)
    findings = compare.compare_runs([first, other])
    assert {f.kind for f in findings} == {"new"}


def test_main_reads_files_groups_devices_and_exit_code(tmp_path, capsys):
    rows = [
        r
        for rs in _runs({"fastsae-torch": 1.0, "floor": 1.0}, {"fastsae-torch": 1.5, "floor": 1.0})
        for r in rs
    ]
    rows += run({"fastsae-torch": 1.0, "floor": 1.0}, "g1", "2026-01-05T00:00:00Z", device="H100")
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert compare.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "== cpu-x86_64" in out and "== H100" in out and "REGRESSION" in out
    assert compare.main([str(path), "--fail-on-regression"]) == 1
    assert compare.main([str(path), "--fail-on-regression", "--device", "H100"]) == 0
