"""CE/KL scores and core metrics: against SAELens's ``run_evals`` on the demo model, against
direct computations, and on a transformers causal LM."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from fastsae.analysis.metrics import (
    core_metrics,
    downstream_scores,
    model_core_metrics,
    weight_metrics,
)
from tests.analysis.conftest import HOOK, random_sae


class _TokenStore:
    """The three things ``run_evals`` asks of an ActivationsStore: fixed token batches."""

    def __init__(self, batches):
        self.batches = batches
        self.i = 0
        self.store_batch_size_prompts = batches[0].shape[0]
        self.context_size = batches[0].shape[1]

    def get_batch_tokens(self, n):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def reset_input_dataset(self):
        self.i = 0


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_scores_agree_with_saelens_run_evals(tmp_path, demo_model, demo_tokens, arch):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    sae = random_sae(arch, d_sae=256, k=16)
    sae.save(tmp_path / "sae")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sl = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    batches = [demo_tokens, demo_tokens.flip(0).roll(5, 1)]
    batches[1][:, 0] = demo_tokens[0, 0]  # BOS first, as the store gives
    cfg = EvalConfig(
        batch_size_prompts=4,
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=1,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
    theirs, _ = run_evals(sl, _TokenStore(batches), demo_model, ActivationScaler(), cfg)
    ours = downstream_scores(demo_model, sae, batches)
    flat = {k: v for group in theirs.values() for k, v in group.items()}
    for key in (
        "ce_loss_score",
        "kl_div_score",
        "ce_loss_with_sae",
        "ce_loss_with_ablation",
        "ce_loss_without_sae",
        "kl_div_with_sae",
        "kl_div_with_ablation",
    ):
        # SAELens works in float32 (log-softmax over 4096 tokens): agreement to ~1e-4 relative
        assert ours[key] == pytest.approx(flat[key], rel=2e-4, abs=1e-5), key
    core = model_core_metrics(demo_model, sae, batches[:1])
    for key in (
        "l0",
        "l1",
        "mse",
        "explained_variance",
        "cossim",
        "l2_ratio",
        "relative_reconstruction_bias",
        "l2_norm_in",
        "l2_norm_out",
    ):
        assert core[key] == pytest.approx(flat[key], rel=1e-4, abs=1e-5), key


def test_core_metrics_match_a_direct_computation():
    sae = random_sae("relu", d_in=9, d_sae=13).double()
    x = torch.randn(50, 9, dtype=torch.float64) + 0.5
    batches = [(x[:20], None), (x[20:], None)]
    got = core_metrics(sae, batches)
    codes = sae.encode(x)
    xhat = sae.decode(codes)
    total_var = x.pow(2).sum(-1).mean() - x.mean(0).pow(2).sum()
    mse = (x - xhat).pow(2).sum(-1).mean()
    density = (codes > 0).double().mean(0)
    expected = {
        "l0": (codes > 0).double().sum(-1).mean(),
        "l1": codes.sum(-1).mean(),
        "mse": mse,
        "explained_variance": 1 - mse / total_var,
        "cossim": F.cosine_similarity(x, xhat, dim=-1).mean(),
        "l2_ratio": (xhat.norm(dim=-1) / x.norm(dim=-1)).mean(),
        "relative_reconstruction_bias": xhat.pow(2).sum() / (x * xhat).sum(),
        "frac_dead": (density == 0).double().mean(),
        "frac_dense": (density > 0.1).double().mean(),
    }
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), rel=1e-9, abs=1e-12), key


def test_weight_metrics_brute_force():
    sae = random_sae("topk", d_in=6, d_sae=11, k=2).double()
    dec = F.normalize(sae.W_dec, dim=-1)
    sim = dec @ dec.T - 3 * torch.eye(11, dtype=torch.float64)
    got = weight_metrics(sae)
    assert got["max_decoder_cosine"] == pytest.approx(float(sim.max()))
    assert got["mean_max_decoder_cosine"] == pytest.approx(float(sim.max(-1).values.mean()))
    enc = F.normalize(sae.W_enc.T, dim=-1)
    assert got["max_encoder_cosine"] == pytest.approx(
        float((enc @ enc.T - 3 * torch.eye(11)).max())
    )


def test_hf_causal_lm_scores_match_manual_hooks():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    ).eval()
    sae = random_sae(d_in=32, d_sae=40, k=4, hook="transformer.h.0")
    tokens = torch.randint(0, 50, (3, 12))
    block = model.transformer.h[0]

    def run(fn):
        handle = block.register_forward_hook(
            lambda m, a, o: (fn(o[0]), *o[1:]) if isinstance(o, tuple) else fn(o)
        )
        try:
            return model(input_ids=tokens).logits.double()
        finally:
            handle.remove()

    with torch.no_grad():
        clean = model(input_ids=tokens).logits.double()
        spliced = run(lambda a: sae(a).recon)
        zero = run(torch.zeros_like)
    got = downstream_scores(model, sae, [tokens], exclude_tokens=[])

    def ce(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, 50), tokens[:, 1:].reshape(-1))

    def kl(other):
        p, q = F.log_softmax(clean, -1), F.log_softmax(other, -1)
        return (p.exp() * (p - q)).sum(-1).mean()

    expected_ce = (ce(zero) - ce(spliced)) / (ce(zero) - ce(clean))
    assert got["ce_loss_score"] == pytest.approx(float(expected_ce), rel=1e-5)
    assert got["kl_div_score"] == pytest.approx(
        float((kl(zero) - kl(spliced)) / kl(zero)), rel=1e-5
    )


def test_scores_refuse_a_model_without_logits_and_bad_tokens(demo_model):
    sae = random_sae()
    with pytest.raises(ValueError, match="int"):
        downstream_scores(demo_model, sae, [torch.zeros(4, 8)])
    with pytest.raises(ValueError, match="no tokens"):
        downstream_scores(demo_model, sae, [])
    assert sae.cfg.hook_name == HOOK
