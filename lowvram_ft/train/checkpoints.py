"""Checkpoints: what a complete one is, finding them, resuming from one, marking and rotating them.

What a checkpoint is. The Trainer's own `checkpoint-N` folder (adapter or weights, optimizer, scheduler,
RNG states, trainer_state.json with the step, the epoch and the trained tokens, which with the seeded
sampler fix the data position), written by the Trainer through its public API, plus our mark of
completion, `lowvram_ft_state.json`: the size and sha256 of every file. The mark is written last, by a
callback on save (`make_run_callback`), after every process has written its part and the files are
synced; a checkpoint without it (a kill mid-write) is incomplete and never resumed from, and a stale
mark is removed before the Trainer writes a checkpoint of the same step again. We rotate checkpoints
ourselves, among complete ones only.

What a resume may change. `--resume` continues with the run's saved config.yaml. Keys that cannot change
the trained weights may differ (RESUMABLE_KEYS: evaluation, output, logging and checkpoint cadence,
tokenization workers and cache, activation checkpointing and embedding offload), and so may
train.batch_size with train.gradient_accumulation_steps when their product (the effective batch) stays
the same, so that a run that ran out of memory can continue with smaller micro-batches. Every other
change is refused with the list of changed keys. Logged losses of a resumed run equal the uninterrupted
run's when train.logging_steps divides the checkpoint's step (always with logging_steps=1): the Trainer
does not save the loss accumulated since the last log, so the first log after a resume averages only
the steps run since the checkpoint.

Light at import (config + standard library): the command line imports it for `--resume`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, diff, load_config, to_dict
from ..errors import UserError
from ..io import write_jsonl

CHECKPOINTS = "checkpoints"  # the run folder's subfolder holding checkpoint-N folders
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "lowvram_ft_state.json"
# A checkpoint is complete when it has these, one RNG file per process (rng_state_files) and one of WEIGHT_FILES.
REQUIRED_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
RESUMABLE_KEYS = ("eval.", "output.", "train.fit", "train.logging_steps", "train.save_steps", "train.keep_checkpoints",
                  "data.num_proc", "data.cache_dir", "model.gradient_checkpointing", "model.offload_embedding")


class ResumeError(UserError, RuntimeError):
    """A run that cannot be resumed as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    skipped: tuple[str, ...] = ()  # newer checkpoints passed over as damaged, with why (resume_point)


# --------------------------------------------------------------------------- finding checkpoints


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: Path) -> tuple[list[Checkpoint], list[Path]]:
    """(complete checkpoints oldest first, incomplete checkpoint folders). Staging folders are neither."""
    folder = checkpoint_dir(run_dir)
    complete, broken = [], []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if not match or not path.is_dir():
            continue
        step = int(match.group(1))
        (complete.append(Checkpoint(path, step)) if is_complete(path, step) else broken.append(path))
    return sorted(complete, key=lambda c: c.step), broken


def is_complete(path: Path, step: int) -> bool:
    """Marked complete (STATE_FILE), every file a resume needs is there with the size recorded when it
    was written, and trainer_state.json names this step."""
    if not (path / STATE_FILE).is_file():
        return False
    if not all((path / name).is_file() for name in REQUIRED_FILES + rng_state_files(path)):
        return False
    if size_problem(path) is not None:
        return False
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == step


def rng_state_files(path: Path) -> tuple[str, ...]:
    """One RNG file per training process: rng_state.pth, or rng_state_0..N-1.pth for a checkpoint of N
    processes (accelerate launch / torchrun; N is recorded in lowvram_ft_state.json)."""
    processes = saved_state(path).get("processes", 1)
    if not isinstance(processes, int) or processes <= 1:
        return ("rng_state.pth",)
    return tuple(f"rng_state_{rank}.pth" for rank in range(processes))


def file_manifest(folder: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file in a checkpoint but our state file."""
    manifest = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        manifest[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return manifest


def recorded_files(path: Path) -> dict[str, dict]:
    """The file manifest saved with a checkpoint ({} for one written before manifests, or unreadable)."""
    files = saved_state(path).get("files")
    if not isinstance(files, dict):
        return {}
    return {name: entry for name, entry in files.items() if isinstance(entry, dict)}


def size_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint's files by their recorded sizes (cheap), or None."""
    for name, entry in recorded_files(path).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry.get("bytes"):
            return f"{name} has {file.stat().st_size:,} bytes, {entry.get('bytes')} were written"
    return None


def checksum_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint's files by their recorded sha256 (reads every byte), or None."""
    recorded = recorded_files(path)
    if not recorded:
        return None
    now = file_manifest(path)
    for name, entry in recorded.items():
        if now.get(name, {}).get("sha256") != entry.get("sha256"):
            return f"{name} does not match its checksum"
    return size_problem(path)


def checkpoint_bytes(path: Path) -> int:
    """The size of a checkpoint on disk: all its files."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    complete, _ = list_checkpoints(run_dir)
    return complete[-1] if complete else None


def describe_unfinished(run_dir: Path) -> str:
    """What an unfinished run folder holds, for the message that refuses to reuse it."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return "holds an unfinished run with no complete checkpoint — pass --overwrite to replace it, or choose another --output"
    return (f"holds an unfinished run (last checkpoint: step {latest.step}) — continue it with --resume, "
            "pass --overwrite to replace it, or choose another --output")


# --------------------------------------------------------------------------- resume


def resume_config(run_dir: Path, config_file: str | None, overrides: list[str]) -> Config:
    """The config a resumed run continues with: the saved config.yaml (or --config), then overrides.
    ResumeError when the folder is not a run, or when a change would alter what is trained."""
    saved_path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise ResumeError(f"{run_dir}: no such run folder — nothing to resume")
    if not saved_path.is_file():
        raise ResumeError(f"{run_dir}: no config.yaml — not a lowvram_ft run folder, nothing to resume")
    saved = load_config(saved_path)
    config = load_config(config_file or saved_path, overrides)
    changed = run_changes(to_dict(saved), to_dict(config))
    if changed:
        raise ResumeError("\n".join(
            [f"{run_dir}: cannot resume with a config that changes what is trained ({len(changed)} "
             f"key{'s' if len(changed) > 1 else ''} differ from {saved_path}):"]
            + [f"  {line}" for line in changed]
            + ["resume with the saved config (`--output RUN --resume` and nothing else), or start a new run "
               "with these changes (--overwrite, or another --output)"]))
    return config


def run_changes(saved: dict, new: dict) -> list[str]:
    """The 'key: old -> new' lines of `config.diff` that alter the trained weights (see RESUMABLE_KEYS)."""
    lines = [line for line in diff(saved, new) if not line.split(":", 1)[0].startswith(RESUMABLE_KEYS)]
    same_batch = (saved["train"]["batch_size"] * saved["train"]["gradient_accumulation_steps"]
                  == new["train"]["batch_size"] * new["train"]["gradient_accumulation_steps"])
    if same_batch:
        lines = [line for line in lines
                 if line.split(":", 1)[0] not in ("train.batch_size", "train.gradient_accumulation_steps")]
    return lines


def resume_point(run_dir: Path) -> Checkpoint:
    """The newest complete checkpoint of an unfinished run; ResumeError when there is none."""
    if not Path(run_dir).is_dir():
        raise ResumeError(f"{run_dir}: no such run folder — nothing to resume")
    if (Path(run_dir) / "summary.json").is_file():
        raise ResumeError(f"{run_dir}: this run has finished (summary.json) — nothing to resume; "
                          "pass --overwrite to train it again")
    complete, broken = list_checkpoints(run_dir)
    skipped = [f"{path.name} ({size_problem(path) or 'incomplete'})" for path in broken]
    for candidate in reversed(complete):  # newest first: the first intact one wins
        problem = checksum_problem(candidate.path)
        if problem is None:
            return Checkpoint(candidate.path, candidate.step, tuple(skipped))
        skipped.append(f"{candidate.path.name} ({problem})")
    damaged = f" (damaged: {'; '.join(skipped)})" if skipped else ""
    raise ResumeError(f"{run_dir}: no intact checkpoint to resume from{damaged} — start the run again with --overwrite")


def rewind_metrics(path: Path, step: int) -> list[dict]:
    """Keep the metrics.jsonl records up to `step` (a resume logs the later steps again); returns them.
    A line cut short by a kill is dropped."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(record)
    write_jsonl(path, kept)
    return kept


def resume_command(run_dir: Path, overrides: tuple[str, ...] | list[str] = (),
                   launch: str = "python -m lowvram_ft") -> str:
    """The command that continues the run; `launch` is how lowvram_ft was started (distributed.this_launch:
    under accelerate launch / torchrun, the launcher with its config file and process count)."""
    return " ".join([launch, "train --output", shlex.quote(str(run_dir)), "--resume",
                     *(shlex.quote(o) for o in overrides)])


def check_processes(run_dir: Path, checkpoint: Checkpoint, world_size: int) -> None:
    """ResumeError when the run is resumed with another number of processes than wrote its checkpoint:
    the effective batch, each process's share of the data and the RNG states all depend on it."""
    state = saved_state(checkpoint.path)
    started = state.get("processes", 1) if isinstance(state.get("processes", 1), int) else 1
    if started == world_size:
        return
    launch = state.get("launch") if isinstance(state.get("launch"), str) else None
    how = (f": {resume_command(run_dir, launch=launch)}" if launch else
           " (python -m lowvram_ft for one; accelerate launch --num_processes N for several)")
    raise ResumeError(f"{run_dir}: the run was started with {count(started)}, this resume has {count(world_size)} "
                      f"— resume it with {started}, as it was started{how}")


def count(processes: int) -> str:
    return f"{processes} process{'es' if processes != 1 else ''}"


def saved_state(path: Path) -> dict:
    """What lowvram_ft adds to a checkpoint (trained tokens so far); {} when absent or unreadable."""
    try:
        value = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------- marking and rotating


def mark_complete(folder: Path, step: int, processes: int, launch: str | None = None) -> None:
    """Sync a checkpoint's files and then write its mark: their sizes and sha256 (STATE_FILE), the number
    of processes that wrote it and how they were launched (for the resume's check and hint)."""
    sync_tree(folder)
    state = {"step": step, "processes": processes, "launch": launch, "files": file_manifest(folder)}
    (folder / STATE_FILE).write_text(json.dumps(state) + "\n", encoding="utf-8")
    sync_tree(folder)


def keep_newest(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than those."""
    complete, broken = list_checkpoints(run_dir)
    if not complete:
        return
    kept = complete[-keep:]
    oldest_kept = kept[0].step
    for item in complete[:-keep]:
        shutil.rmtree(item.path, ignore_errors=True)
    for path in broken:
        if int(CHECKPOINT_NAME.fullmatch(path.name).group(1)) < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)


def sync_tree(folder: Path) -> None:
    """fsync every file in `folder` (and the folder), so the rename publishes data that is on disk:
    a machine that loses power right after the rename still has a complete checkpoint."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    sync_dir(folder)


def sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
