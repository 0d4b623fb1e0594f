"""fastsae.data.cache: the layout, bit-exact round trips, reading, integrity errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastsae.data import ActivationCache, CacheIntegrityError, write_cache
from fastsae.data.sources import TOKENS

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]


def _sequences(demo_sequences, n=None):
    return list(demo_sequences[:n])


def _expected(demo_source, demo_sequences, dtype):
    out = demo_source.activations(demo_sequences)
    return {h: out[h].to(dtype) for h in HOOKS} | {TOKENS: out[TOKENS].int()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_is_bit_exact(tmp_path, demo_source, demo_sequences, dtype):
    seqs = _sequences(demo_sequences, 8)  # 8 x 127 = 1016 rows
    manifest = write_cache(
        tmp_path, demo_source, seqs, tokens=1000, dtype=dtype, shard_tokens=300, batch_size=8
    )
    assert manifest["token_count"] == 1000 and manifest["complete"]
    assert [s["tokens"] for s in manifest["shards"]] == [300, 300, 300, 100]
    cache = ActivationCache(tmp_path, verify="open")
    assert cache.hooks == tuple(HOOKS) and len(cache) == 1000
    assert cache.d == {h: 128 for h in HOOKS} and cache.dtype == getattr(torch, dtype)
    expected = _expected(demo_source, torch.stack(seqs), getattr(torch, dtype))
    for name in [*HOOKS, TOKENS]:
        got = cache.read(name, 0, 1000)
        assert got.dtype == expected[name].dtype
        assert torch.equal(got, expected[name][:1000])
    # a read that spans three shards
    assert torch.equal(cache.read(HOOKS[0], 250, 650), expected[HOOKS[0]][250:650])
    assert cache.read(HOOKS[0], 7, 7).shape == (0, 128)


def test_manifest_records_the_run(tmp_path, demo_source, demo_sequences):
    write_cache(
        tmp_path, demo_source, _sequences(demo_sequences, 4), tokens=300, shard_tokens=256,
        batch_size=4, meta={"dataset": "embedded"},
    )  # fmt: skip
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["model"] == "fastsae-demo-kjv"
    assert manifest["hooks"] == HOOKS and manifest["d"] == {h: 128 for h in HOOKS}
    assert manifest["dtype"] == "float32" and manifest["token_count"] == 300
    assert manifest["dataset"] == "embedded"
    for shard in manifest["shards"]:
        assert len(shard["sha256"]) == 64
        assert (tmp_path / shard["file"]).stat().st_size == shard["bytes"]


def test_shards_are_memory_mappable_without_fastsae(tmp_path, demo_source, demo_sequences):
    write_cache(tmp_path, demo_source, _sequences(demo_sequences, 4), tokens=400, shard_tokens=300)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    shard = manifest["shards"][1]
    offset = shard["offsets"][HOOKS[1]]
    array = np.memmap(
        tmp_path / shard["file"], np.float32, "r", offset=offset, shape=(shard["tokens"], 128)
    )
    cache = ActivationCache(tmp_path)
    assert torch.equal(torch.from_numpy(np.array(array)), cache.read(HOOKS[1], 300, 400))


def test_chunks_iterate_in_order(tmp_path, demo_source, demo_sequences):
    write_cache(tmp_path, demo_source, _sequences(demo_sequences, 4), tokens=500, shard_tokens=128)
    cache = ActivationCache(tmp_path)
    parts = list(cache.chunks([HOOKS[0]], start=100, stop=450))
    assert torch.equal(torch.cat([p[HOOKS[0]] for p in parts]), cache.read(HOOKS[0], 100, 450))
    with pytest.raises(IndexError):
        cache.read(HOOKS[0], 0, 501)
    with pytest.raises(KeyError, match="'nope' is not in this cache"):
        cache.read("nope", 0, 1)


@pytest.fixture
def small_cache(tmp_path, demo_source, demo_sequences):
    write_cache(tmp_path, demo_source, _sequences(demo_sequences, 4), tokens=500, shard_tokens=200)
    return tmp_path


def _flip_byte(path, offset=1000):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_shard_is_named_lazily(small_cache):
    _flip_byte(small_cache / "shard-00001.bin")
    cache = ActivationCache(small_cache)  # lazy: opening reads no shard
    assert cache.read(HOOKS[0], 0, 200).shape == (200, 128)  # shard 0 is fine
    with pytest.raises(CacheIntegrityError, match="shard shard-00001.bin is corrupt"):
        cache.read(HOOKS[0], 150, 250)


def test_corrupt_shard_is_named_on_open(small_cache):
    _flip_byte(small_cache / "shard-00002.bin", offset=10)
    with pytest.raises(CacheIntegrityError, match="shard shard-00002.bin is corrupt"):
        ActivationCache(small_cache, verify="open")


def test_missing_or_truncated_shard(small_cache):
    (small_cache / "shard-00001.bin").unlink()
    with pytest.raises(CacheIntegrityError, match="shard shard-00001.bin is missing"):
        ActivationCache(small_cache)
    path = small_cache / "shard-00002.bin"
    path.write_bytes(path.read_bytes()[:-64])
    (small_cache / "shard-00001.bin").write_bytes(b"")
    with pytest.raises(CacheIntegrityError, match="shard shard-00001.bin has 0 bytes"):
        ActivationCache(small_cache)


def test_not_a_cache(tmp_path):
    with pytest.raises(ValueError, match="no manifest.json"):
        ActivationCache(tmp_path)
