"""Properties of the oracles themselves: if these fail, every kernel test is meaningless."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsae import reference as ref


def _pre(b: int, n: int, seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values, many equal ones, some negative
        return torch.randint(-3, 4, (b, n), generator=g).double() / 2
    return torch.randn(b, n, generator=g, dtype=torch.float64)


@settings(max_examples=200)
@given(
    b=st.integers(1, 9),
    n=st.integers(1, 40),
    k_frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_topk_is_tie_proof_top_k(b, n, k_frac, seed, ties):
    pre = _pre(b, n, seed, ties)
    k = max(1, round(k_frac * n))
    values, indices = ref.topk(pre, k)
    assert values.shape == indices.shape == (b, k)
    # values are relu(pre) at the indices, sorted descending
    assert torch.equal(values, torch.relu(pre.gather(-1, indices)))
    assert torch.all(values[:, :-1] >= values[:, 1:])
    # sorted values match torch.topk's (tie-independent)
    expected = torch.relu(torch.topk(pre, k, dim=-1).values)
    assert torch.equal(values, expected)
    # every unselected pre-activation is <= the k-th selected one
    kth = pre.gather(-1, indices)[:, -1:]
    unselected = torch.ones_like(pre, dtype=torch.bool).scatter(-1, indices, False)
    assert torch.all(torch.where(unselected, pre, -torch.inf) <= kth)
    # indices are distinct within a row
    assert all(len(set(row.tolist())) == k for row in indices)


def test_topk_tie_rule_lower_index_wins():
    pre = torch.tensor([[1.0, 2.0, 2.0, 0.5, 2.0]])
    values, indices = ref.topk(pre, 2)
    assert indices.tolist() == [[1, 2]]
    assert values.tolist() == [[2.0, 2.0]]


def test_topk_rows_with_fewer_than_k_positive():
    pre = torch.tensor([[-1.0, 3.0, -0.5, -2.0]])
    values, indices = ref.topk(pre, 3)
    assert values.tolist() == [[3.0, 0.0, 0.0]]
    assert indices.tolist() == [[1, 2, 0]]  # next-best by pre-activation, not arbitrary


@pytest.mark.parametrize("k", [0, 5])
def test_topk_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k="):
        ref.topk(torch.zeros(2, 4), k)


@settings(max_examples=100)
@given(b=st.integers(1, 8), n=st.integers(1, 30), k=st.floats(0.2, 5), seed=st.integers(0, 999))
def test_batch_topk_keeps_k_times_b_largest(b, n, k, seed):
    pre = _pre(b, n, seed, ties=False)
    k = min(k, n)
    codes = ref.batch_topk(pre, k)
    n_keep = max(1, min(round(k * b), b * n))
    acts = torch.relu(pre).flatten()
    kept = codes.flatten()
    # exactly the n_keep largest relu values are kept (possibly including zeros)
    assert torch.equal(
        kept.sort(descending=True).values[:n_keep], acts.sort(descending=True).values[:n_keep]
    )
    assert int((kept != 0).sum()) <= n_keep
    assert torch.all((kept == 0) | (kept == acts))


def test_jumprelu_forward_and_ste():
    pre = torch.tensor([[0.05, 0.2, 0.1005, -1.0]], dtype=torch.float64, requires_grad=True)
    thr = torch.full((4,), 0.1, dtype=torch.float64, requires_grad=True)
    out = ref.jumprelu(pre, thr, bandwidth=0.01)
    assert out.tolist() == [[0.0, 0.2, 0.1005, 0.0]]
    out.sum().backward()
    assert pre.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    # only the element within bandwidth/2 of the threshold gets -(thr / bw) * 1
    assert thr.grad.tolist() == pytest.approx([0.0, 0.0, -10.0, 0.0])


def test_step_ste_gradient():
    pre = torch.tensor([[0.1002, 0.5]], dtype=torch.float64, requires_grad=True)
    thr = torch.tensor([0.1, 0.1], dtype=torch.float64, requires_grad=True)
    ref.l0_step(pre, thr, bandwidth=0.001).backward()
    assert thr.grad.tolist() == pytest.approx([-1000.0, 0.0])
    assert pre.grad.abs().sum() == 0


@settings(max_examples=100)
@given(
    b=st.integers(1, 6),
    n=st.integers(1, 20),
    k=st.integers(1, 8),
    d=st.integers(1, 9),
    seed=st.integers(0, 999),
)
def test_sparse_decode_equals_dense_decode_of_scatter(b, n, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(b, k, generator=g, dtype=torch.float64)
    indices = torch.randint(0, n, (b, k), generator=g)  # duplicates allowed: they sum
    W = torch.randn(n, d, generator=g, dtype=torch.float64)
    bias = torch.randn(d, generator=g, dtype=torch.float64)
    dense = ref.sparse_to_dense(values, indices, n)
    torch.testing.assert_close(
        ref.sparse_decode(values, indices, W, bias), ref.dense_decode(dense, W, bias)
    )


def test_sparse_encoder_backward_matches_autograd(seed):
    x = torch.randn(5, 7, dtype=torch.float64)
    W = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_(True)
    indices = torch.tensor([[0, 3, 3], [1, 2, 10], [0, 0, 0], [4, 5, 6], [10, 9, 8]])
    grad_pre = torch.randn(5, 3, dtype=torch.float64)
    pre = ref.pre_activations(xr, W, b)
    pre.backward(ref.sparse_to_dense(grad_pre, indices, 11))
    gW, gb, gx = ref.sparse_encoder_backward(x, indices, grad_pre, W.detach(), need_grad_x=True)
    torch.testing.assert_close(gW, W.grad)
    torch.testing.assert_close(gb, b.grad)
    torch.testing.assert_close(gx, xr.grad)
    assert torch.all(gW[:, 7] == 0)  # latent 7 is hit by no row


def test_losses_basic_identities(seed):
    x = torch.randn(50, 6, dtype=torch.float64)
    assert ref.mse(x, x) == 0
    assert torch.isclose(ref.fvu(x.mean(0).expand_as(x), x), torch.tensor(1.0, dtype=torch.float64))
    assert ref.fvu(x, x) == 0
    codes = torch.tensor([[0.0, 2.0, -1.0]], dtype=torch.float64)
    W = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    assert ref.l1_loss(codes, W) == pytest.approx(2 * 5 + 1 * 2)
    assert ref.l0(codes) == 2
    assert ref.l0_tanh(codes, W, c=1e6) == pytest.approx(2.0)


def test_auxk_loss_zero_without_dead_and_scaled_with_few_dead(seed):
    pre = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    W = torch.randn(10, 3, dtype=torch.float64)
    residual = torch.randn(4, 3, dtype=torch.float64)
    none_dead = torch.zeros(10, dtype=torch.bool)
    assert ref.auxk_loss(pre, none_dead, 4, W, residual) == 0
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[2, 7]] = True
    loss = ref.auxk_loss(pre, dead, 4, W, residual)
    # k_aux is capped at the 2 dead latents and the loss is scaled by 2/4
    acts = torch.relu(pre[:, [2, 7]])
    expected = 0.5 * ref.mse(acts @ W[[2, 7]], residual)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    live = [i for i in range(10) if i not in (2, 7)]
    assert torch.all(pre.grad[:, live] == 0)
