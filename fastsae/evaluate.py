"""Evaluation: reconstruction metrics on held-out activations, and the SAE spliced into the model.

Definitions (SAELens's, with zero ablation as the baseline):

- ``fvu`` = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2; ``explained_variance = 1 - fvu``.
- ``l0``: mean active latents per token; ``dead_pct``: latents that never fired on the eval tokens.
- ``ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean)``: 1 means the SAE's reconstruction
  costs the model nothing, 0 means it is as bad as zeroing the activation.
- ``kl_score = (KL_zero - KL_sae) / KL_zero``, where ``KL_x`` is the mean per-token
  ``KL(p_clean || p_x)`` of the next-token distributions.

Several SAEs are evaluated together by :func:`evaluate_many` (what a sweep does): one read of the
held-out activations serves every SAE, and the model's clean and zero-ablated passes are shared, so
N SAEs cost N spliced passes plus a fixed few, not 4N passes. Each SAE's numbers are the ones it
would get alone: the same sums over the same chunks in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastsae.ops._scratch import ensure_scratch
from fastsae.sae import SAE

__all__ = ["EvalTarget", "evaluate_many", "model_scores", "reconstruction_metrics"]


@dataclass
class EvalTarget:
    """One SAE to evaluate: it reads ``hook``, and reconstructs ``hook_out`` (a transcoder) or
    ``hook`` itself. ``backend``: the ops backend its forward runs under (None: the current one)."""

    sae: SAE
    hook: str
    hook_out: str | None = None
    backend: str | None = None

    def forward(self, x: Tensor):
        if self.backend is None:
            return self.sae(x)
        from fastsae import ops

        with ops.use_backend(self.backend):
            return self.sae(x)


class _ReconstructionSums:
    """Running sums behind :func:`reconstruction_metrics` for one SAE."""

    def __init__(self, target: EvalTarget):
        self.target = target
        sae = target.sae
        self.sq_err = 0.0
        self.n_tokens = 0
        self.sum_y: Tensor | None = None
        self.sum_y2 = 0.0
        self.l0_sum = 0.0
        self.fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.device)

    def add(self, x: Tensor, y: Tensor | None) -> None:
        sae = self.target.sae
        x = x.to(sae.device, sae.dtype)
        y = x if y is None else y.to(sae.device, sae.dtype)
        out = self.target.forward(x)
        codes = out.dense_codes(sae.d_sae)
        err = (out.recon - y).double()
        self.sq_err += float(err.pow(2).sum())
        yd = y.double()
        self.sum_y = yd.sum(0) if self.sum_y is None else self.sum_y + yd.sum(0)
        self.sum_y2 += float(yd.pow(2).sum())
        self.n_tokens += x.shape[0]
        self.l0_sum += float((codes > 0).sum())
        self.fired |= (codes > 0).any(0)

    def result(self) -> dict[str, float]:
        if self.n_tokens == 0:
            raise ValueError("no evaluation tokens")
        total_var = self.sum_y2 - float(self.sum_y.pow(2).sum()) / self.n_tokens
        fvu = self.sq_err / max(total_var, 1e-30)
        return {
            "mse": self.sq_err / self.n_tokens,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "l0": self.l0_sum / self.n_tokens,
            "dead_pct": 100.0 * float((~self.fired).float().mean()),
        }


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, batches: Iterable[tuple[Tensor, Tensor | None]]
) -> dict[str, float]:
    """MSE, FVU, explained variance, L0 and dead % of ``sae`` (eval mode) over ``batches`` of
    ``(x [B, d_in], y [B, d_out] or None)`` in the model's own units."""
    sums = _ReconstructionSums(EvalTarget(sae.eval(), ""))
    with ensure_scratch():  # one slab buffer for all batches (CPU)
        for x, y in batches:
            sums.add(x, y)
    return sums.result()


@torch.no_grad()
def evaluate_many(
    targets: Sequence[EvalTarget],
    columns: Iterable[dict[str, Tensor]],
    *,
    model: Any = None,
    tokens: Tensor | None = None,
    batch_size: int = 16,
) -> list[dict[str, float]]:
    """:func:`reconstruction_metrics` of every target over held-out ``columns`` (chunks
    ``{hook: [n, d_hook]}``, read once for all targets), plus :func:`model_scores` when a
    TransformerLens ``model`` and its held-out ``tokens`` ``[n_seq, ctx]`` are given. One dict per
    target, in order, equal to what each target gets evaluated alone.

    Raises:
        ValueError: ``model`` without ``tokens`` (or with no sequence), before any compute.
    """
    if model is not None and (tokens is None or tokens.shape[0] == 0):
        raise ValueError("model scores need the held-out tokens [n_seq, ctx], with n_seq >= 1")
    for t in targets:
        t.sae.eval()
    sums = [_ReconstructionSums(t) for t in targets]
    with ensure_scratch():  # one slab buffer for all batches and targets (CPU)
        for chunk in columns:
            for t, s in zip(targets, sums, strict=True):
                s.add(chunk[t.hook], chunk[t.hook_out] if t.hook_out else None)
    results = [s.result() for s in sums]
    if model is not None:
        for metrics, scores in zip(
            results, _scores(targets, model, tokens, batch_size), strict=True
        ):
            metrics.update(scores)
    return results


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
    sae.eval()
    return _scores([EvalTarget(sae, hook, hook_out)], model, tokens, batch_size)[0]


def _scores(
    targets: Sequence[EvalTarget], model: Any, tokens: Tensor, batch_size: int
) -> list[dict[str, float]]:
    """:func:`model_scores` of every target: per batch of sequences, one clean pass, one
    zero-ablated pass per spliced hook, and one spliced pass per target."""
    keys = ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero")
    totals = [dict.fromkeys(keys, 0.0) for _ in targets]
    n = 0

    def splice(t: EvalTarget, captured: dict[str, Tensor]):
        def hook_fn(act, hook):
            x = captured["x"] if t.hook_out else act
            recon = t.forward(x.reshape(-1, x.shape[-1]).to(t.sae.dtype)).recon
            return recon.reshape(act.shape).to(act.dtype)

        return hook_fn

    def zero(act, hook):
        return torch.zeros_like(act)

    device = next(model.parameters()).device
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(device)
        w = batch.shape[0]
        clean = model(batch, return_type="logits")
        ce_clean = w * float(_next_token_ce(clean, batch))
        zero_terms: dict[str, tuple[float, float]] = {}
        for t, tot in zip(targets, totals, strict=True):
            target_hook = t.hook_out or t.hook
            if target_hook not in zero_terms:
                zeroed = model.run_with_hooks(
                    batch, return_type="logits", fwd_hooks=[(target_hook, zero)]
                )
                zero_terms[target_hook] = (
                    w * float(_next_token_ce(zeroed, batch)),
                    w * float(_kl(clean[:, :-1], zeroed[:, :-1])),
                )
                del zeroed
            captured: dict[str, Tensor] = {}

            def capture(act, hook, captured=captured):
                captured["x"] = act
                return act

            fn = splice(t, captured)
            hooks = [(t.hook, capture), (target_hook, fn)] if t.hook_out else [(target_hook, fn)]
            spliced = model.run_with_hooks(batch, return_type="logits", fwd_hooks=hooks)
            tot["ce_clean"] += ce_clean
            tot["ce_sae"] += w * float(_next_token_ce(spliced, batch))
            tot["kl_sae"] += w * float(_kl(clean[:, :-1], spliced[:, :-1]))
            tot["ce_zero"] += zero_terms[target_hook][0]
            tot["kl_zero"] += zero_terms[target_hook][1]
        n += w
    out = []
    for tot in totals:
        m = {k: v / n for k, v in tot.items()}
        denom = m["ce_zero"] - m["ce_clean"]
        m["ce_loss_score"] = (m["ce_zero"] - m["ce_sae"]) / denom if denom else float("nan")
        m["kl_score"] = (
            (m["kl_zero"] - m["kl_sae"]) / m["kl_zero"] if m["kl_zero"] else float("nan")
        )
        out.append(m)
    return out


def _next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1)
    )
