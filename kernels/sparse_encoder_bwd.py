"""Encoder gradients from a sparse gradient of the pre-activations, ``grad_pre [B, K']``.

With ``G = sparse_to_dense(grad_pre, indices, N)`` (duplicates summed; ``K'`` counts the main
and the AuxK latents together) and ``pre = x @ W_enc + b_enc``:

- ``grad_W_enc[:, i] = sum_{(b, j): indices[b, j] = i} grad_pre[b, j] * x[b]``: the CSR-by-latent
  segmented reduction of :mod:`fastsae.kernels.csr`, the same kernel as the decoder's
  ``grad_W_dec``. Each latent's column is a contiguous ``d_in`` row of a latent-major
  ``[N, d_in]`` buffer; the caller gets its ``.T`` view, shaped ``[d_in, N]``.
- ``grad_b_enc[i] = sum of grad_pre over latent i's segment``, from the same programs.
- ``grad_x[b] = sum_j grad_pre[b, j] * W_enc[:, indices[b, j]]``: the sparse-decode forward kernel
  run on ``W_enc.T`` (strides passed through, no bias). Fast when ``W_enc`` is the transpose of a
  contiguous ``[N, d_in]`` buffer (each gathered column is a contiguous row); a contiguous
  ``[d_in, N]`` ``W_enc`` works too, but each gathered element then costs its own 32-B sector.

Each of the two reductions costs ``2*B*K'*d_in`` FLOPs, against ``2*B*N*d_in`` for the dense
``x.T @ G`` and ``G @ W_enc.T``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastsae.kernels._launch import (
    check_float,
    check_index_range,
    check_same_device,
    output,
)
from fastsae.kernels.csr import CSR, segment_reduce
from fastsae.kernels.sparse_decode import gather_rows

__all__ = ["sparse_encoder_backward"]

# ---------------------------------------------------------------------------------------------
# Tuning constants: none of its own. Both launches reuse kernels whose block sizes live beside
# them (fastsae.kernels.csr for grad_W_enc / grad_b_enc, fastsae.kernels.sparse_decode for
# grad_x); a separate setting here needs a GPU measurement that says it differs.
#
# Kernels: none of its own, for the same reason: the two reductions are the decoder's.
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Launchers: check shapes, allocate (or take a caller's ``out``, which tests poison with NaN).
# ---------------------------------------------------------------------------------------------


def _check_args(x: Tensor, indices: Tensor, grad_pre: Tensor, W_enc: Tensor) -> None:
    if x.dim() != 2 or W_enc.dim() != 2 or x.shape[1] != W_enc.shape[0]:
        raise ValueError(
            f"x must be [B, d_in] and W_enc [d_in, d_sae]; got {tuple(x.shape)} and "
            f"{tuple(W_enc.shape)}"
        )
    if indices.shape != grad_pre.shape or indices.dim() != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"indices and grad_pre must both be [B={x.shape[0]}, k]; got {tuple(indices.shape)} "
            f"and {tuple(grad_pre.shape)}"
        )
    if indices.dtype != torch.int64:
        raise ValueError(f"indices must be int64, got {indices.dtype}")
    check_same_device(x, indices, grad_pre, W_enc)
    check_float(x=x, grad_pre=grad_pre, W_enc=W_enc)


def _sparse_encoder_grad_weights(
    x: Tensor,
    indices: Tensor,
    grad_pre: Tensor,
    W_enc: Tensor,
    *,
    out: Tensor | None = None,
    out_b: Tensor | None = None,
    csr: CSR | None = None,
) -> tuple[Tensor, Tensor]:
    """``(grad_W_enc latent-major [N, d_in], grad_b_enc [N])``, both in ``W_enc.dtype``."""
    _check_args(x, indices, grad_pre, W_enc)
    d_in, n = W_enc.shape
    check_index_range(indices, n)
    out = output(out, (n, d_in), W_enc, W_enc.dtype)
    out_b = output(out_b, (n,), W_enc, W_enc.dtype)
    segment_reduce(indices, grad_pre, x, out, out_b, csr=csr)
    return out, out_b


def _sparse_encoder_grad_x(
    x: Tensor, indices: Tensor, grad_pre: Tensor, W_enc: Tensor, *, out: Tensor | None = None
) -> Tensor:
    """``grad_x [B, d_in]`` in ``x.dtype``."""
    _check_args(x, indices, grad_pre, W_enc)
    check_index_range(indices, W_enc.shape[1])
    out = output(out, tuple(x.shape), x, x.dtype)
    return gather_rows(grad_pre, indices, W_enc.T, None, out)


# ---------------------------------------------------------------------------------------------
# Custom ops (no autograd: this *is* a backward). Two ops, because a custom op cannot return an
# optional tensor and grad_x is often not needed.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastsae::sparse_encoder_grad_weights", mutates_args=())
def _grad_weights_op(
    x: Tensor,
    indices: Tensor,
    grad_pre: Tensor,
    W_enc: Tensor,
    csr_offsets: Tensor | None = None,
    csr_entries: Tensor | None = None,
    csr_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    # The layout travels as three optional tensors: a custom op takes no tuple of tensors.
    csr = None if csr_offsets is None else CSR(csr_offsets, csr_entries, csr_rows)
    return _sparse_encoder_grad_weights(x, indices, grad_pre, W_enc, csr=csr)


@_grad_weights_op.register_fake
def _(x, indices, grad_pre, W_enc, csr_offsets=None, csr_entries=None, csr_rows=None):
    _check_args(x, indices, grad_pre, W_enc)
    d_in, n = W_enc.shape
    return W_enc.new_empty((n, d_in)), W_enc.new_empty((n,))


@torch.library.custom_op("fastsae::sparse_encoder_grad_x", mutates_args=())
def _grad_x_op(x: Tensor, indices: Tensor, grad_pre: Tensor, W_enc: Tensor) -> Tensor:
    return _sparse_encoder_grad_x(x, indices, grad_pre, W_enc)


@_grad_x_op.register_fake
def _(x, indices, grad_pre, W_enc):
    _check_args(x, indices, grad_pre, W_enc)
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def sparse_encoder_backward(
    x: Tensor,
    indices: Tensor,
    grad_pre: Tensor,
    W_enc: Tensor,
    *,
    need_grad_x: bool = False,
    csr: CSR | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Encoder gradients with Triton kernels; semantics of
    :func:`fastsae.reference.sparse_encoder_backward`.

    Args:
        x: ``[B, d_in]`` the encoder input (already minus ``b_dec`` where that applies).
        indices: ``[B, k']`` integer latent ids in ``[0, d_sae)``, main and AuxK latents
            together; duplicates within a row are summed. Converted to int64 if needed.
        grad_pre: ``[B, k']`` gradient of the loss with respect to ``pre[b, indices[b, j]]``.
        W_enc: ``[d_in, d_sae]``, any strides (fastest as the ``.T`` of a ``[d_sae, d_in]``
            buffer when ``need_grad_x``).
        need_grad_x: also compute ``grad_x``.
        csr: ``csr_by_latent(indices, d_sae)`` when the caller has it (the step's shared
            layout, :mod:`fastsae.ops._csr`); built here otherwise.

    Returns:
        ``(grad_W_enc [d_in, d_sae], grad_b_enc [d_sae], grad_x [B, d_in] or None)``.
        ``grad_W_enc`` is the ``.T`` view of a contiguous latent-major ``[d_sae, d_in]`` buffer;
        ``grad_W_enc`` and ``grad_b_enc`` have ``W_enc``'s dtype, ``grad_x`` has ``x``'s.
        Accumulated in fp32, deterministic (no atomics). Not differentiable (it is a backward).
    """
    indices = indices.long()
    layout = () if csr is None else tuple(csr)
    grad_W_latent_major, grad_b_enc = _grad_weights_op(x, indices, grad_pre, W_enc, *layout)
    grad_x = _grad_x_op(x, indices, grad_pre, W_enc) if need_grad_x else None
    return grad_W_latent_major.T, grad_b_enc, grad_x
