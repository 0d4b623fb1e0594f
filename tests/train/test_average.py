"""Weight averaging (``TrainConfig.ema_gamma``): the power-function EMA of Karras et al. (2024),
kept beside the raw weights, saved in checkpoints and served as the run's SAE."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from fastsae.train import Trainer
from fastsae.train.memory import estimate
from tests.train.test_trainer import _run, batch, small_cfg


def _raw(trainer):
    return [p.detach().clone() for p in trainer.scaled_sae.parameters()]


@pytest.mark.parametrize("gamma", [0.0, 3.0, 15.0])
def test_average_is_the_power_function_ema_of_the_raw_weights(gamma):
    trainer = Trainer(small_cfg(ema_gamma=gamma, dtype="float64"))
    expected = None
    for t in range(1, 9):
        trainer.step(batch(t))
        raw = _raw(trainer)
        if expected is None:
            expected = raw
        else:
            # the definition, written out: avg_t = beta_t avg_{t-1} + (1 - beta_t) w_t
            beta = (1 - 1 / t) ** (gamma + 1)
            expected = [beta * a + (1 - beta) * w for a, w in zip(expected, raw, strict=True)]
    for a, b in zip(trainer.averaged, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if gamma == 0.0:  # gamma 0 is the plain mean of every step's weights
        assert not torch.equal(trainer.averaged[0], _raw(trainer)[0])


def test_the_served_sae_is_the_average_and_none_serves_the_raw_weights():
    averaged = _run(small_cfg(ema_gamma=1.0), 0, 6)
    raw = _run(small_cfg(ema_gamma=None), 0, 6)
    assert raw.averaged is None
    # training itself never reads the average: the raw weights are the same either way
    for a, b in zip(averaged.scaled_sae.parameters(), raw.scaled_sae.parameters(), strict=True):
        assert torch.equal(a, b)
    scale = averaged.in_scale.item()
    served = averaged.inference_sae()
    names = [name for name, _ in averaged.scaled_sae.named_parameters()]
    assert torch.equal(served.W_enc, averaged.averaged[names.index("W_enc")] * scale)
    assert not torch.equal(served.W_enc, raw.inference_sae().W_enc)
    assert torch.equal(raw.inference_sae().W_enc, raw.scaled_sae.W_enc * scale)
    # trainer.sae is the served SAE too, rebuilt after each step
    x = batch(99)
    with torch.no_grad():
        assert torch.equal(averaged.sae(x).recon, served(x).recon)


def test_bf16_weights_keep_an_fp32_average():
    # bf16 training needs a CUDA device; the average's arithmetic is checked directly
    trainer = Trainer(small_cfg(ema_gamma=1.0))
    trainer.scaled_sae.to(torch.bfloat16)
    trainer.step_count = 1
    trainer._update_average()
    assert {a.dtype for a in trainer.averaged} == {torch.float32}
    first = [a.clone() for a in trainer.averaged]
    with torch.no_grad():
        for p in trainer.scaled_sae.parameters():
            p.add_(0.5)
    trainer.step_count = 2
    trainer._update_average()  # beta_2 = (1/2) ** 2, so avg = first + 0.75 * 0.5
    for a, f in zip(trainer.averaged, first, strict=True):
        torch.testing.assert_close(a, f + 0.375, rtol=0, atol=4e-3)
    assert trainer.inference_sae().W_dec.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, True, "15"])
def test_bad_gamma_is_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match="ema_gamma="):
        small_cfg(ema_gamma=bad)


def test_memory_estimate_counts_one_more_copy_of_the_weights():
    on = estimate(small_cfg(ema_gamma=15.0), 24, 24)
    off = estimate(small_cfg(ema_gamma=None), 24, 24)
    assert off.average == 0
    assert on.average == on.weights  # fp32 weights: the same bytes again
    assert on.device_total - off.device_total == on.weights
    assert "weight average" in on.describe() and "weight average" not in off.describe()


def test_a_checkpoint_without_an_average_restarts_it_from_the_weights(tmp_path):
    from fastsae.train import load_checkpoint, save_checkpoint

    first = _run(small_cfg(ema_gamma=None), 0, 3)
    path = save_checkpoint(first, tmp_path)
    second = Trainer(small_cfg(ema_gamma=15.0))
    load_checkpoint(second, path)
    assert second.averaged is None
    second.step(batch(3))
    for a, w in zip(second.averaged, _raw(second), strict=True):
        assert torch.equal(a, w)
    again = copy.deepcopy(second.averaged)
    second.step(batch(4))
    assert not torch.equal(again[0], second.averaged[0])


def test_an_average_that_does_not_fit_is_dropped_with_a_warning(monkeypatch):
    import fastsae.train.trainer as trainer_module

    cfg = small_cfg(ema_gamma=15.0, optimizer_in_backward=False)
    mem = estimate(cfg, 24, 24)
    # room for the plain run but not for the average, at the trainer's 85% rule
    room = (mem.device_total - mem.average // 2) / 0.85
    monkeypatch.setattr(trainer_module, "available_bytes", lambda device: room)
    with pytest.warns(UserWarning, match=r"weight average \(ema_gamma=15.0\) needs .* raw weights"):
        trainer = Trainer(cfg)
    trainer.step(batch(0))
    assert trainer.average_gamma is None and trainer.averaged is None
    monkeypatch.setattr(trainer_module, "available_bytes", lambda device: 2 * mem.device_total)
    kept = Trainer(cfg)
    kept.step(batch(0))
    assert kept.averaged is not None


def test_preflight_counts_the_average_only_when_it_fits(monkeypatch):
    from fastsae.train import preflight

    cfg = small_cfg(ema_gamma=15.0)
    mem = estimate(cfg, 24, 24)
    lines = []
    room = mem.device_total + mem.host_buffer - mem.average // 2
    monkeypatch.setattr(preflight, "available_bytes", lambda device: room)
    got = preflight.check_memory(cfg, 24, 24, torch.device("cpu"), lines.append)
    assert got.average == 0 and "does not fit" in lines[0]
    monkeypatch.setattr(preflight, "available_bytes", lambda device: 2 * room)
    lines.clear()
    got = preflight.check_memory(cfg, 24, 24, torch.device("cpu"), lines.append)
    assert got.average == mem.average and "weight average" in lines[0]


def test_a_long_run_folds_the_weights_in_sparsely_and_serves_the_exact_ema():
    # gamma 0: the running mean. Weights w0 at step 1, then w1 for steps 2..T: the served
    # average is w0 / T + w1 (1 - 1/T) exactly, whichever steps the trainer folded in.
    trainer = Trainer(small_cfg(ema_gamma=0.0, dtype="float64"))
    trainer.step_count = 1
    trainer._update_average()
    w0 = _raw(trainer)
    with torch.no_grad():
        for p in trainer.scaled_sae.parameters():
            p.add_(1.0)
    folds = 0
    for t in range(2, 201):
        trainer.step_count = t
        before = trainer.averaged_step
        trainer._update_average()
        folds += trainer.averaged_step != before
        # never staler than 1/16 of the window (t / (gamma + 1) steps)
        assert t - trainer.averaged_step < max(1, t / 16)
    assert folds == 62  # every step up to t = 32, then every t // 16 steps; the last at 191
    served = trainer.averaged_weights()
    for a, w in zip(served, w0, strict=True):
        torch.testing.assert_close(a, w / 200 + (w + 1) * (1 - 1 / 200), rtol=1e-12, atol=1e-12)
    # the stored average is as of step 191; the served one folds in step 200's weights
    assert trainer.averaged_step == 191
    stored = trainer.averaged[0]
    assert not torch.allclose(stored, served[0], rtol=0, atol=1e-6)


def test_resume_between_sparse_folds_is_exact(tmp_path):
    from fastsae.train import load_checkpoint, save_checkpoint

    cfg = small_cfg(ema_gamma=0.0, total_tokens=128 * 60)
    straight = _run(cfg, 0, 60)
    first = _run(cfg, 0, 38)
    assert first.averaged_step == 37  # step 38 was not folded in: the stored average is older
    path = save_checkpoint(first, tmp_path)
    second = Trainer(cfg)
    load_checkpoint(second, path)
    assert second.averaged_step == 37
    _run(cfg, 38, 60, second)
    assert straight.averaged_step == second.averaged_step
    for a, b in zip(straight.averaged_weights(), second.averaged_weights(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("gamma", [None, 15.0])
def test_optimizer_in_backward_still_turns_on_by_itself(monkeypatch, gamma):
    import fastsae.train.trainer as trainer_module

    cfg = small_cfg(ema_gamma=gamma)  # optimizer_in_backward left at None
    monkeypatch.setattr(trainer_module, "available_bytes", lambda device: 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert Trainer(cfg).optimizer_in_backward
    monkeypatch.setattr(trainer_module, "available_bytes", lambda device: 2**40)
    assert not Trainer(cfg).optimizer_in_backward


def test_optimizer_in_backward_makes_room_for_the_average_before_it_is_dropped(monkeypatch):
    import fastsae.train.trainer as trainer_module

    cfg = small_cfg(ema_gamma=15.0)
    plain = estimate(small_cfg(ema_gamma=None), 24, 24)
    lean = estimate(cfg, 24, 24, optimizer_in_backward=True)
    full = estimate(cfg, 24, 24)
    assert plain.device_total < lean.device_total < full.device_total
    # the plain step fits, the average only with one gradient matrix at a time
    room = (lean.device_total + full.device_total) / 2 / 0.85
    monkeypatch.setattr(trainer_module, "available_bytes", lambda device: room)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped
        trainer = Trainer(cfg)
    assert trainer.optimizer_in_backward and trainer.average_gamma == 15.0


def test_a_run_that_dropped_the_average_serves_the_raw_weights_after_resume(tmp_path):
    from fastsae.train import load_checkpoint, save_checkpoint

    path = save_checkpoint(_run(small_cfg(ema_gamma=15.0), 0, 5), tmp_path)
    cfg = small_cfg(ema_gamma=None)  # as if this machine had no room for it
    resumed = Trainer(cfg)
    load_checkpoint(resumed, path)
    assert resumed.averaged is None
    _run(cfg, 5, 8, resumed)
    assert resumed.averaged is None and resumed.averaged_weights() is None
    scale = resumed.in_scale.item()
    assert torch.equal(resumed.inference_sae().W_enc, resumed.scaled_sae.W_enc * scale)


def test_the_cli_turns_the_average_off_with_none():
    import argparse

    from fastsae.cli import add_dataclass_arguments, dataclass_from_args
    from fastsae.train import TrainConfig

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    for text in ("none", "None", "null"):
        cfg = dataclass_from_args(TrainConfig, parser.parse_args(["--ema-gamma", text]))
        assert cfg.ema_gamma is None
    cfg = dataclass_from_args(TrainConfig, parser.parse_args(["--ema-gamma", "7"]))
    assert cfg.ema_gamma == 7.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--ema-gamma", "many"])
