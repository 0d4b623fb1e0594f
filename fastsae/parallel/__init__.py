"""Multi-process training on ``torch.distributed``: data parallel, latent sharded, or both on a
2-D ``DeviceMesh``. Launch with ``torchrun --nproc-per-node N -m fastsae.train --parallel MODE``;
see docs/distributed.md."""

from fastsae.parallel.mesh import Layout, PeerFailure, init_layout

__all__ = ["Layout", "PeerFailure", "init_layout"]
