"""The process grid and the refusals that come before any compute."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fastsae.parallel.mesh import default_latent_size, init_layout, latent_slab
from fastsae.parallel.trainer import check_parallel_config
from fastsae.train.config import TrainConfig


def test_latent_slabs_cover_every_latent_once():
    for n, size in [(64, 4), (33, 4), (7, 7), (10, 3)]:
        slabs = [latent_slab(n, size, r) for r in range(size)]
        assert slabs[0][0] == 0
        for (o1, c1), (o2, _) in zip(slabs, slabs[1:], strict=False):
            assert o1 + c1 == o2
        assert sum(c for _, c in slabs) == n
        assert max(c for _, c in slabs) - min(c for _, c in slabs) <= 1
    assert [default_latent_size(w) for w in (1, 2, 4, 6, 8, 9)] == [1, 1, 2, 2, 2, 3]


def test_parallel_field_is_validated():
    with pytest.raises(ValueError, match="parallel='tp' is unknown"):
        TrainConfig(parallel="tp")
    with pytest.raises(ValueError, match="latent_parallel=-1"):
        TrainConfig(latent_parallel=-1)


def test_without_a_launcher_says_how(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node N"):
        init_layout("dp")


def _layout(dp: int, latent: int):
    return SimpleNamespace(mode="dp,latent", dp_size=dp, latent_size=latent)


@pytest.mark.parametrize(
    ("over", "dp", "latent", "message"),
    [
        ({"architecture": "jumprelu", "k": None}, 1, 2, "cannot|supports architecture"),
        ({"batch_size": 30, "buffer_tokens": 64}, 4, 1, "multiple of the data-parallel size"),
        ({"optimizer_in_backward": True}, 2, 1, "optimizer_in_backward"),
        ({"d_sae": 2, "k": 1}, 1, 4, "d_sae=2 must be >= the latent group size 4"),
    ],
)
def test_refusals(over, dp, latent, message):
    cfg = TrainConfig(**{"d_sae": 64, "k": 4, "batch_size": 32, "buffer_tokens": 64, **over})
    with pytest.raises(ValueError, match=message):
        check_parallel_config(cfg, _layout(dp, latent))
