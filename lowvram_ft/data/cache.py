"""The tokenized-data cache under data.cache_dir.

Keyed by the content of the rows being tokenized (so a changed file, Hub revision, column mapping, mix
or split all change it), the tokenizer (vocabulary, merges, added tokens, chat template), the render
settings (train_on, reasoning_effort, date, max_seq_length, overlength, on_invalid) and the source of
this package, conversation.py and harmony.py. An entry is written under a temporary name and renamed: a reader never
sees half an entry.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .. import folders
from ..config import Config

CACHE_FORMAT = "1"  # bump when the cached layout changes
_VOCABULARY_HASHES: dict[int, tuple[Any, str]] = {}  # id -> (tokenizer kept alive so the id stays its own, hash)


def cache_root(cfg: Config) -> Path:
    """data.cache_dir, else $LOWVRAM_FT_CACHE/data, else ~/.cache/lowvram_ft/data."""
    if cfg.data.cache_dir:
        return Path(os.path.expanduser(cfg.data.cache_dir))
    return folders.cache_root() / "data"


def cache_key(records: list[str], tokenizer, settings: dict) -> str:
    """Changes with the rows' content, the tokenizer, the render settings and the rendering code."""
    import tokenizers

    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT, settings, tokenizers.__version__], sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for module in rendering_code():
        h.update(module.read_bytes())
    for record in records:
        h.update(record.encode())
        h.update(b"\n")
    return h.hexdigest()[:24]


def rendering_code() -> list[Path]:
    """The source files whose change may change a tokenized row: this package, conversation.py, harmony.py."""
    package = Path(__file__).parent
    return sorted(package.glob("*.py")) + [package.parent / "conversation.py", package.parent / "harmony.py"]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and merges (or the vocabulary), added and special tokens, chat template."""
    h = hashlib.sha256(vocabulary_hash(tokenizer).encode())
    h.update(json.dumps([len(tokenizer), tokenizer.get_added_vocab(), tokenizer.special_tokens_map],
                        sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    return h.hexdigest()


def vocabulary_hash(tokenizer) -> str:
    """The expensive part of the fingerprint (o200k_harmony's model serialises to ~30 MB), once per object."""
    known = _VOCABULARY_HASHES.get(id(tokenizer))
    if known is not None and known[0] is tokenizer:
        return known[1]
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    if len(_VOCABULARY_HASHES) >= 4:
        _VOCABULARY_HASHES.clear()
    _VOCABULARY_HASHES[id(tokenizer)] = (tokenizer, h.hexdigest())
    return h.hexdigest()


def read_cache(path: Path):
    """(dataset, stats, kept) from a finished cache entry, or None."""
    if not (path / "meta.json").is_file():
        return None
    import datasets

    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        return datasets.load_from_disk(str(path / "dataset")), meta["stats"], meta["kept"]
    except (OSError, ValueError, KeyError):
        return None  # damaged entry: tokenize again (and overwrite it)


def write_cache(path: Path, dataset, stats: dict, kept: list[int]):
    """Save under a temporary name, then rename: a reader never sees half an entry. Returns the dataset
    (memory-mapped from the cache when written) and whether it was written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    except OSError:
        return dataset, False  # read-only cache location: train from memory
    try:
        with progress_bars(len(dataset) >= 20_000):
            dataset.save_to_disk(str(staging / "dataset"))
        (staging / "meta.json").write_text(json.dumps({"stats": stats, "kept": kept}), encoding="utf-8")
        shutil.rmtree(path, ignore_errors=True)  # a damaged entry of the same key
        os.replace(staging, path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (path / "meta.json").is_file():
            return dataset, False
    cached = read_cache(path)
    return (cached[0], True) if cached else (dataset, False)


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """datasets' progress bars on or off for a block, restored after."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.disable_progress_bars if was_disabled else datasets.enable_progress_bars)()
