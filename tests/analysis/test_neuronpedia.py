"""The Neuronpedia export: layout, every row's schema, and agreement with the dashboard data."""

from __future__ import annotations

import gzip
import json

import pytest

from fastsae.analysis.neuronpedia import export, source_id

NEURON_FIELDS = {
    "modelId": str, "layer": str, "index": str, "maxActApprox": float, "creatorId": str,
    "frac_nonzero": float, "freq_hist_data_bar_heights": list, "freq_hist_data_bar_values": list,
    "logits_hist_data_bar_heights": list, "logits_hist_data_bar_values": list,
    "neuron_alignment_indices": list, "neuron_alignment_l1": list, "neuron_alignment_values": list,
    "correlated_neurons_indices": list, "correlated_neurons_l1": list,
    "correlated_neurons_pearson": list, "decoder_weights_dist": list, "neg_str": list,
    "neg_values": list, "pos_str": list, "pos_values": list, "sourceSetName": str,
    "topkCosSimIndices": list, "topkCosSimValues": list, "vector": list, "hookName": str,
    "hasVector": bool,
}  # fmt: skip
ACTIVATION_FIELDS = {
    "id": str, "modelId": str, "layer": str, "index": str, "creatorId": str, "dataSource": str,
    "tokens": list, "maxValue": float, "minValue": float, "values": list,
    "maxValueTokenIndex": int, "binMin": (int, float), "binMax": (int, float),
}  # fmt: skip


def _data(tmp_path, d_sae=5):
    data = tmp_path / "data"
    data.mkdir()
    vocab = ["<bos>", " the", " Lord", "\n", " God"]
    summary = {"model": "fastsae-demo-kjv", "hook": "blocks.1.hook_resid_post", "d_sae": d_sae,
               "tokens": 100, "sequences": 4, "seq_len": 26, "dataset": "embedded",
               "architecture": "topk", "bin_edges": [2.0 ** (i / 4 - 12) for i in range(97)]}  # fmt: skip
    (data / "summary.json").write_text(json.dumps(summary))
    (data / "vocab.json").write_text(json.dumps(vocab))
    with open(data / "features.jsonl", "w") as fh:
        for f in range(d_sae):
            ev = {
                "where": 3,
                "value": 2.0 + f,
                "tokens": [0, 1, 2],
                "acts": [0.0, 0.5, 2.0 + f],
                "center": 2,
            }
            sample = {**ev, "value": 0.5, "acts": [0.0, 0.5, 0.2], "center": 1}
            rec = {"index": f, "count": 3, "density": 0.03, "max": 2.0 + f, "mean": 1.0,
                   "hist_first_bin": 50, "hist": [1, 0, 2], "top": [ev], "samples": [sample],
                   "logits_pos": [[2, 0.5], [4, 0.25]], "logits_neg": [[3, -0.5]],
                   "neighbours": [[(f + 1) % d_sae, 0.3]]}  # fmt: skip
            fh.write(json.dumps(rec) + "\n")
    return data


def _read(path):
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh]


def test_export_layout_and_schema(tmp_path):
    root = export(_data(tmp_path), tmp_path / "np", batch_size=2)
    assert root == tmp_path / "np" / "fastsae-demo-kjv" / "1-res-fastsae"
    for name in ("model", "release", "sourceset", "source"):
        (row,) = [json.loads(line) for line in (root / f"{name}.jsonl").read_text().splitlines()]
        assert row["createdAt"]
    source = json.loads((root / "source.jsonl").read_text())
    assert source["id"] == "1-res-fastsae" and source["setName"] == "res-fastsae"
    batches = sorted(p.name for p in (root / "features").iterdir())
    assert batches == ["batch-0.jsonl.gz", "batch-1.jsonl.gz", "batch-2.jsonl.gz"]
    seen = []
    for n in range(3):
        feats = _read(root / "features" / f"batch-{n}.jsonl.gz")
        acts = _read(root / "activations" / f"batch-{n}.jsonl.gz")
        for row in feats:
            for key, kind in NEURON_FIELDS.items():
                assert isinstance(row[key], kind), (key, row[key])
            assert row["layer"] == "1-res-fastsae" and row["modelId"] == "fastsae-demo-kjv"
            i = int(row["index"])
            assert row["maxActApprox"] == 2.0 + i
            assert row["pos_str"] == [" Lord", " God"] and row["neg_values"] == [-0.5]
            assert (
                len(row["freq_hist_data_bar_values"]) == len(row["freq_hist_data_bar_heights"]) == 3
            )
            assert row["topkCosSimIndices"] == [(i + 1) % 5]
            seen.append(i)
        assert {a["index"] for a in acts} == {r["index"] for r in feats}  # same features per batch
        for a in acts:
            for key, kind in ACTIVATION_FIELDS.items():
                assert isinstance(a[key], kind), (key, a[key])
            assert len(a["tokens"]) == len(a["values"]) and a["maxValue"] == max(a["values"])
            assert a["values"][a["maxValueTokenIndex"]] == a["maxValue"] or a["binMin"] != -1
        assert len({a["id"] for a in acts}) == len(acts)
        sample = next(a for a in acts if a["binMin"] != -1)
        mx = 2.0 + int(sample["index"])
        assert sample["binMin"] <= 0.5 <= sample["binMax"] <= mx
    assert seen == list(range(5))


def test_source_ids_and_errors(tmp_path):
    assert source_id("blocks.3.hook_mlp_out") == "3-mlp-fastsae"
    assert source_id("model.layers.12", "x") == "12-x"
    with pytest.raises(ValueError, match="build the dashboard first"):
        export(tmp_path, tmp_path / "np")
