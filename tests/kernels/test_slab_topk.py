"""kernels/slab_topk.py against the float64 oracles in :mod:`fastsae.reference`.

Runs under ``TRITON_INTERPRET=1`` on CPU, or on CUDA when there is a GPU. Shapes stay tiny and
the slabs, splits and blocks are shrunk so that they still give several slabs (the state
carried from one to the next), column splits, row blocks and tiles. Block sizes here are valid
on hardware too (the kernel has no ``tl.dot``, so any power-of-two ``BLOCK_M`` compiles).

Exactness: with float64 inputs the slab is float64 and the kernel ranks each score rounded to
float32 once, so its scores are the oracle's ``pre.float()``. Every check compares **sorted**
values, ``scores.gather`` at the returned indices, and "no unselected score beats the k-th";
the tie tests compare indices with the oracle's stable sort, whose order *is* the rule.
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
from fastsae.kernels import slab_topk as sk  # noqa: E402
from tests.tolerances import assert_close, tolerance  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# The largest int64 key decodes to a NaN score above every real one: a state slot the kernel
# failed to write would be selected, and caught.
POISON = torch.iinfo(torch.int64).max


def _poisoned(shape, device):
    return torch.full(shape, POISON, dtype=torch.int64, device=device)


def _select(x, W, b, k, **kwargs):
    """``select_topk`` with the state buffers poisoned before the kernel writes them."""
    with mock.patch.object(sk, "_new_state", _poisoned):
        return sk.select_topk(x, W, b, k, **kwargs)


def _problem(B, d, n, *, dtype=torch.float64, seed=0, integer=False):
    """``(x, W_enc, b_enc)``. ``integer``: values in {-2..2} (biases {-1, 0, 1}), so many scores
    tie exactly."""
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


def _scores(x, W, b, threshold=None, dead=None) -> torch.Tensor:
    """The oracle's float64 scores; ``-inf`` under the threshold or (``dead``) on live latents."""
    pre = ref.pre_activations(x.cpu().double(), W.cpu().double(), b.cpu().double())
    if threshold is not None:
        pre = torch.where(pre > threshold.cpu().double(), pre, float("-inf"))
    if dead is not None:
        pre = torch.where(dead.cpu(), pre, float("-inf"))
    return pre


def _check_topk(top, idx, scores, k, *, exact=True):
    """Tie-proof checks of ``(top, idx)`` against float64 ``scores [B, n]``."""
    B, n = scores.shape
    top, idx = top.cpu(), idx.cpu()
    assert top.shape == (B, k) and idx.shape == (B, k)
    assert top.dtype == torch.float32 and idx.dtype == torch.int64
    assert not top.isnan().any(), "NaN in top: an unwritten state slot was selected"
    assert ((idx >= 0) & (idx < n)).all(), "index out of range"
    assert (top[:, 1:] <= top[:, :-1]).all(), "top is not sorted descending"
    expected = torch.sort(scores, dim=1, descending=True).values[:, :k]
    finite = torch.isfinite(top)
    assert torch.equal(finite, torch.isfinite(expected)), "wrong number of finite scores"
    picked = scores.gather(1, idx)
    if exact:
        assert torch.equal(top, expected.float()), "sorted top-k scores differ"
        assert torch.equal(picked.float()[finite], top[finite])
    else:
        assert_close(top, expected)
        assert_close(top[finite], picked[finite])
    for row in range(B):
        ids = idx[row][finite[row]]
        assert ids.unique().numel() == ids.numel(), f"row {row} repeats a latent"
    chosen = torch.zeros(B, n + 1, dtype=torch.bool)
    chosen.scatter_(1, torch.where(finite, idx, n), True)
    rest = torch.where(chosen[:, :n], float("-inf"), scores).max(dim=1).values
    kth = top[:, -1]
    if exact:
        assert (rest.float() <= kth).all(), "an unselected score beats the k-th"
    else:
        rtol, atol = tolerance(torch.float32)
        bound = torch.where(torch.isfinite(kth), kth + atol + rtol * kth.abs(), kth)
        assert (rest <= bound.double()).all(), "an unselected score beats the k-th"


def _blocks(bm: int, bn: int) -> sk.Blocks:
    return sk.Blocks(bm, bn, sk.NUM_WARPS)


# ---------------------------------------------------------------------------------------------
# Properties against the oracle (float64 inputs: exact)
# ---------------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 9), st.integers(1, 8), st.integers(1, 80))  # B, d_in, d_sae
layouts = st.tuples(
    st.sampled_from([1, 2, 4]),  # BLOCK_M
    st.sampled_from([16, 32]),  # BLOCK_N (KP above it: rounds only, no sorted merge)
    st.sampled_from([None, 7, 16, 33]),  # latents per slab
    st.sampled_from([None, 1, 2, 3]),  # column splits
)


@settings(max_examples=12, deadline=None)
@given(
    shape=shapes,
    k_frac=st.floats(0.0, 1.0),
    layout=layouts,
    integer=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_topk_matches_oracle(shape, k_frac, layout, integer, seed):
    B, d, n = shape
    k = max(1, min(n, round(k_frac * n)))
    bm, bn, slab, splits = layout
    x, W, b = _problem(B, d, n, seed=seed, integer=integer)
    top, idx, aux_top, aux_idx = _select(
        x, W, b, k, slab=slab, splits=splits, blocks=_blocks(bm, bn)
    )
    assert aux_top is None and aux_idx is None
    _check_topk(top, idx, _scores(x, W, b), k)
    if integer:  # heavy ties: the index order itself is the rule
        _, expected = torch.sort(_scores(x, W, b), dim=1, descending=True, stable=True)
        assert torch.equal(idx.cpu()[torch.isfinite(top.cpu())], expected[:, :k].flatten())


@settings(max_examples=10, deadline=None)
@given(
    shape=shapes,
    k=st.integers(1, 8),
    k_aux=st.integers(1, 40),
    dead_frac=st.sampled_from([0.05, 0.3, 1.0]),
    layout=layouts,
    with_threshold=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_threshold_and_auxk(shape, k, k_aux, dead_frac, layout, with_threshold, seed):
    """AuxK: the top min(k_aux, n_dead) scores among dead latents (its own pass over each slab);
    thresholds leave rows with fewer than k finite scores, padded with -inf."""
    B, d, n = shape
    k = min(k, n)
    bm, bn, slab, splits = layout
    x, W, b = _problem(B, d, n, seed=seed, integer=seed % 2 == 0)
    g = torch.Generator().manual_seed(seed + 1)
    dead = (torch.rand(n, generator=g) < dead_frac).to(DEVICE)
    threshold = torch.rand(n, generator=g, dtype=torch.float64).to(DEVICE)
    threshold = threshold if with_threshold else None
    top, idx, aux_top, aux_idx = _select(
        x,
        W,
        b,
        k,
        threshold=threshold,
        dead_mask=dead,
        k_aux=k_aux,
        slab=slab,
        splits=splits,
        blocks=_blocks(bm, bn),
    )
    _check_topk(top, idx, _scores(x, W, b, threshold), k)
    n_dead = int(dead.sum())
    if n_dead == 0:
        assert aux_top is None and aux_idx is None
        return
    _check_topk(aux_top, aux_idx, _scores(x, W, b, threshold, dead), min(k_aux, n_dead))
    finite = torch.isfinite(aux_top.cpu())
    assert dead.cpu()[aux_idx.cpu()[finite]].all(), "an AuxK latent is not dead"


# ---------------------------------------------------------------------------------------------
# Ties, zeros, NaN, large k, adversarial orders
# ---------------------------------------------------------------------------------------------


def _with_slab_scores(scores: torch.Tensor):
    """Patch the GEMM so the kernel sees ``scores [B, n]`` exactly (W_enc only gives shapes)."""
    return mock.patch.object(sk, "_scores", lambda x, W, b, start, stop: scores[:, start:stop])


def test_negative_zero_ties_positive_zero():
    """-0.0 == +0.0 for the oracle's sort, so the lower latent wins among zeros of either sign;
    a plain bit-pattern order would put every -0.0 below every +0.0."""
    n = 40
    scores = torch.zeros(3, n, dtype=torch.float64)
    scores[:, ::2] = -0.0
    scores[1, 30:] = 1.0
    scores[2, 5] = -1.0
    x, W, b = torch.zeros(3, 1, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64), None
    with _with_slab_scores(scores.to(DEVICE)):
        top, idx, _, _ = _select(
            x.to(DEVICE), W.to(DEVICE), torch.zeros(n, dtype=torch.float64, device=DEVICE), 15,
            slab=16, splits=2, blocks=_blocks(2, 16),
        )  # fmt: skip
    _, expected = torch.sort(scores, dim=1, descending=True, stable=True)
    assert torch.equal(idx.cpu(), expected[:, :15])
    assert b is None


def test_nan_scores_rank_first_and_never_masked():
    """A NaN score (either sign) ranks above +inf, as torch.sort ranks NaN, and a negative NaN
    is not mistaken for the masked sentinel."""
    n = 20
    scores = torch.randn(2, n, dtype=torch.float64)
    scores[0, 7] = float("nan")
    scores[1, 3] = -float("nan")
    scores[1, 4] = float("inf")
    W = torch.zeros(1, n, dtype=torch.float64, device=DEVICE)
    with _with_slab_scores(scores.to(DEVICE)):
        top, idx, _, _ = _select(
            torch.zeros(2, 1, dtype=torch.float64, device=DEVICE), W,
            torch.zeros(n, dtype=torch.float64, device=DEVICE), 3, blocks=_blocks(2, 16),
        )  # fmt: skip
    assert idx[0, 0] == 7 and idx[1, 0] == 3 and idx[1, 1] == 4
    assert top[0, 0].isnan() and top[1, 0].isnan() and top[1, 1] == float("inf")


@pytest.mark.slow
def test_large_k_default_blocks(seed):
    """k = 1000 (not a power of two) with the launcher's own blocks (BLOCK_N = KP = 1024,
    BLOCK_M = 2): the first tile takes the sorted merge, the second gated rounds."""
    x, W, b = _problem(2, 3, 1040, seed=seed, integer=True)
    top, idx, _, _ = _select(x, W, b, 1000)
    _check_topk(top, idx, _scores(x, W, b), 1000)


def test_k_1024_narrow_tiles(seed):
    """k = 1024 = KP with tiles narrower than the state: rounds only, over two slabs and two
    splits (the sorted merge at KP = 1024 is covered by the test above and the compile check)."""
    x, W, b = _problem(2, 3, 1100, seed=seed)
    top, idx, _, _ = _select(x, W, b, 1024, slab=600, splits=2, blocks=_blocks(2, 256))
    _check_topk(top, idx, _scores(x, W, b), 1024)


@pytest.mark.parametrize(("k", "bn"), [(12, 16), (40, 16)])
def test_adversarial_increasing_scores(k, bn):
    """Scores rise with the latent id, so every tile beats the whole state: k=12 takes the
    sorted merge on every tile, k=40 > BLOCK_N runs BLOCK_N rounds on every tile."""
    n = 96
    x = torch.tensor([[1.0, 0.5]], dtype=torch.float64).repeat(3, 1).to(DEVICE)
    W = torch.stack([torch.arange(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)])
    W, b = W.to(DEVICE), torch.zeros(n, dtype=torch.float64, device=DEVICE)
    top, idx, _, _ = _select(x, W, b, k, slab=50, splits=1, blocks=_blocks(4, bn))
    _check_topk(top, idx, _scores(x, W, b), k)


def test_rows_with_fewer_than_k_positive_scores(seed):
    """Scores are returned un-ReLU'd: negative scores fill the rows, in order."""
    x, W, b = _problem(6, 5, 50, seed=seed)
    b = b - 10.0
    top, idx, _, _ = _select(x, W, b, 9, slab=20, blocks=_blocks(2, 16))
    scores = _scores(x, W, b)
    assert (scores.max(1).values < 5).all()
    _check_topk(top, idx, scores, 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(dtype, seed):
    """The slab is in the input dtype (as the torch path's addmm). The selection is exact on the
    slab's own scores (fed in directly); through the real GEMM, whose blocking differs per slab,
    it is compared with the shared tolerance for its dtype."""
    x, W, b = _problem(7, 9, 70, dtype=dtype, seed=seed)
    slab_scores = torch.addmm(b, x, W)
    with _with_slab_scores(slab_scores):
        top, idx, _, _ = _select(x, W, b, 9, slab=32, splits=2, blocks=_blocks(4, 16))
    _check_topk(top, idx, slab_scores.double().cpu(), 9)
    top, idx, _, _ = _select(x, W, b, 9, slab=32, splits=2, blocks=_blocks(4, 16))
    expected = torch.sort(_scores(x, W, b), dim=1, descending=True).values[:, :9]
    assert_close(top.to(dtype), expected)
    assert_close(top.to(dtype), _scores(x, W, b).gather(1, idx.cpu()))


def test_strided_inputs(seed):
    x_wide, W_t, b = _problem(9, 2 * 11, 40, seed=seed)
    x = x_wide[:, ::2]
    W = W_t[:11].T.contiguous().T  # [11, 40] stored as [40, 11]
    top, idx, _, _ = _select(x, W, b, 6, slab=17, blocks=_blocks(4, 16))
    _check_topk(top, idx, _scores(x, W, b), 6)


def test_empty_batch_and_no_dead():
    x, W, b = _problem(0, 4, 20)
    top, idx, _, _ = sk.select_topk(x, W, b, 3)
    assert top.shape == (0, 3) and idx.shape == (0, 3)
    x, W, b = _problem(3, 4, 20)
    dead = torch.zeros(20, dtype=torch.bool, device=DEVICE)
    assert sk.select_topk(x, W, b, 3, dead_mask=dead, k_aux=4)[2:] == (None, None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(k=0), "k=0"),
        (dict(k=21), "k=21"),
        (dict(W_dtype=torch.float32), "share one of"),
        (dict(threshold=torch.zeros(19, dtype=torch.float64)), "threshold"),
        (dict(dead_mask=torch.zeros(20)), "dead_mask"),
        (dict(k_aux=-1, dead_mask=torch.ones(20, dtype=torch.bool)), "k_aux=-1"),
    ],
)
def test_bad_arguments_fail_early(change, message):
    x, W, b = _problem(3, 4, 20)
    W = W.to(change.pop("W_dtype", W.dtype))
    kwargs = {"k": 3, **change}
    for key in ("threshold", "dead_mask"):
        if key in kwargs:
            kwargs[key] = kwargs[key].to(DEVICE)
    k = kwargs.pop("k")
    with pytest.raises(ValueError, match=message):
        sk.select_topk(x, W, b, k, **kwargs)


def test_k_above_max_k_is_refused_not_crashed():
    """The kernel refuses k > MAX_K with a clear error (the ops layer falls back to torch)."""
    with pytest.raises(ValueError, match=f"k={sk.MAX_K + 1}"):
        sk._check_args(
            torch.zeros(1, 1), torch.zeros(1, sk.MAX_K + 8), torch.zeros(sk.MAX_K + 8),
            sk.MAX_K + 1, None, None, 0,
        )  # fmt: skip


def test_blocks_keep_the_state_and_tile_small():
    for kp in [1, 8, 32, 64, 128, 512, 1024, 2048]:
        blocks = sk.blocks_for(kp)
        assert blocks.block_n >= kp and blocks.block_m >= 1
        assert blocks.block_m * (blocks.block_n + kp) <= 4096


def test_custom_op_fake_shapes():
    x, W, b = _problem(4, 3, 30)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx, fW, fb = (mode.from_tensor(t) for t in (x, W, b))
        top, idx, aux, aux_idx = sk._slab_select_topk_op(
            fx, fW, fb, 5, None, None, 2, None, None, None
        )
    assert top.shape == (4, 5) and idx.dtype == torch.int64 and aux_idx.shape == (4, 2)


def test_custom_op_passes_opcheck():
    """Schema, fake impl and torch.compile tracing of ``fastsae::slab_select_topk``."""
    x, W, b = _problem(3, 2, 20)
    dead = torch.zeros(20, dtype=torch.bool, device=DEVICE)
    dead[::4] = True
    args = (x, W, b, 3, None, dead, 2, 8, None, [2, 16, sk.NUM_WARPS])
    torch.library.opcheck(sk._slab_select_topk_op, args)
