"""Fused encode + top-k, restructured around a per-row threshold (issue 13): the GEMM tile no
longer shares the register file with the selection state.

Same contract as :func:`fastsae.kernels.encode_topk.select_topk` (same packed keys, same tie
rule, same ``[B, S, KP]`` candidates merged by ``torch.topk``); what changes is the kernel.

Design
------
- **The state leaves the registers.** Each row's ``KP`` best keys live in the program's own slice
  of the output buffer ``cand [B, S, KP]`` (L1/L2-resident; Triton has no explicit shared-memory
  API outside Gluon). The registers hold one int32 per row: ``thr``, the high word (ordered
  score) of the row's current ``KP``-th key. During the K-loop only the fp32 accumulator is live,
  so the bf16 tile grows to 128 x 128 at k <= 32 (``wgmma m64n128k16`` on sm_90, two
  warpgroups; the register-state kernel: 128 x 64) and 64 x 128 at k=64 (``m64n64k16``; was
  64 x 64, ``m64n32k16``). The slow path still merges in registers, which sets those rows.
- **Fast path: one int32 compare per score.** A tile's scores are mapped to ordered int32 high
  words (``-0.0`` to ``+0.0``, NaN to ``+qNaN``, masked to below ``-inf``) and compared with
  ``>=`` against the row's ``thr`` (a superset of the keys that beat the ``KP``-th one). Where no
  row of the tile has a passing score, nothing else happens: no 64-bit key is built.
- **Slow path: candidates filtered per chunk.** Otherwise the tile's high words are stored to
  the program's int32 scratch rows ``[BLOCK_M, BLOCK_N]``, the state is loaded, and the tile is
  merged ``CHUNK = max(KP, 16)`` columns at a time: each chunk is filtered again against the
  rising threshold and skipped when nothing passes; else ``r`` rounds of "chunk max replaces
  state min" (``r`` = the most passing scores of any row, capped at ``KP``), or the sorted merge
  when ``r > GATED_SORT_ABOVE[KP]`` (a slab's first tile, adversarial orders). The state is
  stored back and ``thr`` refreshed. Compacting per candidate instead (``tl.cumsum`` positions
  and a scattered store of 64-bit keys) made Triton convert the 128 x 128 tile between layouts
  and spilled 44-780 B on sm_90.
- **TMA** (``USE_TMA``, 16-bit inputs): ``x`` and ``W_enc`` are read through host-built tensor
  descriptors when their layout allows it (unit inner stride, 16-byte aligned base and outer stride; ``W_enc``
  either ``[d_in, n]`` row-major or the transpose of a row-major ``[n, d_in]``); otherwise, and
  on GPUs before sm_90, by pointers. The interpreter runs both paths.
- **Persistent grid.** ``P`` programs (one per SM on CUDA) walk the (row block, slab) work items
  ``pid, pid + P, ...``; row blocks vary fastest, so the programs running at one time share a
  slab of ``W_enc`` in L2. Fewer, longer slabs than the register kernel: the threshold settles
  over more tiles, and the final merge has fewer candidates.

Memory ordering: the scratch and the state are written and read back by different threads of
the program; ``tl.debug_barrier()`` (``bar.sync``, which orders global memory within a CTA)
separates each write from the reads that follow, and the next tile's writes from this tile's
reads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastsae.kernels import encode_topk as _et
from fastsae.kernels._launch import MAX_GRID_YZ, launch

__all__ = ["Blocks", "blocks_for", "compile_configs", "select_topk"]

# ---------------------------------------------------------------------------------------------
# Tuning constants. Checked with ptxas (registers, spills) for sm_80 and sm_90 under Triton 3.6
# and 3.9 (docs/kernels.md); not timed on a GPU (none was lent to this work).
# ---------------------------------------------------------------------------------------------

# 128 x 128 tiles: a 128 x 128 fp32 accumulator is 64 registers per thread at 8 warps, and the
# state is not in registers during the K-loop, so this is the largest tile whose accumulator
# leaves room for the 3-stage pipeline and the slow path (256 x 128 would be 128 registers of
# accumulator alone).
MAX_BLOCK_M = 128
# fp32 inputs (tf32x3: each operand split into a high and a low tf32 part) at 128 x 128 spilled
# 20-84 B on sm_90 (Triton 3.9 / 3.6, TMA and pointer paths): fp32 takes 64 rows.
MAX_BLOCK_M_FP32 = 64
MIN_BLOCK_M = 16
BLOCK_N = 128
# Slow-path budget: the state [BM, KP] and one chunk of candidates [BM, KP] are int64 registers
# while they merge: BM * 2 * KP <= 8192 keys is 64 registers per thread at 8 warps. KP <= 32
# keeps 128 rows, KP=64 takes 64, KP=128 32, KP=512 16. At 16384 keys (128 x 128 at KP=64) the
# bf16 tile spilled 160 B (Triton 3.9) / 128 B (3.6) on sm_90.
SLOW_PATH_KEYS = 8192
# fp32 (tf32x3 operands take registers too): 64 x 128 at KP=64 spilled 76 B under Triton 3.6.
SLOW_PATH_KEYS_FP32 = 4096
BLOCK_K_BYTES = _et.BLOCK_K_BYTES
NUM_WARPS = 8
NUM_STAGES = 3
MAX_REGISTERS = _et.MAX_REGISTERS
GATED_SORT_ABOVE = _et.GATED_SORT_ABOVE
# TMA for 16-bit inputs only: fp32 (tf32x3) through descriptors spilled 16-116 B on sm_90 under
# Triton 3.6 at 64 x 128 (3.9: none), the pointer path none. Explicit use_tma=True overrides.
TMA_MAX_ITEMSIZE = 2
# Persistent grid: one program per SM (8 warps at ~200 registers: one CTA per SM anyway). The
# SM count of an H100 SXM where there is no CUDA device to ask (interpreter, AOT check).
PROGRAMS_PER_SM = 1
DEFAULT_SMS = 132
# Work items per program, at least: row blocks x slabs >= WORK_PER_PROGRAM x P, so the tail of
# the persistent loop is short; at most what keeps MIN_TILES_PER_SLAB tiles per slab.
WORK_PER_PROGRAM = 2
MIN_TILES_PER_SLAB = 16

_ORDERED_NEG_INF = tl.constexpr(_et._ORDERED_NEG_INF)
_MASKED_HI = _et._MASKED_HI
_MASKED_BASE = _et._MASKED_BASE
_EMPTY_BASE = _et._EMPTY_BASE
_NEG_ZERO_BITS = _et._NEG_ZERO_BITS
_CANONICAL_NAN_BITS = _et._CANONICAL_NAN_BITS


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _ordered_hi(score, valid):
    """fp32 ``score`` [BM, BN] -> the int32 high words of its packed keys (``encode_topk``'s
    ``_pack_keys`` without the low word): canonical -0.0 and NaN, order-preserving, and
    ``_MASKED_HI`` where ``valid`` is false."""
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits == _NEG_ZERO_BITS, 0, bits)
    bits = tl.where(score != score, _CANONICAL_NAN_BITS, bits)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(valid, ordered, _MASKED_HI)


@triton.jit
def _merge_passing(
    hi,  # [BM, BN] int32 ordered high words of the tile (masked where invalid)
    thr,  # [BM] int32 high word of each row's current KP-th key
    st_ptrs,  # [BM, KP] pointers to the rows' state (their slice of cand)
    row_ok,  # [BM] rows < B
    scr_rows,  # [BM] pointers to the program's int32 scratch rows, BN each
    col0,  # the tile's first latent
    BN: tl.constexpr,
    CHUNK: tl.constexpr,  # columns merged at a time: max(KP, 16), at most BN
    KP: tl.constexpr,
    SORT_ABOVE: tl.constexpr,
):
    """Fold the tile's scores that reach their row's threshold into the state; return the new
    threshold. Tiles where no row has such a score return at once (the fast path)."""
    passing = hi >= thr[:, None]
    most = tl.max(tl.sum(passing.to(tl.int32), axis=1), axis=0)
    if most > 0:
        # The high words go to scratch as they are (one int32 store from the accumulator's
        # layout): compacting them in registers (tl.cumsum + a scattered store) converted the
        # 128 x 128 tile between layouts and spilled 780 B on sm_90.
        tl.store(scr_rows[:, None] + tl.arange(0, BN)[None, :], hi)
        tl.debug_barrier()
        state = tl.load(st_ptrs, mask=row_ok[:, None], other=0)
        cw = tl.arange(0, CHUNK)
        for c0 in range(0, BN, CHUNK):
            c_hi = tl.load(scr_rows[:, None] + (c0 + cw)[None, :])
            # Filtered again against the threshold as it rises chunk by chunk.
            c_pass = c_hi >= thr[:, None]
            rounds = tl.max(tl.sum(c_pass.to(tl.int32), axis=1), axis=0)
            if rounds > 0:
                c_hi = tl.where(c_pass, c_hi, _MASKED_HI)
                low = 4294967295 - (col0 + c0 + cw).to(tl.int64)
                cands = (c_hi.to(tl.int64) << 32) + low[None, :]
                # More than KP rounds cannot change the state: the chunk's top KP were offered.
                rounds = tl.minimum(rounds, KP)
                if SORT_ABOVE < KP:  # noqa: SIM102 - compile-time guard, then the run-time test
                    if rounds > SORT_ABOVE:
                        state = _et._sort_merge(cands, state, KP)
                        rounds = 0
                state = _et._replace_min_rounds(cands, state, rounds)
                thr = (tl.min(state, axis=1) >> 32).to(tl.int32)
        tl.store(st_ptrs, state, mask=row_ok[:, None])
        # The next tile's scratch writes must not overtake this tile's reads.
        tl.debug_barrier()
    return thr


@triton.jit
def _encode_topk_filtered_fwd_kernel(
    # pointers
    x_ptr,  # [B, D] encoder input, any strides (read when USE_TMA is off)
    W_ptr,  # [D, N] W_enc, any strides (read when USE_TMA is off)
    x_desc,  # TMA descriptor of x, block [BLOCK_M, BLOCK_K]; None without TMA
    w_desc,  # TMA descriptor of W_enc [D, N] (block [BLOCK_K, BLOCK_N]) or of W_enc.T [N, D]
    # (block [BLOCK_N, BLOCK_K]) when W_T; None without TMA
    b_ptr,  # [N] b_enc
    thr_ptr,  # [N] threshold; read only if HAS_THRESHOLD
    dead_ptr,  # [N] uint8 dead latents; read only if HAS_AUX
    cand_ptr,  # [B, S, KP] int64: the state while running, the slab candidates at the end
    aux_ptr,  # [B, S, KAP] int64: the same among dead latents; used only if HAS_AUX
    scr_ptr,  # [P, BLOCK_M, BLOCK_N] int32 scratch: the high words of one tile
    # sizes
    B,
    D,
    N,
    S,  # slabs
    tiles_per_slab,
    num_work,  # row blocks x slabs
    # strides
    stride_xb,
    stride_xd,
    stride_wd,
    stride_wn,
    stride_b,
    stride_thr,
    stride_dead,
    # meta-parameters
    KP: tl.constexpr,
    KAP: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    HAS_AUX: tl.constexpr,
    SORT_ABOVE: tl.constexpr,
    SORT_ABOVE_AUX: tl.constexpr,
    CHUNK: tl.constexpr,  # columns of a tile merged at a time
    AUX_CHUNK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    USE_TMA: tl.constexpr,
    W_T: tl.constexpr,  # w_desc describes W_enc.T (a row-major [N, D] buffer)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    row_blocks = tl.cdiv(B, BLOCK_M)
    n_tiles = tl.cdiv(N, BLOCK_N)
    local = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    slots = tl.arange(0, KP).to(tl.int64)
    scr_rows = scr_ptr + pid.to(tl.int64) * (BLOCK_M * BLOCK_N) + local.to(tl.int64) * BLOCK_N
    if HAS_AUX:
        aux_slots = tl.arange(0, KAP).to(tl.int64)

    # Row blocks vary fastest: programs running together share a slab of W_enc in L2.
    for work in range(pid, num_work, nprog):
        pid_m = work % row_blocks
        slab = work // row_blocks
        rows = pid_m.to(tl.int64) * BLOCK_M + local
        row_ok = rows < B
        st_ptrs = cand_ptr + rows[:, None] * (S * KP) + slab * KP + slots[None, :]
        tl.store(st_ptrs, (slots + _EMPTY_BASE)[None, :] + tl.zeros((BLOCK_M, KP), tl.int64),
                 mask=row_ok[:, None])  # fmt: skip
        thr = tl.full((BLOCK_M,), _ORDERED_NEG_INF, tl.int32)
        if HAS_AUX:
            aux_ptrs = aux_ptr + rows[:, None] * (S * KAP) + slab * KAP + aux_slots[None, :]
            empty = (aux_slots + _EMPTY_BASE)[None, :] + tl.zeros((BLOCK_M, KAP), tl.int64)
            tl.store(aux_ptrs, empty, mask=row_ok[:, None])
            aux_thr = tl.full((BLOCK_M,), _ORDERED_NEG_INF, tl.int32)
        tl.debug_barrier()

        tile_begin = slab * tiles_per_slab
        tile_end = tl.minimum(tile_begin + tiles_per_slab, n_tiles)
        for tile in range(tile_begin, tile_end):
            col0 = tile * BLOCK_N  # N < 2^31 (checked): int32 is enough
            cols = (col0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            col_mask = cols < N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
            for k0 in range(0, D, BLOCK_K):
                if USE_TMA:
                    # Out-of-bounds rows, columns and K are zero-filled by the copy engine.
                    x = x_desc.load([pid_m * BLOCK_M, k0])
                    if W_T:
                        w = tl.trans(w_desc.load([tile * BLOCK_N, k0]))
                    else:
                        w = w_desc.load([k0, tile * BLOCK_N])
                else:
                    kk = k0 + ks
                    k_mask = (kk < D) | EVEN_K
                    x = tl.load(
                        x_ptr + rows[:, None] * stride_xb + kk[None, :].to(tl.int64) * stride_xd,
                        mask=row_ok[:, None] & k_mask[None, :],
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
            valid = row_ok[:, None] & col_mask[None, :]
            if HAS_THRESHOLD:
                jump = tl.load(thr_ptr + cols * stride_thr, mask=col_mask, other=0)
                valid &= pre > jump.to(ACC_DTYPE)[None, :]
            hi = _ordered_hi(pre.to(tl.float32), valid)
            if HAS_AUX:
                dead = tl.load(dead_ptr + cols * stride_dead, mask=col_mask, other=0) != 0
                aux_hi = tl.where(dead[None, :], hi, _MASKED_HI)
                aux_thr = _merge_passing(
                    aux_hi, aux_thr, aux_ptrs, row_ok, scr_rows, col0, BLOCK_N, AUX_CHUNK, KAP,
                    SORT_ABOVE_AUX,
                )  # fmt: skip
            thr = _merge_passing(
                hi, thr, st_ptrs, row_ok, scr_rows, col0, BLOCK_N, CHUNK, KP, SORT_ABOVE
            )


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


class Blocks(NamedTuple):
    """Block sizes of one launch, and the persistent grid's program count (None: one per SM)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = NUM_WARPS
    num_stages: int = NUM_STAGES
    num_programs: int | None = None


def blocks_for(kp: int, kap: int, dtype: torch.dtype) -> Blocks:
    """Blocks for a main state of ``kp`` keys and an AuxK state of ``kap`` (0: none): the
    largest rows (<= 128) whose slow path stays within SLOW_PATH_KEYS for each state."""
    wide = dtype.itemsize <= 2
    block_m = MAX_BLOCK_M if wide else MAX_BLOCK_M_FP32
    budget = SLOW_PATH_KEYS if wide else SLOW_PATH_KEYS_FP32
    while block_m > MIN_BLOCK_M and block_m * 2 * max(kp, kap) > budget:
        block_m //= 2
    block_k = max(16, BLOCK_K_BYTES // dtype.itemsize)
    return Blocks(block_m, BLOCK_N, block_k)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def _slabs(row_blocks: int, n_tiles: int, programs: int, num_slabs: int | None) -> int:
    """Slabs: enough work items for ``WORK_PER_PROGRAM`` per program, but at least
    MIN_TILES_PER_SLAB tiles per slab; no slab empty; at most MAX_GRID_YZ (the output width)."""
    if num_slabs is None:
        num_slabs = min(
            triton.cdiv(WORK_PER_PROGRAM * programs, max(row_blocks, 1)),
            n_tiles // MIN_TILES_PER_SLAB,
        )
    num_slabs = max(1, min(num_slabs, n_tiles, MAX_GRID_YZ))
    per_slab = triton.cdiv(n_tiles, num_slabs)
    return triton.cdiv(n_tiles, per_slab), per_slab


def _chunk(kp: int, block_n: int) -> int:
    """Columns merged at a time: KP (so the sorted merge, tl.topk(chunk, KP), is possible), at
    least 16, at most the tile."""
    return min(max(kp, 16), block_n)


def _sort_above(kp: int, block_n: int) -> int:
    """Rounds above which a chunk takes the sorted merge; KP (never) when the chunk is narrower
    than the state."""
    return GATED_SORT_ABOVE[kp] if kp <= _chunk(kp, block_n) else kp


def _tma_capable(device: torch.device) -> bool:
    """TMA on sm_90+; the interpreter (CPU tensors) runs descriptor loads too."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return True


def _descriptors(x: Tensor, W: Tensor, blocks: Blocks):
    """``(x_desc, w_desc, W_T)`` when both layouts suit TMA (unit inner stride, 16-byte aligned
    base and outer stride), else None."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    def aligned(t: Tensor, outer: int) -> bool:
        return t.data_ptr() % 16 == 0 and (t.stride(outer) * t.element_size()) % 16 == 0

    if x.stride(1) != 1 or not aligned(x, 0):
        return None
    x_desc = TensorDescriptor.from_tensor(x, [blocks.block_m, blocks.block_k])
    if W.stride(1) == 1 and aligned(W, 0):
        return x_desc, TensorDescriptor.from_tensor(W, [blocks.block_k, blocks.block_n]), False
    if W.stride(0) == 1 and aligned(W, 1):
        return x_desc, TensorDescriptor.from_tensor(W.T, [blocks.block_n, blocks.block_k]), True
    return None


def _launch_plan(
    x_in, W_enc, b_enc, k, threshold, dead_mask, k_aux, num_slabs, blocks, use_tma
):  # fmt: skip
    """Check, pick blocks, slabs and programs, allocate. Returns
    ``((kernel, grid, kwargs), cand, aux, aux_width)``; ``aux`` is None without AuxK."""
    _et._check_args(x_in, W_enc, b_enc, k, threshold, dead_mask, k_aux, _et.DEFAULT_STRATEGY)
    B, D = x_in.shape
    n = W_enc.shape[1]
    aux_width = min(k_aux, n) if dead_mask is not None else 0
    kp = triton.next_power_of_2(k)
    kap = triton.next_power_of_2(aux_width) if aux_width else 0
    blocks = blocks or blocks_for(kp, kap, x_in.dtype)
    _et.check_blocks(blocks)
    device = x_in.device
    row_blocks = triton.cdiv(B, blocks.block_m)
    programs = blocks.num_programs or PROGRAMS_PER_SM * _num_sms(device)
    S, per_slab = _slabs(row_blocks, triton.cdiv(n, blocks.block_n), programs, num_slabs)
    num_work = row_blocks * S
    programs = max(1, min(programs, num_work))
    cand = _et._new_candidates((B, S, kp), device)
    aux = _et._new_candidates((B, S, kap), device) if kap else None
    scratch = torch.empty((programs, blocks.block_m, blocks.block_n), dtype=torch.int32,
                          device=device)  # fmt: skip
    descs = None
    if use_tma is None:
        use_tma = _tma_capable(device) and x_in.element_size() <= TMA_MAX_ITEMSIZE
    if use_tma and B > 0:
        descs = _descriptors(x_in, W_enc, blocks)
    x_desc, w_desc, w_t = descs if descs else (None, None, False)
    fp64 = x_in.dtype == torch.float64
    kwargs = dict(
        x_ptr=x_in,
        W_ptr=W_enc,
        x_desc=x_desc,
        w_desc=w_desc,
        b_ptr=b_enc,
        thr_ptr=b_enc if threshold is None else threshold,
        dead_ptr=cand if aux is None else dead_mask.to(torch.uint8),
        cand_ptr=cand,
        aux_ptr=cand if aux is None else aux,
        scr_ptr=scratch,
        B=B,
        D=D,
        N=n,
        S=S,
        tiles_per_slab=per_slab,
        num_work=num_work,
        stride_xb=x_in.stride(0),
        stride_xd=x_in.stride(1),
        stride_wd=W_enc.stride(0),
        stride_wn=W_enc.stride(1),
        stride_b=b_enc.stride(0),
        stride_thr=1 if threshold is None else threshold.stride(0),
        stride_dead=1,
        KP=kp,
        KAP=max(kap, 1),
        HAS_THRESHOLD=threshold is not None,
        HAS_AUX=aux is not None,
        SORT_ABOVE=_sort_above(kp, blocks.block_n),
        SORT_ABOVE_AUX=_sort_above(max(kap, 1), blocks.block_n),
        CHUNK=_chunk(kp, blocks.block_n),
        AUX_CHUNK=_chunk(max(kap, 1), blocks.block_n),
        ACC_DTYPE=tl.float64 if fp64 else tl.float32,
        INPUT_PRECISION=_et._input_precision(x_in.dtype),
        UPCAST_DOT=_et._INTERPRETER and x_in.dtype == torch.bfloat16,
        USE_TMA=descs is not None,
        W_T=w_t,
        BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n,
        BLOCK_K=blocks.block_k,
        EVEN_K=D % blocks.block_k == 0,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        maxnreg=MAX_REGISTERS,
    )
    return (_encode_topk_filtered_fwd_kernel, (programs,), kwargs), cand, aux, aux_width


# ---------------------------------------------------------------------------------------------
# AOT compile cases for kernels/check.py
# ---------------------------------------------------------------------------------------------

# (label, k, k_aux, threshold, W_enc stored as the transpose of [n, d_in], TMA, targets, dtypes):
# the TMA configurations are what an sm_90 launch gets, the pointer ones what an sm_80 launch
# gets (and an sm_90 one whose layout TMA cannot take, k=32 on both). fp32 never takes TMA (see
# TMA_MAX_ITEMSIZE); fp32 only for the k of the docs' table: its compiles are the slow ones.
_BOTH = ("fp32", "bf16")
_AOT_CASES = (
    ("k=32", 32, 0, False, False, False, (80, 90), _BOTH),
    ("k=32 tma", 32, 0, False, False, True, (90,), ("bf16",)),
    ("k=64", 64, 0, False, False, False, (80, 90), ("fp32",)),
    ("k=64", 64, 0, False, False, False, (80,), ("bf16",)),
    ("k=64 tma", 64, 0, False, False, True, (90,), ("bf16",)),
    ("k=128", 128, 0, False, False, False, (80, 90), ("fp32",)),
    ("k=128", 128, 0, False, False, False, (80,), ("bf16",)),
    ("k=128 tma", 128, 0, False, False, True, (90,), ("bf16",)),
    ("k=512", 512, 0, False, False, False, (80,), ("bf16",)),
    ("k=512 tma", 512, 0, False, False, True, (90,), ("bf16",)),
    ("k=32 W=[n,d].T tma", 32, 0, False, True, True, (90,), ("bf16",)),
    ("k=32 threshold tma", 32, 0, True, False, True, (90,), ("bf16",)),
    ("k=32 k_aux=256 tma", 32, 256, False, False, True, (90,), ("bf16",)),
)


def _aot_plan(dtype: torch.dtype, k, k_aux, with_threshold, transposed_W, tma):
    """(kernel, grid, kwargs) for small CPU examples that specialise like a real step."""
    B, d, n = 512, 256, 8192
    W = torch.zeros(n, d, dtype=dtype).T if transposed_W else torch.zeros(d, n, dtype=dtype)
    dead = torch.ones(n, dtype=torch.bool) if k_aux else None
    thr = torch.zeros(n, dtype=dtype) if with_threshold else None
    x = torch.zeros(B, d, dtype=dtype)
    args = (x, W, torch.zeros(n, dtype=dtype), k, thr, dead, k_aux, None, None, tma)
    return _launch_plan(*args)[0]


def compile_configs() -> list[tuple[str, str, object, tuple[int, ...]]]:
    """``(name, dtype, plan, targets)`` for every configuration kernels/check.py compiles."""
    configs = []
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for label, *case, targets, dtypes in _AOT_CASES:
            if dname not in dtypes:
                continue

            def plan(dtype=dtype, case=tuple(case)):
                return _aot_plan(dtype, *case)

            kwargs = plan()[2]
            blocks = f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}x{kwargs['BLOCK_K']}"
            name = f"encode_topk_filtered {label} {dname} {blocks} w{kwargs['num_warps']}"
            configs.append((name, dname, plan, targets))
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
    num_slabs: int | None = None,
    blocks: Blocks | None = None,
    use_tma: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The ``k`` largest encoder scores per row, fused with the encoder GEMM. Not differentiable.

    Same arguments and results as :func:`fastsae.kernels.encode_topk.select_topk` (``x_in
    [B, d_in]``, ``W_enc [d_in, d_sae]`` any strides, ``b_enc [d_sae]``, ``1 <= k <=
    encode_topk.MAX_K``;
    returns ``top [B, k]`` fp32 sorted descending, ``indices [B, k]`` int64, and the AuxK pair
    ``[B, min(k_aux, d_sae)]`` or ``None, None``), same tie rule, NaN and ``-0.0`` handling.

    Args (besides those):
        num_slabs: override the number of ``d_sae`` slabs (tests, benchmarks).
        blocks: override the block sizes and the persistent program count (tests, benchmarks).
        use_tma: read ``x`` and ``W_enc`` through TMA descriptors where their layout allows
            (None: 16-bit inputs on sm_90+ GPUs and under the interpreter).
    """
    args = (x_in, W_enc, b_enc, k, threshold, dead_mask, k_aux, num_slabs, blocks, use_tma)
    plan, cand, aux, aux_width = _launch_plan(*args)
    launch(plan)
    n = W_enc.shape[1]
    top, indices = _et._merge(cand, k, n)
    if aux is None:
        return top, indices, None, None
    aux_top, aux_indices = _et._merge(aux, aux_width, n)
    return top, indices, aux_top, aux_indices
