"""Sparse decode ``out[b] = sum_j values[b, j] * W_dec[indices[b, j]] + b_dec`` and its backward.

Notation: ``B`` tokens, ``K`` active latents per token, ``N = d_sae``, ``D = d_out``.

- Forward: each program owns a ``BLOCK_B x BLOCK_D`` tile of ``out`` and gathers, for each of the
  ``K`` slots, one ``BLOCK_D`` chunk of a ``W_dec`` row per token. ``2*B*K*D`` FLOPs, ``B*K*D``
  gathered elements, no ``[B, N]`` tensor.
- ``grad_values[b, j] = <grad_out[b], W_dec[indices[b, j]]>``: a gather-dot over flat
  ``(b, j)`` pairs, looping over ``D``.
- ``grad_W_dec[i] = sum_{(b, j): indices[b, j] = i} values[b, j] * grad_out[b]``: entries grouped
  by latent (:mod:`fastsae.kernels.csr`), one program per (latent, d tile); deterministic, no
  atomics, no ``[B*K, D]`` temporary, unhit latents get exact zeros.
- ``grad_b_dec = grad_out.sum(0)`` in torch.

The forward kernel takes ``W`` with arbitrary strides, so the encoder backward reuses it for
``grad_x = sum_j grad_pre[b, j] * W_enc[:, indices[b, j]]`` by passing ``W_enc.T``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastsae.kernels._launch import (
    acc_dtype,
    check_float,
    check_index_range,
    check_same_device,
    launch,
    output,
)
from fastsae.kernels.csr import CSR, block_d, segment_reduce

__all__ = ["sparse_decode"]

# ---------------------------------------------------------------------------------------------
# Tuning constants. Heuristics, not measured on a GPU yet; the d tile is block_d(D) from
# fastsae.kernels.csr (128 for every real SAE width: coalesced 512-B row chunks).
# ---------------------------------------------------------------------------------------------

# Tokens per forward program. Each slot's 16 index/value loads are shared by the 16 x BLOCK_D
# tile, and B=8192, D=2304 still gives 512 x 18 = 9216 programs (70 per H100 SM). The fp32
# accumulator is 16 registers per thread at 4 warps, the gathered tile another 16.
FWD_BLOCK_B = 16
FWD_NUM_WARPS = 4
# Flat (token, slot) pairs per grad_values program. Pairs of one token sit side by side, so the
# grad_out rows they re-read hit L1/L2; the same 16 x 128 register budget as the forward.
BWD_BLOCK_P = 16
BWD_NUM_WARPS = 4


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sparse_decode_fwd_kernel(
    # pointers
    values_ptr,  # [B, K] coefficient of each (token, slot)
    indices_ptr,  # [B, K] int64 latent ids in [0, N)
    W_ptr,  # [N, D] gathered by row; any strides (W_dec, or W_enc.T for the encoder's grad_x)
    bias_ptr,  # [D] added to every row; read only if HAS_BIAS
    out_ptr,  # [B, D]
    # sizes
    B,
    K,
    D,
    # strides
    stride_vb,
    stride_vk,
    stride_ib,
    stride_ik,
    stride_wn,
    stride_wd,
    stride_bias,
    stride_ob,
    stride_od,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < B
    col_mask = cols < D

    # Slot j's ids and values are reached by stepping the pointers, never as j * stride: that
    # product is int32 and wraps once it passes 2^31 (a strided view, a transposed buffer).
    index_ptrs = indices_ptr + rows * stride_ib
    value_ptrs = values_ptr + rows * stride_vb
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC_DTYPE)
    for _ in range(K):
        latent = tl.load(index_ptrs, mask=row_mask, other=0)
        coef = tl.load(value_ptrs, mask=row_mask, other=0).to(ACC_DTYPE)
        index_ptrs += stride_ik
        value_ptrs += stride_vk
        # A zero value (ReLU'd tail of a top-k row) skips its row load entirely.
        w = tl.load(
            W_ptr + latent[:, None] * stride_wn + cols[None, :] * stride_wd,
            mask=(row_mask & (coef != 0))[:, None] & col_mask[None, :],
            other=0,
        )
        acc += coef[:, None] * w.to(ACC_DTYPE)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bias, mask=col_mask, other=0)
        acc += bias.to(ACC_DTYPE)[None, :]
    tl.store(
        out_ptr + rows[:, None] * stride_ob + cols[None, :] * stride_od,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _sparse_decode_bwd_kernel(
    # pointers
    grad_out_ptr,  # [B, D] upstream gradient
    indices_ptr,  # [B, K] int64 latent ids in [0, N)
    W_ptr,  # [N, D] W_dec, any strides
    grad_values_ptr,  # [B, K] output: <grad_out[b], W[indices[b, j]]>
    # sizes
    P,  # B * K flat (token, slot) pairs
    K,
    D,
    # strides
    stride_gb,
    stride_gd,
    stride_ib,
    stride_ik,
    stride_wn,
    stride_wd,
    stride_vb,
    stride_vk,
    # meta-parameters
    ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pair_mask = pairs < P
    row = pairs // K
    slot = pairs - row * K
    latent = tl.load(indices_ptr + row * stride_ib + slot * stride_ik, mask=pair_mask, other=0)

    # A 2-D accumulator, reduced once after the loop: no cross-thread reduction per d tile.
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        # int64: cols * stride_wd passes 2^31 for a d-major W_dec (strides (1, N)) once N * D
        # does, and cols * stride_gd for a column-major grad_out once B * D does.
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = pair_mask[:, None] & (cols < D)[None, :]
        g_offsets = row[:, None] * stride_gb + cols[None, :] * stride_gd
        w_offsets = latent[:, None] * stride_wn + cols[None, :] * stride_wd
        g = tl.load(grad_out_ptr + g_offsets, mask=mask, other=0)
        w = tl.load(W_ptr + w_offsets, mask=mask, other=0)
        acc += g.to(ACC_DTYPE) * w.to(ACC_DTYPE)
    tl.store(
        grad_values_ptr + row * stride_vb + slot * stride_vk,
        tl.sum(acc, axis=1).to(grad_values_ptr.dtype.element_ty),
        mask=pair_mask,
    )


# ---------------------------------------------------------------------------------------------
# Launchers: check shapes, allocate (or take a caller's ``out``, which tests poison with NaN),
# compute the grid. The *_plan helpers return (kernel, grid, kwargs) so that kernels/check.py
# compiles exactly what is launched.
# ---------------------------------------------------------------------------------------------


def _check_args(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> None:
    if values.dim() != 2 or indices.shape != values.shape:
        raise ValueError(
            f"values and indices must both be [B, k]; got {tuple(values.shape)} and "
            f"{tuple(indices.shape)}"
        )
    if indices.dtype != torch.int64:
        raise ValueError(f"indices must be int64, got {indices.dtype}")
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be [d_sae, d_out], got {tuple(W_dec.shape)}")
    if b_dec is not None and b_dec.shape != (W_dec.shape[1],):
        raise ValueError(f"b_dec must be [d_out={W_dec.shape[1]}], got {tuple(b_dec.shape)}")
    check_same_device(values, indices, W_dec, b_dec)
    check_float(values=values, W_dec=W_dec, b_dec=b_dec)


def _out_dtype(values: Tensor, W_dec: Tensor, b_dec: Tensor) -> torch.dtype:
    """The dtype ``values * W_dec[indices] + b_dec`` has in torch's own type promotion."""
    return torch.promote_types(torch.promote_types(values.dtype, W_dec.dtype), b_dec.dtype)


def _fwd_plan(values: Tensor, indices: Tensor, W: Tensor, bias: Tensor | None, out: Tensor):
    """``(kernel, grid, kwargs)``: ``out[b] = sum_j values[b, j] * W[indices[b, j]] (+ bias)``."""
    B, K = values.shape
    D = W.shape[1]
    bd = block_d(D)
    dtypes = (values.dtype, W.dtype, out.dtype) + (() if bias is None else (bias.dtype,))
    kwargs = dict(
        values_ptr=values,
        indices_ptr=indices,
        W_ptr=W,
        # Any valid pointer works when HAS_BIAS is off: the kernel never touches it.
        bias_ptr=W if bias is None else bias,
        out_ptr=out,
        B=B,
        K=K,
        D=D,
        stride_vb=values.stride(0),
        stride_vk=values.stride(1),
        stride_ib=indices.stride(0),
        stride_ik=indices.stride(1),
        stride_wn=W.stride(0),
        stride_wd=W.stride(1),
        stride_bias=1 if bias is None else bias.stride(0),
        stride_ob=out.stride(0),
        stride_od=out.stride(1),
        HAS_BIAS=bias is not None,
        ACC_DTYPE=acc_dtype(*dtypes),
        BLOCK_B=FWD_BLOCK_B,
        BLOCK_D=bd,
        num_warps=FWD_NUM_WARPS,
    )
    return _sparse_decode_fwd_kernel, (triton.cdiv(B, FWD_BLOCK_B), triton.cdiv(D, bd)), kwargs


def _bwd_plan(grad_out: Tensor, indices: Tensor, W: Tensor, grad_values: Tensor):
    """``(kernel, grid, kwargs)``: ``grad_values[b, j] = <grad_out[b], W[indices[b, j]]>``."""
    B, K = indices.shape
    D = W.shape[1]
    P = B * K
    kwargs = dict(
        grad_out_ptr=grad_out,
        indices_ptr=indices,
        W_ptr=W,
        grad_values_ptr=grad_values,
        P=P,
        K=K,
        D=D,
        stride_gb=grad_out.stride(0),
        stride_gd=grad_out.stride(1),
        stride_ib=indices.stride(0),
        stride_ik=indices.stride(1),
        stride_wn=W.stride(0),
        stride_wd=W.stride(1),
        stride_vb=grad_values.stride(0),
        stride_vk=grad_values.stride(1),
        ACC_DTYPE=acc_dtype(grad_out.dtype, W.dtype, grad_values.dtype),
        BLOCK_P=BWD_BLOCK_P,
        BLOCK_D=block_d(D),
        num_warps=BWD_NUM_WARPS,
    )
    return _sparse_decode_bwd_kernel, (triton.cdiv(P, BWD_BLOCK_P),), kwargs


def gather_rows(
    values: Tensor, indices: Tensor, W: Tensor, bias: Tensor | None, out: Tensor
) -> Tensor:
    """Launch the forward kernel into ``out [B, D]``: ``sum_j values[b, j] * W[indices[b, j]]``
    (+ ``bias``). ``W`` is any ``[N, D]`` strided view. Shared with the encoder's grad_x."""
    if out.numel() > 0:
        launch(_fwd_plan(values, indices, W, bias, out))
    return out


def _sparse_decode_fwd(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, *, out: Tensor | None = None
) -> Tensor:
    _check_args(values, indices, W_dec, b_dec)
    check_index_range(indices, W_dec.shape[0])
    shape = (values.shape[0], W_dec.shape[1])
    out = output(out, shape, values, _out_dtype(values, W_dec, b_dec))
    return gather_rows(values, indices, W_dec, b_dec, out)


def _sparse_decode_grad_values(
    grad_out: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, *, out: Tensor | None = None
) -> Tensor:
    _check_args(values, indices, W_dec, None)
    if grad_out.shape != (values.shape[0], W_dec.shape[1]):
        raise ValueError(f"grad_out must be [B, d_out], got {tuple(grad_out.shape)}")
    check_index_range(indices, W_dec.shape[0])
    out = output(out, tuple(values.shape), values, values.dtype)
    if out.numel() > 0:
        launch(_bwd_plan(grad_out, indices, W_dec, out))
    return out


def _sparse_decode_grad_W_dec(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    *,
    out: Tensor | None = None,
    csr: CSR | None = None,
) -> Tensor:
    _check_args(values, indices, W_dec, None)
    if grad_out.shape != (values.shape[0], W_dec.shape[1]):
        raise ValueError(f"grad_out must be [B, d_out], got {tuple(grad_out.shape)}")
    check_index_range(indices, W_dec.shape[0])
    out = output(out, tuple(W_dec.shape), W_dec, W_dec.dtype)
    segment_reduce(indices, values, grad_out, out, csr=csr)
    return out


# ---------------------------------------------------------------------------------------------
# Custom ops and autograd. torch.library.custom_op (not triton_op, which fails under the
# interpreter) keeps the launches opaque to torch.compile; the fake impls give it shapes.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastsae::sparse_decode", mutates_args=())
def _sparse_decode_op(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    return _sparse_decode_fwd(values, indices, W_dec, b_dec)


@_sparse_decode_op.register_fake
def _(values, indices, W_dec, b_dec):
    _check_args(values, indices, W_dec, b_dec)
    shape = (values.shape[0], W_dec.shape[1])
    return values.new_empty(shape, dtype=_out_dtype(values, W_dec, b_dec))


@torch.library.custom_op("fastsae::sparse_decode_grad_values", mutates_args=())
def _grad_values_op(grad_out: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    return _sparse_decode_grad_values(grad_out, values, indices, W_dec)


@_grad_values_op.register_fake
def _(grad_out, values, indices, W_dec):
    return torch.empty_like(values, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastsae::sparse_decode_grad_W_dec", mutates_args=())
def _grad_W_dec_op(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    csr_offsets: Tensor | None = None,
    csr_entries: Tensor | None = None,
    csr_rows: Tensor | None = None,
) -> Tensor:
    # The layout travels as three optional tensors: a custom op takes no tuple of tensors.
    csr = None if csr_offsets is None else CSR(csr_offsets, csr_entries, csr_rows)
    return _sparse_decode_grad_W_dec(grad_out, values, indices, W_dec, csr=csr)


@_grad_W_dec_op.register_fake
def _(grad_out, values, indices, W_dec, csr_offsets=None, csr_entries=None, csr_rows=None):
    return torch.empty_like(W_dec, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    values, indices, W_dec, b_dec = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.b_dec_dtype = b_dec.dtype


def _backward(ctx, grad_out):
    values, indices, W_dec = ctx.saved_tensors
    grad_values = grad_W_dec = grad_b_dec = None
    if ctx.needs_input_grad[0]:
        grad_values = _grad_values_op(grad_out, values, indices, W_dec)
    if ctx.needs_input_grad[2]:
        grad_W_dec = _grad_W_dec_op(grad_out, values, indices, W_dec)
    if ctx.needs_input_grad[3]:
        grad_b_dec = grad_out.sum(0).to(ctx.b_dec_dtype)
    return grad_values, None, grad_W_dec, grad_b_dec


_sparse_decode_op.register_autograd(_backward, setup_context=_setup_context)


class _SharedLayoutDecode(torch.autograd.Function):
    """The same op, with ``grad_W_dec`` over a layout the caller shares (built at most once per
    step for the decoder, the AuxK decoder and the encoder: :mod:`fastsae.ops._csr`). A Python
    function, because the layout is built lazily in the backward and is not a tensor input."""

    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec, csr):
        ctx.save_for_backward(values, indices, W_dec)
        ctx.b_dec_dtype, ctx.csr = b_dec.dtype, csr
        return _sparse_decode_op(values, indices, W_dec, b_dec)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W_dec = grad_b_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = _grad_values_op(grad_out, values, indices, W_dec)
        if ctx.needs_input_grad[2]:
            grad_W_dec = _grad_W_dec_op(grad_out, values, indices, W_dec, *ctx.csr())
        if ctx.needs_input_grad[3]:
            grad_b_dec = grad_out.sum(0).to(ctx.b_dec_dtype)
        return grad_values, None, grad_W_dec, grad_b_dec, None


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def sparse_decode(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    *,
    csr: Callable[[], CSR] | None = None,
) -> Tensor:
    """``out[b] = sum_j values[b, j] * W_dec[indices[b, j]] + b_dec`` with Triton kernels.

    Args:
        values: ``[..., k]`` float32, bfloat16 or float16 (float64 works too, slowly).
        indices: ``[..., k]`` integer latent ids in ``[0, d_sae)``; duplicates within a row are
            summed. Converted to int64 if needed. Checked off the GPU only (see
            :func:`fastsae.kernels._launch.check_index_range`).
        W_dec: ``[d_sae, d_out]``, any strides.
        b_dec: ``[d_out]``.
        csr: for 2-D ``indices``, a function returning their :class:`CSR` layout, called once
            in the backward instead of sorting the ids again (the step's shared layout,
            :mod:`fastsae.ops._csr`).

    Returns:
        ``[..., d_out]`` in the promoted dtype of the three float inputs, accumulated in fp32.
        Differentiable in ``values``, ``W_dec`` and ``b_dec``; the ``W_dec`` gradient is
        deterministic (no atomics). A zero value skips its row of ``W_dec`` in the forward, so a
        NaN in a row used only with weight 0 does not reach the output.
    """
    if values.shape != indices.shape or values.dim() < 1:
        raise ValueError(
            f"values and indices must have the same shape [..., k]; got {tuple(values.shape)} "
            f"and {tuple(indices.shape)}"
        )
    lead, k = values.shape[:-1], values.shape[-1]
    B = lead.numel()  # not reshape(-1, k): that is ambiguous when k == 0
    if csr is not None and values.dim() == 2 and indices.dtype == torch.int64:
        return _SharedLayoutDecode.apply(values, indices, W_dec, b_dec, csr)
    out = _sparse_decode_op(values.reshape(B, k), indices.reshape(B, k).long(), W_dec, b_dec)
    return out.reshape(*lead, W_dec.shape[-1])
