"""``fastsae.evaluate``: several SAEs evaluated together get exactly what each gets alone, from
shared passes over the held-out data and the model."""

from __future__ import annotations

import pytest
import torch

from fastsae import ops
from fastsae.architectures import sae_class
from fastsae.config import SAEConfig
from fastsae.evaluate import EvalTarget, evaluate_many, model_scores, reconstruction_metrics
from fastsae.sae import SAE

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


@pytest.fixture(scope="module")
def model():
    from fastsae.demo.model import load_demo_model

    return load_demo_model()


class _Counting:
    """``model`` with its forward passes counted by the hooks they splice."""

    def __init__(self, model):
        self.model = model
        self.passes: list[tuple[str, ...]] = []

    def parameters(self):
        return self.model.parameters()

    def __call__(self, tokens, **kwargs):
        self.passes.append(())
        return self.model(tokens, **kwargs)

    def run_with_hooks(self, tokens, *, fwd_hooks, **kwargs):
        self.passes.append(tuple(name for name, _ in fwd_hooks))
        return self.model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, **kwargs)


def _sae(
    d_in: int, d_sae: int, k: int, seed: int, architecture: str = "topk", d_out: int | None = None
) -> SAE:
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, d_out=d_out)
    sae = sae_class(architecture)(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def test_evaluate_many_equals_one_by_one_with_shared_passes(model):
    d = model.cfg.d_model
    targets = [
        EvalTarget(_sae(d, 64, 4, 0), HOOKS[1]),
        EvalTarget(_sae(d, 128, 8, 1), HOOKS[1], backend="torch"),
        EvalTarget(_sae(d, 64, 8, 2, "batchtopk"), HOOKS[0]),
        EvalTarget(_sae(d, 96, 4, 3), HOOKS[0], hook_out=HOOKS[1]),  # a transcoder
    ]
    torch.manual_seed(5)
    tokens = torch.randint(0, model.cfg.d_vocab, (6, 16))
    columns = []
    for start in (0, 3):  # two held-out chunks
        _, cache = model.run_with_cache(tokens[start : start + 3], names_filter=list(HOOKS))
        columns.append({h: cache[h].reshape(-1, d) for h in HOOKS})

    counting = _Counting(model)
    together = evaluate_many(targets, iter(columns), model=counting, tokens=tokens, batch_size=4)

    # per batch of sequences: one clean pass, one zero-ablated pass per spliced hook, one spliced
    # pass per target (the transcoder captures at blocks.0 and splices at blocks.1); two batches
    h0, h1 = HOOKS
    zero_passes = [(h1,), (h0,)]
    splice_passes = [(h1,), (h1,), (h0,), (h0, h1)]
    expected = sorted([(), *zero_passes, *splice_passes])
    assert len(counting.passes) == 2 * len(expected)
    assert sorted(counting.passes[: len(expected)]) == expected
    for i, (t, got) in enumerate(zip(targets, together, strict=True)):
        with ops.use_backend(t.backend or ops.get_backend()):
            alone = reconstruction_metrics(
                t.sae, ((c[t.hook], c[t.hook_out] if t.hook_out else None) for c in columns)
            )
            alone.update(
                model_scores(t.sae, model, tokens, t.hook, hook_out=t.hook_out, batch_size=4)
            )
        assert got == alone, i  # the same sums in the same order: equal, not close
        assert got["fvu"] > 0 and got["ce_loss_score"] == got["ce_loss_score"]


def test_evaluate_many_without_a_model_scores_reconstruction_only():
    sae = _sae(8, 16, 2, 0)
    x = torch.randn(32, 8)
    (got,) = evaluate_many([EvalTarget(sae, "h")], [{"h": x}])
    assert got == reconstruction_metrics(sae, [(x, None)])
    assert "ce_loss_score" not in got
    with pytest.raises(ValueError, match="no evaluation tokens"):
        evaluate_many([EvalTarget(sae, "h")], [])
