"""The SAE a user gets back reads raw activations and encodes each row on its own.

``fastsae.load`` and ``Trainer.inference_sae`` / ``Trainer.sae`` return eval-mode modules (a
BatchTopK SAE then uses its learned threshold, row by row, as SAELens does with the same files),
and ``Trainer.sae`` works in the activations' units, not the scaled units of training.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastsae
from fastsae import ops
from fastsae.train import TrainConfig, Trainer
from tests.tolerances import assert_close
from tests.train.test_trainer import averaged_copy


def _batch(i: int, B: int = 128, d: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return 7.0 * torch.randn(B, d, generator=g) + 3.0  # far from unit norm: scaling matters


def _trained(architecture: str, steps: int = 6, total: int | None = None, **kw) -> Trainer:
    cfg = TrainConfig(
        architecture=architecture,
        d_in=24,
        d_sae=96,
        k=6 if architecture in ("topk", "batchtopk", "matryoshka_batchtopk") else None,
        matryoshka_widths=[24, 96] if architecture == "matryoshka_batchtopk" else [],
        batch_size=128,
        buffer_tokens=256,
        total_tokens=128 * (total or steps),
        backend="torch",
        autocast="fp32",  # compared with the reference oracle: fp32 on every machine
        progress=False,
        **kw,
    )
    trainer = Trainer(cfg)
    for i in range(steps):
        trainer.step(_batch(i))
    return trainer


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka_batchtopk"])
def test_loaded_batchtopk_encodes_each_row_independently_of_the_batch(tmp_path, architecture):
    trainer = _trained(architecture)
    trainer.save_sae(tmp_path / "sae")
    sae = fastsae.load(tmp_path / "sae")
    assert not sae.training
    x = _batch(99)
    with torch.no_grad():
        whole = sae.encode(x)
        for rows in (slice(0, 1), slice(5, 9), slice(60, 128)):
            assert_close(sae.encode(x[rows]), whole[rows])
    sae_lens = pytest.importorskip("sae_lens")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sl = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    with torch.no_grad(), ops.use_backend("reference"):
        assert_close(sl.encode(x), sae.encode(x))


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu"])
def test_trainer_sae_reads_raw_activations(tmp_path, architecture):
    trainer = _trained(architecture)
    view = trainer.sae
    assert not view.training
    assert view is not trainer.scaled_sae
    trainer.save_sae(tmp_path / "sae")
    saved = fastsae.load(tmp_path / "sae")
    x = _batch(123)
    with torch.no_grad():
        assert_close(view.encode(x), saved.encode(x))
        assert_close(view(x).recon, saved(x).recon)
        # the same codes as the training module (with the averaged weights) on scaled inputs
        scaled = averaged_copy(trainer).eval()
        assert_close(view.encode(x), scaled.encode(x * trainer.in_scale.item()))
    # the reconstruction is in raw units: its FVU on x is the training module's on scaled x
    s = trainer.in_scale.item()
    with torch.no_grad():
        raw_fvu = fastsae.reference.fvu(view(x).recon.double(), x.double())
        scaled = averaged_copy(trainer).eval()
        scaled_fvu = fastsae.reference.fvu(scaled(x * s).recon.double(), (x * s).double())
    # fp32 weights and inputs: the two FVUs agree to fp32 precision, not float64
    assert abs(float(raw_fvu) - float(scaled_fvu)) < 1e-4


def test_trainer_sae_follows_training():
    trainer = _trained("topk", steps=2, total=4)
    before = trainer.sae.W_dec.clone()
    assert trainer.sae is trainer.sae  # cached between steps
    trainer.step(_batch(50))
    assert not torch.equal(trainer.sae.W_dec, before)
    assert trainer.inference_sae().training is False
