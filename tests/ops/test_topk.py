"""Exact row-wise top-k of the ``torch`` backend (fastsae/ops/_topk.py) against the stable sort."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsae import reference as ref
from fastsae.ops import _topk, _torch
from fastsae.ops._csr import csr_by_latent

INF = float("inf")


@st.composite
def scores(draw, max_b=6, max_n=300):
    """``[B, n]`` scores, often with ties (small integers), ``-inf`` / ``+inf`` entries, all-equal
    rows, and a ``k`` and block count the prefilter accepts."""
    b = draw(st.integers(1, max_b))
    n = draw(st.integers(2, max_n))
    k = draw(st.integers(1, n - 1))
    blocks = draw(st.integers(k + 1, n))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
    pre = torch.randn(b, n, generator=g, dtype=dtype)
    if draw(st.booleans()):  # heavy ties
        pre = (pre * draw(st.sampled_from([0.5, 2.0, 8.0]))).round()
    for value, p in ((-INF, draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))), (INF, 0.02)):
        if draw(st.booleans()):
            pre[torch.rand(b, n, generator=g) < p] = value
    if draw(st.booleans()):  # a constant row: every score survives any bound
        pre[draw(st.integers(0, b - 1))] = draw(st.sampled_from([0.0, 1.0, -INF]))
    return pre, k, blocks


def _check_exact(top, idx, pre, k):
    """The oracle's values, indices where the tie rule decides (finite values), the values at
    their indices, and no latent twice in a row."""
    o_top, o_idx = torch.sort(pre, dim=-1, descending=True, stable=True)
    assert torch.equal(top, o_top[:, :k])
    assert torch.equal(pre.gather(-1, idx), top)
    finite = torch.isfinite(top)
    assert torch.equal(idx[finite], o_idx[:, :k][finite])
    assert all(len(set(row.tolist())) == k for row in idx)


@settings(max_examples=500)
@given(scores())
def test_prefiltered_equals_stable_sort(problem):
    pre, k, blocks = problem
    top, idx = _topk.topk_prefiltered(pre, k, blocks=blocks)
    _check_exact(top, idx, pre, k)


@settings(max_examples=300)
@given(scores())
def test_topk_tie_exact_equals_stable_sort_through_both_paths(problem):
    pre, k, _ = problem
    _check_exact(*_topk.topk_tie_exact(pre, k), pre, k)
    _check_exact(*_topk.topk_by_torch(pre, k), pre, k)


@pytest.mark.parametrize("layout", ["column_slice", "transposed"])
def test_prefiltered_reads_any_strides(seed, layout):
    big = torch.randn(40, 900).round()
    pre = big[:, 50:650] if layout == "column_slice" else big.T.contiguous().T[:, :600]
    top, idx = _topk.topk_prefiltered(pre, 9, blocks=20)
    _check_exact(top, idx, pre.contiguous(), 9)


def test_nan_rows_behave_as_torch_topk(seed):
    """NaN counts as the largest score, as in ``torch.topk``: a row holding NaN gets the same
    result from both paths (the prefilter hands it to ``torch.topk``)."""
    pre = torch.randn(5, 400)
    pre[1, [3, 200]] = float("nan")
    pre[3, :] = float("nan")
    top, idx = _topk.topk_prefiltered(pre, 7, blocks=16)
    want_top, want_idx = _topk.topk_by_torch(pre, 7)
    torch.testing.assert_close(top, want_top, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(top[1, :2]).all() and set(idx[1, :2].tolist()) == {3, 200}
    clean = [0, 2, 4]
    assert torch.equal(idx[clean], want_idx[clean])


def test_crowded_rows_fall_back(seed):
    """Rows with many scores equal to the bound (an all-zero input row at initialisation) are
    selected by torch.topk and do not widen the others' sort."""
    pre = torch.randn(4, 1000)
    pre[2] = 0.0
    pre[3, ::2] = 5.0
    top, idx = _topk.topk_prefiltered(pre, 10, blocks=22)
    _check_exact(top, idx, pre, 10)
    assert torch.equal(idx[2], torch.arange(10)) and torch.equal(idx[3], torch.arange(0, 20, 2))


def test_prefiltered_rejects_bad_arguments():
    pre = torch.randn(2, 50)
    with pytest.raises(ValueError, match="blocks=5"):
        _topk.topk_prefiltered(pre, 5, blocks=5)
    with pytest.raises(ValueError, match="k=50"):
        _topk.topk_prefiltered(pre, 50, blocks=51)


@settings(max_examples=100)
@given(
    b=st.integers(1, 6),
    n=st.integers(40, 400),
    k=st.integers(1, 12),
    k_aux=st.integers(1, 12),
    dead_frac=st.sampled_from([0.05, 0.5, 0.95, 1.0]),
    slab=st.sampled_from([None, 37, 128]),
    seed=st.integers(0, 2**20),
)
def test_select_topk_aux_over_dead_columns_equals_oracle(b, n, k, k_aux, dead_frac, slab, seed):
    """AuxK candidates, taken from the dead latents' columns only, equal the stable sort of the
    pre-activations with live latents at -inf (integer data: exact ties, exact sums)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 5, generator=g, dtype=torch.float64).round()
    W = torch.randn(5, n, generator=g, dtype=torch.float64).round()
    bias = torch.randn(n, generator=g, dtype=torch.float64).round()
    dead = torch.rand(n, generator=g) < dead_frac
    dead[0] = True
    k = min(k, n)
    top, idx, aux_top, aux_idx = _torch.select_topk(
        x, W, bias, k, dead_mask=dead, k_aux=k_aux, slab=slab
    )
    pre = ref.pre_activations(x, W, bias)
    _check_exact(top, idx, pre, k)
    k_aux = min(k_aux, int(dead.sum()))
    dead_pre = torch.where(dead, pre, -torch.inf)
    o_top, o_idx = torch.sort(dead_pre, dim=-1, descending=True, stable=True)
    assert torch.equal(aux_top, o_top[:, :k_aux])
    assert torch.equal(aux_idx, o_idx[:, :k_aux])


def test_empty_batches_and_zero_width_codes():
    """No rows (an empty batch) and no codes per row (k = 0) give empty results, not errors, on
    the paths the prefilter and the CPU sampled product take."""
    top, idx = _topk.topk_tie_exact(torch.empty(0, 2048), 32)
    assert top.shape == idx.shape == (0, 32) and idx.dtype == torch.long
    top, idx = _topk.topk_prefiltered(torch.empty(0, 2048), 32, blocks=66)
    assert top.shape == idx.shape == (0, 32)
    g, W = torch.randn(3, 8), torch.randn(16, 8)
    assert _torch._sampled_row_dots(g, W, torch.empty(3, 0, dtype=torch.long)).shape == (3, 0)
    assert _torch._sampled_row_dots(g[:0], W, torch.empty(0, 4, dtype=torch.long)).shape == (0, 4)
    from fastsae.ops import use_backend
    from fastsae.sae import SAE, SAEConfig

    sae = SAE.from_config(SAEConfig(architecture="topk", d_in=8, d_sae=2048, k=32))
    with use_backend("torch"):
        assert sae.encode(torch.empty(0, 8)).shape == (0, 2048)


@pytest.mark.parametrize(
    ("B", "k", "columns"),
    [
        (64, 12, 12),  # every row names all the columns (AuxK over few dead latents): dense GEMM
        (64, 12, 5),  # fewer columns than ids: repeats in every row
        (64, 12, 300),  # many columns: the sampled product
        (3, 40, 30),  # k > columns, one row
    ],
)
def test_sampled_row_dots_equals_the_gathered_products(B, k, columns):
    torch.manual_seed(0)
    d, n = 24, 300
    g, W = torch.randn(B, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    cols = torch.randperm(n)[:columns]
    ids = cols[torch.randint(0, columns, (B, k))]
    if columns == k:  # each row a permutation of the same columns
        ids = torch.stack([cols[torch.randperm(k)] for _ in range(B)])
    want = (g[:, None, :] * W[ids]).sum(-1)
    # with the ids' CSR-by-latent layout (the decoder's backward): the product by latent
    layout = csr_by_latent(ids, n)
    for lay in (None, layout):
        torch.testing.assert_close(_torch._sampled_row_dots(g, W, ids, lay), want)
        got32 = _torch._sampled_row_dots(g.float(), W.float(), ids, lay)
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32, want.float(), rtol=1e-5, atol=1e-4)
