"""The run directory (``--out-dir``): checked and locked before anything loads, its metrics log kept
to one line per step.

- :func:`locked_run_directory` creates the directory and takes an exclusive lock on it
  (``OUT/.fastsae.lock``, the ``filelock`` package, no waiting): a second run into the same
  directory is refused at once instead of interleaving checkpoints and ``metrics.jsonl``. A path
  that is a file, lies under a file or cannot be written is one clear error.
- :func:`truncate_metrics` keeps the lines of ``metrics.jsonl`` up to a step: after ``--resume``
  the steps past the checkpoint are replayed, and a fresh start drops a killed run's lines.
- :func:`write_errors` turns an ``OSError`` while writing (a full disk above all) into one message
  that names what was being written and the last good checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["LOCK", "RunWriteError", "locked_run_directory", "truncate_metrics", "write_errors"]

#: The lock file inside the run directory; held for the whole run.
LOCK = ".fastsae.lock"


class RunWriteError(OSError):
    """Writing a run's files failed (full disk, permissions); the message says what and where."""


def _reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device (the disk is full)"
    return e.strerror or str(e)


@contextmanager
def locked_run_directory(path: str | Path) -> Iterator[Path]:
    """Create ``path`` if needed and hold its lock for the ``with`` block.

    Raises ``ValueError`` naming the directory when it is a file, lies under a file, cannot be
    written, or is locked by another run. A directory this call created is removed again on the
    way out if nothing but the lock file was written into it (a run refused before its first file).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out_dir={str(path)!r} is a file, not a directory")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # writable? (root ignores permission bits)
            pass
    except OSError as e:
        raise ValueError(
            f"out_dir={str(path)!r} cannot be created or written: {_reason(e)}"
        ) from None
    lock = FileLock(str(path / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ValueError(
            f"out_dir={str(path)!r} is in use by another run (it holds {path / LOCK}); wait for "
            "that run to end, or choose another --out-dir"
        ) from None
    except OSError as e:
        raise ValueError(f"out_dir={str(path)!r}: cannot take its lock: {_reason(e)}") from None
    try:
        yield path
    finally:
        lock.release()
        if created and [p.name for p in path.iterdir()] in ([], [LOCK]):
            (path / LOCK).unlink(missing_ok=True)
            path.rmdir()


def truncate_metrics(path: str | Path, through_step: int) -> None:
    """Keep the lines of ``metrics.jsonl`` whose ``step`` is ``<= through_step`` (0: none).

    A line cut short by a kill is dropped. The file is replaced atomically.
    """
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (
            isinstance(row, dict)
            and isinstance(row.get("step"), int)
            and row["step"] <= through_step
        ):
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


@contextmanager
def write_errors(what: str, last_good) -> Iterator[None]:
    """Re-raise an ``OSError`` inside the block as :class:`RunWriteError` naming ``what`` and
    ``last_good()`` (the newest checkpoint, evaluated only on failure)."""
    try:
        yield
    except RunWriteError:
        raise
    except OSError as e:
        kept = last_good()
        raise RunWriteError(
            f"writing {what} failed: {_reason(e)}; the last good checkpoint is "
            f"{kept or 'none (none written yet)'}"
        ) from None
