"""The training story, top to bottom: `train(cfg)` (guarding `run_training`, the story itself).

resolve run folder (or the checkpoint to resume) → read data → decide device → load model → add LoRA →
tokenize → train (checkpoints) → save → evaluate (base vs tuned) → report. Each step is one call whose
result feeds the next. `train` adds what makes a run survive (run_state.py): Ctrl-C / SIGTERM finish
the step and checkpoint, out of memory becomes advice, a full disk says how to resume, a failed new run
leaves no folder behind.
"""
from __future__ import annotations

import os
import shutil
import time
from datetime import datetime
from pathlib import Path

from .. import folders
from .. import model as models
from ..data import load_data, tokenize_data
from ..errors import UserError, is_out_of_memory
from ..conversation import Conversation, Message
from ..evaluate import evaluate_model, training_languages
from ..evaluate.generation import PromptError, prompt_text
from ..config import EMBEDDED_MODELS, Config, ConfigError, load_config, parse_override, to_dict, to_yaml
from ..io import write_atomic as write_text_atomic, write_json as write_json_atomic
from ..device import detect_device, stack_versions
from ..harmony import HarmonyOptions
from ..memory import MemoryMonitor, headline_gib, peak_figures, reset_peaks
from ..model import input_device
from ..plan import decide_fit
from ..report import report_after_run
from ..terminal import log
from ..testing.faults import fault_callbacks
from . import checkpoints, grpo, run_state
from .checkpoints import describe_unfinished, resume_point
from .distributed import as_prepared, max_over_processes, processes, shared_run_dir
from .run_state import adapter_bytes, check_free_space
from .trainer import (Prepared, build_trainer, check_trackers, compute_dtype, fit, make_progress_callback,
                      optimizer_name, packing_decision, point_trackers_at)


class RunDirError(UserError, RuntimeError):
    """The output folder cannot be used as asked; the message says what to do."""


def train(cfg: Config, *, force: bool = False, resume: bool = False, console=None) -> Path:
    """Run one fine-tuning job end to end, or continue it from its newest complete checkpoint (resume);
    returns the run folder. Ctrl-C / SIGTERM stop after the current step with a checkpoint
    (run_state.Interrupted); out of memory becomes advice (run_state.OutOfMemory); a new run that
    fails before its first checkpoint leaves no folder behind."""
    grpo.check(cfg)  # the method's settings, before anything is loaded or written
    run = run_state.RunState(cfg)
    run.install_signal_handlers()
    try:
        return run_training(cfg, run, force=force, resume=resume, console=console)
    except BaseException as error:
        run.clean_up()
        if is_out_of_memory(error):
            raise run_state.out_of_memory(run, error) from None
        full = run_state.disk_full(run, error)
        if full is not None and full is not error:
            raise full from None
        raise
    finally:
        run.release()  # after the clean-up: nobody may take the folder while a failed run is put back
        run.restore_signal_handlers()
        end_process_group()


def end_process_group() -> None:
    """Under accelerate launch / torchrun: close the process group before exit, so no gloo / NCCL
    thread is alive when the interpreter ends (a process aborted at exit after a finished run)."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_training(cfg: Config, run, *, force: bool, resume: bool, console=None) -> Path:
    """The story of one run; `run` (run_state.RunState) follows its phase and step."""
    from rich.console import Console

    procs = processes()  # under accelerate launch / torchrun only the main process writes and prints
    # soft_wrap: one line per step whatever the terminal (a pipe would otherwise wrap at 80 columns)
    console = console or Console(highlight=False, soft_wrap=True, quiet=not procs.main)
    started = time.perf_counter()
    check_trackers(cfg.output.report_to)  # a missing optional tracker fails before anything is written
    faults = fault_callbacks()  # so does a bad LOWVRAM_FT_FAULT (testing/faults.py)
    run_dir = run.begin(shared_run_dir(procs, lambda: prepare_run_dir(cfg, run, resume=resume)), fresh=not resume)
    log(console, "config", f"resolved config saved to {run_dir / 'config.yaml'}")
    resume_from = checkpoints.resume_point(run_dir) if resume else None
    history = (checkpoints.rewind_metrics(run_dir / "metrics.jsonl", resume_from.step)
               if resume_from and procs.main else [])
    if resume_from and procs.main:  # GRPO's completions log, likewise (a no-op for SFT)
        checkpoints.rewind_metrics(run_dir / grpo.COMPLETIONS_FILE, resume_from.step)
    if resume_from:
        log(console, "resume", describe_resume(run_dir, resume_from))
    data = load_data(cfg)  # before the model: bad data fails in seconds, not after a long load

    models.import_unsloth()
    device = detect_device()
    gpu = device.kind == "cuda"
    monitor = MemoryMonitor(gpu).start()  # NVML and RSS peaks, next to torch's (memory.py)
    run.device = device
    log(console, "device", device.reason)
    fitted, planned = check_fit(cfg, device, force, console)
    if fitted != cfg:  # train.fit=auto changed how (not what) it trains: the saved config says so
        cfg = fitted
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))

    model, tokenizer = models.load_model(cfg, device)
    load_memory = peak_figures(gpu, monitor)
    log(console, "model", f"{cfg.model.name}: {type(model).__name__}, dtype {model.dtype}, "
        f"weights {models.load_bits(cfg, device)}, load peak {headline_gib(load_memory, gpu):.2f} GiB")
    model = models.add_lora(model, cfg)
    counts = models.trainable_parameters(model)
    models.check_trainable(counts, cfg, is_moe=getattr(model.config, "model_type", "") == "gpt_oss")
    log(console, "lora", format_counts(counts))
    run_state.check_run_space(run, model, optimizer_name(cfg, device))

    # The training method is chosen here, once: its training data and its Trainer (GRPO: train/grpo.py).
    method = grpo.prepare if cfg.train.method == "grpo" else prepare_sft
    prepared = method(model, tokenizer, data.train, cfg, device, console)
    log(console, "data", format_data_stats(data.stats, prepared.stats))

    reset_peaks(gpu, monitor)  # the training phase's peaks start here (as in the bench)
    progress = make_progress_callback(run_dir, device, console, history=history, monitor=monitor)
    point_trackers_at(run_dir, cfg.output.report_to)
    trainer = prepared.build_trainer(run_dir, [*faults, progress, run_state.make_run_callback(run)])
    kind = trainer.accelerator.distributed_type.name  # as the processes really run (FSDP on CPUs: MULTI_CPU)
    if procs.sharded and not as_prepared(procs, kind).sharded:
        log(console, "processes", f"sharding asked for, but accelerate runs the {procs.world_size} processes as "
            f"{kind}, plain data parallel: every process holds the whole model (docs/multi-gpu.md)")
    procs = as_prepared(procs, kind)
    run.phase = "train"
    trained = fit(trainer, str(resume_from.path) if resume_from else None)
    run.raise_if_stopped()  # Ctrl-C / SIGTERM: the checkpoint is written; say how to resume
    run.phase = "save"
    train_memory = peak_figures(gpu, monitor)
    monitor.stop()
    peak = max_over_processes(procs, max(headline_gib(load_memory, gpu), headline_gib(train_memory, gpu)))
    final_loss = trained.final_loss if trained.final_loss is not None else float("nan")
    log(console, "train", f"{trained.steps} steps, final loss {final_loss:.4f}, "
        f"peak {'VRAM' if device.kind == 'cuda' else 'RSS'} {peak:.2f} GiB")

    if procs.sharded:  # FSDP / ZeRO-3: the adapter is spread over the processes; all of them gather it
        trainer.save_model(str(run_dir / ".adapter.sharded"))
    if not procs.main:
        return run_dir
    adapter_dir = (publish_sharded_adapter(tokenizer, run_dir) if procs.sharded
                   else save_adapter(model, tokenizer, run_dir))
    log(console, "save", f"adapter and tokenizer in {adapter_dir}")
    summary = build_summary(cfg, device, trained, counts, data.stats, prepared.stats, peak,
                            time.perf_counter() - started)
    summary["processes"] = procs.world_size
    summary["memory"] = {"load": load_memory, "train": train_memory}  # memory.py: one meaning everywhere
    summary["packing"] = {"requested": cfg.data.packing, "used": prepared.packing, "why": prepared.packing_why}
    summary["method"] = cfg.train.method
    summary["plan"] = planned  # the planner's estimate before loading (GPU), beside the measured peak
    summary["dtype"] = str(model.dtype).removeprefix("torch.")  # the weights' dtype, and the compute dtype:
    summary["compute_dtype"] = compute_dtype(cfg, device, summary["dtype"])  # reloads compare within their precision
    if not procs.sharded:  # a forward pass in one process would wait forever for the others' shards
        summary["reload_probe"] = probe_logits(model, tokenizer)
    write_json_atomic(run_dir / "summary.json", summary)

    run.phase = "eval"
    if cfg.eval.enabled and procs.sharded:
        log(console, "eval", f"skipped: the weights are sharded over {procs.world_size} processes — "
            f"run `python -m lowvram_ft eval --run {run_dir}` on one GPU")
    elif cfg.eval.enabled:
        evaluate_run(model, tokenizer, cfg, data, run_dir, console)
    run.keep()  # the run stands: an earlier run it replaces (--overwrite) is deleted now
    report_after_run(run_dir, console)  # a page of the run; failing to write it never fails the run
    log(console, "done", f"results in {run_dir}")
    return run_dir


def prepare_sft(model, tokenizer, examples, cfg: Config, device, console) -> Prepared:
    """SFT's training data (tokenized, masked, cached) and how its SFTTrainer is built."""
    tokenized = tokenize_data(examples, tokenizer, cfg)
    packing, packing_why = packing_decision(cfg, device, getattr(model.config, "model_type", ""))
    if cfg.data.packing:
        log(console, "data", f"packing {packing_why}")

    def build(run_dir: Path, callbacks):
        return build_trainer(model, tokenizer, tokenized.dataset, cfg, device, run_dir, callbacks, packing=packing)

    return Prepared(tokenized.stats, packing, packing_why, build)


def evaluate_run(model, tokenizer, cfg: Config, data, run_dir: Path, console) -> None:
    """Base (adapter off) vs tuned (adapter on), same prompts and seeds; report in the run folder. The
    languages the training rows reason in are "trained", every other asked language "zero-shot"."""
    evaluate_model(model, tokenizer, cfg, run_dir, trained_languages=training_languages(data.stats["reasoning_languages"]),
                   labels_from="this run's training rows: summary.json data.rows.reasoning_languages",
                   heldout=data.heldout, console=console)


# --------------------------------------------------------------------------- steps


def default_run_dir(cfg: Config) -> Path:
    short = cfg.model.name if cfg.model.name in EMBEDDED_MODELS else Path(cfg.model.name.rstrip("/")).name
    return Path("runs") / f"{short}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(cfg: Config, run=None, resume: bool = False) -> Path:
    """Create the run folder and save the resolved config in it. A folder this tool did not write is
    never used (folders.py); a finished or unfinished run of ours is replaced only with --overwrite, and
    then only once the new run has its first checkpoint or has finished (`run.replacement`). With
    resume, the folder must hold an unfinished run with a complete checkpoint, and is kept. The folder is
    locked for the run (folders.hold, `run.lock`): a folder another process is training in is refused."""
    run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: is a file — pass a folder to --output")
    try:
        lock = folders.hold(run_dir, "resuming" if resume else "training")  # before any look: it may be in use
    except OSError as error:
        raise unwritable(run_dir, error) from None
    if run is not None:
        run.lock = lock
    if resume:
        checkpoints.check_processes(run_dir, resume_point(run_dir), processes().world_size)
        return run_dir
    try:
        folders.refuse_foreign(run_dir, "run", "--output")
    except folders.FolderError as error:
        raise RunDirError(str(error)) from None
    if not folders.is_empty(run_dir) and run_dir.is_dir() and not cfg.output.overwrite:
        finished = (run_dir / "summary.json").is_file()
        what = "holds a finished run — pass --overwrite to replace it, or choose another --output"
        raise RunDirError(f"{run_dir}: {what if finished else describe_unfinished(run_dir)}")
    replacement = folders.Replacement(run_dir, "run")
    try:
        replacement.begin()
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
    except OSError as error:
        replacement.abort()
        raise unwritable(run_dir, error) from None
    if run is not None:
        run.replacement = replacement
    else:
        replacement.commit()
    return run_dir


def unwritable(run_dir: Path, error: OSError) -> RunDirError:
    return RunDirError(f"{run_dir}: cannot write there ({error.strerror}) — choose a writable --output")


def check_fit(cfg: Config, device, force: bool, console) -> tuple[Config, dict | None]:
    """On a GPU, the planner's estimate before loading (train.fit): says the figure, its basis and the
    precision it assumed; auto applies changes that keep the trained model the same and returns the
    changed config; a calibrated estimate over the card by more than its error stops the run (--force
    overrides). An uncalibrated estimate only warns. Also returns the estimate ({peak_gib, basis,
    action}, None off a GPU) for summary.json."""
    if device.kind != "cuda" or device.total_gib is None:
        return cfg, None
    decision = decide_fit(cfg, device.total_gib, bf16=device.bf16)
    if decision is None:
        return cfg, None
    for line in decision.lines():
        log(console, "plan", line)
    if decision.action == "refuse" and not force:
        console.print(decision.report)
        raise RunDirError(f"predicted peak {decision.peak_gib:.2f} GiB exceeds this GPU's {device.total_gib:.1f} GiB "
                          f"({decision.basis}) — apply a recommendation above, or pass --force to try anyway")
    if decision.action == "warn":
        console.print(decision.report, markup=False, highlight=False)
    planned = {"peak_gib": round(decision.peak_gib, 3), "basis": decision.basis, "action": decision.action}
    return (apply_overrides(cfg, decision.overrides) if decision.overrides else cfg), planned


def apply_overrides(cfg: Config, overrides) -> Config:
    """`cfg` with `group.key=value` overrides applied, validated like the command line."""
    tree, problems = to_dict(cfg), []
    for item in overrides:
        key, value = parse_override(item, problems)
        group, _, name = (key or "").partition(".")
        if group in tree and name:
            tree[group][name] = value
        else:
            problems.append(f"{item}: not a group.key=value override")
    if problems:
        raise ConfigError(problems)
    return load_config(None, tree)


def save_adapter(model, tokenizer, run_dir: Path) -> Path:
    """Adapter (safetensors) + tokenizer into run_dir/adapter, written under a temporary name first,
    after checking that the disk has room for it."""
    check_free_space(run_dir, adapter_bytes(model), "the adapter")
    final = run_dir / "adapter"
    staging = run_dir / ".adapter.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


def publish_sharded_adapter(tokenizer, run_dir: Path) -> Path:
    """The adapter the Trainer gathered from every process (FSDP / ZeRO-3), plus the tokenizer, moved
    into run_dir/adapter (main process only)."""
    staging, final = run_dir / ".adapter.sharded", run_dir / "adapter"
    tokenizer.save_pretrained(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


PROBE_QUESTION = "What is 12 plus 30?"


def probe_text(tokenizer) -> str:
    """The probe's prompt as the model is prompted: by its own renderer (Harmony for gpt-oss, else its chat
    template), the question alone for a tokenizer without one."""
    try:
        return prompt_text(Conversation((Message("user", PROBE_QUESTION),)), tokenizer, HarmonyOptions())
    except PromptError:
        return PROBE_QUESTION


def probe_logits(model, tokenizer) -> dict:
    """Last-position logits of a fixed prompt, as trained: a reloaded adapter must reproduce them."""
    import torch

    text = probe_text(tokenizer)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        logits = model(input_ids=ids.to(input_device(model))).logits[0, -1].float().cpu()
    model.train(was_training)
    top = torch.topk(logits, k=min(8, logits.numel()))
    return {"text": text, "top_ids": top.indices.tolist(), "top_logits": [round(v, 5) for v in top.values.tolist()]}


def describe_resume(run_dir: Path, resume_from) -> str:
    damaged = f"; passed over damaged or incomplete {', '.join(resume_from.skipped)}" if resume_from.skipped else ""
    return f"continuing from {resume_from.path} (step {resume_from.step}){damaged}"


def build_summary(cfg, device, trained, counts, data_stats, token_stats, peak, wall_s) -> dict:
    return {
        "model": cfg.model.name,
        "device": {"kind": device.kind, "name": device.name, "total_gib": device.total_gib, "reason": device.reason},
        "steps": trained.steps,
        "final_loss": trained.final_loss,
        "first_loss": trained.first_loss,
        "trained_tokens": trained.trained_tokens,
        "wall_time_s": round(wall_s, 2),
        "train_runtime_s": round(trained.runtime_s, 2),
        "peak_memory_gib": round(peak, 3),
        "peak_memory_kind": "peak_reserved_vram" if device.kind == "cuda" else "peak_rss",
        "trainable_parameters": counts,
        "data": {"rows": data_stats, "tokens": token_stats},
        "versions": stack_versions(),
    }


# --------------------------------------------------------------------------- dry run


def dry_run(cfg: Config, console=None) -> None:
    """Print the resolved config and what would be loaded, importing no torch/transformers/trl/unsloth."""
    from rich.console import Console

    console = console or Console(highlight=False)
    grpo.check(cfg)
    console.print(to_yaml(cfg).rstrip())
    run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg)
    family = {"embedded": "gpt-oss", "embedded-qwen3": "Qwen3"}.get(cfg.model.name)
    model = (f"embedded tiny {family} (built offline on first use)" if cfg.model.name in EMBEDDED_MODELS
             else cfg.model.name)
    bits = cfg.model.load_in if cfg.model.load_in != "auto" else "4bit on a GPU, 16bit on CPU"
    lora = f"adapter {cfg.model.adapter}" if cfg.model.adapter else f"LoRA r={cfg.lora.r}"
    console.print(f"\nwould load   model {model} ({'full fine-tuning' if cfg.model.full_finetuning else lora}, weights {bits})")
    for source in cfg.data.dataset:
        console.print(f"would read   data  {describe_source(source)}")
    if cfg.train.method == "grpo":
        console.print(f"would train  grpo  {grpo.describe_settings(cfg)}")
    console.print(f"would write  run   {run_dir}")


def describe_source(source: str) -> str:
    if source == "sample":
        return "sample (shipped Multilingual-Thinking-style rows)"
    path = Path(source)
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet") or path.exists():
        return f"{source} ({'found' if path.is_file() else 'NOT FOUND'})"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return (f"{source} (Hugging Face Hub id; offline: from the local cache only — without it, "
                "--dataset sample or a local file)")
    return f"{source} (Hugging Face Hub id)"


# --------------------------------------------------------------------------- small helpers


def format_counts(c: dict) -> str:
    share = 100.0 * c["trainable"] / max(c["all"], 1)
    return (f"trainable {c['trainable']:,} of {c['all']:,} parameters ({share:.2f}%): "
            f"attention {c['attention']:,}, experts {c['experts']:,}, other {c['other']:,}")


def format_data_stats(rows: dict, tokens: dict) -> str:
    parts = [f"{rows.get('train_rows', '?')} train rows", f"{rows.get('heldout_rows', 0)} held out"]
    if "prompts" in tokens:  # GRPO
        languages = ", ".join(f"{k} {n}" for k, n in tokens["target_languages"].items())
        parts.append(f"{tokens['prompts']} prompts, target languages {languages}")
    elif tokens:
        parts.append(f"tokens/row min {tokens.get('min_tokens')} median {tokens.get('median_tokens')} max {tokens.get('max_tokens')}")
        if tokens.get("trained_share") is not None:
            parts.append(f"trained share {100 * tokens['trained_share']:.1f}%")
        if tokens.get("cache"):
            parts.append(f"tokenized cache {tokens['cache']}")
    return ", ".join(parts)
