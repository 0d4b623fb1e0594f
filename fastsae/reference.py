"""Reference implementations: the oracles every fastsae kernel is tested against.

Everything here is plain, readable PyTorch that is correct in float64. Nothing here is fast:
dense ``[B, d_sae]`` tensors are formed freely. Tests, hypothesis properties and benchmarks
import this module; the ``reference`` backend of :mod:`fastsae.ops` calls it directly.

Notation: ``B`` tokens (any leading batch shape ``...`` is allowed where noted), ``d_in`` input
width, ``d_out`` output width (``= d_in`` for an SAE, different for a transcoder), ``n = d_sae``
latents, ``k`` active latents per token.

Tie rule for every top-k selection in fastsae
----------------------------------------------
Latents are ranked by their **pre-activation** (before the ReLU), largest first; among equal
pre-activations the **lower latent index wins**. The returned ``values`` are
``relu(pre[indices])``, sorted in descending order, so a row with fewer than ``k`` positive
pre-activations carries zeros at its tail (their indices are still the next-best latents by the
same rule). Zero values contribute nothing to a decode, so every correct kernel produces the
same reconstruction even where it breaks ties differently; tests therefore compare sorted values,
``relu(pre).gather(indices) == values`` and decoded outputs, never raw index order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "pre_activations",
    "relu",
    "topk",
    "topk_dense",
    "batch_topk",
    "jumprelu",
    "step",
    "dense_decode",
    "sparse_decode",
    "sparse_to_dense",
    "sparse_encoder_backward",
    "mse",
    "fvu",
    "auxk_loss",
    "l1_loss",
    "l0",
    "l0_step",
    "l0_tanh",
    "rectangle",
]


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


def pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """Encoder pre-activations ``(x - b_dec) @ W_enc + b_enc``.

    Args:
        x: ``[..., d_in]`` activations.
        W_enc: ``[d_in, d_sae]``.
        b_enc: ``[d_sae]``.
        b_dec: ``[d_in]`` or ``None``. When given it is subtracted from ``x`` first, as SAELens does
            with ``apply_b_dec_to_input=True``. (For a transcoder ``b_dec`` has width ``d_out``
            and is never subtracted; callers pass ``None``.)

    Returns:
        ``[..., d_sae]``, differentiable in every argument.
    """
    if b_dec is not None:
        x = x - b_dec
    return x @ W_enc + b_enc


def relu(pre: Tensor) -> Tensor:
    """Elementwise ``max(pre, 0)``. ``[...]`` -> ``[...]``."""
    return torch.relu(pre)


def topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k latents per row with the tie rule in the module docstring.

    Args:
        pre: ``[..., d_sae]`` pre-activations.
        k: number of latents to keep per row, ``1 <= k <= d_sae``.

    Returns:
        ``(values, indices)``, both ``[..., k]``: ``values = relu(pre[indices])`` sorted in
        descending order, ``indices`` int64. ``values`` is differentiable in ``pre``.
    """
    if not 1 <= k <= pre.shape[-1]:
        raise ValueError(f"k={k} must be in [1, d_sae={pre.shape[-1]}]")
    # A stable descending sort keeps equal pre-activations in index order: lower index first.
    _, order = torch.sort(pre.detach(), dim=-1, descending=True, stable=True)
    indices = order[..., :k]
    values = torch.relu(pre.gather(-1, indices))
    return values, indices


def sparse_to_dense(values: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    """Scatter sparse codes into a dense ``[..., d_sae]`` tensor (duplicates are summed).

    Args:
        values: ``[..., k]``.
        indices: ``[..., k]`` int, each in ``[0, d_sae)``.
        d_sae: width of the dense result.
    """
    dense = values.new_zeros(*values.shape[:-1], d_sae)
    return dense.scatter_add(-1, indices, values)


def topk_dense(pre: Tensor, k: int) -> Tensor:
    """TopK activation as a dense ``[..., d_sae]`` code (zeros outside the top k)."""
    values, indices = topk(pre, k)
    return sparse_to_dense(values, indices, pre.shape[-1])


def batch_topk(pre: Tensor, k: int | float) -> Tensor:
    """BatchTopK: keep the ``round(k * B)`` largest post-ReLU activations of the whole batch.

    Bussmann et al. 2024 ("BatchTopK Sparse Autoencoders"); SAELens's ``batchtopk``. Rows may keep
    more or fewer than ``k`` latents; only the batch average is ``k``. Ties: lower flat index
    (row-major over ``[B, d_sae]``) wins.

    Args:
        pre: ``[B, d_sae]`` pre-activations (leading dims are flattened into ``B``).
        k: average active latents per row, ``0 < k <= d_sae``.

    Returns:
        ``[B, d_sae]`` dense codes, differentiable in ``pre``.
    """
    acts = torch.relu(pre)
    flat = acts.reshape(-1)
    n_keep = int(round(k * acts[..., 0].numel()))
    n_keep = max(1, min(n_keep, flat.numel()))
    _, order = torch.sort(flat.detach(), descending=True, stable=True)
    keep = order[:n_keep]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[keep] = True
    return (flat * mask).reshape(acts.shape)


# ---------------------------------------------------------------------------------------------
# JumpReLU and its straight-through estimators (Rajamanoharan et al. 2024, "Jumping Ahead")
# ---------------------------------------------------------------------------------------------


def rectangle(x: Tensor) -> Tensor:
    """Rectangle kernel ``K(x) = 1[-1/2 < x < 1/2]``, used as the STE's pseudo-derivative."""
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """``pre * 1[pre > threshold]`` with the rectangle-kernel STE for ``threshold``.

    d/d pre       = 1[pre > threshold]                       (exact away from the jump)
    d/d threshold = -(threshold / bandwidth) * K((pre - threshold) / bandwidth), summed over rows
    """

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = grad_out * (pre > threshold).to(pre.dtype)
        pseudo = -(threshold / bw) * rectangle((pre - threshold) / bw) * grad_out
        grad_threshold = pseudo.reshape(-1, pre.shape[-1]).sum(0)
        return grad_pre, grad_threshold, None


class _StepFn(torch.autograd.Function):
    """Heaviside ``1[pre > threshold]`` with the rectangle-kernel STE for ``threshold``.

    d/d pre       = 0 (the step is flat almost everywhere; the STE routes the signal to threshold)
    d/d threshold = -(1 / bandwidth) * K((pre - threshold) / bandwidth), summed over rows
    """

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        pseudo = -(1.0 / bw) * rectangle((pre - threshold) / bw) * grad_out
        grad_threshold = pseudo.reshape(-1, pre.shape[-1]).sum(0)
        return torch.zeros_like(pre), grad_threshold, None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float = 0.001) -> Tensor:
    """JumpReLU ``pre * 1[pre > threshold]`` with a straight-through estimator.

    Args:
        pre: ``[..., d_sae]`` pre-activations.
        threshold: ``[d_sae]``, non-negative.
        bandwidth: width ``eps`` of the rectangle kernel of the STE.

    Returns:
        ``[..., d_sae]``. Gradients: exact for ``pre``; the STE for ``threshold``.
    """
    return _JumpReLUFn.apply(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: float = 0.001) -> Tensor:
    """Heaviside ``1[pre > threshold]`` with the rectangle-kernel STE for ``threshold``."""
    return _StepFn.apply(pre, threshold, bandwidth)


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------


def dense_decode(codes: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """``codes @ W_dec + b_dec``: ``[..., d_sae]`` x ``[d_sae, d_out]`` -> ``[..., d_out]``."""
    return codes @ W_dec + b_dec


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """``out[b] = sum_j values[b, j] * W_dec[indices[b, j]] + b_dec``.

    Args:
        values: ``[..., k]``.
        indices: ``[..., k]`` int in ``[0, d_sae)``; duplicates within a row are summed.
        W_dec: ``[d_sae, d_out]``.
        b_dec: ``[d_out]``.

    Returns:
        ``[..., d_out]``, differentiable in ``values``, ``W_dec`` and ``b_dec``.
    """
    rows = W_dec[indices]  # [..., k, d_out]
    return (values.unsqueeze(-1) * rows).sum(-2) + b_dec


def sparse_encoder_backward(
    x: Tensor,
    indices: Tensor,
    grad_pre: Tensor,
    W_enc: Tensor,
    *,
    need_grad_x: bool = False,
    bf16_operands: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Encoder gradients from a sparse gradient of the pre-activations.

    With ``G = sparse_to_dense(grad_pre, indices, d_sae)`` (duplicates summed) and
    ``pre = x @ W_enc + b_enc``:

    - ``grad_W_enc = x.T @ G``, i.e. ``grad_W_enc[:, i] = sum_{(b, j): indices[b, j] = i} x[b] * grad_pre[b, j]``
    - ``grad_b_enc = G.sum(0)``
    - ``grad_x = G @ W_enc.T`` (only when ``need_grad_x``)

    Args:
        x: ``[B, d_in]`` the encoder input (already minus ``b_dec`` where that applies).
        indices: ``[B, k']`` int latent ids (main and AuxK latents together; duplicates allowed).
        grad_pre: ``[B, k']`` gradient of the loss with respect to ``pre[b, indices[b, j]]``.
        W_enc: ``[d_in, d_sae]``.
        bf16_operands: a hint that the forward ran under bf16 autocast: a backend may then read
            the operands in bf16 (accumulating in fp32). The oracle ignores it.

    Returns:
        ``(grad_W_enc [d_in, d_sae], grad_b_enc [d_sae], grad_x [B, d_in] or None)``, in the
        inputs' dtype.
    """
    del bf16_operands  # the oracle computes in the inputs' precision
    G = sparse_to_dense(grad_pre, indices, W_enc.shape[1])
    grad_x = G @ W_enc.T if need_grad_x else None
    return x.T @ G, G.sum(0), grad_x


# ---------------------------------------------------------------------------------------------
# Losses and metrics. Reconstruction losses sum over the feature dimension and average over
# tokens, as SAELens does, so their scale does not depend on the batch size.
# ---------------------------------------------------------------------------------------------


def mse(recon: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over features, averaged over tokens: ``mean_b ||recon_b - target_b||^2``.

    ``mse_loss`` fuses the difference and the square, and its backward is one kernel (the
    ``(recon - target).pow(2)`` it replaced cost ~7 ms of backward at B=4096, d=768 on CPU)."""
    tokens = recon.numel() // max(recon.shape[-1], 1)
    return F.mse_loss(recon, target, reduction="sum") / tokens


def fvu(recon: Tensor, target: Tensor) -> Tensor:
    """Fraction of variance unexplained: ``sum ||recon - target||^2 / sum ||target - mean(target)||^2``.

    The mean is over the tokens of this batch (leading dims flattened). ``1 - fvu`` is the
    explained variance.
    """
    target = target.reshape(-1, target.shape[-1])
    recon = recon.reshape(-1, recon.shape[-1])
    total = (target - target.mean(0)).pow(2).sum()
    return (recon - target).pow(2).sum() / total


def auxk_loss(
    pre: Tensor,
    dead_mask: Tensor,
    k_aux: int,
    W_dec: Tensor,
    residual: Tensor,
) -> Tensor:
    """AuxK loss on dead latents (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    The ``k_aux`` largest pre-activations among dead latents (same tie rule as :func:`topk`) are
    ReLU'd and decoded without bias; the loss is their squared error against the main
    reconstruction's residual, which is treated as a constant. As in SAELens, the loss is scaled
    by ``min(n_dead / k_aux, 1)`` and ``k_aux`` is capped at the number of dead latents.

    Args:
        pre: ``[B, d_sae]`` pre-activations.
        dead_mask: ``[d_sae]`` bool, True for dead latents.
        k_aux: number of dead latents to use per row.
        W_dec: ``[d_sae, d_out]``.
        residual: ``[B, d_out]`` = target - main reconstruction (detached here).

    Returns:
        Scalar; zero (with a graph) when no latent is dead. Differentiable in ``pre`` and ``W_dec``.
    """
    n_dead = int(dead_mask.sum())
    if n_dead == 0 or k_aux <= 0:
        return (pre.sum() + W_dec.sum()) * 0.0
    k = min(k_aux, n_dead)
    masked = torch.where(dead_mask, pre, torch.full_like(pre, float("-inf")))
    _, order = torch.sort(masked.detach(), dim=-1, descending=True, stable=True)
    indices = order[..., :k]
    values = torch.relu(pre.gather(-1, indices))
    recon = (values.unsqueeze(-1) * W_dec[indices]).sum(-2)
    scale = min(n_dead / k_aux, 1.0)
    return scale * mse(recon, residual.detach())


def l1_loss(codes: Tensor, W_dec: Tensor) -> Tensor:
    """L1 penalty weighted by decoder norms: ``mean_b sum_i |codes_bi| * ||W_dec_i||``."""
    return (codes.abs() * W_dec.norm(dim=-1)).sum(-1).mean()


def l0(codes: Tensor) -> Tensor:
    """Mean number of non-zero latents per token (a metric, not differentiable)."""
    return (codes != 0).to(codes.dtype).sum(-1).mean()


def l0_step(pre: Tensor, threshold: Tensor, bandwidth: float = 0.001) -> Tensor:
    """JumpReLU L0 penalty: ``mean_b sum_i step(pre_bi - threshold_i)`` with the STE gradient."""
    return step(pre, threshold, bandwidth).sum(-1).mean()


def l0_tanh(codes: Tensor, W_dec: Tensor, c: float = 4.0) -> Tensor:
    """Smooth L0 proxy ``mean_b sum_i tanh(c * |codes_bi| * ||W_dec_i||)`` (Anthropic, 2025)."""
    return torch.tanh(c * codes.abs() * W_dec.norm(dim=-1)).sum(-1).mean()
