"""Every SAE module against an oracle composed only of fastsae.reference functions, in float64.

The oracle reads the module's parameters but none of its code paths, so a bug in a module (or in a
backend it dispatches to) shows up as a mismatch in outputs, losses or gradients.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsae
from fastsae import ops
from fastsae import reference as ref
from tests.tolerances import assert_close

BACKENDS = ["reference", "torch"]
try:  # the Triton kernels run here under TRITON_INTERPRET=1 (set in conftest), or on CUDA
    import triton  # noqa: F401

    BACKENDS.append("triton")
except ImportError:
    pass
ARCHS = ["topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "relu", "gated"]


def make_sae(arch, d_in=7, d_sae=33, k=5, d_out=None, skip=False, seed=0, ties=False):
    kwargs = {
        "d_in": d_in,
        "d_sae": d_sae,
        "d_out": d_out,
        "skip_connection": skip,
        "dtype": "float64",
    }
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        kwargs["k"] = k
    if arch == "matryoshka_batchtopk":
        kwargs["matryoshka_widths"] = [max(1, d_sae // 4), max(2, d_sae // 2)]
    sae = fastsae.sae_class(arch)(**kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if ties:  # coarse grid: many equal pre-activations
                noise = torch.round(noise * 2) / 2
            if name == "threshold":
                p.copy_(noise.abs() * 0.3)
            elif name == "r_mag":
                p.copy_(noise * 0.1)
            else:
                p.copy_(noise if ties else p + 0.3 * noise)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(0.4)
    return sae


def oracle(sae, x, y=None, dead_mask=None, k_aux=None):
    """``(recon, dense codes, loss terms)`` from reference functions only."""
    cfg = sae.cfg
    arch = cfg.architecture
    y = x if y is None else y
    b_dec_in = sae.b_dec if cfg.apply_b_dec_to_input else None
    if arch == "gated":
        base = ref.pre_activations(x, sae.W_enc, torch.zeros_like(sae.b_gate), b_dec_in)
        pre = base + sae.b_gate
        codes = (pre > 0).to(x.dtype) * torch.relu(base * sae.r_mag.exp() + sae.b_mag)
    else:
        pre = ref.pre_activations(x, sae.W_enc, sae.b_enc, b_dec_in)
        if arch == "topk":
            codes = ref.topk_dense(pre, cfg.k)
        elif arch in ("batchtopk", "matryoshka_batchtopk"):
            if sae.training:
                codes = ref.batch_topk(pre, cfg.k)
            else:
                thr = sae.topk_threshold.to(x.dtype).expand(cfg.d_sae)
                codes = torch.relu(ref.jumprelu(pre, thr, cfg.jumprelu_bandwidth))
        elif arch == "jumprelu":
            codes = torch.relu(ref.jumprelu(pre, sae.threshold, cfg.jumprelu_bandwidth))
        else:
            codes = torch.relu(pre)
    skip = x @ sae.W_skip.T if sae.W_skip is not None else 0
    recon = ref.dense_decode(codes, sae.W_dec, sae.b_dec) + skip
    terms = {"mse": ref.mse(recon, y)}
    k_aux = k_aux if k_aux is not None else max(1, cfg.d_out // 2)
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        if dead_mask is not None:
            terms["auxk"] = ref.auxk_loss(pre, dead_mask, k_aux, sae.W_dec, y - recon) / 32
        if arch == "matryoshka_batchtopk":
            for w in cfg.matryoshka_widths[:-1]:
                part = ref.dense_decode(codes[:, :w], sae.W_dec[:w], sae.b_dec) + skip
                terms[f"mse_prefix_{w}"] = ref.mse(part, y)
    elif arch == "jumprelu":
        terms["l0"] = ref.l0_step(pre, sae.threshold, cfg.jumprelu_bandwidth)
    elif arch == "relu":
        terms["l1"] = ref.l1_loss(codes, sae.W_dec)
    elif arch == "gated":
        gate = torch.relu(pre)
        terms["l1"] = ref.l1_loss(gate, sae.W_dec)
        via_gate = ref.dense_decode(gate, sae.W_dec.detach(), sae.b_dec.detach())
        if sae.W_skip is not None:
            via_gate = via_gate + x @ sae.W_skip.detach().T
        terms["gate_aux"] = ref.mse(via_gate, y)
    return recon, codes, terms


def _inputs(b, d_in, d_out, seed, ties=False):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(b, d_in, generator=g, dtype=torch.float64)
    y = torch.randn(b, d_out, generator=g, dtype=torch.float64)
    if ties:
        x = torch.round(x)
    return x, y


def _grads(sae, loss):
    params = [p for p in sae.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {name: g for (name, _), g in zip(sae.named_parameters(), grads, strict=True)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", ["sae", "transcoder", "skip"])
@pytest.mark.parametrize("train", [True, False])
def test_module_matches_oracle(arch, backend, shape, train):
    d_out, skip = {"sae": (None, False), "transcoder": (5, False), "skip": (5, True)}[shape]
    sae = make_sae(arch, d_out=d_out, skip=skip, seed=3)
    sae.train(train)
    x, y = _inputs(6, 7, sae.d_out, seed=3)
    target = x if shape == "sae" else y
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[::3] = True
    with ops.use_backend(backend):
        out = sae(x)
        codes = sae.encode(x)
        recon_dense = sae.decode(codes, x)
        loss = sae.loss(x, None if shape == "sae" else y, dead_mask=dead)
    o_recon, o_codes, o_terms = oracle(sae, x, target, dead_mask=dead)
    assert_close(out.recon, o_recon)
    assert_close(codes, o_codes)
    assert_close(recon_dense, o_recon)
    assert_close(out.dense_codes(sae.d_sae), o_codes)
    assert set(loss.terms) == set(o_terms)
    for name, value in o_terms.items():
        assert_close(loss.terms[name], value, msg=name)
    # gradients of the total loss, every parameter
    got = _grads(sae, loss.loss)
    want = _grads(sae, sum(o_terms.values()))
    for name in want:
        if want[name] is None:
            assert got[name] is None or torch.all(got[name] == 0), name
        else:
            assert got[name] is not None, f"no gradient reached {name}"
            assert_close(got[name], want[name], msg=f"grad {name}")


@settings(max_examples=40)
@given(
    arch=st.sampled_from(ARCHS),
    b=st.integers(1, 9),
    d_in=st.integers(1, 9),
    d_sae=st.integers(2, 40),
    k_frac=st.floats(0.01, 1.0),
    seed=st.integers(0, 10_000),
    ties=st.booleans(),
)
def test_module_property_weird_shapes(arch, b, d_in, d_sae, k_frac, seed, ties):
    k = max(1, round(k_frac * d_sae))
    sae = make_sae(arch, d_in=d_in, d_sae=d_sae, k=k, seed=seed, ties=ties)
    x, _ = _inputs(b, d_in, d_in, seed, ties=ties)
    with ops.use_backend("reference"):
        out = sae(x)
        loss = sae.loss(x)
    o_recon, o_codes, o_terms = oracle(sae, x)
    assert_close(out.recon, o_recon)
    assert_close(out.dense_codes(d_sae), o_codes)
    assert_close(loss.loss, sum(o_terms.values()))


def test_topk_rows_with_fewer_than_k_positive():
    sae = make_sae("topk", d_in=4, d_sae=6, k=4)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
        sae.b_enc[2] = 100.0
    values, indices = sae.encode_sparse(torch.randn(3, 4, dtype=torch.float64))
    assert torch.all(values[:, 0] > 0) and torch.all(values[:, 1:] == 0)
    assert torch.all(indices[:, 0] == 2)


def test_encode_sparse_leading_dims_and_decode_sparse():
    sae = make_sae("topk", d_in=7, d_sae=33, k=5)
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    values, indices = sae.encode_sparse(x)
    assert values.shape == indices.shape == (2, 3, 5)
    assert_close(sae.decode_sparse(values, indices), sae(x).recon)
    assert_close(sae.decode(sae.encode(x)), sae(x).recon)


def test_batchtopk_encode_sparse_pads_rows():
    sae = make_sae("batchtopk", d_in=7, d_sae=33, k=3)
    x = torch.randn(5, 7, dtype=torch.float64)
    values, indices = sae.encode_sparse(x)
    assert_close(sae.decode_sparse(values, indices), sae(x).recon)
    assert int((values != 0).sum()) <= round(3 * 5)


def test_batchtopk_threshold_update_moves_towards_min_positive():
    sae = make_sae("batchtopk", k=3)
    sae.topk_threshold.fill_(0.0)
    # the first update starts the EMA at the observed minimum (an EMA from zero lags ~1/lr steps)
    sae.update_threshold(torch.tensor([[0.0, 2.0, 0.5]]), lr=0.5)
    assert float(sae.topk_threshold) == pytest.approx(0.5)
    # later updates move it by lr towards the new minimum positive value
    sae.update_threshold(torch.tensor([[0.0, 1.5, 0.0]]), lr=0.5)
    assert float(sae.topk_threshold) == pytest.approx(1.0)


def test_auxk_gradient_reaches_encoder():
    sae = make_sae("topk", d_in=7, d_sae=33, k=2)
    x = torch.randn(8, 7, dtype=torch.float64)
    dead = torch.zeros(33, dtype=torch.bool)
    dead[20:] = True
    loss = sae.loss(x, dead_mask=dead, aux_coeff=1.0)
    g_enc = torch.autograd.grad(loss.terms["auxk"], sae.W_enc)[0]
    assert torch.any(g_enc[:, 20:] != 0)
    assert torch.all(g_enc[:, :20] == 0)


def test_repr_and_config_roundtrip():
    sae = fastsae.TopKSAE(d_in=16, d_sae=64, k=4)
    assert repr(sae) == "TopKSAE(d_in=16, d_sae=64, k=4)"
    again = fastsae.SAE.from_config(sae.cfg.to_dict())
    assert type(again) is fastsae.TopKSAE and again.cfg == sae.cfg
