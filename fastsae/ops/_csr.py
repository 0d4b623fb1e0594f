"""The CSR-by-latent layout of a step's latent ids, built once and shared by its weight gradients.

Three reductions of an SAE training step group ``[B, k]`` latent ids by latent:

- the decoder's ``grad_W_dec`` over the main ids ``indices [B, k]``;
- the AuxK decoder's ``grad_W_dec`` over ``aux_indices [B, k_aux]``;
- the encoder's ``grad_W_enc`` / ``grad_b_enc`` over both, ``cat([indices, aux_indices], 1)``.

Each used to sort its own ids. :class:`SharedCSR` sorts the concatenation once (lazily, at the
first backward that asks) and derives the other two from it without a second sort: filtering a
stable sort of the flat ids ``b * K + j`` to the columns ``j`` of one part keeps the order
``(latent, b, j)``, which is exactly the stable sort of that part's own ids. The derived layout
is the one :func:`csr_by_latent` would build (same offsets, entries and rows, element for
element), so every gradient is bitwise the same as before; a test checks it. The derivation is a
cumsum and two scatters of ``B * K`` int64 elements, with static shapes (no host sync). On CPU
the two parts sort their own ids instead, which measured faster there
(:data:`DERIVE_PARTS_ON_CPU`); only the encoder's layout of both is then shared.

The encoder registers its output index tensors here (:func:`share`); a backend's
``sparse_decode`` looks its ``indices`` up (:func:`shared_csr_of`) and, when found, takes its
``grad_W_dec`` layout from the shared object. Anything else (an index tensor made elsewhere, a
reshaped copy, tracing under ``torch.compile``) builds its own layout, as before.

Pure torch: the ``torch`` backend uses it without Triton; :mod:`fastsae.kernels.csr` re-exports
:class:`CSR` and :func:`csr_by_latent`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["CSR", "SharedCSR", "csr_by_latent", "share", "shared_csr_of"]


class CSR(NamedTuple):
    """``[B, K]`` latent ids grouped by latent: latent ``i`` owns positions
    ``offsets[i]:offsets[i + 1]`` of ``entries`` (flat ids ``b * K + j``, increasing) and of
    ``rows`` (their ``b``). Build it once per set of ids; every reduction over them reuses it."""

    offsets: Tensor  # [n + 1] int64
    entries: Tensor  # [B*K] int64
    rows: Tensor  # [B*K] int64


def csr_by_latent(indices: Tensor, n: int) -> CSR:
    """Group the entries of ``indices`` (``[B, K]`` int64 ids in ``[0, n)``, duplicates allowed)
    by latent. The sort is stable, so the reduction order, and the result, are reproducible."""
    flat = indices.reshape(-1)
    # int32 keys when they fit: a CPU stable sort of 98k ids took 0.50 ms against 0.84 ms for
    # int64 (B=1024, k + k_aux = 96, n = 2048, one thread); the entries stay int64.
    keys = flat.to(torch.int32) if n <= torch.iinfo(torch.int32).max else flat
    sorted_ids, entries = torch.sort(keys, stable=True)
    # searchsorted rather than bincount + cumsum: bincount sizes its output from max(ids), a
    # device-to-host sync on CUDA in the middle of the backward; searchsorted needs none.
    bounds = torch.arange(n + 1, device=flat.device, dtype=keys.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds)
    rows = entries // max(indices.shape[1], 1)
    return CSR(offsets, entries, rows)


def csr_columns(csr: CSR, K: int, lo: int, hi: int) -> CSR:
    """The layout of columns ``lo:hi`` of the ``[B, K]`` ids ``csr`` was built from, equal
    element for element to ``csr_by_latent(indices[:, lo:hi], n)``, without sorting again.

    Kept positions move to the front in order (the stable filter), the others behind them, by
    one scatter; the new offsets count the kept positions before each old offset.
    """
    if lo == 0 and hi == K:
        return csr
    offsets, entries, rows = csr
    E, width = entries.shape[0], hi - lo
    col = entries - rows * K
    keep = (col >= lo) & (col < hi)
    kept_before = torch.cumsum(keep, 0)  # inclusive
    n_keep = rows.shape[0] // max(K, 1) * width  # B * width: a static count
    pos = torch.arange(E, device=entries.device)
    dest = torch.where(keep, kept_before - 1, n_keep + pos - kept_before)
    new_entries = torch.empty_like(entries).scatter_(0, dest, rows * width + (col - lo))
    new_rows = torch.empty_like(rows).scatter_(0, dest, rows)
    before = torch.cat([kept_before.new_zeros(1), kept_before])
    return CSR(before[offsets], new_entries[:n_keep], new_rows[:n_keep])


#: Whether CPU steps also derive the main and AuxK layouts from the one sort of both (as GPU
#: steps do: static shapes, no host sync). On CPU, sorting each part's own int32 ids was faster at
#: every shape measured (``benchmarks.run --only csr_layouts_per_step``, one thread): 2.4 ms
#: against 4.3 ms at B=1024, k=32, k_aux=64, n=2048; 28 ms against 66 ms at B=4096, k_aux=192;
#: 110 ms against 285 ms at B=4096, k_aux=384, n=16384. The derivation's dozen passes over the
#: ``B·K`` int64 entries cost more than the sorts they replace.
DERIVE_PARTS_ON_CPU = False


class SharedCSR:
    """One step's layouts: the main ids ``[B, k]`` and AuxK ids ``[B, k_aux]`` (or none). The
    encoder's layout of both (``"all"``) is sorted once, at the first :meth:`csr` call that needs
    it, and kept; ``"main"`` and ``"aux"`` are derived from it at each call, or, on CPU
    (:data:`DERIVE_PARTS_ON_CPU` False), sorted from their own ids.

    Parts: ``"main"`` (the decoder), ``"aux"`` (the AuxK decoder), ``"all"`` (the encoder: main
    then AuxK columns, the order of its ``cat``).
    """

    #: Sorts made by all SharedCSR objects (a test counts them).
    builds = 0

    def __init__(self, indices: Tensor, aux_indices: Tensor | None, n: int):
        # Detached aliases, not the caller's tensors: the registry below is keyed weakly by
        # those, and a strong reference from its value would keep the key alive.
        self.indices = indices.detach()
        self.aux_indices = None if aux_indices is None else aux_indices.detach()
        self.n = n
        self._all: CSR | None = None

    def csr(self, part: str) -> CSR:
        """The layout of ``part`` (``"main"``, ``"aux"`` or ``"all"``). Only the sorted layout of
        both is kept; a part is derived at each call (each is used once per step, and keeping
        them would hold ``16 B·K`` more bytes until the step ends). On CPU, unless
        ``DERIVE_PARTS_ON_CPU``, the main and AuxK parts sort their own ids instead (the same
        layout, element for element)."""
        # without AuxK ids the main layout is the layout of both: one sort either way
        has_aux = self.aux_indices is not None and self.aux_indices.shape[1] > 0
        own = has_aux and part in ("main", "aux")
        if own and not DERIVE_PARTS_ON_CPU and self.indices.device.type == "cpu":
            SharedCSR.builds += 1
            ids = self.indices if part == "main" else self.aux_indices
            return csr_by_latent(ids.long(), self.n)
        if self._all is None:
            ids = self.indices
            if self.aux_indices is not None and self.aux_indices.shape[1]:
                ids = torch.cat([ids, self.aux_indices], dim=1)
            self._all = csr_by_latent(ids.long(), self.n)
            SharedCSR.builds += 1
        k = self.indices.shape[1]
        K = k + (0 if self.aux_indices is None else self.aux_indices.shape[1])
        lo, hi = {"main": (0, k), "aux": (k, K), "all": (0, K)}[part]
        return csr_columns(self._all, K, lo, hi)

    def release(self) -> None:
        """Drop the sorted layout (the encoder backward, its last user in a step, calls this; a
        later call sorts again)."""
        self._all = None


_SHARED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def share(layout: SharedCSR, indices: Tensor, aux_indices: Tensor | None) -> None:
    """Register the encoder's output ids, so that decoding them reuses ``layout``."""
    if torch.compiler.is_compiling():
        return
    _SHARED[indices] = (layout, "main")
    if aux_indices is not None:
        _SHARED[aux_indices] = (layout, "aux")


def shared_csr_of(indices: Tensor, n: int) -> Callable[[], CSR] | None:
    """A function returning the shared layout of ``indices`` (this very tensor object, as the
    encoder returned it) over ``n`` latents, or ``None``: the caller then builds its own."""
    if torch.compiler.is_compiling():
        return None
    found = _SHARED.get(indices)
    if found is None or found[0].n != n:
        return None
    layout, part = found
    return lambda: layout.csr(part)
