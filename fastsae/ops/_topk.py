"""Exact row-wise top-k with fastsae's tie rule, for the ``torch`` backend.

Tie rule: scores descending, the lower index first among equal scores (the stable descending
sort of :func:`fastsae.reference.topk`). Two ways to get it:

- :func:`topk_by_torch`: ``torch.topk`` asked for ``k + 1``, rows where a tie straddles the cut
  redone with a stable sort. Any device, any shape.
- :func:`topk_prefiltered`: a per-row lower bound on the (k+1)-th score from block maxima, the
  few scores at or above it compacted, and a stable sort of those. On CPU ``torch.topk`` copies
  each row into (value, index) pairs and runs ``std::nth_element`` for ``k + 1 > n / 64``
  (``std::partial_sort`` below): ~7 ns per score. The prefilter makes three vectorized passes
  (block maxima, compare, ``nonzero``), ~1.5 ns per score, and sorts ~1.2-1.4 (k + 1) survivors
  per row. At B=1024, n=2048, k=32 (fp32, one thread, real pre-activations) that was 5.8 ms
  against 15-19 ms; the effect on a training step is in ``benchmarks/results/quality-*.json``.

:func:`topk_tie_exact` picks between them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["topk_by_torch", "topk_prefiltered", "topk_tie_exact"]

#: Blocks per row, in multiples of ``k + 1``, for the prefilter's lower bound. The bound is the
#: (k+1)-th largest block maximum, so about ``blocks * ln(blocks / (blocks - k - 1))`` scores
#: pass it: ~1.4 (k + 1) with 2 (k + 1) blocks, ~1.15 (k + 1) with 4 (k + 1), at the price of a
#: wider ``topk`` over the block maxima. At n = 2048, k = 32 (B = 1024) 2, 3 and 4 (k + 1) blocks
#: took 5.8, 6.2 and 6.5 ms.
PREFILTER_BLOCKS_PER_K = 2
#: The prefilter is used for ``PREFILTER_MIN_N * (k + 1) <= n < PREFILTER_MAX_N * (k + 1)``
#: (:func:`prefilter_applies`). Above, CPU
#: ``torch.topk`` switches to a heap (``std::partial_sort``), which rejects most scores with one
#: comparison and matched or beat the prefilter (random normal scores, B=1024, n=4096-16384,
#: k=32). Below, the fixed per-row costs (the top-(k+1) of the block maxima, the sort of the
#: survivors) dominate: at k=64 the prefilter took 8.1 ms against 7.6 at n=750, and 7.5 against
#: 9.1 at n=912 (real pre-activations of dead latents, B=1024).
PREFILTER_MIN_N = 12
PREFILTER_MAX_N = 64
#: Survivors per row, in multiples of ``k + 1``, above which a row is selected by
#: :func:`topk_by_torch` instead (rows of many equal scores, e.g. an all-zero input row at
#: initialisation, would otherwise widen the sort of every row to ``n``).
PREFILTER_MAX_SURVIVORS_PER_K = 8


def prefilter_applies(pre: Tensor, k: int) -> bool:
    """Whether :func:`topk_prefiltered` is the faster way to the top ``k`` of each row of ``pre``:
    a non-empty CPU matrix with ``PREFILTER_MIN_N * (k + 1) <= n < PREFILTER_MAX_N * (k + 1)``."""
    return (
        pre.dim() == 2
        and pre.device.type == "cpu"
        and pre.shape[0] > 0
        and PREFILTER_MIN_N * (k + 1) <= pre.shape[1] < PREFILTER_MAX_N * (k + 1)
    )


def topk_tie_exact(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(scores [..., k], indices [..., k])`` of the ``k`` largest scores of each row of ``pre``
    (``[..., n]``, ``1 <= k <= n``) under fastsae's tie rule. Scores are *not* ReLU'd.

    CPU matrices wide enough for the block bound go through :func:`topk_prefiltered`, anything
    else through :func:`topk_by_torch`; both return the same scores and, wherever the tie rule
    decides, the same indices (equal ``+inf``/``-inf`` scores may come in another order, and NaN
    scores, which count as the largest, in any order)."""
    if prefilter_applies(pre, k):
        return topk_prefiltered(pre, k, blocks=PREFILTER_BLOCKS_PER_K * (k + 1))
    return topk_by_torch(pre, k)


def topk_by_torch(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """:func:`topk_tie_exact` from ``torch.topk``.

    ``torch.topk`` does not say which of several equal values it keeps, so it is asked for
    ``k + 1``: where the k-th and (k+1)-th values differ the chosen set is unique, and only rows
    where they are equal (a tie straddles the cut) are redone with a stable sort. Rows holding
    equal selected values are then put in index order. Neither costs an extra pass over ``pre``,
    and neither sorts rows without ties (CPU sorts of short rows cost as much as the ``topk``).
    """
    n = pre.shape[-1]
    top, idx = torch.topk(pre, min(k + 1, n), dim=-1, sorted=True)
    if k < n:
        ambiguous = (top[..., k - 1] == top[..., k]) & torch.isfinite(top[..., k - 1])
        top, idx = top[..., :k], idx[..., :k]
        if bool(ambiguous.any()):
            rows = ambiguous.nonzero().squeeze(-1)
            _, order = torch.sort(pre[rows], dim=-1, descending=True, stable=True)
            idx[rows] = order[..., :k]
            top[rows] = pre[rows].gather(-1, idx[rows])
    return index_order_ties(top, idx)


def topk_prefiltered(pre: Tensor, k: int, *, blocks: int) -> tuple[Tensor, Tensor]:
    """:func:`topk_tie_exact` of a ``[B, n]`` matrix through a per-row lower bound.

    1. The columns are cut into ``blocks`` groups (column ``j`` in group ``j % blocks``, the
       ``n % blocks`` last columns in one more group) and each group's maximum taken. The
       (k+1)-th largest group maximum ``mu`` is at most the row's (k+1)-th largest score: the
       k+1 groups at or above it hold k+1 distinct scores ``>= mu``.
    2. So every score that can be among the top ``k``, and every score equal to the k-th, is
       ``>= mu``: these survivors (at least k+1 per row) are compacted, in column order, into a
       ``[B, width]`` matrix padded with ``-inf``.
    3. A stable descending sort of the survivors puts them in score order, lower column first
       among equals: its first ``k`` are the answer.

    Rows the bound cannot serve go to :func:`topk_by_torch`: a NaN (its group maximum is NaN,
    which compares false), ``mu = -inf`` (fewer than k+1 finite scores: every score survives),
    or more than ``PREFILTER_MAX_SURVIVORS_PER_K * (k + 1)`` survivors (many equal scores).

    Args:
        pre: ``[B, n]`` scores, any float dtype and strides. k: ``1 <= k < n``.
        blocks: number of column groups, ``k + 1 <= blocks <= n``.
    """
    B, n = pre.shape
    if not (1 <= k < n and k + 1 <= blocks <= n):
        raise ValueError(f"need 1 <= k={k} < n={n} and k + 1 <= blocks={blocks} <= n")
    if B == 0:
        return pre.new_empty(0, k), torch.empty(0, k, dtype=torch.long, device=pre.device)
    per_block = n // blocks
    body = pre[:, : per_block * blocks].unflatten(1, (per_block, blocks))
    block_max = body.amax(dim=1)  # [B, blocks]: a reduction over a strided, vectorized axis
    if per_block * blocks < n:
        block_max = torch.cat([block_max, pre[:, per_block * blocks :].amax(-1, keepdim=True)], 1)
    mu = torch.topk(block_max, k + 1, dim=-1, sorted=False).values.amin(-1)
    # NaN (a NaN score, which topk ranks first) or -inf: the bound is useless for this row.
    fallback = ~(mu > float("-inf"))
    if bool(fallback.any()):
        if 2 * int(fallback.sum()) > B:
            # Mostly rows of few finite scores (JumpReLU's thresholded selection): the
            # compaction pass would serve too few rows to pay for itself.
            return topk_by_torch(pre, k)
        mu = mu.masked_fill(fallback, float("nan"))  # no score survives a NaN bound
    flat = (pre >= mu[:, None]).reshape(-1).nonzero().squeeze(-1)
    rows = flat // n
    counts = torch.bincount(rows, minlength=B)
    crowded = counts > PREFILTER_MAX_SURVIVORS_PER_K * (k + 1)
    if bool(crowded.any()):
        fallback |= crowded
        keep = ~crowded[rows]
        flat, rows = flat[keep], rows[keep]
        counts = counts.masked_fill(crowded, 0)
    cols = flat - rows * n
    width = max(k, int(counts.max()))
    slot = rows * width + (
        torch.arange(flat.numel(), device=pre.device) - (counts.cumsum(0) - counts)[rows]
    )
    vals = pre.new_full((B * width,), float("-inf")).scatter_(0, slot, pre.take(flat))
    where = torch.zeros(B * width, dtype=torch.long, device=pre.device).scatter_(0, slot, cols)
    top, order = torch.sort(vals.view(B, width), dim=-1, descending=True, stable=True)
    top, idx = top[:, :k], where.view(B, width).gather(-1, order[:, :k])
    if bool(fallback.any()):
        redo = fallback.nonzero().squeeze(-1)
        top[redo], idx[redo] = topk_by_torch(pre[redo], k)
    return top, idx


def index_order_ties(top: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Within rows that hold equal finite scores, order equal scores by index."""
    ties = ((top[..., 1:] == top[..., :-1]) & torch.isfinite(top[..., 1:])).any(-1)
    if bool(ties.any()):
        rows = ties.nonzero().squeeze(-1)
        top[rows], idx[rows] = order_candidates(top[rows], idx[rows])
    return top, idx


def order_candidates(top: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Sort candidates by score descending, lower index first among equal scores."""
    by_index = torch.argsort(idx, dim=-1)
    idx, top = idx.gather(-1, by_index), top.gather(-1, by_index)
    by_value = torch.argsort(top, dim=-1, descending=True, stable=True)
    return top.gather(-1, by_value), idx.gather(-1, by_value)
