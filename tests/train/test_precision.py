"""TrainConfig.autocast: "auto" resolves per device and shape, explicit values win, and the choice
is recorded in the SAE's metadata and used by the step."""

from __future__ import annotations

import pytest
import torch

from fastsae.train import TrainConfig, Trainer
from fastsae.train import precision as prec

CPU = torch.device("cpu")


def cfg(**kw) -> TrainConfig:
    base = dict(
        d_in=384, d_sae=64, k=4, batch_size=16, buffer_tokens=32, total_tokens=160, backend="torch"
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def fast_bf16_cpu(monkeypatch):
    monkeypatch.setattr(prec, "cpu_bf16_flags", lambda: frozenset({"avx512_bf16"}))


@pytest.fixture
def plain_cpu(monkeypatch):
    monkeypatch.setattr(prec, "cpu_bf16_flags", lambda: frozenset())


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert prec.cpu_bf16_flags.__wrapped__(str(info)) == frozenset({"avx512_bf16"})
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert prec.cpu_bf16_flags.__wrapped__(str(info)) == frozenset()
    assert prec.cpu_bf16_flags.__wrapped__(str(tmp_path / "missing")) == frozenset()


def test_auto_is_bf16_on_a_fast_bf16_cpu_for_the_measured_case(fast_bf16_cpu):
    got = prec.resolve_precision(cfg(), CPU, 384)
    assert got.autocast == "bf16" and "avx512_bf16" in got.reason


@pytest.mark.parametrize(
    ("kw", "d_in", "why"),
    [
        ({}, 128, "d_in=128"),
        ({"backend": "reference"}, 384, "backend 'reference'"),
        ({"architecture": "relu", "k": None}, 384, "architecture 'relu'"),
        ({"dtype": "float64"}, 384, "dtype float64"),
    ],
)
def test_auto_is_fp32_outside_the_measured_case(fast_bf16_cpu, kw, d_in, why):
    got = prec.resolve_precision(cfg(**kw), CPU, d_in)
    assert got.autocast == "none" and why in got.reason


def test_auto_is_fp32_without_fast_bf16(plain_cpu):
    got = prec.resolve_precision(cfg(), CPU, 384)
    assert got.autocast == "none" and "no AVX512-BF16" in got.reason


def test_auto_is_fp32_on_cuda(fast_bf16_cpu):
    assert prec.resolve_precision(cfg(), torch.device("cuda"), 384).autocast == "none"


@pytest.mark.parametrize(("value", "want"), [("bf16", "bf16"), ("fp32", "none"), ("none", "none")])
def test_explicit_values_win(plain_cpu, value, want):
    assert prec.resolve_precision(cfg(autocast=value), CPU, 8).autocast == want


def test_auto_is_the_default():
    assert TrainConfig().autocast == "auto"


def test_trainer_records_and_uses_the_resolved_precision(fast_bf16_cpu, monkeypatch):
    seen = []
    real = torch.autocast

    def spy(device_type, *args, **kwargs):
        if kwargs.get("enabled", True):  # the ops' own enabled=False sections aside
            seen.append(kwargs.get("dtype"))
        return real(device_type, *args, **kwargs)

    x = torch.randn(16, 384)
    auto = Trainer(cfg())
    assert auto.precision.autocast == "bf16"
    assert auto.scaled_sae.cfg.metadata["precision"] == auto.precision._asdict()
    pinned = Trainer(cfg(autocast="fp32"))
    assert pinned.scaled_sae.cfg.metadata["precision"]["autocast"] == "none"
    monkeypatch.setattr(torch, "autocast", spy)
    auto.step(x)
    assert seen == [torch.bfloat16]
    pinned.step(x)
    assert seen == [torch.bfloat16], "fp32 steps enter no autocast"
