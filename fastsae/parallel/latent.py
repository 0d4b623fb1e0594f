"""Latent sharding: each rank owns a contiguous slab of latents (``W_enc`` columns, ``b_enc``,
``W_dec`` rows and their Adam state) and the exact global top-k is taken from every slab's
candidates.

One TopK forward on a latent group of ``p`` ranks, ``B`` tokens:

1. each rank selects its slab's top ``k`` (the backend's chunked ``select``, so never
   ``[B, n]``), and ``k_aux`` among its dead latents for AuxK;
2. ``all_gather`` of the candidates ``(score [B, k] fp32, global index [B, k] int64)``;
3. every rank merges the ``p k`` candidates with the oracle's tie rule (descending score, lower
   global index first among equals). The global top k is a subset of the union of the slabs'
   top k (a latent beaten by k others in its own slab is beaten by them globally), so this is
   **exact**: no capacity factor, no threshold approximation;
4. each rank keeps the winners in its slab (the others become padding: value 0, no gradient),
   decodes them, and the ``[B, d_out]`` partial reconstructions are summed (``all_reduce``);
5. backward runs the backend's sparse encoder/decoder backward on the slab only. ``b_dec``,
   replicated, gets the sum of the slabs' encoder contributions (:func:`copy_to_latent`).

BatchTopK uses :func:`fastsae.ops._sparse_encode.batch_topk_select` on top of the same exchange
(its re-selection of saturated rows is decided from gathered data, so every rank takes the same
branch). AuxK: the global top ``min(k_aux, n_dead)`` among dead latents, exchanged likewise, and
decoded like the main codes.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from fastsae import ops
from fastsae import reference as ref
from fastsae.architectures import _default_k_aux
from fastsae.ops._sparse_encode import _apply, batch_topk_select
from fastsae.ops._torch import _merge
from fastsae.parallel.batch import dp_batch_topk_select
from fastsae.parallel.comm import all_gather, copy_to_latent, reduce_from_latent
from fastsae.sae import SAE, LossOutput, SAEOutput

__all__ = ["LatentShard", "SHARDABLE", "global_select", "sharded_loss"]

#: Architectures whose latent-sharded loss is implemented here.
SHARDABLE = ("topk", "batchtopk")


class LatentShard:
    """This rank's slab: latents ``[offset, offset + count)`` of ``n``, in ``group``."""

    def __init__(self, group, offset: int, count: int, n: int):
        self.group, self.offset, self.count, self.n = group, offset, count, n

    def owned(self, top: Tensor | None, idx: Tensor | None):
        """Global candidates -> this slab's: others become padding (``-inf`` score, index 0)."""
        if top is None:
            return None, None
        mine = (idx >= self.offset) & (idx < self.offset + self.count)
        return top.masked_fill(~mine, float("-inf")), torch.where(mine, idx - self.offset, 0)


def _local_select():
    """The active backend's selection (the fused kernel on Triton, chunked torch otherwise)."""
    if ops.get_backend() == "triton":
        from fastsae.ops._triton import _select

        return _select
    from fastsae.ops._torch import select_topk

    return select_topk


def _pad(top: Tensor | None, idx: Tensor | None, width: int, rows: int, like: Tensor):
    """Candidates padded to ``width`` with ``-inf`` scores and index ``-1`` (never selected:
    there are always at least ``width`` finite candidates in the group)."""
    if top is None:
        top = like.new_empty(rows, 0)
        idx = torch.empty(rows, 0, dtype=torch.long, device=like.device)
    pad = width - top.shape[1]
    if pad:
        top = torch.cat([top, top.new_full((rows, pad), float("-inf"))], dim=1)
        idx = torch.cat([idx, idx.new_full((rows, pad), -1)], dim=1)
    return top.contiguous(), idx.contiguous()


@torch.no_grad()
def global_select(
    x_in: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    shard: LatentShard,
    n_dead: int = 0,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The exact global top ``k`` (and top ``min(k_aux, n_dead)`` among dead latents) of the
    whole latent group, with *global* indices; the signature of
    :func:`fastsae.ops._torch.select_topk`, so it plugs into ``batch_topk_select``."""
    B = x_in.shape[0]
    k = min(k, shard.n)
    want_aux = k_aux > 0 and n_dead > 0 and dead_mask is not None
    top, idx, aux_top, aux_idx = _local_select()(
        x_in,
        W_enc,
        b_enc,
        min(k, shard.count),
        dead_mask=dead_mask if want_aux else None,
        k_aux=k_aux if want_aux else 0,
    )
    top, idx = _pad(top, idx + shard.offset, k, B, x_in)
    tops, idxs = all_gather(top, shard.group), all_gather(idx, shard.group)
    g_top, g_idx = _merge(tops, idxs, k)
    if not want_aux:
        return g_top, g_idx, None, None
    width = min(k_aux, n_dead)
    if aux_idx is not None:
        aux_idx = aux_idx + shard.offset
        aux_top, aux_idx = aux_top[:, :width], aux_idx[:, :width]
    aux_top, aux_idx = _pad(aux_top, aux_idx, width, B, x_in)
    a_tops, a_idxs = all_gather(aux_top, shard.group), all_gather(aux_idx, shard.group)
    g_aux_top, g_aux_idx = _merge(a_tops, a_idxs, width)
    return g_top, g_idx, g_aux_top, g_aux_idx


def sharded_loss(
    sae: SAE,
    x: Tensor,
    y: Tensor,
    *,
    shard: LatentShard,
    k: float,
    dead_mask: Tensor,
    n_dead: int,
    coeffs: dict,
    batch_group=None,
    dp_size: int = 1,
    dp_rank: int = 0,
) -> LossOutput:
    """The loss of the whole (sharded) SAE, computed by one slab's rank: ``sae`` holds the slab
    (``d_sae = shard.count``), ``x [B, d_in]`` and ``y [B, d_out]`` are the same on every rank of
    the latent group, ``dead_mask [count]`` is this slab's, ``n_dead`` the group's total.

    ``output.values``/``indices`` are the global codes (for metrics); ``output.local`` holds
    ``(values, slab indices)`` of this slab's winners (zero-valued padding elsewhere).

    BatchTopK with ``dp_size > 1``: ``x`` is data rank ``dp_rank``'s share of a global batch split
    over ``batch_group``, and the batch's top ``k B`` is taken over the global batch
    (:func:`fastsae.parallel.batch.dp_batch_topk_select`).
    """
    arch = sae.cfg.architecture
    if arch not in SHARDABLE:
        raise ValueError(f"architecture={arch!r} cannot be latent-sharded; allowed: {SHARDABLE}")
    coeffs = {**sae.default_coefficients, **coeffs}
    k_aux = _default_k_aux(sae, coeffs["k_aux"])
    aux = {"dead_mask": dead_mask, "k_aux": k_aux} if n_dead else {}
    select = partial(global_select, shard=shard, n_dead=n_dead)
    seen: dict[str, Tensor] = {}

    def selector(x_in, W, b):
        if arch == "batchtopk" and dp_size > 1:
            top, idx, a_top, a_idx = dp_batch_topk_select(
                select, x_in, W, b, k, n=shard.n, group=batch_group, dp_size=dp_size,
                dp_rank=dp_rank, **aux,
            )  # fmt: skip
        elif arch == "batchtopk":
            top, idx, a_top, a_idx = batch_topk_select(select, x_in, W, b, k, n=shard.n, **aux)
        else:
            top, idx, a_top, a_idx = select(x_in, W, b, int(k), **aux)
        seen["values"], seen["indices"] = torch.relu(top).to(x.dtype), idx
        return (*shard.owned(top, idx), *shard.owned(a_top, a_idx))

    b_dec_in = copy_to_latent(sae.b_dec, shard.group) if sae.cfg.apply_b_dec_to_input else None
    encoder_backward = ops.implementation_of("sparse_encoder_backward")[1]
    values, indices, aux_values, aux_indices = _apply(
        x, sae.W_enc, sae.b_enc, b_dec_in, selector, encoder_backward
    )
    zero_bias = torch.zeros_like(sae.b_dec)
    recon = reduce_from_latent(
        ops.sparse_decode(values, indices, sae.W_dec, zero_bias), shard.group
    )
    recon = sae._add_skip(recon + sae.b_dec, x)
    mse = ref.mse(recon, y)
    auxk = recon.new_zeros(())
    if aux_values is not None and n_dead:
        aux_recon = reduce_from_latent(
            ops.sparse_decode(aux_values, aux_indices, sae.W_dec, zero_bias), shard.group
        )
        auxk = min(n_dead / k_aux, 1.0) * ref.mse(aux_recon, (y - recon).detach())
    terms = {"mse": mse, "auxk": coeffs["aux_coeff"] * auxk}
    out = SAEOutput(recon=recon, values=seen["values"], indices=seen["indices"])
    out.local = (values.detach(), indices)
    return LossOutput(loss=mse + terms["auxk"], terms=terms, output=out)
