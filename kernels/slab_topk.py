"""Slab + select: the encoder GEMM through cuBLAS into bounded slabs of latents, and a one-pass
streaming top-k Triton kernel over each slab. Forward only.

Notation: ``B`` tokens, ``D = d_in``, ``N = d_sae``, ``KP = next_pow2(k)``, ``C`` column splits.

Design
------
``select_topk`` cuts ``N`` into slabs of at most ``SLAB_BYTES`` of scores (``B x n_slab``). For
each slab, ``torch.addmm`` writes ``pre = x_in @ W_enc[:, slab] + b_enc[slab]`` (cuBLAS, in the
input dtype: bf16 on a GPU), and ``_slab_topk_fwd_kernel`` reads it exactly once. Program
``(m, c)`` owns ``BLOCK_M`` rows and the ``c``-th of ``C`` column splits of the slab; it loads
its running state of the ``KP`` best candidates per row from ``state [B, C, KP]``, folds its
columns into it tile by tile, and stores it back. The state carries from slab to slab, so the
row's current ``KP``-th key (the gate below) keeps rising across the whole of ``N``, and the
merge across slabs is free. At the end ``torch.topk`` over the ``C * KP`` keys of each row picks
the ``k`` best. Memory: one slab plus ``B * C * KP`` keys; cost: the GEMM, one write and one
read of each slab, and the selection.

Candidates are **packed 64-bit keys**, as in :mod:`fastsae.kernels.encode_topk`: the fp32 score
mapped to an order-preserving int32 high word, ``0xFFFFFFFF - latent`` in the low word. Keys are
unique, so key order is fastsae's tie rule (larger score first, lower latent first among equal
scores; :mod:`fastsae.reference`) and it holds exactly through every merge. Before packing,
``-0.0`` becomes ``+0.0`` (the oracle's sort compares them equal, so the lower latent must win)
and every NaN becomes the positive quiet NaN (ranked above ``+inf``, as ``torch.sort`` ranks
NaN first, and never confused with the masked sentinel, which lies below ``-inf``).

Selection: threshold-gated replace-min
--------------------------------------
Per tile, one int32 compare per element against the row's current ``KP``-th key's high word
(``>=``, a superset of the keys that beat it: equal high words may win on the index). Only when
some element of the block passes are the 64-bit keys built: ``r`` = the most keys of any row
that beat that row's ``KP``-th key, then ``r`` rounds of "the tile's row max replaces the
state's row min if larger". After the first tiles of a row ``r`` is 0 or small: an element of
a random order enters the top ``k`` of the ``m`` seen so far with probability ``k / m``. When
``r > SORT_ABOVE[KP]`` (a row's first tile, adversarial orders) the tile takes a sorted merge
instead: ``tl.topk`` of the tile to ``KP`` keys, ``tl.sort`` of the state, and an elementwise
max (the first half-cleaner of a bitonic merge keeps exactly the top ``KP`` of the union).

Large ``k``: the state is ``BLOCK_M x KP`` keys in registers, so ``BLOCK_M`` shrinks as ``KP``
grows (no ``tl.dot`` here, so one row per program is allowed). ``k > MAX_K`` raises; the ops
layer falls back to the torch selection for it.

AuxK: with ``dead_mask`` and ``k_aux > 0`` the kernel runs a second time over the same slab
(no second GEMM) with live latents masked, into its own state of ``next_pow2(k_aux')`` keys.
Separate launches keep each state's register budget whole; the extra cost is one more read of
the slab, only in training steps that have dead latents.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastsae.kernels._launch import launch

__all__ = ["MAX_K", "Blocks", "blocks_for", "compile_configs", "select_topk"]

# ---------------------------------------------------------------------------------------------
# Tuning constants. Checked with ptxas (registers, spills) for sm_80 and sm_90 via
# `python -m fastsae.kernels.check`; not timed on a GPU yet (none was lent to this work).
# ---------------------------------------------------------------------------------------------

# Bytes of scores per slab: 2^28 = 256 MiB (16384 latents at B=8192 in bf16), large enough that
# cuBLAS runs its big tiles (8192 x 2304 x 16384 is 0.6 TFLOP per slab) and small against the
# 17 GB a dense [B, n] bf16 matrix takes at B=8192, n=2^20.
SLAB_BYTES = 2**28
# Largest k (and k_aux') the kernel takes: a 2048-key state needs BLOCK_M = 1 under the budget
# below. Larger k fall back to the torch selection in the ops layer.
MAX_K = 2048
# Tile width: at least 128 columns (256 B of bf16 per row: two full 128-B lines), and at least
# KP so that the sorted merge (tl.topk(tile, KP)) is always available.
MIN_BLOCK_N = 128
# Rows per program, by KP: the state (BLOCK_M x KP keys) and the tile (BLOCK_M x BLOCK_N) live
# in registers. From ptxas -v, sm_90, 8 warps (fp32 and bf16 alike): 16 x 128 tiles at KP=32
# take 80 registers, no spills; KP=64 at 16 rows spilled 16 B at 64 registers, at 8 rows none;
# KP=1024 at 1 row spilled 4 B, at 2 rows none (116 registers); KP=2048 takes 1 row (124).
# KP 256 and 512 halve the rows per doubling (same keys per program as KP=128).
ROWS_PER_PROGRAM = {1: 16, 2: 16, 4: 16, 8: 16, 16: 16, 32: 16, 64: 8, 128: 8, 256: 4, 512: 2}
ROWS_PER_PROGRAM.update({1024: 2, 2048: 1})
# 8 warps: at 4 warps ptxas held 16 x 128 tiles to 128 registers and spilled 20-40 B (KP 32,
# 64); 8 warps spread the same tile over twice the threads.
NUM_WARPS = 8
# Gated rounds above which a tile takes the sorted merge. Extrapolated from the SASS counts of
# the fused kernel (kernels/encode_topk.py: one sort step costs ~9-13 replace-min rounds at
# KP 16-64, ~70 at KP=512); KP <= 8 never sorts (r <= KP rounds are cheaper).
SORT_ABOVE = {1: 1, 2: 2, 4: 4, 8: 8, 16: 9, 32: 12, 64: 12, 128: 30, 256: 38}
SORT_ABOVE.update({512: 69, 1024: 128, 2048: 240})
# Column splits: enough programs to fill an H100 four times over (132 SMs), but at least
# MIN_TILES_PER_SPLIT tiles per split and slab, so the gate has tiles to pay off on.
TARGET_PROGRAMS = 4 * 132
MIN_TILES_PER_SPLIT = 8
# CUDA's limit on the second grid dimension.
MAX_GRID_Y = 65535

# Packed keys. ordered(x) maps fp32 bits to an int32 with the same order: the bits for x >= 0,
# the bits ^ 0x7FFFFFFF for x < 0. ordered(-inf) = -2139095041.
_ORDERED_NEG_INF = -2139095041
# High word of a masked key: below every real key (-inf included) and every empty-slot key.
_MASKED_HI = tl.constexpr(_ORDERED_NEG_INF - 1)
# Empty state slot j: high word ordered(-inf) (decodes to a -inf score), low word j < MAX_K,
# which no latent's low word (>= 2^32 - N) equals, so a row's keys stay unique in their low
# words.
_EMPTY_BASE = tl.constexpr(_ORDERED_NEG_INF * 2**32)
_MASKED_BASE = tl.constexpr((_ORDERED_NEG_INF - 1) * 2**32)
_LOW_MASK = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _ordered_hi(score, valid):
    """fp32 ``score`` -> order-preserving int32 (``-0.0`` as ``+0.0``, NaN as +NaN); the masked
    sentinel where ``valid`` is false."""
    score = tl.where(score == 0, 0.0, score)
    score = tl.where(score != score, float("nan"), score)
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(valid, ordered, _MASKED_HI)


@triton.jit
def _sorted_merge(keys, state, KP: tl.constexpr):
    """Top ``KP`` keys per row of ``state [BM, KP]`` and ``keys [BM, BN >= KP]`` together."""
    tile_top = tl.topk(keys, KP, dim=1)  # descending
    state_up = tl.sort(state, dim=1)  # ascending
    # Ascending against descending is bitonic: the elementwise max is the top KP of the union.
    return tl.maximum(state_up, tile_top)


@triton.jit
def _replace_min_rounds(keys, state, rounds):
    """``rounds`` times: the row max of ``keys`` leaves the tile and replaces the state's row min
    if larger. Keys are unique in their low words within a row, so "is this the max / min" is a
    32-bit compare."""
    for _ in range(rounds):
        kth = tl.min(state, axis=1)
        best = tl.max(keys, axis=1)
        taken = keys.to(tl.int32) == best.to(tl.int32)[:, None]
        keys = tl.where(taken, keys.to(tl.uint32).to(tl.int64) + _MASKED_BASE, keys)
        is_min = state.to(tl.int32) == kth.to(tl.int32)[:, None]
        state = tl.where(is_min, tl.maximum(best, kth)[:, None], state)
    return state


@triton.jit
def _slab_topk_fwd_kernel(
    # pointers
    slab_ptr,  # [B, n_slab] scores of latents col0 .. col0 + n_slab - 1, any strides
    thr_ptr,  # [N] threshold; read only if HAS_THRESHOLD
    dead_ptr,  # [N] uint8 dead latents; read only if DEAD_ONLY
    state_ptr,  # [B, C, KP] int64 packed keys, read (unless FIRST) and written
    # sizes
    B,
    n_slab,
    col0,  # latent id of the slab's first column
    cols_per_split,  # a multiple of BLOCK_N
    C,  # column splits
    # strides
    stride_sb,
    stride_sn,
    stride_thr,
    stride_dead,
    # meta-parameters
    KP: tl.constexpr,  # candidates per row per split: next_pow2(k)
    SORT_ABOVE: tl.constexpr,  # gated rounds above which a tile takes the sorted merge
    HAS_THRESHOLD: tl.constexpr,
    DEAD_ONLY: tl.constexpr,  # the AuxK pass: live latents are masked
    FIRST: tl.constexpr,  # the first slab: the state starts empty instead of being loaded
    CMP_DTYPE: tl.constexpr,  # threshold compare: fp32, or fp64 when an operand is fp64
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    slots = tl.arange(0, KP).to(tl.int64)
    # B * C * KP passes 2^31 at 2^20 rows of 2048 keys: int64 offsets.
    state_offs = rows[:, None] * C * KP + split.to(tl.int64) * KP + slots[None, :]
    empty = tl.zeros((BLOCK_M, KP), dtype=tl.int64) + (slots + _EMPTY_BASE)[None, :]
    if FIRST:
        state = empty
    else:
        state = tl.load(state_ptr + state_offs, mask=row_mask[:, None], other=0)
        state = tl.where(row_mask[:, None], state, empty)

    lo = split * cols_per_split
    hi = tl.minimum(lo + cols_per_split, n_slab)
    for start in range(lo, hi, BLOCK_N):
        # n_slab < 2^31 (checked), so local columns fit int32; every offset below is int64.
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < hi
        latents = col0 + cols.to(tl.int64)
        valid = row_mask[:, None] & col_mask[None, :]
        raw = tl.load(
            slab_ptr + rows[:, None] * stride_sb + cols[None, :].to(tl.int64) * stride_sn,
            mask=valid,
            other=0,
        )
        if HAS_THRESHOLD:
            thr = tl.load(thr_ptr + latents * stride_thr, mask=col_mask, other=0)
            # Out where pre <= threshold, as the torch path's masked_fill (a NaN stays in).
            valid &= ~(raw.to(CMP_DTYPE) <= thr.to(CMP_DTYPE)[None, :])
        if DEAD_ONLY:
            dead = tl.load(dead_ptr + latents * stride_dead, mask=col_mask, other=0) != 0
            valid &= dead[None, :]
        hi_word = _ordered_hi(raw.to(tl.float32), valid)
        kth = tl.min(state, axis=1)
        # The gate: int32 compares only. >= on the high word admits every key that beats the
        # KP-th key (an equal high word may still win on the lower latent id).
        gate = hi_word >= (kth >> 32).to(tl.int32)[:, None]
        if tl.max(tl.sum(gate.to(tl.int32), axis=1), axis=0) > 0:
            keys = (hi_word.to(tl.int64) << 32) + (4294967295 - latents)[None, :]
            beats = tl.sum((keys > kth[:, None]).to(tl.int32), axis=1)
            rounds = tl.max(beats, axis=0)
            # Compile-time guard (the launcher passes SORT_ABOVE = KP where BLOCK_N < KP and
            # tl.topk(tile, KP) cannot compile), then the run-time test: two ifs on purpose.
            if SORT_ABOVE < KP:  # noqa: SIM102
                if rounds > SORT_ABOVE:
                    state = _sorted_merge(keys, state, KP)
                    rounds = 0
            state = _replace_min_rounds(keys, state, rounds)

    tl.store(state_ptr + state_offs, state, mask=row_mask[:, None])


# ---------------------------------------------------------------------------------------------
# Launchers: check shapes, pick blocks, slabs and splits, allocate. _fwd_plan returns (kernel,
# grid, kwargs) so that kernels/check.py compiles exactly what is launched.
# ---------------------------------------------------------------------------------------------


class Blocks(NamedTuple):
    """One launch's block sizes (see the tuning constants for the reasons)."""

    block_m: int
    block_n: int
    num_warps: int


def blocks_for(kp: int) -> Blocks:
    """Blocks for a state of ``kp`` keys per row."""
    return Blocks(ROWS_PER_PROGRAM[kp], max(MIN_BLOCK_N, kp), NUM_WARPS)


def _splits(row_blocks: int, n_slab: int, block_n: int, splits: int | None) -> tuple[int, int]:
    """``(C, cols_per_split)`` for slabs of at most ``n_slab`` columns; ``cols_per_split`` is a
    multiple of ``block_n``."""
    tiles = triton.cdiv(n_slab, block_n)
    if splits is None:
        splits = min(triton.cdiv(TARGET_PROGRAMS, max(row_blocks, 1)), tiles // MIN_TILES_PER_SPLIT)
    splits = max(1, min(splits, tiles, MAX_GRID_Y))
    per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, per_split), per_split * block_n


def _slab_width(B: int, n: int, itemsize: int, slab: int | None, k: int) -> int:
    if slab is None:
        slab = SLAB_BYTES // max(B * itemsize, 1)
    return max(1, min(n, max(slab, k)))


def _check_args(x, W_enc, b_enc, k, threshold, dead_mask, k_aux) -> None:
    if x.dim() != 2 or W_enc.dim() != 2 or x.shape[1] != W_enc.shape[0]:
        raise ValueError(
            f"x_in must be [B, d_in] and W_enc [d_in, d_sae]; got {tuple(x.shape)} and "
            f"{tuple(W_enc.shape)}"
        )
    n = W_enc.shape[1]
    floats = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    if x.dtype != W_enc.dtype or x.dtype not in floats:
        raise ValueError(
            f"x_in and W_enc must share one of float32/bfloat16/float16/float64; got {x.dtype} "
            f"and {W_enc.dtype}"
        )
    if not 1 <= k <= min(n, MAX_K):
        raise ValueError(f"k={k} must be in [1, min(d_sae={n}, {MAX_K})]")
    if n >= 2**31 - MAX_K:
        raise ValueError(f"d_sae={n} must be < 2^31 - {MAX_K} (latent ids are packed in 32 bits)")
    for name, t in (("b_enc", b_enc), ("threshold", threshold)):
        if t is not None and (t.shape != (n,) or not t.dtype.is_floating_point):
            raise ValueError(f"{name} must be a float [d_sae={n}], got {t.dtype} {tuple(t.shape)}")
    if dead_mask is not None and (dead_mask.shape != (n,) or dead_mask.dtype != torch.bool):
        raise ValueError(
            f"dead_mask must be bool [d_sae={n}], got {dead_mask.dtype} {tuple(dead_mask.shape)}"
        )
    if k_aux < 0:
        raise ValueError(f"k_aux={k_aux} must be >= 0")
    tensors = [t for t in (x, W_enc, b_enc, threshold, dead_mask) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"inputs are on different devices: {[str(t.device) for t in tensors]}")


def _fwd_plan(
    slab: Tensor,
    col0: int,
    threshold: Tensor | None,
    dead: Tensor | None,
    state: Tensor,
    *,
    first: bool,
    blocks: Blocks,
    cols_per_split: int,
):
    """``(kernel, grid, kwargs)`` folding ``slab [B, n_slab]`` (latents ``col0 ..``) into
    ``state [B, C, KP]``. ``dead`` is the dead mask as uint8 for the AuxK pass, or None."""
    B, n_slab = slab.shape
    n_splits, kp = state.shape[1], state.shape[2]
    fp64 = torch.float64 in (slab.dtype, None if threshold is None else threshold.dtype)
    kwargs = dict(
        slab_ptr=slab,
        # Never read when the flag is off; any valid pointer will do.
        thr_ptr=slab if threshold is None else threshold,
        dead_ptr=state if dead is None else dead,
        state_ptr=state,
        B=B,
        n_slab=n_slab,
        col0=col0,
        cols_per_split=cols_per_split,
        C=n_splits,
        stride_sb=slab.stride(0),
        stride_sn=slab.stride(1),
        stride_thr=1 if threshold is None else threshold.stride(0),
        stride_dead=1 if dead is None else dead.stride(0),
        KP=kp,
        SORT_ABOVE=SORT_ABOVE[kp] if kp <= blocks.block_n else kp,
        HAS_THRESHOLD=threshold is not None,
        DEAD_ONLY=dead is not None,
        FIRST=first,
        CMP_DTYPE=tl.float64 if fp64 else tl.float32,
        BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n,
        num_warps=blocks.num_warps,
    )
    return _slab_topk_fwd_kernel, (triton.cdiv(B, blocks.block_m), n_splits), kwargs


def _decode(keys: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Packed keys -> ``(scores float32, latent ids int64)``; empty slots -> ``(-inf, 0)``."""
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    ids = _LOW_MASK - (keys & _LOW_MASK)
    return bits.view(torch.float32), torch.where(ids < n, ids, 0)


def _merge(state: Tensor, k: int, n: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` of the ``C * KP`` keys of each row, sorted descending, decoded. Keys are unique
    within a split and ordered by the tie rule, so the merge keeps the rule exactly."""
    keys = state.reshape(state.shape[0], state.shape[1] * state.shape[2])
    return _decode(torch.topk(keys, k, dim=1, sorted=True).values, n)


def _new_state(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """An uninitialised state buffer; the first slab's launch writes all of it (tests patch
    this to poison it)."""
    return torch.empty(shape, dtype=torch.int64, device=device)


def _scores(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, start: int, stop: int) -> Tensor:
    """One slab of pre-activations, ``[B, stop - start]``, through cuBLAS (tests patch this)."""
    return torch.addmm(b_enc[start:stop].to(x_in.dtype), x_in, W_enc[:, start:stop])


def _run(x_in, W_enc, b_enc, k, threshold, dead_mask, k_aux, slab, splits, blocks):
    """Check, then slab by slab: GEMM, main pass, AuxK pass. Returns the four outputs, the AuxK
    pair as ``[B, 0]`` tensors when there is none (a custom op returns no optionals)."""
    B, n = x_in.shape[0], W_enc.shape[1]
    device = x_in.device
    width = _slab_width(B, n, x_in.element_size(), slab, max(k, k_aux))
    passes = [(k, None)]
    if k_aux:
        passes.append((k_aux, dead_mask.to(torch.uint8)))
    states = []
    for kk, dead in passes:
        kp = triton.next_power_of_2(kk)
        blk = blocks or blocks_for(kp)
        C, per_split = _splits(triton.cdiv(B, blk.block_m), width, blk.block_n, splits)
        states.append((_new_state((B, C, kp), device), blk, per_split, dead))
    for start in range(0, n, width) if B else ():
        stop = min(start + width, n)
        scores = _scores(x_in, W_enc, b_enc, start, stop)
        for state, blk, per_split, dead in states:
            launch(
                _fwd_plan(
                    scores,
                    start,
                    threshold,
                    dead,
                    state,
                    first=start == 0,
                    blocks=blk,
                    cols_per_split=per_split,
                )
            )
        del scores
    top, idx = _merge(states[0][0], k, n)
    if not k_aux:
        empty = top.new_empty(B, 0)
        return top, idx, empty, idx.new_empty(B, 0)
    aux_top, aux_idx = _merge(states[1][0], k_aux, n)
    return top, idx, aux_top, aux_idx


# ---------------------------------------------------------------------------------------------
# Custom op: torch.compile traces through it; the fake impl gives the output shapes. k_aux here
# is already k_aux' = min(k_aux, n_dead) (0: no AuxK pass), so the shapes need no data.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastsae::slab_select_topk", mutates_args=())
def _slab_select_topk_op(
    x_in: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    threshold: Tensor | None,
    dead_mask: Tensor | None,
    k_aux: int,
    slab: int | None,
    splits: int | None,
    blocks: list[int] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    blk = Blocks(*blocks) if blocks is not None else None
    return _run(x_in, W_enc, b_enc, k, threshold, dead_mask, k_aux, slab, splits, blk)


@_slab_select_topk_op.register_fake
def _(x_in, W_enc, b_enc, k, threshold, dead_mask, k_aux, slab, splits, blocks):
    B = x_in.shape[0]
    top = x_in.new_empty(B, k, dtype=torch.float32)
    idx = x_in.new_empty(B, k, dtype=torch.int64)
    return top, idx, x_in.new_empty(B, k_aux, dtype=torch.float32), idx.new_empty(B, k_aux)


# ---------------------------------------------------------------------------------------------
# AOT compile cases for kernels/check.py: the launches a real step makes (k from 32 to 2048, the
# threshold and AuxK passes, the first slab and a later one that loads its state).
# ---------------------------------------------------------------------------------------------

# (label, k, threshold, dead-only pass, first slab, dtypes). bf16 is what a GPU step feeds;
# fp32 only where its wider loads change the code (k=32 and the 1024-wide tiles), to keep the
# check within a few minutes on two cores (KP=2048 takes ~60 s to compile per target).
_AOT_CASES = (
    ("k=32", 32, False, False, False, ("fp32", "bf16")),
    ("k=32 first slab", 32, False, False, True, ("bf16",)),
    ("k=64", 64, False, False, False, ("bf16",)),
    ("k=128", 128, False, False, False, ("bf16",)),
    ("k=256", 256, False, False, False, ("bf16",)),
    ("k=512", 512, False, False, False, ("bf16",)),
    ("k=1024", 1024, False, False, False, ("fp32", "bf16")),
    ("k=2048", 2048, False, False, False, ("bf16",)),
    ("k=32 threshold", 32, True, False, False, ("bf16",)),
    ("k_aux=1152 dead only", 1152, False, True, False, ("bf16",)),
)


def _aot_plan(dtype: torch.dtype, k: int, with_threshold: bool, dead_only: bool, first: bool):
    """(kernel, grid, kwargs) for small CPU examples that specialise like a real step (sizes
    divisible by 16, unit inner strides, 16-byte aligned pointers)."""
    B, n = 512, 4096
    kp = triton.next_power_of_2(k)
    blocks = blocks_for(kp)
    C, per_split = _splits(triton.cdiv(B, blocks.block_m), n, blocks.block_n, None)
    state = torch.zeros(B, C, kp, dtype=torch.int64)
    thr = torch.zeros(n, dtype=dtype) if with_threshold else None
    dead = torch.ones(n, dtype=torch.uint8) if dead_only else None
    slab = torch.zeros(B, n, dtype=dtype)
    return _fwd_plan(
        slab, 0, thr, dead, state, first=first, blocks=blocks, cols_per_split=per_split
    )


def compile_configs() -> list[tuple[str, str, object]]:
    """``(name, dtype name, plan)`` for every launch to AOT-compile (kernels/check.py)."""
    configs = []
    for label, *case, dtypes in _AOT_CASES:
        for dname in dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]

            def plan(dtype=dtype, case=tuple(case)):
                return _aot_plan(dtype, *case)

            kw = plan()[2]
            blocks = f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{kw['num_warps']}"
            configs.append((f"slab_topk {label} {dname} {blocks}", dname, plan))
    return configs


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def select_topk(
    x_in: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    threshold: Tensor | None = None,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    fixed_aux_width: bool = False,
    slab: int | None = None,
    splits: int | None = None,
    blocks: Blocks | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The ``k`` largest encoder scores per row: cuBLAS GEMM into slabs, one streaming read of
    each slab. Not differentiable. Same contract as
    :func:`fastsae.kernels.encode_topk.select_topk`, so the ops layer can use either.

    ``score = pre = x_in @ W_enc + b_enc`` (``torch.addmm`` in the input dtype), or, with
    ``threshold``, ``pre`` where ``pre > threshold`` and ``-inf`` elsewhere. Selection ranks the
    scores rounded to fp32.

    Args:
        x_in: ``[B, d_in]`` float32, bfloat16 or float16 (float64 for oracle tests).
        W_enc: ``[d_in, d_sae]``, same dtype as ``x_in``, any strides.
        b_enc: ``[d_sae]`` float (cast to the input dtype for the GEMM).
        k: ``1 <= k <= min(d_sae, MAX_K)``; need not be a power of two.
        threshold: ``[d_sae]`` float or None.
        dead_mask: ``[d_sae]`` bool or None. With ``k_aux > 0`` the top
            ``k_aux' = min(k_aux, n_dead)`` scores among dead latents are selected too, by a
            second pass over each slab (``k_aux' <= MAX_K``; counting the dead is one host sync).
        fixed_aux_width: return ``k_aux' = min(k_aux, d_sae)`` AuxK slots instead, ``-inf`` past
            the dead count, whatever it is: no host sync, and one compile key for a run (the
            triton backend's choice).
        slab: latents per slab (default: ``SLAB_BYTES`` of scores).
        splits: column splits per slab (default: enough programs for an H100).
        blocks: override the block sizes (tests, benchmarks).

    Returns:
        ``(top, indices, aux_top, aux_indices)``: ``top [B, k]`` float32 scores sorted
        descending (**not** ReLU'd), ``indices [B, k]`` int64; ties follow fastsae's rule (lower
        latent first, ``-0.0 == +0.0``). A row with fewer than ``k`` finite scores is padded with
        ``-inf`` (index 0). ``aux_top [B, k_aux']`` / ``aux_indices`` likewise, or
        ``None, None`` when ``k_aux == 0`` or no latent is dead (with ``fixed_aux_width``: only
        when ``k_aux == 0``).
    """
    _check_args(x_in, W_enc, b_enc, k, threshold, dead_mask, k_aux)
    k_aux_eff = 0
    if dead_mask is not None and k_aux > 0:
        n_dead = W_enc.shape[1] if fixed_aux_width else int(dead_mask.sum())
        k_aux_eff = min(k_aux, n_dead)
        if k_aux_eff > MAX_K:
            raise ValueError(f"k_aux'={k_aux_eff} = min(k_aux, n_dead) must be <= {MAX_K}")
    blk = list(blocks) if blocks is not None else None
    top, idx, aux_top, aux_idx = _slab_select_topk_op(
        x_in, W_enc, b_enc, k, threshold, dead_mask, k_aux_eff, slab, splits, blk
    )
    if not k_aux_eff:
        return top, idx, None, None
    return top, idx, aux_top, aux_idx
