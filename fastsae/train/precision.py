"""The training precision a run gets: ``TrainConfig.autocast`` resolved for the device.

``autocast="auto"`` (the default) picks the fastest precision whose quality matched fp32 in
``benchmarks/quality.py``; ``"fp32"`` / ``"none"`` and ``"bf16"`` force one. bf16 here means the
torch backend's mixed-precision TopK step: bf16 encoder GEMM with an exact top-k (candidates
re-scored in fp32), an fp32 sparse backward, fp32 master weights and fp32 Adam (see :mod:`fastsae.ops._torch`). ``auto`` chooses bf16 only where that was
measured to be both faster and as good:

- a CPU with AVX512-BF16 or AMX-BF16 instructions (``avx512_bf16`` / ``amx_bf16`` in
  ``/proc/cpuinfo``): there the step at B 4096, d 768, n 16384, k 32 took ~0.6x the fp32 step,
  and held-out FVU after 200 steps was within 0.1% of fp32 on MiniLM and the embedded model
  (``benchmarks/results/quality-cpu-x86_64.json``; docs/training.md);
- an input width ``d_in >= 384`` (:data:`BF16_MIN_D_IN`): in the quality benchmark's 200 steps
  (d_sae 2048, batch 1024) bf16 trained 1.08x faster than fp32 on MiniLM (d_in 384) but 0.78x
  as fast on the embedded model (d_in 128), where the GEMM is too small to pay for the
  candidate re-scoring and the casts;
- the ``torch`` backend (the Triton kernels read their operands in their own dtype; the
  ``reference`` backend is the dense oracle), a single-process run (``parallel="none"``), fp32
  parameters, and the ``topk`` architecture (the one the quality benchmark measured in bf16).

Everywhere else, CUDA included (no bf16 quality measurement on a GPU yet), ``auto`` is fp32.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import torch

from fastsae import ops

#: Narrowest input at which bf16 was measured faster than fp32 on this path (see the docstring).
BF16_MIN_D_IN = 384
#: /proc/cpuinfo flags of CPUs whose bf16 dot products run at twice the fp32 rate or more.
FAST_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


class Precision(NamedTuple):
    """A resolved precision: ``autocast`` is ``"bf16"`` or ``"none"`` (fp32); ``reason`` says why."""

    autocast: str
    reason: str


@functools.cache
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The fast-bf16 instruction flags this CPU reports (empty where ``cpuinfo`` is unreadable,
    e.g. not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return FAST_BF16_CPU_FLAGS & set(line.partition(":")[2].split())
    return frozenset()


def resolve_precision(cfg, device: torch.device, d_in: int) -> Precision:
    """``cfg.autocast`` for a ``d_in``-wide SAE on ``device``: see the module docstring."""
    if cfg.autocast == "bf16":
        return Precision("bf16", "autocast='bf16' requested")
    if cfg.autocast in ("none", "fp32"):
        return Precision("none", f"autocast={cfg.autocast!r} requested")
    with ops.use_backend(cfg.backend):
        backend = ops.get_backend()
    if device.type != "cpu":
        return Precision("none", f"auto: fp32 on {device.type} (bf16 quality not measured there)")
    flags = cpu_bf16_flags()
    why_not = (
        "the CPU has no AVX512-BF16/AMX-BF16"
        if not flags
        else f"backend {backend!r} (bf16 path: torch)"
        if backend != "torch"
        else f"architecture {cfg.architecture!r} (measured: topk)"
        if cfg.architecture != "topk"
        else f"dtype {cfg.dtype}"
        if cfg.dtype != "float32"
        else f"parallel={cfg.parallel!r}"
        if cfg.parallel != "none"
        else f"d_in={d_in} < {BF16_MIN_D_IN}, where bf16 was slower"
        if d_in < BF16_MIN_D_IN
        else None
    )
    if why_not is not None:
        return Precision("none", f"auto: fp32 ({why_not})")
    return Precision("bf16", f"auto: bf16 (CPU has {', '.join(sorted(flags))}, torch backend)")
