"""The harness's bookkeeping on trivial providers: statuses, ratios, the schema, memory helpers
and the roofline arithmetic. Nothing here asserts on a duration."""

from __future__ import annotations

import json

import torch

from benchmarks import memory
from benchmarks.harness import Case, measure, record
from benchmarks.roofline import roofline_fraction
from benchmarks.run import format_row
from benchmarks.schema import validate_file
from tests.benchmarks.rows import ENV


def _case():
    def broken():
        raise ValueError("bad shapes")

    return Case(
        name="toy",
        mode="fwd",
        shapes={"n": 4},
        providers={"fastsae-torch": lambda: None, "floor": lambda: None, "fastsae-bad": broken},
        skipped={"fastsae-triton": "no CUDA device"},
        state={"fastsae-torch": lambda: 2**20},
        flops=1e6,
        bytes=1e6,
        baseline="floor",
        items=4,
    )


def test_statuses_ratios_and_schema(tmp_path):
    rows = measure(_case(), repeats=2, ceilings=ENV["ceilings"])
    by = {r["provider"]: r for r in rows}
    assert by["fastsae-triton"]["status"] == "skipped"
    assert by["fastsae-bad"]["status"] == "error"
    assert "ValueError: bad shapes" in by["fastsae-bad"]["reason"]
    ok = by["fastsae-torch"]
    assert ok["status"] == "ok" and ok["repeats"] == 2 and len(ok["times_s"]) == 2
    assert set(ok["speedup_vs"]) == {"floor"}  # failed providers are not compared
    assert ok["state_mb"] == 1.0
    assert by["floor"]["ratio_vs_baseline"] == 1.0
    for r in rows:
        assert format_row({**r, "suite": "smoke"})
    path = record(rows, {**{k: v for k, v in ENV.items()}}, tmp_path / "out.jsonl")
    assert validate_file(path) == []
    assert len(path.read_text().splitlines()) == 4
    assert json.loads(path.read_text().splitlines()[0])["run_id"] == ENV["run_id"]


def test_roofline_fraction():
    ceilings = {"peak_flops": 100.0, "peak_bytes_per_s": 10.0}
    assert roofline_fraction(200.0, 10.0, 4.0, ceilings) == (0.5, "compute")
    assert roofline_fraction(100.0, 40.0, 8.0, ceilings) == (0.5, "memory")
    assert roofline_fraction(0.0, 0.0, 1.0, ceilings) == (None, None)
    assert roofline_fraction(1.0, 1.0, 1.0, None) == (None, None)


def test_owned_bytes_counts_shared_storage_once():
    lin = torch.nn.Linear(8, 4)
    opt = torch.optim.Adam(lin.parameters())
    lin(torch.randn(2, 8)).sum().backward()
    opt.step()
    params = 8 * 4 + 4
    # parameters, gradients, two moments; the step counters are 0-d tensors (4 bytes each)
    expected = 4 * params * 4 + 2 * 4
    assert memory.owned_bytes(lin, opt, lin.weight) == expected
    view = lin.weight.detach()[:2]
    assert memory.owned_bytes(lin.weight.detach(), view) == 4 * 32


def test_measure_call_reports_growth():
    result = memory.measure_call(lambda: torch.ones(2**22).sum())  # 16 MiB
    if result is None:
        return  # no /proc/self/clear_refs here
    assert result.kind in ("rss", "cuda") and result.peak >= result.delta >= 0


def test_run_suite_measures_only_the_chosen_providers_and_the_baseline(monkeypatch):
    from benchmarks import run

    monkeypatch.setattr(run, "cases", lambda suite, only, override: [("toy", _case)])
    monkeypatch.setattr(
        run, "measure_ceilings", lambda: {"peak_flops": 1e9, "peak_bytes_per_s": 1e9}
    )
    _, rows = run.run_suite("smoke", repeats=1, echo=lambda _: None, providers=["fastsae-torch"])
    assert sorted(r["provider"] for r in rows) == ["fastsae-torch", "floor"]
    _, rows = run.run_suite("smoke", repeats=1, echo=lambda _: None)
    assert sorted(r["provider"] for r in rows) == [
        "fastsae-bad",
        "fastsae-torch",
        "fastsae-triton",
        "floor",
    ]


def test_an_explicit_repeat_count_overrides_a_heavy_case_own(monkeypatch):
    import dataclasses

    from benchmarks import run

    heavy = lambda: dataclasses.replace(_case(), repeats=4)  # noqa: E731
    monkeypatch.setattr(run, "cases", lambda suite, only, override: [("toy", heavy)])
    monkeypatch.setattr(
        run, "measure_ceilings", lambda: {"peak_flops": 1e9, "peak_bytes_per_s": 1e9}
    )
    _, rows = run.run_suite("smoke", echo=lambda _: None, providers=["fastsae-torch"])
    assert {r["repeats"] for r in rows} == {4}  # the case's own count
    _, rows = run.run_suite("smoke", repeats=2, echo=lambda _: None, providers=["fastsae-torch"])
    assert {r["repeats"] for r in rows} == {2}
