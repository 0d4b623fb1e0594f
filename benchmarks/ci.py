"""``python -m benchmarks.ci``: the benchmark check CI runs.

1. the smoke suite, with results written to a temporary file (never the committed
   ``benchmarks/results``);
2. every line validated against :mod:`benchmarks.schema`;
3. the dashboard regenerated from those lines into a temporary directory.

It fails (exit 1) if a provider raised, a line breaks the schema, the dashboard cannot be built,
or a competitor (``sae_lens``, ``sparsify``) was skipped: CI installs fastsae[dev], which brings
both. It never fails on timings. Providers that cannot run on the machine (Triton without a GPU)
are recorded as skipped and are fine. ``--allow-missing-competitors`` accepts skipped
competitors (for a checkout without the dev extras).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import distributed
from benchmarks.compare import load
from benchmarks.dashboard import build
from benchmarks.harness import record
from benchmarks.run import run_suite
from benchmarks.schema import validate_file

COMPETITORS = ("sae_lens", "sparsify")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ci", description=__doc__)
    parser.add_argument("--suite", default="smoke", choices=("smoke", "full"))
    parser.add_argument("--keep", type=Path, default=None, help="copy results and page here")
    parser.add_argument("--allow-missing-competitors", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fastsae-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = work / "results.jsonl"
        env, rows = run_suite(args.suite, repeats=2 if args.suite == "smoke" else None)
        rows += distributed.run("smoke")  # multi-process step time and bytes (2 gloo ranks)
        record(rows, env, results)
        for row in rows:
            where = f"{row['case']} / {row['provider']}"
            if row["status"] == "error":
                problems.append(f"{where} raised: {row['reason']}")
            if (
                row["status"] == "skipped"
                and row["provider"] in COMPETITORS
                and not args.allow_missing_competitors
            ):
                problems.append(f"{where} was skipped: {row['reason']}")
        for number, message in validate_file(results):
            problems.append(f"{results.name}:{number}: {message}")
        try:
            page = build(load([results]), work / "bench")
            if "<table" not in page.read_text() or not list(page.parent.glob("*.png")):
                problems.append(f"{page} has no table or no plots")
        except Exception as exc:  # the dashboard must build from any valid results
            problems.append(f"dashboard: {type(exc).__name__}: {exc}")
        counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "error")}
        print(
            f"benchmarks.ci: {len(rows)} results ({counts['ok']} ok, {counts['skipped']} skipped, "
            f"{counts['error']} failed) in {time.perf_counter() - start:.0f} s"
        )
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
