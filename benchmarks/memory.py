"""Peak memory of one provider call, measured on its own even though every provider of a case
lives in one process.

CUDA: ``torch.cuda.reset_peak_memory_stats`` before the call, ``max_memory_allocated`` after.

CPU: the kernel keeps a resident-set high-water mark per process (``VmHWM`` in
``/proc/self/status``). ``ru_maxrss`` reports the same mark but can never be lowered, so after the
first large provider every later reading would be that provider's peak. Writing ``5`` to
``/proc/self/clear_refs`` resets ``VmHWM`` to the current resident size (Linux >= 4.0), which gives
a per-call peak. Freed heap pages that glibc keeps would hide part of a call's growth, so
``malloc_trim(0)`` hands them back first.

Besides the absolute peak, a call's *own* footprint is reported: ``peak_delta`` (the peak above the
level when the call began: activations, gradients that are freed again, temporaries) and
``state`` (the bytes the provider keeps between calls: parameters, gradients that stay, optimizer
moments, counters), summed from its tensors by :func:`owned_bytes`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class CallMemory:
    """Bytes: ``peak`` is absolute (the process or the device), ``delta`` is above the start."""

    kind: str  # "cuda" or "rss"
    peak: int
    delta: int


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(name).malloc_trim(0)


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def rss_tracking_available() -> bool:
    """Whether per-call CPU peaks can be measured here (Linux with a writable clear_refs)."""
    return _status_kib("VmHWM") is not None and _reset_hwm()


def measure_call(fn: Callable[[], Any]) -> CallMemory | None:
    """Run ``fn`` once and return its peak memory, or None where it cannot be measured."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return CallMemory("cuda", peak, peak - start)
    _malloc_trim()
    if not _reset_hwm():
        fn()
        return None
    start = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if start is None or peak is None:
        return None
    return CallMemory("rss", peak * 1024, max(0, peak - start) * 1024)


def owned_bytes(*roots: Any) -> int:
    """Bytes held by the tensors reachable from ``roots``: modules (parameters, their gradients,
    buffers), optimizers (state), tensors, and lists/tuples/dicts of those. Storage shared between
    roots is counted once."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or not isinstance(t, torch.Tensor) or t.is_meta:
            return
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key in seen or storage.data_ptr() == 0:
            return
        seen.add(key)
        total += storage.nbytes()

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            add(obj)
            add(obj.grad if obj.is_leaf else None)
        elif isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                visit(p)
            for b in obj.buffers():
                add(b)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                visit(list(state.values()))
        elif isinstance(obj, dict):
            visit(list(obj.values()))
        elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
            for item in obj:
                visit(item)

    for root in roots:
        visit(root)
    return total
