"""fastsae benchmarks. Speed and memory claims live here, never in timed tests.

Run ``python -m benchmarks.run --suite smoke|full``; results are appended to
``benchmarks/results/<device>.jsonl``.
"""
