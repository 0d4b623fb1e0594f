"""Build a feature dashboard: one pass over N tokens, then data files and a static site.

``OUT/data/summary.json`` (model, hook, token count, histogram bin edges), ``OUT/data/vocab.json``
(each token id's text) and ``OUT/data/features.jsonl`` (one JSON object per feature: density,
max / mean activation, histogram, top contexts, random samples, logit effects, nearest
features) are what the HTML (:mod:`fastsae.dashboard.render`) and the Neuronpedia export
(:mod:`fastsae.analysis.neuronpedia`) are made from.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastsae.analysis.codes import encode_codes
from fastsae.dashboard.collect import FeatureCollector, bin_edges
from fastsae.data.sources import POSITION, SEQUENCE, ActivationSource
from fastsae.sae import SAE

__all__ = [
    "DashboardConfig",
    "collect",
    "feature_records",
    "logit_effects",
    "nearest_features",
    "unembedding",
    "write_data",
]


@dataclass
class DashboardConfig:
    """Feature dashboard settings (``python -m fastsae.dashboard SAE_DIR --out DIR ...``)."""

    out: str = "dashboard"
    """Directory to write the site into (created; files of an earlier build are replaced)."""
    model: str | None = None
    """Model name or local HF directory; default: the embedded demo model."""
    model_kind: str = "auto"
    """auto, transformer_lens or hf (as fastsae.cache)."""
    dataset: str | None = None
    """Dataset: a local file or directory, a hub name, or the embedded corpus (default)."""
    split: str = "train"
    """Dataset split (the embedded corpus has train and held_out)."""
    tokens: int = 100_000
    """Tokens to read (BOS and pad positions are not counted)."""
    context_size: int = 128
    """Sequence length (capped by the model's context)."""
    batch_size: int = 16
    """Sequences per model forward pass."""
    top: int = 20
    """Top-activating contexts kept per feature."""
    samples: int = 24
    """Uniformly sampled firing events kept per feature (shown by activation quantile)."""
    left: int = 24
    """Context tokens shown before the firing token."""
    right: int = 8
    """Context tokens shown after the firing token."""
    logits: int = 10
    """Top boosted and suppressed tokens per feature (needs an unembedding)."""
    neighbours: int = 5
    """Nearest features by decoder cosine."""
    max_pages: int = 0
    """Write pages for at most this many features (the first live ones by index); 0: all live."""
    neuronpedia: bool = False
    """Also write a Neuronpedia upload directory under OUT/neuronpedia."""
    device: str = "cpu"
    """Device for the model and SAE."""
    seed: int = 0
    """Seeds the random samples."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        for name in ("tokens", "context_size", "batch_size", "top", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("left", "right", "logits", "neighbours", "max_pages"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")


def collect(
    sae: SAE,
    source: ActivationSource,
    hook: str,
    batches: Iterable[Tensor],
    cfg: DashboardConfig,
) -> FeatureCollector:
    """One pass: ``source`` runs the model on each ``[b, s]`` token batch, ``sae.encode_sparse``
    encodes the ``hook`` rows, and the collector folds them in, until ``cfg.tokens`` tokens."""
    sae.eval()
    col = FeatureCollector(
        sae.d_sae,
        top=cfg.top,
        samples=cfg.samples,
        left=cfg.left,
        right=cfg.right,
        seed=cfg.seed,
        device=sae.device,
    )
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.tokens, unit="tok", desc="dashboard pass", dynamic_ncols=True)
    with torch.no_grad():
        for tokens in batches:
            rows = source.activations(tokens)
            codes = encode_codes(sae, rows[hook].to(sae.device))
            b, s = tokens.shape
            keep = torch.zeros(b, s, dtype=torch.bool, device=sae.device)
            seq, pos = rows[SEQUENCE].to(sae.device), rows[POSITION].to(sae.device)
            over = col.tokens_seen + seq.numel() - cfg.tokens
            if over > 0:  # stop exactly at cfg.tokens
                seq, pos = seq[: seq.numel() - over], pos[: pos.numel() - over]
            keep[seq, pos] = True
            w = codes.values.shape[-1]
            values = torch.zeros(b, s, w, dtype=codes.values.dtype, device=sae.device)
            indices = torch.zeros(b, s, w, dtype=torch.long, device=sae.device)
            n = seq.numel()
            values[seq, pos] = codes.values[:n]
            indices[seq, pos] = codes.indices[:n]
            col.update(tokens.to(sae.device), values, indices, keep)
            if bar is not None:
                bar.update(n)
            if col.tokens_seen >= cfg.tokens:
                break
    if bar is not None:
        bar.close()
    return col


def unembedding(model: Any, d_out: int) -> Tensor | None:
    """``[d_out, vocab]``: the model's unembedding, or None when it has none of that width."""
    w_u = getattr(model, "W_U", None)
    if w_u is None and hasattr(model, "get_output_embeddings"):
        emb = model.get_output_embeddings()
        w_u = None if emb is None else emb.weight.T
    if w_u is None or w_u.shape[0] != d_out:
        return None
    return w_u.detach()


@torch.no_grad()
def logit_effects(sae: SAE, w_u: Tensor, n: int, chunk: int = 1024) -> tuple[Tensor, ...]:
    """Direct logit effects ``W_dec @ W_U`` (no final norm), top ``n`` per feature each way:
    ``(boosted ids, values, suppressed ids, values)``, each ``[d_sae, n]``; memory ``chunk × vocab``."""
    n = min(n, w_u.shape[1])
    out = [[], [], [], []]
    w_u = w_u.to(sae.device, torch.float32)
    for s in range(0, sae.d_sae, chunk):
        eff = sae.W_dec[s : s + chunk].float() @ w_u
        hi, lo = eff.topk(n, dim=-1), eff.topk(n, dim=-1, largest=False)
        for lst, t in zip(out, (hi.indices, hi.values, lo.indices, lo.values), strict=True):
            lst.append(t)
    return tuple(torch.cat(lst) for lst in out)


@torch.no_grad()
def nearest_features(sae: SAE, n: int, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """``(ids, cosines)`` ``[d_sae, n]``: the other features whose decoder rows are closest."""
    n = min(n, sae.d_sae - 1)
    unit = torch.nn.functional.normalize(sae.W_dec.float(), dim=-1)
    ids, cos = [], []
    for s in range(0, sae.d_sae, chunk):
        sim = unit[s : s + chunk] @ unit.T
        rows = torch.arange(sim.shape[0], device=sim.device)
        sim[rows, rows + s] = -2.0
        best = sim.topk(n, dim=-1)
        ids.append(best.indices)
        cos.append(best.values)
    return torch.cat(ids), torch.cat(cos)


def _events(state, f: int, left: int, by_value: bool = False) -> list[dict[str, Any]]:
    """The kept events of feature ``f``; ``center`` is the firing token's index in ``tokens``."""
    idx = (state.key[f] > -torch.inf).nonzero().flatten()
    if by_value:
        idx = idx[torch.argsort(state.value[f, idx], descending=True, stable=True)]
    # one conversion per feature (tensor element access from Python is slow); 5 decimals
    tokens = state.tokens[f, idx].tolist()
    acts = state.acts[f, idx].double().mul(1e5).round().div(1e5).tolist()
    values = state.value[f, idx].tolist()
    where = state.where[f, idx].tolist()
    events = []
    for tok, act, value, w in zip(tokens, acts, values, where, strict=True):
        first = next(i for i, t in enumerate(tok) if t >= 0)
        last = len(tok) - next(i for i, t in enumerate(reversed(tok)) if t >= 0)
        events.append(
            {
                "where": w,
                "value": value,
                "tokens": tok[first:last],
                "acts": act[first:last],
                "center": left - first,
            }
        )
    return events


def feature_records(
    col: FeatureCollector,
    logits: tuple[Tensor, ...] | None,
    neighbours: tuple[Tensor, Tensor] | None,
) -> Iterator[dict[str, Any]]:
    """One JSON-ready dict per feature (see the module docstring)."""
    density = col.density
    hist = col.hist.cpu()
    for f in range(col.d_sae):
        count = int(col.count[f])
        h = hist[f]
        nz = h.nonzero().flatten()
        rec: dict[str, Any] = {
            "index": f,
            "count": count,
            "density": float(density[f]),
            "max": float(col.top.value[f, 0]),
            "mean": float(col.total[f] / count) if count else 0.0,
            "hist_first_bin": int(nz[0]) if nz.numel() else 0,
            "hist": h[nz[0] : nz[-1] + 1].tolist() if nz.numel() else [],
            "top": _events(col.top, f, col.left) if count else [],
            "samples": _events(col.samples, f, col.left, by_value=True) if count else [],
        }
        if logits is not None:
            pi, pv, ni, nv = logits
            rec["logits_pos"] = [
                [int(i), round(float(v), 5)] for i, v in zip(pi[f], pv[f], strict=True)
            ]
            rec["logits_neg"] = [
                [int(i), round(float(v), 5)] for i, v in zip(ni[f], nv[f], strict=True)
            ]
        if neighbours is not None:
            ids, cos = neighbours
            rec["neighbours"] = [
                [int(i), round(float(c), 5)] for i, c in zip(ids[f], cos[f], strict=True)
            ]
        yield rec


def write_data(
    out: Path,
    col: FeatureCollector,
    records: Iterable[dict[str, Any]],
    vocab: list[str],
    meta: dict[str, Any],
) -> Path:
    """Write ``out/data/{summary.json, vocab.json, features.jsonl}``; returns ``out/data``."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    summary = {
        **meta,
        "tokens": col.tokens_seen,
        "sequences": col.sequences_seen,
        "seq_len": col.seq_len,
        "d_sae": col.d_sae,
        "left": col.left,
        "right": col.right,
        "bin_edges": bin_edges().tolist(),
    }
    (data / "summary.json").write_text(json.dumps(summary, indent=1))
    (data / "vocab.json").write_text(json.dumps(vocab))
    with open(data / "features.jsonl", "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
    return data


def config_dict(cfg: DashboardConfig) -> dict[str, Any]:
    return asdict(cfg)
