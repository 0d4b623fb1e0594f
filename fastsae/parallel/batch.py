"""BatchTopK over the *global* batch when the batch is split across data ranks.

One process keeps the ``K = round(k B)`` largest ReLU'd pre-activations of its ``B`` tokens
(:func:`fastsae.ops._sparse_encode.batch_topk_select`; ties: lower flat index ``b n + i``). With
``B`` split over ``dp`` data ranks the same set is found without moving activations:

1. each rank selects per-row candidates as one process does (``m`` per row, doubled for rows that
   may hold more winners; a rank with no such row still takes part in the vote);
2. the K-th largest candidate score ``tau`` of the whole batch: each rank all-gathers its own top
   ``K`` scores (``4 K`` bytes), every rank takes the K-th of the union;
3. a row is *saturated* when its smallest candidate reaches ``tau``; while any rank has one, all
   ranks repeat (the vote is an all-reduce, so every rank runs the same number of rounds);
4. kept: every candidate above ``tau``, and of those equal to ``tau`` the ``K - #(> tau)`` with
   the lowest global flat index ``(dp_rank B/dp + row) n + i`` (their keys are all-gathered).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastsae.ops._sparse_encode import _widen
from fastsae.parallel.comm import all_gather, all_reduce

__all__ = ["dp_batch_topk_select"]


def _kth_largest(scores: Tensor, K: int, group) -> Tensor:
    """The K-th largest entry of the union over ``group`` of every rank's ``scores``."""
    flat = scores.reshape(-1)
    local = torch.topk(flat, min(K, flat.numel()), sorted=True).values
    if local.numel() < K:
        local = torch.cat([local, local.new_full((K - local.numel(),), float("-inf"))])
    everything = torch.cat(all_gather(local.contiguous(), group))
    return torch.topk(everything, K, sorted=True).values[-1]


@torch.no_grad()
def dp_batch_topk_select(
    select,
    x_in: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: float,
    *,
    n: int,
    group,
    dp_size: int,
    dp_rank: int,
    **aux,
):
    """:func:`fastsae.ops._sparse_encode.batch_topk_select` for this data rank's rows of a global
    batch of ``dp_size x`` its size; same signature otherwise, same result as one process on the
    global batch (restricted to this rank's rows)."""
    B = x_in.shape[0]
    B_global = B * dp_size
    K = max(1, min(round(k * B_global), B_global * n))
    m = min(n, max(2 * math.ceil(k) + 8, math.ceil(K / max(B_global, 1))))
    top, idx, aux_top, aux_idx = select(x_in, W_enc, b_enc, m, **aux)
    while True:
        scores = torch.relu(top)
        tau = _kth_largest(scores, K, group)
        smallest = scores[:, -1]
        saturated = (smallest >= tau) & (smallest > 0)
        flag = torch.tensor([float(saturated.any())], device=top.device)
        if m >= n or not bool(all_reduce(flag, group, "max").item()):
            break
        m = min(n, 2 * m)
        top, idx = _widen(top, idx, m)
        rows = saturated.nonzero().squeeze(-1)
        if rows.numel():
            top[rows], idx[rows], _, _ = select(x_in[rows], W_enc, b_enc, m)
    if not bool(tau > 0):
        kept = scores > 0  # every positive candidate is kept; zeros carry nothing
    else:
        kept = scores > tau
        n_above = all_reduce(kept.sum().reshape(1), group)
        need = K - int(n_above.item())
        ties = scores == tau
        row = torch.arange(B, device=idx.device)[:, None] + dp_rank * B
        keys = (row * n + idx)[ties]
        width = int(all_reduce(torch.tensor([keys.numel()], device=idx.device), group, "max"))
        padded = torch.cat([keys.sort().values, keys.new_full((width - keys.numel(),), -1)])
        every = torch.cat(all_gather(padded, group))
        every = every[every >= 0].sort().values
        if need > 0:
            last = every[min(need, every.numel()) - 1]
            kept |= ties & ((row * n + idx) <= last)
    width = max(1, int(kept.sum(-1).max()))
    order = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True)[:, :width]
    top = top.masked_fill(~kept, float("-inf"))
    return top.gather(-1, order), idx.gather(-1, order), aux_top, aux_idx
