"""Attribution against autograd through the reference ops, on the demo model in float64."""

from __future__ import annotations

import copy

import pytest
import torch

from fastsae import reference as ref
from fastsae.analysis import attribute, feature_to_feature, logit_diff, totals
from tests.analysis.conftest import HOOK, random_sae

UP = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model64(demo_model):
    return copy.deepcopy(demo_model).double()


def _saes():
    up = random_sae(hook=UP, d_sae=48, k=5, seed=1).double()
    down = random_sae(hook=HOOK, d_sae=40, k=4, seed=2).double()
    return up, down


def _reference_run(model, saes, tokens):
    """Logits and dense codes ``{hook: [b, s, n]}`` with each SAE spliced as dense reference ops:
    ``decode(codes) + (act - decode(codes'))``, ``codes'`` a second, separate encode."""
    store = {}

    def hook_for(sae):
        def encode(act):
            pre = ref.pre_activations(act, sae.W_enc, sae.b_enc, sae.b_dec)
            return ref.topk_dense(pre, sae.cfg.k)

        def hook(act, hook):
            codes = encode(act)
            store[hook.name] = codes
            return (
                ref.dense_decode(codes, sae.W_dec, sae.b_dec)
                + act
                - ref.dense_decode(encode(act), sae.W_dec, sae.b_dec)
            )

        return hook

    logits = model.run_with_hooks(tokens, fwd_hooks=[(s.cfg.hook_name, hook_for(s)) for s in saes])
    return logits, store


def test_attribution_to_a_logit_difference_matches_reference_autograd(model64, demo_tokens):
    up, down = _saes()
    tokens = demo_tokens[:2, :12]
    metric = logit_diff(-1, 17, 250)
    got = attribute(model64, [up, down], tokens, metric)
    logits, codes = _reference_run(model64, [up, down], tokens)
    grads = torch.autograd.grad(metric(logits), [codes[UP], codes[HOOK]])
    for (name, sae), g in zip(((UP, up), (HOOK, down)), grads, strict=True):
        expected = (g * codes[name]).detach()
        c, a = got[name]
        torch.testing.assert_close(c.dense(sae.d_sae), codes[name].detach())
        torch.testing.assert_close(a.dense(sae.d_sae), expected, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(totals(a, sae.d_sae), expected.sum((0, 1)), rtol=1e-7, atol=1e-9)
        assert expected.abs().max() > 1e-3  # not vacuous


def test_feature_to_feature_matches_reference_autograd(model64, demo_tokens):
    up, down = _saes()
    tokens = demo_tokens[:2, :12]
    _, codes = _reference_run(model64, [up, down], tokens)
    active = codes[HOOK].detach().sum((0, 1)).nonzero().flatten()[:3].tolist()
    got = feature_to_feature(model64, up, down, tokens, active)
    for j, f in enumerate(active):
        (g,) = torch.autograd.grad(codes[HOOK][..., f].sum(), codes[UP], retain_graph=True)
        expected = (g * codes[UP]).detach().sum((0, 1))
        torch.testing.assert_close(got[j], expected, rtol=1e-7, atol=1e-9)
        assert expected.abs().max() > 1e-4


def test_attribution_bad_inputs(model64, demo_tokens):
    up, down = _saes()
    with pytest.raises(ValueError, match="scalar"):
        attribute(model64, up, demo_tokens[:1, :8], lambda logits: logits[:, -1, :2])
    with pytest.raises(ValueError, match=r"in \[0, 40\)"):
        feature_to_feature(model64, up, down, demo_tokens[:1, :8], [40])
    with pytest.raises(ValueError, match="both read"):
        feature_to_feature(model64, up, up, demo_tokens[:1, :8], [0])
