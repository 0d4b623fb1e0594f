"""Per-rank memory of a parallel run: :func:`fastsae.train.memory.estimate` of one rank's share
plus what the mode adds.

- every mode: the slab (``ceil(n / latent)`` latents) with its gradients and Adam moments, and
  the working set of ``B / dp`` tokens;
- ``dp`` (data groups > 1): nothing (gradients are all-reduced in place, one parameter at a
  time), but ``optimizer_in_backward`` is refused, so both matrices' gradients exist at once;
- ``latent`` (latent groups > 1): the gathered candidates, ``(k + k_aux)`` per token per latent
  rank as an fp32 score and an int64 index (x2 for the merge's copies), and the partial
  reconstructions ``[B / dp, d_out]`` being summed.
"""

from __future__ import annotations

import dataclasses
import math

from fastsae.train.memory import MemoryEstimate, estimate

__all__ = ["estimate_parallel", "largest_d_sae"]


def estimate_parallel(cfg, d_in: int, d_out: int, dp: int, latent: int) -> MemoryEstimate:
    """Bytes on one rank of a ``dp x latent`` grid for ``cfg`` (the global config)."""
    n_local = math.ceil(cfg.d_sae / latent)
    b_local = max(1, cfg.batch_size // dp)
    k = cfg.k
    if k is not None:
        k = min(int(k), n_local) if cfg.architecture == "topk" else min(float(k), n_local)
    local = dataclasses.replace(
        cfg,
        d_sae=n_local,
        k=k,
        batch_size=b_local,
        buffer_tokens=max(cfg.buffer_tokens, 2 * b_local),
        matryoshka_widths=[],
        parallel="none",
    )
    mem = estimate(local, d_in, d_out, optimizer_in_backward=bool(cfg.optimizer_in_backward))
    if latent > 1:
        k_main = int(math.ceil(cfg.k or 1))
        k_aux = cfg.k_aux or d_out // 2
        candidates = b_local * (k_main + k_aux) * latent * (4 + 8) * 2
        mem.activations += candidates + 2 * b_local * d_out * 4
    return mem


def largest_d_sae(
    cfg, d_in: int, d_out: int, dp: int, latent: int, budget_bytes: float, *, step: int = 1024
) -> int:
    """The largest ``d_sae`` (a multiple of ``step``) whose per-rank estimate fits
    ``budget_bytes``; 0 if none does."""
    lo, hi = 0, step
    while (
        estimate_parallel(dataclasses.replace(cfg, d_sae=hi), d_in, d_out, dp, latent).device_total
        <= budget_bytes
    ):
        lo, hi = hi, hi * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        fits = estimate_parallel(
            dataclasses.replace(cfg, d_sae=mid), d_in, d_out, dp, latent
        ).device_total
        lo, hi = (mid, hi) if fits <= budget_bytes else (lo, mid)
    return lo
