"""``fastsae.ops.shared_encoder_gemm``: one stacked GEMM whose blocks the torch backend's TopK /
BatchTopK selection reads instead of its own GEMM (a sweep's ``--group-gemm``)."""

from __future__ import annotations

import torch

from fastsae import ops
from tests.tolerances import assert_close

# weird widths on purpose: d_in 7, n 33 / 5 / 64, k 5 / 3 / 8
SHAPES = [(33, 5), (5, 3), (64, 8)]


def _encoders(seed: int, d_in: int = 7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, _ in SHAPES:
        W = torch.randn(d_in, n, generator=g, dtype=dtype)
        b = torch.randn(n, generator=g, dtype=dtype)
        b_dec = torch.randn(d_in, generator=g, dtype=dtype)
        out.append((W, b, b_dec))
    return out, torch.randn(19, d_in, generator=g, dtype=dtype)


def test_blocks_are_each_encoders_pre_activations(seed):
    encoders, x = _encoders(seed)
    with ops.shared_encoder_gemm(x, encoders) as blocks:
        for (W, b, b_dec), block in zip(encoders, blocks, strict=True):
            assert block.shape == (x.shape[0], W.shape[1])
            assert_close(block, (x - b_dec) @ W + b)


def test_selection_reads_the_block_and_matches_its_own_gemm(seed):
    encoders, x = _encoders(seed)
    with ops.use_backend("torch"), ops.shared_encoder_gemm(x, encoders) as blocks:
        for (W, b, b_dec), block, (_, k) in zip(encoders, blocks, SHAPES, strict=True):
            enc = ops.encode_topk(x, W, b, k, b_dec=b_dec)

            own = torch.topk(block, k, dim=-1).values.relu()
            assert_close(enc.values.sort(-1).values, own.sort(-1).values)
            assert torch.equal(enc.values, block.gather(-1, enc.indices).relu())

        # poison one block: a selection that reads it must pick the poisoned latent first
        W, b, b_dec = encoders[0]
        blocks[0][:, 3] = 1e6
        enc = ops.encode_topk(x, W, b, SHAPES[0][1], b_dec=b_dec)
        assert (enc.indices[:, 0] == 3).all()
        assert (enc.values[:, 0] == 1e6).all()


def test_a_changed_encoder_falls_back_to_its_own_gemm(seed):
    encoders, x = _encoders(seed)
    W, b, b_dec = encoders[0]
    k = SHAPES[0][1]
    with ops.use_backend("torch"), ops.shared_encoder_gemm(x, encoders) as blocks:
        blocks[0][:, 3] = 1e6  # poison, so that reading the block would show
        with torch.no_grad():
            W.mul_(1.0)  # an in-place update (an optimizer step) bumps the version counter
        enc = ops.encode_topk(x, W, b, k, b_dec=b_dec)
        # a batch of another size never reads the block either
        enc_half = ops.encode_topk(x[:7], *encoders[1][:2], SHAPES[1][1], b_dec=encoders[1][2])
    with ops.use_backend("torch"):
        own = ops.encode_topk(x, W, b, k, b_dec=b_dec)
    assert torch.equal(enc.values, own.values) and torch.equal(enc.indices, own.indices)
    assert not (enc.values == 1e6).any()
    with ops.use_backend("torch"):
        half = ops.encode_topk(x[:7], *encoders[1][:2], SHAPES[1][1], b_dec=encoders[1][2])
    assert torch.equal(enc_half.values, half.values)


def test_batch_topk_and_gradients_flow_through_the_shared_selection(seed):
    encoders, x = _encoders(seed)
    params = [(W.clone().requires_grad_(), b.clone().requires_grad_(), d) for W, b, d in encoders]
    with ops.use_backend("torch"), ops.shared_encoder_gemm(x, params):
        W, b, b_dec = params[2]
        enc = ops.encode_batch_topk(x, W, b, 4.0, b_dec=b_dec)
        enc.values.sum().backward()
    W2, b2 = W.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    with ops.use_backend("torch"):
        own = ops.encode_batch_topk(x, W2, b2, 4.0, b_dec=b_dec)
        own.values.sum().backward()
    assert torch.equal(enc.indices, own.indices)
    assert_close(enc.values, own.values)
    assert_close(W.grad, W2.grad)
    assert_close(b.grad, b2.grad)
