"""The ``torch`` backend's ops against the float64 oracles: forward and every gradient."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import fastsae
from fastsae import ops
from fastsae import reference as ref
from fastsae.ops import _reference, _torch
from tests.tolerances import assert_close


@st.composite
def sparse_problem(draw, max_b=12, max_n=40, max_k=9, max_d=17):
    """values/indices with duplicates, hot latents, unhit latents, zero values and B=1."""
    b = draw(st.integers(1, max_b))
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, max_k))
    d = draw(st.integers(1, max_d))
    seed = draw(st.integers(0, 2**20))
    g = torch.Generator().manual_seed(seed)
    hot = draw(st.booleans())
    high = min(n, 3) if hot else n  # hot: every row hits the same few latents
    indices = torch.randint(0, high, (b, k), generator=g)
    values = torch.randn(b, k, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        values[torch.rand(b, k, generator=g) < 0.3] = 0.0
    W = torch.randn(n, d, generator=g, dtype=torch.float64)
    bias = torch.randn(d, generator=g, dtype=torch.float64)
    upstream = torch.randn(b, d, generator=g, dtype=torch.float64)
    return values, indices, W, bias, upstream


@settings(max_examples=300)
@given(sparse_problem())
def test_sparse_decode_forward_and_grads(problem):
    values, indices, W, bias, upstream = problem
    leaves = [t.clone().requires_grad_(True) for t in (values, W, bias)]
    out = _torch.sparse_decode(leaves[0], indices, leaves[1], leaves[2])
    got = torch.autograd.grad(out, leaves, upstream)
    oracle_leaves = [t.clone().requires_grad_(True) for t in (values, W, bias)]
    expected_out = ref.sparse_decode(oracle_leaves[0], indices, oracle_leaves[1], oracle_leaves[2])
    want = torch.autograd.grad(expected_out, oracle_leaves, upstream)
    assert_close(out, expected_out)
    for name, a, b in zip(("values", "W_dec", "b_dec"), got, want, strict=True):
        assert_close(a, b, msg=name)
    unhit = torch.ones(W.shape[0], dtype=torch.bool)
    unhit[indices.flatten()] = False
    assert torch.all(got[1][unhit] == 0), "latents hit by no row must get exactly zero gradient"


@settings(max_examples=300)
@given(sparse_problem(), st.booleans())
def test_sparse_encoder_backward_matches_oracle(problem, need_grad_x):
    grad_pre, indices, W, _, _ = problem
    n, d_in = W.shape  # reuse W as W_enc^T: [d_in, n] after the transpose below
    W_enc = W.T.contiguous()
    x = torch.randn(indices.shape[0], d_in, dtype=torch.float64)
    got = _torch.sparse_encoder_backward(x, indices, grad_pre, W_enc, need_grad_x=need_grad_x)
    want = ref.sparse_encoder_backward(x, indices, grad_pre, W_enc, need_grad_x=need_grad_x)
    assert got[0].shape == (d_in, n)
    for name, a, b in zip(("grad_W_enc", "grad_b_enc"), got[:2], want[:2], strict=True):
        assert_close(a, b, msg=name)
    if need_grad_x:
        assert_close(got[2], want[2], msg="grad_x")
    else:
        assert got[2] is None
    unhit = torch.ones(n, dtype=torch.bool)
    unhit[indices.flatten()] = False
    assert torch.all(got[0][:, unhit] == 0) and torch.all(got[1][unhit] == 0)


def test_sparse_decode_gradcheck(seed):
    values = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[0, 0, 2, 5], [1, 2, 3, 3], [5, 5, 5, 5]])
    W = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, w, bb: _torch.sparse_decode(v, indices, w, bb), (values, W, b)
    )


def test_encode_topk_gradcheck(seed):
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    bd = torch.randn(5, dtype=torch.float64, requires_grad=True)
    dead = torch.zeros(9, dtype=torch.bool)
    dead[4:] = True

    def f(x, W, b, bd):
        out = _torch.encode_topk(x, W, b, 3, b_dec=bd, dead_mask=dead, k_aux=2)
        return out.values, out.aux_values

    assert torch.autograd.gradcheck(f, (x, W, b, bd))


@settings(max_examples=200)
@given(
    b=st.integers(1, 8),
    d_in=st.integers(1, 9),
    n=st.integers(1, 40),
    k_frac=st.floats(0, 1),
    seed=st.integers(0, 2**20),
    ties=st.booleans(),
    k_aux=st.integers(0, 6),
)
def test_encode_topk_matches_oracle_exactly(b, d_in, n, k_frac, seed, ties, k_aux):
    g = torch.Generator().manual_seed(seed)
    k = max(1, round(k_frac * n))
    x = torch.randn(b, d_in, generator=g, dtype=torch.float64)
    W = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    bias = torch.randn(n, generator=g, dtype=torch.float64)
    if ties:  # integer-valued pre-activations: heavy ties, many negatives
        x, W, bias = x.round(), W.round(), bias.round()
    dead = torch.rand(n, generator=g) < 0.5
    got = _torch.encode_topk(x, W, bias, k, dead_mask=dead, k_aux=k_aux)
    want = _reference.encode_topk(x, W, bias, k, dead_mask=dead, k_aux=k_aux)
    pre = ref.pre_activations(x, W, bias)
    pairs = [(got.values, got.indices, want.values, want.indices, pre)]
    if want.aux_indices is None:
        assert got.aux_indices is None
    else:
        dead_pre = torch.where(dead, pre, -torch.inf)
        pairs.append((got.aux_values, got.aux_indices, want.aux_values, want.aux_indices, dead_pre))
    for values, indices, o_values, o_indices, scores in pairs:
        assert_close(values, o_values)  # sorted values agree
        assert_close(values, torch.relu(scores.gather(-1, indices)))  # values sit at their indices
        kth = scores.gather(-1, indices)[:, -1:]
        unselected = torch.ones_like(scores, dtype=torch.bool).scatter(-1, indices, False)
        assert torch.all(torch.where(unselected, scores, -torch.inf) <= kth + 1e-12)
        if ties:
            # integer-valued data: addmm and matmul + add round identically, so the documented
            # tie rule (lower index first) must reproduce the oracle's indices exactly.
            assert torch.equal(indices, o_indices)


class _LargeAllocations(TorchDispatchMode):
    """Records every op output with at least ``limit`` elements."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.limit and not t.is_sparse_csr:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def test_topk_backward_forms_no_dense_tokens_by_latents_tensor():
    """A TopK SAE's loss.backward() on the torch backend never creates a [B, d_sae]-sized tensor,
    and autograd saves none (the forward's dense pre-activations are freed before backward)."""
    B, d_in, n = 64, 16, 4096  # B*n = 262144 elements; params are d_in*n = 65536
    sae = fastsae.TopKSAE(d_in=d_in, d_sae=n, k=8)
    x = torch.randn(B, d_in)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::2] = True
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with ops.use_backend("torch"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sae.loss(x, dead_mask=dead).loss
    assert all(math.prod(s) < B * n for s in saved), saved
    with _LargeAllocations(limit=B * n) as mode:
        loss.backward()
    assert mode.seen == [], mode.seen
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_sparse_encoder_backward_dispatches(backend):
    with ops.use_backend(backend):
        name, _ = ops.implementation_of("sparse_encoder_backward")
    assert name == backend
