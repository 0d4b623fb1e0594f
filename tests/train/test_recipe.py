"""Default flags train every architecture to a usable SAE: explained variance >= 0.8 and L0 within
20% of the target, on the embedded model's real activations, with a small budget.

Also: the schedule and the dead-latent threshold follow the run's length.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from fastsae import reference as ref
from fastsae.train import TrainConfig, Trainer

TARGET_L0 = 16
ARCHS = ["topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "relu", "gated"]


@pytest.fixture(scope="module")
def activations():
    """~70k rows of the embedded model's blocks.1.hook_resid_post (d = 128) on the corpus:
    training rows from the train split, held-out rows from the held-out chapters."""
    from fastsae.data import open_source, text

    opened = open_source(None, ["blocks.1.hook_resid_post"], device="cpu")

    def rows(split: str, limit: int) -> torch.Tensor:
        seqs = text.token_sequences(text.load_rows(None, split=split), opened.tokenizer, 128)
        out, have = [], 0
        for batch in text.token_batches(seqs, 32):
            acts = opened.source.activations(batch)["blocks.1.hook_resid_post"].float()
            out.append(acts)
            have += acts.shape[0]
            if have >= limit:
                break
        return torch.cat(out)[:limit]

    torch.manual_seed(0)
    return rows("train", 65536), rows("held_out", 4096)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHS)
def test_default_flags_give_a_usable_sae(activations, architecture):
    train, held_out = activations
    B, steps = 512, 128
    extra = {"matryoshka_widths": [128]} if architecture == "matryoshka_batchtopk" else {}
    cfg = TrainConfig(
        architecture=architecture,
        d_in=train.shape[1],
        d_sae=1024,
        target_l0=TARGET_L0,
        batch_size=B,
        buffer_tokens=2 * B,
        total_tokens=B * steps,
        backend="torch",
        progress=False,
        **extra,
    )
    trainer = Trainer(cfg)
    for s in range(steps):
        trainer.step(train[s * B : (s + 1) * B])
    with torch.no_grad():
        out = trainer.sae(held_out)
        ev = 1.0 - float(ref.fvu(out.recon, held_out))
        l0 = float((out.dense_codes(cfg.d_sae) > 0).sum(-1).float().mean())
    assert ev >= 0.8, f"{architecture}: explained variance {ev:.3f}"
    assert abs(l0 - TARGET_L0) <= 0.2 * TARGET_L0, f"{architecture}: L0 {l0:.1f}"


def test_warmup_never_longer_than_the_run():
    cfg = TrainConfig(d_in=8, d_sae=32, k=4, batch_size=16, buffer_tokens=32, total_tokens=16 * 5)
    assert cfg.warmup == 0  # 1% of 5 steps
    with pytest.warns(UserWarning, match="warmup_steps=100 is longer than the run"):
        trainer = Trainer(
            TrainConfig(
                d_in=8,
                d_sae=32,
                k=4,
                batch_size=16,
                buffer_tokens=32,
                total_tokens=16 * 5,
                warmup_steps=100,
                decay_start=1.0,
            )
        )
    lrs = [trainer.lr_at(s) for s in range(5)]
    assert lrs[-1] == pytest.approx(trainer.cfg.learning_rate)  # the peak is reached


def test_schedule_and_dead_threshold_follow_the_run():
    short = TrainConfig(d_in=8, d_sae=4096, k=32, total_tokens=2_000_000)
    assert short.dead_after_tokens == 100_000  # AuxK switches on in the default run
    long = TrainConfig(d_in=8, d_sae=4096, k=32, total_tokens=10**10)
    assert long.dead_after_tokens == 10_000_000
    assert TrainConfig(d_in=8, dead_tokens=123).dead_after_tokens == 123
    trainer = Trainer(
        TrainConfig(d_in=8, d_sae=32, k=4, batch_size=16, buffer_tokens=32, total_tokens=16 * 10)
    )
    assert trainer.lr_at(9) < trainer.lr_at(7) < trainer.lr_at(0) + 1e-12
    x = torch.randn(16, 8)
    for _ in range(10):
        trainer.step(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.step(x)
    assert any("past the run" in str(w.message) for w in caught)


def test_target_l0_sets_k_for_topk():
    assert TrainConfig(d_in=8, target_l0=12).k == 12
    with pytest.raises(ValueError, match="target_l0=0"):
        TrainConfig(d_in=8, target_l0=0)


@pytest.mark.parametrize("architecture", ["relu", "gated", "jumprelu"])
def test_sparsity_coefficient_starts_where_the_gate_gradients_cancel(architecture):
    """The initial L1/L0 coefficient makes the penalty's gradient on the latents' gates cancel
    the reconstruction's (summed over latents) on the first batch."""
    torch.manual_seed(0)
    x = torch.randn(512, 16) @ torch.randn(16, 16) + 0.5
    cfg = TrainConfig(
        architecture=architecture,
        d_in=16,
        d_sae=64,
        target_l0=4,
        batch_size=256,
        buffer_tokens=512,
        total_tokens=256 * 10,
        backend="torch",
        progress=False,
    )
    trainer = Trainer(cfg)
    trainer.initialize(x)
    coeff = float(trainer.sparsity_coeff)
    assert coeff > 0
    gate = trainer._gate_parameter()
    xs, _ = trainer.normalize(x)
    name = "l0_coeff" if architecture == "jumprelu" else "l1_coeff"
    grads = []
    for c in (coeff, 0.0):
        gate.grad = None
        trainer.scaled_sae.loss(xs, **{name: c}).loss.backward()
        grads.append(float(gate.grad.double().sum()))
    balanced, reconstruction_only = grads
    assert abs(reconstruction_only) > 0
    assert abs(balanced) < 1e-3 * abs(reconstruction_only)
    # a configured coefficient is kept as given
    fixed = Trainer(TrainConfig(**{**cfg.to_dict(), name: 0.25}))
    fixed.initialize(x)
    assert float(fixed.sparsity_coeff) == 0.25


def test_controller_rate_follows_the_run():
    assert TrainConfig(d_in=8, total_tokens=4096 * 200).sparsity_rate == pytest.approx(0.1)
    assert TrainConfig(d_in=8, total_tokens=4096 * 10_000).sparsity_rate == 0.03
    assert TrainConfig(d_in=8, sparsity_adapt_rate=0.5).sparsity_rate == 0.5
    with pytest.raises(ValueError, match="sparsity_adapt_rate=2"):
        TrainConfig(d_in=8, sparsity_adapt_rate=2)
