"""kernels/sparse_decode.py against the float64 oracle :func:`fastsae.reference.sparse_decode`.

Runs under ``TRITON_INTERPRET=1`` on CPU (set before Triton is imported), or on CUDA when there
is a GPU. Shapes stay tiny: the interpreter runs every program in Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
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
from tests.tolerances import assert_close  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@contextmanager
def _tiles(small: bool):
    """With ``small``, shrink every tile so that tiny shapes still run several row blocks, d tiles
    (a ragged last one included) and segment steps; the real 16 x 128 tiles cover a whole test
    problem with one program."""
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


def _problem(B, k, n, d, *, dtype, seed, n_hit=None, zero_frac=0.2):
    """Inputs in ``dtype`` on DEVICE. Latents ``>= n_hit`` are never used; some values are 0."""
    g = torch.Generator().manual_seed(seed)
    n_hit = n if n_hit is None else max(1, min(n_hit, n))
    values = torch.randn(B, k, generator=g, dtype=torch.float64)
    values[torch.rand(B, k, generator=g) < zero_frac] = 0.0
    indices = torch.randint(0, n_hit, (B, k), generator=g)
    W_dec = torch.randn(n, d, generator=g, dtype=torch.float64)
    b_dec = torch.randn(d, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, d, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return cast(values), indices.to(DEVICE), cast(W_dec), cast(b_dec), cast(grad_out)


def _oracle(values, indices, W_dec, b_dec, grad_out):
    """Forward and ``(grad_values, grad_W_dec, grad_b_dec)`` by autograd through the oracle."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (values, W_dec, b_dec)]
    out = ref.sparse_decode(leaves[0], indices.cpu(), leaves[1], leaves[2])
    grads = torch.autograd.grad(out, leaves, grad_out.cpu().double())
    return out.detach(), grads


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _unhit(indices, n):
    hit = torch.zeros(n, dtype=torch.bool, device=indices.device)
    hit[indices.reshape(-1)] = True
    return ~hit


def _check_launchers(values, indices, W_dec, b_dec, grad_out):
    """Every launcher writes into NaN-poisoned outputs and matches the oracle."""
    B, k = values.shape
    n, d = W_dec.shape
    out = sd._sparse_decode_fwd(values, indices, W_dec, b_dec, out=_nan((B, d), values.dtype))
    grad_values = sd._sparse_decode_grad_values(
        grad_out, values, indices, W_dec, out=_nan((B, k), values.dtype)
    )
    grad_W = sd._sparse_decode_grad_W_dec(
        grad_out, values, indices, W_dec, out=_nan((n, d), W_dec.dtype)
    )
    expected_out, (exp_values, exp_W, _) = _oracle(values, indices, W_dec, b_dec, grad_out)
    assert_close(out.cpu(), expected_out)
    assert_close(grad_values.cpu(), exp_values)
    assert_close(grad_W.cpu(), exp_W)
    # Latents that no entry hits: exact zeros, written by the kernel (the buffer held NaN).
    unhit = _unhit(indices, n)
    assert torch.equal(grad_W[unhit], torch.zeros_like(grad_W[unhit]))


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 12),
    k=st.integers(1, 7),
    n=st.integers(1, 48),
    d=st.integers(1, 40),
    hit_frac=st.floats(0.05, 1.0),
    zero_frac=st.sampled_from([0.0, 0.3, 1.0]),
    dtype=st.sampled_from(DTYPES),
    small_tiles=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_launchers_match_oracle(B, k, n, d, hit_frac, zero_frac, dtype, small_tiles, seed):
    # hit_frac small: few latents, so duplicates within a row and latents shared by many rows.
    problem = _problem(
        B, k, n, d, dtype=dtype, seed=seed, n_hit=round(hit_frac * n), zero_frac=zero_frac
    )
    with _tiles(small_tiles):
        _check_launchers(*problem)


@pytest.mark.parametrize("small_tiles", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_matches_oracle(dtype, small_tiles, seed):
    """The public op's backward (registered autograd) against autograd through the oracle."""
    values, indices, W_dec, b_dec, grad_out = _problem(
        5, 5, 33, 7, dtype=dtype, seed=seed, n_hit=20
    )
    indices[0, 1] = indices[0, 3]  # a duplicate within a row
    indices[:, 4] = 7  # one latent hit by every row
    values[1, 2] = 0.0
    leaves = [t.clone().requires_grad_() for t in (values, W_dec, b_dec)]
    with _tiles(small_tiles):
        out = sd.sparse_decode(leaves[0], indices, leaves[1], leaves[2])
        grads = torch.autograd.grad(out, leaves, grad_out)
    expected_out, expected = _oracle(values, indices, W_dec, b_dec, grad_out)
    assert out.dtype == dtype
    assert_close(out.cpu(), expected_out)
    for name, got, want in zip(("values", "W_dec", "b_dec"), grads, expected, strict=True):
        assert got.dtype == dtype
        assert_close(got.cpu(), want, msg=f"grad_{name}")
    assert torch.equal(grads[1][20:], torch.zeros_like(grads[1][20:]))


def test_single_token_and_expanded_upstream_gradient(seed):
    """B=1, and a stride-0 upstream gradient (what ``out.sum().backward()`` sends)."""
    values, indices, W_dec, b_dec, _ = _problem(1, 3, 9, 5, dtype=torch.float64, seed=seed)
    leaves = [t.clone().requires_grad_() for t in (values, W_dec, b_dec)]
    sd.sparse_decode(leaves[0], indices, leaves[1], leaves[2]).sum().backward()
    _, expected = _oracle(values, indices, W_dec, b_dec, torch.ones(1, 5, dtype=torch.float64))
    for leaf, want in zip(leaves, expected, strict=True):
        assert_close(leaf.grad.cpu(), want)


def test_only_requested_gradients(seed):
    """With only W_dec requiring grad, values and b_dec get none (and nothing fails)."""
    values, indices, W_dec, b_dec, grad_out = _problem(4, 3, 10, 6, dtype=torch.float32, seed=seed)
    W = W_dec.clone().requires_grad_()
    (grad_W,) = torch.autograd.grad(sd.sparse_decode(values, indices, W, b_dec), W, grad_out)
    _, expected = _oracle(values, indices, W_dec, b_dec, grad_out)
    assert_close(grad_W.cpu(), expected[1])


def test_leading_dims_int32_indices_and_strided_W(seed):
    values, indices, W_dec, b_dec, _ = _problem(6, 4, 12, 9, dtype=torch.float32, seed=seed)
    W_strided = torch.randn(9, 12, device=DEVICE).T  # [n, d] with strides (1, n)
    out = sd.sparse_decode(values.view(2, 3, 4), indices.view(2, 3, 4).int(), W_strided, b_dec)
    expected = ref.sparse_decode(values.double(), indices, W_strided.double(), b_dec.double())
    assert out.shape == (2, 3, 9)
    assert_close(out.reshape(6, 9).cpu(), expected.cpu())


@pytest.mark.parametrize(("B", "k"), [(0, 3), (3, 0)])
def test_empty_batch_or_no_latents(B, k, seed):
    """Nothing to gather: out = b_dec, grad_W_dec = 0, still written into poisoned buffers."""
    _check_launchers(*_problem(B, k, 5, 4, dtype=torch.float32, seed=seed))


def test_grad_W_dec_is_deterministic(seed):
    problem = _problem(12, 6, 5, 20, dtype=torch.float32, seed=seed)  # long segments
    first = sd._sparse_decode_grad_W_dec(*problem[4:], *problem[:2], problem[2])
    again = sd._sparse_decode_grad_W_dec(*problem[4:], *problem[:2], problem[2])
    assert torch.equal(first, again)


def test_bad_inputs_fail_early():
    values, indices, W_dec, b_dec, _ = _problem(2, 3, 8, 4, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="int64"):
        sd._sparse_decode_fwd(values, indices.int(), W_dec, b_dec)
    with pytest.raises(ValueError, match="b_dec"):
        sd.sparse_decode(values, indices, W_dec, b_dec[:3])
    with pytest.raises(ValueError, match="same shape"):
        sd.sparse_decode(values[:, :2], indices, W_dec, b_dec)
    if DEVICE == "cpu":  # the range check is skipped on CUDA (it would sync)
        with pytest.raises(ValueError, match="d_sae=8"):
            sd.sparse_decode(values, indices + 8, W_dec, b_dec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, seed):
    values, indices, W_dec, b_dec, grad_out = _problem(3, 4, 10, 6, dtype=dtype, seed=seed)
    args = (values.requires_grad_(), indices, W_dec.requires_grad_(), b_dec.requires_grad_())
    torch.library.opcheck(sd._sparse_decode_op, args)
    torch.library.opcheck(sd._grad_values_op, (grad_out, values.detach(), indices, W_dec.detach()))
    torch.library.opcheck(sd._grad_W_dec_op, (grad_out, values.detach(), indices, W_dec.detach()))


def test_torch_compile_fullgraph(seed):
    """Traces through the custom ops (forward and backward) without a graph break.

    On CPU the backend is aot_eager (it still traces forward and backward through the fake
    impls): inductor also works but spends ~25 s compiling C++ for the surrounding graph on a
    2-core machine. On CUDA it is inductor. The kernel function is called directly: the ops
    layer's dispatch (importlib, thread-locals) is not traceable by dynamo.
    """
    backend = "aot_eager" if DEVICE == "cpu" else "inductor"
    values, indices, W_dec, b_dec, target = _problem(4, 5, 33, 7, dtype=torch.float32, seed=seed)

    def loss_fn(values, W_dec, b_dec):
        recon = sd.sparse_decode(values, indices, W_dec, b_dec)
        return ref.mse(recon, target)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    leaves = [t.clone().requires_grad_() for t in (values, W_dec, b_dec)]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    eager_leaves = [t.clone().requires_grad_() for t in (values, W_dec, b_dec)]
    want = torch.autograd.grad(loss_fn(*eager_leaves), eager_leaves)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


def test_ops_layer_dispatches_here(seed):
    from fastsae.ops import _triton

    assert ops.implementation_of("sparse_decode", "triton") == ("triton", _triton.sparse_decode)
    values, indices, W_dec, b_dec, _ = _problem(3, 2, 6, 5, dtype=torch.float64, seed=seed)
    with ops.use_backend("triton"):
        out = ops.sparse_decode(values, indices, W_dec, b_dec)
    assert_close(out.cpu(), ref.sparse_decode(values, indices, W_dec, b_dec).cpu())


# Run in a child process: with int32 offsets the kernel reads ~4 GiB before the buffer, which
# may fault instead of returning a wrong number. The 4 GiB buffers are never touched beyond a few
# elements, so they cost address space, not memory (no copy: the interpreter reuses CPU storage).
_HUGE_STRIDE_SCRIPT = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from fastsae.kernels import sparse_decode as sd

S = 2**30 + 1  # slot / column 2 sits 2 * S = 2^31 + 2 elements in: past int32


def strided(values, rows, cols):
    # [rows, cols] fp16 view with strides (1, S) of a mostly untouched 4 GiB buffer.
    view = torch.empty((cols - 1) * S + rows, dtype=torch.float16).as_strided((rows, cols), (1, S))
    view.copy_(values)
    return view


vals = torch.tensor([[1.0, 2.0, 3.0]])
idx = torch.tensor([[2, 0, 1]])
W = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0], [64.0, 128.0, 256.0]])
g = torch.tensor([[1.0, -1.0, 0.5]])
out = sd._sparse_decode_fwd(strided(vals, 1, 3), idx, W, torch.zeros(3))
assert torch.equal(out, vals @ W[idx[0]]), out
# W_dec d-major (strides (1, n)): cols * stride_wd passes 2^31.
gv = sd._sparse_decode_grad_values(g, vals, idx, strided(W, 3, 3))
assert torch.equal(gv, (W[idx[0]] @ g[0])[None]), gv
# grad_out column-major: cols * stride_gd passes 2^31.
gv = sd._sparse_decode_grad_values(strided(g, 1, 3), vals, idx, W)
assert torch.equal(gv, (W[idx[0]] @ g[0])[None]), gv
gW = sd._sparse_decode_grad_W_dec(strided(g, 1, 3), vals, idx, W)
assert torch.equal(gW, torch.zeros(3, 1).index_add_(0, idx[0], vals[0, :, None]) * g), gW
print("ok")
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter test: a stride layout on a CPU buffer")
def test_offsets_past_int32_use_int64():
    """Strides whose products with a slot or column index pass 2^31 (docs/kernels.md: every
    offset is int64). Exact small-integer values, so equality is exact."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", _HUGE_STRIDE_SCRIPT],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr
