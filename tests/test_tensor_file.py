"""fastsae.load checks cfg.json and the safetensors header before it allocates anything (issue 11)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastsae
from fastsae.sae import SAE
from fastsae.tensor_file import read_header
from tests.test_modules import make_sae


@pytest.fixture
def saved(tmp_path):
    make_sae("topk", d_in=7, d_sae=33, k=5).save(tmp_path / "sae")
    return tmp_path / "sae"


@pytest.fixture
def no_real_allocation(monkeypatch):
    """Fail if an SAE is built anywhere but on the meta device (which allocates nothing)."""
    original = SAE.reset_parameters

    def guarded(self, generator=None):
        if self.W_dec.device.type != "meta":
            raise AssertionError(f"an SAE of d_sae={self.d_sae} was allocated before validation")
        return original(self, generator)

    monkeypatch.setattr(SAE, "reset_parameters", guarded)


def _edit_cfg(path, change):
    cfg = json.loads((path / "cfg.json").read_text())
    change(cfg)
    (path / "cfg.json").write_text(json.dumps(cfg))


def _declare_d_sae(cfg, d_sae):
    cfg["d_sae"] = d_sae
    cfg["metadata"]["fastsae"]["d_sae"] = d_sae


def test_huge_declared_d_sae_is_refused_before_allocation(saved, no_real_allocation):
    _edit_cfg(saved, lambda c: _declare_d_sae(c, 2_000_000))
    with pytest.raises(ValueError, match=r"W_enc has shape \(7, 33\), expected \(7, 2000000\)"):
        fastsae.load(saved)


def test_huge_saelens_d_sae_is_refused_before_allocation(saved, no_real_allocation):
    def as_plain_saelens(cfg):
        del cfg["metadata"]["fastsae"]
        cfg["d_sae"] = 2_000_000

    _edit_cfg(saved, as_plain_saelens)
    with pytest.raises(ValueError, match=r"expected \(2000000, 7\)"):
        fastsae.load(saved)


@pytest.mark.parametrize(
    ("field", "value"), [("d_sae", 34), ("d_in", 8), ("k", 4), ("architecture", "standard")]
)
def test_cfg_fields_that_disagree_with_the_metadata_are_refused(saved, field, value):
    _edit_cfg(saved, lambda c: c.update({field: value}))
    with pytest.raises(ValueError, match=rf"{field}={value!r} disagrees with metadata.fastsae"):
        fastsae.load(saved)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_non_float_tensors_are_refused(saved, dtype):
    tensors = load_file(saved / "sae_weights.safetensors")
    tensors["W_dec"] = tensors["W_dec"].to(dtype)
    save_file(tensors, str(saved / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"W_dec has dtype \w+; SAE tensors must be floating"):
        fastsae.load(saved)


def test_float_tensors_of_another_precision_still_load(saved):
    tensors = load_file(saved / "sae_weights.safetensors")
    save_file({k: v.float() for k, v in tensors.items()}, str(saved / "sae_weights.safetensors"))
    assert torch.equal(fastsae.load(saved).W_dec, tensors["W_dec"].float().double())


def test_deeply_nested_cfg_json_is_a_clear_error(saved):
    depth = 200_000
    (saved / "cfg.json").write_text('{"metadata": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ValueError, match="cfg.json is nested too deeply"):
        fastsae.load(saved)


def test_sparsify_header_is_checked_before_allocation(tmp_path, no_real_allocation):
    path = tmp_path / "sp"
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps({"d_in": 7, "num_latents": 2_000_000, "k": 5}))
    tensors = {
        "encoder.weight": torch.randn(33, 7),
        "encoder.bias": torch.randn(33),
        "W_dec": torch.randn(33, 7).int(),
        "b_dec": torch.randn(7),
    }
    save_file(tensors, str(path / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"expected \(2000000, 7\).*W_dec has dtype I32"):
        fastsae.load(path)


def test_read_header_reads_no_data(saved):
    header = read_header(saved / "sae_weights.safetensors")
    assert header["W_dec"] == ("F64", (33, 7)) and header["b_dec"] == ("F64", (7,))
    with pytest.raises(ValueError, match="is missing"):
        read_header(saved / "nope.safetensors")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(metadata=[1]), "'metadata' must be an object, got list"),
        (lambda c: c["metadata"].update(fastsae="x"), "'metadata.fastsae' must be an object"),
        (
            lambda c: [d.update(d_in=10**15, d_sae=10**15, d_out=10**15)
                       for d in (c, c["metadata"]["fastsae"])],
            "cfg.json: the declared sizes cannot be built",
        ),
    ],
    ids=["metadata-list", "fastsae-str", "overflow"],
)  # fmt: skip
def test_malformed_cfg_json_is_one_value_error(saved, no_real_allocation, change, message):
    _edit_cfg(saved, change)
    with pytest.raises(ValueError, match=message):
        fastsae.load(saved)
