"""The on-disk activation cache: its layout and :class:`ActivationCache`, the reader.

Layout of a cache directory::

    DIR/manifest.json        format, model, hooks, d per hook, dtype, token_count, columns,
                             and every complete shard with its sha256
    DIR/shard-00000.bin      the first shard_tokens tokens, then the next ...

A shard is one flat file holding, for its ``n`` tokens, one row-major block per column at the
byte offset the manifest gives (every offset a multiple of 64): ``[n, d]`` for each hook in the
cache dtype, then ``tokens [n]`` int32. There is no header, so any reader can memory-map a block:
``numpy.memmap(path, dtype, "r", offset, (n, d))``, or ``torch.from_file`` for bfloat16.

Only shards listed in the manifest exist as far as a reader is concerned; a shard is listed only
after it was written, fsynced and renamed into place (see :mod:`fastsae.data.writer`).
"""

from __future__ import annotations

import bisect
import json
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fastsae.atomic import atomic_write, sha256_file
from fastsae.config import dtype_from_name, dtype_name
from fastsae.data.sources import TOKENS
from fastsae.jsonfile import read_json_object

__all__ = [
    "CACHE_DTYPES",
    "MANIFEST",
    "ActivationCache",
    "CacheIntegrityError",
    "sha256_file",
    "validate_manifest",
]

MANIFEST = "manifest.json"
FORMAT = "fastsae.activation_cache"
VERSION = 1
#: Activation dtypes a cache may hold.
CACHE_DTYPES = ("float32", "bfloat16", "float16")
TOKEN_DTYPE = torch.int32
#: Byte alignment of every column block inside a shard (a cache line; >= every element size).
ALIGN = 64


class CacheIntegrityError(ValueError):
    """A shard is missing, has the wrong size, or fails its sha256 check."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


def column_layout(columns: Sequence[dict[str, Any]], n: int) -> tuple[dict[str, int], int]:
    """Byte offset of each column of an ``n``-token shard, and the shard's size in bytes."""
    offsets: dict[str, int] = {}
    offset = 0
    for col in columns:
        offsets[col["name"]] = offset
        size = n * col["d"] * dtype_from_name_any(col["dtype"]).itemsize
        offset += -(-size // ALIGN) * ALIGN
    return offsets, offset


def dtype_from_name_any(name: str) -> torch.dtype:
    return TOKEN_DTYPE if name == dtype_name(TOKEN_DTYPE) else dtype_from_name(name)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=1).encode()
    atomic_write(directory / MANIFEST, lambda f: f.write(text))


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of the cache in ``directory``: format and version checked, nothing else
    (see :func:`validate_manifest`)."""
    path = directory / MANIFEST
    if not path.exists():
        raise ValueError(f"{directory} is not an activation cache: no {MANIFEST}")
    manifest = read_json_object(path)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format={manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise ValueError(
            f"{path}: version={manifest.get('version')!r}, this fastsae reads {VERSION}"
        )
    return manifest


def _field(manifest: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = manifest.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = (
            kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        )
        raise ValueError(f"{where}: {name!r} must be a {expected}, got {value!r}")
    return value


def validate_manifest(
    manifest: dict[str, Any], directory: Path, *, require_complete: bool = True
) -> None:
    """Check that the manifest is self-consistent and describes shards this reader can map: the
    hooks, widths and dtype agree with the column list; every shard is ``shard-NNNNN.bin`` in order,
    starts where the previous one ended, and has the byte size and column offsets that its token
    count implies; ``token_count`` is the sum of the shards. No shard is opened.

    Raises:
        ValueError: naming the manifest and the first field that is wrong; with
            ``require_complete``, also a cache whose writer has not finished (``complete: false``).
    """
    where = str(directory / MANIFEST)
    if require_complete and manifest.get("complete") is not True:
        raise ValueError(
            f"{where}: the cache is incomplete (complete={manifest.get('complete')!r}): its writer "
            "was interrupted or is still running; rerun the same `python -m fastsae.cache` "
            "command to finish it"
        )
    hooks = _field(manifest, "hooks", list, where)
    d = _field(manifest, "d", dict, where)
    dtype = _field(manifest, "dtype", str, where)
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"{where}: dtype={dtype!r} is unknown; allowed: {', '.join(CACHE_DTYPES)}")
    if not hooks or not all(isinstance(h, str) for h in hooks) or len(set(hooks)) != len(hooks):
        raise ValueError(f"{where}: 'hooks' must be a non-empty list of distinct names")
    for hook in hooks:
        width = d.get(hook)
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"{where}: d[{hook!r}]={width!r} must be a positive integer")
    expected_columns = [{"name": h, "dtype": dtype, "d": d[h]} for h in hooks]
    expected_columns.append({"name": TOKENS, "dtype": dtype_name(TOKEN_DTYPE), "d": 1})
    columns = _field(manifest, "columns", list, where)
    if columns != expected_columns:
        raise ValueError(
            f"{where}: 'columns' {columns!r} do not match hooks, d and dtype "
            f"(expected {expected_columns!r})"
        )
    shards = _field(manifest, "shards", list, where)
    token_count = _field(manifest, "token_count", int, where)
    start = 0
    for i, shard in enumerate(shards):
        here = f"{where}: shard {i}"
        if not isinstance(shard, dict):
            raise ValueError(f"{here} must be an object, got {shard!r}")
        if shard.get("file") != shard_name(i):
            raise ValueError(f"{here}: file={shard.get('file')!r}, expected {shard_name(i)!r}")
        n = _field(shard, "tokens", int, here)
        first = _field(shard, "start", int, here)
        if n < 1 or first != start:
            raise ValueError(
                f"{here}: start={first} tokens={n}; expected start={start}, tokens >= 1"
            )
        offsets, size = column_layout(columns, n)
        if shard.get("bytes") != size or shard.get("offsets") != offsets:
            raise ValueError(
                f"{here}: bytes={shard.get('bytes')!r} offsets={shard.get('offsets')!r} do not "
                f"match {n} tokens of these columns (expected bytes={size}, offsets={offsets})"
            )
        digest = shard.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"{here}: sha256={digest!r} is not a sha256 hex digest")
        start += n
    if token_count != start:
        raise ValueError(f"{where}: token_count={token_count}, but the shards hold {start} tokens")


class ActivationCache:
    """Read an activation cache directory written by ``python -m fastsae.cache``.

    ``len(cache)`` is the token count; ``cache.read(hook, start, stop)`` returns the activations of
    tokens ``[start, stop)`` as a new ``Tensor [stop - start, d]`` in the cache dtype; reading
    ``"tokens"`` gives their token ids (int32). Shards are memory-mapped, so a read touches only
    the bytes it returns.

    Opening checks the manifest against itself and the shard sizes (:func:`validate_manifest`;
    no shard is read). ``verify``: ``"lazy"`` (default) checks each shard's sha256 the first time
    it is read; ``"open"`` checks every shard now (in parallel threads); ``"none"`` checks only
    sizes. A missing, truncated or corrupt shard raises :class:`CacheIntegrityError` naming the
    shard. A cache whose writer has not finished (``complete: false``) is refused unless
    ``allow_incomplete``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        verify: Literal["lazy", "open", "none"] = "lazy",
        allow_incomplete: bool = False,
    ):
        if verify not in ("lazy", "open", "none"):
            raise ValueError(f"verify={verify!r} is unknown; allowed: lazy, open, none")
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        validate_manifest(self.manifest, self.path, require_complete=not allow_incomplete)
        self.hooks: tuple[str, ...] = tuple(self.manifest["hooks"])
        self.d: dict[str, int] = dict(self.manifest["d"])
        self.dtype = dtype_from_name(self.manifest["dtype"])
        self.columns = {c["name"]: c for c in self.manifest["columns"]}
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        self._starts = [s["start"] for s in self.shards]
        self._maps: dict[int, Tensor] = {}
        self._verified: set[int] = set()
        self._lock = threading.Lock()
        self._verify = verify
        for i, shard in enumerate(self.shards):
            self._check_size(i, shard)
        if verify == "open":
            self.verify()

    def __len__(self) -> int:
        return int(self.manifest["token_count"])

    def __repr__(self) -> str:
        return (
            f"ActivationCache({str(self.path)!r}, hooks={list(self.hooks)}, tokens={len(self)}, "
            f"dtype={dtype_name(self.dtype)}, shards={len(self.shards)})"
        )

    @property
    def dims(self) -> dict[str, int]:
        """Width of every column: the hooks, and ``tokens`` (width 1, stored flat)."""
        return {name: col["d"] for name, col in self.columns.items()}

    # -- integrity -----------------------------------------------------------------------------

    def _file(self, i: int) -> Path:
        return self.path / self.shards[i]["file"]

    def _check_size(self, i: int, shard: dict[str, Any]) -> None:
        file = self._file(i)
        if not file.exists():
            raise CacheIntegrityError(f"activation cache {self.path}: shard {file.name} is missing")
        size = file.stat().st_size
        if size != shard["bytes"]:
            raise CacheIntegrityError(
                f"activation cache {self.path}: shard {file.name} has {size} bytes, the manifest "
                f"says {shard['bytes']} (truncated or overwritten)"
            )

    def _check_sha(self, i: int) -> None:
        if i in self._verified:
            return
        file = self._file(i)
        if not file.exists():
            raise CacheIntegrityError(f"activation cache {self.path}: shard {file.name} is missing")
        actual = sha256_file(file)
        if actual != self.shards[i]["sha256"]:
            raise CacheIntegrityError(
                f"activation cache {self.path}: shard {file.name} is corrupt (sha256 "
                f"{actual[:12]}..., the manifest says {self.shards[i]['sha256'][:12]}...)"
            )
        self._verified.add(i)

    def verify(self) -> None:
        """Check the sha256 of every shard now, several shards at a time (hashlib releases the
        GIL), and report the first bad shard in shard order."""
        workers = max(1, min(8, os.cpu_count() or 1, len(self.shards)))
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(self._check_sha, range(len(self.shards))):
                pass

    # -- reading -------------------------------------------------------------------------------

    def _map(self, i: int) -> Tensor:
        """The whole shard as a read-only-by-contract, copy-on-write uint8 memory map."""
        with self._lock:
            if i not in self._maps:
                if self._verify != "none":
                    self._check_sha(i)
                else:
                    self._check_size(i, self.shards[i])
                self._maps[i] = torch.from_file(
                    str(self._file(i)),
                    shared=False,
                    size=self.shards[i]["bytes"],
                    dtype=torch.uint8,
                )
            return self._maps[i]

    def _column(self, name: str) -> dict[str, Any]:
        if name not in self.columns:
            raise KeyError(f"{name!r} is not in this cache; columns: {', '.join(self.columns)}")
        return self.columns[name]

    def shard_view(self, i: int, name: str) -> Tensor:
        """Column ``name`` of shard ``i`` as a memory-mapped view ``[n, d]`` (``[n]`` for tokens).
        Do not write to it."""
        col = self._column(name)
        shard = self.shards[i]
        n, dtype = shard["tokens"], dtype_from_name_any(col["dtype"])
        start = shard["offsets"][name]
        raw = self._map(i)[start : start + n * col["d"] * dtype.itemsize]
        view = raw.view(dtype)
        return view if name == TOKENS else view.view(n, col["d"])

    def read(self, hook: str, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of column ``hook`` as a new tensor ``[stop - start, d]``."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"read [{start}, {stop}) is outside the cache's [0, {len(self)})")
        col = self._column(hook)
        shape = (stop - start,) if hook == TOKENS else (stop - start, col["d"])
        out = torch.empty(shape, dtype=dtype_from_name_any(col["dtype"]))
        pos = start
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while pos < stop:
            shard = self.shards[i]
            lo = pos - shard["start"]
            hi = min(stop - shard["start"], shard["tokens"])
            out[pos - start : pos - start + hi - lo] = self.shard_view(i, hook)[lo:hi]
            pos += hi - lo
            i += 1
        return out

    def chunks(
        self, columns: Sequence[str] | None = None, *, start: int = 0, stop: int | None = None
    ) -> Iterator[dict[str, Tensor]]:
        """Shard by shard, ``{column: view}`` for ``[start, stop)`` in order: a source for
        :class:`fastsae.data.ActivationShuffler`. ``columns`` defaults to every hook and tokens."""
        names = list(columns) if columns is not None else [*self.hooks, TOKENS]
        for name in names:
            self._column(name)
        stop = len(self) if stop is None else stop
        for i, shard in enumerate(self.shards):
            lo = max(start, shard["start"]) - shard["start"]
            hi = min(stop, shard["start"] + shard["tokens"]) - shard["start"]
            if hi > lo:
                yield {name: self.shard_view(i, name)[lo:hi] for name in names}
