"""Render the static dashboard site from ``OUT/data`` (see :mod:`fastsae.dashboard.build`).

``OUT/index.html`` lists every feature (sortable by index, density and max activation; a search
box filters by the tokens of its top contexts and boosted logits) and ``OUT/features/<i>.html``
shows one feature. Plain HTML, CSS, inline SVG and a few lines of vanilla JS: nothing is fetched,
so the site works from ``file://`` with no server.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2

from fastsae.dashboard.collect import BINS_PER_OCTAVE

__all__ = ["histogram_svg", "read_features", "render"]

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
BANDS = (
    (0.75, "75-100% of max"),
    (0.5, "50-75% of max"),
    (0.25, "25-50% of max"),
    (0.0, "0-25% of max"),
)


def read_features(data: Path) -> Iterator[dict[str, Any]]:
    """The records of ``data/features.jsonl``, one at a time."""
    with open(data / "features.jsonl") as fh:
        for line in fh:
            yield json.loads(line)


def _text(vocab: list[str], token: int) -> str:
    return vocab[token].replace("\n", "\u21b5") if 0 <= token < len(vocab) else f"<{token}>"


def histogram_svg(counts: list[int], first_bin: int, edges: list[float]) -> str:
    """An inline SVG bar chart of ``counts`` (bins ``first_bin ...`` of ``edges``)."""
    if not counts:
        return "<p class='muted'>never fired</p>"
    width, height, pad = 480, 140, 18
    top = max(counts)
    bar = (width - 2 * pad) / len(counts)
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height + 30}' role='img'>"
    ]
    for i, c in enumerate(counts):
        h = (height - pad) * c / top
        lo, hi = edges[first_bin + i], edges[first_bin + i + 1]
        parts.append(
            f"<rect x='{pad + i * bar:.1f}' y='{height - h:.1f}' width='{max(bar - 1, 1):.1f}' "
            f"height='{h:.1f}' fill='#e07b00'><title>{lo:.3g} to {hi:.3g}: {c}</title></rect>"
        )
    parts.append(f"<text x='{pad}' y='{height + 16}' font-size='11'>{edges[first_bin]:.3g}</text>")
    parts.append(
        f"<text x='{width - pad}' y='{height + 16}' font-size='11' text-anchor='end'>"
        f"{edges[first_bin + len(counts)]:.3g}</text>"
    )
    parts.append(f"<text x='{pad}' y='12' font-size='11'>max count {top}</text></svg>")
    return "".join(parts)


def _cells(ev: dict[str, Any], vocab: list[str], maxv: float) -> dict[str, Any]:
    cells = [
        {"text": _text(vocab, t), "act": a, "alpha": min(max(a / maxv, 0.0), 1.0) if maxv else 0.0}
        for t, a in zip(ev["tokens"], ev["acts"], strict=True)
    ]
    return {**ev, "cells": cells}


def render(out: str | Path, *, max_pages: int = 0) -> Path:
    """Write ``out/index.html`` and ``out/features/*.html`` from ``out/data``; returns the index.

    ``max_pages > 0`` writes pages only for the first ``max_pages`` features that fired."""
    out = Path(out)
    data = out / "data"
    summary = json.loads((data / "summary.json").read_text())
    vocab = json.loads((data / "vocab.json").read_text())
    summary.setdefault("built", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    edges = summary["bin_edges"]
    pages = [r["index"] for r in read_features(data) if r["count"] > 0]
    if max_pages:
        pages = pages[:max_pages]
    has_page = set(pages)
    position = {f: i for i, f in enumerate(pages)}
    fdir = out / "features"
    if fdir.exists():
        shutil.rmtree(fdir)
    fdir.mkdir(parents=True)
    template = _ENV.get_template("feature.html.j2")
    rows, n_dead = [], 0
    for rec in read_features(data):
        f = rec["index"]
        n_dead += rec["count"] == 0
        centers = Counter(_text(vocab, ev["tokens"][ev["center"]]) for ev in rec["top"])
        boosts = [_text(vocab, t) for t, _ in rec.get("logits_pos", [])[:3]]
        top_tokens = [t for t, _ in centers.most_common(4)]
        rows.append(
            {
                "index": f,
                "density": rec["density"],
                "max": rec["max"],
                "page": f in has_page,
                "top_tokens": top_tokens,
                "boosts": boosts,
                "search": " ".join(top_tokens + boosts).lower(),
            }
        )
        if f not in has_page:
            continue
        i = position[f]
        rec["top"] = [_cells(ev, vocab, rec["max"]) for ev in rec["top"]]
        samples = [_cells(ev, vocab, rec["max"]) for ev in rec["samples"]]
        bands, rest = [], samples
        for frac, label in BANDS:
            bands.append(
                {"label": label, "events": [e for e in rest if e["value"] >= frac * rec["max"]]}
            )
            rest = [e for e in rest if e["value"] < frac * rec["max"]]
        logits = list(
            zip(
                [(_text(vocab, t), v) for t, v in rec.get("logits_pos", [])],
                [(_text(vocab, t), v) for t, v in rec.get("logits_neg", [])],
                strict=True,
            )
        )
        rec["neighbours"] = [(j, c) for j, c in rec.get("neighbours", []) if j in has_page]
        html = template.render(
            f=rec,
            s=summary,
            hist_svg=histogram_svg(rec["hist"], rec["hist_first_bin"], edges),
            bins_per_octave=BINS_PER_OCTAVE,
            logits=logits,
            bands=bands,
            prev=pages[i - 1] if i > 0 else None,
            next=pages[i + 1] if i + 1 < len(pages) else None,
        )
        (fdir / f"{f}.html").write_text(html)
    index = out / "index.html"
    index.write_text(_ENV.get_template("index.html.j2").render(s=summary, rows=rows, n_dead=n_dead))
    return index
