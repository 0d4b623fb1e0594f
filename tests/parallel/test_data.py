"""The rank-aware cache reader: each data rank's slices, concatenated in rank order, are one
process's batches; across ranks every row is read once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastsae.data import ActivationCache
from fastsae.parallel.data import RankData, read_rows
from fastsae.train.config import TrainConfig
from fastsae.train.data import TrainData

from .conftest import HOOK


def _cfg(cache: str) -> TrainConfig:
    return TrainConfig(
        cache_dir=cache, hook=HOOK, batch_size=64, buffer_tokens=256, eval_tokens=100, seed=5
    )


def _layout(dp_size: int, dp_rank: int):
    return SimpleNamespace(mode="dp", dp_size=dp_size, dp_rank=dp_rank, latent_size=1)


@pytest.mark.parametrize("dp", [2, 4])
def test_rank_slices_gather_to_one_process_order(tiny_cache, dp):
    cfg = _cfg(tiny_cache)
    one = TrainData(cfg, device=torch.device("cpu"))
    ranks = [
        RankData(cfg, layout=_layout(dp, r), device=torch.device("cpu"), log=lambda *a: None)
        for r in range(dp)
    ]
    steps = (1200 - 100) // 64  # one full epoch, then two batches of the next
    seen = []
    try:
        for _ in range(steps + 2):
            want, _ = one.next_batch()
            parts = [rd.next_batch()[0] for rd in ranks]
            assert all(p.shape == (64 // dp, 16) for p in parts)
            assert torch.equal(torch.cat(parts), want)
            seen.append(torch.cat(parts))
        assert [rd.state_dict() for rd in ranks] == [one.state_dict()] * dp
    finally:
        one.close()
        for rd in ranks:
            rd.close()
    epoch = torch.cat(seen[:steps])
    assert torch.unique(epoch, dim=0).shape[0] == epoch.shape[0]  # nothing read twice


def test_resume_position_is_world_size_free(tiny_cache):
    cfg = _cfg(tiny_cache)
    a = RankData(cfg, layout=_layout(2, 1), device=torch.device("cpu"), log=lambda *a: None)
    b = RankData(cfg, layout=_layout(4, 2), device=torch.device("cpu"), log=lambda *a: None)
    try:
        for _ in range(20):
            a.next_batch()
        b.load_state_dict(a.state_dict())
        x2 = a.next_batch()[0]  # rows 32..63 of the global batch
        x4 = b.next_batch()[0]  # rows 32..47
        assert torch.equal(x4, x2[:16])
    finally:
        a.close()
        b.close()


def test_read_rows_any_order(tiny_cache):
    cache = ActivationCache(tiny_cache)
    rows = torch.tensor([700, 3, 255, 256, 1199, 3])
    want = torch.stack([cache.read(HOOK, r, r + 1)[0] for r in rows.tolist()])
    assert torch.equal(read_rows(cache, HOOK, rows), want)
