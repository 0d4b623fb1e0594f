"""``python -m fastsae.train`` end to end on the embedded model and corpus (small settings)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastsae
import fastsae.demo.model
from fastsae.train.__main__ import main
from fastsae.train.checkpoint import list_checkpoints

SMALL = [
    "--d-sae", "256", "--k", "8", "--batch-size", "512", "--buffer-tokens", "2048",
    "--total-tokens", str(512 * 12), "--eval-tokens", "512", "--model-batch-size", "8",
    "--context-size", "64", "--warmup-steps", "2", "--progress", "false", "--log-every", "1",
    "--backend", "torch",  # the Triton kernels have their own tests; here they would run interpreted
]  # fmt: skip


def _train(tmp_path, *extra: str, name: str = "run") -> tuple[int, str]:
    out = tmp_path / name
    code = main([*SMALL, "--out-dir", str(out), *extra])
    return code, str(out)


def test_default_run_writes_an_sae_that_saelens_loads(tmp_path, capsys):
    code, out = _train(tmp_path)
    assert code == 0
    printed = capsys.readouterr().out
    assert f"saved SAE to {out}/sae" in printed and "ce_loss_score" in printed
    final = json.loads(Path(out, "final_metrics.json").read_text())
    assert 0 < final["fvu"] < 2 and final["l0"] == 8
    for key in ("ce_loss_score", "kl_score", "dead_pct", "explained_variance"):
        assert key in final
    for name in ("metrics.jsonl", "training_curves.png", "feature_density.png", "config.json"):
        assert os.path.exists(f"{out}/{name}"), name
    sae_lens = pytest.importorskip("sae_lens")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sl = sae_lens.SAE.load_from_disk(f"{out}/sae")
    ours = fastsae.load(f"{out}/sae")
    assert ours.cfg.hook_name == "blocks.1.hook_resid_post"
    x = torch.randn(16, ours.d_in) * 5
    with torch.no_grad():
        torch.testing.assert_close(sl(x), ours(x).recon, rtol=1e-4, atol=1e-4)


def test_stopped_and_resumed_run_ends_with_the_same_weights(tmp_path):
    code, straight = _train(tmp_path, name="straight")
    assert code == 0
    code, split = _train(tmp_path, "--stop-after-steps", "5", name="split")
    assert code == 130
    assert [p.name for p in list_checkpoints(split)] == ["step-00000005"]
    assert main(["--resume", split, "--progress", "false"]) == 0
    a = load_file(f"{straight}/sae/sae_weights.safetensors")
    b = load_file(f"{split}/sae/sae_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_nan_loss_stops_the_run_naming_the_step(tmp_path, capsys):
    # an absurd learning rate overflows the weights within a few steps
    code, out = _train(tmp_path, "--lr", "1e30", "--checkpoint-every-tokens", "512")
    assert code == 1
    err = capsys.readouterr().err
    assert "at step" in err and "last good checkpoint" in err
    kept = list_checkpoints(out)
    assert kept, "the checkpoints written before the NaN must remain"
    fastsae.train.checkpoint.read_checkpoint(kept[-1])


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "sig"
    args = [*SMALL, "--total-tokens", str(512 * 400), "--out-dir", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastsae.train", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 2
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopped by signal" in stdout and "--resume" in stdout
    assert "Traceback" not in stderr
    kept = list_checkpoints(out)
    assert len(kept) == 1
    fastsae.train.checkpoint.read_checkpoint(kept[0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "300"], "k=300 must be in [1, d_sae=256]"),
        (["--architecture", "dense"], "architecture='dense' is unknown"),
        (["--batch-size", "4096"], "batch_size=4096 must be <= buffer_tokens / 2"),
        (["--d-in", "77"], "d_in=77 does not match the activations' width 128"),
    ],
)
def test_config_errors_are_reported_before_training(tmp_path, capsys, monkeypatch, args, message):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(fastsae.demo.model, "load_demo_model", refuse)
    try:
        code, _ = _train(tmp_path, *args)
    except SystemExit as e:  # argparse's error path
        code = e.code
    assert code in (1, 2)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_hook_lists_the_nearest_names(tmp_path, capsys):
    code, out = _train(tmp_path, "--hook", "blocks.1.hook_resid_pots")
    assert code == 2
    err = capsys.readouterr().err
    assert "blocks.1.hook_resid_post" in err
    assert not os.path.exists(out), "a refused run leaves no directory behind"


def test_resume_from_a_truncated_checkpoint_is_refused(tmp_path, capsys):
    code, out = _train(tmp_path, "--stop-after-steps", "2")
    assert code == 130
    (ckpt,) = list_checkpoints(out)
    data = (ckpt / "state.safetensors").read_bytes()
    (ckpt / "state.safetensors").write_bytes(data[:100])
    capsys.readouterr()
    assert main(["--resume", out]) == 2
    err = capsys.readouterr().err
    # one line, no usage block (issue 11, item 15)
    assert err.startswith("error: ") and "truncated or corrupt" in err
    assert err.count("\n") == 1 and "usage:" not in err


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--d-sae",
        "--k",
        "--aux-coeff",
        "--optimizer-in-backward",
        "--preset",
        "--resume",
    ):
        assert flag in text
    assert "(default: 4096)" in text
