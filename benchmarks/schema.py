"""The schema of a result line, and a validator for it (no dependency).

``python -m benchmarks.schema FILE.jsonl ...`` prints every violation and exits 1 if there is any.

A line is one JSON object: the run's environment (same for every line of a run) merged with one
result. ``status`` is ``ok`` (timed), ``skipped`` (could not run here: ``reason`` says why) or
``error`` (raised: ``reason`` holds the exception); timing and memory fields are null unless
``ok``. Fields not listed here are allowed (cases may add their own).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import MODES, SCHEMA_VERSION

STATUSES = ("ok", "skipped", "error")
NUM = (int, float)

# name -> (allowed types, may be null)
ENVIRONMENT: dict[str, tuple[tuple[type, ...], bool]] = {
    "schema": ((int,), False),
    "run_id": ((str,), False),
    "commit": ((str,), False),
    "dirty": ((bool,), False),
    "device": ((str,), False),
    "device_detail": ((str,), False),
    "threads": ((int,), False),
    "versions": ((dict,), False),
    "time": ((str,), False),
    "suite": ((str,), False),
    "ceilings": ((dict,), False),
}
RESULT: dict[str, tuple[tuple[type, ...], bool]] = {
    "case": ((str,), False),
    "mode": ((str,), False),
    "shapes": ((dict,), False),
    "provider": ((str,), False),
    "status": ((str,), False),
    "reason": ((str,), True),
    "flops": (NUM, False),
    "bytes": (NUM, False),
    "baseline": ((str,), True),
    "items": ((int,), True),
    "items_unit": ((str,), True),
    "notes": ((str,), False),
    "median_s": (NUM, True),
    "min_s": (NUM, True),
    "max_s": (NUM, True),
    "spread": (NUM, True),
    "repeats": ((int,), True),
    "warmup": ((int,), True),
    "times_s": ((list,), True),
    "gflops_per_s": (NUM, True),
    "gbytes_per_s": (NUM, True),
    "roofline_fraction": (NUM, True),
    "bound": ((str,), True),
    "items_per_s": (NUM, True),
    "peak_memory_mb": (NUM, True),
    "peak_delta_mb": (NUM, True),
    "state_mb": (NUM, True),
    "memory_mb": (NUM, True),
    "memory_kind": ((str,), True),
    "ratio_vs_baseline": (NUM, True),
    "speedup_vs": ((dict,), False),
}
FIELDS = {**ENVIRONMENT, **RESULT}
#: required (non-null) when status == "ok"
TIMED = ("median_s", "min_s", "max_s", "spread", "repeats", "warmup", "times_s")


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    # bool is an int in Python; only accept it where bool is named
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_row(row: Any) -> list[str]:
    """Every way ``row`` violates the schema (empty when it is valid)."""
    if not isinstance(row, dict):
        return [f"a result is a JSON object, not {type(row).__name__}"]
    errors = []
    for name, (types, nullable) in FIELDS.items():
        if name not in row:
            errors.append(f"{name}: missing")
            continue
        value = row[name]
        if value is None:
            if not nullable:
                errors.append(f"{name}: null")
        elif not _type_ok(value, types):
            allowed = "/".join(t.__name__ for t in types)
            errors.append(f"{name}: {type(value).__name__} {value!r:.60}, expected {allowed}")
        elif types == NUM and not _finite(value):
            errors.append(f"{name}: {value} is not finite")
    if errors:
        return errors
    if row["schema"] != SCHEMA_VERSION:
        errors.append(f"schema: {row['schema']}, expected {SCHEMA_VERSION}")
    if row["status"] not in STATUSES:
        errors.append(f"status: {row['status']!r}, allowed: {', '.join(STATUSES)}")
    if row["mode"] not in MODES:
        errors.append(f"mode: {row['mode']!r}, allowed: {', '.join(MODES)}")
    for key, value in row["shapes"].items():
        if not isinstance(key, str) or not _type_ok(value, (int,)):
            errors.append(f"shapes: {key!r}={value!r} is not a name and an integer")
    for key, value in row["speedup_vs"].items():
        if not _finite(value) or value <= 0:
            errors.append(f"speedup_vs[{key!r}]: {value!r} is not a positive number")
    for key, value in row["versions"].items():
        if value is not None and not isinstance(value, str):
            errors.append(f"versions[{key!r}]: {value!r} is not a string or null")
    for key in ("peak_flops", "peak_bytes_per_s"):
        value = row["ceilings"].get(key)
        if not _finite(value) or value <= 0:
            errors.append(f"ceilings.{key}: {value!r} is not a positive number")
    if row["status"] == "ok":
        errors += _validate_timed(row)
    elif not row["reason"]:
        errors.append(f"reason: a {row['status']} result must say why")
    return errors


def _validate_timed(row: dict[str, Any]) -> list[str]:
    errors = [f"{name}: null for a timed result" for name in TIMED if row[name] is None]
    if errors:
        return errors
    if not 0 < row["min_s"] <= row["median_s"] <= row["max_s"]:
        errors.append(
            f"times: need 0 < min_s <= median_s <= max_s, got "
            f"{row['min_s']}, {row['median_s']}, {row['max_s']}"
        )
    if row["repeats"] != len(row["times_s"]) or not all(_finite(t) for t in row["times_s"]):
        errors.append(f"times_s: {len(row['times_s'])} numbers for repeats={row['repeats']}")
    if row["roofline_fraction"] is not None and row["roofline_fraction"] <= 0:
        errors.append(f"roofline_fraction: {row['roofline_fraction']} <= 0")
    if row["bound"] not in (None, "compute", "memory"):
        errors.append(f"bound: {row['bound']!r}, allowed: compute, memory")
    if row["memory_kind"] not in (None, "rss", "cuda"):
        errors.append(f"memory_kind: {row['memory_kind']!r}, allowed: rss, cuda")
    return errors


def validate_lines(lines: list[str]) -> list[tuple[int, str]]:
    """``(line number, message)`` for every violation in JSON-lines text."""
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            out.append((number, f"not JSON: {exc}"))
            continue
        out += [(number, message) for message in validate_row(row)]
    return out


def validate_file(path: str | Path) -> list[tuple[int, str]]:
    return validate_lines(Path(path).read_text().splitlines())


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m benchmarks.schema FILE.jsonl ...", file=sys.stderr)
        return 2
    bad = 0
    for path in paths:
        for number, message in validate_file(path):
            print(f"{path}:{number}: {message}")
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
