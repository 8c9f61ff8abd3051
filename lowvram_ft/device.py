"""The device training runs on, decided once: kind, name, memory, bf16 and compute capability, with
the reason for the log; the one GPU description bench and gpu-check record; emulating a smaller card.
Light at import: torch (and unsloth_zoo, for the CPU's bf16) load inside the functions."""
from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from dataclasses import dataclass

from .errors import UserError
from .io import GIB


class DeviceError(UserError, ValueError):
    """A device setting that cannot be used (LOWVRAM_FT_VRAM_GIB); one line that says what to set."""


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu"
    name: str
    total_gib: float | None  # GPU memory; None on CPU
    bf16: bool
    reason: str  # why this device and dtype, for the log
    compute_capability: float | None = None  # e.g. 7.5 (T4), 9.0 (H100); None on CPU


def detect_device() -> Device:
    """Where training runs and in which dtype — decided once, with the reason."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        bf16 = torch.cuda.is_bf16_supported()
        why = "GPU supports bf16" if bf16 else "GPU has no bf16 (pre-Ampere): float16"
        total = props.total_memory / GIB
        cap = os.environ.get("LOWVRAM_FT_VRAM_GIB")
        if cap:  # emulate a smaller card on a bigger one (benchmarks, tests, "will it fit on 16 GB?")
            total = min(total, emulated_card_gib(cap))
            free, card = torch.cuda.mem_get_info(0)  # creates the CUDA context, which a real card holds too
            context = max(card - free - torch.cuda.memory_reserved(0), 0)
            torch.cuda.set_per_process_memory_fraction(emulated_card_fraction(total, card, context), 0)
            why += (f"; memory capped at {total:.1f} GiB by LOWVRAM_FT_VRAM_GIB (emulated card, its "
                    f"{context / GIB:.2f} GiB CUDA context included)")
        capability = float(f"{props.major}.{props.minor}")
        return Device("cuda", props.name, total, bf16, f"cuda:0 {props.name} (compute capability {capability}); {why}",
                      capability)
    from unsloth_zoo.cpu import cpu_bf16_supported

    bf16 = bool(cpu_bf16_supported())
    bound_onednn_caches()
    why = "CPU has native bf16" if bf16 else "CPU has no native bf16: float32"
    return Device("cpu", "cpu", None, bf16, f"no CUDA GPU found: CPU ({torch.get_num_threads()} threads); {why}")


# On the CPU, bf16 matmuls run through oneDNN, which keeps each matmul it has compiled (JIT code,
# ~0.5 MiB) in two LRU caches of 1024 entries: oneDNN's own and ideep's in torch. Each batch brings
# new shapes (padded length, tokens routed to each expert): ~60 new matmuls a step fill both caches.
# Issue 11 (demo, 2-core AMD EPYC with avx512_bf16, OMP_NUM_THREADS=2, bf16): peak RSS 1.1 -> 3.2 GiB
# over 250 steps; with 64 entries each, 1.28 GiB (float32: 1.33), loss identical, ~8 more compiles a
# step (~0.3 ms each). MALLOC_ARENA_MAX=2 changed nothing (3.20); LRU_CACHE_CAPACITY=0 segfaults.
# Both variables are read once, at the first oneDNN matmul, which comes after this (importing unsloth
# and detecting the device create none), so setting os.environ here works. A value the user set wins.
ONEDNN_CACHE_ENTRIES = "64"


def bound_onednn_caches() -> None:
    """Cap oneDNN's and ideep's primitive caches (ONEDNN_CACHE_ENTRIES) before the first CPU matmul."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, ONEDNN_CACHE_ENTRIES)


def emulated_card_gib(text: str) -> float:
    """LOWVRAM_FT_VRAM_GIB as a number of GiB, or ModelError."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise DeviceError(f"LOWVRAM_FT_VRAM_GIB={text!r}: expected the emulated card's memory in GiB, e.g. 16")
    return value


def emulated_card_fraction(card_gib: float, total_bytes: int, context_bytes: int = 0) -> float:
    """torch.cuda.set_per_process_memory_fraction value that emulates a card of `card_gib` on a bigger
    one: the CUDA context (outside torch's allocator) lives on a real card too, so it comes off the card.
    Note: Unsloth sizes its loss chunks from torch.cuda.mem_get_info, which a fraction does not change."""
    if not card_gib > 0 or total_bytes <= 0:
        raise DeviceError(f"emulated card of {card_gib} GiB on a device of {total_bytes} bytes: both must be positive")
    usable = card_gib * GIB - context_bytes
    return min(max(usable / total_bytes, 0.0), 1.0)


def describe_gpu() -> dict:
    """What results are recorded with: the GPU's name, memory, compute capability, CUDA and driver
    version (the CPU's thread count without a GPU). The one device description of bench and gpu-check."""
    import torch

    if not torch.cuda.is_available():
        return {"kind": "cpu", "name": "cpu", "total_gib": None, "compute_capability": None, "cuda": None,
                "driver": None, "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(0)
    return {"kind": "cuda", "name": props.name, "total_gib": round(props.total_memory / GIB, 2),
            "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
            "driver": nvml_driver_version(), "grouped_mm": hasattr(torch, "_grouped_mm")}


def nvml_driver_version() -> str | None:
    """The NVIDIA driver version through NVML (nvidia-ml-py, an optional extra), else None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        value = pynvml.nvmlSystemGetDriverVersion()
        return value.decode() if isinstance(value, bytes) else value
    except Exception:  # noqa: BLE001 — no NVML, no driver, or the package missing: the figure is just absent
        return None


STACK = ("torch", "triton", "unsloth", "unsloth_zoo", "transformers", "trl", "peft", "accelerate", "bitsandbytes",
         "datasets", "nvidia-ml-py")


def stack_versions(names: tuple[str, ...] = STACK) -> dict[str, str | None]:
    """Python's and each package's version (None when not installed): what every result is recorded with."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
