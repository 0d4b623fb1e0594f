"""``python -m benchmarks.run --suite smoke|full [--repeats N] [--no-record]``.

Measures every case's providers side by side and appends one JSON line per result to
``benchmarks/results/<device>.jsonl``.
"""

from __future__ import annotations

import argparse

from benchmarks.cases import SIZES, cases
from benchmarks.harness import environment, measure, record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--suite", choices=sorted(SIZES), default="smoke")
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 (smoke), 7 (full)")
    parser.add_argument("--no-record", action="store_true", help="print only; write no results")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.suite == "smoke" else 7)
    env = environment()
    rows = []
    for case in cases(args.suite):
        case_rows = measure(case, repeats=repeats)
        for row in case_rows:
            row["suite"] = args.suite
            vs = row["speedup_vs"].get(case.baseline) if case.baseline else None
            # time relative to the baseline provider of the same run: < 1 is faster
            ratio = f"{1 / vs:7.3f}x the time of {case.baseline}" if vs else ""
            print(
                f"{case.name:22s} {row['provider']:24s} {row['median_s'] * 1e3:9.2f} ms  "
                f"[{row['min_s'] * 1e3:.2f}, {row['max_s'] * 1e3:.2f}]  {ratio}"
            )
        rows.extend(case_rows)
    if not args.no_record:
        print(f"recorded {len(rows)} results in {record(rows, env)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
