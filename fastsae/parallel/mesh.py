"""The process grid: ``torch.distributed`` set up from torchrun's environment, and a 2-D
``DeviceMesh`` of shape ``(dp, latent)``.

Every mode uses the same grid. ``dp`` has ``latent = 1``, ``latent`` has ``dp = 1``, and
``dp,latent`` splits the world into ``dp x latent`` (row-major: global rank ``r`` is data rank
``r // latent`` and latent rank ``r % latent``). Ranks of one latent group read the same data and
own different latents; ranks of one data group own the same latents and read different data.

Collectives have a timeout (:data:`DEFAULT_TIMEOUT_S`, or ``FASTSAE_DIST_TIMEOUT_S``): a rank
that dies leaves its peers blocked in a collective until either the transport notices the closed
connection (gloo: at once) or the timeout expires, and then every rank fails with
:class:`PeerFailure` instead of waiting forever.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Layout",
    "PeerFailure",
    "default_latent_size",
    "peer_failure",
    "init_layout",
    "latent_slab",
]

#: Seconds a collective may wait for a peer. Long enough for a checkpoint written by another
#: rank between two collectives (minutes at 2^20 latents), short enough that a dead rank does not
#: hold a job for hours (NCCL's default is 10 minutes, gloo's 30).
DEFAULT_TIMEOUT_S = 300.0


class PeerFailure(RuntimeError):
    """A collective failed: another rank died, or did not answer within the timeout."""


def peer_failure(op: str, e: BaseException) -> PeerFailure:
    """The one error every surviving rank reports when collective ``op`` fails."""
    detail = str(e).splitlines()[0] if str(e) else ""
    return PeerFailure(
        f"rank {dist.get_rank()}: {op} failed: another rank died or did not answer within "
        f"the timeout ({type(e).__name__}: {detail[:300]})"
    )


def default_latent_size(world: int) -> int:
    """The largest divisor of ``world`` that is ``<= sqrt(world)`` (4 -> 2, 8 -> 2, 9 -> 3)."""
    best = 1
    for d in range(1, math.isqrt(world) + 1):
        if world % d == 0:
            best = d
    return best


def latent_slab(n: int, size: int, rank: int) -> tuple[int, int]:
    """``(offset, count)`` of latent rank ``rank``'s contiguous slab of ``n`` latents: the first
    ``n % size`` slabs hold one latent more."""
    base, extra = divmod(n, size)
    count = base + (rank < extra)
    offset = rank * base + min(rank, extra)
    return offset, count


@dataclass
class Layout:
    """Where this process sits in the ``(dp, latent)`` grid."""

    mode: str
    world: int
    rank: int
    dp_size: int
    dp_rank: int
    latent_size: int
    latent_rank: int
    mesh: DeviceMesh | None
    device: torch.device

    @property
    def dp_group(self):
        return self.mesh.get_group("dp") if self.mesh is not None else None

    @property
    def latent_group(self):
        return self.mesh.get_group("latent") if self.mesh is not None else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def writes_shard(self) -> bool:
        """Data rank 0 of each latent group writes that slab's checkpoint shard."""
        return self.dp_rank == 0

    def describe(self) -> str:
        return (
            f"parallel={self.mode}: {self.world} processes = {self.dp_size} data x "
            f"{self.latent_size} latent (rank {self.rank}: data {self.dp_rank}, latent "
            f"{self.latent_rank}) on {self.device}"
        )


def _timeout_s() -> float:
    return float(os.environ.get("FASTSAE_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))


def init_layout(mode: str, *, latent_parallel: int = 0, device: str = "auto") -> Layout:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...)
    and build the mesh. NCCL on CUDA (one GPU per local rank), gloo on CPU."""
    if mode not in ("dp", "latent", "dp,latent"):
        raise ValueError(f"parallel={mode!r}; allowed: dp, latent, dp,latent")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"parallel={mode} needs a launcher: torchrun --nproc-per-node N -m fastsae.train "
            f"--parallel {mode} ..."
        )
    world = int(os.environ["WORLD_SIZE"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if mode == "dp":
        latent = 1
    elif mode == "latent":
        latent = world
    else:
        latent = latent_parallel or default_latent_size(world)
    if world % latent:
        raise ValueError(
            f"latent_parallel={latent} does not divide the world size {world} (parallel={mode})"
        )
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=timedelta(seconds=_timeout_s()),
        )
    rank = dist.get_rank()
    mesh = init_device_mesh(dev.type, (world // latent, latent), mesh_dim_names=("dp", "latent"))
    return Layout(
        mode=mode,
        world=world,
        rank=rank,
        dp_size=world // latent,
        dp_rank=rank // latent,
        latent_size=latent,
        latent_rank=rank % latent,
        mesh=mesh,
        device=dev,
    )
