"""Trainer.step on bad input: one clear error, and the trainer is left as it was (issue 11)."""

from __future__ import annotations

import pytest
import torch

from fastsae.train import Trainer
from tests.train.test_trainer import batch, small_cfg


def _snapshot(trainer):
    return {
        "params": {n: p.detach().clone() for n, p in trainer.scaled_sae.named_parameters()},
        "in_scale": trainer.in_scale.clone(),
        "out_scale": trainer.out_scale.clone(),
        "initialized": trainer.initialized,
        "step": trainer.step_count,
        "tokens": trainer.tokens,
    }


def _assert_untouched(trainer, before):
    after = _snapshot(trainer)
    for name, p in before["params"].items():
        assert torch.equal(after["params"][name], p), name
    for key in ("in_scale", "out_scale"):
        assert torch.equal(after[key], before[key]), key
    for key in ("initialized", "step", "tokens"):
        assert after[key] == before[key], key


def _nan_batch():
    x = batch(0)
    x[3, 1] = float("nan")
    return x


def _inf_batch():
    x = batch(0)
    x[7, 0] = float("inf")
    return x


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_nan_batch, "first batch holds NaN or infinite values"),
        (_inf_batch, "first batch holds NaN or infinite values"),
        (lambda: torch.zeros(128, 24), "first batch is all \\(near\\) zero"),
        (lambda: torch.full((128, 24), 1e-30), "first batch is all \\(near\\) zero"),
        (lambda: torch.zeros(0, 24), "empty batch"),
    ],
    ids=["nan", "inf", "zeros", "tiny", "empty"],
)
def test_bad_first_batch_is_refused_and_a_good_one_then_initialises(make, message):
    trainer = Trainer(small_cfg())
    before = _snapshot(trainer)
    with pytest.raises(ValueError, match=message):
        trainer.step(make())
    _assert_untouched(trainer, before)
    # the same good batch gives the same result as on a fresh trainer
    fresh = Trainer(small_cfg())
    assert trainer.step(batch(1)) | {"tokens_per_s": 0} == fresh.step(batch(1)) | {
        "tokens_per_s": 0
    }
    assert torch.isfinite(trainer.in_scale) and trainer.in_scale == fresh.in_scale
    assert torch.equal(trainer.scaled_sae.b_dec, fresh.scaled_sae.b_dec)


def test_bad_transcoder_target_in_the_first_batch_is_refused():
    trainer = Trainer(small_cfg(d_out=16))
    before = _snapshot(trainer)
    y = batch(5)[:, :16]
    y[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"first batch holds NaN .*\(y: 1 of 128 rows\)"):
        trainer.step(batch(0), y)
    _assert_untouched(trainer, before)


@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        (torch.ones(128, 24, dtype=torch.long), TypeError, "x has dtype torch.int64"),
        (torch.ones(128, 24, dtype=torch.int32), TypeError, "x has dtype torch.int32"),
        (torch.ones(128, 24, dtype=torch.bool), TypeError, "x has dtype torch.bool"),
        ([[0.0] * 24] * 4, TypeError, "x must be a torch.Tensor, got list"),
        (torch.randn(128, 23), ValueError, r"x has shape \(128, 23\); expected \[B, 24\]"),
        (torch.randn(2, 64, 24), ValueError, r"x has shape \(2, 64, 24\)"),
    ],
    ids=["int64", "int32", "bool", "list", "width", "3d"],
)
def test_step_refuses_non_float_or_misshaped_input(x, error, message):
    trainer = Trainer(small_cfg())
    before = _snapshot(trainer)
    with pytest.raises(error, match=message):
        trainer.step(x)
    _assert_untouched(trainer, before)


def test_step_refuses_a_bad_target():
    trainer = Trainer(small_cfg(d_out=16))
    with pytest.raises(TypeError, match="y has dtype torch.int64"):
        trainer.step(batch(0), torch.ones(128, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="y has 64 rows, x has 128"):
        trainer.step(batch(0), batch(1)[:64, :16])
    assert not trainer.initialized


def test_empty_batch_after_initialisation_is_refused():
    trainer = Trainer(small_cfg())
    trainer.step(batch(0))
    with pytest.raises(ValueError, match="x is an empty batch"):
        trainer.step(torch.zeros(0, 24))
    assert trainer.step_count == 1


def test_a_first_batch_whose_norm_overflows_is_refused():
    trainer = Trainer(small_cfg())
    with pytest.raises(ValueError, match="first batch is too large to scale"):
        trainer.step(torch.full((128, 24), 1e300, dtype=torch.float64))
    assert not trainer.initialized and trainer.in_scale == 1
