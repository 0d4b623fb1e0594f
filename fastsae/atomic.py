"""Atomic writes: whole directories and single files, with the usual permissions, and the cleanup
of temporaries that a killed writer left behind.

A write goes to a hidden temporary sibling first (``.NAME.tmp-p<pid>-<random>``), is fsynced, and
is renamed into place in one step, so a reader sees either the old or the new content. The
temporary carries the writer's process id, so a later writer can tell a temporary that a live
process is still filling from one left by a process that died (``kill -9``, a power cut):
:func:`remove_stale_temporaries` deletes only the latter.

``mkdtemp`` / ``mkstemp`` create 0700 / 0600 entries; before the rename they get the mode that
``mkdir`` / ``open`` would have given under the process umask (0755 / 0644 under umask 0022), as
other tools do.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_directory",
    "atomic_write",
    "current_umask",
    "remove_stale_temporaries",
    "sha256_file",
]

CFG = "cfg.json"
# ".NAME.tmp-p<pid>-<random>" (this module) or ".NAME.tmp-<random>" (older fastsae, no pid).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?:p(?P<pid>\d+)-)?[a-z0-9_]+$")


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``);
    elsewhere by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in ``block``-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _temporary_prefix(name: str) -> str:
    return f".{name}.tmp-p{os.getpid()}-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    with contextlib.suppress(OSError):
        # "pid (comm) S ...": a killed child that was not reaped yet is a zombie ("Z"): dead.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def remove_stale_temporaries(
    directory: str | Path, *, name: str | re.Pattern[str] | None = None
) -> list[Path]:
    """Delete the temporaries of killed atomic writes inside ``directory``; returns what it removed.

    A temporary is stale when the process named in it is gone (or when it is an older fastsae's
    temporary, which names no process). ``name``: only temporaries of that target (``.NAME.tmp-*``),
    or of targets that a compiled pattern fully matches. Temporaries of live writers are left alone. The process test is per machine: on a file system
    shared between machines, hold a run lock so that no other machine writes here.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match is None or not _target_matches(match["name"], name):
            continue
        pid = match["pid"]
        if pid is not None and _process_alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _target_matches(target: str, name: str | re.Pattern[str] | None) -> bool:
    if name is None:
        return True
    if isinstance(name, re.Pattern):
        return name.fullmatch(target) is not None
    return target == name


def atomic_directory(path: str | Path, writers: dict[str, Callable[[Path], None]]) -> Path:
    """Write the files of ``writers`` (name -> ``fn(file_path)``) into directory ``path`` atomically.

    Every file is written and fsynced in a temporary sibling directory first. A new directory is
    then renamed into place in one step; an existing one has its files replaced one by one with
    ``os.replace``, ``cfg.json`` last, so a reader never sees a half-written file. If anything
    fails, the temporary directory is removed and ``path`` is left as it was. Stale temporaries of
    earlier, killed writes to ``path`` are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    remove_stale_temporaries(path.parent, name=path.name)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path.name), dir=path.parent))
    try:
        umask = current_umask()
        os.chmod(tmp, 0o777 & ~umask)
        for name, write in writers.items():
            target = tmp / name
            write(target)
            os.chmod(target, 0o666 & ~umask)
            with open(target, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if not path.exists():
            os.rename(tmp, path)
        else:
            for name in sorted(writers, key=lambda n: n == CFG):
                os.replace(tmp / name, path / name)
            shutil.rmtree(tmp)
        _fsync_dir(path.parent)
        _fsync_dir(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Write file ``path`` through ``write(binary_file)`` into a temporary sibling, fsync it, give it
    the umask's file mode, rename it into place and fsync the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path.name), dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
