"""``python -m benchmarks.compare [--device D] [--threshold 0.10] [--window 5] [FILES...]``.

Compares the newest run with the earlier runs on the same device, using only *same-run ratios*:
each fastsae provider's time relative to every non-fastsae provider (the floors, the dense
references, the competitors) measured beside it in the same run. Absolute times on a shared
machine are noise; a ratio to a neighbour measured seconds apart is not.

The reference for a ratio is the median over the last ``--window`` earlier runs that measured the
same case, shapes, provider pair and thread count. A ratio that grew by more than
``--threshold`` (10%) is a regression; a fastsae memory footprint that grew by more than the
threshold (and by more than 1 MB) is flagged too. Providers that failed in the newest run are
listed. The exit status is 0 unless ``--fail-on-regression`` is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS

MEMORY_SLACK_MB = 1.0


@dataclass
class Finding:
    kind: str  # "regression", "improvement", "memory", "error", "new"
    case: str
    shapes: dict[str, int]
    provider: str
    other: str | None
    current: float | None
    reference: float | None

    @property
    def change(self) -> float | None:
        if self.current is None or not self.reference:
            return None
        return self.current / self.reference - 1

    def describe(self) -> str:
        shapes = ",".join(f"{k}={v}" for k, v in self.shapes.items())
        what = f"{self.case}[{shapes}] {self.provider}"
        if self.kind == "error":
            return f"ERROR       {what}: failed in the newest run"
        if self.kind == "memory":
            return (
                f"MEMORY      {what}: {self.current:.1f} MB vs {self.reference:.1f} MB "
                f"({self.change:+.1%})"
            )
        label = {"regression": "REGRESSION", "improvement": "improvement", "new": "new"}[self.kind]
        if self.reference is None:
            return f"{label:11s} {what} vs {self.other}: {self.current:.3f}x (no earlier run)"
        return (
            f"{label:11s} {what} vs {self.other}: {self.current:.3f}x of its time, was "
            f"{self.reference:.3f}x ({self.change:+.1%})"
        )


def load(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every result line of ``paths`` (JSON lines; blank lines skipped)."""
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def default_files() -> list[Path]:
    return sorted(RESULTS.glob("*.jsonl"))


def runs_by_device(rows: list[dict[str, Any]]) -> dict[str, list[list[dict[str, Any]]]]:
    """device -> its runs, oldest first; a run is the list of its rows."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        grouped[row["device"]][row.get("run_id") or row.get("time", "")].append(row)
    return {
        device: sorted(runs.values(), key=lambda run: (run[0].get("time", ""), run_id(run)))
        for device, runs in grouped.items()
    }


def run_id(run: list[dict[str, Any]]) -> str:
    return run[0].get("run_id") or run[0].get("time", "?")


def _key(row: dict[str, Any]) -> tuple:
    return (row["case"], json.dumps(row["shapes"], sort_keys=True), row.get("threads"))


def is_fastsae(provider: str) -> bool:
    return provider.startswith("fastsae")


def ratios(run: list[dict[str, Any]]) -> dict[tuple, float]:
    """(case key, fastsae provider, other provider) -> time relative to the other provider."""
    out = {}
    for row in run:
        if row.get("status", "ok") != "ok" or not is_fastsae(row["provider"]):
            continue
        for other, speedup in (row.get("speedup_vs") or {}).items():
            if not is_fastsae(other) and speedup:
                out[(_key(row), row["provider"], other)] = 1.0 / speedup
    return out


def memories(run: list[dict[str, Any]]) -> dict[tuple, float]:
    return {
        (_key(r), r["provider"]): r["memory_mb"]
        for r in run
        if r.get("status", "ok") == "ok" and is_fastsae(r["provider"]) and r.get("memory_mb")
    }


def compare_runs(
    runs: list[list[dict[str, Any]]], threshold: float = 0.10, window: int = 5
) -> list[Finding]:
    """Findings for the newest of ``runs`` (oldest first) against up to ``window`` earlier."""
    if not runs:
        return []
    newest, earlier = runs[-1], runs[:-1]
    history: dict[tuple, list[float]] = defaultdict(list)
    mem_history: dict[tuple, list[float]] = defaultdict(list)
    for run in earlier:
        for key, value in ratios(run).items():
            history[key].append(value)
        for key, value in memories(run).items():
            mem_history[key].append(value)
    shapes_of = {_key(r): r["shapes"] for r in newest}
    findings = []
    for row in newest:
        if row.get("status") == "error":
            findings.append(
                Finding("error", row["case"], row["shapes"], row["provider"], None, None, None)
            )
    for (key, provider, other), current in sorted(ratios(newest).items(), key=str):
        past = history.get((key, provider, other), [])[-window:]
        reference = statistics.median(past) if past else None
        finding = Finding("new", key[0], shapes_of[key], provider, other, current, reference)
        if reference is None:
            findings.append(finding)
        elif finding.change > threshold:
            finding.kind = "regression"
            findings.append(finding)
        elif finding.change < -threshold:
            finding.kind = "improvement"
            findings.append(finding)
    for (key, provider), current in sorted(memories(newest).items(), key=str):
        past = mem_history.get((key, provider), [])[-window:]
        if not past:
            continue
        reference = statistics.median(past)
        if current > reference * (1 + threshold) and current - reference > MEMORY_SLACK_MB:
            findings.append(
                Finding("memory", key[0], shapes_of[key], provider, None, current, reference)
            )
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__)
    parser.add_argument("files", nargs="*", type=Path, help="default: benchmarks/results/*.jsonl")
    parser.add_argument("--device", help="only this device (default: every device)")
    parser.add_argument("--threshold", type=float, default=0.10)
    parser.add_argument("--window", type=int, default=5, help="earlier runs in the reference")
    parser.add_argument("--fail-on-regression", action="store_true")
    args = parser.parse_args(argv)
    files = args.files or default_files()
    if not files:
        print("no results yet: run python -m benchmarks.run first")
        return 0
    regressions = 0
    for device, runs in sorted(runs_by_device(load(files)).items()):
        if args.device and device != args.device:
            continue
        newest = runs[-1][0]
        print(
            f"== {device}: run {run_id(runs[-1])} ({newest.get('commit', '')[:10]}"
            f"{'+dirty' if newest.get('dirty') else ''}) against {min(len(runs) - 1, args.window)}"
            f" earlier run(s)"
        )
        findings = compare_runs(runs, args.threshold, args.window)
        for finding in findings:
            print("  " + finding.describe())
        flagged = [f for f in findings if f.kind in ("regression", "memory", "error")]
        regressions += len(flagged)
        if not flagged:
            print(f"  no regression over {args.threshold:.0%}")
    return 1 if regressions and args.fail_on_regression else 0


if __name__ == "__main__":
    raise SystemExit(main())
