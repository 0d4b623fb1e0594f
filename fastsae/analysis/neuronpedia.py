"""Export dashboard data (``OUT/data`` of :mod:`fastsae.dashboard`) in Neuronpedia's upload format.

The layout and field names are those of Neuronpedia's own exporter, ``export-data.py`` in
hijohnnylin/neuronpedia ``utils/neuronpedia-utils/neuronpedia_utils``, and its database schema
(``apps/webapp/prisma/schema.prisma``: ``Model``, ``SourceRelease``, ``SourceSet``, ``Source``,
``Neuron``, ``Activation``)::

    OUT/<modelId>/<sourceId>/model.jsonl, release.jsonl, sourceset.jsonl, source.jsonl
    OUT/<modelId>/<sourceId>/features/batch-<N>.jsonl.gz      Neuron rows, features N*B .. N*B+B-1
    OUT/<modelId>/<sourceId>/activations/batch-<N>.jsonl.gz   Activation rows of those features

``B`` is 1024 as in the exporter. A source id is ``<layer>-<set name>`` (e.g. ``1-res-fastsae``),
Neuronpedia's convention; a feature's ``layer`` field is that source id and its ``index`` a string.
Top activations are written with ``binMin = -1`` (not a quantile bin); random samples carry the
activation band they were drawn into (``binMin``/``binMax``, fractions of the max times the max).
"""

from __future__ import annotations

import gzip
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastsae.dashboard.render import BANDS, read_features

__all__ = ["BATCH_SIZE", "export", "source_id"]

BATCH_SIZE = 1024
_HOOK_KIND = (
    ("hook_resid_post", "res"),
    ("hook_resid_pre", "res-pre"),
    ("hook_resid_mid", "res-mid"),
    ("hook_mlp_out", "mlp"),
    ("hook_attn_out", "att"),
    ("hook_z", "att"),
)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-") or "model"


def source_id(hook: str, set_name: str = "fastsae") -> str:
    """Neuronpedia's ``<layer>-<set name>`` id for an SAE at ``hook`` (``blocks.3.hook_resid_post``
    -> ``3-res-fastsae``; an HF path ``model.layers.3`` -> ``3-fastsae``)."""
    layer = re.search(r"\.(\d+)(\.|$)", hook)
    kind = next((k for suffix, k in _HOOK_KIND if hook.endswith(suffix)), None)
    parts = [layer.group(1) if layer else "0", kind, set_name]
    return "-".join(p for p in parts if p)


def _write_gz(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", compresslevel=5) as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def _write_one(path: Path, row: dict[str, Any]) -> None:
    path.write_text(json.dumps(row) + "\n")


def _text(vocab: list[str], token: int) -> str:
    return vocab[token] if 0 <= token < len(vocab) else ""


def _activation(
    rec: dict[str, Any], ev: dict[str, Any], k: int, ids: dict[str, str], vocab: list[str], band
) -> dict[str, Any]:
    values = ev["acts"]
    return {
        "id": f"{ids['model']}@{ids['source']}@{rec['index']}@{k}",
        "modelId": ids["model"],
        "layer": ids["source"],
        "index": str(rec["index"]),
        "creatorId": ids["creator"],
        "dataSource": ids["dataset"],
        "tokens": [_text(vocab, t) for t in ev["tokens"]],
        "maxValue": max(values),
        "minValue": min(values),
        "values": values,
        "maxValueTokenIndex": ev["center"],
        "dfaValues": [],
        "dfaMaxValue": None,
        "dfaTargetIndex": None,
        "binContains": None,
        "binMin": band[0],
        "binMax": band[1],
    }


def _band(value: float, maxv: float) -> tuple[float, float]:
    """The activation band (of :data:`fastsae.dashboard.render.BANDS`) ``value`` falls in."""
    upper = 1.0
    for frac, _ in BANDS:
        if value >= frac * maxv:
            return frac * maxv, upper * maxv
        upper = frac
    return 0.0, upper * maxv


def export(
    data: str | Path,
    out: str | Path,
    *,
    model_id: str | None = None,
    set_name: str = "fastsae",
    creator: str = "fastsae",
    batch_size: int = BATCH_SIZE,
) -> Path:
    """Write the Neuronpedia upload directory for ``data`` (a dashboard's ``OUT/data``) under
    ``out``; returns ``out/<modelId>/<sourceId>``."""
    data, out = Path(data), Path(out)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not (data / "features.jsonl").exists():
        raise ValueError(f"{data} has no features.jsonl: build the dashboard first")
    summary = json.loads((data / "summary.json").read_text())
    vocab = json.loads((data / "vocab.json").read_text())
    now = datetime.now(timezone.utc).isoformat()
    model = _slug(model_id or summary.get("model", "model"))
    source = source_id(summary["hook"], set_name)
    set_full = source.split("-", 1)[1] if "-" in source else set_name
    ids = {
        "model": model,
        "source": source,
        "creator": creator,
        "dataset": summary.get("dataset", ""),
    }
    root = out / model / source
    root.mkdir(parents=True, exist_ok=True)
    release = f"{model}-{set_name}"
    _write_one(root / "model.jsonl", {
        "id": model, "displayName": summary.get("model", model), "displayNameShort": model,
        "creatorId": creator, "tlensId": summary.get("model"), "dimension": None,
        "visibility": "PUBLIC", "inferenceEnabled": False, "instruct": False,
        "layers": 0, "neuronsPerLayer": summary["d_sae"], "owner": creator,
        "website": None, "createdAt": now, "updatedAt": now,
    })  # fmt: skip
    _write_one(root / "release.jsonl", {
        "name": release, "visibility": "PUBLIC", "isNewUi": False, "featured": False,
        "description": f"fastsae SAE on {summary.get('model')} at {summary['hook']}",
        "descriptionShort": None, "urls": [], "creatorName": creator, "creatorNameShort": None,
        "creatorEmail": None, "creatorId": creator, "defaultSourceSetName": set_full,
        "defaultSourceId": source, "defaultUmapSourceIds": [], "createdAt": now,
    })  # fmt: skip
    _write_one(root / "sourceset.jsonl", {
        "modelId": model, "name": set_full, "hasDashboards": True, "allowInferenceSearch": False,
        "visibility": "PUBLIC", "description": f"{summary.get('architecture', 'SAE')} SAEs (fastsae)",
        "type": "sae", "creatorName": creator, "urls": [], "creatorEmail": None,
        "creatorId": creator, "releaseName": release, "defaultRange": 1, "defaultShowBreaks": True,
        "showDfa": False, "showCorrelated": False, "showHeadAttribution": False, "showUmap": False,
        "createdAt": now,
    })  # fmt: skip
    _write_one(root / "source.jsonl", {
        "id": source, "modelId": model, "hasDashboards": True, "inferenceEnabled": False,
        "saelensConfig": None, "saelensRelease": None, "saelensSaeId": None,
        "hfRepoId": None, "hfFolderId": None, "visibility": "PUBLIC", "setName": set_full,
        "creatorId": creator, "hasUmap": False, "hasUmapLogSparsity": False,
        "hasUmapClusters": False, "num_prompts": summary.get("sequences"),
        "num_tokens_in_prompt": summary.get("seq_len"), "dataset": summary.get("dataset"),
        "notes": f"{summary['tokens']} tokens; hook {summary['hook']}", "createdAt": now,
    })  # fmt: skip
    edges = summary["bin_edges"]
    features: list[dict[str, Any]] = []
    activations: list[dict[str, Any]] = []
    batch = 0
    for rec in read_features(data):
        first = rec["hist_first_bin"]
        centers = [
            (edges[first + i] * edges[first + i + 1]) ** 0.5 for i in range(len(rec["hist"]))
        ]
        features.append({
            "modelId": model, "layer": source, "index": str(rec["index"]),
            "maxActApprox": rec["max"], "creatorId": creator, "frac_nonzero": rec["density"],
            "freq_hist_data_bar_heights": [float(c) for c in rec["hist"]],
            "freq_hist_data_bar_values": centers,
            "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
            "neuron_alignment_indices": [], "neuron_alignment_l1": [],
            "neuron_alignment_values": [], "correlated_neurons_indices": [],
            "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
            "decoder_weights_dist": [],
            "neg_str": [_text(vocab, t) for t, _ in rec.get("logits_neg", [])],
            "neg_values": [v for _, v in rec.get("logits_neg", [])],
            "pos_str": [_text(vocab, t) for t, _ in rec.get("logits_pos", [])],
            "pos_values": [v for _, v in rec.get("logits_pos", [])],
            "sourceSetName": set_full,
            "topkCosSimIndices": [j for j, _ in rec.get("neighbours", [])],
            "topkCosSimValues": [c for _, c in rec.get("neighbours", [])],
            "vector": [], "vectorLabel": None, "hookName": summary["hook"],
            "vectorDefaultSteerStrength": 10, "hasVector": False,
        })  # fmt: skip
        k = 0
        for ev in rec["top"]:
            activations.append(_activation(rec, ev, k, ids, vocab, (-1, -1)))
            k += 1
        for ev in rec["samples"]:
            activations.append(_activation(rec, ev, k, ids, vocab, _band(ev["value"], rec["max"])))
            k += 1
        if len(features) == batch_size:
            _write_gz(root / "features" / f"batch-{batch}.jsonl.gz", features)
            _write_gz(root / "activations" / f"batch-{batch}.jsonl.gz", activations)
            features, activations, batch = [], [], batch + 1
    if features:
        _write_gz(root / "features" / f"batch-{batch}.jsonl.gz", features)
        _write_gz(root / "activations" / f"batch-{batch}.jsonl.gz", activations)
    return root
