"""Write an activation cache (``python -m fastsae.cache``), resumably.

Shards are written one at a time: the bytes go to a temporary file, which is fsynced and renamed
to ``shard-NNNNN.bin``; only then is the manifest rewritten (atomically) to list the shard and
the stream position after it. An interrupted run therefore leaves a manifest that lists only
complete shards; running the same command again verifies them, deletes anything else, skips the
token sequences already written (without running the model on them) and carries on from there.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import sys
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fastsae.cli import add_dataclass_arguments, dataclass_from_args
from fastsae.config import dtype_from_name, dtype_name
from fastsae.data.cache import (
    ALIGN,
    CACHE_DTYPES,
    FORMAT,
    MANIFEST,
    TOKEN_DTYPE,
    VERSION,
    CacheIntegrityError,
    atomic_write,
    column_layout,
    read_manifest,
    sha256_file,
    shard_name,
    validate_manifest,
    write_manifest,
)
from fastsae.data.sources import SEQUENCE, TOKENS, ActivationSource
from fastsae.data.text import BOS_MODES, EMBEDDED, token_batches

__all__ = ["CacheConfig", "main", "run", "write_cache"]

#: The lock file a writer holds in the cache directory.
LOCK = ".fastsae-cache.lock"


@dataclass
class CacheConfig:
    """What to cache: model and hooks, text, token count, dtype and layout."""

    out: str = ""
    """Directory to write (created; an interrupted run in it is resumed)."""
    model: str | None = None
    """TransformerLens model name, or a transformers model directory / hub name; none: the
    embedded demo model."""
    model_kind: Literal["auto", "transformer_lens", "hf"] = "auto"
    """How to load --model: auto picks hf for a local directory, transformer_lens otherwise."""
    hooks: list[str] = field(default_factory=list)
    """Hook names (TransformerLens) or module paths (transformers; 'path:input' for an input);
    none: the embedded model's blocks.1.hook_resid_post."""
    dataset: str | None = None
    """HF dataset: hub name, local .txt/.json/.jsonl/.parquet/.csv file or directory; none: the
    embedded corpus."""
    split: str = "train"
    """Dataset split (the embedded corpus has train and held_out)."""
    text_column: str = "text"
    """Column holding the text (ignored for a pre-tokenized input_ids / tokens column)."""
    streaming: bool = False
    """Stream the dataset instead of preparing it all first."""
    tokens: int = 1_000_000
    """Tokens (rows) to write."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of the activations."""
    context_size: int | None = None
    """Tokens per sequence; none: the model's context size (at most 1024)."""
    bos: Literal["chunk", "document", "none"] = "chunk"
    """chunk: every sequence starts with BOS; document: BOS before each document; none: no BOS."""
    drop_bos: bool = True
    """Leave BOS positions out of the cache."""
    drop_pad: bool = True
    """Leave pad positions out of the cache."""
    batch_size: int = 32
    """Sequences per forward pass."""
    shard_tokens: int = 65536
    """Tokens per shard (the last shard may be smaller)."""
    device: str = "cpu"
    """Device the model runs on."""

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("out is required: the directory to write the cache to")
        for name in ("tokens", "batch_size", "shard_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is unknown; allowed: {', '.join(CACHE_DTYPES)}")
        if self.bos not in BOS_MODES:
            raise ValueError(f"bos={self.bos!r} is unknown; allowed: {', '.join(BOS_MODES)}")
        if self.context_size is not None and self.context_size < 2:
            raise ValueError(f"context_size={self.context_size} must be >= 2")


def _within_sequence_rank(sequence: Tensor) -> Tensor:
    """Rank of each row among the rows of its sequence (rows are grouped by sequence)."""
    n = sequence.numel()
    if n == 0:
        return sequence
    new = torch.ones(n, dtype=torch.bool)
    new[1:] = sequence[1:] != sequence[:-1]
    starts = torch.nonzero(new).squeeze(1)
    group_start = starts[torch.cumsum(new.long(), 0) - 1]
    return torch.arange(n) - group_start


def _write_shard(out: Path, index: int, start: int, data: dict[str, Tensor], columns) -> dict:
    n = data[TOKENS].shape[0]
    offsets, size = column_layout(columns, n)
    name = shard_name(index)
    digest = hashlib.sha256()

    def write(f) -> None:
        for col in columns:
            # a zero-copy uint8 view of the block (bfloat16 has no numpy dtype, uint8 does)
            raw = memoryview(data[col["name"]].contiguous().reshape(-1).view(torch.uint8).numpy())
            for piece in (raw, bytes(-len(raw) % ALIGN)):  # pad each block to ALIGN bytes
                f.write(piece)
                digest.update(piece)

    atomic_write(out / name, write)
    return {
        "file": name,
        "start": start,
        "tokens": n,
        "bytes": size,
        "sha256": digest.hexdigest(),
        "offsets": offsets,
    }


def _start_or_resume(out: Path, identity: dict[str, Any], columns) -> dict[str, Any]:
    if not (out / MANIFEST).exists():
        return {
            "format": FORMAT,
            "version": VERSION,
            **identity,
            "columns": columns,
            "token_count": 0,
            "complete": False,
            "cursor": {"sequence": 0, "skip": 0},
            "shards": [],
        }
    manifest = read_manifest(out)
    validate_manifest(manifest, out, require_complete=False)
    differs = [
        f"{k}: {manifest.get(k)!r} in the cache, {v!r} now"
        for k, v in identity.items()
        if manifest.get(k) != v
    ]
    if differs:
        raise ValueError(
            f"{out} holds a cache of a different run, so it cannot be resumed ("
            + "; ".join(differs)
            + "); write to a new directory"
        )
    for shard in manifest["shards"]:
        file = out / shard["file"]
        if not file.exists() or file.stat().st_size != shard["bytes"]:
            raise CacheIntegrityError(f"cannot resume {out}: shard {shard['file']} is missing")
        if sha256_file(file) != shard["sha256"]:
            raise CacheIntegrityError(f"cannot resume {out}: shard {shard['file']} is corrupt")
    return manifest


@contextmanager
def exclusive_cache_lock(out: Path):
    """Hold ``out/.fastsae-cache.lock`` (an OS file lock, released when the process dies)."""
    from filelock import FileLock, Timeout

    lock = FileLock(out / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ValueError(
            f"activation cache {out} is being written by another process (it holds {out / LOCK}); "
            "wait for it to finish, or write to another directory"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _remove_strays(out: Path, manifest: dict[str, Any]) -> None:
    """Delete temporary files and shards the manifest does not list (they never counted)."""
    listed = {s["file"] for s in manifest["shards"]}
    for path in out.iterdir():
        stray_tmp = path.name.startswith(".shard-") or path.name.startswith(f".{MANIFEST}.tmp")
        unlisted = path.name.startswith("shard-") and path.name not in listed
        if path.is_file() and (stray_tmp or unlisted):
            path.unlink()


def write_cache(
    out: str | Path,
    source: ActivationSource,
    sequences: Iterable[Tensor],
    *,
    tokens: int,
    dtype: str = "float32",
    shard_tokens: int = 65536,
    batch_size: int = 32,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``source`` over ``sequences`` (``LongTensor [context]`` each, in a fixed order) and
    write the first ``tokens`` kept rows to the cache directory ``out``; returns the manifest.

    ``meta`` (for example the dataset name) is recorded in the manifest; resuming requires the
    same ``meta``, model, hooks, dtype, shard size, batch size and token count. If the sequences run out
    first, the cache holds what there was and ``manifest["exhausted"]`` is True.

    The writer holds an exclusive lock on ``out`` (the file ``out/.fastsae-cache.lock``) for the
    whole write: a second writer into the same directory fails at once with a ValueError naming it.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_cache_lock(out):
        return _write_locked(
            out,
            source,
            sequences,
            tokens=tokens,
            dtype=dtype,
            shard_tokens=shard_tokens,
            batch_size=batch_size,
            meta=meta,
            progress=progress,
        )


def _write_locked(
    out: str | Path,
    source: ActivationSource,
    sequences: Iterable[Tensor],
    *,
    tokens: int,
    dtype: str = "float32",
    shard_tokens: int = 65536,
    batch_size: int = 32,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    cache_dtype = dtype_from_name(dtype)
    columns = [
        {"name": h, "dtype": dtype_name(cache_dtype), "d": source.dims[h]} for h in source.hooks
    ]
    columns.append({"name": TOKENS, "dtype": dtype_name(TOKEN_DTYPE), "d": 1})
    identity = {
        "model": source.model_name,
        "hooks": list(source.hooks),
        "d": dict(source.dims),
        "dtype": dtype_name(cache_dtype),
        "shard_tokens": shard_tokens,
        "target_tokens": tokens,
        # part of what must match on resume: the batch a sequence runs in can move the last bits
        "batch_size": batch_size,
        **(meta or {}),
    }
    manifest = _start_or_resume(out, identity, columns)
    _remove_strays(out, manifest)
    if manifest["complete"]:
        return manifest
    names = [c["name"] for c in columns]
    cursor = manifest["cursor"]
    # Restart at the batch that holds the cursor, so that every sequence is run in the same batch
    # as in an uninterrupted run (a different batch could change the last bits of a matmul), and
    # drop the rows that are already on disk.
    seq_index = cursor["sequence"] // batch_size * batch_size
    pending: dict[str, list[Tensor]] = {name: [] for name in [*names, SEQUENCE, "rank"]}
    pending_rows = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tokens, initial=manifest["token_count"], unit="tok", desc=str(out))
    batches = token_batches(itertools.islice(sequences, seq_index, None), batch_size)
    exhausted = True
    for batch in batches:
        chunk = source.activations(batch)
        seq = chunk[SEQUENCE].cpu() + seq_index
        rank = _within_sequence_rank(seq)
        keep = (seq > cursor["sequence"]) | ((seq == cursor["sequence"]) & (rank >= cursor["skip"]))
        keep = keep.to(chunk[TOKENS].device)
        for name in source.hooks:
            pending[name].append(chunk[name][keep].to("cpu", cache_dtype))
        pending[TOKENS].append(chunk[TOKENS][keep].to("cpu", TOKEN_DTYPE))
        pending[SEQUENCE].append(seq[keep.cpu()])
        pending["rank"].append(rank[keep.cpu()])
        pending_rows += int(keep.sum())
        seq_index += batch.shape[0]
        while pending_rows >= min(shard_tokens, tokens - manifest["token_count"]) > 0:
            pending_rows = _flush(out, manifest, pending, columns, shard_tokens, tokens, seq_index)
            if bar is not None:
                bar.update(manifest["shards"][-1]["tokens"])
        if manifest["token_count"] >= tokens:
            exhausted = False
            break
    if exhausted and pending_rows:
        _flush(out, manifest, pending, columns, pending_rows, tokens, seq_index)
    manifest["complete"] = True
    manifest["exhausted"] = exhausted and manifest["token_count"] < tokens
    write_manifest(out, manifest)
    if bar is not None:
        bar.close()
    return manifest


def _flush(out, manifest, pending, columns, shard_tokens, tokens, next_sequence) -> int:
    """Write one shard from the front of ``pending``; returns the rows left pending."""
    merged = {name: torch.cat(parts) for name, parts in pending.items()}
    total = merged[TOKENS].shape[0]
    n = min(shard_tokens, tokens - manifest["token_count"], total)
    data = {c["name"]: merged[c["name"]][:n] for c in columns}
    entry = _write_shard(out, len(manifest["shards"]), manifest["token_count"], data, columns)
    manifest["shards"].append(entry)
    manifest["token_count"] += n
    if n < total:
        manifest["cursor"] = {
            "sequence": int(merged[SEQUENCE][n]),
            "skip": int(merged["rank"][n]),
        }
    else:
        manifest["cursor"] = {"sequence": next_sequence, "skip": 0}
    write_manifest(out, manifest)
    for name, tensor in merged.items():
        pending[name] = [tensor[n:]] if n < total else []
    return total - n


def run(cfg: CacheConfig, *, progress: bool = True) -> dict[str, Any]:
    """Open the model and the text that ``cfg`` names and write the cache."""
    from fastsae.data.models import open_source
    from fastsae.data.text import load_rows, token_sequences

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_cache_lock(out):
        pass  # another writer is reported before the model loads; write_cache takes the lock
    opened = open_source(
        cfg.model,
        cfg.hooks or None,
        kind=cfg.model_kind,
        device=cfg.device,
        drop_bos=cfg.drop_bos,
        drop_pad=cfg.drop_pad,
    )
    context = cfg.context_size or min(opened.context_size, 1024)
    rows = load_rows(cfg.dataset, split=cfg.split, streaming=cfg.streaming)
    sequences = token_sequences(
        rows, opened.tokenizer, context, bos=cfg.bos, text_column=cfg.text_column
    )
    meta = {
        "dataset": cfg.dataset or EMBEDDED,
        "split": cfg.split,
        "context_size": context,
        "bos": cfg.bos,
        "drop_bos": cfg.drop_bos,
        "drop_pad": cfg.drop_pad,
    }
    return write_cache(
        cfg.out,
        opened.source,
        sequences,
        tokens=cfg.tokens,
        dtype=cfg.dtype,
        shard_tokens=cfg.shard_tokens,
        batch_size=cfg.batch_size,
        meta=meta,
        progress=progress,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m fastsae.cache",
        description="Write model activations to a sharded, checksummed, resumable on-disk cache. "
        "With no --model / --dataset it uses the embedded demo model and corpus.",
    )
    add_dataclass_arguments(parser, CacheConfig)
    args = parser.parse_args(argv)
    try:
        cfg = dataclass_from_args(CacheConfig, args)
        manifest = run(cfg)
    except (ValueError, TypeError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    note = " (the dataset ran out)" if manifest.get("exhausted") else ""
    print(
        f"{cfg.out}: {manifest['token_count']} tokens x {len(manifest['hooks'])} hooks, "
        f"{manifest['dtype']}, {len(manifest['shards'])} shards{note}",
        file=sys.stderr,
    )
    return manifest
