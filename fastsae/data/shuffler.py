"""``ActivationShuffler``: the pinned-memory, double-buffered feeder between an activation source
(a live model or the on-disk cache) and SAE training.

How it works::

    source chunks --fill thread--> mixing buffer (N rows + S spare, pinned host memory)
                                        |
                          batcher thread: seeded permutation of the N valid rows,
                          gathers S of them into batches of B, hands the S slots back
                                        |
                  CPU: the batch tensors        CUDA: pinned staging -> 2 device buffers,
                                                copied on a side stream (non_blocking)
                                        |
                                 training loop: ``for batch in shuffler``

Phases: the buffer holds ``N`` valid rows. Each phase draws a permutation of them, serves the
first ``S`` (a multiple of ``B``) as batches and gives those ``S`` slots to the fill thread, while
the fill thread has already written the next ``S`` source rows into the spare slots; those join
the ``N - S`` rows left behind and the next phase mixes them all. When the source runs out, the
rest of the buffer is served in one last permutation. Every source row is therefore delivered
exactly once, and the order depends only on the seed and the source's order, never on timing.

CUDA: the batcher gathers batch ``t + 1`` into a pinned staging buffer and copies it, on a side
stream, into device buffer ``(t + 1) % 2``, after waiting on an event that the training loop
recorded when it asked for batch ``t`` (so buffer ``(t + 1) % 2``, which held batch ``t - 1``,
is free). The compute stream waits only on the event of the buffer it is about to use. The copy
of batch ``t + 1`` thus overlaps the SAE step on batch ``t``.

A batch is a dict ``{column: Tensor[b, d]}`` (``[b]`` for 1-D columns such as ``tokens``). On
CUDA it is a view of a reused device buffer: it stays valid until the next ``next()`` call; clone
what you keep. An exception in a background thread is raised again in the training loop.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import nvtx
import torch
from torch import Tensor

__all__ = ["ActivationShuffler"]

_END = object()
_POLL_S = 0.1  # how often a blocked thread checks for close()
# torch intra-op threads for the batcher's gathers (the setting is per thread). Gathers are
# memory-bound: on the 2-core CPU machine one thread copied 1.61 GB/s, two 1.53 GB/s, and a
# second OpenMP team beside the model's (live path) oversubscribes the cores. Hosts with more
# cores get a few threads.
_GATHER_THREADS = 1 if (os.cpu_count() or 1) <= 4 else 4


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Closed(Exception):
    pass


class _Pipeline:
    """The two background threads and the state they share. The threads hold this object, not
    the :class:`ActivationShuffler`, so dropping the shuffler stops them (``__del__``)."""

    def __init__(self, chunks, *, batch_size, buffer_tokens, refill_tokens, seed, device, dtype,
                 columns, drop_last) -> None:  # fmt: skip
        self.chunks = chunks
        self.batch_size = batch_size
        self.buffer_tokens = buffer_tokens
        self.refill_tokens = refill_tokens
        self.seed = seed
        self.device = device
        self.cuda = device.type == "cuda"
        self.dtype = dtype
        self.columns = columns
        self.drop_last = drop_last
        self.storage: dict[str, Tensor] = {}
        self.stop = threading.Event()
        self.filled: queue.Queue = queue.Queue()
        self.free: queue.Queue = queue.Queue()
        self.out: queue.Queue = queue.Queue(maxsize=4)
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.released: list[queue.Queue] = [queue.Queue(), queue.Queue()]
            self.device_bufs: list[dict[str, Tensor]] = []
        self.threads = [
            threading.Thread(target=self._guard(self._fill_loop, self.filled), daemon=True),
            threading.Thread(target=self._guard(self._batch_loop, self.out), daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    # -- plumbing ------------------------------------------------------------------------------

    def _guard(self, fn, report: queue.Queue):
        def run() -> None:
            try:
                fn()
            except _Closed:
                pass
            except BaseException as exc:  # handed to the consumer, raised there
                with contextlib.suppress(_Closed):
                    self._put(report, _Failure(exc))

        return run

    def _put(self, q: queue.Queue, item: Any) -> None:
        while True:
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                if self.stop.is_set():
                    raise _Closed from None

    def _get(self, q: queue.Queue) -> Any:
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if self.stop.is_set():
                    raise _Closed from None

    def close(self) -> None:
        self.stop.set()
        while True:  # unblock a batcher waiting on a full queue
            try:
                self.out.get_nowait()
            except queue.Empty:
                break
        self.join()

    def join(self) -> None:
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)

    # -- fill thread ---------------------------------------------------------------------------

    def _allocate(self, chunk: dict[str, Tensor]) -> None:
        names = self.columns if self.columns is not None else list(chunk)
        missing = [n for n in names if n not in chunk]
        if missing:
            raise KeyError(f"columns {missing} are not in the source; it has {list(chunk)}")
        capacity = self.buffer_tokens + self.refill_tokens
        for name in names:
            t = chunk[name]
            dtype = self.dtype if (self.dtype is not None and t.is_floating_point()) else t.dtype
            self.storage[name] = torch.empty(
                (capacity, *t.shape[1:]), dtype=dtype, pin_memory=self.cuda
            )

    def _fill_loop(self) -> None:
        iterator = iter(self.chunks)
        state: dict[str, Any] = {"chunk": None, "offset": 0, "rows": 0}

        def fill(slots: Tensor) -> int:
            """Write the next source rows into ``slots``; fewer than asked means exhausted."""
            written = 0
            with nvtx.annotate("fastsae.shuffler.fill", color="blue"):
                while written < len(slots):
                    if self.stop.is_set():
                        raise _Closed
                    if state["offset"] == state["rows"]:
                        try:
                            chunk = next(iterator)
                        except StopIteration:
                            return written
                        if not self.storage:
                            self._allocate(chunk)
                        rows = {len(chunk[n]) for n in self.storage}
                        if len(rows) != 1:
                            raise ValueError(f"chunk columns have different row counts: {rows}")
                        state.update(chunk=chunk, offset=0, rows=rows.pop())
                        continue
                    m = min(len(slots) - written, state["rows"] - state["offset"])
                    target = slots[written : written + m]
                    for name, store in self.storage.items():
                        src = state["chunk"][name][state["offset"] : state["offset"] + m]
                        store.index_copy_(0, target, src.to("cpu", store.dtype))
                    written += m
                    state["offset"] += m
            return written

        n = self.buffer_tokens
        count = fill(torch.arange(n))
        self._put(self.filled, count)
        if count < n:
            return
        free = torch.arange(n, n + self.refill_tokens)
        while True:
            count = fill(free)
            self._put(self.filled, (free, count))
            if count < len(free):
                return
            free = self._get(self.free)

    # -- batcher thread ------------------------------------------------------------------------

    def _batch_loop(self) -> None:
        torch.set_num_threads(_GATHER_THREADS)
        generator = torch.Generator().manual_seed(self.seed)
        count = self._get(self.filled)
        if isinstance(count, _Failure):
            self._put(self.out, count)
            return
        valid = torch.arange(count)
        exhausted = count < self.buffer_tokens
        t = 0
        while len(valid):
            order = valid[torch.randperm(len(valid), generator=generator)]
            serve = len(valid) if exhausted else self.refill_tokens
            for start in range(0, serve, self.batch_size):
                idx = order[start : min(start + self.batch_size, serve)]
                if len(idx) < self.batch_size and self.drop_last:
                    break
                self._emit(idx, t)
                t += 1
            if exhausted:
                break
            # Sorted, so that the fill thread writes the freed slots in address order.
            self._put(self.free, order[:serve].sort().values)
            got = self._get(self.filled)
            if isinstance(got, _Failure):
                self._put(self.out, got)
                return
            spare, count = got
            valid = torch.cat([order[serve:], spare[:count]])
            exhausted = count < len(spare)
        self._put(self.out, _END)

    def _emit(self, idx: Tensor, t: int) -> None:
        if not self.cuda:
            with nvtx.annotate("fastsae.shuffler.gather", color="yellow"):
                batch = {name: store.index_select(0, idx) for name, store in self.storage.items()}
            self._put(self.out, batch)
            return
        if t == 0:
            self.staging = [self._buffers(pin=True) for _ in range(2)]
            self.device_bufs = [self._buffers(device=self.device) for _ in range(2)]
            self.copied: list[Any] = [None, None]
        slot, rows = t % 2, len(idx)
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # the copy out of this staging buffer is done
        with nvtx.annotate("fastsae.shuffler.gather", color="yellow"):
            for name, store in self.storage.items():
                torch.index_select(store, 0, idx, out=self.staging[slot][name][:rows])
        if t >= 2:
            # Recorded by the consumer when it asked for batch t - 1, i.e. after the work on
            # batch t - 2 (which used this device buffer) was queued on the compute stream.
            self.copy_stream.wait_event(self._get(self.released[slot]))
        copy_range = nvtx.annotate("fastsae.shuffler.copy", color="red")
        with copy_range, torch.cuda.stream(self.copy_stream):
            for name, buf in self.device_bufs[slot].items():
                buf[:rows].copy_(self.staging[slot][name][:rows], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        self.copied[slot] = ready
        self._put(self.out, (slot, rows, ready))

    def _buffers(
        self, *, pin: bool = False, device: torch.device | None = None
    ) -> dict[str, Tensor]:
        return {
            name: torch.empty(
                (self.batch_size, *store.shape[1:]),
                dtype=store.dtype,
                device=device or "cpu",
                pin_memory=pin,
            )
            for name, store in self.storage.items()
        }


class ActivationShuffler:
    """Shuffle rows from ``chunks`` (an iterable of ``{column: Tensor[n, d] or [n]}``, all columns
    with the same ``n``) into batches of ``batch_size`` rows: one pass, filled in the background.

    Args:
        chunks: the source, read once, in order: ``source.stream(token_batches)`` for a live
            model, ``cache.chunks()`` for the cache, or any iterable of such dicts.
        batch_size: rows per batch ``B``; the last batch of the pass may be smaller unless
            ``drop_last``.
        buffer_tokens: rows ``N`` in the mixing buffer (>= 2 B). Batches mix rows from across
            the whole buffer, so ``N`` should span many sequences.
        refill_fraction: share of the buffer served per phase, rounded down to a multiple of
            ``B``. The buffer takes ``N + that`` rows of host memory.
        seed: seeds the permutations: the same seed and source give the same batches.
        device: where batches are delivered; CUDA enables pinned memory and the copy stream.
        dtype: dtype of floating columns in the buffer and the batches (default: the source's).
        columns: the columns to carry (default: all of the first chunk's).
        drop_last: leave out the final batch when it is smaller than ``B``.

    Use it as an iterator, ideally in a ``with`` block (or call :meth:`close`) so that the
    threads stop at once when a loop ends early.
    """

    def __init__(
        self,
        chunks: Iterable[dict[str, Tensor]],
        *,
        batch_size: int,
        buffer_tokens: int = 1 << 18,
        refill_fraction: float = 0.5,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        columns: Sequence[str] | None = None,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if buffer_tokens < 2 * batch_size:
            raise ValueError(
                f"buffer_tokens={buffer_tokens} must be >= 2 * batch_size={2 * batch_size}"
            )
        if not 0 < refill_fraction <= 1:
            raise ValueError(f"refill_fraction={refill_fraction} must be in (0, 1]")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.batch_size = batch_size
        self.buffer_tokens = buffer_tokens
        #: Rows served (and refilled) per phase: a multiple of ``batch_size``.
        self.refill_tokens = max(
            batch_size, int(buffer_tokens * refill_fraction) // batch_size * batch_size
        )
        self.device = device
        self.cuda = device.type == "cuda"
        #: Seconds the consumer spent waiting for a batch (starvation), and rows delivered.
        self.wait_seconds = 0.0
        self.rows_delivered = 0
        self._finished = False
        self._last_slot: int | None = None
        self._pipe = _Pipeline(
            chunks,
            batch_size=batch_size,
            buffer_tokens=buffer_tokens,
            refill_tokens=self.refill_tokens,
            seed=seed,
            device=device,
            dtype=dtype,
            columns=list(columns) if columns is not None else None,
            drop_last=drop_last,
        )

    @classmethod
    def from_cache(cls, cache, columns: Sequence[str] | None = None, **kwargs: Any):
        """One shuffled pass over an :class:`~fastsae.data.ActivationCache` (hooks and tokens
        unless ``columns`` says otherwise)."""
        return cls(cache.chunks(columns), **kwargs)

    @classmethod
    def from_source(cls, source, batches: Iterable[Tensor], **kwargs: Any):
        """One shuffled pass over the live activations of ``source`` on ``batches``
        (``LongTensor [b, ctx]`` each)."""
        return cls(source.stream(batches), **kwargs)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self._finished:
            raise StopIteration
        pipe = self._pipe
        with nvtx.annotate("fastsae.shuffler.hand_over", color="green"):
            if self.cuda and self._last_slot is not None:
                # All work on the previous batch is queued: after it, its buffer may be reused.
                released = torch.cuda.Event()
                released.record(torch.cuda.current_stream(self.device))
                pipe.released[self._last_slot].put(released)
            start = time.perf_counter()
            item = pipe.out.get()
            self.wait_seconds += time.perf_counter() - start
            if item is _END:
                self._finished = True
                pipe.join()
                raise StopIteration
            if isinstance(item, _Failure):
                self._finished = True
                pipe.close()
                raise item.exc
            if self.cuda:
                slot, rows, ready = item
                torch.cuda.current_stream(self.device).wait_event(ready)
                self._last_slot = slot
                item = {name: buf[:rows] for name, buf in pipe.device_bufs[slot].items()}
            self.rows_delivered += next(iter(item.values())).shape[0]
            return item

    def close(self) -> None:
        """Stop the background threads now (a finished pass or an error stops them too)."""
        self._finished = True
        self._pipe.close()

    def __enter__(self) -> ActivationShuffler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        pipe = getattr(self, "_pipe", None)
        if pipe is not None:
            pipe.stop.set()
