"""The dashboard end to end on the demo model: its data against an independent recomputation,
and its pages in headless Chromium."""

from __future__ import annotations

import json
import re
import urllib.parse

import pytest
import torch

from fastsae import ops
from fastsae.dashboard import DashboardConfig, build_dashboard
from fastsae.data import TransformerLensSource, text
from tests.analysis.conftest import HOOK, demo_model, random_sae  # noqa: F401 (fixture)
from tests.chromium import dump_dom, screenshot

D_SAE = 48


@pytest.fixture(scope="module")
def built(tmp_path_factory, demo_model):  # noqa: F811
    sae = random_sae(d_sae=D_SAE, k=4, seed=3)
    seqs = text.token_sequences(text.load_rows(), demo_model.tokenizer, 48)
    tokens = torch.stack([s for _, s in zip(range(10), seqs, strict=False)])
    out = tmp_path_factory.mktemp("dash")
    cfg = DashboardConfig(
        out=str(out), tokens=10**6, batch_size=3, top=4, samples=6, progress=False
    )
    source = TransformerLensSource(demo_model, [HOOK])
    index = build_dashboard(sae, source, demo_model.tokenizer, tokens.split(3), cfg)
    records = [json.loads(line) for line in (out / "data" / "features.jsonl").open()]
    return index, sae, tokens, records


def test_top_context_holds_each_features_maximum(built, demo_model):  # noqa: F811
    index, sae, tokens, records = built
    _, cache = demo_model.run_with_cache(tokens, names_filter=HOOK)
    with ops.use_backend("reference"), torch.no_grad():
        dense = sae.encode(cache[HOOK].double())  # [b, s, d_sae], the float64 oracle
    dense[tokens == demo_model.tokenizer.bos_token_id] = 0
    n_tokens = int((tokens != demo_model.tokenizer.bos_token_id).sum())
    fired = (dense > 0).sum((0, 1))
    assert len(records) == D_SAE
    assert (fired > 0).sum() >= 10
    for rec in records:
        f = rec["index"]
        assert rec["count"] == int(fired[f])
        assert rec["density"] == pytest.approx(int(fired[f]) / n_tokens)
        if rec["count"] == 0:
            assert rec["top"] == [] and not (index.parent / "features" / f"{f}.html").exists()
            continue
        best = float(dense[..., f].max())
        assert rec["max"] == pytest.approx(best, rel=1e-4)
        top = rec["top"][0]
        seq, pos = divmod(top["where"], tokens.shape[1])
        # the top context is where the maximum is: its firing token is that token ...
        assert float(dense[seq, pos, f]) == pytest.approx(best, rel=1e-4)
        assert top["tokens"][top["center"]] == int(tokens[seq, pos])
        assert top["acts"][top["center"]] == pytest.approx(best, rel=1e-4)
        # ... and the window's other activations are the feature's at those tokens
        lo = pos - top["center"]
        window = dense[seq, lo : lo + len(top["tokens"]), f]
        assert top["acts"] == pytest.approx(window.tolist(), rel=1e-4, abs=1e-5)
        values = [e["value"] for e in rec["top"]]
        assert values == sorted(values, reverse=True)
        for e in rec["samples"]:
            s, p = divmod(e["where"], tokens.shape[1])
            assert float(dense[s, p, f]) == pytest.approx(e["value"], rel=1e-4)


def _assert_loaded(dom: str) -> None:
    """The page's script ran to its end, and no script error was recorded on <html>."""
    assert re.search(r'<body[^>]*data-ready="1"', dom), dom[:300]
    assert not re.search(r"<html[^>]*data-js-errors", dom), dom[:300]


def test_pages_load_without_errors_in_headless_chromium(built, tmp_path):
    index, _, _, records = built
    dom = dump_dom(index, tmp_path / "profile")
    _assert_loaded(dom)
    assert dom.count("<tr data-index=") == D_SAE
    assert re.search(rf"{D_SAE} of {D_SAE} features", dom)
    live = [r["index"] for r in records if r["count"]]
    for f in (live[0], live[-1]):
        page = index.parent / "features" / f"{f}.html"
        dom = dump_dom(page, tmp_path / "profile")
        _assert_loaded(dom)
        assert dom.count('class="ctx"') >= 1 and "<svg" in dom
    shot = screenshot(
        index.parent / "features" / f"{live[0]}.html", tmp_path / "f.png", tmp_path / "profile"
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    html = index.read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html


def test_index_search_filters_by_token(built, tmp_path):
    index, _, _, _ = built
    html = index.read_text()
    tokens = re.findall(r'data-tokens="([^"]*)"', html)
    needle = next(w for t in tokens for w in t.split() if len(w) > 2)
    expected = sum(needle in t for t in tokens)
    url = index.resolve().as_uri() + "?q=" + urllib.parse.quote(needle)
    dom = dump_dom(url, tmp_path / "profile")
    assert f"{expected} of {D_SAE} features" in dom, needle


def test_cli_builds_a_site(tmp_path):
    from fastsae.dashboard.__main__ import main

    sae = random_sae(d_sae=16, k=2)
    sae.save(tmp_path / "sae")
    index = main(
        [
            str(tmp_path / "sae"),
            "--out",
            str(tmp_path / "site"),
            "--tokens",
            "200",
            "--context-size",
            "32",
            "--progress",
            "false",
            "--max-pages",
            "3",
            "--neuronpedia",
            "true",
        ]
    )
    assert index.exists() and len(list((tmp_path / "site" / "features").glob("*.html"))) == 3
    summary = json.loads((tmp_path / "site" / "data" / "summary.json").read_text())
    assert summary["tokens"] == 200 and summary["hook"] == HOOK
    (batch,) = (tmp_path / "site" / "neuronpedia").glob("*/1-res-fastsae/features/batch-0.jsonl.gz")
    assert batch.stat().st_size > 0
    with pytest.raises(SystemExit):
        main([str(tmp_path / "sae"), "--tokens", "0"])
