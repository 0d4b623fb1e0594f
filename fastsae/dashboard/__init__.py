"""Feature dashboards: ``python -m fastsae.dashboard SAE_DIR --out DIR [--tokens N] ...``.

One pass over N tokens with the SAE's fast sparse encoder (:mod:`fastsae.dashboard.collect`, memory
independent of N), data files (:mod:`fastsae.dashboard.build`), and a static offline site
(:mod:`fastsae.dashboard.render`). See ``docs/analysis.md``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import Tensor

from fastsae.dashboard.build import (
    DashboardConfig,
    collect,
    feature_records,
    logit_effects,
    nearest_features,
    unembedding,
    write_data,
)
from fastsae.dashboard.render import render
from fastsae.data.sources import ActivationSource
from fastsae.sae import SAE

__all__ = ["DashboardConfig", "build_dashboard", "render", "token_strings"]


def token_strings(tokenizer: Any) -> list[str]:
    """The text of every token id of ``tokenizer``."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def build_dashboard(
    sae: SAE,
    source: ActivationSource,
    tokenizer: Any,
    batches: Iterable[Tensor],
    cfg: DashboardConfig,
    *,
    hook: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Run the pass over ``batches`` (``[b, s]`` token ids, the model behind ``source``), write
    ``cfg.out/data`` and the site; returns ``cfg.out/index.html``."""
    hook = hook or sae.cfg.hook_name
    if hook is None or hook not in source.hooks:
        raise ValueError(f"hook {hook!r} is not one of the source's hooks {list(source.hooks)}")
    if source.dims[hook] != sae.d_in:
        raise ValueError(f"{hook!r} has width {source.dims[hook]}, the SAE has d_in={sae.d_in}")
    out = Path(cfg.out)
    col = collect(sae, source, hook, batches, cfg)
    if col.tokens_seen == 0:
        raise ValueError("the dataset gave no tokens")
    w_u = unembedding(source.model, sae.d_out) if cfg.logits else None
    logits = logit_effects(sae, w_u, cfg.logits) if w_u is not None else None
    neighbours = nearest_features(sae, cfg.neighbours) if cfg.neighbours and sae.d_sae > 1 else None
    info = {
        "sae_name": sae.cfg.metadata.get("name") or type(sae).__name__,
        "model": getattr(source, "model_name", "?"),
        "hook": hook,
        "dataset": "the embedded corpus",
        "architecture": sae.cfg.architecture,
        "built": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **(meta or {}),
    }
    write_data(out, col, feature_records(col, logits, neighbours), token_strings(tokenizer), info)
    return render(out, max_pages=cfg.max_pages)
