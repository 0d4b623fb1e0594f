"""Collectives used by the parallel trainer, each counting the bytes it sends, and the two
autograd functions of latent sharding.

Every call goes through ``torch.distributed``; a group of one process is a no-op (no call, no
bytes). :data:`COUNTER` holds the payload bytes this rank handed to collectives (the tensor
sizes, not the transport's wire bytes: a ring all-reduce of ``s`` bytes over ``p`` ranks puts
``2 s (p - 1) / p`` on each link; see docs/distributed.md).

A failing collective (a peer died or timed out) raises :class:`~fastsae.parallel.mesh.PeerFailure`
naming the operation.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
from torch import Tensor

from fastsae.parallel.mesh import peer_failure

__all__ = [
    "COUNTER",
    "all_gather",
    "all_reduce",
    "barrier",
    "broadcast",
    "copy_to_latent",
    "reduce_from_latent",
]

#: Payload bytes per collective kind, on this rank, since the last ``COUNTER.clear()``.
COUNTER: Counter = Counter()


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _guard(op: str, fn):
    try:
        return fn()
    except (RuntimeError, dist.DistError) as e:  # DistBackendError, gloo "Connection reset"
        raise peer_failure(op, e) from e


def barrier(what: str) -> None:
    """``dist.barrier`` on the world, failing like the collectives."""
    _guard(f"barrier ({what})", dist.barrier)


def all_reduce(t: Tensor, group, op: str = "sum") -> Tensor:
    """In place: ``sum``, ``max`` or ``min`` over ``group``. Returns ``t``."""
    if _size(group) == 1:
        return t
    COUNTER[f"all_reduce_{op}"] += t.numel() * t.element_size()
    red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    _guard(f"all_reduce({op}, {tuple(t.shape)})", lambda: dist.all_reduce(t, red, group=group))
    return t


def all_gather(t: Tensor, group) -> list[Tensor]:
    """``[t from each rank of group]``, in group-rank order (equal shapes on every rank)."""
    if _size(group) == 1:
        return [t]
    t = t.contiguous()
    COUNTER["all_gather"] += t.numel() * t.element_size()
    out = [torch.empty_like(t) for _ in range(_size(group))]
    _guard(f"all_gather({tuple(t.shape)})", lambda: dist.all_gather(out, t, group=group))
    return out


def broadcast(t: Tensor, group, src_group_rank: int = 0) -> Tensor:
    if _size(group) == 1:
        return t
    COUNTER["broadcast"] += t.numel() * t.element_size()
    src = dist.get_global_rank(group, src_group_rank)
    _guard(f"broadcast({tuple(t.shape)})", lambda: dist.broadcast(t, src, group=group))
    return t


class _ReduceFromLatent(torch.autograd.Function):
    """Forward: sum the latent ranks' partial reconstructions. Backward: identity, because every
    latent rank computes the same loss from the same sum, so each already holds the full
    gradient of its partial (Megatron's "reduce from the tensor-parallel region")."""

    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:
        return all_reduce(partial.clone(), group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _CopyToLatent(torch.autograd.Function):
    """Forward: identity on a replicated tensor. Backward: sum the partial gradients that each
    latent rank's slab contributes (``b_dec`` through the encoder: ``-W_enc_slab @ g_slab``)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return all_reduce(grad.contiguous().clone(), ctx.group), None


def reduce_from_latent(partial: Tensor, group) -> Tensor:
    return partial if _size(group) == 1 else _ReduceFromLatent.apply(partial, group)


def copy_to_latent(t: Tensor, group) -> Tensor:
    return t if _size(group) == 1 else _CopyToLatent.apply(t, group)
