"""What every launcher in :mod:`fastsae.kernels` does before and around a kernel launch.

- Checks: inputs on one device, float tensors where floats are expected, latent ids in range (off
  the GPU only), a caller's ``out`` buffer of the right shape, dtype and device.
- The accumulator dtype and the grid limits.
- :func:`launch`: runs a ``(kernel, grid, kwargs)`` plan on the device of its tensors (Triton
  launches on ``torch.cuda.current_device()``, which need not be where the tensors live).

Each kernel module builds plans with its own ``*_plan`` helpers; ``kernels/check.py``
AOT-compiles exactly those plans, and this module runs them.
"""

from __future__ import annotations

import contextlib

import torch
import triton.language as tl
from torch import Tensor

__all__ = [
    "MAX_GRID_YZ",
    "acc_dtype",
    "check_float",
    "check_index_range",
    "check_same_device",
    "launch",
    "output",
]

# CUDA caps grid dimensions 1 and 2 at 65535 programs (dimension 0 at 2^31 - 1). Launchers put
# their only unbounded count (rows, latents) on dimension 0 and check the others against this.
MAX_GRID_YZ = 65535


def acc_dtype(*dtypes: torch.dtype) -> tl.dtype:
    """Accumulator dtype: fp32 for fp32/bf16/fp16, fp64 when any input is fp64 (oracle tests)."""
    return tl.float64 if torch.float64 in dtypes else tl.float32


def check_same_device(*tensors: Tensor | None) -> None:
    present = [t for t in tensors if t is not None]
    if len({t.device for t in present}) > 1:
        raise ValueError(f"inputs are on different devices: {[str(t.device) for t in present]}")


def check_float(**named: Tensor | None) -> None:
    for name, t in named.items():
        if t is not None and not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float tensor, got {t.dtype}")


def check_index_range(indices: Tensor, n: int) -> None:
    """Raise if an id in ``indices`` is outside ``[0, n)``. Off the GPU only: on CUDA, reading
    ``min``/``max`` back is a host sync on every call, and the ids come from our own top-k."""
    if indices.device.type == "cuda" or indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"indices must lie in [0, d_sae={n}); got min={lo}, max={hi}")


def output(out: Tensor | None, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype) -> Tensor:
    """A new ``[shape]`` buffer on ``like``'s device, or the caller's ``out`` once checked (tests
    pass NaN-poisoned buffers to prove every element is written)."""
    if out is None:
        return torch.empty(shape, device=like.device, dtype=dtype)
    if out.shape != shape or out.dtype != dtype or out.device != like.device:
        raise ValueError(
            f"out must be {shape} {dtype} on {like.device}; got {tuple(out.shape)} {out.dtype} "
            f"on {out.device}"
        )
    return out


def device_of(kwargs: dict) -> torch.device:
    """The device of the first tensor among a launch's arguments."""
    return next(v.device for v in kwargs.values() if isinstance(v, Tensor))


def device_context(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device, so that the launch goes to the stream of
    the device holding the tensors; nothing for CPU tensors (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(plan) -> None:
    """Run ``plan = (kernel, grid, kwargs)`` on the device of its tensors. Grids with a zero
    dimension are skipped (an empty batch launches nothing)."""
    kernel, grid, kwargs = plan
    if any(g == 0 for g in grid):
        return
    if len(grid) > 1 and max(grid[1:]) > MAX_GRID_YZ:
        raise ValueError(f"grid {grid}: dimensions 1 and 2 are capped at {MAX_GRID_YZ} on CUDA")
    with device_context(device_of(kwargs)):
        kernel[grid](**kwargs)
