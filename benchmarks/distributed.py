"""Step time and bytes communicated per step, per parallel mode, at 1, 2 and 4 processes.

``python -m benchmarks.distributed [--suite smoke|full] [--out FILE]`` spawns gloo process groups
on this machine (fastsae/parallel/launch.py), trains a TopK SAE for a few steps on seeded batches
in each mode, and appends one result line per (mode, world size) in the schema of
:mod:`benchmarks.schema` to ``benchmarks/results/distributed-<device>.jsonl``. ``python -m
benchmarks.ci`` runs the smoke suite (2 processes) and validates its lines.

- ``median_s``: the median over steps (the first, which initialises from data, excluded) of the
  slowest rank's step time, measured inside the ranks after a barrier;
- ``bytes``: the payload bytes one rank handed to collectives per step (counted by
  :mod:`fastsae.parallel.comm`, and equal to :func:`fastsae.parallel.cost.step_bytes`);
  ``comm_wire_bytes``: what a ring algorithm sends per rank for that payload.

**CPU figures are for the trend only**: every rank is a process on the same few cores (4 ranks
on a 2-core machine are oversubscribed), gloo moves bytes through the loopback interface, and a
step at these sizes is dominated by Python and collective latency. On GPUs the encoder GEMM,
which latent sharding divides by the number of ranks, dominates instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import _timing_fields, environment, record, results_path

SIZES = {
    "smoke": {"B": 64, "d": 16, "n": 256, "k": 8, "steps": 3, "worlds": (2,)},
    "full": {"B": 2048, "d": 256, "n": 16384, "k": 32, "steps": 6, "worlds": (1, 2, 4)},
}
NOTES = (
    "CPU gloo processes sharing the machine's cores: trend only (see benchmarks/distributed.py); "
    "step time = slowest rank, median over steps after the first"
)


def _grid(worlds) -> list[tuple[str, int]]:
    out = []
    for world in worlds:
        if world == 1:
            out.append(("dp", 1))  # one process: the baseline, no collectives
            continue
        out += [("dp", world), ("latent", world)]
        if world >= 4:
            out.append(("dp,latent", world))
    return out


def run(suite: str = "smoke", timeout_s: float = 600.0) -> list[dict[str, Any]]:
    """One result row per (mode, world size) of ``suite``."""
    from fastsae.parallel.launch import spawn, train_synthetic

    s = SIZES[suite]
    cfg = {
        "architecture": "topk",
        "d_in": s["d"],
        "d_sae": s["n"],
        "k": s["k"],
        "batch_size": s["B"],
        "buffer_tokens": 2 * s["B"],
        "backend": "torch",
        "device": "cpu",
        "warmup_steps": 0,
        "progress": False,
    }
    rows = []
    for mode, world in _grid(s["worlds"]):
        shapes = {"B": s["B"], "d": s["d"], "n": s["n"], "k": s["k"], "world": world}
        base = {
            **_timing_fields(),
            "case": "distributed_step",
            "mode": "step",
            "shapes": shapes,
            "provider": f"{mode} x{world}",
            "flops": 0.0,
            "bytes": 0.0,
            "baseline": "dp x1" if 1 in s["worlds"] else None,
            "items": s["B"],
            "items_unit": "tokens",
            "notes": NOTES,
        }
        try:
            with tempfile.TemporaryDirectory(prefix="fastsae-dist-") as tmp:
                spawn(train_synthetic, world, mode, cfg, s["steps"], tmp, timeout_s=timeout_s)
                stats = [
                    json.loads((Path(tmp) / f"stats-{r}.json").read_text()) for r in range(world)
                ]
        except Exception as exc:  # recorded, like a provider that raised
            rows.append({**base, "status": "error", "reason": f"{type(exc).__name__}: {exc}"})
            continue
        steps = range(1, s["steps"])
        times = [max(st["step_s"][i] for st in stats) for i in steps]
        payload = statistics.mean(st["bytes"][i] for st in stats for i in steps)
        median = statistics.median(times)
        from fastsae.parallel.cost import step_bytes

        formula = step_bytes(
            batch=s["B"],
            d_in=s["d"],
            d_out=s["d"],
            n=s["n"],
            k=s["k"],
            dp=stats[0]["dp"],
            latent=stats[0]["latent"],
        )
        rows.append(
            {
                **base,
                "status": "ok",
                "reason": None,
                "bytes": payload,
                "comm_payload_bytes": payload,
                "comm_wire_bytes": formula.wire_bytes(),
                "dp": stats[0]["dp"],
                "latent": stats[0]["latent"],
                "median_s": median,
                "min_s": min(times),
                "max_s": max(times),
                "spread": (max(times) - min(times)) / median,
                "repeats": len(times),
                "warmup": 1,
                "times_s": times,
                "items_per_s": s["B"] / median,
            }
        )
    base_row = next((r for r in rows if r["provider"] == "dp x1" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok" and base_row is not None:
            r["ratio_vs_baseline"] = r["median_s"] / base_row["median_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__)
    parser.add_argument("--suite", default="full", choices=tuple(SIZES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from benchmarks.roofline import measure_ceilings

    env = environment()
    env["suite"] = args.suite
    env["ceilings"] = measure_ceilings()
    rows = run(args.suite)
    path = args.out or results_path(f"distributed-{env['device']}")
    record(rows, env, path)
    for r in rows:
        if r["status"] == "ok":
            print(
                f"{r['provider']:>14}: {r['median_s'] * 1e3:8.1f} ms/step, "
                f"{r['bytes'] / 1e6:8.3f} MB payload/step, {r['comm_wire_bytes'] / 1e6:8.3f} MB "
                "wire/step (ring)"
            )
        else:
            print(f"{r['provider']:>14}: {r['status']}: {r['reason']}")
    print(f"wrote {path}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
