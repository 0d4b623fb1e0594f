"""The ``torch`` backend's bf16 sparse backward (under bf16 autocast) against the float64 oracle.

``grad_W_dec`` and ``grad_W_enc`` are sums of products whose operands are read in bf16: each
product carries up to two bf16 roundings of its operands and the sum one more, so the error is
bounded relative to the sum of the *magnitudes* of the terms, not to the result (terms of both
signs cancel). The checks use the bf16 row of the shared tolerance table against that scale.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from fastsae import ops
from fastsae import reference as ref
from fastsae.ops import _torch
from tests.ops.test_torch_ops import sparse_problem
from tests.tolerances import assert_close, tolerance


@pytest.fixture(autouse=True)
def bf16_sparse_backward(monkeypatch):
    """These tests check the bf16-operand backward, which is off by default."""
    monkeypatch.setattr(_torch, "BF16_SPARSE_BACKWARD", True)


def _assert_within_bf16(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor, msg: str):
    """``|got - want| <= rtol * magnitude + atol`` with the bf16 tolerances, where ``magnitude``
    is the oracle evaluated on the absolute values of the operands (the sum of |terms|)."""
    assert got.dtype == torch.float32, f"{msg}: fp32 gradients for fp32 master weights"
    rtol, atol = tolerance(torch.bfloat16)
    err = (got.double() - want).abs()
    bound = rtol * magnitude + atol
    worst = (err - bound).max()
    assert worst <= 0, f"{msg}: error exceeds the bf16 bound by {float(worst):.3g}"


@settings(max_examples=200)
@given(sparse_problem())
def test_sparse_decode_bf16_backward_matches_oracle(problem):
    values, indices, W, bias, upstream = problem
    leaves = [t.float().requires_grad_(True) for t in (values, W, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _torch.sparse_decode(leaves[0], indices, leaves[1], leaves[2])
    got = torch.autograd.grad(out, leaves, upstream.float())
    oracle = [t.clone().requires_grad_(True) for t in (values, W, bias)]
    want = torch.autograd.grad(
        ref.sparse_decode(oracle[0], indices, oracle[1], oracle[2]), oracle, upstream
    )
    # |codes|.T @ |g|: the sum of the magnitudes of the terms of each grad_W_dec entry
    magnitude = ref.sparse_to_dense(values.abs(), indices, W.shape[0]).T @ upstream.abs()
    _assert_within_bf16(got[1], want[1], magnitude, "grad_W_dec")
    # grad_values and grad_b_dec stay fp32
    assert_close(got[0], want[0], msg="grad_values")
    assert_close(got[2], want[2], msg="grad_b_dec")


@settings(max_examples=200)
@given(sparse_problem())
def test_sparse_encoder_backward_bf16_operands_matches_oracle(problem):
    grad_pre, indices, W, _, _ = problem
    n, d_in = W.shape
    W_enc = W.T.contiguous()
    x = torch.randn(indices.shape[0], d_in, dtype=torch.float64)
    got = _torch.sparse_encoder_backward(
        x.float(), indices, grad_pre.float(), W_enc.float(), bf16_operands=True
    )
    want = ref.sparse_encoder_backward(x, indices, grad_pre, W_enc)
    magnitude = ref.sparse_encoder_backward(x.abs(), indices, grad_pre.abs(), W_enc)[0]
    assert got[0].shape == (d_in, n)
    _assert_within_bf16(got[0], want[0], magnitude, "grad_W_enc")
    assert_close(got[1], want[1], msg="grad_b_enc (fp32 index_add)")
    unhit = torch.ones(n, dtype=torch.bool)
    unhit[indices.flatten()] = False
    assert torch.all(got[0][:, unhit] == 0)


def test_bf16_operands_are_used_and_fp32_is_untouched(seed):
    """The bf16 path really reads bf16 operands (its result differs from the fp32 path's), and
    without autocast / the hint the result is the fp32 one."""
    B, d, n, k = 64, 48, 96, 8
    x = torch.randn(B, d)
    indices = torch.randint(0, n, (B, k))
    grad_pre = torch.randn(B, k)
    W_enc = torch.randn(d, n)
    fp32 = _torch.sparse_encoder_backward(x, indices, grad_pre, W_enc)[0]
    low = _torch.sparse_encoder_backward(x, indices, grad_pre, W_enc, bf16_operands=True)[0]
    want = ref.sparse_encoder_backward(x.double(), indices, grad_pre.double(), W_enc.double())[0]
    assert_close(fp32, want)
    assert not torch.equal(fp32, low)

    values = torch.rand(B, k).requires_grad_(True)
    W_dec = torch.randn(n, d).requires_grad_(True)
    b_dec = torch.zeros(d).requires_grad_(True)
    g = torch.randn(B, d)
    plain = torch.autograd.grad(_torch.sparse_decode(values, indices, W_dec, b_dec), W_dec, g)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _torch.sparse_decode(values, indices, W_dec, b_dec)
    mixed = torch.autograd.grad(out, W_dec, g)[0]
    assert mixed.dtype == plain.dtype == torch.float32
    assert not torch.equal(plain, mixed)


def test_encode_topk_under_autocast_passes_the_hint(seed, monkeypatch):
    """The encoder's backward asks its backend for bf16 operands exactly when the forward ran
    under bf16 autocast."""
    seen = []
    real = _torch.sparse_encoder_backward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("bf16_operands"))
        return real(*args, **kwargs)

    monkeypatch.setattr(_torch, "sparse_encoder_backward", spy)
    x = torch.randn(16, 12)
    W = torch.randn(12, 40, requires_grad=True)
    b = torch.zeros(40, requires_grad=True)
    with ops.use_backend("torch"):
        for enabled in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                out = ops.encode_topk(x, W, b, 4)
            out.values.sum().backward()
    assert seen == [False, True]
    assert W.grad.dtype == torch.float32


def test_by_default_the_autocast_backward_is_the_fp32_one(monkeypatch):
    """BF16_SPARSE_BACKWARD off (the default): under bf16 autocast the sparse backward reads fp32
    operands, so its gradients match the fp32 ones to fp32 rounding (the selected values differ
    by ulps: they are re-scored by another summation order), while the bf16-operand backward
    is off by bf16 rounding."""
    torch.manual_seed(0)
    B, d, n, k = 64, 48, 96, 8
    x = torch.randn(B, d)
    W_enc = torch.randn(d, n, requires_grad=True)
    b_enc = torch.zeros(n, requires_grad=True)
    W_dec = torch.randn(n, d, requires_grad=True)
    b_dec = torch.zeros(d, requires_grad=True)

    def grads(autocast: bool, bf16_backward: bool):
        monkeypatch.setattr(_torch, "BF16_SPARSE_BACKWARD", bf16_backward)
        with ops.use_backend("torch"), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            enc = _torch.encode_topk(x, W_enc, b_enc, k, b_dec=b_dec)
            out = _torch.sparse_decode(enc.values, enc.indices, W_dec, b_dec)
        return torch.autograd.grad((out - x).pow(2).sum(), (W_enc, W_dec))

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    fp32 = grads(False, False)
    default = grads(True, False)
    low = grads(True, True)
    for got, want, bf16 in zip(default, fp32, low, strict=True):
        assert rel(got, want) < 1e-5
        assert rel(bf16, want) > 1e-4
