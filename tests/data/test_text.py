"""fastsae.data.text: loading rows, chunking documents, pre-tokenized data."""

from __future__ import annotations

import json

import pytest
import torch

from fastsae.data import text


def _docs():
    return [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]


def test_chunk_mode_starts_every_sequence_with_bos_and_separates_documents():
    seqs = list(text.chunk_token_stream(_docs(), 4, bos="chunk", bos_token_id=0))
    # stream: 1 2 3 | 0 4 5 6 7 8 | 0 9 | 0 10 11 12 13 -> pieces of 3 after a BOS each
    assert [s.tolist() for s in seqs] == [
        [0, 1, 2, 3],
        [0, 0, 4, 5],
        [0, 6, 7, 8],
        [0, 0, 9, 0],
        [0, 10, 11, 12],
    ]
    assert all(s.dtype == torch.long for s in seqs)


def test_document_and_none_modes():
    doc = list(text.chunk_token_stream(_docs(), 5, bos="document", bos_token_id=0))
    assert [s.tolist() for s in doc] == [[0, 1, 2, 3, 0], [4, 5, 6, 7, 8], [0, 9, 0, 10, 11]]
    none = list(text.chunk_token_stream(_docs(), 6, bos="none"))
    assert [s.tolist() for s in none] == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]


def test_chunking_errors():
    with pytest.raises(ValueError, match="bos='sometimes' is unknown"):
        list(text.chunk_token_stream(_docs(), 4, bos="sometimes", bos_token_id=0))
    with pytest.raises(ValueError, match="needs a BOS token"):
        list(text.chunk_token_stream(_docs(), 4, bos="chunk"))
    with pytest.raises(ValueError, match="context_size=1"):
        list(text.chunk_token_stream(_docs(), 1, bos="none"))


def test_token_sequences_tokenize_and_chunk(demo_model):
    tok = demo_model.tokenizer
    rows = [{"text": "In the beginning God created the heaven."}, {"text": "And the earth."}]
    seqs = list(text.token_sequences(rows, tok, 6, bos="document"))
    stream = torch.cat(seqs).tolist()
    bos = tok.bos_token_id
    first = tok(rows[0]["text"], add_special_tokens=False)["input_ids"]
    second = tok(rows[1]["text"], add_special_tokens=False)["input_ids"]
    expected = [bos, *first, bos, *second]
    assert stream == expected[: len(stream)]
    assert len(stream) == len(expected) // 6 * 6


def test_pre_tokenized_rows_are_used_as_they_are():
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9, 10]}]
    seqs = list(text.token_sequences(rows, tokenizer=None, context_size=3))
    assert [s.tolist() for s in seqs] == [[5, 6, 7], [8, 9, 10]]
    rows = [{"tokens": [1, 2, 3]}, {"tokens": [1, 2]}]
    with pytest.raises(ValueError, match=r"pre-tokenized row 1 has \(2,\) tokens"):
        list(text.token_sequences(rows, tokenizer=None, context_size=3))


def test_missing_text_column_is_named(demo_model):
    with pytest.raises(ValueError, match="no 'text' column.*body"):
        list(text.token_sequences([{"body": "x"}], demo_model.tokenizer, 4))


def test_token_batches():
    seqs = [torch.full((4,), i) for i in range(5)]
    batches = list(text.token_batches(seqs, 2))
    assert [b.shape for b in batches] == [(2, 4), (2, 4), (1, 4)]


def test_embedded_rows_are_the_corpus():
    train = text.load_rows()
    held = text.load_rows(split="held_out")
    assert len(train) == 1130 and len(held) == 59
    assert train[0]["text"].startswith("In the beginning God created")


@pytest.fixture
def local_files(tmp_path):
    docs = ["first document here", "second document", "third one"]
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    return tmp_path, docs


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl", "a.parquet"])
@pytest.mark.parametrize("streaming", [False, True])
def test_local_files(local_files, name, streaming):
    folder, docs = local_files
    rows = text.load_rows(folder / name, streaming=streaming)
    assert [r["text"] for r in rows] == docs


def test_hub_name_fails_fast_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1"):
        text.load_rows("someone/some-dataset-that-is-not-here")


def test_unknown_suffix(tmp_path):
    (tmp_path / "a.docx").write_text("x")
    with pytest.raises(ValueError, match="cannot read '.docx' files"):
        text.load_rows(tmp_path / "a.docx")
