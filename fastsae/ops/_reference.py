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
