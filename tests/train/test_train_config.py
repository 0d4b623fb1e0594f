"""``TrainConfig`` refuses out-of-range settings up front, naming the field and the allowed range."""

from __future__ import annotations

import pytest

from fastsae.train import TrainConfig
from fastsae.train.config import load_config_file


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k_aux": -1}, "k_aux=-1 must be in [1, d_sae=4096]"),
        ({"k_aux": 0}, "k_aux=0 must be in [1, d_sae=4096]"),
        ({"k_aux": 5000}, "k_aux=5000 must be in [1, d_sae=4096]"),
        ({"dead_tokens": -5}, "dead_tokens=-5 must be >= 1"),
        ({"warmup_steps": -1}, "warmup_steps=-1 must be >= 0"),
        ({"sparsity_warmup_steps": -1}, "sparsity_warmup_steps=-1 must be >= 0"),
        ({"checkpoint_every_tokens": -100}, "checkpoint_every_tokens=-100 must be >= 0"),
        ({"eval_every": -1}, "eval_every=-1 must be >= 0"),
        ({"eval_tokens": 0}, "eval_tokens=0 must be >= 1"),
        ({"log_every": 0}, "log_every=0 must be >= 1"),
        ({"total_tokens": 100}, "total_tokens=100 must be >= batch_size=4096"),
        ({"aux_coeff": -0.1}, "aux_coeff=-0.1 must be >= 0"),
        ({"beta2": 1.0}, "beta2=1.0 must be in [0, 1)"),
        ({"grad_clip": 0.0}, "grad_clip=0.0 must be > 0"),
        ({"topk_threshold_lr": 0.0}, "topk_threshold_lr=0.0 must be in (0, 1]"),
        ({"dtype": "int32"}, "dtype='int32' is not supported; allowed: float32, float64"),
        ({"device": "tpu7"}, "device='tpu7' is unknown; allowed: auto, cpu, cuda, cuda:N"),
    ],
)
def test_out_of_range_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError) as e:
        TrainConfig(**kwargs)
    assert message in str(e.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_device_names_accepted(device):
    assert TrainConfig(device=device).device == device


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config_file(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_config_file(tmp_path / "bad.yaml")
