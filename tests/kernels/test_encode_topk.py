"""kernels/encode_topk.py against the float64 oracles in :mod:`fastsae.reference`.

Runs under ``TRITON_INTERPRET=1`` on CPU (set before Triton is imported), or on CUDA when there
is a GPU. Shapes stay tiny (B <= 40, d_in <= 40, d_sae <= 96) and the blocks are the smallest a
GPU compiles (``tl.dot`` needs M, N, K >= 16 on NVIDIA; the launcher rejects less), so that
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
    st.integers(1, 40),  # B
    st.integers(1, 40),  # d_in
    st.integers(1, 96),  # d_sae
)
# Every block a GPU compiles too (>= 16 for tl.dot), as the launcher enforces.
layouts = st.tuples(
    st.sampled_from([16, 32]),  # BLOCK_M
    st.sampled_from([16, 32]),  # BLOCK_N (raised to KP)
    st.sampled_from([16, 32]),  # BLOCK_K
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
    width = min(k_aux, n)  # AuxK slots: fixed by k_aux, not by the dead count
    kp = 1 << (max(k, width) - 1).bit_length()
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
    # Slots past the number of dead latents are -inf padding (checked by _check_topk).
    dead_scores = torch.where(dead.cpu(), scores, float("-inf"))
    _check_topk(aux_top, aux_idx, dead_scores, width, exact=True)
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
    blocks = _blocks(16, 16, 16, 16, strategy)
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
    top, idx, _, _ = _select(x, W, b, 6, blocks=_blocks(8, 16, 16, 16), num_slabs=2)
    _check_topk(top, idx, _scores(x, W, b), 6, exact=True)


def test_heavy_ties_every_score_equal():
    """All scores equal: any k distinct latents are a correct answer."""
    x = torch.ones(5, 3, dtype=torch.float64, device=DEVICE)
    W = torch.zeros(3, 50, dtype=torch.float64, device=DEVICE)
    b = torch.full((50,), 2.0, dtype=torch.float64, device=DEVICE)
    for strategy in STRATEGIES:
        blocks = _blocks(8, 16, 16, 16, strategy)
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
    blocks = _blocks(kp, 16, 16, 16, strategy)
    top, idx, _, _ = _select(x, W, b, k, strategy=strategy, num_slabs=1, blocks=blocks)
    _check_topk(top, idx, _scores(x, W, b), k, exact=True)


def test_ties_follow_lower_index_rule(seed):
    """The documented rule: among equal scores the lower latent id wins, as in the oracle."""
    x, W, b = _problem(11, 4, 60, dtype=torch.float64, seed=seed, integer=True)
    k = 10
    top, idx, _, _ = _select(x, W, b, k, blocks=_blocks(16, 16, 16, 16), num_slabs=3)
    _, expected = torch.sort(_scores(x, W, b), dim=1, descending=True, stable=True)
    assert torch.equal(idx.cpu(), expected[:, :k])


def test_empty_batch():
    x, W, b = _problem(0, 4, 20, dtype=torch.float64, seed=0)
    top, idx, _, _ = et.select_topk(x, W, b, 3)
    assert top.shape == (0, 3) and idx.shape == (0, 3)


def test_aux_without_dead_latents_is_padding():
    """No dead latent: every AuxK slot is -inf padding (the kernel does not count the dead
    latents, so the width stays min(k_aux, d_sae)); k_aux = 0: no AuxK at all."""
    x, W, b = _problem(3, 4, 20, dtype=torch.float64, seed=0)
    dead = torch.zeros(20, dtype=torch.bool, device=DEVICE)
    _, _, aux_top, aux_idx = _select(x, W, b, 3, dead_mask=dead, k_aux=4)
    assert aux_top.shape == aux_idx.shape == (3, 4)
    assert torch.isneginf(aux_top).all()
    assert _select(x, W, b, 3, dead_mask=~dead, k_aux=0)[2:] == (None, None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(k=0), "k=0"),
        (dict(k=21), "k=21"),
        (dict(blocks=et.Blocks(8, 16, 16, 8, 3)), "block_m=8"),
        (dict(blocks=et.Blocks(16, 16, 8, 8, 3)), "block_k=8"),
        (dict(blocks=et.Blocks(16, 24, 16, 8, 3)), "block_n=24"),
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


# ---------------------------------------------------------------------------------------------
# Issue 13: compile keys, signed zeros and NaN, grid limits, large k / k_aux
# ---------------------------------------------------------------------------------------------


def _meta(kernel_plan):
    """Everything but the tensors (constexprs, sizes, strides, launch options) and the grid: a
    superset of what decides a compile."""
    _, grid, kwargs = kernel_plan
    return {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}, grid


@pytest.mark.parametrize("k_aux", [3, 40, 256])
def test_aux_compile_key_does_not_depend_on_the_dead_count(k_aux):
    """Latents die during training: the specialisation (KAP, blocks, grid) must stay the same,
    or every new power of two of dead latents compiles a fresh kernel mid-run."""
    x, W, b = _problem(4, 8, 300, dtype=torch.float32, seed=0)
    metas = []
    for n_dead in (0, 1, 5, 17, 120, 300):
        dead = torch.zeros(300, dtype=torch.bool, device=DEVICE)
        dead[:n_dead] = True
        args = (x, W, b, 8, None, dead, k_aux, et.DEFAULT_STRATEGY, None, None)
        plan, _, aux, width = et._launch_plan(*args)
        assert width == min(k_aux, 300) and aux.shape[2] == 1 << (width - 1).bit_length()
        metas.append(_meta(plan))
    assert all(m == metas[0] for m in metas), "the compile key changed with the dead count"


def test_aux_launch_never_reads_the_dead_mask_back():
    """No host sync on the dead mask in the kernel's launcher (it blocked CUDA graphs and
    stalled the stream every step)."""

    class NoSync(torch.Tensor):
        def __bool__(self):
            raise AssertionError("host sync: bool(dead_mask ...)")

        def __int__(self):
            raise AssertionError("host sync: int(dead_mask ...)")

        def item(self):
            raise AssertionError("host sync: dead_mask....item()")

    x, W, b = _problem(3, 4, 40, dtype=torch.float64, seed=0)
    dead = (torch.arange(40, device=DEVICE) % 3 == 0).as_subclass(NoSync)
    args = (x, W, b, 4, None, dead, 6, et.DEFAULT_STRATEGY, None, None)
    et._launch_plan(*args)


def test_negative_zero_ties_with_positive_zero():
    """fp64 scores of +-1e-300 round to +0.0 and -0.0 in fp32: equal scores, so the lower latent
    wins. Unfixed, -0.0's bits sorted it below +0.0 and latent 1 won."""
    x = torch.zeros(2, 1, dtype=torch.float64, device=DEVICE)
    W = torch.zeros(1, 4, dtype=torch.float64, device=DEVICE)
    b = torch.tensor([-1e-300, 1e-300, -1.0, -2.0], dtype=torch.float64, device=DEVICE)
    top, idx, _, _ = _select(x, W, b, 1, blocks=_blocks(1, 16, 16, 16))
    assert idx.cpu().tolist() == [[0], [0]]
    assert top.cpu().tolist() == [[0.0], [0.0]]


def test_nan_scores_rank_above_inf_whatever_their_sign():
    """A NaN score is selected first, as torch.topk ranks NaN; its sign bit does not matter (a
    negative NaN used to sort below -inf, 0xFF800001 exactly onto the masked sentinel)."""
    nan_bits = torch.tensor([0x7FC00000, -0x00400000, -0x007FFFFF], dtype=torch.int32)
    nans = nan_bits.view(torch.float32).double()  # +qNaN, -qNaN (0xFFC00000), 0xFF800001
    x = torch.zeros(1, 1, dtype=torch.float64, device=DEVICE)
    W = torch.zeros(1, 6, dtype=torch.float64, device=DEVICE)
    for nan in nans:
        b = torch.tensor([1.0, 3.0, 0.0, 2.0, 0.0, float("inf")], dtype=torch.float64)
        b[4] = nan
        top, idx, _, _ = _select(x, W, b.to(DEVICE), 3, blocks=_blocks(4, 16, 16, 16))
        assert idx.cpu().tolist() == [[4, 5, 1]], f"NaN bits {nan}"
        assert top[0, 0].isnan() and top[0, 1] == float("inf")
        assert torch.sort(
            torch.tensor([1.0, 3.0, 0.0, 2.0, nan, float("inf")]), descending=True
        ).indices[:3].tolist() == [4, 5, 1], "torch.topk ranks NaN first"


def test_num_slabs_respects_the_grid_limit():
    """Slabs are grid dimension 1 (CUDA caps it at 65535)."""
    for requested in (None, 10**6):
        S, per_slab = et._slabs(1, 4 * 10**6, requested)
        assert S <= 65535 and S * per_slab >= 4 * 10**6


def test_block_sizes_must_compile_on_a_gpu():
    et.check_blocks(et.Blocks(16, 16, 16, 8, 3))
    with pytest.raises(ValueError, match="block_k=4"):
        et.check_blocks(et.Blocks(16, 16, 4, 8, 3))
    for kp in (1, 16, 64, 512):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            et.check_blocks(et.blocks_for(kp, 0, dtype))


# ---------------------------------------------------------------------------------------------
# Through the ops layer: no k or k_aux crashes the triton backend
# ---------------------------------------------------------------------------------------------


def _ops_problem(B, d, n, seed):
    x, W, b = _problem(B, d, n, dtype=torch.float64, seed=seed)
    return x, W, b, ref.pre_activations(x.cpu(), W.cpu(), b.cpu())


@pytest.mark.parametrize("n_dead", [0, 3, 30])
def test_auxk_past_max_k_falls_back(n_dead, monkeypatch):
    """min(k_aux, n_dead) > MAX_K raised mid-training (default k_aux = d_in / 2). MAX_K is
    patched small so the interpreter stays fast; the AuxK pass moves to the torch path."""
    from fastsae import ops

    monkeypatch.setattr(et, "MAX_K", 8)
    x, W, b, pre = _ops_problem(5, 6, 48, seed=1)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[torch.randperm(48, generator=torch.Generator().manual_seed(0))[:n_dead]] = True
    with ops.use_backend("triton"):
        out = ops.encode_topk(x, W, b, 4, dead_mask=dead.to(DEVICE), k_aux=20)
    want_v, _ = ref.topk(pre, 4)
    assert_close(out.values.cpu(), want_v)
    assert_close(pre.gather(1, out.indices.cpu()).clamp(min=0), want_v)
    if n_dead == 0:
        assert out.aux_values is None
        return
    dead_pre = torch.where(dead, pre, float("-inf"))
    aux_top = torch.sort(dead_pre, dim=1, descending=True).values[:, : min(20, n_dead)]
    assert out.aux_values.shape == (5, min(20, n_dead))
    assert_close(out.aux_values.cpu(), aux_top.clamp(min=0))
    assert dead[out.aux_indices.cpu()].all()


def test_auxk_real_default_width_does_not_crash():
    """The unpatched cap: k_aux = 1152 (d_in = 2304's default) with 600 dead latents."""
    from fastsae import ops

    n = 1200
    x, W, b, pre = _ops_problem(2, 3, n, seed=2)
    dead = torch.arange(n) % 2 == 0
    with ops.use_backend("triton"):
        out = ops.encode_topk(x, W, b, 3, dead_mask=dead.to(DEVICE), k_aux=1152)
    assert out.aux_values.shape == (2, 600)
    want = torch.sort(torch.where(dead, pre, float("-inf")), dim=1, descending=True).values
    assert_close(out.aux_values.cpu(), want[:, :600].clamp(min=0))


def test_jumprelu_and_batch_topk_widen_past_max_k(monkeypatch):
    """JumpReLU doubles its cap and BatchTopK its candidate count until no row is cut off; both
    passed MAX_K and raised."""
    from fastsae import ops

    monkeypatch.setattr(et, "MAX_K", 4)
    x, W, b, pre = _ops_problem(3, 4, 40, seed=3)
    threshold = torch.zeros(40, dtype=torch.float64)  # every positive latent passes: ~20 > 4
    with ops.use_backend("triton"):
        codes = ops.encode_jumprelu(x, W, b, threshold.to(DEVICE), k_cap=2)
        batch = ops.encode_batch_topk(x, W, b, 12.0)
    dense = ref.sparse_to_dense(codes.values.cpu(), codes.indices.cpu(), 40)
    assert_close(dense, torch.where(pre > threshold, pre, 0.0))
    got = ref.sparse_to_dense(batch.values.cpu(), batch.indices.cpu(), 40)
    assert_close(got, ref.batch_topk(pre, 12.0))


# ---------------------------------------------------------------------------------------------
# Issue 13: the threshold-filtered kernel (kernels/encode_topk_filtered.py). Same oracle, same
# checks; its tile shape, program count and TMA switch are launch parameters, set small here
# (the 128 x 128 default is what kernels/check.py compiles).
# ---------------------------------------------------------------------------------------------

from fastsae.kernels import encode_topk_filtered as ef  # noqa: E402

filtered_layouts = st.tuples(
    st.sampled_from([16, 32]),  # BLOCK_M
    st.sampled_from([16, 32]),  # BLOCK_N
    st.sampled_from([16, 32]),  # BLOCK_K
    st.sampled_from([None, 1, 2, 3]),  # num_slabs
    st.sampled_from([1, 2, 3]),  # persistent programs (fewer than the work items: loops)
    st.booleans(),  # TMA descriptors (where the layout allows them)
)


def _filtered(x, W, b, k, layout, **kwargs):
    bm, bn, bk, slabs, programs, tma = layout
    blocks = ef.Blocks(bm, bn, bk, num_programs=programs)
    with mock.patch.object(et, "_new_candidates", _poisoned):
        return ef.select_topk(x, W, b, k, num_slabs=slabs, blocks=blocks, use_tma=tma, **kwargs)


@settings(max_examples=15, deadline=None)
@given(
    shape=shapes,
    k_frac=st.floats(0.0, 1.0),
    layout=filtered_layouts,
    integer=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_filtered_matches_oracle(shape, k_frac, layout, integer, seed):
    B, d, n = shape
    k = max(1, min(n, round(k_frac * n)))
    x, W, b = _problem(B, d, n, dtype=torch.float64, seed=seed, integer=integer)
    top, idx, aux_top, _ = _filtered(x, W, b, k, layout)
    assert aux_top is None
    _check_topk(top, idx, _scores(x, W, b), k, exact=True)


@settings(max_examples=10, deadline=None)
@given(
    shape=shapes,
    k=st.integers(1, 8),
    k_aux=st.integers(1, 40),
    dead_frac=st.sampled_from([0.05, 0.3, 1.0]),
    layout=filtered_layouts,
    thr_scale=st.sampled_from([None, 0.0, 2.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_filtered_threshold_and_auxk(shape, k, k_aux, dead_frac, layout, thr_scale, seed):
    """Threshold mode (rows with fewer than k finite scores) and the AuxK state, which shares the
    tile's scratch with the main state."""
    B, d, n = shape
    k = min(k, n)
    x, W, b = _problem(B, d, n, dtype=torch.float64, seed=seed, integer=seed % 2 == 0)
    g = torch.Generator().manual_seed(seed + 2)
    dead = (torch.rand(n, generator=g) < dead_frac).to(DEVICE)
    threshold = None
    if thr_scale is not None:
        threshold = (thr_scale * torch.rand(n, generator=g, dtype=torch.float64)).to(DEVICE)
    top, idx, aux_top, aux_idx = _filtered(
        x, W, b, k, layout, threshold=threshold, dead_mask=dead, k_aux=k_aux
    )
    scores = _scores(x, W, b, threshold)
    _check_topk(top, idx, scores, k, exact=True)
    dead_scores = torch.where(dead.cpu(), scores, float("-inf"))
    _check_topk(aux_top, aux_idx, dead_scores, min(k_aux, n), exact=True)
    finite = torch.isfinite(aux_top.cpu())
    assert dead.cpu()[aux_idx.cpu()[finite]].all(), "an AuxK latent is not dead"


@pytest.mark.parametrize("tma", [False, True])
def test_filtered_ties_signed_zero_and_nan(tma, seed):
    """The tie rule (lower latent first, exactly the stable sort's order), -0.0 tying with +0.0,
    and NaN ranked above +inf, on both load paths."""
    layout = (16, 16, 16, 2, 2, tma)
    x, W, b = _problem(11, 4, 60, dtype=torch.float64, seed=seed, integer=True)
    _, idx, _, _ = _filtered(x, W, b, 10, layout)
    _, expected = torch.sort(_scores(x, W, b), dim=1, descending=True, stable=True)
    assert torch.equal(idx.cpu(), expected[:, :10])

    zeros = torch.zeros(2, 1, dtype=torch.float64, device=DEVICE)
    Wz = torch.zeros(1, 4, dtype=torch.float64, device=DEVICE)
    bz = torch.tensor([-1e-300, 1e-300, -1.0, -2.0], dtype=torch.float64, device=DEVICE)
    top, idx, _, _ = _filtered(zeros, Wz, bz, 1, (16, 16, 16, None, 1, tma))
    assert idx.cpu().tolist() == [[0], [0]] and top.cpu().tolist() == [[0.0], [0.0]]

    W6 = torch.zeros(1, 6, dtype=torch.float64, device=DEVICE)
    for bits in (0x7FC00000, -0x00400000, -0x007FFFFF):
        nan = torch.tensor([bits], dtype=torch.int32).view(torch.float32).double()[0]
        b6 = torch.tensor([1.0, 3.0, 0.0, 2.0, nan, float("inf")], dtype=torch.float64)
        top, idx, _, _ = _filtered(zeros[:1], W6, b6.to(DEVICE), 3, (16, 16, 16, None, 1, tma))
        assert idx.cpu().tolist() == [[4, 5, 1]], f"NaN bits {bits:#x}"
        assert top[0, 0].isnan() and top[0, 1] == float("inf")


@pytest.mark.parametrize("k", [12, 40])
def test_filtered_adversarial_increasing_scores(k):
    """Every tile beats the whole state: every tile takes the slow path with every column
    passing (k=12: sorted merges; k=40 > the 32-wide tile: rounds only)."""
    n = 96
    x = torch.tensor([[1.0, 0.5]], dtype=torch.float64).repeat(3, 1).to(DEVICE)
    W = torch.stack([torch.arange(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)])
    W, b = W.to(DEVICE), torch.zeros(n, dtype=torch.float64, device=DEVICE)
    top, idx, _, _ = _filtered(x, W, b, k, (16, 32, 16, 1, 1, False))
    _check_topk(top, idx, _scores(x, W, b), k, exact=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_filtered_low_precision_inputs(dtype, seed):
    x, W, b = _problem(13, 32, 77, dtype=dtype, seed=seed)
    top, idx, _, _ = _filtered(x, W, b, 9, (16, 16, 16, 2, 2, True))
    _check_topk(top, idx, _scores(x, W, b), 9, exact=False)


def test_filtered_default_blocks_and_strided_inputs(seed):
    """The launcher's own 128 x 128 blocks and program count; then x and W_enc with layouts TMA
    cannot take (a column slice; W_enc.T of a latent-major buffer is taken, through a descriptor
    of the buffer), which must pick the pointer path."""
    x, W, b = _problem(7, 16, 40, dtype=torch.float64, seed=seed)
    top, idx, _, _ = ef.select_topk(x, W, b, 5)
    _check_topk(top, idx, _scores(x, W, b), 5, exact=True)

    x_wide, W_t, b = _problem(9, 2 * 16, 40, dtype=torch.float64, seed=seed)
    x_slice = x_wide[:, ::2]
    W_lm = W_t[:16].T.contiguous().T  # [16, 40] stored as [40, 16]
    blocks = ef.Blocks(16, 16, 16, num_programs=2)
    for xx, ww, tma in ((x_slice, W_lm, False), (x_wide[:, :16], W_lm, True)):
        plan = ef._launch_plan(xx, ww, b, 6, None, None, 0, 2, blocks, True)[0]
        assert plan[2]["USE_TMA"] is tma
        assert plan[2]["W_T"] is tma  # the latent-major buffer is read through its own descriptor
        top, idx, _, _ = _filtered(xx, ww, b, 6, (16, 16, 16, 2, 2, True))
        _check_topk(top, idx, _scores(xx, ww, b), 6, exact=True)


def test_filtered_blocks_and_grid():
    """128 x 128 tiles up to k=32 (bf16; 64 x 128 for fp32), fewer rows above (the slow path's
    registers); the persistent
    grid never launches more programs than work items; bad blocks fail before any launch."""
    assert ef.blocks_for(32, 0, torch.bfloat16)[:3] == (128, 128, 64)
    assert ef.blocks_for(32, 0, torch.float32)[:3] == (64, 128, 32)  # tf32x3 spilled at 128
    assert ef.blocks_for(64, 0, torch.float32).block_m == 32
    assert ef.blocks_for(64, 0, torch.bfloat16).block_m == 64
    assert ef.blocks_for(128, 0, torch.bfloat16).block_m == 32
    assert ef.blocks_for(32, 256, torch.bfloat16).block_m == 16
    x, W, b = _problem(40, 16, 300, dtype=torch.float64, seed=0)
    plan = ef._launch_plan(x, W, b, 4, None, None, 0, 2, ef.Blocks(16, 16, 16), None)[0]
    assert plan[1] == (min(ef.DEFAULT_SMS, 3 * 2),) and plan[2]["num_work"] == 6
    x, W, b = _problem(40, 16, 320, dtype=torch.float64, seed=0)  # 16-byte aligned rows
    for dtype, tma in ((torch.bfloat16, True), (torch.float32, False)):  # TMA: 16-bit inputs
        args = (x.to(dtype), W.to(dtype), b.to(dtype), 4, None, None, 0, None, None, None)
        assert ef._launch_plan(*args)[0][2]["USE_TMA"] is tma
    with pytest.raises(ValueError, match="block_n=24"):
        ef.select_topk(x, W, b, 4, blocks=ef.Blocks(16, 24, 16))
    with pytest.raises(ValueError, match="k=0"):
        ef.select_topk(x, W, b, 0)
