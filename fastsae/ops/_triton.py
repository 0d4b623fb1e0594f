"""The ``triton`` backend: the Triton kernels of :mod:`fastsae.kernels`.

The ops below (sparse decode, the sparse encoder backward, and the TopK / BatchTopK / JumpReLU
encoders built on the fused encode + top-k kernel or on slab + select, by the encode strategy of
:mod:`fastsae.ops._encode_strategy`) are defined here; every other op falls back
to :mod:`fastsae.ops._torch`, then :mod:`fastsae.ops._reference` (see :func:`fastsae.ops.implementation_of`). The kernels run on
CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before Triton is imported).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fastsae.kernels import encode_topk as _encode_topk
from fastsae.kernels import encode_topk_filtered as _encode_topk_filtered
from fastsae.kernels import slab_topk as _slab_topk
from fastsae.kernels.sparse_decode import sparse_decode as _sparse_decode
from fastsae.kernels.sparse_encoder_bwd import sparse_encoder_backward as _sparse_encoder_backward
from fastsae.ops import _torch
from fastsae.ops._csr import CSR, shared_csr_of
from fastsae.ops._encode_strategy import AutoSelect
from fastsae.ops._sparse_encode import make_encode_ops

__all__ = [
    "encode_batch_topk",
    "encode_jumprelu",
    "encode_topk",
    "select_topk",
    "sparse_decode",
    "sparse_encoder_backward",
]


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """:func:`fastsae.kernels.sparse_decode.sparse_decode`: ``[B, k]`` -> ``[B, d_out]``.

    Differentiable in ``values``, ``W_dec`` and ``b_dec``. Ids returned by this backend's
    encoders reuse the step's shared CSR layout for ``grad_W_dec`` (:mod:`fastsae.ops._csr`).
    """
    return _sparse_decode(values, indices, W_dec, b_dec, csr=shared_csr_of(indices, W_dec.shape[0]))


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
    """:func:`fastsae.kernels.sparse_encoder_bwd.sparse_encoder_backward` (``csr``: the layout
    of ``indices`` when the caller has it).

    Returns ``(grad_W_enc [d_in, d_sae], grad_b_enc [d_sae], grad_x [B, d_in] or None)``.
    ``bf16_operands`` is ignored: the kernel reads the operands in their own dtype.
    """
    del bf16_operands
    return _sparse_encoder_backward(x, indices, grad_pre, W_enc, need_grad_x=need_grad_x, csr=csr)


def _select(
    x_in: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    threshold: Tensor | None = None,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    kernel=_encode_topk_filtered,
):
    """The fused kernel's selection, with the semantics of :func:`fastsae.ops._torch.select_topk`.
    ``kernel``: :mod:`fastsae.kernels.encode_topk_filtered` (the ``fused`` strategy) or
    :mod:`fastsae.kernels.encode_topk` (``fused_registers``); both take ``k`` and
    ``min(k_aux, d_sae)`` up to ``encode_topk.MAX_K``.

    - ``k`` above the kernel's ``MAX_K`` (JumpReLU and BatchTopK widen their candidate count
      until no row is cut off) goes to the torch path, which takes any ``k``.
    - AuxK with ``min(k_aux, d_sae)`` above ``MAX_K`` (the default ``k_aux = d_in / 2`` is 1152
      at d_in = 2304) runs in its own pass over the dead latents on the torch path; the main
      selection stays on the kernel.
    - AuxK keeps the kernel's fixed width ``min(k_aux, d_sae)``, whatever the dead count: slots
      past ``n_dead`` hold ``-inf`` scores (value 0 once ReLU'd: padding, which adds nothing to
      the decode, the loss or a gradient). The torch backend trims to ``min(k_aux, n_dead)``
      instead; trimming here needed the dead count on the host, a sync every step that
      blocked CUDA graphs. This function makes no host sync (the torch fallbacks above do).
    - Scores are fp32 (the accumulator); for float64 inputs, which only the oracle tests use,
      they are recomputed in float64 at the selected latents so that values match the oracle to
      float64 precision.
    """
    n = W_enc.shape[1]
    want_aux = dead_mask is not None and k_aux > 0
    if k > _encode_topk.MAX_K:
        return _torch.select_topk(
            x_in, W_enc, b_enc, k, threshold=threshold, dead_mask=dead_mask, k_aux=k_aux
        )
    aux_on_torch = want_aux and min(k_aux, n) > _encode_topk.MAX_K
    kernel_aux = {} if aux_on_torch or not want_aux else dict(dead_mask=dead_mask, k_aux=k_aux)
    top, idx, aux_top, aux_idx = kernel.select_topk(
        x_in, W_enc, b_enc, k, threshold=threshold, **kernel_aux
    )
    if x_in.dtype == torch.float64:
        top = _rescore(x_in, W_enc, b_enc, idx, top)
    if aux_on_torch:
        _, _, aux_top, aux_idx = _torch.select_topk(
            x_in, W_enc, b_enc, 1, threshold=threshold, dead_mask=dead_mask, k_aux=k_aux
        )
        return top, idx, aux_top, aux_idx
    if aux_idx is not None and x_in.dtype == torch.float64:
        aux_top = _rescore(x_in, W_enc, b_enc, aux_idx, aux_top)
    return top, idx, aux_top, aux_idx


def _rescore(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor, top: Tensor) -> Tensor:
    exact = (x_in[:, None, :] * W_enc.T[idx]).sum(-1) + b_enc[idx]
    return torch.where(torch.isfinite(top), exact, top.to(exact.dtype))


def _select_slab(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, **kwargs):
    """Slab + select (:mod:`fastsae.kernels.slab_topk`); the torch selection where ``k`` or
    ``k_aux`` is above the kernel's ``MAX_K``, so no k crashes. Float64 rescored as above. AuxK
    at the fixed width ``min(k_aux, d_sae)``, as :func:`_select` (no host sync)."""
    dead, k_aux = kwargs.get("dead_mask"), kwargs.get("k_aux", 0)
    if k > _slab_topk.MAX_K or (dead is not None and min(k_aux, W_enc.shape[1]) > _slab_topk.MAX_K):
        return _torch.select_topk(x_in, W_enc, b_enc, k, **kwargs)
    top, idx, aux_top, aux_idx = _slab_topk.select_topk(
        x_in, W_enc, b_enc, k, fixed_aux_width=True, **kwargs
    )
    if x_in.dtype == torch.float64:
        top = _rescore(x_in, W_enc, b_enc, idx, top)
        if aux_idx is not None:
            aux_top = _rescore(x_in, W_enc, b_enc, aux_idx, aux_top)
    return top, idx, aux_top, aux_idx


# The selection: the fused encode + top-k kernel, slab + select, or torch, by the encode strategy
# (fastsae/ops/_encode_strategy.py: measured on a GPU unless set). The shared sparse autograd
# (fastsae/ops/_sparse_encode.py) turns it into TopK, BatchTopK and JumpReLU encoders whose
# backward runs the kernels above.
select_topk = AutoSelect(
    {
        "fused": _select,
        "fused_registers": functools.partial(_select, kernel=_encode_topk),
        "slab": _select_slab,
        "torch": _torch.select_topk,
    }
)
# BatchTopK at a static width: no host sync in a training step (fastsae/ops/_sparse_encode.py).
_encoders = make_encode_ops(select_topk, static_width=True)
encode_topk = _encoders["encode_topk"]
encode_batch_topk = _encoders["encode_batch_topk"]
encode_jumprelu = _encoders["encode_jumprelu"]
