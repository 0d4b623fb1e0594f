"""Sparse encoders (TopK, BatchTopK, JumpReLU) of the ``torch`` backend against the oracles."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fastsae import reference as ref
from fastsae.ops import _reference, _torch
from fastsae.ops._sparse_encode import BATCH_TOPK_STATS, batch_topk_select
from tests.tolerances import assert_close


@st.composite
def encoder_problem(draw, max_b=10, max_d=9, max_n=48):
    b = draw(st.integers(1, max_b))
    d_in = draw(st.integers(1, max_d))
    n = draw(st.integers(1, max_n))
    ties = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
    x = torch.randn(b, d_in, generator=g, dtype=torch.float64)
    W = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    bias = torch.randn(n, generator=g, dtype=torch.float64)
    if ties:  # integer-valued: many equal pre-activations, computed exactly by any summation order
        x, W, bias = x.round(), W.round(), bias.round()
    slab = draw(st.sampled_from([None, 1, 3, 7]))
    return x, W, bias, ties, slab


@settings(max_examples=200)
@given(encoder_problem(), st.floats(0, 1))
def test_select_topk_over_slabs_equals_dense_topk(problem, k_frac):
    x, W, bias, ties, slab = problem
    n = W.shape[1]
    k = max(1, round(k_frac * n))
    top, idx, _, _ = _torch.select_topk(x, W, bias, k, slab=max(slab or n, 1))
    pre = ref.pre_activations(x, W, bias)
    o_top, o_idx = torch.sort(pre, dim=-1, descending=True, stable=True)
    assert_close(top, o_top[:, :k])
    assert_close(top, pre.gather(-1, idx))
    if ties:
        assert torch.equal(idx, o_idx[:, :k])


@settings(max_examples=200)
@given(encoder_problem(), st.floats(0.05, 3.0))
def test_batch_topk_codes_match_oracle(problem, k):
    x, W, bias, ties, _ = problem
    n = W.shape[1]
    k = min(k, n)
    got = _torch.encode_batch_topk(x, W, bias, k)
    pre = ref.pre_activations(x, W, bias)
    want = ref.batch_topk(pre, k)
    dense = ref.sparse_to_dense(got.values, got.indices, n)
    if ties:
        assert torch.equal(dense, want)
    else:
        assert_close(dense, want)
    # no duplicate latent within a row among the kept (non-zero) entries
    for row_v, row_i in zip(got.values, got.indices, strict=True):
        kept = row_i[row_v > 0].tolist()
        assert len(kept) == len(set(kept))


@settings(max_examples=200)
@given(encoder_problem(), st.floats(0.05, 3.0))
def test_batch_topk_static_width_matches_oracle(problem, k):
    """The sync-free BatchTopK of the triton backend (m candidates per row kept, the K-th score
    and its ties resolved on the device, unkept slots -inf) equals the oracle, ties included,
    whenever no row was cut (every candidate of a row kept)."""
    x, W, bias, ties, _ = problem
    n = W.shape[1]
    k = min(k, n)
    top, idx, _, _ = batch_topk_select(_torch.select_topk, x, W, bias, k, static_width=True)
    assume(int(BATCH_TOPK_STATS["cut_rows"]) == 0)
    pre = ref.pre_activations(x, W, bias)
    dense = ref.sparse_to_dense(torch.relu(top), idx, n)
    want = ref.batch_topk(pre, k)
    if ties:
        assert torch.equal(dense, want)
    else:
        assert_close(dense, want)


def test_batch_topk_static_width_counts_a_cut_row():
    """A row holding more of the batch's winners than its m = 2k + 8 candidates is cut on the
    sync-free path, and counted on the device."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 4, generator=g, dtype=torch.float64)
    x[0] *= 100  # row 0 beats every other row on every latent
    W = torch.rand(4, 48, generator=g, dtype=torch.float64)
    bias = torch.zeros(48, dtype=torch.float64)
    top, _, _, _ = batch_topk_select(_torch.select_topk, x, W, bias, 3.0, static_width=True)
    assert top.shape == (8, 14)  # m = 2 * 3 + 8
    assert int(BATCH_TOPK_STATS["cut_rows"]) == 1
    assert int(torch.isfinite(top).sum()) == 24  # still K = 3 * 8 codes


@settings(max_examples=150)
@given(encoder_problem(), st.integers(1, 8))
def test_jumprelu_sparse_codes_match_dense(problem, k_cap):
    x, W, bias, _, _ = problem
    n = W.shape[1]
    threshold = torch.linspace(-0.5, 1.5, n, dtype=torch.float64)
    got = _torch.encode_jumprelu(x, W, bias, threshold, k_cap=k_cap)
    pre = ref.pre_activations(x, W, bias)
    want = torch.relu(pre * (pre > threshold))
    assert_close(ref.sparse_to_dense(got.values, got.indices, n), want)


def test_batch_topk_gradients_match_oracle(seed):
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 20, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(20, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(5, dtype=torch.float64, requires_grad=True)
    dead = torch.zeros(20, dtype=torch.bool)
    dead[10:] = True
    upstream = torch.randn(6, 20, dtype=torch.float64)
    leaves = (x, W, bias, b_dec)

    got = _torch.encode_batch_topk(x, W, bias, 2.5, b_dec=b_dec, dead_mask=dead, k_aux=3)
    dense = ref.sparse_to_dense(got.values, got.indices, 20)
    aux = ref.sparse_to_dense(got.aux_values, got.aux_indices, 20)
    g_got = torch.autograd.grad((dense * upstream).sum() + aux.sum(), leaves)

    want = _reference.encode_batch_topk(x, W, bias, 2.5, b_dec=b_dec, dead_mask=dead, k_aux=3)
    w_dense = ref.sparse_to_dense(want.values, want.indices, 20)
    w_aux = ref.sparse_to_dense(want.aux_values, want.aux_indices, 20)
    g_want = torch.autograd.grad((w_dense * upstream).sum() + w_aux.sum(), leaves)
    for name, a, b in zip(("x", "W_enc", "b_enc", "b_dec"), g_got, g_want, strict=True):
        assert_close(a, b, msg=name)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import torch
    from fastsae.ops import _torch

    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    B, d, n, k = 4096, 768, 262144, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g)
    W = torch.randn(d, n, generator=g) / d**0.5
    b = torch.zeros(n)
    # Reset the peak-RSS mark so it covers the op alone (Linux: clear_refs 5 resets VmHWM).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = vm("VmRSS:")
    top, idx, _, _ = _torch.select_topk(x, W, b, k)
    print(vm("VmHWM:") - before, top.shape[0], idx.shape[1])
    """
)


@pytest.mark.slow
def test_encode_topk_peak_memory_is_a_fraction_of_the_dense_matrix():
    """B=4096, d_in=768, n=262144, k=32: the op's extra peak memory stays below 25% of the
    4.3 GB that the dense fp32 [B, n] pre-activation matrix would take."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env, check=True
    )
    extra, rows, k = (int(v) for v in out.stdout.split())
    dense_bytes = 4096 * 262144 * 4
    assert (rows, k) == (4096, 32)
    assert extra < 0.25 * dense_bytes, f"extra peak {extra / 2**30:.2f} GiB"
