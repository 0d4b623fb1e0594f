"""Sweep descriptions: grid flags, sweep files and their errors (no training here)."""

from __future__ import annotations

import json

import pytest

from fastsae.train import TrainConfig
from fastsae.train.__main__ import main
from fastsae.train.sweep import SWEEP_PRESETS, expand, load_sweep, split_grid_flags


def test_grid_flags_are_taken_out_and_converted():
    rest, grid = split_grid_flags(
        ["--d-sae", "256,512", "--k=8,16", "--lr", "1e-3", "--hook", "a,b", "--seed", "3"]
    )
    assert rest == ["--lr", "1e-3", "--seed", "3"]
    assert grid == {"d_sae": [256, 512], "k": [8.0, 16.0], "hook": ["a", "b"]}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--k", "16,x"], "--k: 'x' is not a valid float"),
        (["--d-sae", "256,,512"], "--d-sae: empty value"),
        (["--d-sae", "256,256"], "--d-sae: repeated value"),
        (["--d-sae", "256,4.5"], "--d-sae: '4.5' is not a valid int"),
    ],
)
def test_bad_grid_values_name_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        split_grid_flags(argv)


def test_grid_is_the_product_and_names_say_the_values():
    members = expand(TrainConfig(), {"d_sae": [256, 512], "k": [8.0, 16.0]}, [])
    assert [m.name for m in members] == ["n256-k8", "n256-k16", "n512-k8", "n512-k16"]
    assert [(m.cfg.d_sae, m.cfg.k) for m in members] == [(256, 8), (256, 16), (512, 8), (512, 16)]


def test_a_bad_member_is_named():
    with pytest.raises(ValueError, match=r"member 'n256-k512': k=512 must be in \[1, d_sae=256\]"):
        expand(TrainConfig(), {"d_sae": [256, 1024], "k": [512]}, [])


def test_members_must_share_the_stream():
    with pytest.raises(ValueError, match="batch_size differs across members"):
        expand(TrainConfig(), {"batch_size": [512, 1024]}, [])


def test_sweep_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  d_sea: [1, 2]\n")
    with pytest.raises(ValueError, match="'d_sea' is not a TrainConfig field"):
        load_sweep(str(bad))
    bad.write_text("grids:\n  d_sae: [1, 2]\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_sweep(str(bad))
    with pytest.raises(ValueError, match="neither a file nor a named sweep"):
        load_sweep(str(tmp_path / "missing.yaml"))


def test_cli_reports_grid_errors_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--k", "16,abc"])
    assert exc.value.code == 2
    assert "--k: 'abc' is not a valid float" in capsys.readouterr().err


def test_sweep_file_base_grid_members_and_flags(tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        "base: {total_tokens: 100000, d_sae: 512}\n"
        "grid: {k: [8, 16]}\n"
        "members:\n  - {architecture: batchtopk, k: 32, name: btk}\n"
    )
    # flags win over the file's base; a grid flag replaces the file's grid entry
    assert main(["--sweep", str(spec), "--print-config", "--total-tokens", "8192"]) == 0
    members = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in members] == ["k8", "k16", "btk"]
    assert {m["total_tokens"] for m in members} == {8192}
    assert {m["d_sae"] for m in members} == {512}
    assert members[2]["architecture"] == "batchtopk"
    assert main(["--sweep", str(spec), "--print-config", "--k", "4,5,6"]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["k4", "k5", "k6", "btk"]


def test_default_sweep_preset_is_valid():
    spec = load_sweep("default")
    members = expand(TrainConfig(**spec.base), spec.grid, spec.members)
    assert len(members) == len(SWEEP_PRESETS["default"]["members"]) + 6


def test_pareto_ticks_skip_near_duplicates_and_keep_whole_numbers():
    from fastsae.train.pareto import _spread_ticks

    assert _spread_ticks([8, 15.85, 16, 31.6, 32, 32]) == [8, 16, 32]
    assert _spread_ticks([8, 23.64, 38.47]) == [8, 23.64, 38.47]
