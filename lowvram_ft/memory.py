"""Memory figures with one meaning everywhere: metrics.jsonl, summary.json and bench rows carry the
same fields, reset at the same points (after the model is loaded, before the first training step).

- `peak_allocated_gib`: torch's peak allocated CUDA memory (tensors alive at once).
- `peak_reserved_gib`: torch's peak reserved CUDA memory (allocated + the caching allocator's free
  blocks): what the process needs from the card, and the figure the planner predicts.
- `device_peak_gib`: the device's peak used memory as NVML reports it (sampled every 10 ms by
  `MemoryMonitor`): reserved + the CUDA context + other processes — what `nvidia-smi` shows.
- `peak_rss_gib`: the process's peak resident set (host RAM), sampled the same way.
GPU-only fields are None on the CPU. Light at import: torch, pynvml and psutil load when used.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

from .io import GIB

MONITOR_INTERVAL_S = 0.01
FIELDS = ("peak_allocated_gib", "peak_reserved_gib", "device_peak_gib", "peak_rss_gib")


class MemoryMonitor:
    """Samples device memory used (NVML, when `gpu`) and the resident set (psutil) every 10 ms in a
    thread and keeps their peaks since the last `reset()`. `on_sample` (optional) is called about twice
    a second, e.g. to write a heartbeat file that outlives a killed process."""

    def __init__(self, gpu: bool, on_sample: Callable[["MemoryMonitor"], None] | None = None):
        self.gpu, self.on_sample = gpu, on_sample
        self._read_device = nvml_reader() if gpu else None
        self._read_rss = rss_reader()
        self.baseline = self._read_device() if self._read_device else None  # before any CUDA context
        self.device_peak = self.rss_peak = 0
        self.overall_device_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "MemoryMonitor":
        self._thread.start()
        return self

    def _run(self) -> None:
        last_call = 0.0
        while not self._stop.wait(MONITOR_INTERVAL_S):
            self.sample()
            if self.on_sample and time.monotonic() - last_call > 0.5:
                last_call = time.monotonic()
                self.on_sample(self)

    def sample(self) -> int | None:
        """Read both gauges now; returns the device's used bytes (None without NVML)."""
        used = self._read_device() if self._read_device else None
        if used is not None:
            self.device_peak = max(self.device_peak, used)
            self.overall_device_peak = max(self.overall_device_peak, used)
        self.rss_peak = max(self.rss_peak, self._read_rss())
        return used

    def reset(self) -> None:
        self.device_peak = self.rss_peak = 0
        self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=1)
        self.sample()


def nvml_reader() -> Callable[[], int] | None:
    """Used bytes of the first visible GPU through NVML, or None (no NVML: the torch figures remain)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
        return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # noqa: BLE001
        return None


def rss_reader() -> Callable[[], int]:
    try:
        import psutil

        process = psutil.Process()
        return lambda: int(process.memory_info().rss)
    except ImportError:
        return lambda: peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The process's lifetime peak resident set (cannot be reset; MemoryMonitor's can)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peaks(gpu: bool, monitor: MemoryMonitor | None = None) -> None:
    """Start a new phase: torch's and the monitor's peaks from now on."""
    if gpu:
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
    if monitor is not None:
        monitor.reset()


def peak_figures(gpu: bool, monitor: MemoryMonitor | None = None) -> dict[str, float | None]:
    """The FIELDS since the last reset_peaks, in GiB (3 decimals)."""
    figures: dict[str, float | None] = dict.fromkeys(FIELDS)
    if gpu:
        import torch

        if torch.cuda.is_initialized():
            figures["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
            figures["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
        if monitor is not None and monitor.device_peak:
            figures["device_peak_gib"] = round(monitor.device_peak / GIB, 3)
    rss = monitor.rss_peak if monitor is not None and monitor.rss_peak else peak_rss_bytes()
    figures["peak_rss_gib"] = round(rss / GIB, 3)
    return figures


def headline_gib(figures: dict, gpu: bool) -> float:
    """The one number a progress line shows: peak reserved VRAM on a GPU, peak RSS on the CPU."""
    value = figures["peak_reserved_gib"] if gpu else figures["peak_rss_gib"]
    return float(value or 0.0)

