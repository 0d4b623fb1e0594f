"""Sparse feature activations of an SAE, with or without a gradient, for any architecture.

Analysis reads features as padded sparse codes ``(values, indices)``, each ``[..., w]``: the top-k
family and JumpReLU come straight from the fast ``sae.encode_sparse``; ReLU and Gated SAEs, which
have no sparse encoder, are encoded densely once and compacted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastsae.sae import SAE

__all__ = ["SparseCodes", "dense_to_sparse", "encode_codes"]


@dataclass
class SparseCodes:
    """Feature activations of one SAE at one site.

    values: ``[..., w]`` activations (zeros are padding). indices: ``[..., w]`` int64 latent ids.
    Leading dims ``...`` are the activation's (``[batch, seq]`` inside a model).
    """

    values: Tensor
    indices: Tensor

    def dense(self, d_sae: int) -> Tensor:
        """``[..., d_sae]`` dense codes (duplicate indices add up)."""
        out = self.values.new_zeros(*self.values.shape[:-1], d_sae)
        return out.scatter_add(-1, self.indices, self.values)

    def detach(self) -> SparseCodes:
        return SparseCodes(self.values.detach(), self.indices)


def dense_to_sparse(codes: Tensor) -> SparseCodes:
    """Compact dense codes ``[..., n]`` into padded sparse codes of width the busiest row's count
    (at least 1). Differentiable in the kept values."""
    nonzero = codes != 0
    width = max(1, int(nonzero.sum(-1).max())) if codes.numel() else 1
    # Sort the non-zero entries first (stable: by latent id among them), then keep `width`.
    order = torch.sort((~nonzero).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    values = codes.gather(-1, order) * nonzero.gather(-1, order)
    return SparseCodes(values, order)


def _regather(sae: SAE, x: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """The pre-activations of the selected latents, recomputed so that they carry a gradient to
    ``x`` and the encoder (padding stays 0): ``[N, w]`` from ``x [N, d_in]``. Exact for TopK,
    BatchTopK (inference) and JumpReLU, whose active codes equal their pre-activations."""
    xin = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    w_rows = sae.W_enc.T[indices]  # [N, w, d_in]
    pre = torch.einsum("nd,nwd->nw", xin, w_rows)
    if sae.b_enc is not None:
        pre = pre + sae.b_enc[indices]
    return pre * (values > 0)


def encode_codes(sae: SAE, x: Tensor, *, grad: bool = False) -> SparseCodes:
    """Feature activations of ``x [..., d_in]`` as :class:`SparseCodes` ``[..., w]``.

    Uses ``sae.encode_sparse`` (the fast path) where the architecture has one. With
    ``grad=True`` the values are differentiable in ``x`` and the SAE parameters for every
    architecture (JumpReLU's fast encoder has no backward, so its selected pre-activations are
    recomputed, ``O(N·w·d_in)``).
    """
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1]).to(sae.dtype)
    if hasattr(sae, "encode_sparse"):
        values, indices = sae.encode_sparse(x2)
        if grad and values.grad_fn is None:
            values = _regather(sae, x2, values.detach(), indices)
        codes = SparseCodes(values, indices.long())
    else:
        dense = sae.encode(x2)
        codes = dense_to_sparse(dense if grad else dense.detach())
    w = codes.values.shape[-1]
    return SparseCodes(codes.values.reshape(*lead, w), codes.indices.reshape(*lead, w))
