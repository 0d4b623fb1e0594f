"""fastsae.atomic: permissions under the umask, and the cleanup of killed writers' temporaries."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import pytest

import fastsae
from fastsae.atomic import (
    atomic_directory,
    atomic_write,
    current_umask,
    remove_stale_temporaries,
)
from fastsae.data.cache import write_manifest


@pytest.fixture
def umask_0022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing_it(umask_0022):
    assert current_umask() == 0o022
    assert current_umask() == 0o022


def test_saved_sae_has_the_umask_permissions(tmp_path, umask_0022):
    path = fastsae.TopKSAE(d_in=4, d_sae=8, k=2).save(tmp_path / "sae")
    assert _mode(path) == 0o755
    for name in ("cfg.json", "sae_weights.safetensors"):
        assert _mode(path / name) == 0o644, name


def test_atomic_write_and_overwrite_use_the_umask(tmp_path, umask_0022):
    atomic_directory(tmp_path / "d", {"a.bin": lambda p: p.write_bytes(b"1")})
    atomic_directory(tmp_path / "d", {"a.bin": lambda p: p.write_bytes(b"2")})  # replace in place
    assert _mode(tmp_path / "d" / "a.bin") == 0o644 and _mode(tmp_path / "d") == 0o755
    write_manifest(tmp_path, {"x": 1})
    atomic_write(tmp_path / "f.bin", lambda f: f.write(b"x"))
    assert _mode(tmp_path / "manifest.json") == _mode(tmp_path / "f.bin") == 0o644


def test_a_stricter_umask_is_respected(tmp_path):
    old = os.umask(0o077)
    try:
        path = atomic_directory(tmp_path / "d", {"a.bin": lambda p: p.write_bytes(b"1")})
    finally:
        os.umask(old)
    assert _mode(path) == 0o700 and _mode(path / "a.bin") == 0o600


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = _dead_pid()
    stale = [
        tmp_path / f".step-00000010.tmp-p{dead}-abc123_x",  # a killed writer
        tmp_path / ".sae.tmp-k2j4h5g6",  # an older fastsae's temporary (names no process)
    ]
    live = [
        tmp_path / f".step-00000020.tmp-p{os.getpid()}-abcdefgh",  # this process: live
        tmp_path / ".step-00000030.tmp-p1-abcdefgh",  # pid 1 is always alive
    ]
    others = [tmp_path / "step-00000010", tmp_path / ".hidden", tmp_path / ".x.tmp-has-dash"]
    for p in stale + live + others:
        p.mkdir()
        (p / "state.json").write_text("partial")
    (tmp_path / f".manifest.json.tmp-p{dead}-qwertyui").write_text("{")  # a stale file
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([*stale, tmp_path / f".manifest.json.tmp-p{dead}-qwertyui"])
    assert all(p.exists() for p in live + others)
    assert all(not p.exists() for p in stale)


def test_name_limits_the_cleanup_to_one_target(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".sae.tmp-p{dead}-aaaaaaaa").mkdir()
    (tmp_path / f".other.tmp-p{dead}-aaaaaaaa").mkdir()
    assert [p.name for p in remove_stale_temporaries(tmp_path, name="sae")] == [
        f".sae.tmp-p{dead}-aaaaaaaa"
    ]
    assert (tmp_path / f".other.tmp-p{dead}-aaaaaaaa").exists()
    (tmp_path / f".step-00000001.tmp-p{dead}-aaaaaaaa").mkdir()
    removed = remove_stale_temporaries(tmp_path, name=re.compile(r"step-\d{8}"))
    assert [p.name for p in removed] == [f".step-00000001.tmp-p{dead}-aaaaaaaa"]
    assert (tmp_path / f".other.tmp-p{dead}-aaaaaaaa").exists()


def test_saving_an_sae_removes_a_killed_save_of_it(tmp_path):
    dead = _dead_pid()
    leftover = tmp_path / f".sae.tmp-p{dead}-zzzzzzzz"
    leftover.mkdir()
    (leftover / "sae_weights.safetensors").write_bytes(b"partial")
    fastsae.TopKSAE(d_in=4, d_sae=8, k=2).save(tmp_path / "sae")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
