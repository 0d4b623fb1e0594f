"""``SAEConfig``: the shape and hyper-parameters of one SAE, validated before any tensor exists."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ARCHITECTURES", "SAEConfig", "dtype_from_name", "dtype_name"]

#: fastsae architecture names. Each maps to one class in :mod:`fastsae.architectures`.
ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "relu", "gated")
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")

#: ``normalize_activations`` values that are the identity at inference time. SAELens's
#: ``expected_average_only_in`` scales only while training; its factor is folded into the weights.
IDENTITY_NORMALIZATIONS = ("none", "expected_average_only_in")

_FLOAT_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """``"float32"`` (or ``torch.float32``, or ``"torch.float32"``) -> ``torch.float32``.

    Raises:
        TypeError: for anything that is not a floating dtype.
    """
    if isinstance(name, torch.dtype):
        if not name.is_floating_point:
            raise TypeError(
                f"dtype={name} is not a floating dtype; allowed: {', '.join(_FLOAT_DTYPES)}"
            )
        return name
    key = str(name).removeprefix("torch.")
    if key not in _FLOAT_DTYPES:
        raise TypeError(
            f"dtype={name!r} is not a floating dtype; allowed: {', '.join(_FLOAT_DTYPES)}"
        )
    return _FLOAT_DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SAEConfig:
    """Everything needed to build an SAE of any architecture. Validated in ``__post_init__``."""

    architecture: str
    """One of :data:`ARCHITECTURES`."""
    d_in: int
    """Width of the input activations."""
    d_sae: int
    """Number of latents."""
    d_out: int | None = None
    """Width of the output; ``None`` means ``d_in`` (an SAE). Different from ``d_in``: a transcoder."""
    k: int | float | None = None
    """Active latents per token: an int in ``[1, d_sae]`` for ``topk``; the batch average (a
    positive number ``<= d_sae``) for ``batchtopk`` / ``matryoshka_batchtopk``; unused otherwise."""
    skip_connection: bool = False
    """Add a linear skip ``x @ W_skip.T`` with ``W_skip [d_out, d_in]`` (a skip-transcoder)."""
    apply_b_dec_to_input: bool | None = None
    """Subtract ``b_dec`` from the input before encoding. ``None``: True exactly when
    ``d_out == d_in`` and there is no skip connection (a transcoder's ``b_dec`` lives in the output
    space)."""
    normalize_activations: str = "none"
    """SAELens's field. Only values that are the identity at inference are accepted:
    :data:`IDENTITY_NORMALIZATIONS`."""
    dtype: str = "float32"
    """Parameter dtype name: float32, float64, float16 or bfloat16."""
    jumprelu_bandwidth: float = 0.001
    """Width of the rectangle kernel in the JumpReLU straight-through estimator."""
    jumprelu_init_threshold: float = 0.001
    """Initial JumpReLU threshold."""
    matryoshka_widths: list[int] = field(default_factory=list)
    """Nested prefix widths for ``matryoshka_batchtopk``, strictly increasing; ``d_sae`` is
    appended when missing."""
    hook_name: str | None = None
    """Where the input activations come from, e.g. ``blocks.3.hook_resid_post``."""
    hook_name_out: str | None = None
    """Where a transcoder's target comes from."""
    model_name: str | None = None
    """The model the SAE was trained on."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata kept in ``cfg.json``."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture={self.architecture!r} is unknown; allowed: {', '.join(ARCHITECTURES)}"
            )
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.d_out is None:
            self.d_out = self.d_in
        if not _is_int(self.d_out) or self.d_out < 1:
            raise ValueError(f"d_out={self.d_out!r} must be an integer >= 1")
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = self.d_out == self.d_in and not self.skip_connection
        if self.apply_b_dec_to_input and self.d_out != self.d_in:
            raise ValueError(
                f"apply_b_dec_to_input=True needs d_out == d_in (b_dec is subtracted from the input), "
                f"got d_in={self.d_in}, d_out={self.d_out}"
            )
        self._check_k()
        dtype_from_name(self.dtype)  # raises TypeError naming the dtype
        self.dtype = dtype_name(dtype_from_name(self.dtype))
        if self.normalize_activations not in IDENTITY_NORMALIZATIONS:
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} is not supported; allowed: "
                f"{', '.join(IDENTITY_NORMALIZATIONS)} (fold any other normalization into the weights)"
            )
        if not self.jumprelu_bandwidth > 0:
            raise ValueError(f"jumprelu_bandwidth={self.jumprelu_bandwidth} must be > 0")
        if self.architecture == "matryoshka_batchtopk":
            self._check_matryoshka()
        elif self.matryoshka_widths:
            raise ValueError(
                f"matryoshka_widths is only used by architecture='matryoshka_batchtopk', "
                f"not {self.architecture!r}"
            )

    def _check_k(self) -> None:
        k, arch = self.k, self.architecture
        if arch == "topk":
            if not _is_int(k):
                raise ValueError(f"k={k!r} must be an integer for architecture='topk'")
            if not 1 <= k <= self.d_sae:
                raise ValueError(f"k={k} must be in [1, d_sae={self.d_sae}]")
        elif arch in TOPK_FAMILY:
            if isinstance(k, bool) or not isinstance(k, int | float):
                raise ValueError(f"k={k!r} must be a number for architecture={arch!r}")
            if not 0 < k <= self.d_sae:
                raise ValueError(f"k={k} must be in (0, d_sae={self.d_sae}]")
        elif k is not None:
            raise ValueError(f"k={k!r} is only used by {', '.join(TOPK_FAMILY)}, not {arch!r}")

    def _check_matryoshka(self) -> None:
        widths = list(self.matryoshka_widths)
        if not widths or widths[-1] != self.d_sae:
            widths.append(self.d_sae)
        if any(not _is_int(w) or w < 1 for w in widths):
            raise ValueError(
                f"matryoshka_widths={self.matryoshka_widths} must be positive integers"
            )
        if any(a >= b for a, b in zip(widths, widths[1:], strict=False)):
            raise ValueError(
                f"matryoshka_widths={self.matryoshka_widths} must be strictly increasing and "
                f"<= d_sae={self.d_sae}"
            )
        self.matryoshka_widths = widths

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def is_transcoder(self) -> bool:
        return self.d_out != self.d_in or self.skip_connection

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Build from a dict; unknown keys are an error that names them."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - names)
        if extra:
            raise ValueError(
                f"unknown SAEConfig fields: {', '.join(extra)}; allowed: {', '.join(sorted(names))}"
            )
        return cls(**data)
