"""Bytes each rank hands to collectives in one TopK training step, by mode: the formulas of
docs/distributed.md, checked against :data:`fastsae.parallel.comm.COUNTER` by the tests.

Payload bytes (what ``COUNTER`` counts): the size of the tensor a rank contributes. On the wire a
ring all-reduce of ``s`` bytes over ``p`` ranks sends ``2 s (p - 1) / p`` per rank, and an
all-gather of ``s`` bytes per rank sends ``s (p - 1)`` per rank; :func:`wire_bytes` applies that.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StepBytes", "step_bytes"]


@dataclass
class StepBytes:
    """Payload bytes per rank per step, by collective."""

    grad_all_reduce: int = 0  # data group: every parameter of the slab, fp32
    stats_all_reduce: int = 0  # data group: firing counts (int64 per latent), flags, metrics
    candidates_all_gather: int = 0  # latent group: (fp32 score, int64 index) per candidate
    recon_all_reduce: int = 0  # latent group: partial reconstructions [B/dp, d_out] fp32
    small: int = 0  # latent group: n_dead, b_dec's gradient; data group: the first batch, once
    dp: int = 1
    latent: int = 1

    @property
    def payload(self) -> int:
        return (
            self.grad_all_reduce
            + self.stats_all_reduce
            + self.candidates_all_gather
            + self.recon_all_reduce
            + self.small
        )

    def wire_bytes(self) -> int:
        """Bytes each rank sends over the network with ring algorithms."""
        ring_dp = 2 * (self.dp - 1) / self.dp
        ring_lat = 2 * (self.latent - 1) / self.latent
        return int(
            ring_dp * (self.grad_all_reduce + self.stats_all_reduce)
            + (self.latent - 1) * self.candidates_all_gather
            + ring_lat * self.recon_all_reduce
            + self.small
        )


def step_bytes(
    *,
    batch: int,
    d_in: int,
    d_out: int,
    n: int,
    k: int,
    dp: int,
    latent: int,
    aux_width: int = 0,
    b_dec_in_encoder: bool = True,
    first_step: bool = False,
    grad_clip: bool = False,
) -> StepBytes:
    """Payload bytes of one TopK step on one rank of a ``dp x latent`` grid.

    ``batch`` is the global batch; ``aux_width = min(k_aux, n_dead)`` (0: no AuxK this step);
    ``first_step`` adds the gathering of the first batch for the data-dependent initialisation;
    ``grad_clip``, the all-reduce of the slabs' squared gradient norms.
    """
    b = batch // dp
    n_local = -(-n // latent)  # the largest slab (slabs differ by at most one latent)
    out = StepBytes(dp=dp, latent=latent)
    if dp > 1:
        params = n_local * d_in + n_local * d_out + n_local + d_out
        out.grad_all_reduce = 4 * params
        # firing counts; the finite-loss flag (fp32); loss, fvu, mse for the log (fp64)
        out.stats_all_reduce = 8 * n_local + 4 + 3 * 8
        if first_step:
            out.small += 4 * b * d_in
    if latent > 1:
        out.candidates_all_gather = 12 * b * (k + aux_width)
        out.recon_all_reduce = 4 * b * d_out * (2 if aux_width else 1)
        # n_dead before the loss and for the log (int64); b_dec's gradient through the encoder
        out.small += 8 + 8 + (4 * d_out if b_dec_in_encoder else 0)
        if grad_clip:
            out.small += 8  # the slabs' squared gradient norms (fp64)
    return out
