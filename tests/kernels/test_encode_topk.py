"""kernels/encode_topk.py against the float64 oracles in :mod:`fastsae.reference`.

Runs under ``TRITON_INTERPRET=1`` on CPU (set before Triton is imported), or on CUDA when there
is a GPU. Shapes stay tiny (B <= 16, d_in <= 24, d_sae <= 96) and the blocks are shrunk so that
they still give several row blocks, slabs, tiles per slab and K steps: the interpreter's cost
grows with the number of Triton ops it runs, not with the tile sizes.

How the checks stay exact and tie-proof: with float64 inputs the kernel accumulates in float64
and rounds each score to float32 once, so its scores are the oracle's ``pre.float()`` (summation
order only moves a float64 result by ~1e-16, far below a float32 rounding step; integer-valued
inputs make it exact outright). Every check then compares **sorted** values, ``scores.gather``
at the returned indices, and "no unselected score beats the k-th"; never raw index order.
Lower-precision inputs are compared with the shared tolerance table instead.
"""

from __future__ import annotations

import os
from unittest import mock

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastsae import reference as ref  # noqa: E402
from fastsae.kernels import encode_topk as et  # noqa: E402
from tests.tolerances import assert_close, tolerance  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
STRATEGIES = sorted(et.STRATEGIES)
# The largest int64 key decodes to a NaN score that would top every row: an unwritten candidate
# slot cannot go unnoticed.
POISON = torch.iinfo(torch.int64).max


def _poisoned(shape, device):
    return torch.full(shape, POISON, dtype=torch.int64, device=device)


def _problem(B, d, n, *, dtype, seed, integer=False):
    """``(x, W_enc, b_enc)`` on DEVICE. ``integer``: values in {-2..2} (biases {-1, 0, 1}), so
    that many scores tie exactly."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        x = torch.randint(-2, 3, (B, d), generator=g).double()
        W = torch.randint(-2, 3, (d, n), generator=g).double()
        b = torch.randint(-1, 2, (n,), generator=g).double()
    else:
        x = torch.randn(B, d, generator=g, dtype=torch.float64)
        W = torch.randn(d, n, generator=g, dtype=torch.float64)
        b = torch.randn(n, generator=g, dtype=torch.float64)
    return x.to(DEVICE, dtype), W.to(DEVICE, dtype), b.to(DEVICE, dtype)


def _scores(x, W, b, threshold=None) -> torch.Tensor:
    """The oracle's float64 scores of the (already rounded) inputs: ``pre`` or, with a
    threshold, ``pre`` where ``pre > threshold`` and ``-inf`` elsewhere."""
    pre = ref.pre_activations(x.cpu().double(), W.cpu().double(), b.cpu().double())
    if threshold is not None:
        pre = torch.where(pre > threshold.cpu().double(), pre, float("-inf"))
    return pre


def _blocks(kp: int, bm: int, bn: int, bk: int, strategy: str = et.DEFAULT_STRATEGY) -> et.Blocks:
    """Small blocks for the interpreter. The sort_merge strategy needs BLOCK_N >= KP; the others
    keep a narrow tile, so that tiles narrower than the state (no sort step) are covered too."""
    bn = max(bn, kp) if strategy == "sort_merge" else bn
    return et.Blocks(bm, bn, bk, et.NUM_WARPS, et.NUM_STAGES)


def _select(x, W, b, k, **kwargs):
    """``select_topk`` with the candidate buffers poisoned before the kernel writes them."""
    with mock.patch.object(et, "_new_candidates", _poisoned):
        return et.select_topk(x, W, b, k, **kwargs)


def _check_topk(top, idx, scores, k, *, exact: bool):
    """Tie-proof checks of ``(top, idx)`` against float64 ``scores [B, n]``.

    ``exact``: the kernel's scores are ``scores.float()`` (float64 inputs). Otherwise they are
    float32 results compared with the shared float32 tolerance (``tests.tolerances``).
    """
    B, n = scores.shape
    top, idx = top.cpu(), idx.cpu()
    assert top.shape == (B, k) and idx.shape == (B, k)
    assert top.dtype == torch.float32 and idx.dtype == torch.int64
    assert not top.isnan().any(), "NaN in top: an unwritten candidate was selected"
    assert ((idx >= 0) & (idx < n)).all(), "index out of range"
    assert (top[:, 1:] <= top[:, :-1]).all(), "top is not sorted descending"

    expected = torch.sort(scores, dim=1, descending=True).values[:, :k]
    finite = torch.isfinite(top)
    assert torch.equal(finite, torch.isfinite(expected)), "wrong number of finite scores"
    if exact:
        assert torch.equal(top, expected.float()), "sorted top-k scores differ"
    else:
        assert_close(top, expected)

    # The returned ids carry the returned scores, and each finite one appears once per row.
    picked = scores.gather(1, idx)
    if exact:
        assert torch.equal(picked.float()[finite], top[finite])
    else:
        assert_close(top[finite], picked[finite])
    for row in range(B):
        ids = idx[row][finite[row]]
        assert ids.unique().numel() == ids.numel(), f"row {row} repeats a latent"

    # Nothing left out beats the k-th score.
    # (-inf padding points at column n, which is dropped, so it can mark nothing as chosen.)
    chosen = torch.zeros(B, n + 1, dtype=torch.bool)
    chosen.scatter_(1, torch.where(finite, idx, n), True)
    chosen = chosen[:, :n]
    rest = torch.where(chosen, float("-inf"), scores).max(dim=1).values
    kth = top[:, -1]
    if exact:
        assert (rest.float() <= kth).all(), "an unselected score beats the k-th"
    else:
        rtol, atol = tolerance(torch.float32)
        kth = kth.double()
        bound = torch.where(torch.isfinite(kth), kth + atol + rtol * kth.abs(), kth)
        assert (rest <= bound).all(), "an unselected score beats the k-th"


# ---------------------------------------------------------------------------------------------
# Properties against the oracle (float64 inputs: exact)
# ---------------------------------------------------------------------------------------------

shapes = st.tuples(
    st.integers(1, 16),  # B
    st.integers(1, 24),  # d_in
    st.integers(1, 96),  # d_sae
)
layouts = st.tuples(
    st.sampled_from([4, 8, 16]),  # BLOCK_M
    st.sampled_from([16, 32]),  # BLOCK_N (raised to KP)
    st.sampled_from([4, 8, 32]),  # BLOCK_K
    st.sampled_from([None, 1, 2, 3]),  # num_slabs
)


@settings(max_examples=20, deadline=None)
@given(
    shape=shapes,
    k_frac=st.floats(0.0, 1.0),
    layout=layouts,
    strategy=st.sampled_from(STRATEGIES),
    integer=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_topk_matches_oracle(shape, k_frac, layout, strategy, integer, seed):
    B, d, n = shape
    k = max(1, min(n, round(k_frac * n)))
    bm, bn, bk, slabs = layout
    x, W, b = _problem(B, d, n, dtype=torch.float64, seed=seed, integer=integer)
    blocks = _blocks(1 << (k - 1).bit_length(), bm, bn, bk, strategy)
    top, idx, aux_top, aux_idx = _select(
        x, W, b, k, strategy=strategy, num_slabs=slabs, blocks=blocks
    )
    assert aux_top is None and aux_idx is None
    _check_topk(top, idx, _scores(x, W, b), k, exact=True)


@settings(max_examples=15, deadline=None)
@given(
    shape=shapes,
    k=st.integers(1, 12),
    layout=layouts,
    strategy=st.sampled_from(STRATEGIES),
    thr_scale=st.sampled_from([0.0, 2.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_threshold_mode(shape, k, layout, strategy, thr_scale, seed):
    """Scores under their latent's threshold are out; large thresholds leave rows with fewer
    than k finite scores, which must be padded with -inf."""
    B, d, n = shape
    k = min(k, n)
    bm, bn, bk, slabs = layout
    x, W, b = _problem(B, d, n, dtype=torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    threshold = (thr_scale * torch.rand(n, generator=g, dtype=torch.float64)).to(DEVICE)
    blocks = _blocks(1 << (k - 1).bit_length(), bm, bn, bk, strategy)
    top, idx, _, _ = _select(
        x, W, b, k, threshold=threshold, strategy=strategy, num_slabs=slabs, blocks=blocks
    )
    _check_topk(top, idx, _scores(x, W, b, threshold), k, exact=True)


@settings(max_examples=15, deadline=None)
@given(
    shape=shapes,
    k=st.integers(1, 8),
    k_aux=st.integers(1, 40),
    dead_frac=st.sampled_from([0.05, 0.3, 1.0]),
    layout=layouts,
    strategy=st.sampled_from(STRATEGIES),
    with_threshold=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_auxk_mode(shape, k, k_aux, dead_frac, layout, strategy, with_threshold, seed):
    """The AuxK selection is the top min(k_aux, n_dead) scores among dead latents, from the same
    pass; the main selection is unchanged by it."""
    B, d, n = shape
    k = min(k, n)
    bm, bn, bk, slabs = layout
    x, W, b = _problem(B, d, n, dtype=torch.float64, seed=seed, integer=seed % 2 == 0)
    g = torch.Generator().manual_seed(seed + 2)
    dead = (torch.rand(n, generator=g) < dead_frac).to(DEVICE)
    threshold = torch.rand(n, generator=g, dtype=torch.float64).to(DEVICE)
    threshold = threshold if with_threshold else None
    n_dead = int(dead.sum())
    k_eff = min(k_aux, n_dead)
    kp = 1 << (max(k, k_eff) - 1).bit_length()
    top, idx, aux_top, aux_idx = _select(
        x,
        W,
        b,
        k,
        threshold=threshold,
        dead_mask=dead,
        k_aux=k_aux,
        strategy=strategy,
        num_slabs=slabs,
        blocks=_blocks(kp, bm, bn, bk, strategy),
    )
    scores = _scores(x, W, b, threshold)
    _check_topk(top, idx, scores, k, exact=True)
    if n_dead == 0:
        assert aux_top is None and aux_idx is None
        return
    dead_scores = torch.where(dead.cpu(), scores, float("-inf"))
    _check_topk(aux_top, aux_idx, dead_scores, k_eff, exact=True)
    finite = torch.isfinite(aux_top.cpu())
    assert dead.cpu()[aux_idx.cpu()[finite]].all(), "an AuxK latent is not dead"


# ---------------------------------------------------------------------------------------------
# Dtypes, shapes and layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_low_precision_inputs(dtype, strategy, seed):
    """fp32 accumulation of rounded inputs: compared to the float64 oracle of the *same rounded*
    inputs with fp32 tolerances (the only error left is the fp32 summation and bias add)."""
    x, W, b = _problem(13, 21, 77, dtype=dtype, seed=seed)
    k = 9
    blocks = _blocks(16, 8, 16, 8, strategy)
    top, idx, _, _ = _select(x, W, b, k, strategy=strategy, num_slabs=2, blocks=blocks)
    _check_topk(top, idx, _scores(x, W, b), k, exact=False)


@pytest.mark.parametrize("k", [1, 5, 33])
def test_k_edges_and_default_blocks(k, seed):
    """The launcher's own blocks and slabs (one program covers everything at this size), k = 1,
    k not a power of two, and k = n."""
    x, W, b = _problem(7, 5, 33, dtype=torch.float64, seed=seed)
    top, idx, _, _ = _select(x, W, b, k)
    _check_topk(top, idx, _scores(x, W, b), k, exact=True)


def test_strided_inputs(seed):
    """x and W_enc with non-unit strides: W_enc as the transpose of a latent-major buffer, x a
    column slice."""
    x_wide, W_t, b = _problem(9, 2 * 11, 40, dtype=torch.float64, seed=seed)
    x = x_wide[:, ::2]
    W = W_t[:11].T.contiguous().T  # [11, 40] stored as [40, 11]
    assert W.stride() == (1, 11)
    top, idx, _, _ = _select(x, W, b, 6, blocks=_blocks(8, 4, 16, 4), num_slabs=2)
    _check_topk(top, idx, _scores(x, W, b), 6, exact=True)


def test_heavy_ties_every_score_equal():
    """All scores equal: any k distinct latents are a correct answer."""
    x = torch.ones(5, 3, dtype=torch.float64, device=DEVICE)
    W = torch.zeros(3, 50, dtype=torch.float64, device=DEVICE)
    b = torch.full((50,), 2.0, dtype=torch.float64, device=DEVICE)
    for strategy in STRATEGIES:
        blocks = _blocks(8, 4, 16, 4, strategy)
        top, idx, _, _ = _select(x, W, b, 7, strategy=strategy, blocks=blocks)
        _check_topk(top, idx, _scores(x, W, b), 7, exact=True)


@pytest.mark.parametrize("k", [12, 40])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_adversarial_increasing_scores(k, strategy):
    """Scores rise with the latent id, so every tile beats the whole state: the gate sees the
    largest r on every tile (k=12: the sort-merge step each time; k=40 > BLOCK_N: rounds capped
    at BLOCK_N each time)."""
    n = 96
    x = torch.tensor([[1.0, 0.5]], dtype=torch.float64).repeat(3, 1).to(DEVICE)
    W = torch.stack([torch.arange(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)])
    W, b = W.to(DEVICE), torch.zeros(n, dtype=torch.float64, device=DEVICE)
    kp = 1 << (k - 1).bit_length()
    blocks = _blocks(kp, 4, 16, 4, strategy)
    top, idx, _, _ = _select(x, W, b, k, strategy=strategy, num_slabs=1, blocks=blocks)
    _check_topk(top, idx, _scores(x, W, b), k, exact=True)


def test_ties_follow_lower_index_rule(seed):
    """The documented rule: among equal scores the lower latent id wins, as in the oracle."""
    x, W, b = _problem(11, 4, 60, dtype=torch.float64, seed=seed, integer=True)
    k = 10
    top, idx, _, _ = _select(x, W, b, k, blocks=_blocks(16, 8, 16, 4), num_slabs=3)
    _, expected = torch.sort(_scores(x, W, b), dim=1, descending=True, stable=True)
    assert torch.equal(idx.cpu(), expected[:, :k])


def test_empty_batch():
    x, W, b = _problem(0, 4, 20, dtype=torch.float64, seed=0)
    top, idx, _, _ = et.select_topk(x, W, b, 3)
    assert top.shape == (0, 3) and idx.shape == (0, 3)


def test_no_aux_without_dead_latents():
    x, W, b = _problem(3, 4, 20, dtype=torch.float64, seed=0)
    dead = torch.zeros(20, dtype=torch.bool, device=DEVICE)
    assert _select(x, W, b, 3, dead_mask=dead, k_aux=4)[2:] == (None, None)
    assert _select(x, W, b, 3, dead_mask=~dead, k_aux=0)[2:] == (None, None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(k=0), "k=0"),
        (dict(k=21), "k=21"),
        (dict(W_dtype=torch.float32), "share one of"),
        (dict(strategy="heap"), "strategy='heap'"),
        (dict(threshold=torch.zeros(19, dtype=torch.float64)), "threshold"),
        (dict(dead_mask=torch.zeros(20)), "dead_mask"),
        (dict(k_aux=-1, dead_mask=torch.ones(20, dtype=torch.bool)), "k_aux=-1"),
    ],
)
def test_bad_arguments_fail_early(change, message):
    x, W, b = _problem(3, 4, 20, dtype=torch.float64, seed=0)
    W = W.to(change.pop("W_dtype", W.dtype))
    kwargs = {"k": 3, **change}
    for key in ("threshold", "dead_mask"):
        if key in kwargs:
            kwargs[key] = kwargs[key].to(DEVICE)
    k = kwargs.pop("k")
    with pytest.raises(ValueError, match=message):
        et.select_topk(x, W, b, k, **kwargs)
