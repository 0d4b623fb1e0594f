"""A training step on the triton backend makes no host sync (what blocks CUDA graphs): TopK with
AuxK active, and BatchTopK. Run under the interpreter here, with the kernels' CPU-only index
range check (skipped on CUDA, where it would sync) switched off."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastsae
from fastsae import ops
from fastsae import reference as ref
from tests.tolerances import assert_close

# Ops that read a device value back to the host: .item() / int() / bool() go through
# _local_scalar_dense; the others size their output from the data.
_SYNCING = {
    torch.ops.aten._local_scalar_dense,
    torch.ops.aten.nonzero,
    torch.ops.aten.masked_select,
    torch.ops.aten.bincount,
    torch.ops.aten.unique_consecutive,
    torch.ops.aten._unique2,
    torch.ops.aten.repeat_interleave,
    torch.ops.aten.equal,
}


class _NoHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket in _SYNCING:
            raise AssertionError(f"host sync: {func}")
        indexing = func._overloadpacket in (torch.ops.aten.index, torch.ops.aten.index_put)
        if indexing and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            raise AssertionError(f"host sync: boolean-mask indexing ({func})")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_range_check(monkeypatch):
    from fastsae.kernels import sparse_decode, sparse_encoder_bwd

    for module in (sparse_decode, sparse_encoder_bwd):
        monkeypatch.setattr(module, "check_index_range", lambda indices, n: None)


def test_the_detector_sees_a_sync():
    with pytest.raises(AssertionError, match="host sync"), _NoHostSync():
        int(torch.ones(3).sum())


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_dead", [0, 5, 40])
def test_training_step_makes_no_host_sync(architecture, n_dead, no_range_check, seed):
    """Loss and backward, AuxK active (some, none or more than k_aux latents dead), with the
    fixed-width AuxK and BatchTopK codes; the loss and gradients equal the torch backend's."""
    d_in, n = 8, 48
    sae = fastsae.sae_class(architecture)(d_in=d_in, d_sae=n, k=3)
    x = torch.randn(16, d_in)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n)[:n_dead]] = True
    results = {}
    for backend in ("triton", "torch"):
        sae.zero_grad(set_to_none=True)
        with ops.use_backend(backend):
            if backend == "triton":
                with _NoHostSync():
                    out = sae.loss(x, dead_mask=dead)
                    out.loss.backward()
            else:
                out = sae.loss(x, dead_mask=dead)
                out.loss.backward()
        grads = {name: p.grad for name, p in sae.named_parameters() if p.grad is not None}
        results[backend] = (out, grads)
    (got, g_got), (want, g_want) = results["triton"], results["torch"]
    for name in want.terms:
        assert_close(got.terms[name], want.terms[name], msg=name)
    assert_close(
        ref.sparse_to_dense(got.output.values, got.output.indices, n),
        ref.sparse_to_dense(want.output.values, want.output.indices, n),
    )
    assert g_got.keys() == g_want.keys()
    for name in g_want:
        assert_close(g_got[name], g_want[name], msg=name)
