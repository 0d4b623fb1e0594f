"""The SAE architectures. Each one is a thin layer of math over :class:`fastsae.sae.SAE`.

===========================  ===============================================  ======================
class                        codes                                            loss (besides MSE)
===========================  ===============================================  ======================
:class:`TopKSAE`             ``relu`` of the k largest pre-activations        AuxK on dead latents
:class:`BatchTopKSAE`        the ``k * B`` largest of the batch (training);   AuxK on dead latents
                             a learned threshold (eval)
:class:`MatryoshkaBatchTopKSAE`  as BatchTopK                                 + MSE of each prefix
:class:`JumpReLUSAE`         ``pre * 1[pre > threshold]``                     L0 (step STE) / tanh
:class:`ReLUSAE`             ``relu(pre)``                                    L1 x decoder norm
:class:`GatedSAE`            ``1[gate > 0] * relu(magnitude)``                L1 on gate + aux
===========================  ===============================================  ======================

Every class is also a transcoder (``d_out != d_in``) and a skip-transcoder (``skip_connection``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from fastsae import ops
from fastsae import reference as ref
from fastsae.sae import SAE, LossOutput, SAEOutput

__all__ = [
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaBatchTopKSAE",
    "ReLUSAE",
    "TopKSAE",
    "sae_class",
]


def _auxk_term(
    sae: SAE,
    aux_values: Tensor | None,
    aux_indices: Tensor | None,
    y: Tensor,
    recon: Tensor,
    dead_mask: Tensor | None,
    k_aux: int,
) -> Tensor:
    """AuxK (Gao et al. 2024) from sparse candidates: decode them without bias and fit the
    detached residual ``y - recon``; scaled by ``min(n_dead / k_aux, 1)`` as in SAELens.

    The scale stays on the device (no host sync: the triton backend's step is sync-free). With no
    dead latent it is exactly 0, and the candidates, zero-valued padding then, add nothing. The
    residual is formed only when there are candidates (one ``[B, d]`` pass saved otherwise).
    """
    if aux_values is None or dead_mask is None:
        return recon.new_zeros(())
    zero_bias = torch.zeros_like(sae.b_dec)
    aux_recon = ops.sparse_decode(aux_values, aux_indices, sae.W_dec, zero_bias)
    mse = ref.mse(aux_recon, (y - recon).detach())
    # float64 division, then the loss dtype: the rounding of the Python min(n_dead / k_aux, 1).
    return (dead_mask.sum().double() / k_aux).clamp(max=1.0).to(mse.dtype) * mse


def _encode_jumprelu_adaptive(sae: SAE, x: Tensor, threshold: Tensor, b_dec: Tensor | None):
    """:func:`fastsae.ops.encode_jumprelu` with its first-guess width taken from the widest row
    of the previous call (+25%), so that steady-state calls select each row once."""
    k_cap = getattr(sae, "_k_cap_hint", 64)
    values, indices = ops.encode_jumprelu(
        x, sae.W_enc, sae.b_enc, threshold, b_dec=b_dec, k_cap=k_cap
    )
    sae._k_cap_hint = max(8, values.shape[-1] * 5 // 4)
    return values, indices


def _default_k_aux(sae: SAE, k_aux: float | None) -> int:
    # Gao et al. 2024 suggest d/2 auxiliary latents; SAELens uses d_in // 2.
    return int(k_aux) if k_aux is not None else max(1, sae.d_out // 2)


class TopKSAE(SAE):
    """TopK SAE (Gao et al. 2024): exactly ``k`` latents per token, chosen by pre-activation.

    Example::

        sae = TopKSAE(d_in=768, d_sae=16384, k=32)
        values, indices = sae.encode_sparse(x)      # [..., 32] each
    """

    architecture = "topk"
    default_coefficients: ClassVar[dict] = {"aux_coeff": 1 / 32, "k_aux": None}

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [..., d_in]`` -> ``(values, indices)``, both ``[..., k]``, values sorted descending."""
        x2, lead = self._flatten(x, self.d_in)
        enc = ops.encode_topk(x2, self.W_enc, self.b_enc, self.cfg.k, b_dec=self._encoder_input(x2))
        k = self.cfg.k
        return enc.values.reshape(*lead, k), enc.indices.reshape(*lead, k)

    def _encode_2d(self, x: Tensor) -> Tensor:
        enc = ops.encode_topk(x, self.W_enc, self.b_enc, self.cfg.k, b_dec=self._encoder_input(x))
        return ref.sparse_to_dense(enc.values, enc.indices, self.d_sae)

    def _forward_2d(self, x: Tensor, *, dead_mask: Tensor | None, k_aux: int) -> SAEOutput:
        enc = ops.encode_topk(
            x,
            self.W_enc,
            self.b_enc,
            self.cfg.k,
            b_dec=self._encoder_input(x),
            dead_mask=dead_mask,
            k_aux=k_aux,
        )
        recon = self._add_skip(
            ops.sparse_decode(enc.values, enc.indices, self.W_dec, self.b_dec), x
        )
        return SAEOutput(
            recon=recon,
            values=enc.values,
            indices=enc.indices,
            aux_values=enc.aux_values,
            aux_indices=enc.aux_indices,
        )

    def _loss_2d(self, x, y, *, dead_mask, coeffs) -> LossOutput:
        k_aux = _default_k_aux(self, coeffs["k_aux"])
        out = self._forward_2d(x, dead_mask=dead_mask, k_aux=k_aux if dead_mask is not None else 0)
        mse = ref.mse(out.recon, y)
        aux = _auxk_term(self, out.aux_values, out.aux_indices, y, out.recon, dead_mask, k_aux)
        terms = {"mse": mse, "auxk": coeffs["aux_coeff"] * aux}
        return LossOutput(loss=mse + terms["auxk"], terms=terms, output=out)


class BatchTopKSAE(SAE):
    """BatchTopK SAE (Bussmann et al. 2024): ``k`` active latents per token *on average*.

    In training mode the ``round(k * B)`` largest activations of the batch are kept
    (:func:`fastsae.ops.encode_batch_topk`: sparse, with a sparse backward). In eval mode
    (``sae.eval()``) each latent fires when its pre-activation exceeds the learned scalar
    ``topk_threshold``, which :meth:`update_threshold` tracks as an EMA of the smallest kept
    activation. Saved for SAELens as a ``jumprelu`` SAE with that threshold, as SAELens does.
    """

    architecture = "batchtopk"
    default_coefficients: ClassVar[dict] = {"aux_coeff": 1 / 32, "k_aux": None}

    def _init_extra(self) -> None:
        # float64: an EMA in bf16/fp32 of values near 1e-2 drifts (SAELens keeps it in double too).
        self.register_buffer("topk_threshold", torch.zeros((), dtype=torch.float64))

    def _threshold(self, dtype: torch.dtype) -> Tensor:
        return self.topk_threshold.to(dtype).expand(self.d_sae)

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(values, indices)`` padded to the busiest row's count: ``[..., w]`` each."""
        x2, lead = self._flatten(x, self.d_in)
        b_dec = self._encoder_input(x2)
        if self.training:
            enc = ops.encode_batch_topk(x2, self.W_enc, self.b_enc, self.cfg.k, b_dec=b_dec)
            values, indices = enc.values, enc.indices
        else:
            values, indices = _encode_jumprelu_adaptive(self, x2, self._threshold(x2.dtype), b_dec)
        return values.reshape(*lead, -1), indices.reshape(*lead, -1)

    def _encode_2d(self, x: Tensor) -> Tensor:
        if self.training:
            out = self._forward_2d(x, dead_mask=None, k_aux=0)
            return ref.sparse_to_dense(out.values, out.indices, self.d_sae)
        return self._forward_2d(x, dead_mask=None, k_aux=0).codes

    def _forward_2d(self, x: Tensor, *, dead_mask: Tensor | None, k_aux: int) -> SAEOutput:
        b_dec = self._encoder_input(x)
        if not self.training:
            pre = self._pre(x)
            codes = torch.relu(
                ops.jumprelu(pre, self._threshold(pre.dtype), self.cfg.jumprelu_bandwidth)
            )
            recon = self._add_skip(ops.dense_decode(codes, self.W_dec, self.b_dec), x)
            return SAEOutput(recon=recon, codes=codes, pre=pre)
        enc = ops.encode_batch_topk(
            x, self.W_enc, self.b_enc, self.cfg.k, b_dec=b_dec, dead_mask=dead_mask, k_aux=k_aux
        )
        recon = self._add_skip(
            ops.sparse_decode(enc.values, enc.indices, self.W_dec, self.b_dec), x
        )
        return SAEOutput(
            recon=recon,
            values=enc.values,
            indices=enc.indices,
            aux_values=enc.aux_values,
            aux_indices=enc.aux_indices,
        )

    def _loss_2d(self, x, y, *, dead_mask, coeffs) -> LossOutput:
        k_aux = _default_k_aux(self, coeffs["k_aux"])
        out = self._forward_2d(x, dead_mask=dead_mask, k_aux=k_aux if dead_mask is not None else 0)
        mse = ref.mse(out.recon, y)
        if out.pre is not None:  # eval mode: dense pre-activations are at hand
            out.aux_values, out.aux_indices = self._aux_from_dense(out.pre, dead_mask, k_aux)
        aux = _auxk_term(self, out.aux_values, out.aux_indices, y, out.recon, dead_mask, k_aux)
        terms = {"mse": mse, "auxk": coeffs["aux_coeff"] * aux}
        terms.update(self._extra_terms(x, y, out))
        return LossOutput(loss=sum(terms.values()), terms=terms, output=out)

    def _aux_from_dense(self, pre: Tensor, dead_mask: Tensor | None, k_aux: int):
        """The top ``min(k_aux, d_sae)`` dead latents per row, a fixed width (no host sync):
        slots past the dead count hold live latents with value 0 (padding)."""
        if dead_mask is None:
            return None, None
        masked = torch.where(dead_mask, pre, torch.full_like(pre, float("-inf")))
        _, idx = ref.topk(masked.detach(), min(k_aux, self.d_sae))
        values = torch.relu(pre.gather(-1, idx))
        return torch.where(dead_mask[idx], values, torch.zeros_like(values)), idx

    def _extra_terms(self, x: Tensor, y: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        return {}

    @torch.no_grad()
    def update_threshold(self, codes: Tensor, lr: float = 0.01) -> None:
        """EMA update of ``topk_threshold`` towards the smallest positive activation in ``codes``
        (dense codes, or the ``values`` of sparse ones)."""
        positive = codes[codes > 0]
        if positive.numel():
            self.threshold_step(positive.min().to(torch.float64), lr)

    @torch.no_grad()
    def threshold_step(self, smallest: Tensor, lr: float) -> None:
        """One EMA step of ``topk_threshold`` towards ``smallest`` (a scalar tensor: the batch's
        smallest kept activation; a data-parallel trainer passes the minimum over ranks)."""
        smallest = smallest.to(self.topk_threshold.device, torch.float64)
        if not bool(self.topk_threshold > 0):
            # The first update starts the EMA at the observed value: an EMA from zero needs
            # ~1/lr steps to come near it, and eval mode fires almost everything until then.
            self.topk_threshold.copy_(smallest)
        else:
            self.topk_threshold.mul_(1 - lr).add_(lr * smallest)


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): BatchTopK whose latent
    prefixes ``[:w]`` for each ``w`` in ``matryoshka_widths`` must also reconstruct the input.
    The loss adds the MSE of every inner prefix to the full one."""

    architecture = "matryoshka_batchtopk"

    def _extra_terms(self, x: Tensor, y: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        terms = {}
        for width in self.cfg.matryoshka_widths[:-1]:
            if out.codes is not None:
                partial = ops.dense_decode(out.codes[:, :width], self.W_dec[:width], self.b_dec)
            else:  # keep only the latents of the prefix; the rest become zero-valued padding
                inside = out.values * (out.indices < width)
                partial = ops.sparse_decode(inside, out.indices, self.W_dec, self.b_dec)
            terms[f"mse_prefix_{width}"] = ref.mse(self._add_skip(partial, x), y)
        return terms


class JumpReLUSAE(SAE):
    """JumpReLU SAE (Rajamanoharan et al. 2024): ``codes = pre * 1[pre > threshold]``.

    ``threshold [d_sae]`` is trained through the rectangle-kernel straight-through estimator of
    bandwidth ``cfg.jumprelu_bandwidth``. The sparsity penalty is the STE-trained L0 (``l0_coeff``)
    and, optionally, the tanh proxy (``l0_tanh_coeff``).
    """

    architecture = "jumprelu"
    default_coefficients: ClassVar[dict] = {"l0_coeff": 1.0, "l0_tanh_coeff": 0.0, "tanh_c": 4.0}

    def _init_extra(self) -> None:
        self.threshold = nn.Parameter(
            torch.full((self.d_sae,), self.cfg.jumprelu_init_threshold, dtype=self.cfg.torch_dtype)
        )

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Inference: ``(values, indices)`` padded to the busiest row's count, ``[..., w]`` each,
        from :func:`fastsae.ops.encode_jumprelu` (no gradient; training uses the dense STE path,
        which needs the pre-activations near the threshold)."""
        x2, lead = self._flatten(x, self.d_in)
        values, indices = _encode_jumprelu_adaptive(
            self, x2, self.threshold.detach(), self._encoder_input(x2)
        )
        return values.reshape(*lead, -1), indices.reshape(*lead, -1)

    def _codes(self, pre: Tensor) -> Tensor:
        # The outer relu matches SAELens (relu(pre) * 1[pre > threshold]) for a negative threshold.
        return torch.relu(ops.jumprelu(pre, self.threshold, self.cfg.jumprelu_bandwidth))

    def _encode_2d(self, x: Tensor) -> Tensor:
        return self._codes(self._pre(x))

    def _forward_2d(self, x: Tensor, *, dead_mask: Tensor | None, k_aux: int) -> SAEOutput:
        pre = self._pre(x)
        codes = self._codes(pre)
        recon = self._add_skip(ops.dense_decode(codes, self.W_dec, self.b_dec), x)
        return SAEOutput(recon=recon, codes=codes, pre=pre)

    def _loss_2d(self, x, y, *, dead_mask, coeffs) -> LossOutput:
        out = self._forward_2d(x, dead_mask=dead_mask, k_aux=0)
        mse = ref.mse(out.recon, y)
        terms = {"mse": mse}
        terms["l0"] = coeffs["l0_coeff"] * ref.l0_step(
            out.pre, self.threshold, self.cfg.jumprelu_bandwidth
        )
        if coeffs["l0_tanh_coeff"]:
            terms["l0_tanh"] = coeffs["l0_tanh_coeff"] * ref.l0_tanh(
                out.codes, self.W_dec, coeffs["tanh_c"]
            )
        return LossOutput(loss=sum(terms.values()), terms=terms, output=out)


class ReLUSAE(SAE):
    """ReLU SAE with an L1 penalty weighted by decoder norms (SAELens's ``standard``)."""

    architecture = "relu"
    default_coefficients: ClassVar[dict] = {"l1_coeff": 1.0}

    def _encode_2d(self, x: Tensor) -> Tensor:
        return torch.relu(self._pre(x))

    def _forward_2d(self, x: Tensor, *, dead_mask: Tensor | None, k_aux: int) -> SAEOutput:
        codes = self._encode_2d(x)
        recon = self._add_skip(ops.dense_decode(codes, self.W_dec, self.b_dec), x)
        return SAEOutput(recon=recon, codes=codes)

    def _loss_2d(self, x, y, *, dead_mask, coeffs) -> LossOutput:
        out = self._forward_2d(x, dead_mask=dead_mask, k_aux=0)
        mse = ref.mse(out.recon, y)
        terms = {"mse": mse, "l1": coeffs["l1_coeff"] * ref.l1_loss(out.codes, self.W_dec)}
        return LossOutput(loss=sum(terms.values()), terms=terms, output=out)


class GatedSAE(SAE):
    """Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

    ``gate = (x - b_dec) @ W_enc + b_gate``; ``magnitude = ((x - b_dec) @ W_enc) * exp(r_mag) + b_mag``;
    ``codes = 1[gate > 0] * relu(magnitude)``. Parameters ``b_gate``, ``b_mag``, ``r_mag`` are
    ``[d_sae]``; there is no ``b_enc``. Loss: MSE + ``l1_coeff`` * L1(relu(gate)) weighted by
    decoder norms + the auxiliary reconstruction from ``relu(gate)`` through the frozen decoder.
    """

    architecture = "gated"
    has_b_enc = False
    default_coefficients: ClassVar[dict] = {"l1_coeff": 1.0}

    def _init_extra(self) -> None:
        dtype = self.cfg.torch_dtype
        self.b_gate = nn.Parameter(torch.zeros(self.d_sae, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae, dtype=dtype))
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae, dtype=dtype))

    def _gate_and_magnitude(self, x: Tensor) -> tuple[Tensor, Tensor]:
        base = ops.pre_activations(
            x, self.W_enc, torch.zeros_like(self.b_gate), self._encoder_input(x)
        )
        return base + self.b_gate, base * self.r_mag.exp() + self.b_mag

    def _encode_2d(self, x: Tensor) -> Tensor:
        gate, mag = self._gate_and_magnitude(x)
        return (gate > 0).to(mag.dtype) * torch.relu(mag)

    def _forward_2d(self, x: Tensor, *, dead_mask: Tensor | None, k_aux: int) -> SAEOutput:
        gate, mag = self._gate_and_magnitude(x)
        codes = (gate > 0).to(mag.dtype) * torch.relu(mag)
        recon = self._add_skip(ops.dense_decode(codes, self.W_dec, self.b_dec), x)
        return SAEOutput(recon=recon, codes=codes, pre=gate)

    def _loss_2d(self, x, y, *, dead_mask, coeffs) -> LossOutput:
        out = self._forward_2d(x, dead_mask=dead_mask, k_aux=0)
        mse = ref.mse(out.recon, y)
        gate_acts = torch.relu(out.pre)
        via_gate = ops.dense_decode(gate_acts, self.W_dec.detach(), self.b_dec.detach())
        if self.W_skip is not None:
            via_gate = via_gate + x @ self.W_skip.detach().T
        terms = {
            "mse": mse,
            "l1": coeffs["l1_coeff"] * ref.l1_loss(gate_acts, self.W_dec),
            "gate_aux": ref.mse(via_gate, y),
        }
        return LossOutput(loss=sum(terms.values()), terms=terms, output=out)


_CLASSES: dict[str, type[SAE]] = {
    cls.architecture: cls
    for cls in (TopKSAE, BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReLUSAE, ReLUSAE, GatedSAE)
}


def sae_class(architecture: str) -> type[SAE]:
    """The class for a fastsae architecture name."""
    if architecture not in _CLASSES:
        raise ValueError(
            f"architecture={architecture!r} is unknown; allowed: {', '.join(_CLASSES)}"
        )
    return _CLASSES[architecture]
