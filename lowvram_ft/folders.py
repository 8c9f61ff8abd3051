"""Folders this tool writes, and the rule that protects every other folder.

A run folder or an export carries a marker file (`MARKER`) from the moment it is created. Only a folder
with the marker (or a run folder written before markers existed: `config.yaml` plus nothing but the
names a run writes) may be replaced by `--overwrite`; any other non-empty folder is refused with what it
holds. A replaced folder is first moved aside (a sibling `.NAME.replaced-PID`, one rename on the same
file system) and deleted only once the new work has succeeded (`Replacement.commit`); a failure puts it
back (`Replacement.abort`). Folders created on the way (`--output a/b/c/run`) are removed again when
the new work fails; a folder the user made beforehand, empty, is kept.

Light at import: standard library only.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

MARKER = ".lowvram_ft"
# What a run folder holds (pipeline, checkpoint, evaluate, export): a folder of only these names and a
# config.yaml is a run folder written before markers existed.
RUN_ENTRIES = {"config.yaml", "metrics.jsonl", "summary.json", "adapter", "checkpoints", "eval.json", "eval.md",
               "eval.png", "eval_samples.jsonl", "smoke", "export", "tracking", MARKER}


class FolderError(UserError, RuntimeError):
    """A folder that must not be written or replaced; the message says what it holds and what to do."""


def mark(folder: Path, kind: str) -> None:
    """Make `folder` recognisably ours ('run' or 'export')."""
    (Path(folder) / MARKER).write_text(json.dumps({"tool": "lowvram_ft", "kind": kind}) + "\n", encoding="utf-8")


def kind_of(folder: Path) -> str | None:
    """'run' / 'export' for a folder this tool wrote, else None."""
    folder = Path(folder)
    try:
        value = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        return value.get("kind") if isinstance(value, dict) and value.get("tool") == "lowvram_ft" else None
    except (OSError, ValueError):
        pass
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return None
    return "run" if "config.yaml" in names and names <= RUN_ENTRIES else None


def is_empty(folder: Path) -> bool:
    return Path(folder).is_dir() and not any(Path(folder).iterdir())


def describe_contents(folder: Path, shown: int = 4) -> str:
    """'3 entries: notes/, thesis.txt, x.csv' — what a refused folder holds."""
    entries = sorted(Path(folder).iterdir(), key=lambda p: p.name)
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:shown]]
    more = f", … ({len(entries) - shown} more)" if len(entries) > shown else ""
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: {', '.join(names)}{more}"


def refuse_foreign(folder: Path, what: str, option: str) -> None:
    """FolderError unless `folder` is absent, empty or ours."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"{folder}: is a file — pass a folder to {option}")
    if folder.is_dir() and not is_empty(folder) and kind_of(folder) is None:
        raise FolderError(f"{folder}: holds files lowvram_ft did not write ({describe_contents(folder)}) — "
                          f"it is never replaced; choose another {option} for the {what}")


def make_dirs(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first), for `remove_made`."""
    folder = Path(folder)
    missing = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        missing.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def remove_made(made: list[Path]) -> None:
    """Remove folders `make_dirs` created, innermost first, each only if nothing else is in it now."""
    for folder in reversed(made):
        if not folder.exists():
            continue
        try:
            folder.rmdir()
        except OSError:
            return


def empty_folder(folder: Path) -> None:
    """Delete what is inside `folder` (ours), keeping the folder itself."""
    for entry in Path(folder).iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


@dataclass
class Replacement:
    """New work written into `target`, which may hold an earlier folder of ours (moved aside meanwhile).

    `begin()` moves the old folder aside (when there is one) and creates `target` with its marker;
    `commit()` deletes the old folder; `abort()` removes the new work and restores the old folder, or
    the empty folder the user made, and removes the parents it created."""

    target: Path
    kind: str
    aside: Path | None = None
    made: list[Path] = field(default_factory=list)
    existed_empty: bool = False

    def begin(self) -> Path:
        target = Path(self.target)
        if target.is_dir() and not is_empty(target):
            self.aside = target.with_name(f".{target.name}.replaced-{os.getpid()}")
            target.rename(self.aside)
        self.existed_empty = target.is_dir()
        self.made = make_dirs(target)
        mark(target, self.kind)
        return target

    def commit(self) -> None:
        """The new work stands: the old folder goes (idempotent)."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def abort(self) -> None:
        """The new work failed: remove it and put back what was there."""
        target = Path(self.target)
        if target.is_dir() and kind_of(target) == self.kind:
            if self.existed_empty:
                empty_folder(target)
            else:
                shutil.rmtree(target, ignore_errors=True)
        if self.aside is not None and self.aside.is_dir() and not target.exists():
            self.aside.rename(target)
            self.aside = None
        if not target.exists():
            remove_made(self.made)


def swap_into(new: Path, target: Path) -> None:
    """Move the finished folder `new` to `target`, replacing an earlier folder of ours there only now."""
    target = Path(target)
    aside = target.with_name(f".{target.name}.replaced-{os.getpid()}") if target.exists() else None
    if aside is not None:
        target.rename(aside)
    try:
        Path(new).rename(target)
    except OSError:
        if aside is not None:
            aside.rename(target)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def leftover_aside(target: Path) -> list[Path]:
    """Earlier folders moved aside by a replacement that was killed before it finished."""
    target = Path(target)
    return sorted(target.parent.glob(f".{target.name}.replaced-*")) if target.parent.is_dir() else []
