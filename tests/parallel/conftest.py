"""A tiny activation cache (no model): token ``t`` at position ``p`` has a seeded activation, so
every row is distinct."""

from __future__ import annotations

import pytest
import torch

from fastsae.data import write_cache
from fastsae.data.sources import ActivationSource

HOOK = "blocks.0.hook_resid_post"
D = 16


class TableSource(ActivationSource):
    """A fake model: ``act[b, s] = table[token]`` with the running sequence number and the
    position written into the first two columns, so every row is distinct (d = 16)."""

    model_name = "table"

    def __init__(self) -> None:
        super().__init__(HOOK, drop_bos=False)
        self.table = torch.randn(97, D, generator=torch.Generator().manual_seed(3)) + 1.0
        self.dims = {HOOK: D}
        self.sequences = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _run(self, tokens, attention_mask):
        act = self.table[tokens].clone()
        b, s = tokens.shape
        act[..., 0] = (self.sequences + torch.arange(b))[:, None].float()
        act[..., 1] = torch.arange(s)[None, :].float()
        self.sequences += b
        return {HOOK: act}


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> str:
    """1200 rows of d = 16 in shards of 256."""
    out = tmp_path_factory.mktemp("cache")
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 97, (40,), generator=g) for _ in range(40)]
    write_cache(out, TableSource(), seqs, tokens=1200, shard_tokens=256)
    return str(out)
