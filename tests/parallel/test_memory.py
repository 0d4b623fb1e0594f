"""The per-rank memory estimate: the figures of docs/distributed.md, and a run that cannot fit is
refused before anything is allocated."""

from __future__ import annotations

import dataclasses

import pytest

from fastsae.parallel.launch import free_port
from fastsae.parallel.memory import estimate_parallel, largest_d_sae
from fastsae.train.config import TrainConfig

from .conftest import HOOK

GiB = 2**30
D = 2304


def _gib(cfg, dp, latent):
    return round(estimate_parallel(cfg, D, D, dp, latent).device_total / GiB, 1)


def test_doc_table():
    # the figures without the weight average, which a run drops when it does not fit
    cfg = TrainConfig(d_sae=2**20, k=64, batch_size=8192, buffer_tokens=2**21, ema_gamma=None)
    averaged = dataclasses.replace(cfg, ema_gamma=15.0)
    assert _gib(averaged, 1, 8) == 14.0  # 11.8 + 2.2: each rank averages its eighth
    assert _gib(cfg, 1, 1) == 72.9
    assert _gib(cfg, 8, 1) == 72.4
    assert _gib(cfg, 1, 8) == 11.8
    assert _gib(cfg, 2, 4) == 19.1
    assert _gib(cfg, 4, 2) == 36.6
    oib = dataclasses.replace(cfg, optimizer_in_backward=True)
    assert _gib(oib, 1, 8) == 10.7
    budget = 79.1 * GiB
    assert largest_d_sae(cfg, D, D, 8, 1, budget, step=2**14) == 1130496
    assert largest_d_sae(cfg, D, D, 1, 8, budget, step=2**14) == 8880128


def test_slab_share_shrinks_with_latent_ranks():
    cfg = TrainConfig(d_sae=2**16, k=32, batch_size=4096)
    one = estimate_parallel(cfg, 768, 768, 1, 1)
    four = estimate_parallel(cfg, 768, 768, 1, 4)
    assert four.weights * 4 == pytest.approx(one.weights, rel=1e-3)
    assert four.adam * 4 == pytest.approx(one.adam, rel=1e-3)
    dp = estimate_parallel(cfg, 768, 768, 4, 1)
    assert dp.weights == one.weights  # every data rank holds the whole SAE


def test_refused_up_front(tiny_cache, tmp_path, monkeypatch):
    from fastsae.parallel.run import run_parallel

    for name, value in dict(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    ).items():
        monkeypatch.setenv(name, value)
    cfg = TrainConfig(
        parallel="latent",
        cache_dir=tiny_cache,
        hook=HOOK,
        d_sae=2**32,
        k=8,
        batch_size=32,
        buffer_tokens=128,
        eval_tokens=100,
        device="cpu",
        backend="torch",
        progress=False,
        out_dir=str(tmp_path / "run"),
    )
    with pytest.raises(MemoryError, match="per rank"):
        run_parallel(cfg, log=lambda *a: None)
    assert not (tmp_path / "run" / "checkpoints").exists()
