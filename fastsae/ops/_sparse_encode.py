"""Sparse encoders with a sparse backward, shared by the ``torch`` and ``triton`` backends.

A backend supplies one selection function with the signature of
:func:`fastsae.ops._torch.select_topk` (the chunked torch version, or the fused Triton kernel).
:func:`make_encode_ops` builds the TopK, BatchTopK and JumpReLU encoders on top of it. Their
backward pass touches only the selected latents: the selection runs without autograd, the values
are ``relu(pre[indices])``, and the gradient goes to ``W_enc``, ``b_enc``, ``x`` and ``b_dec``
through the backend's ``sparse_encoder_backward``. Nothing of size ``[B, d_sae]`` is saved for
backward or formed in it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from fastsae.ops import EncodeTopKOutput, implementation_of
from fastsae.ops._csr import SharedCSR, share

SelectFn = Callable[..., tuple[Tensor, Tensor, Tensor | None, Tensor | None]]


class SparseCodes(NamedTuple):
    """Variable-count sparse codes padded to a common width: zero values are padding."""

    values: Tensor
    indices: Tensor


class _SparseEncode(torch.autograd.Function):
    """``values = relu(pre[indices])`` for the selected entries (``-inf`` scores are padding)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, selector, encoder_backward, shared):
        x_in = x - b_dec if b_dec is not None else x
        with torch.no_grad():
            top, indices, aux_top, aux_indices = selector(x_in, W_enc, b_enc)
        values = torch.relu(top).to(x.dtype)
        if aux_indices is None:
            aux_values = values.new_zeros(x.shape[0], 0)
            aux_indices = indices.new_zeros(x.shape[0], 0)
        else:
            aux_values = torch.relu(aux_top).to(x.dtype)
        ctx.mark_non_differentiable(indices, aux_indices)
        ctx.save_for_backward(x_in, W_enc, indices, values, aux_indices, aux_values)
        ctx.has_b_dec = b_dec is not None
        ctx.encoder_backward = encoder_backward
        ctx.layout = None
        if shared is not None:
            # The step's CSR-by-latent layout, sorted once (lazily) for this backward and the
            # decoders' (fastsae/ops/_csr.py); `_apply` registers the ids it is keyed by.
            ctx.layout = SharedCSR(indices, aux_indices, W_enc.shape[1])
            shared.append(ctx.layout)
        dev = x.device.type
        ctx.bf16_operands = (
            x.dtype == torch.float32
            and torch.is_autocast_enabled(dev)
            and torch.get_autocast_dtype(dev) == torch.bfloat16
        )
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_aux, _grad_aux_indices):
        x_in, W_enc, indices, values, aux_indices, aux_values = ctx.saved_tensors
        # ReLU mask: a value clamped at zero (or padding) passes no gradient to its pre-activation.
        grad_pre = grad_values * (values > 0)
        if aux_indices.shape[1]:
            indices = torch.cat([indices, aux_indices], dim=1)
            grad_pre = torch.cat([grad_pre, grad_aux * (aux_values > 0)], dim=1)
        layout = {}
        if ctx.layout is not None:
            layout = {"csr": ctx.layout.csr("all")}
            ctx.layout.release()  # the decoders' backward ran first: this is its last use
        grad_W_enc, grad_b_enc, grad_x = ctx.encoder_backward(
            x_in,
            indices,
            grad_pre.contiguous(),
            W_enc,
            need_grad_x=ctx.needs_input_grad[0],
            **layout,
            bf16_operands=ctx.bf16_operands,
        )
        grad_b_dec = None
        if ctx.has_b_dec and ctx.needs_input_grad[3]:
            # pre = (x - b_dec) @ W_enc + b_enc  =>  d/d b_dec = -(sum_b grad_pre_b) @ W_enc.T, and
            # sum_b grad_pre_b is grad_b_enc: no per-token work (OpenAI's pre-bias trick).
            grad_b_dec = -(W_enc @ grad_b_enc)
        return (
            grad_x,
            grad_W_enc if ctx.needs_input_grad[1] else None,
            grad_b_enc if ctx.needs_input_grad[2] else None,
            grad_b_dec,
            None,
            None,
            None,
        )


def _apply(x, W_enc, b_enc, b_dec, selector, encoder_backward, *, share_layout=False):
    """Run the encoder. ``share_layout``: ``encoder_backward`` takes a ``csr=`` layout, and the
    returned ids are registered so that decoding them shares it (one sort per step)."""
    shared: list = [] if share_layout and torch.is_grad_enabled() else None
    values, indices, aux_values, aux_indices = _SparseEncode.apply(
        x, W_enc, b_enc, b_dec, selector, encoder_backward, shared
    )
    if aux_indices.shape[1] == 0:
        aux_values = aux_indices = None
    if shared:
        share(shared[0], indices, aux_indices)
    return values, indices, aux_values, aux_indices


def _widen(top: Tensor, idx: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Pad candidates ``[B, m]`` to ``[B, width]`` with ``-inf`` scores (index 0)."""
    pad = width - top.shape[1]
    return (
        torch.cat([top, top.new_full((top.shape[0], pad), float("-inf"))], dim=1),
        torch.cat([idx, idx.new_zeros((idx.shape[0], pad))], dim=1),
    )


def batch_topk_select(
    select: SelectFn,
    x_in: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: float,
    *,
    n: int | None = None,
    static_width: bool = False,
    **aux,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Exact BatchTopK selection from per-row candidates.

    Each row contributes its top ``m`` candidates; the batch keeps the ``K = round(k * B)``
    largest ReLU'd scores among them (lower flat index ``b * n + i`` first among equals, as
    :func:`fastsae.reference.batch_topk`). A row whose smallest candidate still reaches the
    batch threshold might hold more winners, so such rows are selected again with twice the
    candidates until no row is cut off. Unkept candidates
    get a ``-inf`` score; the result is trimmed to the widest row.

    ``n``: the number of latents ``select`` chooses from; default ``W_enc.shape[1]`` (the
    latent-sharded ``select`` of fastsae/parallel chooses among every rank's latents).

    ``static_width``: no host sync (the triton backend, for CUDA graphs): every row keeps its
    ``m`` candidates (unkept ones ``-inf``, value 0: padding), the K-th score and its ties are
    resolved on the device (:func:`_kept_on_device`), and nothing is widened. Exact unless a
    row holds more than ``m`` of the batch's winners; the rows that might have are counted,
    on the device, in ``BATCH_TOPK_STATS["cut_rows"]`` (a 0-dim tensor of the last call).
    """
    B = x_in.shape[0]
    n = W_enc.shape[1] if n is None else n
    K = max(1, min(round(k * B), B * n))
    m = min(n, max(2 * math.ceil(k) + 8, math.ceil(K / max(B, 1))))
    top, idx, aux_top, aux_idx = select(x_in, W_enc, b_enc, m, **aux)
    if static_width:
        kept, cut_rows = _kept_on_device(torch.relu(top), K, m < n)
        BATCH_TOPK_STATS["cut_rows"] = cut_rows
        return top.masked_fill(~kept, float("-inf")), idx, aux_top, aux_idx
    while True:
        scores = torch.relu(top)
        tau = torch.topk(scores.reshape(-1), K).values[-1]
        smallest = scores[:, -1]
        saturated = (smallest >= tau) & (smallest > 0)
        if m >= n or not bool(saturated.any()):
            break
        # Only the saturated rows are selected again, with twice the candidates.
        m = min(n, 2 * m)
        top, idx = _widen(top, idx, m)
        rows = saturated.nonzero().squeeze(-1)
        top[rows], idx[rows], _, _ = select(x_in[rows], W_enc, b_enc, m)
    m = top.shape[1]
    # Global top-K among the candidates. A unique K-th value (the usual case) makes the kept set
    # unique, and, candidates being in score order within a row, a prefix of each row.
    flat = scores.reshape(-1)
    best, pos = torch.topk(flat, min(K + 1, flat.numel()), sorted=True)
    ambiguous = flat.numel() > K and bool(best[K - 1] == best[K]) and bool(best[K - 1] > 0)
    if not ambiguous:
        kept = torch.zeros(B * m, dtype=torch.bool, device=idx.device)
        kept[pos[:K]] = True
        kept = kept.reshape(B, m) & (scores > 0)  # zero scores carry nothing either way
        width = max(1, int(kept.sum(-1).max()))
        top = top[:, :width].masked_fill(~kept[:, :width], float("-inf"))
        return top, idx[:, :width], aux_top, aux_idx
    # Ties straddle the cut: lower flat index b * n + i first among equal scores.
    flat_key = (torch.arange(B, device=idx.device)[:, None] * n + idx).reshape(-1)
    by_key = torch.argsort(flat_key)
    by_score = torch.argsort(flat[by_key], descending=True, stable=True)
    kept_flat = torch.zeros(B * m, dtype=torch.bool, device=idx.device)
    kept_flat[by_key[by_score[:K]]] = True
    kept = kept_flat.reshape(B, m)
    top = top.masked_fill(~kept, float("-inf"))
    width = max(1, int(kept.sum(-1).max()))
    # Kept entries first (candidates are already in score order within a row).
    order = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True)[:, :width]
    return top.gather(-1, order), idx.gather(-1, order), aux_top, aux_idx


#: ``cut_rows``: of the last static-width BatchTopK selection, the number of rows whose every
#: candidate was kept (they may hold more winners than candidates: the result is then not the
#: exact BatchTopK); a device tensor, read it only where a sync is fine.
BATCH_TOPK_STATS: dict[str, Tensor | None] = {"cut_rows": None}


def _kept_on_device(scores: Tensor, K: int, can_cut: bool) -> tuple[Tensor, Tensor]:
    """Which of the candidates ``scores [B, m]`` (ReLU'd, each row in score order, equal scores
    in latent order) are among the batch's ``K`` largest, lower flat index ``b * n + i`` first
    among equals, with static shapes only.

    With ``tau`` the K-th largest: every score above ``tau`` is kept, and of those equal to
    ``tau`` the first ``K - #above`` in row-major order, which is flat-index order (rows in
    order, equal scores within a row in latent order). Zero scores carry nothing and are
    dropped. Returns ``(kept [B, m] bool, cut_rows)``: ``cut_rows`` counts the rows whose last
    candidate was kept (0 when ``can_cut`` is False: every latent was a candidate).
    """
    flat = scores.reshape(-1)
    tau = torch.topk(flat, K, sorted=False).values.min()
    above = scores > tau
    tied = scores == tau
    need = K - above.sum()
    rank = torch.cumsum(tied.reshape(-1), 0).reshape(scores.shape)
    kept = (above | (tied & (rank <= need))) & (scores > 0)
    cut_rows = kept[:, -1].sum() if can_cut else kept.new_zeros((), dtype=torch.long)
    return kept, cut_rows


def make_encode_ops(select: SelectFn, *, static_width: bool = False) -> dict[str, Callable]:
    """Build ``encode_topk``, ``encode_batch_topk`` and ``encode_jumprelu`` from ``select``.

    Their backward uses the ``sparse_encoder_backward`` of the backend active at the call (so the
    Triton kernels when the Triton backend is selected), resolved in the forward and kept, since
    backward may run in another thread. ``static_width``: BatchTopK without a host sync (see
    :func:`batch_topk_select`).
    """

    def _encode(x, W_enc, b_enc, b_dec, selector):
        encoder_backward = implementation_of("sparse_encoder_backward")[1]
        takes_csr = "csr" in inspect.signature(encoder_backward).parameters
        return _apply(x, W_enc, b_enc, b_dec, selector, encoder_backward, share_layout=takes_csr)

    def encode_topk(x, W_enc, b_enc, k, *, b_dec=None, dead_mask=None, k_aux=0) -> EncodeTopKOutput:
        if not 1 <= k <= W_enc.shape[1]:
            raise ValueError(f"k={k} must be in [1, d_sae={W_enc.shape[1]}]")

        def selector(x_in, W, b):
            return select(x_in, W, b, k, dead_mask=dead_mask, k_aux=k_aux)

        return EncodeTopKOutput(*_encode(x, W_enc, b_enc, b_dec, selector))

    def encode_batch_topk(x, W_enc, b_enc, k, *, b_dec=None, dead_mask=None, k_aux=0):
        if not 0 < k <= W_enc.shape[1]:
            raise ValueError(f"k={k} must be in (0, d_sae={W_enc.shape[1]}]")

        def selector(x_in, W, b):
            return batch_topk_select(
                select, x_in, W, b, k, static_width=static_width, dead_mask=dead_mask, k_aux=k_aux
            )

        return EncodeTopKOutput(*_encode(x, W_enc, b_enc, b_dec, selector))

    @torch.no_grad()
    def encode_jumprelu(x, W_enc, b_enc, threshold, *, b_dec=None, k_cap=64) -> SparseCodes:
        n = W_enc.shape[1]
        x_in = x - b_dec if b_dec is not None else x
        k_cap = min(max(1, k_cap), n)
        top, idx, _, _ = select(x_in, W_enc, b_enc, k_cap, threshold=threshold)
        while True:
            # A row whose last slot is filled may have been cut off at k_cap: select it again.
            cut = torch.isfinite(top[:, -1])
            if k_cap >= n or not bool(cut.any()):
                break
            k_cap = min(n, 2 * k_cap)
            top, idx = _widen(top, idx, k_cap)
            rows = cut.nonzero().squeeze(-1)
            top[rows], idx[rows], _, _ = select(
                x_in[rows], W_enc, b_enc, k_cap, threshold=threshold
            )
        finite = torch.isfinite(top)
        width = max(1, int(finite.sum(-1).max()))
        values = torch.relu(top[:, :width]).to(x.dtype)
        return SparseCodes(values, idx[:, :width])

    return {
        "encode_topk": encode_topk,
        "encode_batch_topk": encode_batch_topk,
        "encode_jumprelu": encode_jumprelu,
    }
