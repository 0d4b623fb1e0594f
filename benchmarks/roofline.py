"""The machine's ceilings, measured once per run, and the roofline fraction of a result.

A result's cost model gives the FLOPs it must do and the bytes it must move. On this machine
those take at least ``max(flops / peak_flops, bytes / peak_bytes_per_s)`` seconds, so

    roofline_fraction = max(flops / peak_flops, bytes / peak_bytes_per_s) / median_s

is 1.0 for an op that runs at the machine's limit and smaller the further it is from it. The
ceilings are what this process reaches on a large fp32 matmul and a large copy (best of a few
tries), not datasheet numbers, so the fraction is relative to what PyTorch itself attains here.
Small (smoke) shapes fit in cache and can exceed 1.0 on the bytes side.
"""

from __future__ import annotations

import time
from typing import Any

import torch

# Large enough to leave the caches and amortise the call overhead, small enough to take about a
# second on two CPU cores: 2 * 2048^3 = 17 GFLOP per matmul; 256 MiB copied (512 MiB moved).
CPU_MATMUL_N = 2048
CPU_COPY_BYTES = 256 * 2**20
# On a GPU: 2 * 8192^3 = 1.1 TFLOP per matmul; 1 GiB copied.
CUDA_MATMUL_N = 8192
CUDA_COPY_BYTES = 2**30
TRIES = 3


def _best_seconds(fn, tries: int) -> float:
    cuda = torch.cuda.is_available()
    fn()  # warm-up: first-touch page faults, kernel selection
    best = float("inf")
    for _ in range(tries):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _matmul_seconds(n: int, device: str, tries: int) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    return _best_seconds(lambda: torch.mm(a, b, out=out), tries)


def _copy_seconds(nbytes: int, device: str, tries: int) -> float:
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return _best_seconds(lambda: dst.copy_(src), tries)


def measure_ceilings(tries: int = TRIES) -> dict[str, Any]:
    """Peak fp32 matmul FLOP/s and copy bytes/s that this process reaches now."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    n = CUDA_MATMUL_N if cuda else CPU_MATMUL_N
    copy_bytes = CUDA_COPY_BYTES if cuda else CPU_COPY_BYTES
    matmul_s = _matmul_seconds(n, device, tries)
    copy_s = _copy_seconds(copy_bytes, device, tries)
    return {
        "peak_flops": 2 * n**3 / matmul_s,
        # a copy reads and writes every byte
        "peak_bytes_per_s": 2 * copy_bytes / copy_s,
        "matmul_n": n,
        "copy_bytes": copy_bytes,
        "dtype": "float32",
        "tf32": bool(cuda and torch.backends.cuda.matmul.allow_tf32),
    }


def roofline_seconds(flops: float, nbytes: float, ceilings: dict[str, Any]) -> float:
    """The least time the cost model allows on this machine."""
    return max(flops / ceilings["peak_flops"], nbytes / ceilings["peak_bytes_per_s"])


def roofline_fraction(
    flops: float, nbytes: float, median_s: float, ceilings: dict[str, Any] | None
) -> tuple[float | None, str | None]:
    """``(fraction, bound)``: the fraction of the roofline reached and whether the cost model is
    compute- or memory-bound here; ``(None, None)`` without a cost model or ceilings."""
    if not ceilings or not median_s or not (flops or nbytes):
        return None, None
    compute = flops / ceilings["peak_flops"]
    memory = nbytes / ceilings["peak_bytes_per_s"]
    return max(compute, memory) / median_s, ("compute" if compute >= memory else "memory")
