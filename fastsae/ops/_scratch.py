"""Reusable CPU memory for the selection's pre-activation slabs.

The torch backend's encoders compute pre-activations one ``[B, slab]`` slab at a time
(:data:`fastsae.ops._torch.SLAB_ELEMENTS`, 2^26 elements: 256 MiB in fp32). On CPU a fresh block
that large is a fresh ``mmap`` from the C allocator (glibc serves blocks above 32 MiB that way and
returns them on free), so the GEMM's first write page-faults every 4 KiB page of it, every step.
At B=4096, d_in=768, n=16384 on the 2-core machine of ``benchmarks/results/cpu-x86_64.jsonl``
that was ~75 ms of a ~800 ms fp32 step (``addmm`` into a fresh matrix then ``topk``: 720 ms; into
a reused one: 643 ms).

Inside :func:`scratch_memory` those slabs are views of one buffer per dtype that the
:class:`ScratchPool` keeps between calls. The trainer holds a pool for its whole life (CPU only)
and wraps its steps and evaluations in it; code that encodes in a loop can do the same::

    pool = fastsae.ops.ScratchPool()
    with fastsae.ops.scratch_memory(pool):
        for x in batches:
            codes = sae.encode(x)

CUDA tensors are never pooled: PyTorch's caching allocator already reuses their memory.

The pool covers the slabs; a step's other large blocks (the ``[d_sae, d_in]`` weight gradients,
48 MiB each at the shape above, fresh from ``embedding_bag``) fault in the same way: 12,289 minor
faults and ~13 ms per gradient per step, measured. :func:`keep_freed_memory` asks glibc to keep
such blocks for reuse instead (the CPU trainer calls it unless ``keep_freed_memory=False``).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import sys
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["ScratchPool", "keep_freed_memory", "scratch_memory"]


class ScratchPool:
    """One reusable CPU buffer per dtype, grown to the largest slab asked of it.

    A slab is valid until the next :meth:`take` of its dtype: callers consume it (select from it)
    before computing the next, and never return a view of it.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, Tensor] = {}

    def take(self, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        """A contiguous ``[rows, cols]`` view of the pool's ``dtype`` buffer (uninitialised)."""
        numel = rows * cols
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(dtype, None)  # free the smaller buffer before allocating
            buf = self._buffers[dtype] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(rows, cols)

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def tensors(self) -> list[Tensor]:
        """The pool's buffers (for memory accounting)."""
        return list(self._buffers.values())

    def clear(self) -> None:
        """Release every buffer."""
        self._buffers.clear()


_ACTIVE: contextvars.ContextVar[ScratchPool | None] = contextvars.ContextVar(
    "fastsae_scratch_pool", default=None
)


@contextlib.contextmanager
def scratch_memory(pool: ScratchPool | None = None) -> Iterator[ScratchPool]:
    """Reuse ``pool``'s buffers (a new pool if None) for the slabs of every encode in the block.

    ``None`` as the active pool (the default outside any block) allocates each slab afresh. The
    setting is per thread (a context variable)."""
    pool = ScratchPool() if pool is None else pool
    token = _ACTIVE.set(pool)
    try:
        yield pool
    finally:
        _ACTIVE.reset(token)


def ensure_scratch() -> contextlib.AbstractContextManager:
    """The active pool for the block if one is set (a trainer's), else a new one that lives as
    long as the block: for code that encodes batch after batch (evaluations)."""
    active = _ACTIVE.get()
    return contextlib.nullcontext(active) if active is not None else scratch_memory()


def slab_addmm(bias: Tensor, x: Tensor, W: Tensor) -> Tensor:
    """``torch.addmm(bias, x, W)`` (``[B, w]``), written into the active pool's buffer when there
    is one, the operands are CPU tensors of one dtype and no gradient is being recorded."""
    pool = _ACTIVE.get()
    if (
        pool is None
        or x.device.type != "cpu"
        or not (x.dtype == W.dtype == bias.dtype)
        or (torch.is_grad_enabled() and (x.requires_grad or W.requires_grad or bias.requires_grad))
    ):
        return torch.addmm(bias, x, W)
    out = pool.take(x.shape[0], W.shape[1], x.dtype)
    return torch.addmm(bias, x, W, out=out)


#: mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap, not from their own ``mmap`` (glibc's default
#: threshold adapts between 128 KiB and 32 MiB).
KEEP_BLOCKS_UP_TO = 1 << 30
#: Free memory at the top of the heap kept before any is returned to the system (mallopt takes
#: an int: the largest value it accepts).
KEEP_FREE_BYTES = 2**31 - 1
_kept = False


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep the large blocks a step frees, so the next step reuses them
    instead of faulting fresh pages in; returns whether the setting is in effect.

    By default glibc serves a block above its mmap threshold (at most 32 MiB) with its own
    ``mmap`` and unmaps it on free, so every step's gradients and other large temporaries are
    faulted in page by page (4 KiB) again. This raises the threshold to
    :data:`KEEP_BLOCKS_UP_TO` and the trim threshold to :data:`KEEP_FREE_BYTES` with
    ``mallopt``. It is process-wide and stays for the life of the process: memory freed after
    training is kept by the process rather than returned to the system, as with jemalloc or
    tcmalloc (which PyTorch's CPU tuning guide recommends for the same reason). A no-op returning
    False off Linux or on a C library other than glibc.
    """
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = (
        mallopt(_M_MMAP_THRESHOLD, KEEP_BLOCKS_UP_TO) == 1
        and mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES) == 1
    )
    return _kept
