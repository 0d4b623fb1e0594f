"""Trainer: every architecture steps, resume is exact, bad states are caught, files are atomic."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fastsae
from fastsae import ops
from fastsae.train import (
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    load_checkpoint,
    save_checkpoint,
)
from fastsae.train.checkpoint import latest_checkpoint, list_checkpoints
from tests.tolerances import assert_close


def batch(i: int, B: int = 128, d: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(B, d, generator=g) + 0.5


def small_cfg(**kw) -> TrainConfig:
    base = dict(
        d_in=24,
        d_sae=96,
        k=6,
        batch_size=128,
        buffer_tokens=256,
        total_tokens=128 * 12,
        dead_tokens=128 * 3,
        warmup_steps=2,
        backend="torch",
        # Bit-identity, resume and oracle tests need fp32 whatever "auto" picks on this machine.
        autocast="fp32",
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


ARCH_KW = {
    "topk": {"k": 6},
    "batchtopk": {"k": 6},
    "matryoshka_batchtopk": {"k": 6, "matryoshka_widths": [24, 48]},
    "jumprelu": {"k": None},
    "relu": {"k": None},
    "gated": {"k": None},
}


@pytest.mark.parametrize("arch", list(ARCH_KW))
@pytest.mark.parametrize("shape", ["sae", "transcoder", "skip_transcoder"])
def test_step_works_for_every_architecture_and_transcoders(arch, shape):
    kw = dict(ARCH_KW[arch])
    if shape != "sae":
        kw.update(d_out=16, skip_connection=shape == "skip_transcoder")
    trainer = Trainer(small_cfg(architecture=arch, **kw))
    before = {n: p.detach().clone() for n, p in trainer.scaled_sae.named_parameters()}
    for i in range(3):
        y = batch(100 + i)[:, :16] if shape != "sae" else None
        metrics = trainer.step(batch(i), y)
    assert metrics["step"] == 3 and metrics["tokens"] == 3 * 128
    for key in ("loss", "mse", "fvu", "l0", "dead_pct", "lr"):
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN
    changed = [n for n, p in trainer.scaled_sae.named_parameters() if not torch.equal(p, before[n])]
    assert "W_enc" in changed and "W_dec" in changed
    if trainer.cfg.decoder_normalized:
        assert_close(trainer.scaled_sae.W_dec.norm(dim=-1), torch.ones(96))


def averaged_copy(trainer):
    """The training module (scaled units) holding the trainer's weight average."""
    module = copy.deepcopy(trainer.scaled_sae)
    with torch.no_grad():
        for p, avg in zip(module.parameters(), trainer.averaged_weights(), strict=True):
            p.copy_(avg)
    return module


def _run(cfg, start, stop, trainer=None):
    trainer = trainer or Trainer(cfg)
    for i in range(start, stop):
        trainer.step(batch(i))
    return trainer


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("optimizer_in_backward", [False, True])
def test_resume_is_exact(tmp_path, arch, optimizer_in_backward):
    cfg = small_cfg(architecture=arch, optimizer_in_backward=optimizer_in_backward, **ARCH_KW[arch])
    straight = _run(cfg, 0, 10)
    first = _run(cfg, 0, 5)
    path = save_checkpoint(first, tmp_path, data_state={"batches": 5})
    second = Trainer(cfg)
    assert load_checkpoint(second, path) == {"batches": 5}
    _run(cfg, 5, 10, second)
    for (name, a), b in zip(
        straight.scaled_sae.state_dict().items(),
        second.scaled_sae.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), f"{name} differs after resume"
    for a, b in zip(straight.averaged, second.averaged, strict=True):
        assert torch.equal(a, b), "the weight average differs after resume"
    assert torch.equal(straight.since_fired, second.since_fired)
    assert straight.step_count == second.step_count == 10


def test_optimizer_in_backward_matches_plain_adam():
    plain = _run(small_cfg(optimizer_in_backward=False), 0, 6)
    fused = _run(small_cfg(optimizer_in_backward=True), 0, 6)
    for a, b in zip(plain.scaled_sae.parameters(), fused.scaled_sae.parameters(), strict=True):
        assert torch.equal(a, b)


def test_nan_loss_stops_before_the_update():
    trainer = _run(small_cfg(), 0, 3)
    before = {n: p.detach().clone() for n, p in trainer.scaled_sae.named_parameters()}
    bad = batch(3)
    bad[5, 2] = float("nan")
    with pytest.raises(NonFiniteLossError, match="at step 4"):
        trainer.step(bad)
    for n, p in trainer.scaled_sae.named_parameters():
        assert torch.equal(p, before[n]), n
    assert trainer.step_count == 3


def test_auxk_gradient_reaches_the_encoder():
    trainer = Trainer(small_cfg(aux_coeff=1.0))
    trainer.step(batch(0))
    dead = torch.zeros(96, dtype=torch.bool)
    dead[48:] = True
    x = (batch(1) * trainer.in_scale.item()).float()
    with ops.use_backend("torch"):
        result = trainer.scaled_sae.loss(x, dead_mask=dead, aux_coeff=1.0)
    grad = torch.autograd.grad(result.terms["auxk"], trainer.scaled_sae.W_enc)[0]
    assert torch.any(grad[:, dead] != 0), "AuxK must train the dead latents' encoder columns"


def test_keeps_only_the_newest_checkpoints(tmp_path):
    cfg = small_cfg(keep_checkpoints=2)
    trainer = Trainer(cfg)
    for i in range(4):
        trainer.step(batch(i))
        save_checkpoint(trainer, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


def test_truncated_checkpoint_is_reported(tmp_path):
    trainer = _run(small_cfg(), 0, 2)
    path = save_checkpoint(trainer, tmp_path)
    data = (path / "state.safetensors").read_bytes()
    (path / "state.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="state.safetensors is truncated or corrupt"):
        load_checkpoint(Trainer(small_cfg()), path)
    (path / "state.json").write_text('{"format": 1, "st')
    with pytest.raises(CheckpointError, match="state.json is truncated or corrupt"):
        load_checkpoint(Trainer(small_cfg()), path)


_KILL_MID_WRITE = textwrap.dedent(
    """
    import os, signal, sys, torch
    import fastsae.train.checkpoint as ckpt
    from fastsae.train import Trainer, TrainConfig, save_checkpoint

    cfg = TrainConfig(d_in=8, d_sae=32, k=4, batch_size=16, buffer_tokens=32, backend="torch")
    trainer = Trainer(cfg)
    trainer.step(torch.randn(16, 8))
    save_checkpoint(trainer, sys.argv[1])            # step-00000001: complete
    trainer.step(torch.randn(16, 8))

    def dying_save_file(tensors, filename, *a, **k):
        with open(filename, "wb") as f:
            f.write(b"partial")
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)         # killed in the middle of the write

    ckpt.save_file = dying_save_file
    save_checkpoint(trainer, sys.argv[1])
    """
)


def test_kill_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_MID_WRITE, str(tmp_path)], capture_output=True
    )
    assert proc.returncode == -9, proc.stderr.decode()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    trainer = Trainer(TrainConfig(d_in=8, d_sae=32, k=4, batch_size=16, buffer_tokens=32))
    load_checkpoint(trainer, latest_checkpoint(tmp_path))
    assert trainer.step_count == 1


def test_saved_sae_loads_in_saelens_with_identical_outputs(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    trainer = _run(small_cfg(), 0, 4)
    trainer.save_sae(tmp_path / "sae")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sl = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    ours = fastsae.load(tmp_path / "sae")
    x = batch(50)
    with torch.no_grad(), ops.use_backend("reference"):
        assert_close(sl.encode(x), ours.encode(x))
        assert_close(sl(x), ours(x).recon)
        # the saved SAE is the weight average and reads raw activations: the scaling is folded in
        scaled = (
            averaged_copy(trainer)(x.float() * trainer.in_scale.item()).recon
            / trainer.out_scale.item()
        )
        assert_close(ours(x).recon, scaled)
    sparsity = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert sparsity["metadata"]["sae_lens_version"] >= "6"
    assert os.path.exists(tmp_path / "sae" / "sparsity.safetensors")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 200}, r"k=200 must be in \[1, d_sae=96\]"),
        ({"architecture": "dense"}, "architecture='dense' is unknown"),
        (
            {"batch_size": 256, "buffer_tokens": 384},
            "batch_size=256 must be <= buffer_tokens / 2 = 192",
        ),
        ({"backend": "cuda"}, "backend='cuda' is unknown"),
        ({"encode_strategy": "heap"}, "encode_strategy='heap' is unknown"),
        ({"grad_clip": 1.0, "optimizer_in_backward": True}, "cannot be combined"),
        ({"autocast": "fp8"}, "autocast='fp8'"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_cfg(**kwargs)


def test_d_in_mismatch_is_reported():
    with pytest.raises(ValueError, match="d_in=24 does not match the activations' width 32"):
        Trainer(small_cfg(), d_in=32)
    trainer = Trainer(small_cfg())
    with pytest.raises(ValueError, match=r"x has shape \(128, 23\); expected \[B, 24\]"):
        trainer.step(torch.randn(128, 23))


def test_lr_schedule_warmup_constant_decay():
    trainer = Trainer(small_cfg(lr=1.0, warmup_steps=4, total_tokens=128 * 20, decay_start=0.5))
    lrs = [trainer.lr_at(s) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[5:10] == [1.0] * 5
    assert lrs[10] == 1.0 and lrs[15] == 0.5 and lrs[19] == pytest.approx(0.1)
    assert TrainConfig(d_sae=2**16, d_in=64).lr_for() == pytest.approx(
        TrainConfig(d_sae=2**14, d_in=64).lr_for() / 2
    )
    assert Trainer(TrainConfig(d_sae=64, k=4), d_in=32).learning_rate == pytest.approx(
        TrainConfig(d_sae=64, d_in=32).lr_for()
    )


def test_docs_list_every_training_option():
    """docs/training.md's option table covers every TrainConfig field."""
    import dataclasses
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "training.md").read_text()
    missing = [
        f.name
        for f in dataclasses.fields(TrainConfig)
        if f"`--{f.name.replace('_', '-')}`" not in text
    ]
    assert missing == []


def test_encode_strategy_setting_applies_around_the_forward(monkeypatch):
    monkeypatch.setenv("FASTSAE_ENCODE_STRATEGY", "torch")
    with Trainer(small_cfg(encode_strategy="slab"))._encode_strategy():
        assert ops.get_encode_strategy() == "slab"
    with Trainer(small_cfg())._encode_strategy():  # auto defers to the environment
        assert ops.get_encode_strategy() == "torch"


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka_batchtopk"])
def test_steps_with_the_scratch_pool_are_bit_identical_to_fresh_slabs(arch, monkeypatch):
    """On CPU the trainer's encodes write their pre-activation slabs into one reused buffer
    (fastsae/ops/_scratch.py); several slabs per step here, so each overwrites the last."""
    monkeypatch.setattr(ops._torch, "SLAB_ELEMENTS", 128 * 40)  # 40 latents per slab, 3 slabs
    cfg = small_cfg(architecture=arch, **ARCH_KW[arch], ema_gamma=None)
    pooled, fresh = Trainer(cfg), Trainer(cfg)
    assert pooled.scratch_pool is not None
    fresh.scratch_pool = None
    for i in range(6):
        pooled.step(batch(i))
        fresh.step(batch(i))
    assert pooled.scratch_pool.nbytes == 128 * 40 * 4
    for (name, a), b in zip(
        pooled.scaled_sae.state_dict().items(), fresh.scaled_sae.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_trainer_keeps_freed_memory_unless_told_not_to(keep, monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "keep_freed_memory", lambda: calls.append(1) or True)
    Trainer(small_cfg(keep_freed_memory=keep))
    assert calls == ([1] if keep else [])
