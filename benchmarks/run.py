"""``python -m benchmarks.run --suite smoke|full [--repeats N] [--only CASE] [--set n=4096]
[--out FILE] [--no-record]``.

Measures every case's providers side by side and appends one JSON line per result to
``benchmarks/results/<device>.jsonl`` (or ``--out FILE``). Every line carries the run's id,
commit, dirty flag, device, versions and the machine's measured ceilings.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.cases import REGISTRY, SIZES, cases
from benchmarks.harness import Case, Unavailable, _describe, environment, measure, record
from benchmarks.roofline import measure_ceilings

DEFAULT_REPEATS = {"smoke": 3, "full": 7}


def _case_row(name: str, status: str, reason: str, suite: str) -> dict[str, Any]:
    """A row for a case that could not even be built (every provider skipped or failed)."""
    stub = Case(name=name, mode="step", shapes={}, providers={}, skipped={"(case)": reason})
    row = measure(stub, repeats=1, memory=False)[0]
    row.update(status=status, suite=suite)
    return row


def format_row(row: dict[str, Any]) -> str:
    """One line of the results table."""
    head = f"{row['case']:22s} {row['provider']:24s}"
    if row["status"] != "ok":
        return f"{head} {row['status'].upper():>9s}  {row['reason']}"
    ratio = ""
    if row.get("ratio_vs_baseline") is not None and row["provider"] != row["baseline"]:
        ratio = f"{row['ratio_vs_baseline']:6.3f}x {row['baseline']}"
    roof = row.get("roofline_fraction")
    mem = row.get("memory_mb")
    return (
        f"{head} {row['median_s'] * 1e3:9.2f} ms  [{row['min_s'] * 1e3:.2f}, "
        f"{row['max_s'] * 1e3:.2f}]  roof {roof if roof is None else f'{roof:5.1%}'}  "
        f"mem {mem if mem is None else f'{mem:8.1f} MB'}  {ratio}"
    )


def run_suite(
    suite: str,
    repeats: int | None = None,
    warmup: int = 1,
    only: list[str] | None = None,
    override: dict[str, int] | None = None,
    echo=print,
    providers: list[str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure every case of ``suite``; returns the run's environment and its rows.

    ``providers``: measure only these providers of each case, and its baseline (the others are
    left out of the run, not recorded as skipped)."""
    env = environment()
    env["suite"] = suite
    env["ceilings"] = measure_ceilings()
    c = env["ceilings"]
    echo(
        f"run {env['run_id']} on {env['device']} ({env['device_detail']}), {env['threads']} "
        f"threads; ceilings: {c['peak_flops'] / 1e9:.1f} GFLOP/s fp32 matmul, "
        f"{c['peak_bytes_per_s'] / 1e9:.1f} GB/s copy"
    )
    asked = repeats  # an explicit count also overrides a heavy case's own (Case.repeats)
    repeats = repeats or DEFAULT_REPEATS[suite]
    rows: list[dict[str, Any]] = []
    for name, build in cases(suite, only, override):
        try:
            case = build()
        except Unavailable as exc:
            case_rows = [_case_row(name, "skipped", str(exc), suite)]
        except Exception as exc:
            case_rows = [_case_row(name, "error", _describe(exc), suite)]
        else:
            if providers:
                keep = set(providers) | {case.baseline}
                case.providers = {n: f for n, f in case.providers.items() if n in keep}
                case.skipped = {n: r for n, r in case.skipped.items() if n in keep}
            if asked:
                case.repeats = None
            case_rows = measure(case, repeats=repeats, warmup=warmup, ceilings=env["ceilings"])
            del case
        for row in case_rows:
            row["suite"] = suite
            echo(format_row(row))
        rows.extend(case_rows)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return env, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--suite", choices=sorted(SIZES), default="smoke")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="default: 3 (smoke), 7 (full), fewer for heavy cases; when given, for every case",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per provider first")
    parser.add_argument(
        "--only", action="append", choices=sorted(REGISTRY), help="run only this case (repeatable)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=INT",
        help="override one of the suite's sizes B, d, n, k (repeatable), e.g. --set n=4096",
    )
    parser.add_argument(
        "--provider",
        action="append",
        default=None,
        help="measure only this provider of each case, and the case's baseline (repeatable), "
        "e.g. --only trainer_step --provider fastsae-torch --provider fastsae-torch-bf16",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    parser.add_argument("--out", type=Path, default=None, help="append results here instead")
    parser.add_argument("--no-record", action="store_true", help="print only; write no results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    override = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in SIZES[args.suite] or not value.isdigit():
            parser.error(f"--set {item}: expected NAME=INT with NAME one of B, d, n, k")
        override[name] = int(value)
    env, rows = run_suite(
        args.suite, args.repeats, args.warmup, args.only, override, providers=args.provider
    )
    if override:
        print(f"sizes overridden: {override} (recorded in each result's shapes)")
    if not args.no_record:
        print(
            f"recorded {len(rows)} results of run {env['run_id']} in {record(rows, env, args.out)}"
        )
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        print(f"{len(errors)} provider(s) failed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
