"""Text in, token sequences out: HF datasets (hub names, local files, streaming), the embedded
corpus, tokenization that concatenates documents and chunks them to the context size, and
pre-tokenized datasets used as they are.

The pipeline is three plain iterators, so any stage can be replaced:

    rows = load_rows("corpus.jsonl")                          # dicts, one per document
    seqs = token_sequences(rows, tokenizer, context_size=128)  # LongTensor [context_size] each
    for tokens in token_batches(seqs, batch_size=32): ...      # LongTensor [batch, context_size]
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "BOS_MODES",
    "EMBEDDED",
    "TOKEN_COLUMNS",
    "chunk_token_stream",
    "hub_offline",
    "load_rows",
    "token_batches",
    "token_sequences",
]

#: ``chunk``: every sequence starts with BOS, followed by ``context_size - 1`` tokens of the
#: stream, and documents are separated by BOS inside the stream. ``document``: BOS before every
#: document; sequences are plain ``context_size`` slices of the stream. ``none``: no BOS at all.
BOS_MODES = ("chunk", "document", "none")
BosMode = Literal["chunk", "document", "none"]

#: Columns that mark a dataset as pre-tokenized; their rows are used as they are.
TOKEN_COLUMNS = ("input_ids", "tokens")

#: The dataset name of the embedded corpus (also what ``dataset=None`` means).
EMBEDDED = "embedded"

# Local file suffix -> the HF datasets builder that reads it.
_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``HF_DATASETS_OFFLINE``) forbids the HuggingFace hub."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def load_rows(
    dataset: str | Path | None = None,
    *,
    split: str = "train",
    streaming: bool = False,
    name: str | None = None,
) -> Iterable[dict[str, Any]]:
    """The rows of a dataset, in a fixed order.

    ``dataset`` is one of:

    - ``None`` or ``"embedded"``: the embedded corpus (:mod:`fastsae.demo.corpus`), split ``train``
      or ``held_out``; each row is ``{"text": chapter}``.
    - a local file (``.txt`` one document per line, ``.json``/``.jsonl``, ``.parquet``, ``.csv``) or
      a directory of such files, read with HF ``datasets``;
    - a hub name such as ``"NeelNanda/pile-10k"`` (``name`` picks a configuration). With
      ``HF_HUB_OFFLINE=1`` this fails at once with a ValueError that says so.

    ``streaming=True`` reads rows lazily (an HF ``IterableDataset``) instead of preparing the whole
    dataset first.
    """
    if dataset is None or str(dataset) == EMBEDDED:
        from fastsae.demo import corpus

        return [{"text": doc} for doc in corpus.documents(split)]  # type: ignore[arg-type]
    import datasets

    path = Path(dataset).expanduser()
    if path.exists():
        if path.is_dir():
            return datasets.load_dataset(str(path), name, split=split, streaming=streaming)
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"dataset={str(dataset)!r}: cannot read {path.suffix!r} files; allowed: "
                f"{', '.join(sorted(_BUILDERS))}, or a directory"
            )
        # A local file is always the "train" split of its builder.
        return datasets.load_dataset(
            builder, data_files=str(path), split="train", streaming=streaming
        )
    if hub_offline():
        raise ValueError(
            f"dataset={str(dataset)!r} is not a local file or directory, and the HuggingFace hub is "
            "off (HF_HUB_OFFLINE=1). Pass a local .txt/.json/.jsonl/.parquet/.csv file or a "
            "directory, leave --dataset out for the embedded corpus, or unset HF_HUB_OFFLINE."
        )
    return datasets.load_dataset(str(dataset), name, split=split, streaming=streaming)


def chunk_token_stream(
    documents: Iterable[list[int]],
    context_size: int,
    *,
    bos: BosMode = "chunk",
    bos_token_id: int | None = None,
) -> Iterator[Tensor]:
    """Concatenate tokenized documents and cut the stream into ``LongTensor [context_size]``
    sequences (see :data:`BOS_MODES`). A final piece shorter than a sequence is dropped."""
    if bos not in BOS_MODES:
        raise ValueError(f"bos={bos!r} is unknown; allowed: {', '.join(BOS_MODES)}")
    if bos != "none" and bos_token_id is None:
        raise ValueError(
            f"bos={bos!r} needs a BOS token, but the tokenizer has none; use bos='none'"
        )
    if context_size < 2:
        raise ValueError(f"context_size={context_size} must be >= 2")
    body = context_size - 1 if bos == "chunk" else context_size
    buffer: list[int] = []
    first = True
    for ids in documents:
        if bos == "document" or (bos == "chunk" and not first):
            buffer.append(bos_token_id)  # type: ignore[arg-type]
        first = False
        buffer.extend(ids)
        start = 0
        while len(buffer) - start >= body:
            piece = buffer[start : start + body]
            start += body
            if bos == "chunk":
                piece = [bos_token_id, *piece]  # type: ignore[list-item]
            yield torch.tensor(piece, dtype=torch.long)
        del buffer[:start]


def _text_column(row: dict[str, Any], text_column: str) -> str:
    if text_column not in row:
        raise ValueError(
            f"rows have no {text_column!r} column (columns: {', '.join(row)}); pass the text column"
            f" name, or a pre-tokenized dataset with one of {', '.join(TOKEN_COLUMNS)}"
        )
    return row[text_column]


def token_sequences(
    rows: Iterable[dict[str, Any]],
    tokenizer: Any,
    context_size: int,
    *,
    bos: BosMode = "chunk",
    text_column: str = "text",
    tokenize_batch: int = 64,
) -> Iterator[Tensor]:
    """``LongTensor [context_size]`` sequences from dataset rows.

    Rows with an ``input_ids`` or ``tokens`` column are pre-tokenized: each row is one sequence,
    used as it is (every row must have ``context_size`` tokens). Otherwise the ``text_column`` of
    each row is tokenized without special tokens (``tokenizer`` is an HF tokenizer) and the
    documents are chunked by :func:`chunk_token_stream`.
    """
    iterator = iter(rows)
    try:
        first = next(iterator)
    except StopIteration:
        return
    token_column = next((c for c in TOKEN_COLUMNS if c in first), None)
    if token_column is not None:
        for i, row in enumerate(_chain(first, iterator)):
            seq = torch.as_tensor(row[token_column], dtype=torch.long)
            if seq.shape != (context_size,):
                raise ValueError(
                    f"pre-tokenized row {i} has {tuple(seq.shape)} tokens in {token_column!r}; "
                    f"expected ({context_size},) (context_size)"
                )
            yield seq
        return
    bos_token_id = tokenizer.bos_token_id
    if bos_token_id is None:
        bos_token_id = getattr(tokenizer, "cls_token_id", None)

    # Documents are longer than the model's context on purpose (they are chunked below): an HF
    # tokenizer's "longer than the specified maximum sequence length" warning would mislead.
    options: dict[str, Any] = {"add_special_tokens": False}
    if hasattr(tokenizer, "model_max_length"):
        options["verbose"] = False

    def documents() -> Iterator[list[int]]:
        batch: list[str] = []
        for row in _chain(first, iterator):
            batch.append(_text_column(row, text_column))
            if len(batch) == tokenize_batch:
                yield from tokenizer(batch, **options)["input_ids"]
                batch = []
        if batch:
            yield from tokenizer(batch, **options)["input_ids"]

    yield from chunk_token_stream(
        documents(), context_size, bos=bos, bos_token_id=bos_token_id if bos != "none" else None
    )


def _chain(first: dict[str, Any], rest: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield first
    yield from rest


def token_batches(sequences: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Stack sequences into ``LongTensor [batch_size, context]``; the last batch may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    batch: list[Tensor] = []
    for seq in sequences:
        batch.append(seq)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)
