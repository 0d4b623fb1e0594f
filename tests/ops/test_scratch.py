"""Scratch memory (fastsae/ops/_scratch.py): the torch backend's pre-activation slabs written into
one reused buffer must give exactly the selection that fresh slabs give, never leak a view of the
buffer into a result, and stay out of autograd and off the GPU."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsae import ops
from fastsae.ops import _scratch
from fastsae.ops import _torch as T


def _inputs(seed: int, B: int, d: int, n: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    W = torch.randn(d, n, generator=g) / d**0.5
    b = torch.randn(n, generator=g) * 0.1
    dead = torch.rand(n, generator=g) < 0.3
    return x, W, b, dead


def _assert_identical(got, want):
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            assert torch.equal(g, w)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    B=st.integers(1, 24),
    n=st.integers(8, 90),
    k=st.integers(1, 8),
    slab=st.integers(1, 40),
    k_aux=st.integers(0, 6),
    jumprelu=st.booleans(),
)
def test_pooled_slabs_select_exactly_what_fresh_slabs_select(seed, B, n, k, slab, k_aux, jumprelu):
    """Many slabs per call (``slab`` < n): each overwrites the buffer the previous one used."""
    x, W, b, dead = _inputs(seed, B, 12, n)
    slab = max(slab, k, k_aux)
    kw = dict(dead_mask=dead, k_aux=k_aux, slab=slab)
    if jumprelu:
        kw["threshold"] = torch.full((n,), 0.2)
    want = T.select_topk(x, W, b, k, **kw)
    with ops.scratch_memory() as pool:
        got = T.select_topk(x, W, b, k, **kw)
        again = T.select_topk(x, W, b, k, **kw)  # a second call on the same buffer
    assert pool.nbytes == B * min(slab, n) * 4
    _assert_identical(got, want)
    _assert_identical(again, want)


@pytest.mark.parametrize("slab", [8, 100])  # 8 <= k + 32 candidates: the slab is every candidate
def test_pooled_bf16_selection_equals_the_fresh_one(slab):
    x, W, b, dead = _inputs(1, 32, 24, 300)
    kw = dict(dead_mask=dead, k_aux=6, slab=slab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = T.select_topk(x, W, b, 5, **kw)
        with ops.scratch_memory() as pool:
            got = T.select_topk(x, W, b, 5, **kw)
    assert pool.nbytes >= 32 * slab * 2  # the bf16 slabs were pooled
    _assert_identical(got, want)


def test_the_pool_keeps_one_buffer_per_dtype_and_grows_when_needed():
    pool = ops.ScratchPool()
    x, W, b, _ = _inputs(0, 16, 8, 64)
    with ops.scratch_memory(pool):
        T.select_topk(x, W, b, 4)
        ptr = pool.tensors()[0].data_ptr()
        T.select_topk(x[:8], W, b, 4)  # smaller: a view of the same buffer
        assert [t.data_ptr() for t in pool.tensors()] == [ptr]
        T.select_topk(torch.cat([x, x]), W, b, 4)  # larger: the buffer grows
    assert pool.nbytes == 32 * 64 * 4
    pool.clear()
    assert pool.nbytes == 0


def test_no_pool_outside_the_block_and_the_block_restores_the_outer_one():
    x, W, b, _ = _inputs(0, 4, 8, 16)
    outer, inner = ops.ScratchPool(), ops.ScratchPool()
    T.select_topk(x, W, b, 2)
    with ops.scratch_memory(outer):
        with ops.scratch_memory(inner):
            T.select_topk(x, W, b, 2)
        assert inner.nbytes > 0 and outer.nbytes == 0
        T.select_topk(x, W, b, 2)
        assert outer.nbytes > 0
    assert _scratch._ACTIVE.get() is None


def test_operands_that_record_a_gradient_are_not_written_into_the_pool():
    x, W, b, _ = _inputs(0, 4, 8, 16)
    W = W.requires_grad_()
    with ops.scratch_memory() as pool:
        pre = _scratch.slab_addmm(b, x, W)
        with torch.no_grad():
            _scratch.slab_addmm(b, x, W)
    assert pre.grad_fn is not None
    assert pool.nbytes == 4 * 16 * 4  # only the no-grad call was pooled
    torch.testing.assert_close(pre, torch.addmm(b, x, W))


def test_mixed_dtypes_are_not_pooled():
    x, W, b, _ = _inputs(0, 4, 8, 16)
    # torch's own error, as without a pool
    with ops.scratch_memory() as pool, pytest.raises(RuntimeError):
        _scratch.slab_addmm(b.double(), x, W)
    assert pool.nbytes == 0


_FAULTS = """
import resource, sys, torch
from fastsae import ops
if sys.argv[1] == "keep":
    assert ops.keep_freed_memory()
def step():  # a step's large temporaries: written, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a, b, c = torch.ones(16 << 20), torch.ones(12 << 20), torch.ones(64 << 20)
    del a, b, c
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[step() for _ in range(8)][-3:])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt: glibc only")
def test_keep_freed_memory_lets_the_next_block_reuse_the_freed_pages():
    """In a fresh process, steps that write and free 64, 48 and 256 MiB: by default glibc
    unmaps each block and the next step faults all 94,000 pages in again; after
    keep_freed_memory() the steps reuse the freed memory (last three steps of eight)."""
    faults = {}
    for mode in ("default", "keep"):
        done = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
        )
        faults[mode] = [int(v) for v in done.stdout.split()]
    assert min(faults["default"]) > 90_000
    assert max(faults["keep"]) < 2_000, faults


def test_keep_freed_memory_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(_scratch, "_kept", False)
    monkeypatch.setattr(_scratch.sys, "platform", "darwin")
    assert _scratch.keep_freed_memory() is False


def test_evaluation_reuses_one_slab_buffer_and_the_active_pool(monkeypatch):
    """reconstruction_metrics encodes batch after batch: one pool for all of them (its own, or
    the caller's when one is active), with the metrics of fresh slabs."""
    import contextlib

    import fastsae.evaluate as ev
    from fastsae.sae import SAE, SAEConfig

    sae = SAE.from_config(SAEConfig(architecture="topk", d_in=8, d_sae=64, k=4))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 8, generator=g), None) for _ in range(3)]
    taken = []
    real = _scratch.ScratchPool.take

    def spy(self, rows, cols, dtype):
        taken.append(id(self))
        return real(self, rows, cols, dtype)

    monkeypatch.setattr(_scratch.ScratchPool, "take", spy)
    with ops.use_backend("torch"):
        got = ev.reconstruction_metrics(sae, batches)
        assert len(taken) == 3 and len(set(taken)) == 1
        outer = ops.ScratchPool()
        with ops.scratch_memory(outer):
            ev.reconstruction_metrics(sae, batches)
        assert taken[3:] == [id(outer)] * 3
        monkeypatch.setattr(ev, "ensure_scratch", contextlib.nullcontext)
        fresh = ev.reconstruction_metrics(sae, batches)
    assert len(taken) == 6  # the last run used no pool
    assert got == fresh
