"""The base class shared by every fastsae architecture, and what its forward pass returns.

Parameter names and shapes follow SAELens: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, and, for skip-transcoders, ``W_skip [d_out, d_in]``.
All computation goes through :mod:`fastsae.ops`, which picks the backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastsae import ops
from fastsae import reference as ref
from fastsae.config import SAEConfig

__all__ = ["SAE", "SAEOutput", "LossOutput"]


@dataclass
class SAEOutput:
    """What :meth:`SAE.forward` returns. Leading dims ``...`` are those of the input.

    recon: ``[..., d_out]`` the reconstruction (or the transcoder's prediction).
    values, indices: ``[..., k]`` sparse codes for the top-k family, else ``None``.
    codes: ``[..., d_sae]`` dense codes where the architecture forms them, else ``None``.
    pre: ``[..., d_sae]`` dense pre-activations when the loss needs them (JumpReLU's L0, Gated's
        gate, BatchTopK's AuxK), else ``None``.
    aux_values, aux_indices: ``[..., k_aux]`` top pre-activations among dead latents (AuxK).
    """

    recon: Tensor
    values: Tensor | None = None
    indices: Tensor | None = None
    codes: Tensor | None = None
    pre: Tensor | None = None
    aux_values: Tensor | None = None
    aux_indices: Tensor | None = None

    def dense_codes(self, d_sae: int) -> Tensor:
        """``[..., d_sae]`` dense codes, scattering the sparse ones when needed."""
        if self.codes is not None:
            return self.codes
        return ref.sparse_to_dense(self.values, self.indices, d_sae)


@dataclass
class LossOutput:
    """What :meth:`SAE.loss` returns: the total, each weighted term, and the forward output."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    output: SAEOutput | None = None


class SAE(nn.Module):
    """Base class: one encoder, one decoder, an optional skip connection.

    Subclasses set :attr:`architecture`, create any extra parameters in :meth:`_init_extra`, and
    implement :meth:`_encode_2d` and :meth:`_forward_2d` on 2-D inputs; the base class handles
    leading dimensions, dtype casts, decoding and files.
    """

    architecture: ClassVar[str]
    #: Loss coefficients accepted by :meth:`loss`, with their defaults.
    default_coefficients: ClassVar[dict[str, float]] = {}

    def __init__(self, cfg: SAEConfig | None = None, **kwargs: Any):
        super().__init__()
        if cfg is None:
            cfg = SAEConfig(architecture=self.architecture, **kwargs)
        elif kwargs:
            raise TypeError(
                f"pass either cfg or keyword arguments, not both (got {sorted(kwargs)})"
            )
        if cfg.architecture != self.architecture:
            raise ValueError(
                f"{type(self).__name__} needs architecture={self.architecture!r}, got {cfg.architecture!r}"
            )
        self.cfg = cfg
        dtype = cfg.torch_dtype
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        # W_enc is [d_in, d_sae] (SAELens's name and shape) but stored latent-major: the transpose
        # view of a contiguous [d_sae, d_in] buffer. Each latent's encoder column is then
        # contiguous, which is what the sparse backward gathers and writes (grad_W_enc comes back
        # in this layout, so autograd does not copy it), and the encoder GEMM does not care.
        self.W_enc = nn.Parameter(torch.empty(d_sae, d_in, dtype=dtype).T)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype)) if self.has_b_enc else None
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_out, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, dtype=dtype))
        else:
            self.W_skip = None
        self._init_extra()
        self.reset_parameters()

    # -- construction ---------------------------------------------------------------------------

    has_b_enc: ClassVar[bool] = True

    def _init_extra(self) -> None:
        """Create architecture-specific parameters and buffers."""

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm decoder rows; ``W_enc = W_dec.T`` when shapes allow (Gao et al. 2024)."""
        d_in, d_sae, d_out = self.cfg.d_in, self.cfg.d_sae, self.cfg.d_out
        w = torch.randn(d_sae, d_out, generator=generator, dtype=torch.float32)
        w /= w.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(w)
        if d_out == d_in:
            self.W_enc.copy_(w.T)
        else:
            enc = torch.randn(d_in, d_sae, generator=generator) / math.sqrt(d_in)
            self.W_enc.copy_(enc)

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        parts = [f"d_in={self.d_in}", f"d_sae={self.d_sae}"]
        if self.d_out != self.d_in:
            parts.append(f"d_out={self.d_out}")
        if self.cfg.k is not None:
            parts.append(f"k={self.cfg.k}")
        if self.cfg.skip_connection:
            parts.append("skip_connection=True")
        return ", ".join(parts)

    # -- shape handling -------------------------------------------------------------------------

    def _flatten(self, x: Tensor, width: int, name: str = "x") -> tuple[Tensor, tuple[int, ...]]:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != width:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; its last dimension must be {width}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{name} has dtype {x.dtype}; a floating dtype is required")
        lead = tuple(x.shape[:-1])
        return x.reshape(-1, width).to(self.dtype), lead

    def _encoder_input(self, x: Tensor) -> Tensor | None:
        """``b_dec`` to subtract from the input, or None."""
        return self.b_dec if self.cfg.apply_b_dec_to_input else None

    def _pre(self, x: Tensor, b_enc: Tensor | None = None) -> Tensor:
        b_enc = self.b_enc if b_enc is None else b_enc
        return ops.pre_activations(x, self.W_enc, b_enc, self._encoder_input(x))

    def _add_skip(self, out: Tensor, x: Tensor) -> Tensor:
        if self.W_skip is not None:
            out = out + x @ self.W_skip.T
        return out

    # -- public API -----------------------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes, as SAELens's ``encode``: ``[..., d_in]`` -> ``[..., d_sae]``."""
        x2, lead = self._flatten(x, self.d_in)
        return self._encode_2d(x2).reshape(*lead, self.d_sae)

    def decode(self, codes: Tensor, x: Tensor | None = None) -> Tensor:
        """Dense decode ``codes @ W_dec + b_dec``: ``[..., d_sae]`` -> ``[..., d_out]``.

        A skip-transcoder also needs the input ``x [..., d_in]`` for its skip term.
        """
        c2, lead = self._flatten(codes, self.d_sae, "codes")
        out = ops.dense_decode(c2, self.W_dec, self.b_dec)
        out = self._maybe_skip(out, x, lead)
        return out.reshape(*lead, self.d_out)

    def decode_sparse(self, values: Tensor, indices: Tensor, x: Tensor | None = None) -> Tensor:
        """Sparse decode: ``values, indices [..., k]`` -> ``[..., d_out]``.

        ``values`` is floating point; ``indices`` is an integer tensor (not bool) with entries in
        ``[0, d_sae)``, on the SAE's device. The range check reads ``indices.min()`` and ``.max()``:
        one small reduction and, on a GPU, one host sync per call (skipped while
        ``torch.compile`` traces, where it would break the graph).

        Raises:
            TypeError: ``values`` / ``indices`` is not a tensor, or has the wrong kind of dtype.
            ValueError: different shapes, another device, or an index outside ``[0, d_sae)``.
        """
        for name, t in (("values", values), ("indices", indices)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if values.shape != indices.shape or values.ndim == 0:
            raise ValueError(
                f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must have the "
                "same shape [..., k]"
            )
        if not values.is_floating_point():
            raise TypeError(f"values has dtype {values.dtype}; a floating dtype is required")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices has dtype {indices.dtype}; an integer dtype is required")
        for name, t in (("values", values), ("indices", indices)):
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}; this SAE is on {self.device}")
        _check_index_range(indices, self.d_sae)
        lead = tuple(values.shape[:-1])
        k = values.shape[-1]
        out = ops.sparse_decode(
            values.reshape(-1, k).to(self.dtype),
            indices.reshape(-1, k).long(),
            self.W_dec,
            self.b_dec,
        )
        out = self._maybe_skip(out, x, lead)
        return out.reshape(*lead, self.d_out)

    def _maybe_skip(self, out: Tensor, x: Tensor | None, lead: tuple[int, ...]) -> Tensor:
        if self.W_skip is None:
            return out
        if x is None:
            raise ValueError("this SAE has a skip connection: pass the input x to decode")
        x2, x_lead = self._flatten(x, self.d_in)
        if x_lead != lead:
            raise ValueError(f"x has leading shape {x_lead}, codes have {lead}")
        return self._add_skip(out, x2)

    def forward(self, x: Tensor, *, dead_mask: Tensor | None = None, k_aux: int = 0) -> SAEOutput:
        """Encode and decode ``x [..., d_in]``; see :class:`SAEOutput`.

        ``dead_mask [d_sae]`` and ``k_aux`` request the AuxK candidates (top-k family only).
        """
        x2, lead = self._flatten(x, self.d_in)
        self._check_dead_mask(dead_mask)
        out = self._forward_2d(x2, dead_mask=dead_mask, k_aux=k_aux)
        return _unflatten(out, lead)

    def loss(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        dead_mask: Tensor | None = None,
        **coefficients: float,
    ) -> LossOutput:
        """Training loss on ``x [..., d_in]`` against target ``y [..., d_out]`` (default ``x``).

        Coefficients are keyword arguments; each architecture lists its own in
        :attr:`default_coefficients`. Returns the total and every weighted term (plus ``mse``).
        ``dead_mask``: ``[d_sae]`` bool on the SAE's device, True for latents AuxK may revive.

        Raises:
            TypeError: ``x`` / ``y`` / ``dead_mask`` has the wrong type or dtype.
            ValueError: a wrong shape or device, or an unknown coefficient.
        """
        unknown = sorted(set(coefficients) - set(self.default_coefficients))
        if unknown:
            raise ValueError(
                f"unknown loss coefficients for {type(self).__name__}: {', '.join(unknown)}; "
                f"allowed: {', '.join(self.default_coefficients) or 'none'}"
            )
        coeffs = {**self.default_coefficients, **coefficients}
        x2, lead = self._flatten(x, self.d_in)
        self._check_dead_mask(dead_mask)
        if y is None:
            if self.d_out != self.d_in:
                raise ValueError(
                    f"a transcoder (d_out={self.d_out} != d_in={self.d_in}) needs a target y"
                )
            y2 = x2
        else:
            y2, y_lead = self._flatten(y, self.d_out, "y")
            if y_lead != lead:
                raise ValueError(f"y has leading shape {y_lead}, x has {lead}")
        result = self._loss_2d(x2, y2, dead_mask=dead_mask, coeffs=coeffs)
        result.output = _unflatten(result.output, lead)
        return result

    def _check_dead_mask(self, dead_mask: Tensor | None) -> None:
        """``dead_mask`` is None or a bool ``[d_sae]`` tensor on the SAE's device (no data read)."""
        if dead_mask is None:
            return
        if not isinstance(dead_mask, Tensor):
            raise TypeError(f"dead_mask must be a torch.Tensor, got {type(dead_mask).__name__}")
        want = f"dead_mask must be a bool tensor of shape ({self.d_sae},)"
        if dead_mask.dtype != torch.bool:
            raise TypeError(f"{want}, got dtype {dead_mask.dtype}")
        if tuple(dead_mask.shape) != (self.d_sae,):
            raise ValueError(f"{want}, got shape {tuple(dead_mask.shape)}")
        if dead_mask.device != self.device:
            raise ValueError(f"dead_mask is on {dead_mask.device}; this SAE is on {self.device}")

    # -- subclass hooks -------------------------------------------------------------------------

    def _encode_2d(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _forward_2d(self, x: Tensor, *, dead_mask: Tensor | None, k_aux: int) -> SAEOutput:
        raise NotImplementedError

    def _loss_2d(
        self, x: Tensor, y: Tensor, *, dead_mask: Tensor | None, coeffs: dict
    ) -> LossOutput:
        raise NotImplementedError

    # -- files ----------------------------------------------------------------------------------

    def save(self, path: str | Path, *, sparsity: Tensor | None = None) -> Path:
        """Write SAELens v6 files (``cfg.json``, ``sae_weights.safetensors`` and, when
        ``sparsity [d_sae]`` (log10 firing density) is given, ``sparsity.safetensors``) atomically.
        """
        from fastsae.io import save_sae

        return save_sae(self, path, sparsity=sparsity)

    @classmethod
    def from_config(cls, cfg: SAEConfig | Mapping[str, Any]) -> SAE:
        """Build the right subclass for ``cfg`` (an :class:`SAEConfig` or its dict)."""
        from fastsae.architectures import sae_class

        if not isinstance(cfg, SAEConfig):
            cfg = SAEConfig.from_dict(dict(cfg))
        return sae_class(cfg.architecture)(cfg)


def _check_index_range(indices: Tensor, d_sae: int) -> None:
    """Every index in ``[0, d_sae)``: one ``aminmax`` reduction and one host read."""
    if indices.numel() == 0:
        return
    if indices.is_cuda and torch.compiler.is_compiling():
        return  # a data-dependent check would break the graph; the eager path checks
    lo, hi = torch.stack(torch.aminmax(indices)).tolist()  # one device-to-host copy
    if lo < 0 or hi >= d_sae:
        bad = lo if lo < 0 else hi
        raise ValueError(f"indices holds {bad}, outside [0, d_sae={d_sae})")


def _unflatten(out: SAEOutput, lead: tuple[int, ...]) -> SAEOutput:
    def shape(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.reshape(*lead, t.shape[-1])

    return SAEOutput(
        recon=shape(out.recon),
        values=shape(out.values),
        indices=shape(out.indices),
        codes=shape(out.codes),
        pre=shape(out.pre),
        aux_values=shape(out.aux_values),
        aux_indices=shape(out.aux_indices),
    )
