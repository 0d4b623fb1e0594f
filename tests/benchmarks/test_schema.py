"""The result-line schema accepts what the harness writes and names what is wrong otherwise."""

from __future__ import annotations

import json

import pytest

from benchmarks.schema import validate_lines, validate_row
from tests.benchmarks.rows import row, run


def test_valid_rows_pass():
    rows = run(
        {"fastsae-torch": 0.01, "floor": 0.008},
        "r1",
        "2026-01-01T00:00:00Z",
        skipped={"fastsae-triton": "no CUDA device"},
        errors={"sparsify": "boom"},
    )
    for r in rows:
        assert validate_row(r) == [], r["provider"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"status": "fine"}, "status: 'fine'"),
        ({"mode": "sideways"}, "mode: 'sideways'"),
        ({"median_s": None}, "median_s: null for a timed result"),
        ({"median_s": "fast"}, "median_s: str"),
        ({"median_s": float("nan")}, "median_s: nan is not finite"),
        ({"min_s": 1.0}, "need 0 < min_s <= median_s <= max_s"),
        ({"times_s": [0.01]}, "times_s: 1 numbers for repeats=3"),
        ({"dirty": "no"}, "dirty: str"),
        ({"threads": True}, "threads: bool"),
        ({"shapes": {"B": 2.5}}, "shapes: 'B'=2.5"),
        ({"speedup_vs": {"x": -1}}, "speedup_vs['x']"),
        ({"ceilings": {"peak_flops": 0}}, "ceilings.peak_flops"),
        ({"bound": "io"}, "bound: 'io'"),
        ({"schema": 99}, "schema: 99"),
    ],
)
def test_violations_are_named(change, message):
    errors = validate_row(row(**change))
    assert any(message in e for e in errors), errors


def test_missing_field_and_silent_skip():
    r = row()
    del r["run_id"]
    assert "run_id: missing" in validate_row(r)
    skipped = row(status="skipped", reason="", median_s=None)
    assert any("must say why" in e for e in validate_row(skipped))


def test_lines_report_line_numbers():
    good = json.dumps(row())
    problems = validate_lines([good, "", "{not json", json.dumps(row(status="?"))])
    assert sorted({n for n, _ in problems}) == [3, 4]
    assert validate_lines([good]) == []
    assert validate_row([1, 2]) == ["a result is a JSON object, not list"]
