"""The ``reference`` backend: the oracles of :mod:`fastsae.reference`, composed into ops."""

from __future__ import annotations

import torch
from torch import Tensor

from fastsae import reference as ref
from fastsae.ops import EncodeTopKOutput

pre_activations = ref.pre_activations
batch_topk = ref.batch_topk
jumprelu = ref.jumprelu
dense_decode = ref.dense_decode
sparse_decode = ref.sparse_decode
sparse_encoder_backward = ref.sparse_encoder_backward


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
    """Dense pre-activations, then :func:`fastsae.reference.topk` (and the same among dead latents)."""
    pre = ref.pre_activations(x, W_enc, b_enc, b_dec)
    values, indices = ref.topk(pre, k)
    aux_values = aux_indices = None
    if k_aux > 0 and dead_mask is not None and bool(dead_mask.any()):
        k_eff = min(k_aux, int(dead_mask.sum()))
        masked = torch.where(dead_mask, pre, torch.full_like(pre, float("-inf")))
        _, aux_indices = ref.topk(masked.detach(), k_eff)
        aux_values = torch.relu(pre.gather(-1, aux_indices))
    return EncodeTopKOutput(values, indices, aux_values, aux_indices)


def _dense_to_sparse(codes: Tensor) -> tuple[Tensor, Tensor]:
    width = max(1, int((codes != 0).sum(-1).max())) if codes.numel() else 1
    return ref.topk(codes, min(width, codes.shape[-1]))


def encode_batch_topk(x, W_enc, b_enc, k, *, b_dec=None, dead_mask=None, k_aux=0):
    """Dense pre-activations, :func:`fastsae.reference.batch_topk`, then padded sparse codes."""
    pre = ref.pre_activations(x, W_enc, b_enc, b_dec)
    values, indices = _dense_to_sparse(ref.batch_topk(pre, k))
    aux = encode_topk(x, W_enc, b_enc, 1, b_dec=b_dec, dead_mask=dead_mask, k_aux=k_aux)
    return EncodeTopKOutput(values, indices, aux.aux_values, aux.aux_indices)


@torch.no_grad()
def encode_jumprelu(x, W_enc, b_enc, threshold, *, b_dec=None, k_cap=64):
    """Dense JumpReLU, then padded sparse codes."""
    pre = ref.pre_activations(x, W_enc, b_enc, b_dec)
    return _dense_to_sparse(torch.relu(pre * (pre > threshold)))
