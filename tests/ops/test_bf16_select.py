"""bf16 selection under autocast: a bf16 GEMM, candidates re-scored in fp32, unsafe rows redone
in fp32; the result must equal the fp32 selection exactly (same indices, fp32 scores)."""

from __future__ import annotations

import pytest
import torch

from fastsae.ops import _torch as T


def _inputs(seed: int, B=64, d=48, n=333, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g) * 3
    W = torch.randn(n, d, generator=g).T / d**0.5
    b = torch.randn(n, generator=g) * 0.1
    if ties:  # duplicate latents: exact ties in every row
        W = torch.cat([W[:, : n // 2], W[:, : n - n // 2]], dim=1)
        b = torch.cat([b[: n // 2], b[: n - n // 2]])
    return x, W, b


def _same(got, want):
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
            continue
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("extra", [16, 0])  # 0: candidates == k, most rows fall back
@pytest.mark.parametrize("ties", [False, True])
def test_bf16_selection_equals_fp32(seed, extra, ties, monkeypatch):
    monkeypatch.setattr(T, "BF16_EXTRA_CANDIDATES", extra)
    x, W, b = _inputs(seed, ties=ties)
    dead = torch.zeros(W.shape[1], dtype=torch.bool)
    dead[::3] = True
    want = T.select_topk(x, W, b, 5, dead_mask=dead, k_aux=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = T.select_topk(x, W, b, 5, dead_mask=dead, k_aux=7, slab=100)
    _same(got[1::2], want[1::2])  # indices
    _same(got[0::2], want[0::2])  # fp32 scores


def test_bf16_encode_topk_gradients_match_fp32():
    x, W, b = _inputs(7)
    W = W.clone().requires_grad_()
    outs = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            enc = T.encode_topk(x, W, b, 6)
        (g,) = torch.autograd.grad(enc.values.pow(2).sum(), W)
        outs.append((enc.values, enc.indices, g))
    values, indices, grad = outs[1]
    assert torch.equal(indices, outs[0][1])
    # fp32 scores from the sampled dot product sum in another order than addmm: last-bit
    # differences, which the gradient carries (1e-5 relative on O(1) values)
    torch.testing.assert_close(values, outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, outs[0][2], rtol=1e-4, atol=1e-4)
