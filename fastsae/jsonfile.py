"""Reading the small JSON files fastsae keeps beside tensors (``cfg.json``, manifests, checkpoint
metadata) with one clear error for every way they can be wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["MAX_JSON_BYTES", "read_json_object"]

#: A config or manifest is kilobytes (a cache manifest lists ~200 bytes per shard); a file far
#: larger than this is not one of ours, and parsing it would only use memory.
MAX_JSON_BYTES = 64 * 2**20


def read_json_object(path: str | Path, *, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        error (ValueError by default): the file is missing, larger than :data:`MAX_JSON_BYTES`,
            not valid JSON, nested too deeply for Python's parser, or not a JSON object.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise error(f"{path} cannot be read: {e.strerror}") from None
    if size > MAX_JSON_BYTES:
        raise error(f"{path} is {size} bytes; a fastsae JSON file is at most {MAX_JSON_BYTES}")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON (truncated or corrupt): {e}") from None
    except RecursionError:
        raise error(f"{path} is nested too deeply to be a fastsae JSON file") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
