"""Named ranges that Nsight and ``torch.profiler`` both see, and a wall-clock total per name.

fastsae marks its phases with ``nvtx.annotate`` (``Trainer.step``: ``sae.forward+loss``,
``sae.backward``, ``optimizer``, ``bookkeeping``; the shuffler's threads:
``fastsae.shuffler.fill``, ``fastsae.shuffler.gather``). Nsight Systems shows NVTX ranges, but
``torch.profiler`` does not, least of all on a CPU. :func:`instrument` therefore swaps, for as long
as it is active, the ``nvtx`` module those files use for a stand-in whose ``annotate`` opens three
things under the same name: the real NVTX range, a ``torch.profiler.record_function`` and a
wall-clock timer. It also wraps the ops that dominate a step (the encoders and decoders of
:mod:`fastsae.ops`) in ranges of their own, ``encode+topk`` and ``decode``.

``torch.profiler`` records ``record_function`` only on the thread that started it, so ranges on
the shuffler's background threads reach the Chrome trace through :meth:`Collector.trace_events`,
which the caller merges into the exported file.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import nvtx
import torch

#: Modules whose ``nvtx`` global is swapped while instrumented.
NVTX_USERS = ("fastsae.train.trainer", "fastsae.data.shuffler")
#: fastsae.ops function -> the range its calls get.
OP_RANGES = {
    "encode_topk": "encode+topk",
    "encode_batch_topk": "encode+topk",
    "encode_jumprelu": "encode+topk",
    "pre_activations": "encode+topk",
    "sparse_decode": "decode",
    "dense_decode": "decode",
}


@dataclass
class Span:
    name: str
    thread: str
    tid: int
    start_ns: int  # time.time_ns(), the clock the Chrome trace is based on
    end_ns: int


@dataclass
class Collector:
    """Thread-safe record of every range closed while :attr:`active`."""

    sync_cuda: bool = False
    active: bool = False
    spans: list[Span] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def range(self, name: str, color: str | None = None) -> Iterator[None]:
        """An NVTX range, a ``record_function`` and a timer, all called ``name``."""
        start = time.time_ns()
        with nvtx.annotate(name, color=color), torch.profiler.record_function(name):
            try:
                yield
            finally:
                if self.sync_cuda and torch.cuda.is_available():
                    torch.cuda.synchronize()
        end = time.time_ns()
        if self.active:
            thread = threading.current_thread()
            with self._lock:
                self.spans.append(Span(name, thread.name, thread.native_id or 0, start, end))

    def totals(self) -> dict[tuple[str, str], list[float]]:
        """``(thread kind, name) -> [seconds of each occurrence]``; the thread kind is ``main``
        or ``background``. Nested occurrences of one name (a decode inside a decode) count once."""
        out: dict[tuple[str, str], list[float]] = {}
        open_until: dict[tuple[int, str], int] = {}
        for span in sorted(self.spans, key=lambda s: (s.start_ns, -s.end_ns)):
            key = (span.tid, span.name)
            if open_until.get(key, -1) >= span.end_ns:
                continue  # inside an outer range of the same name
            open_until[key] = span.end_ns
            kind = "main" if span.thread == "MainThread" else "background"
            out.setdefault((kind, span.name), []).append((span.end_ns - span.start_ns) / 1e9)
        return out

    def trace_events(self, base_time_ns: int, pid: int) -> list[dict[str, Any]]:
        """Chrome-trace events for the ranges of background threads (``torch.profiler`` misses
        them). ``base_time_ns`` is the trace's ``baseTimeNanoseconds``."""
        return [
            {
                "ph": "X",
                "cat": "user_annotation",
                "name": s.name,
                "pid": pid,
                "tid": s.tid,
                "ts": (s.start_ns - base_time_ns) / 1e3,
                "dur": (s.end_ns - s.start_ns) / 1e3,
                "args": {"thread": s.thread, "source": "profiling.ranges"},
            }
            for s in self.spans
            if s.thread != "MainThread"
        ]


class _NvtxStandIn:
    """Looks like the ``nvtx`` module to fastsae; ``annotate`` goes through the collector."""

    def __init__(self, collector: Collector):
        self._collector = collector

    def annotate(self, message: str | None = None, color: str | None = None, **_: Any):
        return self._collector.range(message or "", color)

    def __getattr__(self, name: str) -> Any:
        return getattr(nvtx, name)


@contextlib.contextmanager
def instrument(collector: Collector) -> Iterator[Collector]:
    """Route fastsae's NVTX ranges through ``collector`` and wrap the heavy ops in ranges."""
    stand_in = _NvtxStandIn(collector)
    restore: list[tuple[Any, str, Any]] = []
    for module_name in NVTX_USERS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # e.g. the data pipeline is not there
            continue
        if hasattr(module, "nvtx"):
            restore.append((module, "nvtx", module.nvtx))
            module.nvtx = stand_in
    from fastsae import ops

    for fn_name, range_name in OP_RANGES.items():
        fn = getattr(ops, fn_name, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, _name=range_name, **kwargs):
            with collector.range(_name):
                return _fn(*args, **kwargs)

        restore.append((ops, fn_name, fn))
        setattr(ops, fn_name, functools.wraps(fn)(wrapped))
    try:
        yield collector
    finally:
        for module, attr, original in reversed(restore):
            setattr(module, attr, original)
