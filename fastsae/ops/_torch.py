"""The ``torch`` backend: sparse PyTorch for CPUs and for GPUs without Triton.

No op here forms a dense ``[B, d_sae]`` tensor in a backward pass, nor a ``[B*k, d]`` temporary:

===========================  =============================================  ==================
quantity                     how                                            dense equivalent
===========================  =============================================  ==================
``sparse_decode`` forward    ``embedding_bag(indices, W_dec, values)``      ``codes @ W_dec``
``grad_values``              ``sampled_addmm`` on the ``[B, n]`` pattern    ``(g @ W_dec.T)[idx]``
``grad_W_dec``               entries sorted by latent, one                  ``codes.T @ g``
                             ``embedding_bag`` over the rows of ``g``
``grad_W_enc``               the same over the rows of ``x``, transposed    ``x.T @ G``
``grad_x``                   CSR ``[B, n] @ W_enc.T``                       ``G @ W_enc.T``
===========================  =============================================  ==================

The products run through PyTorch's sparse CSR kernels (MKL on CPU, cuSPARSE on CUDA) and its
``embedding_bag`` (FBGEMM on CPU). At B=4096, d=768, n=16384, k=32 on two CPU cores these took
15 ms, 19 ms and 44 ms against 0.6-1.1 s for the dense equivalents (measured side by side while
choosing them; the maintained figures are in ``benchmarks/results/``). ``index_add_`` over row
chunks took 193 ms for ``grad_W_dec`` and a chunked gather + ``bmm`` took 110 ms for
``grad_values``, so neither is used. The latent-sorted ``embedding_bag`` took half the time of
the CSR ``[n, B] @ g`` product it replaced (:func:`_sum_by_latent`).

Under bf16 autocast (fp32 parameters) the encoder GEMM runs in bf16 with an exact selection
(:func:`_select_topk_bf16`); the sparse backward stays fp32 (:data:`BF16_SPARSE_BACKWARD`), and
every gradient is returned in fp32 for the fp32 master weights.

Ops not defined here fall back to :mod:`fastsae.ops._reference`.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from fastsae.ops._csr import CSR, csr_by_latent, shared_csr_of
from fastsae.ops._scratch import slab_addmm
from fastsae.ops._sparse_encode import make_encode_ops
from fastsae.ops._topk import (
    PREFILTER_BLOCKS_PER_K,
    index_order_ties,
    order_candidates,
    prefilter_applies,
    topk_prefiltered,
    topk_tie_exact,
)

__all__ = [
    "encode_batch_topk",
    "encode_jumprelu",
    "encode_topk",
    "select_topk",
    "shared_encoder_gemm",
    "sparse_decode",
    "sparse_encoder_backward",
    "topk_tie_exact",
]

# CSR tensors are used only as operands of products whose results are dense; the "beta" notice
# says nothing about those and would otherwise print once per process.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


# ------------------------------------------------------------------------------------------------
# Sparse layouts
# ------------------------------------------------------------------------------------------------


def _csr_by_row(indices: Tensor, weights: Tensor, n: int) -> Tensor:
    """``[B, n]`` CSR with ``weights[b, j]`` at column ``indices[b, j]`` (duplicates kept; a
    product with a dense matrix sums them). Row ``b`` owns entries ``[b*k, (b+1)*k)``."""
    B, k = indices.shape
    crow = torch.arange(0, B * k + 1, k, device=indices.device)
    return torch.sparse_csr_tensor(
        crow, indices.reshape(-1), weights.reshape(-1), (B, n), check_invariants=False
    )


def _sum_by_latent(layout: CSR, weights: Tensor, dense: Tensor, n: int, bf16: bool) -> Tensor:
    """``out[i] = sum_{(b, j): indices[b, j] = i} weights[b, j] * dense[b]``: ``[n, d]`` fp32 from
    ``weights [B, k]``, ``dense [B, d]`` and ``layout``, the ``B*k`` entries of ``indices``
    grouped by latent (:func:`fastsae.ops._csr.csr_by_latent`, or the step's shared one).

    Its stable sort keeps each latent's rows in order, so the reduction order, and the result, is
    deterministic. Each latent's rows are summed by one ``embedding_bag`` over ``dense``: at
    B=4096, d=768, n=16384, k=32 on two shared CPU cores that took 108 ms against 217 ms for the
    CSR ``[n, B] @ dense`` it replaced (MKL), and 76 ms with ``bf16`` operands (``bf16=True``; the
    bags accumulate in fp32 and the result is rounded to bf16 once, ~3e-3 relative, then returned
    as fp32). Minimum of 7 interleaved runs.
    """
    offsets, entries, rows = layout
    sorted_weights = weights.reshape(-1)[entries]
    if bf16:
        dense, sorted_weights = dense.to(torch.bfloat16), sorted_weights.to(torch.bfloat16)
    out = F.embedding_bag(
        rows,
        dense,
        offsets,
        mode="sum",
        per_sample_weights=sorted_weights,
        include_last_offset=True,
    )
    return out.float() if bf16 else out


def _sampled_row_dots(g: Tensor, W: Tensor, indices: Tensor, layout: CSR | None = None) -> Tensor:
    """``out[b, j] = <g[b], W[indices[b, j]]>``: a sampled dense-dense product (SDDMM).

    ``layout``: the CSR-by-latent layout of ``indices`` when the caller has it (the decoder's
    backward does: its ``grad_W_dec`` needs it). On CPU the product then runs latent by latent:
    the ``[n, B]`` pattern of the layout, so each row of ``W`` is read once and the rows of ``g``
    (``B x d``, cache-resident) are the ones gathered. 4.5 ms against 21 ms at B=4096, d=768,
    n=16384, k=32 on two cores (``W`` is 48 MiB: row-major order gathered it ``k`` times per
    token from memory); the dot products are the same, in the same order.

    On CPU, with at most ``n`` entries per row, the ``[B, k]`` ids are the pattern as they are:
    the CPU ``sampled_addmm`` computes one dot product per stored entry, whatever the column
    order and repeats (``tests/ops/test_torch_ops.py`` checks both against the oracle). That took
    0.30 ms against 1.12 ms at B=1024, d=128, n=2048, k=32 (0.49 against 2.41 at k=64; one
    thread). Elsewhere (cuSPARSE; or ``k > n``, which the CPU kernel rejects) each row's ids are
    sorted and de-duplicated first, and every entry then reads its (shared) result back.
    """
    B, k = indices.shape
    if B == 0 or k == 0:
        return g.new_zeros(B, k)
    if g.device.type == "cpu" and k <= W.shape[0]:
        few = _few_columns_dots(g, W, indices)
        if few is not None:
            return few
        if layout is not None:
            offsets, entries, rows = layout
            by_latent = torch.sparse_csr_tensor(
                offsets, rows, g.new_zeros(B * k), (W.shape[0], B), check_invariants=False
            )
            dots = torch.sparse.sampled_addmm(by_latent, W, g.T, beta=0.0).values()
            return torch.empty_like(dots).index_copy_(0, entries, dots).view(B, k)
        crow = torch.arange(0, B * k + 1, k, device=indices.device)
        pattern = torch.sparse_csr_tensor(
            crow, indices.reshape(-1), g.new_zeros(B * k), (B, W.shape[0]), check_invariants=False
        )
        return torch.sparse.sampled_addmm(pattern, g, W.T, beta=0.0).values().view(B, k)
    sorted_idx, perm = indices.sort(dim=-1)
    first = torch.ones_like(sorted_idx, dtype=torch.bool)
    first[:, 1:] = sorted_idx[:, 1:] != sorted_idx[:, :-1]
    crow = torch.zeros(B + 1, dtype=torch.long, device=indices.device)
    torch.cumsum(first.sum(-1), 0, out=crow[1:])
    cols = sorted_idx[first]
    pattern = torch.sparse_csr_tensor(
        crow, cols, g.new_zeros(cols.shape[0]), (B, W.shape[0]), check_invariants=False
    )
    unique_dots = torch.sparse.sampled_addmm(pattern, g, W.T, beta=0.0).values()
    slot = first.reshape(-1).cumsum(0) - 1
    dots_sorted = unique_dots[slot].reshape(B, k)
    return torch.empty_like(dots_sorted).scatter_(-1, perm, dots_sorted)


def _few_columns_dots(g: Tensor, W: Tensor, indices: Tensor) -> Tensor | None:
    """:func:`_sampled_row_dots` as one dense GEMM when the ``[B, k]`` ids name at most ``k``
    distinct rows of ``W`` (so the GEMM does no more multiply-adds than the sampled product), or
    None. That is AuxK whenever there are at most ``k_aux`` dead latents: every row then takes all
    of them. The CPU ``sampled_addmm`` computes each dot product alone; BLAS does the same work
    2.5x faster (12.9 against 5.1 ms at B=1024, d=384, 192 ids of 192 columns, one thread).
    """
    n, k = W.shape[0], indices.shape[1]
    present = torch.bincount(indices.reshape(-1), minlength=n) > 0
    cols = present.nonzero().squeeze(-1)
    if cols.numel() > k:
        return None
    where = torch.zeros(n, dtype=torch.long, device=indices.device)
    where[cols] = torch.arange(cols.numel(), device=indices.device)
    with torch.autocast(g.device.type, enabled=False):  # the dtype of g and W, as sampled_addmm
        dense = g @ W.index_select(0, cols).T
    return dense.gather(1, where[indices])


#: Whether ``grad_W_dec`` and ``grad_W_enc`` read bf16 operands (fp32 accumulation) when the
#: forward ran under bf16 autocast. Off: it bought nothing measurable once the step stopped
#: page-faulting (bf16 step 461 ms with it against 442 ms without at B=4096, d=768, n=16384, 2
#: threads; 34.3 against 34.4 ms at B=1024, d=384, n=2048, 1 thread; medians) and cost held-out
#: FVU on the embedded model (d_in 128, d_sae 2048, 1000 steps, seeds 0 / 1: +1.13% / +2.1% over
#: fp32 with it, +0.37% / +0.26% without).
BF16_SPARSE_BACKWARD = False

# ------------------------------------------------------------------------------------------------
# sparse_decode
# ------------------------------------------------------------------------------------------------


def _bf16_autocast(t: Tensor) -> bool:
    """Whether ``t`` (fp32) is being used under bf16 autocast on its device."""
    dev = t.device.type
    return (
        t.dtype == torch.float32
        and torch.is_autocast_enabled(dev)
        and torch.get_autocast_dtype(dev) == torch.bfloat16
    )


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, csr) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        ctx.csr = csr
        ctx.bf16 = BF16_SPARSE_BACKWARD and _bf16_autocast(W_dec)
        out = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
        return out + b_dec

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, W_dec = ctx.saved_tensors
        n = W_dec.shape[0]
        grad_out = grad_out.contiguous()
        grad_values = grad_W_dec = grad_b_dec = layout = None
        if ctx.needs_input_grad[2]:
            layout = ctx.csr() if ctx.csr is not None else csr_by_latent(indices, n)
        if ctx.needs_input_grad[0]:
            grad_values = _sampled_row_dots(grad_out, W_dec, indices, layout)
        if ctx.needs_input_grad[2]:
            grad_W_dec = _sum_by_latent(layout, values, grad_out, n, ctx.bf16)
        if ctx.needs_input_grad[3]:
            grad_b_dec = grad_out.sum(0)
        return grad_values, None, grad_W_dec, grad_b_dec, None


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """See :func:`fastsae.ops.sparse_decode`. Ids returned by this backend's encoders reuse the
    step's shared CSR layout for ``grad_W_dec`` (:mod:`fastsae.ops._csr`)."""
    return _SparseDecode.apply(
        values, indices, W_dec, b_dec, shared_csr_of(indices, W_dec.shape[0])
    )


# ------------------------------------------------------------------------------------------------
# sparse_encoder_backward
# ------------------------------------------------------------------------------------------------


def sparse_encoder_backward(
    x: Tensor,
    indices: Tensor,
    grad_pre: Tensor,
    W_enc: Tensor,
    *,
    need_grad_x: bool = False,
    csr: CSR | None = None,
    bf16_operands: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """See :func:`fastsae.reference.sparse_encoder_backward`. ``grad_W_enc`` is returned as the
    ``[d_in, n]`` transpose view of a contiguous latent-major ``[n, d_in]`` buffer. ``csr``: the
    layout of ``indices`` when the caller has it (the step's shared one), built here otherwise.

    ``bf16_operands`` (the forward ran under bf16 autocast; fp32 inputs): when
    :data:`BF16_SPARSE_BACKWARD` is on, ``grad_W_enc`` is summed from bf16 operands with fp32
    accumulation (see :func:`_sum_by_latent`); the gradients keep the inputs' dtype."""
    n = W_enc.shape[1]
    layout = csr if csr is not None else csr_by_latent(indices, n)
    bf16 = bf16_operands and BF16_SPARSE_BACKWARD and x.dtype == torch.float32
    grad_W_enc = _sum_by_latent(layout, grad_pre, x, n, bf16).T
    grad_b_enc = torch.zeros(n, dtype=grad_pre.dtype, device=grad_pre.device)
    grad_b_enc.index_add_(0, indices.reshape(-1), grad_pre.reshape(-1))
    grad_x = _csr_by_row(indices, grad_pre, n) @ W_enc.T if need_grad_x else None
    return grad_W_enc, grad_b_enc, grad_x


# ------------------------------------------------------------------------------------------------
# Selection: chunked over latents, so the extra memory is O(B * slab), not O(B * n)
# ------------------------------------------------------------------------------------------------

#: Pre-activation elements computed at once (B * slab). 2^26 fp32 elements = 256 MiB, so at
#: B=4096, n=262144 the peak extra memory is ~6% of the 4.3 GB the dense [B, n] matrix would take.
SLAB_ELEMENTS = 2**26


def select_topk(
    x_in: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    threshold: Tensor | None = None,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    slab: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Top-``k`` scores per row of ``pre = x_in @ W_enc + b_enc`` without forming ``[B, n]``; see
    :func:`_select_topk_exact` for the arguments and the result.

    Under bf16 autocast (fp32 inputs, no threshold) the GEMM runs in bf16 and the selection stays
    exact: :func:`_select_topk_bf16`. The scores returned are fp32 in every case.
    """
    dev = x_in.device.type
    if torch.is_autocast_enabled(dev) and x_in.dtype == torch.float32:
        low = torch.get_autocast_dtype(dev) == torch.bfloat16 and threshold is None
        with torch.autocast(dev, enabled=False):
            if low:
                return _select_topk_bf16(
                    x_in, W_enc, b_enc, k, dead_mask=dead_mask, k_aux=k_aux, slab=slab
                )
            return _select_topk_exact(
                x_in,
                W_enc,
                b_enc,
                k,
                threshold=threshold,
                dead_mask=dead_mask,
                k_aux=k_aux,
                slab=slab,
            )
    return _select_topk_exact(
        x_in, W_enc, b_enc, k, threshold=threshold, dead_mask=dead_mask, k_aux=k_aux, slab=slab
    )


#: Extra candidates per row kept from the bf16 scores beyond k (at least; k // 2 when larger).
#: Measured on MiniLM activations (d_sae 4096, k 32): 16 extra sent ~10% of rows back to fp32, 32
#: extra 0.2%.
BF16_EXTRA_CANDIDATES = 32
#: Rows selected through the bf16 path, and those of them redone in fp32 (for diagnostics).
BF16_STATS = {"rows": 0, "fallback_rows": 0}
#: bf16 unit roundoff (8 significant bits).
_BF16_EPS = 2.0**-8


def _select_topk_bf16(
    x_in: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    dead_mask: Tensor | None,
    k_aux: int,
    slab: int | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Exact top-``k`` with a bf16 GEMM (about 3.5-4x faster than fp32 on AVX512-BF16 CPUs).

    1. ``pre16 = bf16(x_in) @ bf16(W_enc) + bf16(b_enc)`` (fp32 accumulation), slab by slab, and
       each row's top ``m = k + max(16, k // 2)`` candidates by ``pre16``;
    2. the candidates are re-scored in fp32 (a sampled dot product, ``B * m * d`` MACs) and the
       top ``k`` taken from those exact scores;
    3. a row is *safe* when its k-th exact score beats the best any non-candidate could have:
       every non-candidate has ``pre16 <= floor`` (the m-th candidate's), and its error
       ``|pre - pre16|`` is taken to be at most ``SAFETY x`` the largest error seen among the
       row's own m candidates (the same rounding process: m samples of it), plus the bf16 output
       rounding. A worst-case bound (Cauchy-Schwarz, ``2^-7 ||x|| ||W_j||``) is ~sqrt(d) times
       larger than the errors that occur and sent nearly every row back to fp32 at d = 768.
       Unsafe rows, and rows where an exact tie straddles the cut, are selected again in fp32
       (:func:`_select_topk_exact`).

    The result equals the fp32 selection (same tie rule); AuxK candidates are handled the same way.
    """
    B, n = x_in.shape[0], W_enc.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, d_sae={n}]")
    want_aux = k_aux > 0 and dead_mask is not None and bool(dead_mask.any())
    n_dead = int(dead_mask.sum()) if want_aux else 0
    k_aux = min(k_aux, n_dead) if want_aux else 0
    m = min(n, k + max(BF16_EXTRA_CANDIDATES, k // 2))
    m_aux = min(n_dead, k_aux + max(BF16_EXTRA_CANDIDATES, k_aux // 2)) if k_aux else 0
    if slab is None:
        slab = max(m, m_aux, SLAB_ELEMENTS // max(B, 1))
    x16, W16, b16 = x_in.to(torch.bfloat16), W_enc.to(torch.bfloat16), b_enc.to(torch.bfloat16)
    dead_cols = dead_mask.nonzero().squeeze(-1) if k_aux else None
    tops, idxs, aux_tops, aux_idxs = [], [], [], []
    for start in range(0, n, slab):
        stop = min(start + slab, n)
        scores = slab_addmm(b16[start:stop], x16, W16[:, start:stop])  # pooled: see _scratch
        top, idx = _bf16_candidates(scores, m)
        tops.append(top)
        idxs.append(idx + start)
        cols = _dead_in_slab(dead_cols, start, stop) if k_aux else None
        if cols is not None:
            top, idx = _bf16_candidates(scores.index_select(1, cols - start), m_aux)
            aux_tops.append(top)
            aux_idxs.append(cols[idx])
        del scores
    top, idx, unsafe = _rescore_candidates(x_in, W_enc, b_enc, tops, idxs, m, k)
    aux_top = aux_idx = None
    if k_aux:
        aux_top, aux_idx, aux_unsafe = _rescore_candidates(
            x_in, W_enc, b_enc, aux_tops, aux_idxs, m_aux, k_aux, universe=n_dead
        )
        unsafe |= aux_unsafe
    BF16_STATS["rows"] += B
    if bool(unsafe.any()):
        rows = unsafe.nonzero().squeeze(-1)
        BF16_STATS["fallback_rows"] += rows.numel()
        t, i, at, ai = _select_topk_exact(
            x_in[rows], W_enc, b_enc, k, dead_mask=dead_mask, k_aux=k_aux
        )
        top[rows], idx[rows] = t, i
        if k_aux:
            aux_top[rows], aux_idx[rows] = at, ai
    return top, idx, aux_top, aux_idx


def _bf16_candidates(scores: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """``(values, columns)``: some ``min(m, w)`` largest of each row of ``scores [B, w]``, equal
    scores at the cut in any order (the re-scoring decides). Every column when ``m >= w``; on
    CPU, where it is faster, :func:`topk_prefiltered` of an fp32 copy (exact: bf16 values are
    fp32 values): 14 ms against 19 ms for ``torch.topk`` at B=1024, w=2048, m=64."""
    B, w = scores.shape
    if m >= w:  # a copy: the slab may be scratch memory that the next slab overwrites
        return scores.clone(), torch.arange(w, device=scores.device).expand(B, w)
    if prefilter_applies(scores, m):
        top, idx = topk_prefiltered(scores.float(), m, blocks=PREFILTER_BLOCKS_PER_K * (m + 1))
        return top.to(scores.dtype), idx
    return torch.topk(scores, m, dim=-1, sorted=False)


#: Margin, in multiples of the largest bf16 error observed among a row's candidates.
BF16_SAFETY = 4.0


def _rescore_candidates(x_in, W_enc, b_enc, tops, idxs, m, k, universe=None):
    """Top ``k`` by exact fp32 score among each row's ``m`` best bf16 candidates, and the rows
    where that is not provably the exact top ``k`` (see :func:`_select_topk_bf16`)."""
    if len(tops) == 1 and tops[0].shape[-1] == m:  # one slab: its candidates are the row's
        cand16, cand = tops[0], idxs[0].contiguous()
    else:
        cand16, pos = torch.topk(torch.cat(tops, dim=-1), m, dim=-1, sorted=False)
        cand = torch.cat(idxs, dim=-1).gather(-1, pos)
    exact = _sampled_row_dots(x_in.contiguous(), W_enc.T, cand) + b_enc[cand]
    top, where = torch.topk(exact, min(k + 1, m), dim=-1, sorted=True)
    idx = cand.gather(-1, where[:, :k])
    kth = top[:, k - 1]
    unsafe = torch.zeros_like(kth, dtype=torch.bool)
    if m > k:
        unsafe |= kth == top[:, k]  # an exact tie at the cut: let the exact path order it
    if m < (universe if universe is not None else W_enc.shape[1]):
        floor = cand16.float().min(dim=-1).values
        seen = (exact - cand16.float()).abs().max(dim=-1).values
        margin = BF16_SAFETY * seen + _BF16_EPS * torch.maximum(kth.abs(), floor.abs())
        unsafe |= kth - margin <= floor + margin
    top, idx = index_order_ties(top[:, :k].contiguous(), idx)
    return top, idx, unsafe


# W_enc.data_ptr() -> (pre block [B, n], W_enc, b_enc, b_dec, their versions at the GEMM)
_SHARED_PRE: contextvars.ContextVar[dict[int, tuple] | None] = contextvars.ContextVar(
    "fastsae_shared_pre", default=None
)


@contextlib.contextmanager
def shared_encoder_gemm(
    x: Tensor, encoders: list[tuple[Tensor, Tensor, Tensor | None]]
) -> Iterator[list[Tensor]]:
    """One GEMM for several encoders that read the same input ``x [B, d_in]``.

    ``encoders``: ``(W_enc [d_in, n_m], b_enc [n_m], b_dec [d_in] or None)`` per SAE. Computes
    ``pre = x @ cat(W_enc) + cat(b_enc - b_dec @ W_enc)`` (``[B, sum n_m]``, one ``addmm``) and
    yields its per-encoder column blocks. Inside the block, :func:`select_topk` (TopK and
    BatchTopK selection of the torch backend) given ``x_in = x - b_dec_m`` and ``W_enc_m`` reads
    block ``m`` instead of running its own GEMM, as long as ``W_enc_m``, ``b_enc_m`` and
    ``b_dec_m`` are unchanged since (their version counters are checked; an optimizer step on one
    SAE sends only that one back to its own GEMM).

    Not bit-identical to the separate GEMMs: ``x @ W - b_dec @ W`` rounds differently from
    ``(x - b_dec) @ W`` (and BLAS blocking depends on the total width); the scores differ by a
    few ulps, which can flip a near-tie in the selection. Costs ``B * sum n_m`` floats at once.
    Select only on this batch inside the block (the blocks are matched to ``W_enc``, not to
    ``x``; a batch of another size falls back to the own GEMM).
    """
    Ws = [W for W, _, _ in encoders]
    with torch.no_grad():
        bias = torch.cat([b if b_dec is None else b - b_dec @ W for W, b, b_dec in encoders])
        pre = torch.addmm(bias, x, torch.cat(Ws, dim=1))
    # contiguous blocks, laid out as the own GEMM's scores are (not views of row stride sum n_m)
    blocks = [b.contiguous() for b in pre.split([W.shape[1] for W in Ws], dim=1)]
    del pre
    table = dict(_SHARED_PRE.get() or {})
    for (W, b, b_dec), block in zip(encoders, blocks, strict=True):
        versions = (W._version, b._version, None if b_dec is None else b_dec._version)
        table[W.data_ptr()] = (block, W, b, b_dec, versions)
    token = _SHARED_PRE.set(table)
    try:
        yield blocks
    finally:
        _SHARED_PRE.reset(token)


def _shared_pre(x_in: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor | None:
    """The block of :func:`shared_encoder_gemm` for ``W_enc``, if it is still valid for these
    operands (same shapes, unchanged parameters, as many rows)."""
    table = _SHARED_PRE.get()
    if not table or W_enc.data_ptr() not in table:
        return None
    block, W, b, b_dec, versions = table[W_enc.data_ptr()]
    now = (W._version, b._version, None if b_dec is None else b_dec._version)
    if (
        now != versions
        or W_enc.shape != W.shape
        or b_enc.data_ptr() != b.data_ptr()
        or block.shape[0] != x_in.shape[0]
    ):
        return None
    return block


def _select_topk_exact(
    x_in: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    threshold: Tensor | None = None,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    slab: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Top-``k`` scores per row of ``pre = x_in @ W_enc + b_enc`` without forming ``[B, n]``.

    ``n`` is cut into slabs; each slab's pre-activations are computed with one ``addmm``, its
    top-``k`` (and top-``k_aux`` among dead latents) kept, and the candidates of all slabs merged
    with the same tie rule, so the result equals a dense ``topk`` over all of ``n``.

    Args:
        x_in: ``[B, d_in]``. W_enc: ``[d_in, n]``. b_enc: ``[n]``. k: ``1 <= k <= n``.
        threshold: ``[n]`` or None. When given, ``score = pre`` where ``pre > threshold`` and
            ``-inf`` elsewhere (JumpReLU selection).
        dead_mask: ``[n]`` bool; with ``k_aux > 0`` also select among dead latents.
        slab: latents per slab; default keeps ``B * slab <= SLAB_ELEMENTS``.

    Returns:
        ``(top [B, k], indices [B, k], aux_top [B, k_aux'] | None, aux_indices | None)``: scores
        (not ReLU'd, ``-inf`` where a row has fewer than ``k`` finite scores) sorted descending,
        ``k_aux' = min(k_aux, n_dead)``.
    """
    B, n = x_in.shape[0], W_enc.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, d_sae={n}]")
    want_aux = k_aux > 0 and dead_mask is not None and bool(dead_mask.any())
    k_aux = min(k_aux, int(dead_mask.sum())) if want_aux else 0
    dead_cols = dead_mask.nonzero().squeeze(-1) if k_aux else None
    if slab is None:
        slab = max(k, k_aux, SLAB_ELEMENTS // max(B, 1))
    shared = _shared_pre(x_in, W_enc, b_enc)
    tops, idxs, aux_tops, aux_idxs = [], [], [], []
    for start in range(0, n, slab):
        stop = min(start + slab, n)
        if shared is not None:
            scores = shared[:, start:stop]
            if threshold is not None:
                scores = scores.clone()  # masked in place below
        else:
            scores = slab_addmm(b_enc[start:stop], x_in, W_enc[:, start:stop])  # see _scratch
        if threshold is not None:
            scores.masked_fill_(scores <= threshold[start:stop], float("-inf"))
        top, idx = topk_tie_exact(scores, min(k, stop - start))
        tops.append(top)
        idxs.append(idx + start)
        cols = _dead_in_slab(dead_cols, start, stop) if k_aux else None
        if cols is not None:
            top, idx = topk_tie_exact(
                scores.index_select(1, cols - start), min(k_aux, cols.numel())
            )
            aux_tops.append(top)
            aux_idxs.append(cols[idx])
        del scores
    top, idx = _merge(tops, idxs, k)
    if not k_aux:
        return top, idx, None, None
    aux_top, aux_idx = _merge(aux_tops, aux_idxs, k_aux)
    return top, idx, aux_top, aux_idx


def _dead_in_slab(dead_cols: Tensor, start: int, stop: int) -> Tensor | None:
    """The dead latents of ``[start, stop)`` (from the sorted ``dead_cols``), or None. AuxK selects
    among these columns only, in latent order (so the tie rule carries over): a gather of the
    slab's dead columns instead of a pass masking its live ones."""
    lo, hi = torch.searchsorted(dead_cols, dead_cols.new_tensor([start, stop])).tolist()
    return dead_cols[lo:hi] if hi > lo else None


def _merge(tops: list[Tensor], idxs: list[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` of the slabs' candidates (each slab's already in score order)."""
    if len(tops) == 1:
        return tops[0], idxs[0]
    cat_top, cat_idx = torch.cat(tops, dim=-1), torch.cat(idxs, dim=-1)
    m = cat_top.shape[-1]
    top, pos = torch.topk(cat_top, min(k + 1, m), dim=-1, sorted=True)
    idx = cat_idx.gather(-1, pos)
    if k < m:
        ambiguous = (top[:, k - 1] == top[:, k]) & torch.isfinite(top[:, k - 1])
        top, idx = top[:, :k].contiguous(), idx[:, :k].contiguous()
        if bool(ambiguous.any()):
            rows = ambiguous.nonzero().squeeze(-1)
            t, i = order_candidates(cat_top[rows], cat_idx[rows])
            top[rows], idx[rows] = t[:, :k], i[:, :k]
    return index_order_ties(top, idx)


# ------------------------------------------------------------------------------------------------
# Encoders with a sparse backward (see fastsae/ops/_sparse_encode.py)
# ------------------------------------------------------------------------------------------------

_encoders = make_encode_ops(select_topk)
encode_topk = _encoders["encode_topk"]
encode_batch_topk = _encoders["encode_batch_topk"]
encode_jumprelu = _encoders["encode_jumprelu"]
