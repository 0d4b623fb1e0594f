"""fastsae.data.writer: resuming an interrupted write, and ``python -m fastsae.cache`` on the
embedded model and corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastsae.data import ActivationCache, CacheIntegrityError, write_cache, writer


def _sequences(demo_sequences, n=None):
    return list(demo_sequences[:n])


def _flip_byte(path, offset=1000):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _shard_bytes(path):
    manifest = json.loads((path / "manifest.json").read_text())
    return manifest, [(path / s["file"]).read_bytes() for s in manifest["shards"]]


def test_resume_after_an_interrupted_write(tmp_path, demo_source, demo_sequences, failing_source):
    seqs = _sequences(demo_sequences)  # 24 sequences, 3048 rows
    kwargs = {"tokens": 2900, "shard_tokens": 450, "batch_size": 5, "dtype": "bfloat16"}
    full = tmp_path / "full"
    write_cache(full, demo_source, seqs, **kwargs)

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):  # dies in the 3rd forward pass: 2 x 5 x 127 = 1270 rows
        write_cache(part, failing_source(demo_source, 2), seqs, **kwargs)
    manifest = json.loads((part / "manifest.json").read_text())
    assert [s["tokens"] for s in manifest["shards"]] == [450, 450]
    assert not manifest["complete"]
    # a cut-off shard and a shard that was renamed but never listed: neither counts
    (part / ".shard-00002.bin.tmp-abc").write_bytes(b"partial")
    (part / "shard-00002.bin").write_bytes(b"never listed")
    # a second interruption, a little further on
    with pytest.raises(KeyboardInterrupt):
        write_cache(part, failing_source(demo_source, 2), seqs, **kwargs)
    write_cache(part, demo_source, seqs, **kwargs)

    full_manifest, full_bytes = _shard_bytes(full)
    part_manifest, part_bytes = _shard_bytes(part)
    assert part_bytes == full_bytes
    assert part_manifest["shards"] == full_manifest["shards"]
    assert sorted(p.name for p in part.iterdir()) == sorted(p.name for p in full.iterdir())
    cache = ActivationCache(part, verify="open")
    assert len(cache) == 2900


def test_resume_refuses_a_different_run(tmp_path, demo_source, demo_sequences, failing_source):
    seqs = _sequences(demo_sequences, 8)
    kwargs = {"tokens": 900, "shard_tokens": 100, "batch_size": 2}
    with pytest.raises(KeyboardInterrupt):
        write_cache(tmp_path, failing_source(demo_source, 1), seqs, **kwargs)
    with pytest.raises(ValueError, match="dtype: 'float32' in the cache, 'float16' now"):
        write_cache(tmp_path, demo_source, seqs, dtype="float16", **kwargs)
    _flip_byte(tmp_path / "shard-00000.bin", offset=3)
    with pytest.raises(CacheIntegrityError, match="shard-00000.bin is corrupt"):
        write_cache(tmp_path, demo_source, seqs, **kwargs)


def test_a_complete_cache_is_left_alone(tmp_path, demo_source, demo_sequences, failing_source):
    seqs = _sequences(demo_sequences, 4)
    write_cache(tmp_path, demo_source, seqs, tokens=300, shard_tokens=100)
    # no forward pass is needed the second time
    manifest = write_cache(
        tmp_path, failing_source(demo_source, 0), seqs, tokens=300, shard_tokens=100
    )
    assert manifest["token_count"] == 300


def test_running_out_of_text(tmp_path, demo_source, demo_sequences):
    manifest = write_cache(
        tmp_path, demo_source, _sequences(demo_sequences, 2), tokens=10_000, shard_tokens=100
    )
    assert manifest["token_count"] == 254 and manifest["exhausted"]
    assert len(ActivationCache(tmp_path)) == 254


def test_module_writes_a_cache_of_the_embedded_model(tmp_path):
    out = tmp_path / "acts"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "fastsae.cache", "--tokens", "1500", "--shard-tokens", "512",
         "--dtype", "bfloat16", "--batch-size", "4", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cache = ActivationCache(out, verify="open")
    assert cache.hooks == ("blocks.1.hook_resid_post",) and len(cache) == 1500
    assert cache.dtype == torch.bfloat16
    assert cache.manifest["model"] == "fastsae-demo-kjv"
    assert cache.manifest["dataset"] == "embedded"
    assert cache.read("blocks.1.hook_resid_post", 0, 1500).isfinite().all()


def test_main_in_process_with_two_hooks_and_a_local_file(tmp_path):
    data = tmp_path / "psalm.txt"
    data.write_text("The LORD is my shepherd; I shall not want.\n" * 40)
    manifest = writer.main(
        ["--hooks", "blocks.0.hook_resid_post", "blocks.2.hook_mlp_out", "--dataset", str(data),
         "--tokens", "300", "--context-size", "64", "--out", str(tmp_path / "c")]
    )  # fmt: skip
    assert manifest["hooks"] == ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]
    assert manifest["token_count"] == 300 and manifest["context_size"] == 64


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokens", "10"], "out is required"),
        (["--out", "x", "--tokens", "0"], "tokens=0 must be >= 1"),
        (["--out", "x", "--dataset", "nobody/nothing"], "HF_HUB_OFFLINE=1"),
        (["--out", "x", "--hooks", "blocks.1.hook_resid_pots"], "blocks.1.hook_resid_post"),
    ],
)
def test_errors_are_one_clear_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as info:
        writer.main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        writer.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--hooks", "--dataset", "--tokens", "--out", "--dtype", "--bos"):
        assert flag in out


def test_a_second_cache_command_fails_before_loading_the_model(tmp_path, capsys, monkeypatch):
    from filelock import FileLock

    import fastsae.data.models as models

    def no_model(*a, **k):
        raise AssertionError("the model was loaded although the directory is locked")

    monkeypatch.setattr(models, "open_source", no_model)
    out = tmp_path / "acts"
    out.mkdir()
    with FileLock(out / writer.LOCK, timeout=0), pytest.raises(SystemExit) as info:  # a live writer
        writer.main(["--tokens", "100", "--out", str(out)])
    assert info.value.code == 2
    assert f"activation cache {out} is being written by another process" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [writer.LOCK]
