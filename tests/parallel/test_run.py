"""The command line under torchrun: a run stopped and resumed on another world size ends where an
uninterrupted run and one process (``sae.save``) end; a killed rank ends every rank with one clear error in bounded time, and
the last checkpoint still loads and exports.

Ranks are launched as ``python -m fastsae.train`` processes with torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), or by torchrun itself for the first run; every
wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastsae.parallel.checkpoint import export_sae, read_meta
from fastsae.parallel.launch import free_port
from fastsae.train.checkpoint import latest_checkpoint

from .conftest import HOOK

ROOT = Path(__file__).resolve().parents[2]


def _args(cache: str, out: Path, mode: str, **over) -> list[str]:
    flags = {
        "parallel": mode,
        "cache-dir": cache,
        "hook": HOOK,
        "d-sae": 64,
        "k": 5,
        "batch-size": 32,
        "buffer-tokens": 128,
        "eval-tokens": 100,
        "total-tokens": 320,
        "warmup-steps": 0,
        "lr": 3e-3,
        "dead-tokens": 96,
        "backend": "torch",
        "device": "cpu",
        "progress": "false",
        "out-dir": str(out),
    }
    flags.update(over)
    return [a for k, v in flags.items() for a in (f"--{k}", str(v))]


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    env.pop("TRITON_INTERPRET", None)
    return env


def _launch(world: int, args: list[str], **env) -> list[subprocess.Popen]:
    """One ``python -m fastsae.train`` per rank with torchrun's environment variables."""
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = _env(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            **env,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "fastsae.train", *args],
                env=rank_env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _wait(procs, timeout_s: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout_s
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, err))
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "sae" / "sae_weights.safetensors"))


def test_resume_on_another_world_size_matches_uninterrupted(tiny_cache, tmp_path):
    # Uninterrupted: torchrun itself, 2 latent ranks, 10 steps.
    full = tmp_path / "full"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["-m", "fastsae.train", *_args(tiny_cache, full, "latent")]
    done = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    # Stopped after 4 steps on 2 ranks, resumed on 4 latent ranks, then finished.
    part = tmp_path / "part"
    codes = _wait(_launch(2, _args(tiny_cache, part, "latent") + ["--stop-after-steps", "4"]), 240)
    assert [c for c, _ in codes] == [130, 130], codes[0][1][-3000:]
    assert read_meta(latest_checkpoint(part))["world"] == 2
    codes = _wait(_launch(4, _args(tiny_cache, part, "latent") + ["--resume", str(part)]), 240)
    assert [c for c, _ in codes] == [0] * 4, codes[0][1][-3000:]
    assert read_meta(latest_checkpoint(part))["world"] == 4

    # One process, no --parallel: the same batches (the rank-aware reader's order), sae.save.
    one = tmp_path / "one"
    cmd = [sys.executable, "-m", "fastsae.train", *_args(tiny_cache, one, "none")]
    done = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    want = _weights(one)
    for run in (full, part):
        got = _weights(run)
        assert want.keys() == got.keys()
        for name in want:
            # fp32 reduction order only (2 or 4 slabs against one); see test_trainer.py.
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
        sparsity = load_file(str(run / "sae" / "sparsity.safetensors"))["sparsity"]
        assert torch.equal(
            sparsity, load_file(str(one / "sae" / "sparsity.safetensors"))["sparsity"]
        )


def test_killed_rank_ends_every_rank_and_checkpoint_loads(tiny_cache, tmp_path):
    out = tmp_path / "run"
    args = _args(tiny_cache, out, "dp", **{"total-tokens": 10**8, "checkpoint-every-tokens": 64})
    procs = _launch(2, args, FASTSAE_DIST_TIMEOUT_S="20")
    try:
        deadline = time.monotonic() + 180
        while latest_checkpoint(out) is None:
            assert time.monotonic() < deadline, "no checkpoint written"
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        (code0, err0), (code1, _) = _wait(procs, 90)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert time.monotonic() - killed_at < 60
    assert code1 == -signal.SIGKILL
    assert code0 == 1, err0[-3000:]
    lines = [ln for ln in err0.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "another rank died" in lines[0], err0[-3000:]
    assert "last checkpoint:" in lines[0]
    ckpt = latest_checkpoint(out)
    read_meta(ckpt)
    export_sae(ckpt, tmp_path / "sae")
    assert (tmp_path / "sae" / "sae_weights.safetensors").exists()
