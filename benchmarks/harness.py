"""Timing harness: providers of one case are measured in one process, interleaved, after a
warm-up, so their ratio is meaningful even on a noisy shared machine.

A round times every provider once; the order rotates from round to round so that no provider
always runs right after the same neighbour (caches, frequency scaling). A provider that raises is
recorded with ``status="error"`` and dropped from the later rounds; one that cannot run here (no
GPU, a package missing) is listed in :attr:`Case.skipped` and recorded with ``status="skipped"``.
After the timed rounds each provider runs once more, alone, for its peak memory
(:mod:`benchmarks.memory`).
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import fastsae
from benchmarks.memory import measure_call
from benchmarks.roofline import roofline_fraction

RESULTS = Path(__file__).parent / "results"
SCHEMA_VERSION = 1
MODES = ("fwd", "bwd", "fwd+bwd", "step", "throughput")


class Unavailable(Exception):
    """Raised while building a provider or a case that cannot run here; the message says why
    (no GPU, a package or an asset missing). Recorded as ``status="skipped"``, never a failure."""


@dataclass
class Case:
    """One benchmark: shapes, a mode, a cost model and providers (name -> zero-arg callable)."""

    name: str
    mode: str  # one of MODES
    shapes: dict[str, int]
    providers: dict[str, Callable[[], Any]]
    flops: float = 0.0
    bytes: float = 0.0
    baseline: str | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: provider -> why it cannot run here; recorded, never timed
    skipped: dict[str, str] = field(default_factory=dict)
    #: provider -> bytes it keeps between calls (see benchmarks.memory.owned_bytes)
    state: dict[str, Callable[[], int]] = field(default_factory=dict)
    #: provider -> (flops, bytes) where a provider does other work than the case's cost model
    provider_cost: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: units of work per call (e.g. tokens), for a throughput column
    items: int | None = None
    items_unit: str = "tokens"
    #: overrides the run's repeat count (heavy cases)
    repeats: int | None = None
    #: called once after the case is measured (stop threads, free memory)
    teardown: Callable[[], None] | None = None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"[:500]


def _base_row(case: Case, provider: str, status: str, reason: str | None) -> dict[str, Any]:
    flops, nbytes = case.provider_cost.get(provider, (case.flops, case.bytes))
    return {
        "case": case.name,
        "mode": case.mode,
        "shapes": case.shapes,
        "provider": provider,
        "status": status,
        "reason": reason,
        "flops": flops,
        "bytes": nbytes,
        "baseline": case.baseline,
        "items": case.items,
        "items_unit": case.items_unit if case.items else None,
        "notes": case.notes,
        **case.extra,
    }


def _timing_fields() -> dict[str, Any]:
    names = [
        *("median_s", "min_s", "max_s", "spread", "repeats", "warmup", "times_s"),
        *("gflops_per_s", "gbytes_per_s", "roofline_fraction", "bound", "items_per_s"),
        *("peak_memory_mb", "peak_delta_mb", "state_mb", "memory_mb", "memory_kind"),
        "ratio_vs_baseline",
    ]
    return {**dict.fromkeys(names), "speedup_vs": {}}


def measure(
    case: Case,
    repeats: int,
    warmup: int = 1,
    ceilings: dict[str, Any] | None = None,
    memory: bool = True,
) -> list[dict[str, Any]]:
    """Time every provider of ``case``; one row per provider (skipped and failed ones too)."""
    repeats = case.repeats or repeats
    errors: dict[str, str] = {}
    live = dict(case.providers)

    def attempt(name: str, fn: Callable[[], Any]) -> float | None:
        try:
            start = time.perf_counter()
            fn()
            _sync()
            return time.perf_counter() - start
        except Exception as exc:  # a provider's crash is a result, not the end of the run
            errors[name] = _describe(exc)
            live.pop(name, None)
            return None

    for name, fn in list(live.items()):
        for _ in range(warmup):
            if attempt(name, fn) is None:
                break
    times: dict[str, list[float]] = {name: [] for name in live}
    for r in range(repeats):
        names = list(live)
        if not names:
            break
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if name in live:
                elapsed = attempt(name, live[name])
                if elapsed is not None:
                    times[name].append(elapsed)
    mem: dict[str, Any] = {}
    if memory:
        for name, fn in list(live.items()):
            try:
                mem[name] = measure_call(fn)
            except Exception as exc:
                errors[name] = _describe(exc)
                live.pop(name)
    medians = {n: statistics.median(ts) for n, ts in times.items() if n in live and ts}
    base = medians.get(case.baseline) if case.baseline else None

    rows = []
    for name, reason in case.skipped.items():
        rows.append({**_base_row(case, name, "skipped", reason), **_timing_fields()})
    for name in case.providers:
        if name not in errors and name not in medians:
            errors[name] = "no timed repeat completed"
        if name in errors:
            rows.append({**_base_row(case, name, "error", errors[name]), **_timing_fields()})
            continue
        ts, median = times[name], medians[name]
        flops, nbytes = case.provider_cost.get(name, (case.flops, case.bytes))
        fraction, bound = roofline_fraction(flops, nbytes, median, ceilings)
        m = mem.get(name)
        state = case.state[name]() if name in case.state else None
        delta_mb = m.delta / 2**20 if m else None
        state_mb = state / 2**20 if state is not None else None
        own = None if delta_mb is None else delta_mb + (state_mb or 0.0)
        rows.append(
            {
                **_base_row(case, name, "ok", None),
                "median_s": median,
                "min_s": min(ts),
                "max_s": max(ts),
                # (max - min) / median over the timed repeats
                "spread": (max(ts) - min(ts)) / median,
                "repeats": len(ts),
                "warmup": warmup,
                "times_s": ts,
                "gflops_per_s": flops / median / 1e9 if flops else None,
                "gbytes_per_s": nbytes / median / 1e9 if nbytes else None,
                "roofline_fraction": fraction,
                "bound": bound,
                "items_per_s": case.items / median if case.items else None,
                "peak_memory_mb": m.peak / 2**20 if m else None,
                "peak_delta_mb": delta_mb,
                "state_mb": state_mb,
                # the provider's own footprint: what it keeps plus its transient peak
                "memory_mb": own,
                "memory_kind": m.kind if m else None,
                # time relative to the baseline of the same run: < 1 is faster
                "ratio_vs_baseline": median / base if base else None,
                # speedup_vs[o] = r means: provider o takes r times as long as this one
                "speedup_vs": {o: medians[o] / median for o in medians if o != name},
            }
        )
    if case.teardown is not None:
        case.teardown()
    return rows


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _device_detail() -> str:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def new_run_id() -> str:
    """A UTC timestamp and a random suffix: sorts by time, unique across machines."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


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
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    # fastsae's own version from the package: its distribution is named fastsae-lab, and an
    # editable checkout may not be installed at all
    versions["fastsae"] = fastsae.__version__
    for dist in ("triton", "numpy", "sae-lens", "eai-sparsify"):
        versions[dist] = _version(dist)
    return {
        "schema": SCHEMA_VERSION,
        "run_id": new_run_id(),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "device": device,
        "device_detail": _device_detail(),
        "threads": torch.get_num_threads(),
        "versions": versions,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def results_path(device: str) -> Path:
    return RESULTS / (device.replace(" ", "_").replace("/", "_") + ".jsonl")


def record(rows: list[dict[str, Any]], env: dict[str, Any], path: Path | None = None) -> Path:
    """Append one JSON line per row (the run's environment merged in) to ``path`` (default:
    ``benchmarks/results/<device>.jsonl``)."""
    path = path or results_path(env["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({**env, **row}) + "\n")
    return path
