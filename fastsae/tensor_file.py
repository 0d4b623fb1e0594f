"""Checking a safetensors file against what a config expects, from its header alone.

The header (names, dtypes, shapes, byte offsets) is a few hundred bytes at the start of the file;
``safe_open`` reads and validates it and memory-maps the rest without touching it. So a file whose
tensors disagree with ``cfg.json`` is refused before any weight is allocated or read: a 17 KB
directory that declares ``d_sae=2000000`` costs nothing to reject.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

__all__ = ["FLOAT_DTYPES", "check_header", "meta_shapes", "read_header", "read_tensors"]

#: safetensors dtype codes of the floating dtypes an SAE's tensors may have.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def read_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (safetensors dtype code, shape)}`` of every tensor in ``path``; no data is read.

    Raises:
        ValueError: the file is missing or is not a valid safetensors file (corrupt header,
            offsets that do not match the file size).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = {}
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                view = f.get_slice(name)
                header[name] = (view.get_dtype(), tuple(view.get_shape()))
            return header
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


def check_header(
    path: str | Path,
    header: dict[str, tuple[str, tuple[int, ...]]],
    expected: dict[str, tuple[int, ...]],
) -> None:
    """Every expected tensor present with its shape and a floating dtype, and nothing else.

    Raises:
        ValueError: naming ``path`` and every missing, unexpected, mis-shaped or non-float tensor.
    """
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra)}")
    for name, shape in expected.items():
        if name not in header:
            continue
        dtype, got = header[name]
        if got != tuple(shape):
            problems.append(f"{name} has shape {got}, expected {tuple(shape)}")
        if dtype not in FLOAT_DTYPES:
            problems.append(
                f"{name} has dtype {dtype}; SAE tensors must be floating point "
                f"({', '.join(FLOAT_DTYPES)})"
            )
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file (the format cannot carry code)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


def meta_shapes(build, where: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the state of ``build()``, a module constructed on the meta device (no memory).

    Raises:
        ValueError: naming ``where`` when the declared sizes overflow what torch can describe.
    """
    try:
        with torch.device("meta"):
            module = build()
    except (RuntimeError, OverflowError) as e:
        raise ValueError(f"{where}: the declared sizes cannot be built: {e}") from None
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}
