"""Timing harness: providers of one case are measured in one process, interleaved, after a
warm-up, so their ratio is meaningful even on a noisy shared machine."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


@dataclass
class Case:
    """One benchmark: shapes, a mode, a cost model and providers (name -> zero-arg callable)."""

    name: str
    mode: str  # fwd, bwd, fwd+bwd, step
    shapes: dict[str, int]
    providers: dict[str, Callable[[], Any]]
    flops: float = 0.0
    bytes: float = 0.0
    baseline: str | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(case: Case, repeats: int, warmup: int = 1) -> list[dict[str, Any]]:
    """Median and spread of each provider's time; repeats are interleaved across providers."""
    for fn in case.providers.values():
        for _ in range(warmup):
            fn()
    _sync()
    times: dict[str, list[float]] = {name: [] for name in case.providers}
    for _ in range(repeats):
        for name, fn in case.providers.items():
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for name, ts in times.items():
        median = medians[name]
        rows.append(
            {
                "case": case.name,
                "mode": case.mode,
                "shapes": case.shapes,
                "provider": name,
                "median_s": median,
                "min_s": min(ts),
                "max_s": max(ts),
                "repeats": repeats,
                "flops": case.flops,
                "bytes": case.bytes,
                "gflops_per_s": case.flops / median / 1e9 if case.flops else None,
                "peak_memory_mb": _peak_memory_mb(),
                # ratio r means: the other provider takes r times as long as this one
                "speedup_vs": {o: medians[o] / median for o in medians if o != name},
                "notes": case.notes,
                **case.extra,
            }
        )
    return rows


def environment() -> dict[str, Any]:
    root = Path(__file__).parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{platform.machine()}"
    )
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "device": device,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def record(rows: list[dict[str, Any]], env: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (env["device"].replace(" ", "_").replace("/", "_") + ".jsonl")
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({**env, **row}) + "\n")
    return path
