"""Synthetic result lines for the benchmark tooling's tests (nothing here is measured)."""

from __future__ import annotations

import copy
from typing import Any

ENV: dict[str, Any] = {
    "schema": 1,
    "run_id": "20260101T000000Z-aaaaaa",
    "commit": "0123456789abcdef0123456789abcdef01234567",
    "dirty": False,
    "device": "cpu-x86_64",
    "device_detail": "Test CPU, 2 logical CPUs",
    "threads": 2,
    "versions": {"python": "3.11.0", "torch": "2.13.0", "sae-lens": None},
    "time": "2026-01-01T00:00:00Z",
    "suite": "smoke",
    "ceilings": {"peak_flops": 1e11, "peak_bytes_per_s": 2e10, "matmul_n": 2048},
}


def row(provider: str = "fastsae-torch", median: float = 0.01, **overrides: Any) -> dict[str, Any]:
    """One valid ``ok`` line (environment merged in)."""
    out = {
        **copy.deepcopy(ENV),
        "case": "trainer_step",
        "mode": "step",
        "shapes": {"B": 256, "d": 64, "n": 1024, "k": 8},
        "provider": provider,
        "status": "ok",
        "reason": None,
        "flops": 1e9,
        "bytes": 1e8,
        "baseline": "floor",
        "items": 256,
        "items_unit": "tokens",
        "notes": "",
        "median_s": median,
        "min_s": median * 0.9,
        "max_s": median * 1.2,
        "spread": 0.3,
        "repeats": 3,
        "warmup": 1,
        "times_s": [median * 0.9, median, median * 1.2],
        "gflops_per_s": 1e9 / median / 1e9,
        "gbytes_per_s": 1e8 / median / 1e9,
        "roofline_fraction": 0.5,
        "bound": "compute",
        "items_per_s": 256 / median,
        "peak_memory_mb": 500.0,
        "peak_delta_mb": 10.0,
        "state_mb": 40.0,
        "memory_mb": 50.0,
        "memory_kind": "rss",
        "ratio_vs_baseline": None,
        "speedup_vs": {},
    }
    out.update(overrides)
    return out


def run(
    medians: dict[str, float],
    run_id: str,
    time: str,
    *,
    skipped: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    memory: dict[str, float] | None = None,
    **env: Any,
) -> list[dict[str, Any]]:
    """One run of a case whose providers took ``medians`` seconds; ratios filled in as the
    harness does."""
    rows = []
    for name, median in medians.items():
        r = row(name, median, run_id=run_id, time=time, **env)
        r["speedup_vs"] = {o: m / median for o, m in medians.items() if o != name}
        r["ratio_vs_baseline"] = median / medians["floor"] if "floor" in medians else None
        if memory and name in memory:
            r["memory_mb"] = memory[name]
        rows.append(r)
    blank = {
        k: None
        for k in (
            "median_s",
            "min_s",
            "max_s",
            "spread",
            "repeats",
            "warmup",
            "times_s",
            "gflops_per_s",
            "gbytes_per_s",
            "roofline_fraction",
            "bound",
            "items_per_s",
            "peak_memory_mb",
            "peak_delta_mb",
            "state_mb",
            "memory_mb",
            "memory_kind",
            "ratio_vs_baseline",
        )
    }
    for status, named in (("skipped", skipped or {}), ("error", errors or {})):
        for name, reason in named.items():
            rows.append(
                row(
                    name,
                    run_id=run_id,
                    time=time,
                    status=status,
                    reason=reason,
                    speedup_vs={},
                    **blank,
                    **env,
                )
            )
    return rows
