"""Gradient × activation attribution through spliced SAEs.

With the SAEs spliced in :class:`~fastsae.analysis.Splice` ``grad=True`` mode, each feature
activation ``f`` is a node of the graph, the SAE error a separate node, and the model's output is
unchanged. The attribution of a feature to a scalar ``m`` is the first-order (linear) estimate of
the effect of ablating it, ``f · ∂m/∂f`` (Syed et al. 2023, "attribution patching"; Marks et al.
2024, "sparse feature circuits"). Feature-to-feature attribution takes ``m`` to be a downstream
SAE's feature, summed over positions. Gradients flow through the sparse encoder and decoder ops
(``encode_sparse`` / ``decode_sparse``), so only the active latents are touched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastsae.analysis.codes import SparseCodes
from fastsae.analysis.splice import Splice, model_output, sites
from fastsae.sae import SAE

__all__ = ["attribute", "feature_to_feature", "logit_diff", "totals"]


def logit_diff(position: int, good: int, bad: int) -> Callable[[Tensor], Tensor]:
    """A metric: ``logits[:, position, good] - logits[:, position, bad]`` summed over the batch."""

    def metric(logits: Tensor) -> Tensor:
        return (logits[:, position, good] - logits[:, position, bad]).sum()

    return metric


def totals(attr: SparseCodes, d_sae: int) -> Tensor:
    """``[d_sae]`` float64: sparse attributions summed over every position."""
    flat = attr.values.reshape(-1).double()
    return torch.zeros(d_sae, dtype=torch.float64, device=flat.device).index_add_(
        0, attr.indices.reshape(-1), flat
    )


def attribute(
    model: nn.Module,
    saes: SAE | Sequence[SAE] | Mapping[Any, SAE],
    tokens: Tensor,
    metric: Callable[[Tensor], Tensor],
) -> dict[str, tuple[SparseCodes, SparseCodes]]:
    """Attribution of every active feature at every site to ``metric(logits)`` (a scalar).

    Args:
        tokens: ``LongTensor [b, s]``.
        metric: maps the model's output ``[b, s, vocab]`` to a scalar tensor, e.g.
            :func:`logit_diff`.

    Returns ``{site name: (codes, attribution)}``, both :class:`SparseCodes` ``[b, s, w]`` with the
    same indices: ``attribution.values = codes.values * ∂metric/∂codes.values`` (padding is 0).
    """
    with Splice(model, saes, grad=True) as sp, torch.enable_grad():
        value = metric(model_output(model, tokens))
        if value.ndim != 0:
            raise ValueError(f"metric must return a scalar, got shape {tuple(value.shape)}")
        names = list(sp.codes)
        grads = torch.autograd.grad(value, [sp.codes[n].values for n in names], allow_unused=True)
        out = {}
        for name, g in zip(names, grads, strict=True):
            codes = sp.codes[name].detach()
            g = torch.zeros_like(codes.values) if g is None else g
            out[name] = (codes, SparseCodes(codes.values * g, codes.indices))
    return out


def feature_to_feature(
    model: nn.Module,
    upstream: SAE,
    downstream: SAE,
    tokens: Tensor,
    features: Sequence[int],
    *,
    upstream_hook: str | None = None,
    downstream_hook: str | None = None,
) -> Tensor:
    """Attribution of upstream features to downstream features, both SAEs spliced.

    ``out[j, i] = Σ_positions f_up_i · ∂(Σ_positions f_down_{features[j]}) / ∂f_up_i``: how much
    of downstream feature ``features[j]``'s total activation on ``tokens [b, s]`` is carried by
    upstream feature ``i``, to first order. Returns float64 ``[len(features), upstream.d_sae]``.
    """
    up_hook = upstream_hook or upstream.cfg.hook_name
    down_hook = downstream_hook or downstream.cfg.hook_name
    if up_hook == down_hook:
        raise ValueError(f"upstream and downstream both read {up_hook!r}")
    feats = torch.as_tensor(list(features), dtype=torch.long)
    if feats.numel() == 0 or feats.min() < 0 or feats.max() >= downstream.d_sae:
        raise ValueError(
            f"features {feats.tolist()} must be non-empty and in [0, {downstream.d_sae})"
        )
    site_list = sites({up_hook: upstream, down_hook: downstream})
    result = torch.zeros(len(feats), upstream.d_sae, dtype=torch.float64)
    with Splice(model, site_list, grad=True) as sp, torch.enable_grad():
        model_output(model, tokens)
        up, down = sp.codes[up_hook], sp.codes[down_hook]
        for j, f in enumerate(feats.tolist()):
            target = (down.values * (down.indices == f)).sum()
            if not target.requires_grad:
                continue
            (g,) = torch.autograd.grad(target, up.values, retain_graph=True, allow_unused=True)
            if g is not None:
                result[j] = totals(SparseCodes(up.values.detach() * g, up.indices), upstream.d_sae)
    return result
