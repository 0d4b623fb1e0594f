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

The layout is built once (:class:`CSR`: offsets, sorted entries and their rows ``b``); each
reduction gathers its coefficients into sorted order once (``B*k`` values), so a program's loop
makes two contiguous loads and one row gather per step, with no ``entry // k`` per d tile. Each
program takes ``LATENTS_PER_PROGRAM`` latents; segments longer than ``SPLIT_ENTRIES`` are
reduced in chunks (a static upper bound on their number, so no host sync) and summed in order.

The launch helpers here are shared by :mod:`fastsae.kernels.sparse_decode` and
:mod:`fastsae.kernels.sparse_encoder_bwd`; this module registers no custom op of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastsae.kernels._launch import acc_dtype, launch

# The layout is pure torch (the torch backend builds it too) and lives in the ops layer, which
# shares one build between the decoder's and the encoder's backward.
from fastsae.ops._csr import CSR, csr_by_latent

__all__ = [
    "CSR",
    "block_d",
    "csr_by_latent",
    "segment_reduce",
    "segment_reduce_plans",
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
# Latents per program. One program per (latent, d tile) launched n * d/128 programs (2.4M at
# n=2^17, d=2304), most of them for an empty or 2-entry segment: launch and scheduling overhead
# for a few loads each. 8 latents per program cut that to 300k programs, still ~2300 per H100
# SM; an empty latent costs its two bound loads and a store of zeros.
LATENTS_PER_PROGRAM = 8
# Hot latents: a segment longer than this is cut into chunks of SPLIT_ENTRIES entries, each
# reduced by its own programs, and the chunk sums added in order by a second, tiny pass. 1024
# entries are 64 steps of 16 rows, against ~1 step for the average segment (B*k/n ~ 2 at B=8192,
# k=32, n=2^17): the tail of a latent hit by a quarter of the batch (2048 entries) drops from 128
# steps to 64. Order is fixed, so the result is still bitwise reproducible.
SPLIT_ENTRIES = 1024


def block_d(d: int) -> int:
    """Columns per program for a feature width ``d`` (see ``MAX_BLOCK_D``)."""
    return min(MAX_BLOCK_D, max(MIN_BLOCK_D, triton.next_power_of_2(max(d, 1))))


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _segment_reduce_fwd_kernel(
    # pointers
    starts_ptr,  # [S] int64: segment s is positions starts[s] : ends[s] of rows / coef
    ends_ptr,  # [S] int64
    rows_ptr,  # [E] int64 row of X for each position (entries grouped by latent)
    coef_ptr,  # [E] coefficient of each position, contiguous, in the same order
    X_ptr,  # [R, D] rows summed into the segments
    dst_ptr,  # [S] int64 output row of segment s; read only if HAS_DST (else row s)
    out_ptr,  # [*, D] output rows: sum over the segment of coef * X[row]
    coef_sum_ptr,  # [*] sum of coef over the segment; touched only if HAS_COEF_SUM
    # sizes
    S,  # segments
    D,  # feature width
    # strides
    stride_xb,
    stride_xd,
    stride_on,
    stride_od,
    stride_s,
    # meta-parameters
    HAS_DST: tl.constexpr,
    WRITE_EMPTY: tl.constexpr,  # an empty segment writes zeros (False: writes nothing)
    HAS_COEF_SUM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    SEGMENTS_PER_PROGRAM: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(1)
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    first = tl.program_id(0).to(tl.int64) * SEGMENTS_PER_PROGRAM
    for i in range(SEGMENTS_PER_PROGRAM):
        seg = first + i
        live = seg < S
        # Past the last segment: an empty range, and the store below is masked off.
        start = tl.load(starts_ptr + seg, mask=live, other=0)
        end = tl.load(ends_ptr + seg, mask=live, other=0)
        # A 2-D accumulator, reduced once after the loop: no cross-thread reduction per step.
        acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=ACC_DTYPE)
        coef_acc = tl.zeros((BLOCK_E,), dtype=ACC_DTYPE)
        for pos0 in range(start, end, BLOCK_E):
            pos = pos0 + tl.arange(0, BLOCK_E)
            in_segment = pos < end
            row = tl.load(rows_ptr + pos, mask=in_segment, other=0)
            coef = tl.load(coef_ptr + pos, mask=in_segment, other=0).to(ACC_DTYPE)
            # A zero coefficient (ReLU'd tail of a top-k row) skips its row load entirely.
            row_mask = in_segment & (coef != 0)
            x = tl.load(
                X_ptr + row[:, None] * stride_xb + cols[None, :] * stride_xd,
                mask=row_mask[:, None] & col_mask[None, :],
                other=0,
            )
            acc += coef[:, None] * x.to(ACC_DTYPE)
            coef_acc += coef
        if HAS_DST:  # noqa: SIM108 - a compile-time branch
            dst = tl.load(dst_ptr + seg, mask=live, other=0)
        else:
            dst = seg
        write = live if WRITE_EMPTY else live & (end > start)
        # The scalar condition enters the vector mask through the column bound (the interpreter
        # rejects a scalar & vector mask).
        tl.store(
            out_ptr + dst * stride_on + cols * stride_od,
            tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty),
            mask=cols < tl.where(write, D, 0),
        )
        if HAS_COEF_SUM:
            tl.store(
                coef_sum_ptr + dst * stride_s,
                tl.sum(coef_acc, axis=0).to(coef_sum_ptr.dtype.element_ty),
                mask=write & (pid_d == 0),
            )


# ---------------------------------------------------------------------------------------------
# Layout and launchers
# ---------------------------------------------------------------------------------------------


def _plan(starts, ends, rows, coef, X, out, coef_sum=None, dst=None, *, write_empty=True):
    """``(kernel, grid, kwargs)`` of one launch over the segments ``starts[s]:ends[s]``."""
    S = starts.shape[0]
    d = out.shape[1]
    bd = block_d(d)
    kwargs = dict(
        starts_ptr=starts,
        ends_ptr=ends,
        rows_ptr=rows,
        coef_ptr=coef,
        X_ptr=X,
        # Any valid pointer works when a flag is off: the kernel never touches it.
        dst_ptr=starts if dst is None else dst,
        out_ptr=out,
        coef_sum_ptr=out if coef_sum is None else coef_sum,
        S=S,
        D=d,
        stride_xb=X.stride(0),
        stride_xd=X.stride(1),
        stride_on=out.stride(0),
        stride_od=out.stride(1),
        stride_s=1 if coef_sum is None else coef_sum.stride(0),
        HAS_DST=dst is not None,
        WRITE_EMPTY=write_empty,
        HAS_COEF_SUM=coef_sum is not None,
        ACC_DTYPE=acc_dtype(coef.dtype, X.dtype, out.dtype),
        SEGMENTS_PER_PROGRAM=LATENTS_PER_PROGRAM,
        BLOCK_E=SEGMENT_BLOCK_E,
        BLOCK_D=bd,
        num_warps=SEGMENT_NUM_WARPS,
    )
    # At least one d tile, so that coef_sum is still written when D == 0. Segments go on grid
    # dimension 0 (up to 2^31 - 1 programs); d tiles on dimension 1 (d / 16 <= 65535).
    grid = (triton.cdiv(S, LATENTS_PER_PROGRAM), max(1, triton.cdiv(d, bd)))
    return _segment_reduce_fwd_kernel, grid, kwargs


def _hot_chunks(offsets: Tensor, n_entries: int):
    """Chunks of the segments longer than ``SPLIT_ENTRIES``, with static shapes (no host sync).

    At most ``H = min(n, n_entries // (SPLIT_ENTRIES + 1))`` latents can be hot; they are among
    the ``H`` longest segments (any tie order will do: the extra ones are not hot and get no
    chunk). A hot segment of ``L`` entries has ``cdiv(L, SPLIT_ENTRIES) < 2 L / SPLIT_ENTRIES``
    chunks, and the hot segments hold at most ``n_entries`` entries, so
    ``2 n_entries // SPLIT_ENTRIES + 1`` chunk slots always suffice (not ``2 H + 1``: with few
    latents ``H`` is capped by ``n``); unused slots are empty ranges.

    Returns ``(hot [H], chunk_bounds [H + 1], starts [C], ends [C])``: hot latent ``h`` owns
    chunks ``chunk_bounds[h]:chunk_bounds[h + 1]`` (none if it is not hot)."""
    n = offsets.shape[0] - 1
    H = min(n, n_entries // (SPLIT_ENTRIES + 1))
    lengths = offsets[1:] - offsets[:-1]
    hot = torch.topk(lengths, H, sorted=False).indices
    hot_len = lengths[hot]
    n_chunks = torch.where(
        hot_len > SPLIT_ENTRIES, (hot_len + SPLIT_ENTRIES - 1) // SPLIT_ENTRIES, 0
    )
    chunk_bounds = torch.cat([n_chunks.new_zeros(1), torch.cumsum(n_chunks, 0)])
    C = 2 * n_entries // SPLIT_ENTRIES + 1
    slot = torch.arange(C, device=offsets.device)
    owner = torch.searchsorted(chunk_bounds[1:], slot, right=True).clamp(max=H - 1)
    latent = hot[owner]
    starts = offsets[latent] + (slot - chunk_bounds[owner]) * SPLIT_ENTRIES
    ends = torch.minimum(starts + SPLIT_ENTRIES, offsets[latent + 1])
    used = slot < chunk_bounds[-1]
    return hot, chunk_bounds, torch.where(used, starts, 0), torch.where(used, ends, 0)


def segment_reduce_plans(
    csr: CSR, coef: Tensor, X: Tensor, out: Tensor, coef_sum: Tensor | None = None
) -> list:
    """The launches of one :func:`segment_reduce`, in order (also read by the AOT check):
    the hot chunks into a partial buffer, every latent (hot ones as empty segments), then the
    hot latents' chunk sums, in chunk order."""
    offsets, entries, rows = csr
    coef_sorted = coef.reshape(-1)[entries]
    starts, ends = offsets[:-1], offsets[1:]
    H = min(out.shape[0], entries.shape[0] // (SPLIT_ENTRIES + 1))
    if H == 0:
        return [_plan(starts, ends, rows, coef_sorted, X, out, coef_sum)]
    hot, chunk_bounds, c_starts, c_ends = _hot_chunks(offsets, entries.shape[0])
    fp64 = torch.float64 in (coef.dtype, X.dtype, out.dtype)
    partial_dtype = torch.float64 if fp64 else torch.float32
    C = c_starts.shape[0]
    partial = torch.empty((C, out.shape[1]), dtype=partial_dtype, device=out.device)
    partial_sum = torch.empty(C, dtype=partial_dtype, device=out.device)
    # Hot latents take part in the main pass as empty segments (zeros, overwritten below).
    hot_ends = ends.clone()
    hot_ends[hot] = torch.where(_is_hot(offsets, hot), starts[hot], ends[hot])
    identity = torch.arange(C, device=out.device)
    ones = torch.ones(C, dtype=partial_dtype, device=out.device)
    plans = [
        _plan(c_starts, c_ends, rows, coef_sorted, X, partial, partial_sum),
        _plan(starts, hot_ends, rows, coef_sorted, X, out, coef_sum),
        _plan(
            chunk_bounds[:-1],
            chunk_bounds[1:],
            identity,
            ones,
            partial,
            out,
            None,
            hot,
            write_empty=False,
        ),
    ]
    if coef_sum is not None:
        plans.append(
            _plan(
                chunk_bounds[:-1],
                chunk_bounds[1:],
                identity,
                ones,
                partial_sum[:, None],
                coef_sum[:, None],
                None,
                hot,
                write_empty=False,
            )
        )
    return plans


def _is_hot(offsets: Tensor, latents: Tensor) -> Tensor:
    """``True`` where a latent's segment is longer than ``SPLIT_ENTRIES`` (reduced in chunks)."""
    return offsets[latents + 1] - offsets[latents] > SPLIT_ENTRIES


def segment_reduce(
    indices: Tensor,
    coef: Tensor,
    X: Tensor,
    out: Tensor,
    coef_sum: Tensor | None = None,
    *,
    csr: CSR | None = None,
) -> None:
    """Fill ``out[i] = sum_{(b, j): indices[b, j] = i} coef[b, j] * X[b]`` (and ``coef_sum[i]``).

    Args:
        indices: ``[B, K]`` int64 latent ids in ``[0, n)``.
        coef: ``[B, K]`` float coefficients.
        X: ``[B, D]`` float rows.
        out: ``[n, D]`` float, overwritten entirely (its prior contents are never read).
        coef_sum: ``[n]`` float or ``None``; when given, overwritten with the per-latent sum of
            ``coef``.
        csr: ``csr_by_latent(indices, n)`` when the caller already has it (built once, reused).
    """
    n = out.shape[0]
    if n == 0:
        return
    csr = csr if csr is not None else csr_by_latent(indices, n)
    for plan in segment_reduce_plans(csr, coef, X, out, coef_sum):
        launch(plan)
