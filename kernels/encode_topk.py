"""Fused encode + top-k selection: ``pre = x_in @ W_enc + b_enc`` and its ``k`` largest entries
per row, without ever writing the ``[B, n]`` pre-activations to global memory. Forward only.

Notation: ``B`` tokens, ``D = d_in``, ``N = d_sae``, ``KP = next_pow2(k)``.

Design
------
A split-``N`` grid: program ``(m, s)`` owns ``BLOCK_M`` rows and slab ``s`` of the latents. It
walks its slab in ``BLOCK_N``-wide tiles; for each it runs the ``tl.dot`` K-loop (fp32
accumulation), adds the bias, applies the optional threshold, and folds the tile into a running
per-row state of the ``KP`` best candidates seen so far. At the end it writes those ``KP``
candidates per row to a ``[B, S, KP]`` buffer, and ``torch.topk`` over the ``S * KP`` candidates
of each row (a few hundred numbers) merges the slabs. Keeping ``KP >= k`` candidates per slab is
exact: every latent of the global top ``k`` is in the top ``k`` of its own slab.

Candidates are **packed 64-bit keys**: the fp32 score mapped to an order-preserving int32 in the
high word, ``0xFFFFFFFF - latent`` in the low word. Keys are unique, even in their low words, so
a max/min reduction needs no index tracking and "is this the max" is one 32-bit compare; key
order is "larger score first, lower latent first among equal scores", fastsae's tie rule
(:mod:`fastsae.reference`), which therefore holds exactly, slab merge included. Masked elements
(latents ``>= N``, rows ``>= B``, scores under the threshold, live latents for the AuxK state)
get a high word below every real key; empty state slots decode to a ``-inf`` score.

Selection strategies (``strategy=``; all exact, they differ only in speed)
-------------------------------------------------------------------------
``gated_replace_min`` (default)
    Count ``r`` = the largest number of elements in any row of the tile that beat that row's
    current ``KP``-th key. Then ``r`` rounds of "take the tile's row max, remove it, let it
    replace the state's row min if larger". After a slab's first tiles ``r`` is small, so most
    tiles cost a compare-and-count and a few rounds. When ``r > GATED_SORT_ABOVE[KP]`` (a slab's
    first tiles, adversarial column orders) the tile takes the ``sort_merge`` step instead; where
    ``BLOCK_N < KP`` there is no sort step and ``r <= BLOCK_N`` bounds the rounds.
``sort_merge``
    ``tl.topk`` of the tile to ``KP`` keys (descending), ``tl.sort`` of the state (ascending), and
    an elementwise max: the first half-cleaner of a bitonic merge, which leaves exactly the top
    ``KP`` of the union (unsorted, which the state may be). Needs ``BLOCK_N >= KP``.
``rounds_of_max``
    ``KP`` rounds on every tile, no gate: the simple reference.

Why the default: SASS instruction counts (sm_90a; ``triton.compile``, then the ``cuobjdump -sass``
that Triton ships; loops found from backward branches; static instructions each warp issues per
execution, 8 warps, bf16 inputs). "fixed" is bias, key packing and the K-loop's prologue, once per
tile; "gate" the compare-and-count; "round" one replace-min round; "sort" the sort-merge step::

     KP  BM x BN  K-iter(BK=64)  fixed  gate  round  sort  sort/round
      4  128x64        100        425   151    251    --      --     (r <= 4: never sorts)
     16  128x64         98        425   199    291   2719     9.3
     32  128x64         98        425   244    347   4164    12.0
     64   64x64         87        223   215    291   3726    12.8   rows span 2 warps: 4 barriers/round
    128   32x64         67        140   179    266    --      --     BLOCK_N < KP: rounds only
    512   16x64         66         92   237    379    --      --
    fp32 (tf32x3), KP=32: K-iter (BK=32) 349, fixed 405, gate 242, round 347, sort 4192.

Per 128 x 64 tile at KP=32, D=2304, bf16 the MMAs take ~9200 SM cycles (37.7 MFLOP at ~4096
FLOP/cycle/SM). At 2 cycles per warp-instruction (8 warps, 4 issue slots; at 186-236 registers
one CTA fills an SM, so selection does not overlap another CTA's MMAs), per tile:

- ``gated_replace_min``: 425 + 244 + 2.6 x 347 + 7/256 x 4164 ~ 1700 instructions, ~0.37x the MMAs;
- ``sort_merge``: 4647 instructions, ~1.0x;
- ``rounds_of_max``: 425 + 32 x 347 = 11529 instructions, ~2.5x.

The 2.6 rounds per tile (1.9 in a slab's second half; 7 of 256 tiles sorted) come from a CPU
simulation of the gate on iid Gaussian scores, BM=128, KP=32, 256 tiles per slab; with 32 tiles
per slab it is 5.4. All of this is an estimate from instruction counts: time it on a GPU.

AuxK: with ``dead_mask`` and ``k_aux > 0`` a second state of ``next_pow2(min(k_aux, N))`` keys
rides the same pass over the tiles (same GEMM), fed with the tile's keys where the latent is dead
and masked keys elsewhere. Its scores are the same (threshold-masked) scores. Both states share
the register budget, so a large ``k_aux`` shrinks ``BLOCK_M`` (k=32 with k_aux=256: 16 rows). The
state is sized from ``k_aux``, never from the number of dead latents, so the compile key does not
change while latents die, and the launcher needs no host sync.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastsae.kernels._launch import MAX_GRID_YZ, check_same_device, launch

__all__ = ["DEFAULT_STRATEGY", "STRATEGIES", "Blocks", "compile_configs", "select_topk"]

# ---------------------------------------------------------------------------------------------
# Tuning constants. Checked with ptxas (registers, spills) and SASS instruction counts for sm_80
# and sm_90; not timed on a GPU yet (none here). Registers quoted are sm_90a, bf16.
# ---------------------------------------------------------------------------------------------

STRATEGIES = {"gated_replace_min": 0, "sort_merge": 1, "rounds_of_max": 2}
# Cheapest per tile in the SASS table above by ~2.7x over sort_merge.
DEFAULT_STRATEGY = "gated_replace_min"
# Largest k (and min(k_aux, d_sae)) the kernel takes: a 512-key state already needs
# BLOCK_M = 16. Larger ones raise here; the triton backend (fastsae/ops/_triton.py) sends them to
# the torch path, so no k or k_aux crashes a run (the default k_aux = d_in / 2 is 1152 at 2304).
MAX_K = 512
# tl.dot on NVIDIA needs M, N, K >= 16 for every dtype (Triton 3.6 and 3.9): the launcher
# rejects smaller blocks, so a block config that runs under the interpreter also compiles.
MIN_DOT_BLOCK = 16
# Rows per program: the largest power of two <= MAX_BLOCK_M with BLOCK_M * (KP + KAP) <=
# STATE_BUDGET keys (32 registers per thread at 8 warps). 128 rows = 8 warps x 16 accumulator
# rows, so a row stays inside one warp and its reductions need no barrier; KP=64 at 128 rows
# spilled 76 B, at 64 rows it takes 188 registers and no spills. 16 is the smallest tl.dot M.
MAX_BLOCK_M = 128
MIN_BLOCK_M = 16
STATE_BUDGET = 4096
# Tile width: a 128 x 64 fp32 accumulator is 32 registers per thread at 8 warps. The sort_merge
# strategy raises it to KP (tl.topk(tile, KP) needs BLOCK_N >= KP); the default keeps 64 for
# every k, since 512-wide tiles spilled 860 B and took a minute to compile.
BLOCK_N = 64
# K-loop step: 32 fp32 or 64 bf16/fp16 elements = 128 B per row, one full line per row load.
BLOCK_K_BYTES = 128
# 8 warps: 4 warps at 64 x 64, KP=64 spilled 112 B; 16 warps at KP=512 (a 128-register cap)
# spilled 508 B.
NUM_WARPS = 8
NUM_STAGES = 3
# ptxas register cap, passed explicitly (Triton's maxnreg). Left to itself, Triton 3.6's ptxas
# held the 32 x 64 bf16 k=128 tile to 128 registers (2 CTAs per SM) and spilled 24 B on sm_90;
# with the cap it takes 146 and spills nothing (Triton 3.9's ptxas: 112-116 either way). The
# other tiles keep their counts within a few registers (docs/kernels.md has both versions).
MAX_REGISTERS = 255
# A gated tile needing more rounds than this takes the sort-merge step: the sort/round column
# of the table, rounded. KP <= 8 never sorts (r <= KP); KP >= 128 only with a blocks override
# that makes BLOCK_N >= KP (values from the sort_merge tile cost over the round cost).
GATED_SORT_ABOVE = {1: 1, 2: 2, 4: 4, 8: 8, 16: 9, 32: 12, 64: 12, 128: 30, 256: 38, 512: 69}
# Slabs: enough programs to fill an H100 four times over (132 SMs), but at least
# MIN_TILES_PER_SLAB tiles per slab, so the gate has tiles to pay off on (simulated 5.4 rounds
# per tile at 32 tiles per slab, 2.6 at 256).
TARGET_PROGRAMS = 4 * 132
MIN_TILES_PER_SLAB = 32
# fp32 inputs: "tf32" rounds each input to 10 mantissa bits (~1e-3 relative per product),
# enough to reorder near-tied latents against the fp32 torch path and to fail the fp32 test
# tolerance; "tf32x3" restores ~fp32 accuracy. It costs 349 instructions per 32-wide K step
# against 98 per 64-wide bf16 step: for speed, feed bf16.
FP32_INPUT_PRECISION = "tf32x3"

# Packed keys (see the module docstring). ordered(x) maps fp32 bits to an int32 with the same
# order: the bits for x >= 0, the bits ^ 0x7FFFFFFF for x < 0. ordered(-inf) = -2139095041.
_ORDERED_NEG_INF = -2139095041
# High word of a masked key: ordered(-inf) - 1, a negative-NaN code no score maps to, so a masked
# key is below every real key (a -inf score included) and below every empty-slot key.
_MASKED_HI = tl.constexpr(_ORDERED_NEG_INF - 1)
_MASKED_BASE = tl.constexpr((_ORDERED_NEG_INF - 1) * 2**32)
# Empty state slot j: high word ordered(-inf) (decodes to a -inf score), low word j <= 511, which
# no latent's low word (>= 2^32 - N) can equal, so state keys stay unique in their low words too.
_EMPTY_BASE = tl.constexpr(_ORDERED_NEG_INF * 2**32)
_LOW_MASK = 0xFFFFFFFF
# Canonicalised before packing (see _pack_keys): -0.0 -> +0.0, any NaN -> +qNaN (0x7FC00000).
_NEG_ZERO_BITS = tl.constexpr(-(2**31))
_CANONICAL_NAN_BITS = tl.constexpr(0x7FC00000)
# Triton 3.9's interpreter multiplies the raw bits of bf16 tl.dot operands (a 16 x 16 product
# came out 2.7e10 off), so under the interpreter bf16 operands are widened to fp32 first (exact
# for the products). Read once, like @triton.jit does; compiled kernels keep bf16 dots.
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _pack_keys(score, cols, valid):
    """fp32 ``score`` [BM, BN], int64 latent ids ``cols`` [BN] -> unique int64 keys [BM, BN];
    where ``valid`` is false the key is masked.

    Canonical first: -0.0 becomes +0.0 (its bits would sort it below +0.0 and break the
    lower-latent-first rule at zero; an fp64 score under ~1e-45 rounds to a signed zero), and
    every NaN becomes the positive quiet NaN, which sorts above +inf, as ``torch.topk`` ranks NaN
    (a negative NaN's bits would sort below -inf, one of them onto the masked sentinel)."""
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits == _NEG_ZERO_BITS, 0, bits)
    bits = tl.where(score != score, _CANONICAL_NAN_BITS, bits)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    hi = tl.where(valid, ordered, _MASKED_HI)
    return (hi.to(tl.int64) << 32) + (4294967295 - cols)[None, :]


@triton.jit
def _mask_keys(keys, drop):
    """``keys`` with the high word set to ``_MASKED_HI`` where ``drop``. The low word is kept, so
    this is one 32-bit select per key instead of two."""
    return tl.where(drop, keys.to(tl.uint32).to(tl.int64) + _MASKED_BASE, keys)


@triton.jit
def _sort_merge(keys, state, KP: tl.constexpr):
    """Top ``KP`` keys per row of ``state`` [BM, KP] together with ``keys`` [BM, BN >= KP]."""
    tile_top = tl.topk(keys, KP, dim=1)  # descending
    state_up = tl.sort(state, dim=1)  # ascending
    # Ascending then descending is bitonic: the elementwise max is the upper half-cleaner output,
    # i.e. exactly the top KP of the union.
    return tl.maximum(state_up, tile_top)


@triton.jit
def _replace_min_rounds(keys, state, rounds):
    """``rounds`` times: the row max of ``keys`` leaves the tile and replaces the state's row min
    if it is larger. Returns the new state.

    Keys are unique in their low 32 bits within a row (tile and state alike), so "is this the
    max / the min" is one 32-bit compare of the low words instead of a 64-bit one."""
    for _ in range(rounds):
        kth = tl.min(state, axis=1)
        best = tl.max(keys, axis=1)
        keys = _mask_keys(keys, keys.to(tl.int32) == best.to(tl.int32)[:, None])
        is_min = state.to(tl.int32) == kth.to(tl.int32)[:, None]
        state = tl.where(is_min, tl.maximum(best, kth)[:, None], state)
    return state


@triton.jit
def _fold_tile(keys, state, KP: tl.constexpr, STRATEGY: tl.constexpr, SORT_ABOVE: tl.constexpr):
    """Fold one tile's keys [BM, BN] into the running state [BM, KP]."""
    if STRATEGY == 0:
        kth = tl.min(state, axis=1)
        beats = tl.sum((keys > kth[:, None]).to(tl.int32), axis=1)
        rounds = tl.minimum(tl.max(beats, axis=0), KP)
        # Compile-time guard (the launcher passes SORT_ABOVE = KP where BLOCK_N < KP and
        # tl.topk(tile, KP) cannot compile), then the run-time test: two ifs on purpose.
        if SORT_ABOVE < KP:  # noqa: SIM102
            if rounds > SORT_ABOVE:
                state = _sort_merge(keys, state, KP)
                rounds = 0
        state = _replace_min_rounds(keys, state, rounds)
    elif STRATEGY == 1:
        state = _sort_merge(keys, state, KP)
    else:
        state = _replace_min_rounds(keys, state, KP)
    return state


@triton.jit
def _encode_topk_fwd_kernel(
    # pointers
    x_ptr,  # [B, D] encoder input (already minus b_dec where that applies), any strides
    W_ptr,  # [D, N] W_enc, any strides (same dtype as x)
    b_ptr,  # [N] b_enc
    thr_ptr,  # [N] threshold; read only if HAS_THRESHOLD
    dead_ptr,  # [N] bool (as uint8) dead latents; read only if HAS_AUX
    cand_ptr,  # [B, S, KP] int64 output: packed candidate keys of each slab
    aux_ptr,  # [B, S, KAP] int64 output: the same among dead latents; written only if HAS_AUX
    # sizes
    B,
    D,
    N,
    S,  # slabs
    tiles_per_slab,
    # strides
    stride_xb,
    stride_xd,
    stride_wd,
    stride_wn,
    stride_b,
    stride_thr,
    stride_dead,
    # meta-parameters
    KP: tl.constexpr,  # next_pow2(k): candidates per row per slab
    KAP: tl.constexpr,  # next_pow2(min(k_aux, N)), or 1 when HAS_AUX is off
    HAS_THRESHOLD: tl.constexpr,
    HAS_AUX: tl.constexpr,
    STRATEGY: tl.constexpr,  # STRATEGIES[...]
    SORT_ABOVE: tl.constexpr,  # gated rounds above which a tile takes the sort-merge step
    SORT_ABOVE_AUX: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs (interpreter tests)
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # bf16 under the interpreter only (see _fwd_plan)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # D % BLOCK_K == 0
):
    pid_m = tl.program_id(0)
    slab = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    ks = tl.arange(0, BLOCK_K)

    slots = tl.arange(0, KP).to(tl.int64)
    state = tl.zeros((BLOCK_M, KP), dtype=tl.int64) + (slots + _EMPTY_BASE)[None, :]
    if HAS_AUX:
        aux_slots = tl.arange(0, KAP).to(tl.int64)
        aux_state = tl.zeros((BLOCK_M, KAP), dtype=tl.int64) + (aux_slots + _EMPTY_BASE)[None, :]

    tile_begin = slab * tiles_per_slab
    tile_end = tl.minimum(tile_begin + tiles_per_slab, tl.cdiv(N, BLOCK_N))
    for tile in range(tile_begin, tile_end):
        # N < 2^31 (checked), so tile * BLOCK_N fits int32; the offsets below are int64.
        cols = (tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_mask = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + ks
            # EVEN_K (D % BLOCK_K == 0, every real width): the masks are loop-invariant.
            k_mask = (kk < D) | EVEN_K
            x = tl.load(
                x_ptr + rows[:, None] * stride_xb + kk[None, :].to(tl.int64) * stride_xd,
                mask=row_mask[:, None] & k_mask[None, :],
                other=0,
            )
            w = tl.load(
                W_ptr + kk[:, None].to(tl.int64) * stride_wd + cols[None, :] * stride_wn,
                mask=k_mask[:, None] & col_mask[None, :],
                other=0,
            )
            if UPCAST_DOT:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        bias = tl.load(b_ptr + cols * stride_b, mask=col_mask, other=0)
        pre = acc + bias.to(ACC_DTYPE)[None, :]
        valid = row_mask[:, None] & col_mask[None, :]
        if HAS_THRESHOLD:
            thr = tl.load(thr_ptr + cols * stride_thr, mask=col_mask, other=0)
            valid &= pre > thr.to(ACC_DTYPE)[None, :]
        keys = _pack_keys(pre.to(tl.float32), cols, valid)
        if HAS_AUX:
            dead = tl.load(dead_ptr + cols * stride_dead, mask=col_mask, other=0) != 0
            aux_keys = _mask_keys(keys, ~dead[None, :])
            aux_state = _fold_tile(aux_keys, aux_state, KAP, STRATEGY, SORT_ABOVE_AUX)
        state = _fold_tile(keys, state, KP, STRATEGY, SORT_ABOVE)

    out_rows = rows[:, None] * S * KP + slab * KP
    tl.store(cand_ptr + out_rows + slots[None, :], state, mask=row_mask[:, None])
    if HAS_AUX:
        aux_rows = rows[:, None] * S * KAP + slab * KAP
        tl.store(aux_ptr + aux_rows + aux_slots[None, :], aux_state, mask=row_mask[:, None])


# ---------------------------------------------------------------------------------------------
# Launchers: check shapes, pick blocks and slabs, allocate. _fwd_plan returns (kernel, grid,
# kwargs) so that kernels/check.py and compile_configs() compile exactly what is launched.
# ---------------------------------------------------------------------------------------------


class Blocks(NamedTuple):
    """One launch's block sizes (see the tuning constants for the reasons)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def check_blocks(blocks: Blocks) -> None:
    """Blocks valid on hardware: powers of two, M/N/K >= MIN_DOT_BLOCK (the interpreter would
    take smaller ones that no GPU compile accepts)."""
    for name in ("block_m", "block_n", "block_k"):
        size = getattr(blocks, name)
        if size < MIN_DOT_BLOCK or size & (size - 1):
            raise ValueError(
                f"{name}={size} must be a power of two >= {MIN_DOT_BLOCK} (tl.dot on NVIDIA GPUs)"
            )


def blocks_for(kp: int, kap: int, dtype: torch.dtype, strategy: str = DEFAULT_STRATEGY) -> Blocks:
    """Blocks for a main state of ``kp`` keys and an AuxK state of ``kap`` (0: none)."""
    slots = kp + kap
    block_m = MAX_BLOCK_M
    while block_m > MIN_BLOCK_M and block_m * slots > STATE_BUDGET:
        block_m //= 2
    block_n = max(BLOCK_N, kp, kap) if strategy == "sort_merge" else BLOCK_N
    block_k = max(16, BLOCK_K_BYTES // dtype.itemsize)
    return Blocks(block_m, block_n, block_k, NUM_WARPS, NUM_STAGES)


def _slabs(row_blocks: int, n_tiles: int, num_slabs: int | None) -> tuple[int, int]:
    """``(S, tiles_per_slab)``; no slab is empty."""
    if num_slabs is None:
        num_slabs = min(
            triton.cdiv(TARGET_PROGRAMS, max(row_blocks, 1)), n_tiles // MIN_TILES_PER_SLAB
        )
    # Slabs are grid dimension 1: at most MAX_GRID_YZ of them, however large d_sae is.
    num_slabs = max(1, min(num_slabs, n_tiles, MAX_GRID_YZ))
    per_slab = triton.cdiv(n_tiles, num_slabs)
    return triton.cdiv(n_tiles, per_slab), per_slab


def _check_args(x, W_enc, b_enc, k, threshold, dead_mask, k_aux, strategy) -> None:
    if x.dim() != 2 or W_enc.dim() != 2 or x.shape[1] != W_enc.shape[0]:
        raise ValueError(
            f"x_in must be [B, d_in] and W_enc [d_in, d_sae]; got {tuple(x.shape)} and "
            f"{tuple(W_enc.shape)}"
        )
    n = W_enc.shape[1]
    if x.dtype != W_enc.dtype or x.dtype not in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float64,
    ):
        raise ValueError(
            f"x_in and W_enc must share one of float32/bfloat16/float16/float64; got {x.dtype} "
            f"and {W_enc.dtype}"
        )
    if not 1 <= k <= min(n, MAX_K):
        raise ValueError(
            f"k={k} must be in [1, min(d_sae={n}, MAX_K={MAX_K})] (the triton backend takes "
            "larger k through the torch path)"
        )
    if n >= 2**31:
        raise ValueError(f"d_sae={n} must be < 2^31 (latent ids are packed into 32 bits)")
    for name, t in (("b_enc", b_enc), ("threshold", threshold)):
        if t is not None and (t.shape != (n,) or not t.dtype.is_floating_point):
            raise ValueError(f"{name} must be a float [d_sae={n}], got {t.dtype} {tuple(t.shape)}")
    if dead_mask is not None and (dead_mask.shape != (n,) or dead_mask.dtype != torch.bool):
        raise ValueError(
            f"dead_mask must be bool [d_sae={n}], got {dead_mask.dtype} {tuple(dead_mask.shape)}"
        )
    if k_aux < 0:
        raise ValueError(f"k_aux={k_aux} must be >= 0")
    if dead_mask is not None and min(k_aux, n) > MAX_K:
        raise ValueError(
            f"min(k_aux={k_aux}, d_sae={n}) must be <= MAX_K={MAX_K} (the triton backend takes "
            "larger k_aux through the torch path)"
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {sorted(STRATEGIES)}")
    check_same_device(x, W_enc, b_enc, threshold, dead_mask)


def _fwd_plan(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    threshold: Tensor | None,
    dead: Tensor | None,
    cand: Tensor,
    aux: Tensor | None,
    *,
    strategy: str,
    blocks: Blocks,
    tiles_per_slab: int,
):
    """``(kernel, grid, kwargs)`` writing ``cand [B, S, KP]`` (and ``aux [B, S, KAP]``).
    ``dead`` is the dead mask as uint8 (Triton takes no bool pointers), or None."""
    B, D = x.shape
    N = W_enc.shape[1]
    S, KP = cand.shape[1], cand.shape[2]
    KAP = 1 if aux is None else aux.shape[2]
    fp64 = x.dtype == torch.float64
    kwargs = dict(
        x_ptr=x,
        W_ptr=W_enc,
        b_ptr=b_enc,
        # Never read when the flag is off; any valid pointer will do.
        thr_ptr=b_enc if threshold is None else threshold,
        dead_ptr=cand if dead is None else dead,
        cand_ptr=cand,
        aux_ptr=cand if aux is None else aux,
        B=B,
        D=D,
        N=N,
        S=S,
        tiles_per_slab=tiles_per_slab,
        stride_xb=x.stride(0),
        stride_xd=x.stride(1),
        stride_wd=W_enc.stride(0),
        stride_wn=W_enc.stride(1),
        stride_b=b_enc.stride(0),
        stride_thr=1 if threshold is None else threshold.stride(0),
        stride_dead=1 if dead is None else dead.stride(0),
        KP=KP,
        KAP=KAP,
        HAS_THRESHOLD=threshold is not None,
        HAS_AUX=aux is not None,
        STRATEGY=STRATEGIES[strategy],
        SORT_ABOVE=_sort_above(KP, blocks.block_n),
        SORT_ABOVE_AUX=_sort_above(KAP, blocks.block_n),
        ACC_DTYPE=tl.float64 if fp64 else tl.float32,
        INPUT_PRECISION=_input_precision(x.dtype),
        UPCAST_DOT=_INTERPRETER and x.dtype == torch.bfloat16,
        BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n,
        BLOCK_K=blocks.block_k,
        EVEN_K=D % blocks.block_k == 0,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        maxnreg=MAX_REGISTERS,
    )
    return _encode_topk_fwd_kernel, (triton.cdiv(B, blocks.block_m), S), kwargs


def _sort_above(kp: int, block_n: int) -> int:
    """Gated rounds above which a tile takes the sort-merge step; ``kp`` (never) when the tile
    is narrower than the state, since tl.topk(tile, KP) needs BLOCK_N >= KP."""
    return GATED_SORT_ABOVE[kp] if kp <= block_n else kp


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: FP32_INPUT_PRECISION for fp32, exact for fp64; bf16/fp16 take
    the default (their tensor-core products are exact anyway)."""
    return {torch.float32: FP32_INPUT_PRECISION, torch.float64: "ieee"}.get(dtype, "tf32")


def _decode(keys: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Packed keys -> ``(scores float32, latent ids int64)``. Empty state slots decode to a
    ``-inf`` score; their out-of-range ids become 0."""
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    ids = _LOW_MASK - (keys & _LOW_MASK)
    return bits.view(torch.float32), torch.where(ids < n, ids, 0)


def _merge(cand: Tensor, k: int, n: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` of the ``S * KP`` candidate keys of each row, sorted descending, decoded. Keys
    are unique per slab and ordered by the tie rule, so this merge keeps the rule exactly."""
    keys = cand.reshape(cand.shape[0], cand.shape[1] * cand.shape[2])
    keys = torch.topk(keys, k, dim=1, sorted=True).values
    return _decode(keys, n)


def _new_candidates(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """An uninitialised candidate-key buffer (tests patch this to poison it)."""
    return torch.empty(shape, dtype=torch.int64, device=device)


def _launch_plan(x_in, W_enc, b_enc, k, threshold, dead_mask, k_aux, strategy, num_slabs, blocks):
    """Check, pick blocks and slabs, allocate the candidate buffers. Returns
    ``((kernel, grid, kwargs), cand, aux, aux_width)`` with ``aux`` None when there is no AuxK.

    The AuxK state is sized from ``aux_width = min(k_aux, d_sae)``, never from the number of
    dead latents: the compile key (KAP, BLOCK_M) stays the same while latents die during
    training, and nothing here reads the dead mask back to the host."""
    _check_args(x_in, W_enc, b_enc, k, threshold, dead_mask, k_aux, strategy)
    B, n = x_in.shape[0], W_enc.shape[1]
    aux_width = min(k_aux, n) if dead_mask is not None else 0
    kp = triton.next_power_of_2(k)
    kap = triton.next_power_of_2(aux_width) if aux_width else 0
    blocks = blocks or blocks_for(kp, kap, x_in.dtype, strategy)
    check_blocks(blocks)
    if strategy == "sort_merge" and blocks.block_n < max(kp, kap):
        raise ValueError(
            f"sort_merge needs block_n={blocks.block_n} >= next_pow2(k)={max(kp, kap)}"
        )
    S, per_slab = _slabs(triton.cdiv(B, blocks.block_m), triton.cdiv(n, blocks.block_n), num_slabs)
    device = x_in.device
    cand = _new_candidates((B, S, kp), device)
    aux = _new_candidates((B, S, kap), device) if kap else None
    dead = dead_mask.to(torch.uint8) if kap else None
    plan = _fwd_plan(
        x_in,
        W_enc,
        b_enc,
        threshold,
        dead,
        cand,
        aux,
        strategy=strategy,
        blocks=blocks,
        tiles_per_slab=per_slab,
    )
    return plan, cand, aux, aux_width


# ---------------------------------------------------------------------------------------------
# AOT compile cases for kernels/check.py: every block configuration the launcher picks for the
# common k, fp32 and bf16, built from the same _launch_plan as a real call.
# ---------------------------------------------------------------------------------------------


class CompileConfig(NamedTuple):
    """One specialisation to compile: ``triton.compile(ASTSource(fn, signature, constexprs,
    attrs), target=..., options=options)``. ``plan()`` gives the ``(kernel, grid, kwargs)`` it
    came from, for a checker that builds its own signature."""

    name: str
    fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    plan: object
    dtype: str  # "fp32" or "bf16"
    d_in: int  # the example's d_in (any multiple of 64 specialises alike)


_PTR_TYPES = {
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float64: "*fp64",
    torch.int64: "*i64",
    torch.uint8: "*u8",
}
# (label, k, k_aux, threshold, strategy, W_enc stored as the transpose of [n, d_in])
_AOT_CASES = (
    ("k=32", 32, 0, False, DEFAULT_STRATEGY, False),
    ("k=32 W=[n,d].T", 32, 0, False, DEFAULT_STRATEGY, True),
    ("k=50", 50, 0, False, DEFAULT_STRATEGY, False),
    ("k=128", 128, 0, False, DEFAULT_STRATEGY, False),
    ("k=512", 512, 0, False, DEFAULT_STRATEGY, False),
    ("k=32 threshold", 32, 0, True, DEFAULT_STRATEGY, False),
    ("k=32 k_aux=256", 32, 256, False, DEFAULT_STRATEGY, False),
    ("k=32 sort_merge", 32, 0, False, "sort_merge", False),
    ("k=32 rounds_of_max", 32, 0, False, "rounds_of_max", False),
)


def _aot_plan(dtype: torch.dtype, k, k_aux, with_threshold, strategy, transposed_W):
    """(kernel, grid, kwargs) for small CPU examples whose sizes and strides specialise like a
    real step (sizes divisible by 16, unit inner strides, 16-byte aligned pointers)."""
    B, d, n = 512, 256, 2048
    W = torch.zeros(n, d, dtype=dtype).T if transposed_W else torch.zeros(d, n, dtype=dtype)
    dead = torch.ones(n, dtype=torch.bool) if k_aux else None
    thr = torch.zeros(n, dtype=dtype) if with_threshold else None
    args = (torch.zeros(B, d, dtype=dtype), W, torch.zeros(n, dtype=dtype), k, thr, dead, k_aux)
    return _launch_plan(*args, strategy, None, None)[0]


def _aot_source(kernel, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) as the JIT would specialise ``kwargs``: ints equal
    to 1 become constants, ints divisible by 16 and 16-byte aligned pointers get divisibility."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = kwargs[param.name]
        if param.is_constexpr or (type(value) is int and value == 1):
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, Tensor):
            signature[param.name] = _PTR_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {key: v for key, v in kwargs.items() if key not in signature}
    return signature, constexprs, attrs, options


def compile_configs() -> list[CompileConfig]:
    """Every launch configuration to AOT-compile (sm_80 / sm_90 in kernels/check.py)."""
    configs = []
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for label, *case in _AOT_CASES:

            def plan(dtype=dtype, case=tuple(case)):
                return _aot_plan(dtype, *case)

            kernel, _grid, kwargs = plan()
            blocks = f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}x{kwargs['BLOCK_K']}"
            name = f"encode_topk {label} {dname} {blocks} w{kwargs['num_warps']}"
            source = _aot_source(kernel, kwargs)
            configs.append(CompileConfig(name, kernel, *source, plan, dname, kwargs["D"]))
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
    strategy: str = DEFAULT_STRATEGY,
    num_slabs: int | None = None,
    blocks: Blocks | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The ``k`` largest encoder scores per row, fused with the encoder GEMM. Not differentiable.

    ``score = pre = x_in @ W_enc + b_enc`` (fp32 accumulation; fp64 for fp64 inputs), or, with
    ``threshold``, ``pre`` where ``pre > threshold`` and ``-inf`` elsewhere. The ``[B, d_sae]``
    scores are never written to memory.

    Args:
        x_in: ``[B, d_in]`` float32, bfloat16 or float16 (float64 for oracle tests), any strides.
        W_enc: ``[d_in, d_sae]``, same dtype as ``x_in``, any strides.
        b_enc: ``[d_sae]`` float.
        k: ``1 <= k <= min(d_sae, MAX_K = 512)``; need not be a power of two.
        threshold: ``[d_sae]`` float or None.
        dead_mask: ``[d_sae]`` bool or None. With ``k_aux > 0``, the top
            ``min(k_aux, d_sae)`` scores among dead latents are selected in the same pass
            (``min(k_aux, d_sae) <= MAX_K``); slots beyond the number of dead latents hold
            ``-inf``. No host sync: the dead latents are never counted here.
        strategy: one of :data:`STRATEGIES` (all exact; they differ in speed only).
        num_slabs: override the number of ``d_sae`` slabs (tests, benchmarks).
        blocks: override the block sizes (tests, benchmarks).

    Returns:
        ``(top, indices, aux_top, aux_indices)``: ``top [B, k]`` float32 scores sorted
        descending (**not** ReLU'd), ``indices [B, k]`` int64. Ties follow fastsae's rule (lower
        latent first). A row with fewer than ``k`` finite scores is padded with ``-inf`` (index
        0); a NaN score ranks above ``+inf`` (as in ``torch.topk``) and ``-0.0`` ties with
        ``+0.0``. ``aux_top [B, min(k_aux, d_sae)]`` / ``aux_indices`` likewise (``-inf``
        padded), or ``None, None`` when ``k_aux == 0`` or ``dead_mask`` is None.
    """
    args = (x_in, W_enc, b_enc, k, threshold, dead_mask, k_aux, strategy, num_slabs, blocks)
    plan, cand, aux, aux_width = _launch_plan(*args)
    launch(plan)
    n = W_enc.shape[1]
    top, indices = _merge(cand, k, n)
    if aux is None:
        return top, indices, None, None
    aux_top, aux_indices = _merge(aux, aux_width, n)
    return top, indices, aux_top, aux_indices
