"""Runs that survive: checkpoints written atomically, resume after a kill, clean interrupts, out-of-memory
advice, free-space checks.

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

import json
import os
import re
import shlex
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import EXIT_OUT_OF_MEMORY, UserError
from .io import GIB, write_jsonl
from .config import Config, ConfigError, diff, load_config, to_dict

CHECKPOINTS = "checkpoints"  # the run folder's subfolder holding checkpoint-N folders
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "lowvram_ft_state.json"
# A checkpoint is complete when it has these, one RNG file per process (rng_state_files) and one of WEIGHT_FILES.
REQUIRED_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
RESUMABLE_KEYS = ("eval.", "output.", "train.fit", "train.logging_steps", "train.save_steps", "train.keep_checkpoints",
                  "data.num_proc", "data.cache_dir", "model.gradient_checkpointing", "model.offload_embedding")
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
SAVE_MARGIN = 1.1  # free space wanted over the expected size of a save, plus SAVE_SLACK_BYTES
SAVE_SLACK_BYTES = 64 * 2**20
FAULT_ENV = "LOWVRAM_FT_FAULT"  # testing hook, see fault()


class ResumeError(UserError, RuntimeError):
    """A run that cannot be resumed as asked; the message says why and what to do."""


class DiskSpaceError(UserError, RuntimeError):
    """Not enough free disk space for a save, found before anything is written."""


class OutOfMemory(UserError, RuntimeError):
    """Out of memory, with the phase, step, memory figures and what to change (first line: the summary)."""

    exit_code = EXIT_OUT_OF_MEMORY


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM ended the run; `message` says what was saved and how to resume.
    A KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = SIGNAL_EXIT.get(signum, 128 + int(signum))
        self.message = message


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
    import hashlib

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


def resume_command(run_dir: Path, overrides: tuple[str, ...] | list[str] = ()) -> str:
    return " ".join(["python -m lowvram_ft train --output", shlex.quote(str(run_dir)), "--resume",
                     *(shlex.quote(o) for o in overrides)])


def saved_state(path: Path) -> dict:
    """What lowvram_ft adds to a checkpoint (trained tokens so far); {} when absent or unreadable."""
    try:
        value = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------- the run's state


class RunState:
    """What the run is doing (phase, completed steps, device, folder): for the out-of-memory and
    interrupt messages, the stop request, and the clean-up after a failure."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.phase = "load"  # load → train → save → eval
        self.step = 0  # completed optimizer steps
        self.device = None
        self.run_dir: Path | None = None
        self.fresh = True  # a new run (not --resume): removed again if it fails before its first checkpoint
        self.stop_signal: int | None = None
        self.replacement = None  # folders.Replacement of a new run: the earlier run it replaces, kept until keep()
        self._previous: dict = {}

    def begin(self, run_dir: Path, fresh: bool) -> Path:
        self.run_dir, self.fresh = Path(run_dir), fresh
        return self.run_dir

    # -- signals: during training, finish the step and checkpoint; otherwise stop at once

    def install_signal_handlers(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in SIGNAL_EXIT:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore_signal_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self.phase == "train" and self.stop_signal is None:
            self.stop_signal = signum
            print(f"\n[lowvram_ft] {signal.Signals(signum).name}: finishing step {self.step + 1}, then writing a "
                  "checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)
            return
        raise Interrupted(signum, self.interrupt_message(signum, at_once=True))

    def raise_if_stopped(self) -> None:
        """After trainer.train(): a requested stop ends the run here, its checkpoint written."""
        if self.stop_signal is not None:
            raise Interrupted(self.stop_signal, self.interrupt_message(self.stop_signal, at_once=False))

    def interrupt_message(self, signum: int, at_once: bool) -> str:
        name = signal.Signals(signum).name
        run_dir = self.run_dir
        latest = latest_checkpoint(run_dir) if run_dir else None
        if run_dir is None or (latest is None and self.fresh and self.phase in ("load", "train")):
            return f"interrupted ({name}) before the first checkpoint: nothing saved"
        if self.phase == "eval":
            return (f"interrupted ({name}) during the evaluation: the trained adapter is in {run_dir / 'adapter'}\n"
                    f"evaluate it with: python -m lowvram_ft eval --run {shlex.quote(str(run_dir))}")
        where = f"during step {self.step + 1}" if at_once and self.phase == "train" else f"at step {self.step}"
        saved = f"checkpoint {latest.path} (step {latest.step})" if latest else "no checkpoint"
        return f"interrupted ({name}) {where}: {saved}\nresume with: {resume_command(run_dir)}"

    # -- failure: out-of-memory advice and no half-made folder

    def keep(self) -> None:
        """The new run stands (its first checkpoint, or its end): an earlier run it replaces goes."""
        if self.replacement is not None:
            self.replacement.commit()

    def clean_up(self) -> None:
        """A new run that failed before writing a checkpoint leaves nothing behind, and an earlier run it
        was to replace (--overwrite) is put back."""
        if self.run_dir is None or not self.fresh or self.replacement is None:
            return
        if latest_checkpoint(self.run_dir) is None:
            self.replacement.abort()
        else:
            self.replacement.commit()


def make_run_callback(run: RunState):
    """A TrainerCallback that keeps `run.step`, honours a stop request (checkpoint, then stop), marks
    each checkpoint complete once every process has written it (mark_complete), keeps the newest
    train.keep_checkpoints complete ones, and runs the testing faults. Public callback API only."""
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # A resumed TrainerState keeps the logging/save cadence of the checkpoint: use this run's.
            state.compute_steps(args, state.max_steps)
            state.train_batch_size = args.train_batch_size  # may differ (same effective batch), see run_changes
            run.step = state.global_step

        def on_step_begin(self, args, state, control, **kwargs):
            fault("step", state.global_step + 1, "begin")

        def on_step_end(self, args, state, control, **kwargs):
            run.step = state.global_step
            fault("step", state.global_step, "end")
            if state.global_step >= state.max_steps:
                control.should_save = True  # the last step is always checkpointed, whatever save_steps says
            if run.stop_signal is not None:
                control.should_save = True
                control.should_training_stop = True
            if args.should_save and save_is_due(args, state, control):
                folder = checkpoint_dir(Path(args.output_dir).parent) / f"checkpoint-{state.global_step}"
                (folder / STATE_FILE).unlink(missing_ok=True)  # a stale mark must not cover the files rewritten now
                _, need = save_sizes(kwargs["model"], args.optim)
                check_free_space(Path(args.output_dir).parent, need, f"checkpoint {folder.name}")

        def on_save(self, args, state, control, **kwargs):
            wait_for_every_process()  # each process has written its RNG state
            if args.should_save:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                fault("checkpoint", state.global_step, "partial", folder)
                mark_complete(folder, state.global_step, args.world_size)
                keep_newest(Path(args.output_dir).parent, run.cfg.train.keep_checkpoints)
            wait_for_every_process()
            run.keep()  # a checkpoint of the new run exists: the run it replaces is no longer needed

    return RunCallback()


def save_is_due(args, state, control) -> bool:
    """Whether the Trainer will save at the end of this step (its own rule for save_strategy=steps)."""
    every = args.save_steps if args.save_strategy == "steps" else 0
    return control.should_save or bool(every and state.global_step % every == 0)


def mark_complete(folder: Path, step: int, processes: int) -> None:
    """Sync a checkpoint's files and then write its mark: their sizes and sha256 (STATE_FILE)."""
    sync_tree(folder)
    state = {"step": step, "processes": processes, "files": file_manifest(folder)}
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


def wait_for_every_process() -> None:
    """A barrier when several processes train (accelerate launch / torchrun), else nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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


# --------------------------------------------------------------------------- disk space


def adapter_bytes(model) -> int:
    """Expected size of the saved weights: the trainable parameters × their dtype's bytes (LoRA
    weights and modules_to_save, or every weight in full fine-tuning)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def save_sizes(model, optimizer: str) -> tuple[int, int]:
    """(adapter bytes, checkpoint bytes) expected for `model`; a checkpoint adds the optimizer's
    states (8-bit: ~1 byte per state per weight, else 4)."""
    from .plan import OPTIMIZERS

    weights = adapter_bytes(model)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    states, kind = OPTIMIZERS.get(optimizer, (2, "fp32"))
    return weights, int(weights + states * (1.02 if kind == "8bit" else 4) * count)


def free_bytes(path: Path) -> int:
    """Free space on the disk holding `path` (its nearest existing parent)."""
    if "nospace" in os.environ.get(FAULT_ENV, "").split(","):
        return 0  # testing hook: a full disk
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_free_space(path: Path, expected_bytes: int, what: str) -> None:
    """DiskSpaceError, before anything is written, when `path`'s disk cannot hold `what`."""
    need = int(expected_bytes * SAVE_MARGIN) + SAVE_SLACK_BYTES
    free = free_bytes(path)
    if free < need:
        raise DiskSpaceError(f"{path}: not enough free disk space for {what}: needs about {need / GIB:.2f} GiB, "
                             f"{free / GIB:.2f} GiB free — free some space, or choose another --output")


def check_run_space(run: RunState, model, optimizer: str) -> None:
    """Before training: room for the checkpoints still to be written (keep_checkpoints + the one being
    written) and the final adapter."""
    adapter, one = save_sizes(model, optimizer)
    existing = len(list_checkpoints(run.run_dir)[0])
    count = max(run.cfg.train.keep_checkpoints + 1 - existing, 1)
    check_free_space(run.run_dir, adapter + count * one,
                     f"{count} checkpoint{'s' if count > 1 else ''} and the adapter")


# --------------------------------------------------------------------------- out of memory


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA out of memory or a host MemoryError, also when wrapped (a load error keeps it as __cause__)."""
    while error is not None:
        names = {t.__name__ for t in type(error).__mro__}
        if isinstance(error, MemoryError) or "OutOfMemoryError" in names:
            return True
        error = error.__cause__
    return False


def out_of_memory(run: RunState, error: BaseException) -> OutOfMemory:
    """The message for an out-of-memory error: phase, step, peak and capacity, the planner's
    recommendation for this config and card, and the checkpoint that is still valid."""
    where = {"load": "while loading the model", "train": f"in training step {run.step + 1}",
             "save": "while saving the adapter", "eval": "during the evaluation"}.get(run.phase, run.phase)
    detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    peak, capacity, kind = memory_figures(run.device)
    lines = [f"out of memory {where} ({detail})"]
    if peak is not None:
        lines.append(f"peak {kind} reached {peak:.2f} GiB of {capacity:.2f} GiB" if capacity else
                     f"peak {kind} reached {peak:.2f} GiB")
    advice, resumable = planner_advice(run.cfg, capacity if run.device is not None and run.device.kind == "cuda" else None)
    lines += advice
    latest = latest_checkpoint(run.run_dir) if run.run_dir else None
    if latest is not None and run.phase in ("train", "save"):
        lines.append(f"checkpoint {latest.path} (step {latest.step}) is intact")
        if resumable is not None:
            lines.append(f"continue from it with: {resume_command(run.run_dir, resumable)}")
        else:
            lines.append("these changes alter what is trained: start a new run with them (--overwrite)")
    elif run.phase == "eval" and run.run_dir is not None:
        lines.append(f"the trained adapter is saved in {run.run_dir / 'adapter'}: evaluate it with "
                     f"`python -m lowvram_ft eval --run {shlex.quote(str(run.run_dir))}` and smaller eval settings")
    return OutOfMemory("\n".join(lines))


def memory_figures(device) -> tuple[float | None, float | None, str]:
    """(peak GiB, capacity GiB, what is measured) of the device: GPU reserved memory, else host RSS/RAM."""
    if device is None:
        return None, None, ""
    from .memory import headline_gib, peak_figures

    gpu = device.kind == "cuda"
    peak = headline_gib(peak_figures(gpu), gpu)
    if gpu:
        return peak, device.total_gib, "reserved VRAM"
    return peak, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, "RSS (host RAM)"


def planner_advice(cfg: Config, vram_gib: float | None) -> tuple[list[str], tuple[str, ...] | None]:
    """(lines of advice, the overrides of the first recommendation a --resume accepts, if any).
    When the planner thinks the run fits (or there is no GPU size), its estimate was too low for this
    run: it is asked for changes that lower its prediction by 15%, else by 5%."""
    from . import plan

    try:
        inp = plan.plan_input_from_config(cfg, plan.model_config_for(cfg.model.name))
        predicted = plan.predict(inp, vram_gib).total_gib
        lines = [f"the planner predicts a peak of {predicted:.2f} GiB for this config"]
        budget, recommendations = vram_gib, plan.recommend(inp, vram_gib) if vram_gib else []
        for cut in (0.15, 0.05):
            if recommendations:
                break
            budget = predicted * (1 - cut) / (1 - plan.SAFETY_MARGIN)
            recommendations = [r for r in plan.recommend(inp, budget) if r.fits]
            lines[0] = (f"the planner predicts a peak of {predicted:.2f} GiB for this config, too low for this run; "
                        f"changes that lower it by {cut:.0%}:")
    except plan.PlanError as error:
        return [f"the planner cannot size this model ({error}): lower model.max_seq_length or train.batch_size"], None
    if not recommendations:
        return lines + ["  the planner finds no change that lowers it: lower model.max_seq_length or use a larger GPU"], None
    lines += plan.format_recommendations(recommendations, budget).splitlines()
    resumable = next((r.overrides for r in recommendations if resumable_overrides(cfg, r.overrides)), None)
    return lines, resumable


def resumable_overrides(cfg: Config, overrides) -> bool:
    """Whether `--resume` accepts these `group.key=value` overrides on top of `cfg`."""
    import yaml

    saved = to_dict(cfg)
    tree = to_dict(cfg)
    for item in overrides:
        key, _, raw = item.partition("=")
        group, _, name = key.partition(".")
        tree.setdefault(group, {})[name] = yaml.safe_load(raw)
    try:
        new = to_dict(load_config(None, tree))
    except ConfigError:
        return False
    return not run_changes(saved, new)


# --------------------------------------------------------------------------- testing hook


def fault(where: str, step: int, when: str = "end", folder: Path | None = None) -> None:
    """Testing hook, off unless LOWVRAM_FT_FAULT is set: a comma-separated list of
    `kill@step=N` (SIGKILL at the end of step N, before its checkpoint), `kill@checkpoint=N` (SIGKILL
    while checkpoint N is being written: weights written, optimizer not, no mark), `oom@step=N` (a CUDA
    out-of-memory error as step N begins), and `nospace` (free_bytes reports a full disk)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        action, _, point = item.strip().partition("@")
        if point != f"{where}={step}":
            continue
        if action == "kill" and when == "partial" and folder is not None:
            (folder / "optimizer.pt").unlink(missing_ok=True)  # as if the kill came before the optimizer was written
        if action == "kill" and when in ("end", "partial"):
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "oom" and when == "begin":
            import torch

            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB "
                                              f"(simulated by {FAULT_ENV}={spec})")
