"""The ``triton`` backend: the Triton kernels of :mod:`fastsae.kernels`.

Only the ops below are defined here; every other op falls back to :mod:`fastsae.ops._torch`, then
:mod:`fastsae.ops._reference` (see :func:`fastsae.ops.implementation_of`). The kernels run on
CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before Triton is imported).
"""

from __future__ import annotations

from torch import Tensor

from fastsae.kernels.sparse_decode import sparse_decode as _sparse_decode
from fastsae.kernels.sparse_encoder_bwd import sparse_encoder_backward as _sparse_encoder_backward

__all__ = ["sparse_decode", "sparse_encoder_backward"]


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """:func:`fastsae.kernels.sparse_decode.sparse_decode`: ``[B, k]`` -> ``[B, d_out]``.

    Differentiable in ``values``, ``W_dec`` and ``b_dec``.
    """
    return _sparse_decode(values, indices, W_dec, b_dec)


def sparse_encoder_backward(
    x: Tensor,
    indices: Tensor,
    grad_pre: Tensor,
    W_enc: Tensor,
    *,
    need_grad_x: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`fastsae.kernels.sparse_encoder_bwd.sparse_encoder_backward`.

    Returns ``(grad_W_enc [d_in, d_sae], grad_b_enc [d_sae], grad_x [B, d_in] or None)``.
    """
    return _sparse_encoder_backward(x, indices, grad_pre, W_enc, need_grad_x=need_grad_x)
