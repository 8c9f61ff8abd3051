"""Folders this tool writes, and the rule that protects every other folder.

A run folder or an export carries a marker file (`MARKER`) from the moment it is created. Only a folder
with the marker (or a run folder written before markers existed: `config.yaml` plus nothing but the
names a run writes) may be replaced by `--overwrite`; any other non-empty folder is refused with what it
holds. A replaced folder is first moved aside (a sibling `.NAME.replaced-PID`, one rename on the same
file system) and deleted only once the new work has succeeded (`Replacement.commit`); a failure puts it
back (`Replacement.abort`). Folders created on the way (`--output a/b/c/run`) are removed again when
the new work fails; a folder the user made beforehand, empty, is kept.

A folder in use. A process that trains, resumes or exports holds an OS-level lock on the folders it
writes (`hold`): fcntl.flock on a sibling file `.NAME.lock`, beside the folder rather than in it, so that
moving the folder aside (a replacement) does not move the lock with it. Any other process that would
write or replace the folder is refused, with the holder's pid and command. The OS drops the lock when
the holder exits, however it exits: a SIGKILL leaves a lock file behind, never a held lock.

Light at import: standard library only.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import UserError

MARKER = ".lowvram_ft"
# What a run folder holds (pipeline, checkpoint, evaluate, export): a folder of only these names and a
# config.yaml is a run folder written before markers existed.
RUN_ENTRIES = {"config.yaml", "metrics.jsonl", "summary.json", "adapter", "checkpoints", "eval.json", "eval.md",
               "eval.png", "eval_samples.jsonl", "smoke", "export", "tracking", MARKER}


class FolderError(UserError, RuntimeError):
    """A folder that must not be written or replaced; the message says what it holds and what to do."""


class FolderInUse(FolderError):
    """Another process holds the folder's lock (it is training, resuming or exporting there)."""


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


# --------------------------------------------------------------------------- a folder in use


@dataclass
class FolderLock:
    """This process's hold on a folder (see `hold`); `release()` lets it go (also done by the OS at exit)."""

    folder: Path
    path: Path  # the lock file
    fd: int | None = None
    made: list[Path] = field(default_factory=list)  # parent folders created for the lock file
    holds: int = 1  # hold() calls of this process on the folder not yet released

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        self.holds -= 1
        if self.holds > 0 or self.fd is None:
            return
        _HELD.pop(self.path, None)
        # Unlinked while still locked: a process that opened the old file finds, once it gets the lock,
        # that the name no longer leads to it, and starts again (hold's inode check).
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None
        remove_made(self.made)


_HELD: dict[Path, FolderLock] = {}


def lock_file(folder: Path) -> Path:
    """`.NAME.lock` beside the folder, named after its absolute path (symbolic links resolved)."""
    folder = Path(folder).resolve()
    return folder.with_name(f".{folder.name}.lock")


def hold(folder: Path, doing: str) -> FolderLock:
    """Lock `folder` for this process (`doing`: 'training', 'exporting', ...), or FolderInUse naming the
    process that holds it. Held until release() or the end of the process; a second hold of the same
    folder by the same process is counted, not refused."""
    path = lock_file(folder)
    if path in _HELD:
        _HELD[path].holds += 1
        return _HELD[path]
    made = make_dirs(path.parent)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            remove_made(made)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise FolderInUse(f"{folder}: in use by {holder(path)} — wait until it ends, or choose another "
                              "folder (it is never written by two processes at once)") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder let it go and removed the file between our open and our lock: again
    command = "python -m lowvram_ft " + shlex.join(sys.argv[1:])
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "doing": doing, "command": command}).encode() + b"\n")
    lock = FolderLock(Path(folder), path, fd, made)
    _HELD[path] = lock
    return lock


def holder(path: Path) -> str:
    """'process 1234 (training: python -m lowvram_ft train ...)' from a lock file, as far as it says."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return "another process"
    what = "; ".join(str(info[key]) for key in ("doing", "command") if info.get(key))
    return f"process {info['pid']}" + (f" ({what})" if what else "")


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


# --------------------------------------------------------------------------- the cache of built things


def cache_root() -> Path:
    """Where lowvram_ft keeps what it builds once (embedded and packaged models, tokenized data, bench
    models): $LOWVRAM_FT_CACHE, else ~/.cache/lowvram_ft."""
    return Path(os.environ.get("LOWVRAM_FT_CACHE") or Path.home() / ".cache" / "lowvram_ft")


def build_staged(target: Path, build: Callable[[Path], None], prefix: str) -> Path:
    """`build(folder)` into a temporary sibling of `target`, renamed to `target` when complete: a failed
    or killed build leaves no `target`; when another process finished the same build first, theirs is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
