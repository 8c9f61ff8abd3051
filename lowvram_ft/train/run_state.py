"""A run that survives: its phase and step, Ctrl-C / SIGTERM finishing the step and checkpointing, the
callback that marks checkpoints complete, free disk space checked before any save, and out-of-memory
errors turned into advice (the planner's recommendation, the checkpoint that is still valid)."""
from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path

import yaml

from .. import plan
from ..config import Config, ConfigError, load_config, to_dict
from ..errors import EXIT_OUT_OF_MEMORY, UserError
from ..io import GIB
from ..memory import headline_gib, peak_figures
from .checkpoints import (STATE_FILE, checkpoint_bytes, checkpoint_dir, keep_newest, latest_checkpoint,
                          list_checkpoints, mark_complete, resume_command, run_changes)
from .distributed import processes, this_launch, wait_for_every_process

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
SAVE_MARGIN = 1.1  # free space wanted over the expected size of a save, plus a slack:
SAVE_SLACK_BYTES = 64 * 2**20  # for an estimate (the files the Trainer adds: tokenizer, states, RNG)
MEASURED_SLACK_BYTES = 2**20  # for the size of a checkpoint already written, which holds all of them


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
        self.lock = None  # folders.FolderLock on the run folder, held until release()
        self.launch = this_launch(processes())  # how lowvram_ft was started, for the resume hints
        self._previous: dict = {}

    def begin(self, run_dir: Path, fresh: bool) -> Path:
        self.run_dir, self.fresh = Path(run_dir), fresh
        return self.run_dir

    # -- signals: during training, finish the step and checkpoint; otherwise stop at once

    def install_signal_handlers(self) -> None:
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
        return f"interrupted ({name}) {where}: {saved}\nresume with: {resume_command(run_dir, launch=self.launch)}"

    # -- failure: out-of-memory advice and no half-made folder

    def keep(self) -> None:
        """The new run stands (its first checkpoint, or its end): an earlier run it replaces goes."""
        if self.replacement is not None:
            self.replacement.commit()

    def release(self) -> None:
        """The run folder is free for other processes again."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

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
    train.keep_checkpoints complete ones. Public callback API only."""
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # A resumed TrainerState keeps the logging/save cadence of the checkpoint: use this run's.
            state.compute_steps(args, state.max_steps)
            state.train_batch_size = args.train_batch_size  # may differ (same effective batch), see run_changes
            run.step = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            run.step = state.global_step
            if state.global_step >= state.max_steps:
                control.should_save = True  # the last step is always checkpointed, whatever save_steps says
            if run.stop_signal is not None:
                control.should_save = True
                control.should_training_stop = True
            if args.should_save and save_is_due(args, state, control):
                folder = checkpoint_dir(Path(args.output_dir).parent) / f"checkpoint-{state.global_step}"
                (folder / STATE_FILE).unlink(missing_ok=True)  # a stale mark must not cover the files rewritten now
                need, slack = checkpoint_need(run.run_dir, kwargs["model"], args.optim)
                check_free_space(run.run_dir, need, f"checkpoint {folder.name}", slack)

        def on_save(self, args, state, control, **kwargs):
            wait_for_every_process()  # each process has written its RNG state
            if args.should_save:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                mark_complete(folder, state.global_step, args.world_size, run.launch)
                keep_newest(Path(args.output_dir).parent, run.cfg.train.keep_checkpoints)
            wait_for_every_process()
            run.keep()  # a checkpoint of the new run exists: the run it replaces is no longer needed

    return RunCallback()


def save_is_due(args, state, control) -> bool:
    """Whether the Trainer will save at the end of this step (its own rule for save_strategy=steps)."""
    every = args.save_steps if args.save_strategy == "steps" else 0
    return control.should_save or bool(every and state.global_step % every == 0)


# --------------------------------------------------------------------------- disk space


def adapter_bytes(model) -> int:
    """Expected size of the saved weights: the trainable parameters × their dtype's bytes (LoRA
    weights and modules_to_save, or every weight in full fine-tuning)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def save_sizes(model, optimizer: str) -> tuple[int, int]:
    """(adapter bytes, checkpoint bytes) expected for `model`; a checkpoint adds the optimizer's
    states (8-bit: ~1 byte per state per weight, else 4)."""
    weights = adapter_bytes(model)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    states, kind = plan.OPTIMIZERS.get(optimizer, (2, "fp32"))
    return weights, int(weights + states * (1.02 if kind == "8bit" else 4) * count)


def free_bytes(path: Path) -> int:
    """Free space on the disk holding `path` (its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def checkpoint_need(run_dir: Path, model, optimizer: str) -> tuple[int, int]:
    """(bytes, slack) a next checkpoint needs: the size of the newest one already written when there is
    one (it holds every file the Trainer adds), else the estimate of save_sizes."""
    latest = latest_checkpoint(run_dir) if run_dir is not None else None
    if latest is not None:
        return checkpoint_bytes(latest.path), MEASURED_SLACK_BYTES
    return save_sizes(model, optimizer)[1], SAVE_SLACK_BYTES


def check_free_space(path: Path, expected_bytes: int, what: str, slack: int = SAVE_SLACK_BYTES) -> None:
    """DiskSpaceError, before anything is written, when `path`'s disk cannot hold `what`."""
    need = int(expected_bytes * SAVE_MARGIN) + slack
    free = free_bytes(path)
    if free < need:
        raise DiskSpaceError(f"{path}: not enough free disk space for {what}: needs about {need / GIB:.2f} GiB, "
                             f"{free / GIB:.2f} GiB free — free some space, or choose another --output")


def check_run_space(run: RunState, model, optimizer: str) -> None:
    """Before training: room for the checkpoints still to be written (keep_checkpoints + the one being
    written) and the final adapter."""
    adapter = save_sizes(model, optimizer)[0]
    one, slack = checkpoint_need(run.run_dir, model, optimizer)  # measured when resuming
    existing = len(list_checkpoints(run.run_dir)[0])
    count = max(run.cfg.train.keep_checkpoints + 1 - existing, 1)
    check_free_space(run.run_dir, adapter + count * one,
                     f"{count} checkpoint{'s' if count > 1 else ''} and the adapter", slack)


def disk_full(run: RunState, error: BaseException) -> DiskSpaceError | None:
    """A full disk in training (our check before a save, or the OS refusing a write) as a DiskSpaceError
    that says how to continue once there is room: the intact checkpoint and the --resume command.
    None for any other error."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        first = f"{error.filename or run.run_dir}: the disk is full ({error.strerror})"
    elif isinstance(error, DiskSpaceError):
        first = str(error)
    else:
        return None
    latest = latest_checkpoint(run.run_dir) if run.run_dir is not None else None
    if latest is None or run.phase not in ("train", "save"):
        return error if isinstance(error, DiskSpaceError) else DiskSpaceError(f"{first} — free some space and start again")
    return DiskSpaceError(f"{first}\ncheckpoint {latest.path} (step {latest.step}) is intact — once there is room, "
                          f"continue with: {resume_command(run.run_dir, launch=run.launch)}")


# --------------------------------------------------------------------------- out of memory


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
    advice, resumable, proposed = planner_advice(run.cfg, capacity if run.device is not None and run.device.kind == "cuda" else None)
    lines += advice
    latest = latest_checkpoint(run.run_dir) if run.run_dir else None
    if latest is not None and run.phase in ("train", "save"):
        lines.append(f"checkpoint {latest.path} (step {latest.step}) is intact")
        if resumable is not None:
            lines.append(f"continue from it with: {resume_command(run.run_dir, resumable, run.launch)}")
        elif proposed:
            lines.append("these changes alter what is trained: start a new run with them (--overwrite)")
        else:
            lines.append("once the settings fit, start a new run (--overwrite): a changed "
                         "max_seq_length or model alters what is trained")
    elif run.phase == "eval" and run.run_dir is not None:
        lines.append(f"the trained adapter is saved in {run.run_dir / 'adapter'}: evaluate it with "
                     f"`python -m lowvram_ft eval --run {shlex.quote(str(run.run_dir))}` and smaller eval settings")
    return OutOfMemory("\n".join(lines))


def memory_figures(device) -> tuple[float | None, float | None, str]:
    """(peak GiB, capacity GiB, what is measured) of the device: GPU reserved memory, else host RSS/RAM."""
    if device is None:
        return None, None, ""
    gpu = device.kind == "cuda"
    peak = headline_gib(peak_figures(gpu), gpu)
    if gpu:
        return peak, device.total_gib, "reserved VRAM"
    return peak, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, "RSS (host RAM)"


def planner_advice(cfg: Config, vram_gib: float | None) -> tuple[list[str], tuple[str, ...] | None, bool]:
    """(lines of advice, the overrides of the first recommendation a --resume accepts, if any, whether
    any change is proposed).
    When the planner thinks the run fits (or there is no GPU size), its estimate was too low for this
    run: it is asked for changes that lower its prediction by 15%, else by 5%, else by 1% (a small model,
    whose fixed terms outweigh what a micro-batch change saves)."""
    try:
        inp = plan.plan_input_from_config(cfg, plan.model_config_for(cfg.model.name))
        predicted = plan.predict(inp, vram_gib).total_gib
        lines = [f"the planner predicts a peak of {predicted:.2f} GiB for this config"]
        budget, recommendations = vram_gib, plan.recommend(inp, vram_gib) if vram_gib else []
        for cut in (0.15, 0.05, 0.01):
            if recommendations:
                break
            budget = predicted * (1 - cut) / (1 - plan.SAFETY_MARGIN)
            recommendations = [r for r in plan.recommend(inp, budget) if r.fits]
            lines[0] = (f"the planner predicts a peak of {predicted:.2f} GiB for this config, too low for this run; "
                        f"changes that lower it by {cut:.0%}:")
    except plan.PlanError as error:
        return [f"the planner cannot size this model ({error}): lower model.max_seq_length or train.batch_size"], None, False
    if not recommendations:
        return lines + ["  the planner finds no change that lowers it: lower model.max_seq_length or use a larger GPU"], None, False
    lines += plan.format_recommendations(recommendations, budget).splitlines()
    resumable = next((r.overrides for r in recommendations if resumable_overrides(cfg, r.overrides)), None)
    return lines, resumable, True


def resumable_overrides(cfg: Config, overrides) -> bool:
    """Whether `--resume` accepts these `group.key=value` overrides on top of `cfg`."""
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
