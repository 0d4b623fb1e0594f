"""A group of SAEs on one activation stream (``python -m fastsae.train --sweep`` / grid flags) on
the embedded model, at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastsae import ops
from fastsae.train.__main__ import main as _main
from fastsae.train.checkpoint import latest_checkpoint, read_checkpoint
from tests.train.test_cli import SMALL

# Three members that differ in width, k, architecture and hook; blocks.0 and blocks.1 come from
# the same model pass.
SWEEP = """
base: {seed: 0}
members:
  - {name: a, d_sae: 256, k: 8}
  - {name: b, d_sae: 384, k: 16, hook: blocks.0.hook_resid_post}
  - {name: c, d_sae: 256, k: 8, architecture: batchtopk}
"""
SOLO = {
    "a": ["--d-sae", "256", "--k", "8"],
    "b": ["--d-sae", "384", "--k", "16", "--hook", "blocks.0.hook_resid_post"],
    "c": ["--d-sae", "256", "--k", "8", "--architecture", "batchtopk"],
}


def main(argv: list[str]) -> int:
    # A solo run evaluates under the default backend, which is the interpreted Triton one under
    # TRITON_INTERPRET=1 (minutes); the group evaluates under the member's backend.
    with ops.use_backend("torch"):
        return _main(argv)


def _sweep(tmp_path: Path, text: str = SWEEP) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return str(path)


def _state(run_dir: str | Path) -> dict[str, torch.Tensor]:
    _, tensors = read_checkpoint(latest_checkpoint(run_dir))
    return {k: v for k, v in tensors.items() if not k.startswith("rng/")}


def _assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("group")
    out = tmp / "group"
    code = main([*SMALL, "--sweep", _sweep(tmp), "--out-dir", str(out), "--eval-every", "6"])
    return code, out, tmp


def test_every_member_is_bit_identical_to_its_solo_run(group_run):
    code, out, tmp = group_run
    assert code == 0
    for name, flags in SOLO.items():
        solo = tmp / f"solo-{name}"
        # evaluations (the group's every 6 steps) change no weight
        assert main([*SMALL, *flags, "--out-dir", str(solo)]) == 0
        # weights, buffers, Adam moments and step counts, firing counters, input scales
        _assert_equal_states(_state(out / "members" / name), _state(solo))
        # the group evaluates its members together (shared clean / zero-ablated passes): each
        # member's numbers are still exactly its solo run's
        grouped = json.loads((out / "members" / name / "final_metrics.json").read_text())
        alone = json.loads((solo / "final_metrics.json").read_text())
        grouped.pop("eval_seconds"), alone.pop("eval_seconds")
        assert grouped == alone


def test_group_writes_member_runs_summary_and_pareto(group_run):
    code, out, _ = group_run
    for name in SOLO:
        member = out / "members" / name
        for f in ("sae/cfg.json", "sae/sae_weights.safetensors", "sae/sparsity.safetensors"):
            assert (member / f).exists(), f
        for f in ("metrics.jsonl", "final_metrics.json", "training_curves.png", "config.json"):
            assert (member / f).exists(), f
        assert json.loads((member / "status.json").read_text())["status"] == "done"
    for f in ("summary.md", "summary.csv", "summary.json", "pareto.png", "group.json"):
        assert (out / f).stat().st_size > 0, f
    rows = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    assert all(r["status"] == "done" and r["l0"] > 0 and r["ce_loss_score"] for r in rows)
    assert (out / "summary.md").read_text().count("| done |") == 3
    assert (out / "summary.csv").read_text().splitlines()[0].startswith("name,status,")
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failing_member_is_reported_and_the_others_finish(tmp_path, capsys):
    sweep = _sweep(
        tmp_path,
        "members:\n  - {name: good, d_sae: 256, k: 8}\n  - {name: bad, d_sae: 256, k: 8, lr: 1.0e+30}\n"
        "  - {name: good2, d_sae: 256, k: 16}\n",
    )
    out = tmp_path / "g"
    assert main([*SMALL, "--sweep", sweep, "--out-dir", str(out)]) == 1
    captured = capsys.readouterr()
    assert "member bad failed at step" in captured.out and "loss is" in captured.out
    assert "failed members: bad" in captured.err
    rows = {r["name"]: r for r in json.loads((out / "summary.json").read_text())}
    assert rows["bad"]["status"] == "failed" and "loss is" in rows["bad"]["error"]
    assert rows["good"]["status"] == rows["good2"]["status"] == "done"
    assert (out / "members/good2/sae/sae_weights.safetensors").exists()
    assert not (out / "members/bad/sae").exists()
    assert (out / "pareto.png").exists()


def test_stopped_and_resumed_group_ends_with_the_same_weights(tmp_path, group_run):
    _, straight, _ = group_run
    split = tmp_path / "split"
    args = [*SMALL, "--sweep", _sweep(tmp_path), "--out-dir", str(split), "--eval-every", "6"]
    assert main([*args, "--stop-after-steps", "5"]) == 130
    for name in SOLO:
        assert json.loads((split / "members" / name / "status.json").read_text())["step"] == 5
    assert main(["--resume", str(split)]) == 0
    for name in SOLO:
        _assert_equal_states(_state(straight / "members" / name), _state(split / "members" / name))
    assert json.loads((split / "summary.json").read_text())[0]["status"] == "done"


def test_a_used_out_dir_is_refused(group_run, capsys):
    _, out, tmp = group_run
    assert main([*SMALL, "--sweep", _sweep(tmp), "--out-dir", str(out)]) == 1
    assert "already holds a run" in capsys.readouterr().err


def test_group_memory_estimate_refuses_up_front(tmp_path, capsys, monkeypatch):
    import fastsae.train.group as group

    monkeypatch.setattr(group, "available_bytes", lambda device: 1024)
    out = tmp_path / "g"
    assert main([*SMALL, "--d-sae", "256,512", "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "this group needs about" in err and "the largest member is n512" in err
    assert not (out / "members").exists()


def test_group_gemm_serves_the_eligible_members_and_stays_close(tmp_path, group_run, monkeypatch):
    """``--group-gemm true``: a and c (TopK and BatchTopK on blocks.1) share one stacked GEMM per
    step, b (alone on blocks.0) keeps its own; not bit-identical to the default, but close."""
    import fastsae.train.group as group

    _, bitwise, _ = group_run
    entered = []
    real = group.ops.shared_encoder_gemm

    def counting(x, encoders):
        entered.append(len(encoders))
        return real(x, encoders)

    monkeypatch.setattr(group.ops, "shared_encoder_gemm", counting)
    out = tmp_path / "fast"
    args = [*SMALL, "--sweep", _sweep(tmp_path), "--out-dir", str(out), "--group-gemm", "true"]
    assert main(args) == 0
    assert entered == [2] * 12  # 12 steps, members a and c
    assert json.loads((out / "group.json").read_text())["members"][0]["config"]["group_gemm"]
    fast = {r["name"]: r for r in json.loads((out / "summary.json").read_text())}
    exact = {r["name"]: r for r in json.loads((bitwise / "summary.json").read_text())}
    # b never used the stacked GEMM: its run is the bitwise one
    _assert_equal_states(_state(out / "members" / "b"), _state(bitwise / "members" / "b"))
    for name in ("a", "c"):
        assert fast[name]["status"] == "done"
        # rounding differences flip a few near-tie selections over 12 steps: same quality
        assert abs(fast[name]["fvu"] - exact[name]["fvu"]) < 0.02 * exact[name]["fvu"] + 1e-3


def test_members_share_one_scratch_pool(tmp_path, monkeypatch):
    """Members step one after another on one thread: one slab buffer serves them all, for the
    steps and the evaluations (fastsae/ops/_scratch.py), not one per member."""
    used = []
    real = ops.scratch_memory

    def spy(pool=None):
        used.append(pool)
        return real(pool)

    monkeypatch.setattr(ops, "scratch_memory", spy)
    two = "members:\n  - {name: a, d_sae: 256, k: 8}\n  - {name: b, d_sae: 384, k: 16}\n"
    argv = [*SMALL, "--total-tokens", str(512 * 4), "--eval-every", "2"]
    code = main([*argv, "--sweep", _sweep(tmp_path, two), "--out-dir", str(tmp_path / "g")])
    assert code == 0
    assert len(used) > 8 and used[0] is not None
    assert {id(p) for p in used} == {id(used[0])}
    assert used[0].nbytes > 0
