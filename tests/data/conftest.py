"""Shared fixtures for the activation-pipeline tests: the demo model is loaded once."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def demo_model():
    from fastsae.demo.model import load_demo_model

    return load_demo_model()


@pytest.fixture(scope="session")
def demo_sequences(demo_model):
    """LongTensor [24, 128]: the first 24 sequences of the embedded corpus, chunked with BOS."""
    from fastsae.data import text

    seqs = text.token_sequences(text.load_rows(), demo_model.tokenizer, 128)
    return torch.stack([s for _, s in zip(range(24), seqs, strict=False)])


@pytest.fixture(scope="session")
def demo_source(demo_model):
    from fastsae.data import TransformerLensSource

    return TransformerLensSource(demo_model, ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"])


class FailingSource:
    """Wraps a source; its ``activations`` raises after ``calls`` successful calls."""

    def __init__(self, source, calls: int, exc: BaseException | None = None):
        self._source = source
        self._left = calls
        self._exc = exc or KeyboardInterrupt()

    def __getattr__(self, name):
        return getattr(self._source, name)

    def activations(self, tokens, attention_mask=None):
        if self._left == 0:
            raise self._exc
        self._left -= 1
        return self._source.activations(tokens, attention_mask)


@pytest.fixture
def failing_source():
    return FailingSource
