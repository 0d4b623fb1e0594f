"""fastsae benchmarks. Speed and memory claims live here, never in timed tests.

``python -m benchmarks.run --suite smoke|full`` measures every case (``benchmarks/cases.py``) and
appends the results to ``benchmarks/results/<device>.jsonl``; ``benchmarks.compare`` flags
regressions, ``benchmarks.dashboard`` builds ``docs/bench/``, ``benchmarks.ci`` is the CI check.
See ``docs/benchmarks.md``.
"""
