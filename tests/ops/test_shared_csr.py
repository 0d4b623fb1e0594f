"""The step's shared CSR-by-latent layout (fastsae/ops/_csr.py): one sort per backward, the same
gradients, bit for bit, as a layout built per reduction."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import fastsae
from fastsae import ops
from fastsae.ops import _csr, _torch, _triton


@settings(max_examples=200)
@given(
    st.integers(1, 9),
    st.integers(1, 6),
    st.integers(0, 5),
    st.integers(1, 40),
    st.integers(0, 2**20),
)
def test_a_part_of_the_layout_equals_its_own_build(B, k, k_aux, n, seed):
    """The main and AuxK layouts derived from one sort of both are the layouts their own sorts
    give, element for element (so every reduction over them is unchanged)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n, (B, k + k_aux), generator=g)
    both = _csr.csr_by_latent(ids, n)
    for lo, hi in [(0, k), (k, k + k_aux), (0, k + k_aux)]:
        got = _csr.csr_columns(both, k + k_aux, lo, hi)
        want = _csr.csr_by_latent(ids[:, lo:hi].contiguous(), n)
        for name, a, b in zip(_csr.CSR._fields, got, want, strict=True):
            assert torch.equal(a, b), (name, lo, hi)


class _FlatSorts(TorchDispatchMode):
    """Counts sorts of 1-D tensors: the CSR builds (per-row sorts of ``[B, k]`` are 2-D)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket is torch.ops.aten.sort and args[0].dim() == 1:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _topk_with_auxk():
    torch.manual_seed(0)
    sae = fastsae.TopKSAE(d_in=16, d_sae=64, k=4)
    x = torch.randn(24, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    return sae, x, dead


@pytest.mark.parametrize("derive_on_cpu", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_csr_build_per_backward_of_topk_with_auxk(backend, derive_on_cpu, monkeypatch):
    """grad_W_dec (main), grad_W_dec (AuxK) and grad_W_enc used to sort their ids each: 3. With
    the parts derived (GPUs; CPU when asked), 1; on CPU by default each part sorts its own."""
    monkeypatch.setattr(_csr, "DERIVE_PARTS_ON_CPU", derive_on_cpu)
    sae, x, dead = _topk_with_auxk()
    with ops.use_backend(backend):
        loss = sae.loss(x, dead_mask=dead).loss
        assert loss.grad_fn is not None
        with _FlatSorts() as sorts:
            loss.backward()
    assert sorts.count == (1 if derive_on_cpu or x.device.type != "cpu" else 3)
    assert all(p.grad is not None for p in (sae.W_enc, sae.W_dec, sae.b_enc))


@pytest.mark.parametrize("derive_on_cpu", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shared_layout_gives_the_same_gradients_bitwise(backend, derive_on_cpu, monkeypatch):
    monkeypatch.setattr(_csr, "DERIVE_PARTS_ON_CPU", derive_on_cpu)
    sae, x, dead = _topk_with_auxk()
    grads = []
    for shared in (True, False):
        if not shared:  # each decoder sorts its own ids again, as before
            monkeypatch.setattr(_torch, "shared_csr_of", lambda indices, n: None)
            monkeypatch.setattr(_triton, "shared_csr_of", lambda indices, n: None)
        sae.zero_grad(set_to_none=True)
        with ops.use_backend(backend):
            sae.loss(x, dead_mask=dead).loss.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_ids_not_from_the_encoder_build_their_own_layout():
    """A decode of ids the encoder did not return (here a copy) is unaffected by sharing."""
    sae, x, dead = _topk_with_auxk()
    with ops.use_backend("torch"):
        enc = ops.encode_topk(x, sae.W_enc, sae.b_enc, 4, dead_mask=dead, k_aux=3)
        assert _csr.shared_csr_of(enc.indices, 64) is not None
        assert _csr.shared_csr_of(enc.indices.clone(), 64) is None
        assert _csr.shared_csr_of(enc.indices, 65) is None  # another dictionary's width


def test_one_csr_build_per_backward_of_topk_without_auxk():
    """Without AuxK ids the main layout is the layout of both: one sort, on every device."""
    sae, x, _ = _topk_with_auxk()
    with ops.use_backend("torch"):
        loss = sae.loss(x).loss
        with _FlatSorts() as sorts:
            loss.backward()
    assert sorts.count == 1
