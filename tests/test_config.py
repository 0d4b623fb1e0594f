"""Bad input: one clear error naming the field and the allowed values, before any compute."""

from __future__ import annotations

import pytest
import torch

import fastsae


@pytest.mark.parametrize("k", [0, -1, 65])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match=rf"k={k} must be in \[1, d_sae=64\]"):
        fastsae.TopKSAE(d_in=16, d_sae=64, k=k)


def test_k_must_be_int_for_topk():
    with pytest.raises(ValueError, match="k=2.5 must be an integer"):
        fastsae.TopKSAE(d_in=16, d_sae=64, k=2.5)


def test_batchtopk_k_above_d_sae():
    with pytest.raises(ValueError, match=r"k=100 must be in \(0, d_sae=64\]"):
        fastsae.BatchTopKSAE(d_in=16, d_sae=64, k=100)


def test_k_on_architecture_without_k():
    with pytest.raises(ValueError, match="k=4 is only used by"):
        fastsae.ReLUSAE(d_in=16, d_sae=64, k=4)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="architecture='dense' is unknown; allowed: topk"):
        fastsae.SAEConfig(architecture="dense", d_in=4, d_sae=8)
    with pytest.raises(ValueError, match="unknown; allowed"):
        fastsae.sae_class("dense")


@pytest.mark.parametrize("dtype", ["int32", torch.int64, "bool"])
def test_non_float_dtype(dtype):
    with pytest.raises(TypeError, match="is not a floating dtype; allowed: float32"):
        fastsae.TopKSAE(d_in=16, d_sae=64, k=4, dtype=dtype)


@pytest.mark.parametrize(("field", "value"), [("d_in", 0), ("d_sae", -3), ("d_in", 2.0)])
def test_bad_widths(field, value):
    kwargs = {"d_in": 16, "d_sae": 64, "k": 4, field: value}
    with pytest.raises(ValueError, match=f"{field}={value!r} must be an integer >= 1"):
        fastsae.TopKSAE(**kwargs)


def test_mismatched_input_width():
    sae = fastsae.TopKSAE(d_in=16, d_sae=64, k=4)
    with pytest.raises(ValueError, match=r"x has shape \(3, 15\); its last dimension must be 16"):
        sae(torch.randn(3, 15))


def test_mismatched_target_width():
    sae = fastsae.ReLUSAE(d_in=16, d_sae=64, d_out=8)
    with pytest.raises(ValueError, match="last dimension must be 8"):
        sae.loss(torch.randn(3, 16), torch.randn(3, 16))
    with pytest.raises(ValueError, match="needs a target y"):
        sae.loss(torch.randn(3, 16))


def test_integer_input_rejected():
    sae = fastsae.TopKSAE(d_in=4, d_sae=8, k=2)
    with pytest.raises(TypeError, match="a floating dtype is required"):
        sae(torch.ones(2, 4, dtype=torch.int64))


def test_mismatched_sparse_codes():
    sae = fastsae.TopKSAE(d_in=4, d_sae=8, k=2)
    with pytest.raises(ValueError, match="must have the same shape"):
        sae.decode_sparse(torch.ones(2, 2), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer dtype is required"):
        sae.decode_sparse(torch.ones(2, 2), torch.zeros(2, 2))


def test_bad_dead_mask():
    sae = fastsae.TopKSAE(d_in=4, d_sae=8, k=2)
    with pytest.raises(ValueError, match=r"dead_mask must be a bool tensor of shape \(8,\)"):
        sae(torch.randn(2, 4), dead_mask=torch.ones(7, dtype=torch.bool))


def test_apply_b_dec_to_input_needs_equal_widths():
    with pytest.raises(ValueError, match="apply_b_dec_to_input=True needs d_out == d_in"):
        fastsae.ReLUSAE(d_in=16, d_sae=64, d_out=8, apply_b_dec_to_input=True)


def test_matryoshka_widths_validated():
    with pytest.raises(ValueError, match="strictly increasing"):
        fastsae.MatryoshkaBatchTopKSAE(d_in=4, d_sae=16, k=2, matryoshka_widths=[8, 4])
    sae = fastsae.MatryoshkaBatchTopKSAE(d_in=4, d_sae=16, k=2, matryoshka_widths=[4, 8])
    assert sae.cfg.matryoshka_widths == [4, 8, 16]


def test_unknown_normalization():
    with pytest.raises(ValueError, match="normalize_activations='layer_norm' is not supported"):
        fastsae.ReLUSAE(d_in=4, d_sae=8, normalize_activations="layer_norm")


def test_unknown_loss_coefficient():
    sae = fastsae.TopKSAE(d_in=4, d_sae=8, k=2)
    with pytest.raises(
        ValueError,
        match="unknown loss coefficients for TopKSAE: l1_coeff; allowed: aux_coeff, k_aux",
    ):
        sae.loss(torch.randn(2, 4), l1_coeff=1.0)


def test_unknown_backend():
    with (
        pytest.raises(
            ValueError,
            match="unknown fastsae backend 'cuda'; allowed: auto, triton, torch, reference",
        ),
        fastsae.ops.use_backend("cuda"),
    ):
        pass


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown SAEConfig fields: colour"):
        fastsae.SAEConfig.from_dict(
            {"architecture": "relu", "d_in": 4, "d_sae": 8, "colour": "red"}
        )


@pytest.mark.parametrize(
    ("mask", "error", "message"),
    [
        (torch.ones(7, dtype=torch.bool), ValueError, r"shape \(8,\), got shape \(7,\)"),
        (torch.ones(8, 1, dtype=torch.bool), ValueError, r"got shape \(8, 1\)"),
        (torch.ones(8), TypeError, "got dtype torch.float32"),
        (torch.ones(8, dtype=torch.long), TypeError, "got dtype torch.int64"),
        ([True] * 8, TypeError, "dead_mask must be a torch.Tensor, got list"),
    ],
    ids=["short", "2d", "float", "long", "list"],
)
def test_loss_validates_dead_mask(mask, error, message):
    sae = fastsae.TopKSAE(d_in=4, d_sae=8, k=2)
    with pytest.raises(error, match=message):
        sae.loss(torch.randn(3, 4), dead_mask=mask, k_aux=2)
    sae.loss(torch.randn(3, 4), dead_mask=torch.zeros(8, dtype=torch.bool), k_aux=2)


@pytest.mark.parametrize(
    ("values", "indices", "error", "message"),
    [
        (
            torch.ones(2, 2),
            torch.tensor([[0, 8], [1, 2]]),
            ValueError,
            r"holds 8, outside \[0, d_sae=8\)",
        ),
        (torch.ones(2, 2), torch.tensor([[0, 1], [-1, 2]]), ValueError, r"holds -1, outside"),
        (
            torch.ones(2, 2),
            torch.ones(2, 2, dtype=torch.bool),
            TypeError,
            "indices has dtype torch.bool",
        ),
        (
            torch.ones(2, 2, dtype=torch.long),
            torch.zeros(2, 2, dtype=torch.long),
            TypeError,
            "values has dtype torch.int64",
        ),
        (torch.ones(2, 2), [[0, 1], [1, 2]], TypeError, "indices must be a torch.Tensor"),
        (torch.tensor(1.0), torch.tensor(1), ValueError, "must have the same shape"),
        (
            torch.ones(4),
            torch.zeros(2, 2, dtype=torch.long),
            ValueError,
            "must have the same shape",
        ),
    ],
    ids=["too-big", "negative", "bool", "int-values", "list", "0d", "shape"],
)
def test_decode_sparse_validates_its_inputs(values, indices, error, message):
    sae = fastsae.TopKSAE(d_in=4, d_sae=8, k=2)
    with pytest.raises(error, match=message):
        sae.decode_sparse(values, indices)


def test_decode_sparse_accepts_any_integer_dtype_and_empty_codes():
    sae = fastsae.TopKSAE(d_in=4, d_sae=8, k=2)
    idx = torch.tensor([[0, 7], [3, 3]])
    ref = sae.decode_sparse(torch.ones(2, 2), idx)
    assert torch.equal(sae.decode_sparse(torch.ones(2, 2), idx.int()), ref)
    assert sae.decode_sparse(torch.ones(0, 2), torch.zeros(0, 2, dtype=torch.long)).shape == (0, 4)
