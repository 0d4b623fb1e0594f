"""fastsae.data.cache: the layout, bit-exact round trips, reading, integrity errors."""

from __future__ import annotations

import json
import shutil
import threading

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


# -- the manifest is checked against itself and the shards on open (issue 11) -------------------


@pytest.fixture(scope="module")
def pristine_cache(tmp_path_factory, demo_source, demo_sequences):
    path = tmp_path_factory.mktemp("pristine")
    write_cache(path, demo_source, _sequences(demo_sequences, 4), tokens=500, shard_tokens=200)
    return path


@pytest.fixture
def cache_copy(tmp_path, pristine_cache):
    shutil.copytree(pristine_cache, tmp_path / "c")
    return tmp_path / "c"


def _edit_manifest(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _set_width(m, width):
    m["d"][HOOKS[0]] = width
    m["columns"][0]["d"] = width


def _set_dtype(m, dtype):
    m["dtype"] = dtype
    for col in m["columns"][:-1]:
        col["dtype"] = dtype


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("shards"), "'shards' must be a list, got None"),
        (lambda m: m.update(shards={}), "'shards' must be a list"),
        (lambda m: m["d"].update({HOOKS[0]: 64}), "'columns' .* do not match hooks, d and dtype"),
        (lambda m: _set_width(m, 64), r"shard 0: bytes=\d+ offsets=.* do not match 200 tokens"),
        (lambda m: m.update(dtype="bfloat16"), "'columns' .* do not match"),
        (lambda m: _set_dtype(m, "bfloat16"), "shard 0: bytes=.* do not match"),
        (lambda m: m.update(dtype="int8"), "dtype='int8' is unknown"),
        (lambda m: m.update(token_count=999), "token_count=999, but the shards hold 500 tokens"),
        (lambda m: m.update(token_count="500"), "'token_count' must be a int"),
        (lambda m: m.update(complete=False), "the cache is incomplete"),
        (lambda m: m.pop("complete"), "the cache is incomplete"),
        (lambda m: m["shards"][1].update(file="../shard-00001.bin"), "file='../shard-00001.bin'"),
        (lambda m: m["shards"][1].update(start=0), "shard 1: start=0 tokens=200; expected start=200"),
        (lambda m: m["shards"][2].update(sha256=None), "shard 2: sha256=None"),
        (lambda m: m.update(hooks=[]), "'hooks' must be a non-empty list"),
    ],
    ids=[
        "no-shards", "shards-dict", "d", "d-and-columns", "dtype", "dtype-and-columns",
        "dtype-unknown", "token-count", "token-count-str", "incomplete", "no-complete",
        "path", "start", "sha", "no-hooks",
    ],
)  # fmt: skip
def test_a_manifest_that_disagrees_with_its_shards_is_refused_on_open(cache_copy, change, message):
    _edit_manifest(cache_copy, change)
    with pytest.raises(ValueError, match=message):
        ActivationCache(cache_copy, verify="none")


def test_an_incomplete_cache_opens_only_when_asked(cache_copy):
    _edit_manifest(cache_copy, lambda m: m.update(complete=False))
    assert len(ActivationCache(cache_copy, allow_incomplete=True)) == 500


def test_a_deeply_nested_manifest_is_a_clear_error(cache_copy):
    (cache_copy / "manifest.json").write_text('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="manifest.json is nested too deeply"):
        ActivationCache(cache_copy)


def test_training_verifies_every_shard_before_the_first_step(cache_copy):
    from fastsae.train import TrainConfig
    from fastsae.train.data import open_data

    _flip_byte(cache_copy / "shard-00002.bin", offset=10)  # the last shard
    cfg = TrainConfig(
        cache_dir=str(cache_copy), hook=HOOKS[0], d_sae=64, k=4, batch_size=64,
        buffer_tokens=128, eval_tokens=100, backend="torch", progress=False,
    )  # fmt: skip
    with pytest.raises(CacheIntegrityError, match="shard shard-00002.bin is corrupt"):
        open_data(cfg, device=torch.device("cpu"))


# -- one writer per directory (issue 11) ------------------------------------------------------


class _BlockingSource:
    """Wraps a source; its first ``activations`` call waits until ``release`` is set."""

    def __init__(self, source):
        self._source = source
        self.inside = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._source, name)

    def activations(self, tokens, attention_mask=None):
        self.inside.set()
        assert self.release.wait(60)
        return self._source.activations(tokens, attention_mask)


def test_a_second_writer_into_the_same_directory_is_refused(tmp_path, demo_source, demo_sequences):
    seqs = _sequences(demo_sequences, 2)
    blocking = _BlockingSource(demo_source)
    results = {}

    def first():
        results["manifest"] = write_cache(tmp_path, blocking, seqs, tokens=200, shard_tokens=100)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert blocking.inside.wait(60)
        with pytest.raises(ValueError, match=f"activation cache {tmp_path} is being written by"):
            write_cache(tmp_path, demo_source, seqs, tokens=200, shard_tokens=100)
    finally:
        blocking.release.set()
        thread.join(60)
    assert results["manifest"]["token_count"] == 200
    assert len(ActivationCache(tmp_path, verify="open")) == 200
    # the lock is released with the writer: the next writer (a no-op resume) gets it
    assert write_cache(tmp_path, demo_source, seqs, tokens=200, shard_tokens=100)["complete"]
