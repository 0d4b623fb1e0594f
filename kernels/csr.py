"""CSR-by-latent layout of ``[B, k]`` latent ids, and the segmented reduction that runs over it.

Two gradients in an SAE step have the same shape: for every latent ``i``,

    out[i] = sum over entries (b, j) with indices[b, j] == i of coef[b, j] * X[b]

- ``grad_W_dec[i]`` with ``coef = values`` and ``X = grad_out`` (the decoder backward);
- ``grad_W_enc[:, i]`` with ``coef = grad_pre`` and ``X = x`` (the encoder backward).

Scattering ``B*k`` rows into ``out`` with atomics is non-deterministic, and ``index_add_`` on a
``[B*k, d]`` temporary costs ``B*k*d`` extra bytes. Instead :func:`csr_by_latent` groups the
``B*k`` entries by latent once (a stable sort of ``B*k`` int64 ids, plain torch), and
:func:`segment_reduce` runs one program per (latent, d tile) that walks its latent's segment and
writes the whole output row, zeros included for latents that no entry hit. Every output element
is written exactly once, in a fixed order: the result is bitwise reproducible.

The launch helpers here are shared by :mod:`fastsae.kernels.sparse_decode` and
:mod:`fastsae.kernels.sparse_encoder_bwd`; this module registers no custom op of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastsae.kernels._launch import acc_dtype, launch

__all__ = [
    "block_d",
    "csr_by_latent",
    "segment_reduce",
    "segment_reduce_plan",
]

# ---------------------------------------------------------------------------------------------
# Tuning constants. Heuristics, not yet measured on a GPU (this machine has none); an
# autotune key needs a measurement to justify it (STYLE.md).
# ---------------------------------------------------------------------------------------------

# Columns of d per program. 128 fp32 = 512 B = four full 128-B lines per gathered row, so every
# row load is coalesced; a 16 x 128 fp32 accumulator is 16 registers per thread at 4 warps.
# Real SAE widths (512, 768, 2304, 4096) all use 128; smaller d rounds up to a power of two,
# at least 16, so tiny test shapes do not waste a 128-wide tile.
MAX_BLOCK_D = 128
MIN_BLOCK_D = 16
# Entries of one latent's segment per loop step. The average segment holds B*k/n entries: about
# 2 for B=8192, k=32, n=2^17, and 64 for n=2^12. 16 keeps the short segments to one masked step
# (masked rows cost no memory traffic) and the long ones to few steps; 16 x 128 is the same
# register budget as above.
SEGMENT_BLOCK_E = 16
# 4 warps = 128 threads on a 16 x 128 tile: one element per thread per row of 16, 16 B vectors.
SEGMENT_NUM_WARPS = 4


def block_d(d: int) -> int:
    """Columns per program for a feature width ``d`` (see ``MAX_BLOCK_D``)."""
    return min(MAX_BLOCK_D, max(MIN_BLOCK_D, triton.next_power_of_2(max(d, 1))))


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _segment_reduce_fwd_kernel(
    # pointers
    offsets_ptr,  # [N + 1] int64: latent i owns entries_ptr[offsets[i] : offsets[i + 1]]
    entries_ptr,  # [E] int64 flat entry ids (b * K + j), grouped by latent, stable order
    coef_ptr,  # [B, K] coefficient of entry (b, j): values or grad_pre
    X_ptr,  # [B, D] row b is summed into the latent of every entry of token b
    out_ptr,  # [N, D] row i = sum over latent i's entries of coef * X[b]
    coef_sum_ptr,  # [N] sum of coef over latent i's entries; touched only if HAS_COEF_SUM
    # sizes
    K,  # entries per token (the k of the [B, K] inputs)
    D,  # feature width
    # strides
    stride_cb,
    stride_ck,
    stride_xb,
    stride_xd,
    stride_on,
    stride_od,
    stride_s,
    # meta-parameters
    HAS_COEF_SUM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    latent = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    start = tl.load(offsets_ptr + latent)
    end = tl.load(offsets_ptr + latent + 1)

    # A 2-D accumulator, reduced once after the loop: no cross-thread reduction per step.
    acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=ACC_DTYPE)
    coef_acc = tl.zeros((BLOCK_E,), dtype=ACC_DTYPE)
    for pos0 in range(start, end, BLOCK_E):
        pos = pos0 + tl.arange(0, BLOCK_E)
        in_segment = pos < end
        entry = tl.load(entries_ptr + pos, mask=in_segment, other=0)
        row = entry // K
        slot = entry - row * K
        coef = tl.load(coef_ptr + row * stride_cb + slot * stride_ck, mask=in_segment, other=0)
        coef = coef.to(ACC_DTYPE)
        # A zero coefficient (ReLU'd tail of a top-k row) skips its row load entirely.
        row_mask = in_segment & (coef != 0)
        x = tl.load(
            X_ptr + row[:, None] * stride_xb + cols[None, :] * stride_xd,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0,
        )
        acc += coef[:, None] * x.to(ACC_DTYPE)
        coef_acc += coef

    # Written unconditionally: a latent with an empty segment gets exact zeros.
    tl.store(
        out_ptr + latent * stride_on + cols * stride_od,
        tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty),
        mask=col_mask,
    )
    if HAS_COEF_SUM:  # noqa: SIM102 - a compile-time branch around a runtime one
        if pid_d == 0:
            tl.store(
                coef_sum_ptr + latent * stride_s,
                tl.sum(coef_acc, axis=0).to(coef_sum_ptr.dtype.element_ty),
            )


# ---------------------------------------------------------------------------------------------
# Layout and launcher
# ---------------------------------------------------------------------------------------------


def csr_by_latent(indices: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Group the entries of ``indices`` by latent.

    Args:
        indices: ``[B, K]`` int64 latent ids in ``[0, n)``; duplicates allowed.
        n: number of latents.

    Returns:
        ``(offsets [n + 1], entries [B*K])``, both int64: the flat entry ids ``b * K + j`` of
        latent ``i`` are ``entries[offsets[i]:offsets[i + 1]]``, in increasing order (the sort
        is stable, so the reduction order, and therefore the result, is reproducible).
    """
    flat = indices.reshape(-1)
    sorted_ids, entries = torch.sort(flat, stable=True)
    # searchsorted rather than bincount + cumsum: bincount sizes its output from max(ids), a
    # device-to-host sync on CUDA in the middle of the backward; searchsorted needs none.
    bounds = torch.arange(n + 1, device=flat.device, dtype=flat.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds)
    return offsets, entries


def segment_reduce_plan(
    offsets: Tensor,
    entries: Tensor,
    coef: Tensor,
    X: Tensor,
    out: Tensor,
    coef_sum: Tensor | None = None,
):
    """``(kernel, grid, kwargs)`` of one :func:`segment_reduce` launch, also read by the AOT check."""
    n, d = out.shape
    K = coef.shape[1]
    bd = block_d(d)
    dtypes = (coef.dtype, X.dtype, out.dtype)
    kwargs = dict(
        offsets_ptr=offsets,
        entries_ptr=entries,
        coef_ptr=coef,
        X_ptr=X,
        out_ptr=out,
        # Any valid pointer works when HAS_COEF_SUM is off: the kernel never touches it.
        coef_sum_ptr=out if coef_sum is None else coef_sum,
        K=K,
        D=d,
        stride_cb=coef.stride(0),
        stride_ck=coef.stride(1),
        stride_xb=X.stride(0),
        stride_xd=X.stride(1),
        stride_on=out.stride(0),
        stride_od=out.stride(1),
        stride_s=1 if coef_sum is None else coef_sum.stride(0),
        HAS_COEF_SUM=coef_sum is not None,
        ACC_DTYPE=acc_dtype(*dtypes),
        BLOCK_E=SEGMENT_BLOCK_E,
        BLOCK_D=bd,
        num_warps=SEGMENT_NUM_WARPS,
    )
    # At least one d tile, so that coef_sum is still written when D == 0.
    return _segment_reduce_fwd_kernel, (n, max(1, triton.cdiv(d, bd))), kwargs


def segment_reduce(
    indices: Tensor,
    coef: Tensor,
    X: Tensor,
    out: Tensor,
    coef_sum: Tensor | None = None,
) -> None:
    """Fill ``out[i] = sum_{(b, j): indices[b, j] = i} coef[b, j] * X[b]`` (and ``coef_sum[i]``).

    Args:
        indices: ``[B, K]`` int64 latent ids in ``[0, n)``.
        coef: ``[B, K]`` float coefficients.
        X: ``[B, D]`` float rows.
        out: ``[n, D]`` float, overwritten entirely (its prior contents are never read).
        coef_sum: ``[n]`` float or ``None``; when given, overwritten with the per-latent sum of
            ``coef``.
    """
    n = out.shape[0]
    if n == 0:
        return
    offsets, entries = csr_by_latent(indices, n)
    launch(segment_reduce_plan(offsets, entries, coef, X, out, coef_sum))
