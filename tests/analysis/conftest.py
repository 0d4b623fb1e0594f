"""Shared fixtures for the analysis tests: the embedded demo model, a few of its sequences, and
small random SAEs at its hooks (d_model = 128)."""

from __future__ import annotations

import pytest
import torch

import fastsae

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="session")
def demo_model():
    from fastsae.demo.model import load_demo_model

    return load_demo_model()


@pytest.fixture(scope="session")
def demo_tokens(demo_model):
    """LongTensor [4, 32]: four BOS-led sequences of the embedded corpus."""
    from fastsae.data import text

    seqs = text.token_sequences(text.load_rows(), demo_model.tokenizer, 32)
    return torch.stack([s for _, s in zip(range(4), seqs, strict=False)])


def random_sae(arch="topk", d_in=128, d_sae=96, k=6, hook=HOOK, seed=0, **kwargs):
    """A float32 SAE with random weights and biases that make features fire."""
    cfg = {"d_in": d_in, "d_sae": d_sae, "hook_name": hook, **kwargs}
    if arch in ("topk", "batchtopk"):
        cfg["k"] = k
    sae = fastsae.sae_class(arch)(**cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.mul_(0.3)
        if sae.b_enc is not None:
            sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.5)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(0.5)
    return sae.eval()


@pytest.fixture
def topk_sae():
    return random_sae()
