"""Up-front memory estimate for a training run: refuse before loading anything that cannot fit.

All figures are bytes. The estimate counts what fastsae itself allocates on the training device:

- weights: ``W_enc`` and ``W_dec`` (``2 * d_sae * d`` values, ``d = (d_in + d_out) / 2``) plus the
  vectors, in the parameter dtype;
- grads: the same again (``optimizer_in_backward`` keeps only one matrix's gradient at a time);
- Adam: two fp32 moments per parameter;
- the weight average (``ema_gamma``): one more copy of the parameters, fp32 for 16-bit weights;
- activations: the batch and its reconstruction, the sparse codes, and the encoder's working set
  (one latent slab of ``B x slab`` pre-activations for the top-k family; several dense
  ``[B, d_sae]`` tensors for relu/jumprelu/gated, which need them for their penalties).

The model that produces activations is not counted (it is the user's choice and can live on
another device); the shuffler's host buffer (``1.5 * buffer_tokens`` rows: the mixing buffer and
the spare rows being refilled) is reported separately, and on the CPU it counts against the same
memory as the rest (``fastsae.train.preflight.check_memory``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastsae.config import TOPK_FAMILY, dtype_from_name
from fastsae.ops._torch import SLAB_ELEMENTS

__all__ = ["PLAN_SHARE", "MemoryEstimate", "available_bytes", "estimate", "estimate_group"]

GiB = 2**30
#: Share of free device memory a run plans to fill: above it ``optimizer_in_backward`` (when left
#: at None) turns on and the weight average is dropped (``Trainer._plan_memory``).
PLAN_SHARE = 0.85


@dataclass
class MemoryEstimate:
    weights: int
    grads: int
    adam: int
    activations: int
    host_buffer: int
    average: int = 0

    @property
    def device_total(self) -> int:
        return self.weights + self.grads + self.adam + self.average + self.activations

    def describe(self) -> str:
        parts = [
            f"weights {self.weights / GiB:.2f} GiB",
            f"grads {self.grads / GiB:.2f} GiB",
            f"Adam {self.adam / GiB:.2f} GiB",
            f"activations {self.activations / GiB:.2f} GiB",
        ]
        if self.average:
            parts.insert(3, f"weight average {self.average / GiB:.2f} GiB")
        return (
            f"{self.device_total / GiB:.2f} GiB on the device ({', '.join(parts)}); "
            f"shuffler buffer {self.host_buffer / GiB:.2f} GiB on the host"
        )


def estimate(cfg, d_in: int, d_out: int, *, optimizer_in_backward: bool = False) -> MemoryEstimate:
    """Memory of a run of ``cfg`` (a :class:`~fastsae.train.TrainConfig`)."""
    size = torch.empty((), dtype=dtype_from_name(cfg.dtype)).element_size()
    n, B = cfg.d_sae, cfg.batch_size
    matrix_values = n * d_in + n * d_out + (d_out * d_in if cfg.skip_connection else 0)
    vector_values = 4 * n + d_out
    params = matrix_values + vector_values
    grads = params * size
    if optimizer_in_backward:
        grads = max(n * d_in, n * d_out) * size + vector_values * size
    if cfg.architecture in TOPK_FAMILY:
        k = int(cfg.k or 1)
        k_aux = cfg.k_aux or d_out // 2
        slab = max(k, SLAB_ELEMENTS // max(B, 1))
        work = B * min(slab, n) * 4 + B * (k + k_aux) * (4 + 8) * 3
    else:
        work = 4 * B * n * size
    acts = B * (d_in + 3 * d_out) * size + work
    return MemoryEstimate(
        weights=params * size,
        grads=grads,
        adam=2 * params * 4,
        average=params * max(size, 4) if cfg.ema_gamma is not None else 0,
        activations=acts,
        # The shuffler holds buffer_tokens rows plus up to half as many spare rows being refilled.
        host_buffer=(cfg.buffer_tokens + cfg.buffer_tokens // 2)
        * (d_in + (d_out if cfg.hook_out else 0))
        * 4,
    )


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def estimate_group(estimates: list[MemoryEstimate], host_buffer: int) -> MemoryEstimate:
    """A group of SAEs trained on one stream: every member keeps its weights, gradients and Adam
    moments, but members step one after another, so only the largest member's activations are
    live at once; the shuffler's buffer holds every hook once (``host_buffer``)."""
    return MemoryEstimate(
        weights=sum(e.weights for e in estimates),
        grads=sum(e.grads for e in estimates),
        adam=sum(e.adam for e in estimates),
        average=sum(e.average for e in estimates),
        activations=max((e.activations for e in estimates), default=0),
        host_buffer=host_buffer,
    )
