"""kernels/sparse_encoder_bwd.py against the float64 oracles: the closed form
:func:`fastsae.reference.sparse_encoder_backward`, and autograd through
``(x @ W_enc + b_enc).gather(1, indices)`` with the same upstream gradient.

Runs under ``TRITON_INTERPRET=1`` on CPU (set before Triton is imported), or on CUDA when there
is a GPU. Shapes stay tiny: the interpreter runs every program in Python.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from unittest import mock

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastsae import ops  # noqa: E402
from fastsae import reference as ref  # noqa: E402
from fastsae.kernels import csr  # noqa: E402
from fastsae.kernels import sparse_decode as sd  # noqa: E402
from fastsae.kernels import sparse_encoder_bwd as seb  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@contextmanager
def _tiles(small: bool):
    """With ``small``, shrink every tile so that tiny shapes still run several row blocks, d tiles
    (a ragged last one included) and segment steps."""
    if not small:
        yield
        return
    with (
        mock.patch.multiple(
            csr, MAX_BLOCK_D=16, SEGMENT_BLOCK_E=4, SPLIT_ENTRIES=5, LATENTS_PER_PROGRAM=3
        ),
        mock.patch.multiple(sd, FWD_BLOCK_B=4, BWD_BLOCK_P=4),
    ):
        yield


def _problem(B, k, n, d_in, *, dtype, seed, n_hit=None, zero_frac=0.2, latent_major=False):
    """Inputs in ``dtype`` on DEVICE. Latents ``>= n_hit`` are never used; some grad_pre are 0.

    ``latent_major``: ``W_enc`` is the ``.T`` view of a contiguous ``[n, d_in]`` buffer, else a
    contiguous ``[d_in, n]``.
    """
    g = torch.Generator().manual_seed(seed)
    n_hit = n if n_hit is None else max(1, min(n_hit, n))
    x = torch.randn(B, d_in, generator=g, dtype=torch.float64)
    indices = torch.randint(0, n_hit, (B, k), generator=g)
    grad_pre = torch.randn(B, k, generator=g, dtype=torch.float64)
    grad_pre[torch.rand(B, k, generator=g) < zero_frac] = 0.0
    W_enc = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    W_enc = cast(W_enc.T.contiguous()).T if latent_major else cast(W_enc)
    return cast(x), indices.to(DEVICE), cast(grad_pre), W_enc


def _oracles(x, indices, grad_pre, W_enc):
    """``(grad_W_enc, grad_b_enc, grad_x)`` two ways, in float64 on CPU: the closed form, and
    autograd through the dense pre-activations gathered at ``indices``."""
    x, grad_pre, W_enc = (t.detach().cpu().double() for t in (x, grad_pre, W_enc))
    indices = indices.cpu()
    closed = ref.sparse_encoder_backward(x, indices, grad_pre, W_enc, need_grad_x=True)
    leaves = [W_enc.clone().requires_grad_(), torch.zeros(W_enc.shape[1], dtype=torch.float64)]
    leaves[1].requires_grad_()
    leaves.append(x.clone().requires_grad_())
    pre = ref.pre_activations(leaves[2], leaves[0], leaves[1])
    grads = torch.autograd.grad(pre.gather(1, indices), leaves, grad_pre)
    return closed, tuple(grads)


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _unhit(indices, n):
    hit = torch.zeros(n, dtype=torch.bool, device=indices.device)
    hit[indices.reshape(-1)] = True
    return ~hit


def _check_launchers(x, indices, grad_pre, W_enc):
    """Both launchers write into NaN-poisoned outputs and match both oracles."""
    d_in, n = W_enc.shape
    grad_W_t, grad_b = seb._sparse_encoder_grad_weights(
        x,
        indices,
        grad_pre,
        W_enc,
        out=_nan((n, d_in), W_enc.dtype),
        out_b=_nan((n,), W_enc.dtype),
    )
    grad_x = seb._sparse_encoder_grad_x(x, indices, grad_pre, W_enc, out=_nan(x.shape, x.dtype))
    closed, autograd = _oracles(x, indices, grad_pre, W_enc)
    for got, want_closed, want_autograd, name in zip(
        (grad_W_t.T, grad_b, grad_x), closed, autograd, ("W_enc", "b_enc", "x"), strict=True
    ):
        assert_close(got.cpu(), want_closed, msg=f"grad_{name} vs closed form")
        assert_close(got.cpu(), want_autograd, msg=f"grad_{name} vs autograd")
    unhit = _unhit(indices, n)
    assert torch.equal(grad_W_t[unhit], torch.zeros_like(grad_W_t[unhit]))
    assert torch.equal(grad_b[unhit], torch.zeros_like(grad_b[unhit]))


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 12),
    k=st.integers(1, 9),  # k' = k + k_aux: main and AuxK latents in one [B, k'] block
    n=st.integers(1, 64),
    d_in=st.integers(1, 40),
    hit_frac=st.floats(0.05, 1.0),
    zero_frac=st.sampled_from([0.0, 0.3, 1.0]),
    dtype=st.sampled_from(DTYPES),
    latent_major=st.booleans(),
    small_tiles=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_launchers_match_oracles(
    B, k, n, d_in, hit_frac, zero_frac, dtype, latent_major, small_tiles, seed
):
    problem = _problem(
        B,
        k,
        n,
        d_in,
        dtype=dtype,
        seed=seed,
        n_hit=round(hit_frac * n),
        zero_frac=zero_frac,
        latent_major=latent_major,
    )
    with _tiles(small_tiles):
        _check_launchers(*problem)


@pytest.mark.parametrize("latent_major", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_public_function(dtype, latent_major, seed):
    """d_in=7, n=33, k'=5 + 3 AuxK latents, duplicates, a latent in every row, unhit latents."""
    x, indices, grad_pre, W_enc = _problem(
        6, 8, 33, 7, dtype=dtype, seed=seed, n_hit=25, latent_major=latent_major
    )
    indices[0, 1] = indices[0, 6]  # a duplicate within a row (main and AuxK slots)
    indices[:, 2] = 11  # one latent hit by every row
    grad_W, grad_b, grad_x = seb.sparse_encoder_backward(
        x, indices, grad_pre, W_enc, need_grad_x=True
    )
    assert grad_W.shape == (7, 33) and grad_W.stride() == (1, 7)  # .T of a latent-major buffer
    assert (grad_W.dtype, grad_b.dtype, grad_x.dtype) == (dtype, dtype, dtype)
    closed, _ = _oracles(x, indices, grad_pre, W_enc)
    for got, want in zip((grad_W, grad_b, grad_x), closed, strict=True):
        assert_close(got.cpu(), want)
    assert torch.equal(grad_W[:, 25:], torch.zeros_like(grad_W[:, 25:]))
    assert torch.equal(grad_b[25:], torch.zeros_like(grad_b[25:]))
    assert seb.sparse_encoder_backward(x, indices, grad_pre, W_enc)[2] is None


def test_single_token(seed):
    x, indices, grad_pre, W_enc = _problem(1, 4, 10, 3, dtype=torch.float64, seed=seed)
    got = seb.sparse_encoder_backward(x, indices, grad_pre, W_enc, need_grad_x=True)
    closed, _ = _oracles(x, indices, grad_pre, W_enc)
    for g, w in zip(got, closed, strict=True):
        assert_close(g.cpu(), w)


@pytest.mark.parametrize(("B", "k"), [(0, 3), (3, 0)])
def test_empty_batch_or_no_latents(B, k, seed):
    """No entries: grad_W_enc and grad_b_enc are zeros, still written into poisoned buffers."""
    _check_launchers(*_problem(B, k, 5, 4, dtype=torch.float32, seed=seed))


def test_grad_W_enc_is_deterministic(seed):
    x, indices, grad_pre, W_enc = _problem(12, 6, 4, 20, dtype=torch.float32, seed=seed)
    first = seb.sparse_encoder_backward(x, indices, grad_pre, W_enc)
    again = seb.sparse_encoder_backward(x, indices, grad_pre, W_enc)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_bad_inputs_fail_early():
    x, indices, grad_pre, W_enc = _problem(2, 3, 8, 4, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="W_enc"):
        seb.sparse_encoder_backward(x, indices, grad_pre, W_enc.T)
    with pytest.raises(ValueError, match="grad_pre"):
        seb.sparse_encoder_backward(x, indices, grad_pre[:, :2], W_enc)
    if DEVICE == "cpu":  # the range check is skipped on CUDA (it would sync)
        with pytest.raises(ValueError, match="d_sae=8"):
            seb.sparse_encoder_backward(x, indices - 9, grad_pre, W_enc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, seed):
    args = _problem(3, 4, 10, 6, dtype=dtype, seed=seed, latent_major=True)
    torch.library.opcheck(seb._grad_weights_op, args)
    torch.library.opcheck(seb._grad_x_op, args)


def test_torch_compile_fullgraph(seed):
    """Traces through both custom ops without a graph break (backend: see test_sparse_decode)."""
    backend = "aot_eager" if DEVICE == "cpu" else "inductor"
    x, indices, grad_pre, W_enc = _problem(4, 5, 33, 7, dtype=torch.float32, seed=seed)

    def step(x, grad_pre, W_enc):
        grad_W, grad_b, grad_x = seb.sparse_encoder_backward(
            x, indices, grad_pre, W_enc, need_grad_x=True
        )
        return W_enc - 0.1 * grad_W, grad_b.sum(), grad_x * 2

    got = torch.compile(step, fullgraph=True, backend=backend)(x, grad_pre, W_enc)
    for g, w in zip(got, step(x, grad_pre, W_enc), strict=True):
        assert_close(g, w)


def test_ops_layer_dispatches_here():
    from fastsae.ops import _triton

    name, fn = ops.implementation_of("sparse_encoder_backward", "triton")
    assert (name, fn) == ("triton", _triton.sparse_encoder_backward)


@pytest.mark.parametrize("split", [5, 7, 1000])
def test_hot_latents_are_split_deterministically(split, seed):
    """A latent hit by every row (and twice in some rows) is reduced in chunks of ``split``
    entries plus an ordered merge, grad_b_enc included: equal to the oracles, every element of
    the poisoned outputs written, and bitwise equal across calls."""
    x, indices, grad_pre, W_enc = _problem(13, 4, 9, 6, dtype=torch.float64, seed=seed)
    indices[:, 0] = 2  # 13 entries of latent 2
    indices[::3, 1] = 2  # and 5 more
    indices[:, 2] = 5  # another hot one
    with (
        mock.patch.multiple(csr, SPLIT_ENTRIES=split, LATENTS_PER_PROGRAM=2, SEGMENT_BLOCK_E=4),
    ):
        _check_launchers(x, indices, grad_pre, W_enc)
        first = seb._sparse_encoder_grad_weights(x, indices, grad_pre, W_enc)
        again = seb._sparse_encoder_grad_weights(x, indices, grad_pre, W_enc)
        if split < 13:  # both segments (18 and 13 entries) are chunked
            offsets = csr.csr_by_latent(indices, 9).offsets
            hot, bounds, _, _ = csr._hot_chunks(offsets, indices.numel())
            assert set(hot[bounds[1:] > bounds[:-1]].tolist()) == {2, 5}
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_hot_latent_with_few_latents(seed):
    """n = 1: every entry in one segment, more chunks than 2 * min(n, ...) + 1 slots (the chunk
    buffer was sized from the capped hot count and the merge read past it)."""
    x, indices, grad_pre, W_enc = _problem(12, 7, 1, 5, dtype=torch.float64, seed=seed)
    with mock.patch.multiple(csr, SPLIT_ENTRIES=5, LATENTS_PER_PROGRAM=2, SEGMENT_BLOCK_E=4):
        _check_launchers(x, indices, grad_pre, W_enc)
