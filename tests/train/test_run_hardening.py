"""Issue 11 (run/CLI half): no wrong metrics, no lost or mixed runs, one clear error per bad input.

Every run here is tiny (64 latents, four steps of 256 tokens) and in-process (``main(argv)``).
"""

from __future__ import annotations

import errno
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file

import fastsae.demo.model
import fastsae.train.checkpoint
from fastsae.eval import main as eval_main
from fastsae.train.__main__ import main
from fastsae.train.checkpoint import list_checkpoints, read_checkpoint
from fastsae.train.outdir import LOCK

TINY = [
    "--d-sae", "64", "--k", "4", "--batch-size", "256", "--buffer-tokens", "1024",
    "--total-tokens", str(256 * 4), "--eval-tokens", "256", "--model-batch-size", "4",
    "--context-size", "32", "--warmup-steps", "1", "--progress", "false", "--log-every", "1",
    "--backend", "torch",
]  # fmt: skip


def _run(out: Path, *extra: str) -> int:
    return main([*TINY, "--out-dir", str(out), *extra])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "sae" / "sae_weights.safetensors"))


def _metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _timeless(row):
    """A metrics row without its timings (tokens/s, seconds), which differ between runs."""
    if isinstance(row, dict):
        return {k: _timeless(v) for k, v in row.items() if "per_s" not in k and "seconds" not in k}
    return row


@pytest.fixture
def count_concurrent_forwards(monkeypatch):
    """Wrap the embedded model's forward: record how often two threads were inside it at once.
    A short sleep inside widens the window a race needs."""
    load = fastsae.demo.model.load_demo_model
    seen = {"active": 0, "overlaps": 0, "calls": 0}
    guard = threading.Lock()

    def instrumented(*args, **kwargs):
        model = load(*args, **kwargs)
        forward = model.forward

        def wrapped(*a, **k):
            with guard:
                seen["active"] += 1
                seen["calls"] += 1
                seen["overlaps"] += seen["active"] > 1
            try:
                time.sleep(0.003)
                return forward(*a, **k)
            finally:
                with guard:
                    seen["active"] -= 1

        model.forward = wrapped
        return model

    monkeypatch.setattr(fastsae.demo.model, "load_demo_model", instrumented)
    return seen


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: the error must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(fastsae.demo.model, "load_demo_model", refuse)


# -- 1. evaluation and the shuffler's fill thread never share the model ---------------------------


def test_eval_every_never_shares_the_model_and_is_deterministic(
    tmp_path, count_concurrent_forwards
):
    assert _run(tmp_path / "a", "--eval-every", "1") == 0
    seen = dict(count_concurrent_forwards)
    assert seen["calls"] > 0
    assert seen["overlaps"] == 0, "evaluation ran the model while the fill thread did"
    count_concurrent_forwards["calls"] = 0
    assert _run(tmp_path / "b", "--eval-every", "1") == 0
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a, rows_b = _metric_lines(tmp_path / "a"), _metric_lines(tmp_path / "b")
    assert [_timeless(r) for r in rows_a] == [_timeless(r) for r in rows_b]
    assert sum("eval" in r for r in rows_a) == 4


def test_final_metrics_equal_a_standalone_evaluation(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--eval-every", "2") == 0
    final = json.loads((out / "final_metrics.json").read_text())
    capsys.readouterr()
    assert eval_main([str(out / "sae")]) == 0
    captured = capsys.readouterr()
    standalone = json.loads(captured.out)
    # item 3: it says what it evaluated on, and uses the data recorded with the SAE
    assert "evaluating on model embedded, hook blocks.1.hook_resid_post" in captured.err
    assert "embedded corpus" in captured.err
    for key in ("mse", "fvu", "l0", "dead_pct", "ce_loss_score", "kl_score"):
        assert standalone[key] == pytest.approx(final[key], rel=1e-5, abs=1e-7), key


# -- 3. fastsae.eval: the recorded data, or --dataset; absolute paths ------------------------------


def test_eval_refuses_an_sae_that_records_no_data(tmp_path, capsys):
    sae = fastsae.TopKSAE(d_in=8, d_sae=16, k=2)
    sae.cfg.hook_name = "blocks.0.hook_resid_post"
    sae.cfg.model_name = "gpt2"
    sae.save(tmp_path / "sae")
    assert eval_main([str(tmp_path / "sae")]) == 1
    err = capsys.readouterr().err
    assert "does not record the data it was trained on" in err and "--dataset" in err


def test_relative_paths_are_stored_absolute(tmp_path, monkeypatch, capsys):
    from fastsae.data import text

    monkeypatch.chdir(tmp_path)
    docs = [d["text"].replace("\n", " ") for d in text.load_rows(None, split="train")[:40]]
    Path("corpus.txt").write_text("\n".join(docs) + "\n")
    assert _run(Path("rel"), "--dataset", "corpus.txt") == 0
    absolute = str(tmp_path / "corpus.txt")
    assert json.loads(Path("rel/config.json").read_text())["dataset"] == absolute
    cfg_json = json.loads(Path("rel/sae/cfg.json").read_text())
    assert cfg_json["metadata"]["fastsae_data"]["dataset"] == absolute
    final = json.loads(Path("rel/final_metrics.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert eval_main([str(tmp_path / "rel" / "sae")]) == 0
    captured = capsys.readouterr()
    assert f"dataset {absolute}" in captured.err
    assert json.loads(captured.out)["fvu"] == pytest.approx(final["fvu"], rel=1e-5)


def test_relative_model_path_is_made_absolute(tmp_path, monkeypatch):
    from fastsae.train import TrainConfig
    from fastsae.train.preflight import absolute_paths

    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(TrainConfig(model="my-model", hook="h"))
    assert cfg.model == str(tmp_path / "my-model")
    assert absolute_paths(TrainConfig(model="gpt2", hook="h")).model == "gpt2"


# -- 4, 6, 8, 15: resume ------------------------------------------------------------------------


@pytest.fixture
def stopped_run(tmp_path, capsys):
    """A run stopped with a checkpoint at step 2 (of 4)."""
    out = tmp_path / "orig"
    assert _run(out, "--stop-after-steps", "2") == 130
    return out, capsys.readouterr().out


def test_stop_after_steps_names_the_reason(stopped_run):
    _, printed = stopped_run
    assert "stopped by --stop-after-steps 2 at step 2" in printed
    assert "signal None" not in printed


def test_resuming_a_copied_run_writes_into_the_copy(tmp_path, stopped_run):
    orig, _ = stopped_run
    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)
    before = sorted(p.name for p in orig.rglob("*"))
    assert main(["--resume", str(copy), "--progress", "false"]) == 0
    assert (copy / "sae" / "cfg.json").exists()
    assert [p.name for p in list_checkpoints(copy)] == ["step-00000002", "step-00000004"]
    assert sorted(p.name for p in orig.rglob("*")) == before, "the original run was written to"
    moved = tmp_path / "moved"
    shutil.move(orig, moved)
    assert main(["--resume", str(moved), "--progress", "false"]) == 0
    assert not orig.exists() and (moved / "sae" / "cfg.json").exists()


def test_metrics_hold_each_step_once_after_resume(stopped_run):
    out, _ = stopped_run
    # a kill -9 after steps 3 and 4 were logged, the last line cut short, no checkpoint after 2
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + json.dumps({"step": 4, "loss": 1.0}))
        f.write("\n" + '{"step": 5, "lo')
    assert main(["--resume", str(out), "--progress", "false"]) == 0
    steps = [r["step"] for r in _metric_lines(out) if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_a_fresh_start_drops_stale_metrics(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 99, "loss": 5.0}) + "\n")
    assert _run(out) == 0
    assert [r["step"] for r in _metric_lines(out) if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--d-sae", "128"], "--d-sae 128 conflicts with the checkpoint's d_sae=64"),
        (["--architecture", "batchtopk"], "--architecture 'batchtopk' conflicts"),
        (["--hook", "blocks.0.hook_resid_post"], "--hook 'blocks.0.hook_resid_post' conflicts"),
        (["--lr", "0.5"], "--lr 0.5 conflicts"),
        (["--out-dir", "/tmp/elsewhere"], "continues in its own directory"),
        (["--config", "x.yaml"], "--config cannot be combined with --resume"),
    ],
)
def test_resume_refuses_flags_that_change_the_sae(stopped_run, capsys, no_model_load, flags, named):
    out, _ = stopped_run
    assert main(["--resume", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and err.count("\n") == 1
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002"]


def test_resume_accepts_safe_flags(stopped_run):
    out, _ = stopped_run
    args = ["--resume", str(out), "--total-tokens", str(256 * 5), "--log-every", "2"]
    assert main([*args, "--progress", "false"]) == 0
    assert read_checkpoint(list_checkpoints(out)[-1])[0]["step"] == 5


# -- 5. one run per out_dir ---------------------------------------------------------------------


def test_a_second_run_into_a_locked_out_dir_is_refused(tmp_path, capsys, no_model_load):
    out = tmp_path / "run"
    out.mkdir()
    with FileLock(str(out / LOCK)):
        assert _run(out) == 2
    err = capsys.readouterr().err
    assert f"out_dir={str(out)!r} is in use by another run" in err
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_the_lock_is_released_when_a_run_ends(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "--stop-after-steps", "1") == 130
    FileLock(str(out / LOCK), timeout=0).acquire()  # would raise Timeout if still held


# -- 12. raw tracebacks become one error, before the model loads --------------------------------


def _ro_dir(tmp_path: Path) -> str:
    """A directory that cannot be created: under a read-only directory, or (root ignores
    permission bits) under sysfs, which refuses mkdir even to root."""
    import os

    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        return str(ro / "run")
    return "/sys/fastsae-test-run"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dtype", "int32"], "dtype='int32' is not supported; allowed: float32"),
        (["--dtype", "bfloat16", "--device", "cpu"], "dtype='bfloat16' parameters need a CUDA"),
        (["--dtype", "float16", "--device", "cpu"], "dtype='float16' parameters need a CUDA"),
        (["--log-every", "0"], "log_every=0 must be >= 1"),
        (["--device", "tpu7"], "device='tpu7' is unknown; allowed: auto, cpu, cuda"),
        (["--backend", "triton", "--device", "cpu"], "backend='triton' needs a CUDA device"),
        (["--config", "/nonexistent/run.yaml"], "config file '/nonexistent/run.yaml' does not"),
        (["--out-dir", "FILE"], "is a file, not a directory"),
        (["--out-dir", "FILE/run"], "cannot be created or written"),
        (["--out-dir", "RO"], "cannot be created or written"),
        (["--k-aux", "-1"], "k_aux=-1 must be in [1, d_sae=64]"),
        (["--stop-after-steps", "0"], "--stop-after-steps 0 must be >= 1"),
    ],
)
def test_bad_input_is_one_error_before_the_model_loads(
    tmp_path, capsys, monkeypatch, no_model_load, flags, message
):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (tmp_path / "FILE").write_text("not a directory")
    flags = [f.replace("FILE", str(tmp_path / "FILE")) for f in flags]
    flags = [_ro_dir(tmp_path) if f == "RO" else f for f in flags]
    out = tmp_path / "run"
    try:
        code = _run(out, *flags)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and "usage:" not in err
    assert not out.exists()


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--d-sae", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --d-sae: invalid int value") and err.count("\n") == 1


def test_a_huge_shuffler_buffer_is_refused_before_the_model_loads(tmp_path, capsys, no_model_load):
    assert _run(tmp_path / "run", "--buffer-tokens", "1000000000") == 1
    err = capsys.readouterr().err
    assert "GiB of host memory" in err and "lower buffer_tokens" in err
    assert not (tmp_path / "run").exists()


def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    save_file = fastsae.train.checkpoint.save_file
    calls = []

    def fill_up(tensors, path):
        calls.append(path)
        if len(calls) >= 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        save_file(tensors, path)

    monkeypatch.setattr(fastsae.train.checkpoint, "save_file", fill_up)
    out = tmp_path / "run"
    assert _run(out, "--checkpoint-every-tokens", "256") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: writing a checkpoint of step 2 failed: no space left")
    assert "step-00000001" in err and err.count("\n") == 1
    (kept,) = list_checkpoints(out)
    assert kept.name == "step-00000001"
    read_checkpoint(kept)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]


def test_a_cache_smaller_than_a_batch_is_refused_before_training(tmp_path, capsys):
    from fastsae.data import TransformerLensSource, text, write_cache

    model = fastsae.demo.model.load_demo_model()
    seqs = text.token_sequences(text.load_rows(), model.tokenizer, 32)
    source = TransformerLensSource(model, ["blocks.1.hook_resid_post"])
    write_cache(tmp_path / "cache", source, seqs, tokens=300)
    out = tmp_path / "run"
    assert _run(out, "--cache-dir", str(tmp_path / "cache")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cache ") and "batch_size=256" in err and err.count("\n") == 1
    assert not out.exists()
