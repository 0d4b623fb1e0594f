"""Evaluation: reconstruction metrics on held-out activations, and the SAE spliced into the model.

Definitions (SAELens's, with zero ablation as the baseline):

- ``fvu`` = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2; ``explained_variance = 1 - fvu``.
- ``l0``: mean active latents per token; ``dead_pct``: latents that never fired on the eval tokens.
- ``ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean)``: 1 means the SAE's reconstruction
  costs the model nothing, 0 means it is as bad as zeroing the activation.
- ``kl_score = (KL_zero - KL_sae) / KL_zero``, where ``KL_x`` is the mean per-token
  ``KL(p_clean || p_x)`` of the next-token distributions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastsae.sae import SAE

__all__ = ["model_scores", "reconstruction_metrics"]


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, batches: Iterable[tuple[Tensor, Tensor | None]]
) -> dict[str, float]:
    """MSE, FVU, explained variance, L0 and dead % of ``sae`` (eval mode) over ``batches`` of
    ``(x [B, d_in], y [B, d_out] or None)`` in the model's own units."""
    sae = sae.eval()
    sq_err = 0.0
    n_tokens = 0
    sum_y = None
    sum_y2 = 0.0
    l0_sum = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.device)
    for x, y in batches:
        x = x.to(sae.device, sae.dtype)
        y = x if y is None else y.to(sae.device, sae.dtype)
        out = sae(x)
        codes = out.dense_codes(sae.d_sae)
        err = (out.recon - y).double()
        sq_err += float(err.pow(2).sum())
        yd = y.double()
        sum_y = yd.sum(0) if sum_y is None else sum_y + yd.sum(0)
        sum_y2 += float(yd.pow(2).sum())
        n_tokens += x.shape[0]
        l0_sum += float((codes > 0).sum())
        fired |= (codes > 0).any(0)
    if n_tokens == 0:
        raise ValueError("no evaluation tokens")
    total_var = sum_y2 - float(sum_y.pow(2).sum()) / n_tokens
    fvu = sq_err / max(total_var, 1e-30)
    return {
        "mse": sq_err / n_tokens,
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "l0": l0_sum / n_tokens,
        "dead_pct": 100.0 * float((~fired).float().mean()),
    }


def _kl(clean_logits: Tensor, other_logits: Tensor) -> Tensor:
    p_log = F.log_softmax(clean_logits.double(), dim=-1)
    q_log = F.log_softmax(other_logits.double(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


@torch.no_grad()
def model_scores(
    sae: SAE,
    model: Any,
    tokens: Tensor,
    hook: str,
    *,
    hook_out: str | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """CE-loss score and KL score of ``sae`` spliced into a TransformerLens ``model``.

    For an SAE the activation at ``hook`` is replaced by its reconstruction. For a transcoder the
    activation at ``hook_out`` is replaced by the transcoder's prediction from ``hook``.
    ``tokens``: ``[n_seq, ctx]``.
    """
    sae = sae.eval()
    target = hook_out or hook
    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    n = 0
    captured: dict[str, Tensor] = {}

    def capture(act, hook):
        captured["x"] = act
        return act

    def splice(act, hook):
        x = captured["x"] if hook_out else act
        recon = sae(x.reshape(-1, x.shape[-1]).to(sae.dtype)).recon
        return recon.reshape(act.shape).to(act.dtype)

    def zero(act, hook):
        return torch.zeros_like(act)

    device = next(model.parameters()).device
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(device)
        clean = model(batch, return_type="logits")
        hooks = [(hook, capture), (target, splice)] if hook_out else [(target, splice)]
        spliced = model.run_with_hooks(batch, return_type="logits", fwd_hooks=hooks)
        zeroed = model.run_with_hooks(batch, return_type="logits", fwd_hooks=[(target, zero)])
        w = batch.shape[0]
        for name, logits in (("clean", clean), ("sae", spliced), ("zero", zeroed)):
            totals[f"ce_{name}"] += w * float(_next_token_ce(logits, batch))
        totals["kl_sae"] += w * float(_kl(clean[:, :-1], spliced[:, :-1]))
        totals["kl_zero"] += w * float(_kl(clean[:, :-1], zeroed[:, :-1]))
        n += w
    m = {k: v / n for k, v in totals.items()}
    denom = m["ce_zero"] - m["ce_clean"]
    m["ce_loss_score"] = (m["ce_zero"] - m["ce_sae"]) / denom if denom else float("nan")
    m["kl_score"] = (m["kl_zero"] - m["kl_sae"]) / m["kl_zero"] if m["kl_zero"] else float("nan")
    return m


def _next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1)
    )
