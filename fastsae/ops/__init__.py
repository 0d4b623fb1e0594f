"""The ops layer: every SAE module computes through these functions, which pick a backend.

Backends
--------
``reference``
    :mod:`fastsae.reference`, the float64-correct oracles (dense, slow, obviously right).
``torch``
    The fast path for CPUs and for GPUs without Triton: sparse and chunked, never a dense
    ``[B, d_sae]`` tensor where the op does not need one.
``triton``
    The Triton kernels in :mod:`fastsae.kernels` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).
``auto``
    ``triton`` when Triton is importable and either CUDA is available or ``TRITON_INTERPRET=1`` is
    set explicitly; ``torch`` otherwise. On CUDA the encoders' top-k selection is then chosen by
    measurement among the fused kernel, slab + select and torch (see below).

A backend may implement only some ops; a missing op falls back along ``triton -> torch ->
reference``, so every op always has an implementation and the fallback is visible through
:func:`implementation_of`.

Choose a backend with the ``FASTSAE_BACKEND`` environment variable (read at each call) or, which
wins, the context manager :func:`use_backend`::

    with fastsae.ops.use_backend("reference"):
        out = sae(x)

Encode strategies
-----------------
Under the ``triton`` backend the TopK, BatchTopK and JumpReLU encoders select with one of
:data:`ENCODE_STRATEGIES` (:mod:`fastsae.ops._encode_strategy`): ``fused`` (GEMM and top-k in
one Triton kernel: the threshold-filtered 128 x 128 kernel), ``fused_registers`` (the
earlier fused kernel, selection state in registers), ``slab`` (cuBLAS into bounded slabs + a streaming Triton top-k), ``torch``
(cuBLAS + ``torch.topk``), or ``auto`` (the default): the first call for a shape on a GPU times
the eligible ones and caches the fastest. Override with ``FASTSAE_ENCODE_STRATEGY`` or, which
wins, :func:`use_encode_strategy`.

Scratch memory
--------------
On CPU, :func:`scratch_memory` makes the torch backend's encoders compute their ``[B, slab]``
pre-activation slabs into one reused buffer (a :class:`ScratchPool`) instead of a fresh one per
call, which costs a page fault per 4 KiB page (:mod:`fastsae.ops._scratch`). The trainer does
this for its steps and evaluations, and (:func:`keep_freed_memory`) asks glibc to keep the other
large blocks a step frees for the next one.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

from torch import Tensor

from fastsae.ops._scratch import ScratchPool, keep_freed_memory, scratch_memory

__all__ = [
    "BACKENDS",
    "ENCODE_STRATEGIES",
    "EncodeTopKOutput",
    "ScratchPool",
    "batch_topk",
    "dense_decode",
    "encode_batch_topk",
    "encode_jumprelu",
    "encode_topk",
    "get_backend",
    "get_encode_strategy",
    "implementation_of",
    "jumprelu",
    "keep_freed_memory",
    "pre_activations",
    "requested_backend",
    "scratch_memory",
    "sparse_decode",
    "use_backend",
    "use_encode_strategy",
]

BACKENDS = ("auto", "triton", "torch", "reference")
ENCODE_STRATEGIES = ("auto", "fused", "fused_registers", "slab", "torch")
_FALLBACK = {
    "triton": ("triton", "torch", "reference"),
    "torch": ("torch", "reference"),
    "reference": ("reference",),
}
_MODULES = {
    "reference": "fastsae.ops._reference",
    "torch": "fastsae.ops._torch",
    "triton": "fastsae.ops._triton",
}
_local = threading.local()


class EncodeTopKOutput(NamedTuple):
    """Result of :func:`encode_topk`.

    values: ``[B, k]`` ReLU'd top-k pre-activations, sorted descending.
    indices: ``[B, k]`` int64 latent ids.
    aux_values: ``[B, k_aux']`` the same among dead latents, or ``None`` when ``k_aux == 0``.
        ``k_aux' = min(k_aux, n_dead)`` on the torch and reference backends (``None`` with no dead
        latent); the fixed ``min(k_aux, n)`` on the triton backend, zero-valued past the dead
        count (no host sync to count them).
    aux_indices: ``[B, k_aux']`` int64, or ``None``.
    """

    values: Tensor
    indices: Tensor
    aux_values: Tensor | None
    aux_indices: Tensor | None


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fastsae backend {name!r}; allowed: {', '.join(BACKENDS)}")
    return name


def _resolve_auto() -> str:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "torch"


def requested_backend() -> str:
    """The backend asked for (``use_backend``, else ``FASTSAE_BACKEND``, else ``auto``), before
    ``auto`` is resolved."""
    name = getattr(_local, "backend", None) or os.environ.get("FASTSAE_BACKEND", "auto")
    return _check_name(name)


def get_backend() -> str:
    """The backend that ops will use now: ``reference``, ``torch`` or ``triton`` (never ``auto``)."""
    name = requested_backend()
    return _resolve_auto() if name == "auto" else name


def get_encode_strategy() -> str:
    """The encoders' selection strategy now (one of :data:`ENCODE_STRATEGIES`):
    :func:`use_encode_strategy`, else ``FASTSAE_ENCODE_STRATEGY``, else ``auto``."""
    name = getattr(_local, "encode_strategy", None)
    name = name or os.environ.get("FASTSAE_ENCODE_STRATEGY", "auto")
    if name not in ENCODE_STRATEGIES:
        raise ValueError(
            f"unknown encode strategy {name!r}; allowed: {', '.join(ENCODE_STRATEGIES)}"
        )
    return name


@contextmanager
def use_encode_strategy(name: str) -> Iterator[str]:
    """Select with strategy ``name`` (one of :data:`ENCODE_STRATEGIES`) inside the ``with``
    block, in this thread; it wins over ``FASTSAE_ENCODE_STRATEGY`` and over measurement."""
    if name not in ENCODE_STRATEGIES:
        raise ValueError(
            f"unknown encode strategy {name!r}; allowed: {', '.join(ENCODE_STRATEGIES)}"
        )
    previous = getattr(_local, "encode_strategy", None)
    _local.encode_strategy = name
    try:
        yield name
    finally:
        _local.encode_strategy = previous


@contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Use backend ``name`` (one of :data:`BACKENDS`) inside the ``with`` block, in this thread."""
    _check_name(name)
    previous = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield get_backend()
    finally:
        _local.backend = previous


def implementation_of(op: str, backend: str | None = None) -> tuple[str, Callable]:
    """``(backend_name, function)`` that would run ``op`` under ``backend`` (default: current)."""
    backend = backend or get_backend()
    backend = _resolve_auto() if _check_name(backend) == "auto" else backend
    for candidate in _FALLBACK[backend]:
        try:
            module = importlib.import_module(_MODULES[candidate])
        except ImportError:
            if candidate == backend and candidate != "reference":
                raise
            continue
        fn = getattr(module, op, None)
        if fn is not None:
            return candidate, fn
    raise NotImplementedError(f"no backend implements op {op!r}")


def _call(op: str, *args, **kwargs):
    return implementation_of(op)[1](*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# Public ops. Shapes use B tokens, d_in, d_out, n = d_sae, k. Inputs are 2-D: modules flatten
# leading dimensions before calling.
# ------------------------------------------------------------------------------------------------


def pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """Dense pre-activations ``(x - b_dec) @ W_enc + b_enc``: ``[B, d_in]`` -> ``[B, n]``."""
    return _call("pre_activations", x, W_enc, b_enc, b_dec)


def encode_topk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    b_dec: Tensor | None = None,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
) -> EncodeTopKOutput:
    """Encode and keep the top ``k`` latents per row (tie rule: :mod:`fastsae.reference`).

    Args:
        x: ``[B, d_in]``.
        W_enc: ``[d_in, n]``. b_enc: ``[n]``. b_dec: ``[d_in]`` subtracted from ``x`` first, or None.
        k: ``1 <= k <= n``.
        dead_mask: ``[n]`` bool; with ``k_aux > 0`` the top ``min(k_aux, n_dead)`` latents among the
            dead ones are returned too (for the AuxK loss).

    Returns:
        :class:`EncodeTopKOutput`. ``values`` and ``aux_values`` are differentiable in ``x``,
        ``W_enc``, ``b_enc`` and ``b_dec``.
    """
    return _call("encode_topk", x, W_enc, b_enc, k, b_dec=b_dec, dead_mask=dead_mask, k_aux=k_aux)


def encode_batch_topk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: float,
    *,
    b_dec: Tensor | None = None,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
) -> EncodeTopKOutput:
    """BatchTopK encode: keep the ``round(k * B)`` largest ReLU'd pre-activations of the batch.

    Rows keep different numbers of latents, so ``values``/``indices`` are ``[B, w]`` with ``w`` the
    busiest row's count (the triton backend: a fixed candidate count per row, see
    ``docs/kernels.md``, "Host syncs"); zero values are padding. Ties: lower flat index ``b * n + i`` first, as
    :func:`fastsae.reference.batch_topk`. AuxK candidates as in :func:`encode_topk`.
    """
    return _call(
        "encode_batch_topk", x, W_enc, b_enc, k, b_dec=b_dec, dead_mask=dead_mask, k_aux=k_aux
    )


def encode_jumprelu(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    threshold: Tensor,
    *,
    b_dec: Tensor | None = None,
    k_cap: int = 64,
):
    """JumpReLU inference encode (no gradient): every latent with ``pre > threshold`` and
    ``pre > 0``, as padded sparse codes ``(values [B, w], indices [B, w])``.

    ``k_cap`` is the first guess of the busiest row's count; it doubles until no row is cut off,
    so the result is always exact.
    """
    return _call("encode_jumprelu", x, W_enc, b_enc, threshold, b_dec=b_dec, k_cap=k_cap)


def batch_topk(pre: Tensor, k: float) -> Tensor:
    """BatchTopK dense codes: keep the ``round(k * B)`` largest ReLU'd entries of ``pre [B, n]``."""
    return _call("batch_topk", pre, k)


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU ``pre * 1[pre > threshold]`` with the rectangle STE for ``threshold [n]``."""
    return _call("jumprelu", pre, threshold, bandwidth)


def dense_decode(codes: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """``codes [B, n] @ W_dec [n, d_out] + b_dec [d_out]``."""
    return _call("dense_decode", codes, W_dec, b_dec)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """``out[b] = sum_j values[b, j] * W_dec[indices[b, j]] + b_dec``: ``[B, k]`` -> ``[B, d_out]``.

    Differentiable in ``values``, ``W_dec`` and ``b_dec``.
    """
    return _call("sparse_decode", values, indices, W_dec, b_dec)


def shared_encoder_gemm(x: Tensor, encoders: list[tuple[Tensor, Tensor, Tensor | None]]):
    """Context manager: one GEMM ``[B, d_in] x [d_in, sum n_m]`` for several encoders reading the
    same ``x``, whose blocks the torch backend's TopK / BatchTopK selection then reads instead of
    its own GEMM (:func:`fastsae.ops._torch.shared_encoder_gemm`; other backends ignore it). Not
    bit-identical to separate GEMMs; yields the blocks ``[B, n_m]``."""
    from fastsae.ops._torch import shared_encoder_gemm as impl

    return impl(x, encoders)
