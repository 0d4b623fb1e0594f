"""Which top-k selection the encoders run: chosen by measurement, cached per shape.

The TopK, BatchTopK and JumpReLU encoders (:mod:`fastsae.ops._sparse_encode`) are built on one
*selection* function. Four implementations give the same answer (fastsae's tie rule, exactly):

``fused``
    :mod:`fastsae.kernels.encode_topk_filtered`: the GEMM and the selection in one Triton
    kernel, the ``[B, d_sae]`` scores never written (128 x 128 tiles, the selection state out of
    registers behind a per-row threshold, TMA, a persistent grid).
``fused_registers``
    :mod:`fastsae.kernels.encode_topk`: the earlier fused kernel, selection state in registers
    (64-wide tiles). Kept, and timed by ``auto``, until a GPU measurement retires one of them.
``slab``
    :mod:`fastsae.kernels.slab_topk`: cuBLAS GEMM into bounded slabs, one streaming Triton read
    of each.
``torch``
    :func:`fastsae.ops._torch.select_topk`: cuBLAS GEMM into slabs, ``torch.topk`` on each.

:class:`AutoSelect` picks one per call. An explicit strategy (:func:`fastsae.ops.use_encode_strategy`
or ``FASTSAE_ENCODE_STRATEGY``) always wins. Otherwise, the first call for a key (device, op,
dtype, shape bucket) on a device where timing means something (CUDA) times every eligible
implementation (one warm-up call, then the median of ``REPEATS`` calls, each between
``torch.cuda.Event``\\ s), keeps the fastest, logs the times at INFO on the ``fastsae.ops``
logger, and reuses the winner for every later call with that key. An implementation that raises
while being timed is excluded, with a log line. Eligible: all four under ``backend="auto"``;
all but ``torch`` under ``backend="triton"`` (the user asked for Triton). Where nothing is
timed (CPU tensors under ``TRITON_INTERPRET=1``, CUDA graph capture, ``torch.compile`` tracing,
a key not yet measured) the first eligible one in ``DEFAULT_ORDER`` runs; one that refuses the
arguments (``ValueError``, e.g. ``k`` above its ``MAX_K``) hands the call to the next.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fastsae.ops import get_encode_strategy, requested_backend

__all__ = ["DEFAULT_ORDER", "REPEATS", "AutoSelect", "SelectionKey", "time_call"]

logger = logging.getLogger("fastsae.ops")

# Untimed choice: the fused kernel keeps the [B, d_sae] scores out of memory entirely, and is what
# the triton backend ran before measurement existed (the interpreter tests exercise it).
DEFAULT_ORDER = ("fused", "slab", "torch", "fused_registers")
# Timed calls per implementation after one warm-up (the warm-up also pays Triton's JIT compile):
# five, so that the median ignores up to two outliers (a clock boost, another stream's work).
REPEATS = 5


class SelectionKey(NamedTuple):
    """What a measurement is cached under. Sizes that change the winner, bucketed: ``B`` and
    ``k`` to the next power of two (BatchTopK and JumpReLU re-select subsets of rows with growing
    ``k``; exact sizes would re-measure for each)."""

    device: str
    op: str
    dtype: str
    rows: int  # next_pow2(B)
    d_in: int
    d_sae: int
    k: int  # next_pow2(k)
    k_aux: int  # next_pow2(k_aux) when an AuxK selection rides along, else 0
    threshold: bool
    candidates: tuple[str, ...]


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def time_call(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    repeats: int = REPEATS,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, Any]:
    """``(median milliseconds, last result)`` of ``fn()`` over ``repeats`` calls after one
    warm-up. On CUDA each call is timed between two ``torch.cuda.Event``\\ s after a
    synchronise, so queued work is not charged to it; elsewhere with ``clock`` (seconds)."""
    result = fn()
    times = []
    cuda = device.type == "cuda"
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = clock()
            result = fn()
            times.append((clock() - t0) * 1e3)
    return statistics.median(times), result


def _default_measure_on(device: torch.device) -> bool:
    """Time only where it is meaningful and allowed: CUDA, outside graph capture and tracing."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return False
    return not torch.cuda.is_current_stream_capturing()


class AutoSelect:
    """A selection function (the signature of :func:`fastsae.ops._torch.select_topk`) that runs
    one of ``candidates`` per call: the explicit strategy if one is set, else the measured
    winner for the call's :class:`SelectionKey`.

    Args:
        candidates: name -> selection function, names from ``DEFAULT_ORDER``.
        clock: the CPU clock for :func:`time_call` (tests inject a fake one).
        measure_on: whether to time on this device (default: CUDA outside capture/tracing).
    """

    def __init__(
        self,
        candidates: Mapping[str, Callable],
        *,
        clock: Callable[[], float] = time.perf_counter,
        measure_on: Callable[[torch.device], bool] = _default_measure_on,
    ):
        self.candidates = dict(candidates)
        self.clock = clock
        self.measure_on = measure_on
        self.winners: dict[SelectionKey, str] = {}
        self._lock = threading.Lock()

    def eligible(self) -> tuple[str, ...]:
        """Candidates the requested backend allows, in ``DEFAULT_ORDER``."""
        triton_only = ("fused", "slab", "fused_registers")
        allowed = DEFAULT_ORDER if requested_backend() == "auto" else triton_only
        return tuple(name for name in allowed if name in self.candidates)

    def key(self, x_in: Tensor, W_enc: Tensor, k: int, **kwargs) -> SelectionKey:
        dead = kwargs.get("dead_mask")
        k_aux = kwargs.get("k_aux", 0) if dead is not None else 0
        return SelectionKey(
            str(x_in.device),
            "select_topk",
            str(x_in.dtype).removeprefix("torch."),
            _next_pow2(x_in.shape[0]),
            x_in.shape[1],
            W_enc.shape[1],
            _next_pow2(k),
            _next_pow2(k_aux) if k_aux else 0,
            kwargs.get("threshold") is not None,
            self.eligible(),
        )

    def __call__(self, x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, **kwargs):
        strategy = get_encode_strategy()
        if strategy != "auto":
            if strategy not in self.candidates:
                raise ValueError(f"encode strategy {strategy!r} is not available here")
            return self.candidates[strategy](x_in, W_enc, b_enc, k, **kwargs)
        key = self.key(x_in, W_enc, k, **kwargs)
        winner = self.winners.get(key)
        if winner is None and len(key.candidates) > 1 and self.measure_on(x_in.device):
            return self._measure(key, x_in, W_enc, b_enc, k, kwargs)
        names = (winner,) if winner else key.candidates
        for i, name in enumerate(names):
            try:
                return self.candidates[name](x_in, W_enc, b_enc, k, **kwargs)
            except ValueError as e:
                # An argument the implementation refuses before any launch (e.g. k above its
                # MAX_K): the next one in DEFAULT_ORDER takes the call instead of crashing it.
                if i == len(names) - 1:
                    raise
                logger.info("fastsae encode: %s refused %s (%s); trying %s", name, _fmt(key), e,
                            names[i + 1])  # fmt: skip
        raise AssertionError("unreachable")

    def _measure(self, key: SelectionKey, x_in, W_enc, b_enc, k, kwargs):
        """Time every candidate of ``key``; cache and log the fastest; return its result."""
        times, results, failures = {}, {}, {}
        for name in key.candidates:
            fn = self.candidates[name]
            try:
                times[name], results[name] = time_call(
                    lambda fn=fn: fn(x_in, W_enc, b_enc, k, **kwargs), x_in.device, clock=self.clock
                )
            except Exception as e:  # noqa: BLE001 - any failure excludes the candidate
                failures[name] = e
                logger.info("fastsae encode auto: %s excluded for %s: %r", name, _fmt(key), e)
        if not times:
            raise RuntimeError(f"every encode strategy failed for {_fmt(key)}: {failures}")
        winner = min(times, key=times.get)
        with self._lock:
            self.winners[key] = winner
        report = ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(times.items(), key=lambda i: i[1]))
        logger.info("fastsae encode auto: %s wins for %s (%s)", winner, _fmt(key), report)
        return results[winner]


def _fmt(key: SelectionKey) -> str:
    aux = f" k_aux~{key.k_aux}" if key.k_aux else ""
    thr = " threshold" if key.threshold else ""
    return (
        f"{key.op} {key.device} {key.dtype} B~{key.rows} d_in={key.d_in} d_sae={key.d_sae} "
        f"k~{key.k}{aux}{thr}"
    )
