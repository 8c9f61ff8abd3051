"""Training with TRL's SFTTrainer: our few settings mapped onto SFTConfig, live progress, metrics, and
the optional experiment trackers (TensorBoard, MLflow, W&B) pointed into the run folder.

`sft_config_kwargs` is pure (tested without a model). The trainer and callbacks import transformers /
trl inside functions, after `model.import_unsloth()` has run.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..config import Config
from ..memory import headline_gib, peak_figures
from ..device import Device
from ..plan import NO_PACKING_MODEL_TYPES

# output.report_to -> the packages its Trainer callback imports (any one of them will do).
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}


class TrackingError(UserError, RuntimeError):
    """An experiment tracker that cannot be used; one line with the install command."""


def optimizer_name(cfg: Config, device: Device) -> str:
    """train.optimizer=auto: 8-bit AdamW on GPU (1/4 of fp32 Adam state), fused AdamW on CPU
    (bitsandbytes 8-bit optimizers have no CPU kernels)."""
    if cfg.train.optimizer != "auto":
        return cfg.train.optimizer
    return "adamw_8bit" if device.kind == "cuda" else "adamw_torch_fused"


def precision_flags(cfg: Config, device: Device) -> dict:
    """bf16 / fp16 autocast flags for the Trainer, from the dtype decided once at start."""
    if cfg.model.dtype == "float32":
        return {"bf16": False, "fp16": False}
    if device.kind == "cpu":
        return {"bf16": device.bf16 and cfg.model.dtype in ("auto", "bfloat16"), "fp16": False}
    bf16 = device.bf16 and cfg.model.dtype in ("auto", "bfloat16")
    return {"bf16": bf16, "fp16": not bf16}


def packing_decision(cfg: Config, device: Device, model_type: str) -> tuple[bool, str]:
    """(packing used, why) — what Unsloth will actually do with data.packing on this device and model,
    said in the log and the summary instead of claiming packing that does not happen."""
    if not cfg.data.packing:
        return False, "off (data.packing=false)"
    if device.kind != "cuda":
        return False, "off: Unsloth's CPU backend does not pack"
    if model_type in NO_PACKING_MODEL_TYPES:
        return False, f"off: Unsloth turns packing and padding-free off for {model_type} (its attention mishandles them)"
    return True, "on: rows are packed into max_seq_length sequences without cross-row attention"


def compute_dtype(cfg: Config, device: Device, weights_dtype: str) -> str:
    """The dtype the training matmuls run in: the autocast dtype when there is one, else the weights'."""
    flags = precision_flags(cfg, device)
    return "bfloat16" if flags["bf16"] else "float16" if flags["fp16"] else weights_dtype


# train.* settings that SFTConfig takes under the same name.
SAME_NAMED_TRAIN_FIELDS = ("gradient_accumulation_steps", "learning_rate", "warmup_steps", "max_steps", "weight_decay",
                           "max_grad_norm", "seed", "router_aux_loss_coef", "logging_steps")


def sft_config_kwargs(cfg: Config, device: Device, checkpoint_dir: str, packing: bool | None = None) -> dict:
    """Everything SFTConfig needs, from our config. Pure: plain values in, a dict out. `packing` is
    packing_decision's verdict (default: data.packing on a GPU)."""
    packing = cfg.data.packing and device.kind == "cuda" if packing is None else packing
    t = cfg.train
    trackers = [r for r in cfg.output.report_to if r != "none"]
    return dict(
        output_dir=checkpoint_dir,
        **{name: getattr(t, name) for name in SAME_NAMED_TRAIN_FIELDS},
        per_device_train_batch_size=t.batch_size,
        lr_scheduler_type=t.lr_scheduler,
        num_train_epochs=t.epochs,
        optim=optimizer_name(cfg, device),
        data_seed=t.seed,
        logging_first_step=True,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=None,  # rotation is ours, among complete checkpoints (checkpoints.keep_newest)
        include_num_input_tokens_seen="non_padding",  # trained tokens, saved in trainer_state.json and resumed
        report_to=trackers or "none",
        run_name=Path(checkpoint_dir).parent.name,  # the run folder's name in TensorBoard / MLflow / W&B
        max_length=cfg.model.max_seq_length,
        packing=packing,
        # Unsloth set up (offloaded) gradient checkpointing on the model; the Trainer must not replace it.
        gradient_checkpointing=False,
        disable_tqdm=True,  # the rich progress line replaces tqdm
        dataloader_num_workers=0,
        remove_unused_columns=False,
        **precision_flags(cfg, device),
    )


def build_trainer(model, tokenizer, train_dataset, cfg: Config, device: Device, run_dir: Path, callbacks=(),
                  packing: bool | None = None):
    """An SFTTrainer over the pre-tokenized dataset (input_ids + labels, masks already applied), whose
    checkpoints are marked complete by run_state.make_run_callback (public callback API only)."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**sft_config_kwargs(cfg, device, str(run_dir / "checkpoints"), packing))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    return with_our_callbacks(trainer, callbacks)


def with_our_callbacks(trainer, callbacks):
    """The trainer with our progress line instead of its printed log dicts, and our callbacks before its
    own: the progress callback adds tokens/s and peak memory to the logs that the tracker callbacks
    (TensorBoard, MLflow, W&B) then record."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    handler = trainer.callback_handler
    handler.callbacks = [*callbacks, *(c for c in handler.callbacks if all(c is not ours for ours in callbacks))]
    return trainer


@dataclass(frozen=True)
class Prepared:
    """A training method's data, ready: its statistics (for the log and summary), whether rows are
    packed and why, and `build_trainer(run_dir, callbacks)` -> the method's Trainer."""
    stats: dict
    packing: bool
    packing_why: str
    build_trainer: Callable


@dataclass(frozen=True)
class Trained:
    """What a finished trainer.train() reports, read from the Trainer's public state: optimizer steps,
    the logged losses (a resumed run's earlier ones included), trained non-padding tokens (summed over
    processes) and the training time."""
    steps: int
    losses: list[float]
    trained_tokens: int
    runtime_s: float

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def fit(trainer, resume_from: str | None = None) -> Trained:
    """Train (continuing from the checkpoint folder `resume_from`, if given) and return what it did."""
    result = trainer.train(resume_from_checkpoint=resume_from)
    state = trainer.state
    return Trained(steps=result.global_step,
                   losses=[float(r["loss"]) for r in state.log_history if "loss" in r],
                   trained_tokens=int(state.num_input_tokens_seen or 0),
                   runtime_s=float(result.metrics.get("train_runtime", 0.0)))


def missing_trackers(report_to: list[str], find_spec=None) -> list[str]:
    """The trackers in output.report_to whose package is not installed."""
    import importlib.util

    find_spec = find_spec or importlib.util.find_spec
    return [t for t in report_to if t in TRACKER_PACKAGES and not any(find_spec(p) for p in TRACKER_PACKAGES[t])]


def check_trackers(report_to: list[str], find_spec=None) -> None:
    """Before anything is loaded or written: every tracker asked for is installed (they are optional)."""
    missing = missing_trackers(report_to, find_spec)
    if missing:
        raise TrackingError(f"output.report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                            f"installed — `pip install {' '.join(missing)}` (optional extra), or remove "
                            f"{'it' if len(missing) == 1 else 'them'} from output.report_to")


def tracker_environment(report_to: list[str], run_dir: Path, env) -> dict[str, str]:
    """Environment settings that make the trackers write into the run folder: TensorBoard events in
    RUN/tensorboard, an MLflow file store in RUN/mlruns, W&B files in RUN/wandb (offline without an
    API key). Variables the user has set are left alone (an MLflow server of their own included).
    Pure: returns what to set."""
    wanted = {}
    if "tensorboard" in report_to:
        wanted["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    if "mlflow" in report_to and "MLFLOW_TRACKING_URI" not in env:
        wanted["MLFLOW_TRACKING_URI"] = Path(run_dir, "mlruns").absolute().as_uri()
        wanted["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 asks for this to use a plain folder store
    if "wandb" in report_to:
        wanted["WANDB_DIR"] = str(run_dir)
        if not env.get("WANDB_API_KEY"):
            wanted["WANDB_MODE"] = "offline"  # no key: log locally (`wandb sync` later) instead of prompting
    return {key: value for key, value in wanted.items() if key not in env}


def point_trackers_at(run_dir: Path, report_to: list[str]) -> None:
    os.environ.update(tracker_environment(report_to, run_dir, os.environ))


def make_progress_callback(run_dir: Path, device: Device, console, history: list[dict] = (), monitor=None):
    """A TrainerCallback that shows step/total, loss, lr, tokens/s, peak memory and ETA, and writes
    one JSON object per logging step to metrics.jsonl, with the memory FIELDS of memory.py (peaks
    since training began; `monitor` samples NVML and RSS). `history`: the records a resumed run keeps."""
    from transformers import TrainerCallback

    metrics_path = run_dir / "metrics.jsonl"
    memory_label = "peak VRAM" if device.kind == "cuda" else "peak RSS"

    class Progress(TrainerCallback):
        def __init__(self):
            self.start = None
            self.last_time = None
            self.last_tokens = history[-1].get("tokens", 0) if history else 0  # before a resume
            self.earlier_s = history[-1].get("elapsed_s", 0.0) if history else 0.0  # before a resume
            self.first_step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = self.last_time = time.perf_counter()
            self.first_step = state.global_step  # > 0 when resumed

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs:
                return
            now = time.perf_counter()
            # The Trainer's count of non-padding tokens (saved with checkpoints, summed over processes).
            tokens = int(getattr(state, "num_input_tokens_seen", 0) or logs.get("num_tokens", 0))
            window = max(now - (self.last_time or now), 1e-9)
            tokens_per_s = (tokens - self.last_tokens) / window if tokens else 0.0
            self.last_time, self.last_tokens = now, tokens
            elapsed = now - (self.start or now)
            eta = elapsed / max(state.global_step - self.first_step, 1) * (state.max_steps - state.global_step)
            record = {
                "step": state.global_step,
                "max_steps": state.max_steps,
                "loss": float(logs["loss"]),
                "learning_rate": float(logs.get("learning_rate", 0.0)),
                "grad_norm": float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
                "tokens": tokens,
                "tokens_per_s": round(tokens_per_s, 1),
                "elapsed_s": round(self.earlier_s + elapsed, 2),
            }
            record.update(reward_columns(logs))  # GRPO: reward, rewards/<name>/mean|std, ...
            figures = peak_figures(device.kind == "cuda", monitor)
            record.update(peak_memory_gib=round(headline_gib(figures, device.kind == "cuda"), 3), **figures)
            # The trackers' callbacks run after this one and record these too.
            logs.update(tokens_per_s=record["tokens_per_s"], peak_memory_gib=record["peak_memory_gib"])
            if not state.is_world_process_zero:
                return  # one process writes metrics.jsonl (the loss and token count are already global)
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            console.print(
                f"step {record['step']:>4}/{record['max_steps']}  loss {record['loss']:.4f}  "
                f"lr {record['learning_rate']:.2e}  {format_rewards(record)}{record['tokens_per_s']:>8.0f} tok/s  "
                f"{memory_label} {record['peak_memory_gib']:.2f} GiB  ETA {format_seconds(eta)}",
                highlight=False,
            )

    return Progress()


REWARD_LOG_KEYS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "completions/mean_length",
                   "completions/clipped_ratio")


def reward_columns(logs: dict) -> dict:
    """The GRPO figures of one Trainer log (TRL's names: reward, rewards/<name>/mean|std, kl, ...),
    as numbers; empty for SFT."""
    return {key: round(float(value), 5) for key, value in logs.items()
            if (key in REWARD_LOG_KEYS or key.startswith("rewards/")) and isinstance(value, (int, float))}


def format_rewards(record: dict) -> str:
    """'reward 0.812 (language 0.61 format 1.00)  ' for the step line; '' without rewards."""
    if "reward" not in record:
        return ""
    means = " ".join(f"{key.split('/')[1]} {value:.2f}" for key, value in record.items()
                     if key.startswith("rewards/") and key.endswith("/mean"))
    return f"reward {record['reward']:.3f} ({means})  "


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
