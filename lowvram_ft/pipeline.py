"""The training story, top to bottom: `train(cfg)`.

resolve run folder → decide device → load model → add LoRA → build dataset → train → save →
evaluate (base vs tuned) → report. Each step is one call whose result feeds the next.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from datetime import datetime
from pathlib import Path

from .config import EMBEDDED_MODEL, Config, to_yaml


class RunDirError(RuntimeError):
    """The output folder cannot be used as asked; the message says what to do."""


def train(cfg: Config, *, force: bool = False, console=None) -> Path:
    """Run one fine-tuning job end to end; returns the run folder."""
    from rich.console import Console

    from . import model as models
    from .data import load_data, tokenize_data
    from .train import build_trainer, make_progress_callback, peak_memory_gib

    console = console or Console(highlight=False)
    started = time.perf_counter()
    run_dir = prepare_run_dir(cfg)
    log(console, "config", f"resolved config saved to {run_dir / 'config.yaml'}")

    models.import_unsloth()
    device = models.detect_device()
    log(console, "device", device.reason)
    check_fit(cfg, device, force, console)

    model, tokenizer = models.load_model(cfg, device)
    log(console, "model", f"{cfg.model.name}: {type(model).__name__}, dtype {model.dtype}, "
        f"weights {models.load_bits(cfg, device)}, load peak {peak_memory_gib(device):.2f} GiB")
    model = models.add_lora(model, cfg)
    counts = models.trainable_parameters(model)
    models.check_trainable(counts, cfg, is_moe=getattr(model.config, "model_type", "") == "gpt_oss")
    log(console, "lora", format_counts(counts))

    data = load_data(cfg)
    tokenized = tokenize_data(data.train, tokenizer, cfg)
    log(console, "data", format_data_stats(data.stats, tokenized.stats))

    progress = make_progress_callback(run_dir, device, console)
    trainer = build_trainer(model, tokenizer, tokenized.dataset, cfg, device, run_dir, [progress])
    result = trainer.train()
    peak = peak_memory_gib(device)
    log(console, "train", f"{result.global_step} steps, final loss {progress.losses[-1] if progress.losses else float('nan'):.4f}, "
        f"peak {'VRAM' if device.kind == 'cuda' else 'RSS'} {peak:.2f} GiB")

    adapter_dir = save_adapter(model, tokenizer, run_dir)
    log(console, "save", f"adapter and tokenizer in {adapter_dir}")
    summary = build_summary(cfg, device, result, progress, counts, data.stats, tokenized.stats, peak,
                            time.perf_counter() - started)
    write_json_atomic(run_dir / "summary.json", summary)

    if cfg.eval.enabled:
        evaluate_run(model, tokenizer, cfg, data, run_dir, console)
    log(console, "done", f"results in {run_dir}")
    return run_dir


def evaluate_run(model, tokenizer, cfg: Config, data, run_dir: Path, console) -> None:
    """Base (adapter off) vs tuned (adapter on), same prompts and seeds; report in the run folder."""
    try:
        from .evaluate import evaluate_model
    except ImportError:
        log(console, "eval", "skipped: the evaluation module is not available in this build")
        return
    evaluate_model(model, tokenizer, cfg, run_dir, heldout=data.heldout, console=console)


# --------------------------------------------------------------------------- steps


def default_run_dir(cfg: Config) -> Path:
    short = "embedded" if cfg.model.name == EMBEDDED_MODEL else Path(cfg.model.name.rstrip("/")).name
    return Path("runs") / f"{short}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run folder (refusing to clobber a finished run) and save the resolved config in it."""
    run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: is a file — pass a folder to --output")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        finished = (run_dir / "summary.json").is_file()
        if not cfg.output.overwrite:
            what = "holds a finished run" if finished else "holds an unfinished run"
            raise RunDirError(f"{run_dir}: {what} — pass --overwrite to replace it, or choose another --output")
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
    except OSError as error:
        raise RunDirError(f"{run_dir}: cannot write there ({error.strerror}) — choose a writable --output") from None
    return run_dir


def check_fit(cfg: Config, device, force: bool, console) -> None:
    """On a GPU, predict the peak before loading and stop early when it cannot fit (unless --force)."""
    if device.kind != "cuda" or device.total_gib is None:
        return
    try:
        from .plan import fit_check
    except ImportError:
        return
    verdict = fit_check(cfg, device.total_gib)
    if verdict is None:
        return
    fits, text = verdict
    log(console, "plan", text.splitlines()[0] if text else "")
    if not fits and not force:
        console.print(text)
        raise RunDirError(f"predicted peak exceeds this GPU's {device.total_gib:.1f} GiB — apply a recommendation "
                          "above, or pass --force to try anyway")


def save_adapter(model, tokenizer, run_dir: Path) -> Path:
    """Adapter (safetensors) + tokenizer into run_dir/adapter, written under a temporary name first."""
    final = run_dir / "adapter"
    staging = run_dir / ".adapter.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


def build_summary(cfg, device, result, progress, counts, data_stats, token_stats, peak, wall_s) -> dict:
    return {
        "model": cfg.model.name,
        "device": {"kind": device.kind, "name": device.name, "total_gib": device.total_gib, "reason": device.reason},
        "steps": result.global_step,
        "final_loss": progress.losses[-1] if progress.losses else None,
        "first_loss": progress.losses[0] if progress.losses else None,
        "trained_tokens": progress.trained_tokens,
        "wall_time_s": round(wall_s, 2),
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "peak_memory_gib": round(peak, 3),
        "peak_memory_kind": "peak_reserved_vram" if device.kind == "cuda" else "peak_rss",
        "trainable_parameters": counts,
        "data": {"rows": data_stats, "tokens": token_stats},
        "versions": versions(),
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "unsloth", "unsloth_zoo", "transformers", "trl", "peft", "bitsandbytes", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------- dry run


def dry_run(cfg: Config, console=None) -> None:
    """Print the resolved config and what would be loaded, importing no torch/transformers/trl/unsloth."""
    from rich.console import Console

    console = console or Console(highlight=False)
    console.print(to_yaml(cfg).rstrip())
    run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg)
    model = ("embedded tiny gpt-oss (built offline on first use)" if cfg.model.name == EMBEDDED_MODEL
             else cfg.model.name)
    bits = cfg.model.load_in if cfg.model.load_in != "auto" else "4bit on a GPU, 16bit on CPU"
    console.print(f"\nwould load   model {model} ({'full fine-tuning' if cfg.model.full_finetuning else 'LoRA r=%d' % cfg.lora.r}, weights {bits})")
    for source in cfg.data.dataset:
        console.print(f"would read   data  {describe_source(source)}")
    console.print(f"would write  run   {run_dir}")


def describe_source(source: str) -> str:
    if source == "sample":
        return "sample (shipped Multilingual-Thinking-style rows)"
    path = Path(source)
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet") or path.exists():
        return f"{source} ({'found' if path.is_file() else 'NOT FOUND'})"
    return f"{source} (Hugging Face Hub id)"


# --------------------------------------------------------------------------- small helpers


def log(console, step: str, message: str) -> None:
    """One greppable line per step: `[lowvram_ft] step: message`."""
    console.print(f"[lowvram_ft] {step}: {message}", highlight=False, markup=False)


def format_counts(c: dict) -> str:
    share = 100.0 * c["trainable"] / max(c["all"], 1)
    return (f"trainable {c['trainable']:,} of {c['all']:,} parameters ({share:.2f}%): "
            f"attention {c['attention']:,}, experts {c['experts']:,}, other {c['other']:,}")


def format_data_stats(rows: dict, tokens: dict) -> str:
    parts = [f"{rows.get('train_rows', '?')} train rows", f"{rows.get('heldout_rows', 0)} held out"]
    if tokens:
        parts.append(f"tokens/row min {tokens.get('min_tokens')} median {tokens.get('median_tokens')} max {tokens.get('max_tokens')}")
        if tokens.get("trained_share") is not None:
            parts.append(f"trained share {100 * tokens['trained_share']:.1f}%")
        if tokens.get("cache"):
            parts.append(f"tokenized cache {tokens['cache']}")
    return ", ".join(parts)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")
