"""``python -m benchmarks.group``'s command line (the cases themselves train SAEs for minutes and
run only as benchmarks)."""

from __future__ import annotations

import pytest

from benchmarks import group


def test_order_and_repeats_flags_parse():
    # --separate-first was read by main() but missing from the parser (an AttributeError)
    args = group.parse_args(["--separate-first", "--repeats", "3", "--group-gemm"])
    assert args.separate_first and args.group_gemm and args.repeats == 3
    assert group.parse_args([]).repeats == 2 and not group.parse_args([]).separate_first


def test_zero_repeats_are_refused(capsys):
    with pytest.raises(SystemExit):
        group.parse_args(["--repeats", "0"])
    assert "--repeats=0 must be >= 1" in capsys.readouterr().err


def test_threads_and_the_pretrained_source_parse(capsys):
    args = group.parse_args(["--threads", "1", "--sources", "pretrained"])
    assert args.threads == 1 and args.sources == ["pretrained"]
    assert group.parse_args([]).sources == ["live", "cache", "pretrained"]
    with pytest.raises(SystemExit):
        group.parse_args(["--threads", "0"])
    assert "--threads=0 must be >= 1" in capsys.readouterr().err


def test_gemm_steps_times_both_sets_on_the_same_steps():
    row = group.gemm_steps(members=2, steps=2, B=32)
    assert set(row["seconds_per_group_step"]) == {"own-gemm", "stacked-gemm"}
    assert all(t > 0 for t in row["seconds_per_group_step"].values())
    assert row["time_ratio_stacked_vs_own"] > 0
