"""Checkpoint integrity (issue 11): a sha256 per tensor file, finite tensors only, and the cleanup
of temporaries left by killed saves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastsae.train import CheckpointError, Trainer, load_checkpoint, save_checkpoint
from fastsae.train.checkpoint import (
    latest_good_checkpoint,
    list_checkpoints,
    read_checkpoint,
    remove_stale_run_temporaries,
)
from tests.train.test_trainer import _KILL_MID_WRITE, _run, small_cfg


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_sha256_of_the_tensor_file_is_stored(tmp_path):
    path = save_checkpoint(_run(small_cfg(), 0, 2), tmp_path)
    meta = json.loads((path / "state.json").read_text())
    assert meta["format"] == 2 and len(meta["sha256"]["state.safetensors"]) == 64


def test_a_flipped_data_bit_is_reported_naming_the_file(tmp_path):
    path = save_checkpoint(_run(small_cfg(), 0, 2), tmp_path)
    tensor_file = path / "state.safetensors"
    _flip_byte(tensor_file, tensor_file.stat().st_size - 100)  # a data byte, not the header
    load_file(str(tensor_file))  # still a well-formed safetensors file: only the checksum sees it
    with pytest.raises(
        CheckpointError, match=r"state.safetensors is truncated or corrupt: its sha256"
    ):
        load_checkpoint(Trainer(small_cfg()), path)
    assert latest_good_checkpoint(tmp_path) is None


def _rewrite_with_nan(path):
    """A NaN in W_dec, with a matching checksum (as if the run itself had saved it)."""
    tensors = load_file(str(path / "state.safetensors"))
    tensors["sae/W_dec"][0, 0] = float("nan")
    save_file(tensors, str(path / "state.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    from fastsae.atomic import sha256_file

    meta["sha256"]["state.safetensors"] = sha256_file(path / "state.safetensors")
    (path / "state.json").write_text(json.dumps(meta))


def test_non_finite_checkpoint_is_not_good(tmp_path):
    trainer = _run(small_cfg(), 0, 2)
    good = save_checkpoint(trainer, tmp_path)
    trainer.step(torch.randn(128, 24))
    bad = save_checkpoint(trainer, tmp_path)
    _rewrite_with_nan(bad)
    with pytest.raises(CheckpointError, match="non-finite values in sae/W_dec"):
        read_checkpoint(bad)
    assert latest_good_checkpoint(tmp_path) == good


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer = _run(small_cfg(), 0, 2)
    good = save_checkpoint(trainer, tmp_path)
    trainer.step(torch.randn(128, 24))
    with torch.no_grad():
        trainer.scaled_sae.W_enc[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=rf"non-finite values in sae/W_enc.*{good}"):
        save_checkpoint(trainer, tmp_path)
    assert list_checkpoints(tmp_path) == [good]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [good.name]


def test_format_1_checkpoints_still_load(tmp_path):
    trainer = _run(small_cfg(), 0, 2)
    path = save_checkpoint(trainer, tmp_path)
    meta = json.loads((path / "state.json").read_text())
    meta["format"] = 1
    del meta["sha256"]
    (path / "state.json").write_text(json.dumps(meta))
    second = Trainer(small_cfg())
    load_checkpoint(second, path)
    assert torch.equal(second.scaled_sae.W_dec, trainer.scaled_sae.W_dec)


def test_format_2_without_a_checksum_is_refused(tmp_path):
    path = save_checkpoint(_run(small_cfg(), 0, 2), tmp_path)
    meta = json.loads((path / "state.json").read_text())
    del meta["sha256"]
    (path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="no sha256 of state.safetensors"):
        read_checkpoint(path)


def test_temporaries_of_a_killed_save_are_removed_on_resume_and_on_save(tmp_path):
    for run in ("a", "b"):
        proc = subprocess.run(
            [sys.executable, "-c", _KILL_MID_WRITE, str(tmp_path / run)], capture_output=True
        )
        assert proc.returncode == -9, proc.stderr.decode()
        names = os.listdir(tmp_path / run / "checkpoints")
        assert any(n.startswith(".step-00000002.tmp-") for n in names), names
    (tmp_path / "a" / "checkpoints" / ".notes.tmp-abcdefgh").mkdir()  # not a checkpoint's
    cfg = small_cfg(d_in=8, d_sae=32, k=4, batch_size=16, buffer_tokens=32)
    trainer = Trainer(cfg)
    load_checkpoint(trainer, list_checkpoints(tmp_path / "a")[-1])  # resume
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == [
        ".notes.tmp-abcdefgh",
        "step-00000001",
    ]
    save_checkpoint(Trainer(cfg), tmp_path / "b")  # the next save
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["step-00000000", "step-00000001"]


def test_a_nan_stop_names_a_checkpoint_that_verifies(tmp_path, capsys, monkeypatch):
    """The newest checkpoint is corrupt when the loss turns NaN: the run names the one before."""
    from fastsae.train import NonFiniteLossError
    from fastsae.train.__main__ import main
    from tests.train.test_cli import SMALL

    out = tmp_path / "run"
    real_step = Trainer.step

    def step(self, x, y=None):
        if self.step_count == 2:
            newest = list_checkpoints(out)[-1]
            _flip_byte(
                newest / "state.safetensors", (newest / "state.safetensors").stat().st_size - 8
            )
            raise NonFiniteLossError(3, float("nan"))
        return real_step(self, x, y)

    monkeypatch.setattr(Trainer, "step", step)
    code = main([*SMALL, "--out-dir", str(out), "--checkpoint-every-tokens", "512"])
    assert code == 1
    err = capsys.readouterr().err
    assert f"last good checkpoint: {out / 'checkpoints' / 'step-00000001'}" in err
    read_checkpoint(out / "checkpoints" / "step-00000001")


@pytest.mark.parametrize(
    ("field", "value"),
    [("step", "7"), ("tokens", -1), ("initialized", 1), ("config", []), ("data_state", None)],
)
def test_tampered_counters_in_state_json_are_refused(tmp_path, field, value):
    path = save_checkpoint(_run(small_cfg(), 0, 2), tmp_path)
    meta = json.loads((path / "state.json").read_text())
    meta[field] = value
    (path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"state.json is corrupt: '?{field}"):
        load_checkpoint(Trainer(small_cfg()), path)


def test_a_run_directory_is_cleaned_of_killed_writes(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = proc.pid
    stale = [
        tmp_path / "checkpoints" / f".step-00000004.tmp-p{dead}-abcdefgh",
        tmp_path / f".sae.tmp-p{dead}-abcdefgh",
    ]
    live = tmp_path / "checkpoints" / f".step-00000005.tmp-p{os.getpid()}-abcdefgh"
    for p in [*stale, live]:
        p.mkdir(parents=True)
    assert sorted(remove_stale_run_temporaries(tmp_path)) == sorted(stale)
    assert live.exists()


def test_starting_a_run_removes_what_killed_writes_left(tmp_path, monkeypatch):
    from fastsae.train.__main__ import main
    from tests.train.test_cli import SMALL

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    out = tmp_path / "run"
    stale = [
        out / "checkpoints" / f".step-00000004.tmp-p{proc.pid}-abcdefgh",
        out / f".sae.tmp-p{proc.pid}-abcdefgh",
    ]
    for p in stale:
        p.mkdir(parents=True)
    seen = []
    real_step = Trainer.step

    def step(self, x, y=None):
        seen.append([p.exists() for p in stale])  # before any checkpoint or SAE is saved
        return real_step(self, x, y)

    monkeypatch.setattr(Trainer, "step", step)
    assert main([*SMALL, "--out-dir", str(out), "--stop-after-steps", "1"]) == 130
    assert seen[0] == [False, False]
