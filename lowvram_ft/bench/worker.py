"""The case process: `python -m lowvram_ft.bench --case FILE --result FILE` measures one case and
writes its raw record. It sets the caching-allocator setting before torch is imported, applies the
emulated budget, loads the case's stack, checks that what loaded is what the case asked for, and
trains, timing each optimizer step between device syncs; memory.py's FIELDS are measured for a "load"
and a "train" phase (peaks reset after loading, as in train runs). An out-of-memory error, or any
other, becomes the record's status: this process never takes the suite down."""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

from ..gptoss_checkpoint import describe_loaded
from ..io import GIB, write_atomic
from ..memory import FIELDS, MemoryMonitor, peak_figures, reset_peaks, rss_reader
from ..device import detect_device, emulated_card_fraction
from ..model import (add_lora, import_unsloth, load_bits, load_model,
                     trainable_parameters)
from ..train.trainer import build_trainer
from .baselines import hf_trainer, load_hf
from .dataset import benchmark_dataset
from .inspection import PerExpertCalls, adapter_dtypes, compute_path
from .matrix import Case, model_route, run_config
from .metrics import allocator_setting, apply_allocator_setting, classify_loaded


def case_main(case_file: Path, result_file: Path) -> int:
    """One case in this process: read it, measure it, write its raw record (atomically)."""
    case = Case.from_dict(json.loads(case_file.read_text(encoding="utf-8")))
    record = measure_case(case, result_file.with_suffix(".heartbeat.json"))
    write_atomic(result_file, json.dumps(record, default=str))
    return 0


class Heartbeat:
    """MemoryMonitor's on_sample: writes the phase and its memory FIELDS so far (GiB) to a file about
    twice a second, so that a case killed mid-way still reports the memory it had reached."""

    def __init__(self, path: Path):
        self.path, self.phase = path, "start"

    def figures(self, monitor: MemoryMonitor) -> dict:
        return {"phase": self.phase, **peak_figures(monitor.gpu, monitor)}

    def __call__(self, monitor: MemoryMonitor) -> None:
        try:
            write_atomic(self.path, json.dumps(self.figures(monitor)))
        except OSError:
            pass


def measure_case(case: Case, heartbeat_file: Path) -> dict:
    """Load, wrap in LoRA and train one case; the raw figures (never raises for OOM or errors)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    allocator = allocator_setting(os.environ, installed_torch_version())
    apply_allocator_setting(allocator, os.environ)  # before torch is imported: it reads the setting once
    allocator["set_before_torch"] = "torch" not in sys.modules
    gpu = gpu_visible()
    heartbeat = Heartbeat(heartbeat_file)
    monitor = MemoryMonitor(gpu, on_sample=heartbeat).start()  # NVML baseline before CUDA is initialised
    record: dict[str, Any] = {"status": "error", "error": None}
    try:
        import_stack(case.stack)
        train_case(case, monitor, heartbeat, record)
    except BaseException as error:  # noqa: BLE001 — every failure becomes a record, the suite goes on
        traceback.print_exc()  # into the case's log
        record.update(status="OOM" if is_oom(error) else "error", error=f"{type(error).__name__}: {first_line(error)}",
                      memory_at_failure_gib=heartbeat.figures(monitor))  # before anything is freed
    finally:
        monitor.stop()
    record["allocator"] = {**allocator, "after_run": os.environ.get(allocator["variable"])}
    record["unsloth_imported"] = unsloth_imported()
    if case.stack == "hf" and record["unsloth_imported"]:
        record.update(status="error", error="unsloth was imported in the hf process: the comparison is void")
    return record


def installed_torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch, read from its metadata without importing it."""
    match = re.match(r"(\d+)\.(\d+)", version("torch"))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def import_stack(stack: str) -> None:
    """The stack's libraries, imported before anything is measured (so load memory is the model's):
    Unsloth first for ours (it patches transformers, trl and peft), never for hf."""
    if stack == "lowvram_ft":
        import_unsloth()
    import bitsandbytes  # noqa: F401  (describe_loaded; 8-bit optimizers)
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401


def gpu_visible() -> bool:
    """Whether this process will train on a GPU, asked through NVML so CUDA is not initialised yet."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch.cuda.is_available()


def unsloth_imported() -> bool:
    return any(m == "unsloth" or m.startswith(("unsloth.", "unsloth_zoo")) for m in sys.modules)


def is_oom(error: BaseException) -> bool:
    names = {t.__name__ for t in type(error).__mro__}
    return bool(names & {"OutOfMemoryError", "MemoryError"}) or "out of memory" in str(error).lower()


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines() or [""])[0][:400]


def train_case(case: Case, monitor: MemoryMonitor, heartbeat: Heartbeat, record: dict) -> None:
    """The measurement proper, filling `record` as it goes (a failure keeps what was measured before
    it): budget and load (load phase: memory, what loaded), the check that it is what the case asked
    for, the data, training (train phase: memory, timings), and what ran."""
    import torch

    gpu = monitor.gpu
    model, tokenizer, device = load_phase(case, monitor, heartbeat, record)
    record.update(trainable_parameters=trainable_parameters(model), adapter_dtypes=adapter_dtypes(model))
    status, reason = classify_loaded(record["load_settings"]["requested_bits"], record["loaded"])
    if status != "ok":  # training it would measure another model than the case names
        record.update(status=status, error=reason, **compute_path(model, None))
        return
    dataset, record["tokens_per_step"], record["data_digest"] = benchmark_dataset(case, tokenizer, model)
    timer = make_step_timer(torch.cuda.synchronize if gpu else (lambda: None))
    expert_calls = PerExpertCalls(model)
    reset_peaks(gpu, monitor)  # the training phase's peaks start here, as in train runs (pipeline.train)
    heartbeat.phase = "train"
    make_trainer(case, model, tokenizer, dataset, device, timer).train()
    record["memory"]["train"] = peak_figures(gpu, monitor)
    record.update(step_times_s=[round(t, 6) for t in timer.step_times], losses=timer.losses, status="ok",
                  load_average=round(os.getloadavg()[0], 2), **compute_path(model, expert_calls))


def load_phase(case: Case, monitor: MemoryMonitor, heartbeat: Heartbeat, record: dict) -> tuple:
    """(model with LoRA, tokenizer, Device) after the budget and the load; adds to `record` the budget,
    the load phase's memory FIELDS (from the start of the process, as in train runs), what is held after
    loading (load_gib: allocated on GPU, RSS growth on CPU) and what loaded (describe_loaded)."""
    import torch

    gpu = monitor.gpu
    record["budget"] = apply_budget(case, monitor) if gpu else None
    read_rss = rss_reader()
    heartbeat.phase = "load"
    rss_before = read_rss()
    model, tokenizer, device, settings = load_stack(case, gpu)
    held = torch.cuda.memory_allocated() if gpu else read_rss() - rss_before
    record.update(load_settings=settings, load_gib=round(held / GIB, 3), loaded=describe_loaded(model),
                  memory={"load": peak_figures(gpu, monitor), "train": dict.fromkeys(FIELDS)})
    return model, tokenizer, device


def apply_budget(case: Case, monitor: MemoryMonitor) -> dict:
    """Create the CUDA context, measure it, and cap torch's allocator to the emulated card."""
    import torch

    torch.zeros(1, device="cuda")  # the context exists from here on
    used = monitor.sample()
    context = used - monitor.baseline if used is not None and monitor.baseline is not None else 0
    total = torch.cuda.get_device_properties(0).total_memory
    info = {"device_total_gib": round(total / GIB, 3), "cuda_context_gib": round(context / GIB, 3),
            "budget_gib": case.budget_gib, "memory_fraction": None, "emulated": case.budget_gib is not None}
    if case.budget_gib is not None:
        fraction = emulated_card_fraction(case.budget_gib, total, context)
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
        info["memory_fraction"] = round(fraction, 6)
    return info


def load_stack(case: Case, gpu: bool):
    """(model with LoRA, tokenizer, Device, settings: how it was loaded, incl. requested_bits)."""
    if case.stack == "lowvram_ft":
        return load_lowvram_ft(case)
    return load_hf(case, gpu)


def load_lowvram_ft(case: Case):
    """Our stack exactly as a train run loads it: lowvram_ft.model with the case's Config."""
    cfg = run_config(case)
    device = detect_device()
    model, tokenizer = load_model(cfg, device)
    model = add_lora(model, cfg)
    bits = load_bits(cfg, device)
    settings = {"requested_bits": bits, "weights": bits, "route": model_route(case),
                "gradient_checkpointing": cfg.model.gradient_checkpointing, "optimizer": case.optimizer,
                "device_reason": device.reason}
    return model, tokenizer, device, settings


def make_step_timer(sync: Callable[[], None]):
    """A TrainerCallback timing each optimizer step between device syncs and keeping the logged losses."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_times: list[float] = []
            self.losses: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.step_times.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def make_trainer(case: Case, model, tokenizer, dataset, device, timer):
    """The case's stack's trainer, with `timer` as its callback; it saves nothing (save_strategy "no"),
    so its run folder is a temporary one."""
    cfg = run_config(case)
    run_dir = Path(tempfile.mkdtemp(prefix="lowvram-bench-"))
    atexit.register(shutil.rmtree, run_dir, True)
    if case.stack == "lowvram_ft":
        return build_trainer(model, tokenizer, dataset, cfg, device, run_dir, [timer])
    return hf_trainer(cfg, model, tokenizer, dataset, device, run_dir, timer)
