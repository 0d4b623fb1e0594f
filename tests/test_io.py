"""Files: fastsae <-> real SAELens round trips, sparsify directories, and every bad file."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastsae
from fastsae import ops
from tests.test_modules import make_sae
from tests.tolerances import assert_close

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is a dev dependency; install .[dev]")

# (fastsae architecture, kwargs, SAELens class name it must load as)
CASES = [
    ("topk", {}, "TopKSAE"),
    ("relu", {}, "StandardSAE"),
    ("jumprelu", {}, "JumpReLUSAE"),
    ("gated", {}, "GatedSAE"),
    ("batchtopk", {}, "JumpReLUSAE"),
    ("matryoshka_batchtopk", {}, "JumpReLUSAE"),
    ("relu", {"d_out": 5}, "Transcoder"),
    ("relu", {"d_out": 5, "skip": True}, "SkipTranscoder"),
    ("jumprelu", {"d_out": 5}, "JumpReLUTranscoder"),
    ("jumprelu", {"d_out": 5, "skip": True}, "JumpReLUSkipTranscoder"),
]


def _float32(sae):
    sae = sae.to(torch.float32)
    sae.cfg.dtype = "float32"
    return sae.eval()


def _load_saelens(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sae_lens.SAE.load_from_disk(str(path))


@pytest.mark.parametrize(("arch", "kwargs", "sl_class"), CASES)
def test_fastsae_dir_loads_in_saelens_with_same_outputs(tmp_path, arch, kwargs, sl_class):
    sae = _float32(make_sae(arch, d_in=7, d_sae=33, k=5, seed=1, **kwargs))
    sae.cfg.hook_name = "blocks.1.hook_resid_post"
    x = torch.randn(6, 7)
    sae.save(tmp_path / "sae", sparsity=torch.linspace(-5, 0, 33))
    sl = _load_saelens(tmp_path / "sae")
    assert type(sl).__name__ == sl_class
    assert sl.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    with torch.no_grad(), ops.use_backend("reference"):
        codes = sae.encode(x)
        assert_close(sl.encode(x), codes)
        if sae.W_skip is None:
            assert_close(sl.decode(codes), sae.decode(codes))
        else:  # SAELens adds the skip term in forward, not in decode
            assert_close(sl(x), sae.decode(codes, x))
    assert load_file(tmp_path / "sae" / "sparsity.safetensors")["sparsity"].shape == (33,)


@pytest.mark.parametrize(("arch", "kwargs", "_"), CASES)
def test_fastsae_roundtrip_restores_class_and_outputs(tmp_path, arch, kwargs, _):
    sae = _float32(make_sae(arch, d_in=7, d_sae=33, k=5, seed=2, **kwargs))
    sae.save(tmp_path / "sae")
    again = fastsae.load(tmp_path / "sae").eval()
    assert type(again) is type(sae)
    assert again.cfg == sae.cfg
    for (name, p), (name2, q) in zip(
        sae.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert name == name2 and torch.equal(p, q), name
    x = torch.randn(4, 7)
    with torch.no_grad():
        assert torch.equal(again(x).recon, sae(x).recon)


def _saelens_topk(rescale: bool):
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    cfg = TopKSAEConfig(d_in=7, d_sae=33, k=5, rescale_acts_by_decoder_norm=rescale)
    sl = TopKSAE(cfg)
    with torch.no_grad():
        for p in sl.parameters():
            p.add_(torch.randn_like(p))
    return sl


@pytest.mark.parametrize("rescale", [False, True])
def test_saelens_saved_topk_loads_with_same_outputs(tmp_path, rescale):
    sl = _saelens_topk(rescale)
    sl.save_model(tmp_path / "sl")
    sae = fastsae.load(tmp_path / "sl")
    assert isinstance(sae, fastsae.TopKSAE) and sae.cfg.k == 5
    x = torch.randn(6, 7)
    with torch.no_grad(), ops.use_backend("reference"):
        assert_close(sae.encode(x), sl.encode(x))
        assert_close(sae(x).recon, sl(x))


@pytest.mark.parametrize("name", ["standard", "jumprelu", "gated"])
def test_saelens_saved_dense_architectures_load(tmp_path, name):
    from sae_lens.saes import (
        GatedSAE,
        GatedSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
    )

    cls, cfg_cls = {
        "standard": (StandardSAE, StandardSAEConfig),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
        "gated": (GatedSAE, GatedSAEConfig),
    }[name]
    sl = cls(cfg_cls(d_in=7, d_sae=33))
    with torch.no_grad():
        for pname, p in sl.named_parameters():
            p.copy_(torch.rand_like(p) * 0.2 if pname == "threshold" else torch.randn_like(p))
    sl.save_model(tmp_path / "sl")
    sae = fastsae.load(tmp_path / "sl")
    x = torch.randn(6, 7)
    with torch.no_grad(), ops.use_backend("reference"):
        assert_close(sae.encode(x), sl.encode(x))
        assert_close(sae(x).recon, sl(x))


def _write_sparsify(path, d_in=7, n=33, k=5, transcode=False, skip=False, tensors=None):
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": n,
        "k": k,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
        "d_in": d_in,
    }
    (path / "cfg.json").write_text(json.dumps(cfg))
    if tensors is None:
        tensors = {
            "encoder.weight": torch.randn(n, d_in),
            "encoder.bias": torch.randn(n),
            "W_dec": torch.randn(n, d_in),
            "b_dec": torch.randn(d_in),
        }
        if skip:
            tensors["W_skip"] = torch.randn(d_in, d_in)
    save_file(tensors, str(path / "sae.safetensors"))
    return tensors


@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify_directory_loads(tmp_path, transcode):
    t = _write_sparsify(tmp_path / "sp", transcode=transcode, skip=transcode)
    sae = fastsae.load(tmp_path / "sp")
    x = torch.randn(6, 7)
    # sparsify: pre = relu((x - b_dec [unless transcode]) @ enc.W.T + enc.b); top-k; decode + b_dec
    xin = x if transcode else x - t["b_dec"]
    pre = torch.relu(xin @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(5)
    expected = (vals[..., None] * t["W_dec"][idx]).sum(-2) + t["b_dec"]
    if transcode:
        expected = expected + x @ t["W_skip"].T
    with torch.no_grad(), ops.use_backend("reference"):
        assert_close(sae(x).recon, expected)


# ---------------------------------------------------------------------------------------------
# Bad files: one clear ValueError naming the problem, nothing loaded.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    sae = make_sae("topk", d_in=7, d_sae=33, k=5)
    sae.save(tmp_path / "sae")
    return tmp_path / "sae"


def _rewrite_weights(path, change):
    tensors = load_file(path / "sae_weights.safetensors")
    change(tensors)
    save_file(tensors, str(path / "sae_weights.safetensors"))


def test_missing_tensor_is_named(saved):
    _rewrite_weights(saved, lambda t: t.pop("b_enc"))
    with pytest.raises(ValueError, match="missing tensors: b_enc"):
        fastsae.load(saved)


def test_extra_tensor_is_named(saved):
    _rewrite_weights(saved, lambda t: t.update(surprise=torch.zeros(3)))
    with pytest.raises(ValueError, match="unexpected tensors: surprise"):
        fastsae.load(saved)


def test_misshaped_tensor_is_named(saved):
    _rewrite_weights(saved, lambda t: t.update(W_dec=torch.zeros(33, 8)))
    with pytest.raises(ValueError, match=r"W_dec has shape \(33, 8\), expected \(33, 7\)"):
        fastsae.load(saved)


def test_invalid_json_is_named(saved):
    (saved / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="cfg.json is not valid JSON"):
        fastsae.load(saved)


def test_unknown_architecture_in_file(saved):
    cfg = json.loads((saved / "cfg.json").read_text())
    cfg["metadata"].pop("fastsae")
    cfg["architecture"] = "telepathic"
    (saved / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architecture='telepathic' is not supported"):
        fastsae.load(saved)


def test_corrupt_safetensors_is_named(saved):
    (saved / "sae_weights.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fastsae.load(saved)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        fastsae.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="missing cfg.json"):
        fastsae.load(tmp_path / "empty")
    (tmp_path / "empty" / "cfg.json").write_text("{}")
    with pytest.raises(ValueError, match="found no weights"):
        fastsae.load(tmp_path / "empty")


def test_sparsify_missing_tensor_is_named(tmp_path):
    t = {"encoder.weight": torch.randn(33, 7), "W_dec": torch.randn(33, 7), "b_dec": torch.randn(7)}
    _write_sparsify(tmp_path / "sp", tensors=t)
    with pytest.raises(ValueError, match="missing tensors: encoder.bias"):
        fastsae.load(tmp_path / "sp")


def test_no_pickle_is_ever_loaded(saved, monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("pickle/torch.load was called")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fastsae.load(saved)


def test_save_is_atomic_when_a_write_fails(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    sae = make_sae("topk", d_in=7, d_sae=33, k=5, seed=9)
    import fastsae.io as fio

    def exploding_save_file(tensors, filename, *a, **k):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(fio, "save_file", exploding_save_file)
    with pytest.raises(OSError, match="disk full"):
        sae.save(saved)
    after = {p.name: p.read_bytes() for p in saved.iterdir()}
    assert after == before
    assert not [p for p in saved.parent.iterdir() if ".tmp-" in p.name]
    fastsae.load(saved)


def test_overwrite_replaces_files(saved):
    sae = make_sae("topk", d_in=7, d_sae=33, k=5, seed=11)
    sae.save(saved)
    again = fastsae.load(saved)
    assert torch.equal(again.W_enc, sae.W_enc)
    assert sorted(os.listdir(saved)) == ["cfg.json", "sae_weights.safetensors"]
