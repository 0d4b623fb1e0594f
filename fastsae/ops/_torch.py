"""The ``torch`` backend: sparse PyTorch for CPUs and for GPUs without Triton.

No op here forms a dense ``[B, d_sae]`` tensor in a backward pass, nor a ``[B*k, d]`` temporary.
The sparse products run through PyTorch's sparse CSR kernels (MKL on CPU, cuSPARSE on CUDA):

===========================  =============================================  ==================
quantity                     how                                            dense equivalent
===========================  =============================================  ==================
``sparse_decode`` forward    ``embedding_bag(indices, W_dec, values)``      ``codes @ W_dec``
``grad_values``              ``sampled_addmm`` on the ``[B, n]`` pattern    ``(g @ W_dec.T)[idx]``
``grad_W_dec``               CSR ``[n, B]`` (entries grouped by latent)     ``codes.T @ g``
                             ``@ g``
``grad_W_enc``               CSR ``[n, B] @ x``, returned transposed        ``x.T @ G``
``grad_x``                   CSR ``[B, n] @ W_enc.T``                       ``G @ W_enc.T``
===========================  =============================================  ==================

At B=4096, d=768, n=16384, k=32 on two CPU cores these took 15 ms, 19 ms and 44 ms against
0.6-1.1 s for the dense equivalents (measured side by side while choosing them; the maintained
figures are in ``benchmarks/results/``). ``index_add_`` over row chunks took 193 ms for
``grad_W_dec`` and a chunked gather + ``bmm`` took 110 ms for ``grad_values``, so neither is used.

Ops not defined here fall back to :mod:`fastsae.ops._reference`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from fastsae.ops import EncodeTopKOutput, implementation_of

__all__ = ["encode_topk", "sparse_decode", "sparse_encoder_backward", "topk_tie_exact"]

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


def _csr_by_latent(indices: Tensor, weights: Tensor, n: int) -> Tensor:
    """``[n, B]`` CSR: the ``B*k`` entries grouped by latent (a stable sort keeps each latent's
    rows in order, so the reduction order, and the result, is deterministic)."""
    B, k = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n)
    crow = torch.zeros(n + 1, dtype=torch.long, device=indices.device)
    torch.cumsum(counts, 0, out=crow[1:])
    rows = torch.div(order, k, rounding_mode="floor")
    return torch.sparse_csr_tensor(
        crow, rows, weights.reshape(-1)[order], (n, B), check_invariants=False
    )


def _sampled_row_dots(g: Tensor, W: Tensor, indices: Tensor) -> Tensor:
    """``out[b, j] = <g[b], W[indices[b, j]]>``: a sampled dense-dense product (SDDMM).

    ``sampled_addmm`` needs a pattern without duplicate columns in a row, so each row's indices
    are sorted and de-duplicated first, and every entry then reads its (shared) result back.
    """
    B, k = indices.shape
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


# ------------------------------------------------------------------------------------------------
# sparse_decode
# ------------------------------------------------------------------------------------------------


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        out = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
        return out + b_dec

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, W_dec = ctx.saved_tensors
        n = W_dec.shape[0]
        grad_out = grad_out.contiguous()
        grad_values = grad_W_dec = grad_b_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = _sampled_row_dots(grad_out, W_dec, indices)
        if ctx.needs_input_grad[2]:
            grad_W_dec = _csr_by_latent(indices, values, n) @ grad_out
        if ctx.needs_input_grad[3]:
            grad_b_dec = grad_out.sum(0)
        return grad_values, None, grad_W_dec, grad_b_dec


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """See :func:`fastsae.ops.sparse_decode`."""
    return _SparseDecode.apply(values, indices, W_dec, b_dec)


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
) -> tuple[Tensor, Tensor, Tensor | None]:
    """See :func:`fastsae.reference.sparse_encoder_backward`. ``grad_W_enc`` is returned as the
    ``[d_in, n]`` transpose view of a contiguous latent-major ``[n, d_in]`` buffer."""
    n = W_enc.shape[1]
    by_latent = _csr_by_latent(indices, grad_pre, n)
    grad_W_enc = (by_latent @ x).T
    grad_b_enc = torch.zeros(n, dtype=grad_pre.dtype, device=grad_pre.device)
    grad_b_enc.index_add_(0, indices.reshape(-1), grad_pre.reshape(-1))
    grad_x = _csr_by_row(indices, grad_pre, n) @ W_enc.T if need_grad_x else None
    return grad_W_enc, grad_b_enc, grad_x


# ------------------------------------------------------------------------------------------------
# encode_topk: dense pre-activations in the forward (chunking comes with the fused op), but the
# backward only touches the selected latents: nothing of size [B, n] is saved or formed.
# ------------------------------------------------------------------------------------------------


def topk_tie_exact(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(selected pre-activations, indices)`` under fastsae's tie rule (descending; lower index
    first among equals), using ``torch.topk`` and fixing only the rows where ties straddle the
    k-th place. Values are *not* ReLU'd."""
    top, idx = torch.topk(pre, k, dim=-1, sorted=True)
    kth = top[..., -1:]
    # A row needs the slow path only if it holds more copies of its k-th value than were selected.
    ambiguous = (pre == kth).sum(-1) > (top == kth).sum(-1)
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(-1)
        _, order = torch.sort(pre[rows], dim=-1, descending=True, stable=True)
        idx[rows] = order[..., :k]
        top[rows] = pre[rows].gather(-1, idx[rows])
    # Order equal values by index: sort by index, then stably by value.
    by_index = torch.argsort(idx, dim=-1)
    idx, top = idx.gather(-1, by_index), top.gather(-1, by_index)
    by_value = torch.argsort(top, dim=-1, descending=True, stable=True)
    return top.gather(-1, by_value), idx.gather(-1, by_value)


class _EncodeTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, encoder_backward):
        x_in = x - b_dec if b_dec is not None else x
        pre = torch.addmm(b_enc, x_in, W_enc)
        top, indices = topk_tie_exact(pre, k)
        values = torch.relu(top)
        aux_top = aux_indices = None
        if k_aux > 0 and dead_mask is not None and bool(dead_mask.any()):
            k_eff = min(k_aux, int(dead_mask.sum()))
            pre.masked_fill_(~dead_mask, float("-inf"))
            aux_top, aux_indices = topk_tie_exact(pre, k_eff)
        del pre
        aux_values = torch.relu(aux_top) if aux_top is not None else values.new_zeros(x.shape[0], 0)
        if aux_indices is None:
            aux_indices = indices.new_zeros(x.shape[0], 0)
        ctx.mark_non_differentiable(indices, aux_indices)
        ctx.save_for_backward(x_in, W_enc, indices, values, aux_indices, aux_values)
        ctx.has_b_dec = b_dec is not None
        ctx.encoder_backward = encoder_backward
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _gi, grad_aux, _gai):
        x_in, W_enc, indices, values, aux_indices, aux_values = ctx.saved_tensors
        # ReLU mask: a value clamped at zero passes no gradient to its pre-activation.
        grad_pre = grad_values * (values > 0)
        if aux_indices.shape[1]:
            indices = torch.cat([indices, aux_indices], dim=1)
            grad_pre = torch.cat([grad_pre, grad_aux * (aux_values > 0)], dim=1)
        need_x = ctx.needs_input_grad[0]
        grad_W_enc, grad_b_enc, grad_x = ctx.encoder_backward(
            x_in, indices, grad_pre.contiguous(), W_enc, need_grad_x=need_x
        )
        grad_b_dec = None
        if ctx.has_b_dec and ctx.needs_input_grad[3]:
            # pre = (x - b_dec) @ W_enc + b_enc  =>  d/d b_dec = -(sum_b grad_pre_b) @ W_enc.T,
            # and sum_b grad_pre_b is grad_b_enc: no per-token work (OpenAI's pre-bias trick).
            grad_b_dec = -(W_enc @ grad_b_enc)
        return (
            grad_x,
            grad_W_enc if ctx.needs_input_grad[1] else None,
            grad_b_enc if ctx.needs_input_grad[2] else None,
            grad_b_dec,
            None,
            None,
            None,
            None,
        )


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
    """See :func:`fastsae.ops.encode_topk`. The backward goes through whichever
    ``sparse_encoder_backward`` the current backend provides (Triton kernels when active)."""
    if not 1 <= k <= W_enc.shape[1]:
        raise ValueError(f"k={k} must be in [1, d_sae={W_enc.shape[1]}]")
    _, encoder_backward = implementation_of("sparse_encoder_backward")
    values, indices, aux_values, aux_indices = _EncodeTopK.apply(
        x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, encoder_backward
    )
    if aux_indices.shape[1] == 0:
        aux_values = aux_indices = None
    return EncodeTopKOutput(values, indices, aux_values, aux_indices)
