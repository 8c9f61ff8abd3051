"""The one atomic file writer, and the JSON / JSONL / GiB conventions built on it.

A file is written to a unique temporary sibling and renamed over its target (one `os.replace`, atomic
on POSIX), so a reader or a killed process never sees half a file, and a failed write leaves the old
file as it was and no temporary behind. Standard library only.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

GIB = 2**30


def write_atomic(path: str | Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write `data` (text as UTF-8) to `path` atomically, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, mode)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


def gib(n_bytes: float, digits: int = 3) -> float:
    return round(n_bytes / GIB, digits)
