"""fastsae: fast, trustworthy sparse autoencoders for language-model activations.

Quick start::

    import torch, fastsae

    sae = fastsae.TopKSAE(d_in=768, d_sae=16384, k=32)
    out = sae(torch.randn(4096, 768))          # SAEOutput: recon, values, indices, ...
    sae.save("my_sae")                          # SAELens v6 directory
    sae2 = fastsae.load("my_sae")               # also reads SAELens and sparsify directories

Modules compute through :mod:`fastsae.ops`, which picks a backend (``triton``, ``torch`` or the
``reference`` oracles); see ``docs/index.md``.
"""

from fastsae import ops, reference
from fastsae.architectures import (
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    ReLUSAE,
    TopKSAE,
    sae_class,
)
from fastsae.config import ARCHITECTURES, SAEConfig
from fastsae.io import load, load_sparsity
from fastsae.sae import SAE, LossOutput, SAEOutput

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "LossOutput",
    "MatryoshkaBatchTopKSAE",
    "ReLUSAE",
    "SAEConfig",
    "SAEOutput",
    "TopKSAE",
    "load",
    "load_sparsity",
    "ops",
    "reference",
    "sae_class",
]
