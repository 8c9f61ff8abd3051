"""Loading a model through Unsloth and wrapping it with LoRA.

`import_unsloth()` is the one place unsloth is imported; it must run before trl / transformers / peft
are imported anywhere in the process, because it patches them. Device and dtype are decided once in
`detect_device()` and passed along, never re-tested.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .config import EMBEDDED_MODEL, EMBEDDED_MODELS, Config

MOE_EXPERT_PARAMETERS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class ModelError(UserError, RuntimeError):
    """A model that cannot be found, reached or loaded; the message is one line that says what to do."""


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu"
    name: str
    total_gib: float | None  # GPU memory; None on CPU
    bf16: bool
    reason: str  # why this device and dtype, for the log
    compute_capability: float | None = None  # e.g. 7.5 (T4), 9.0 (H100); None on CPU


# Library output a user cannot act on, silenced unless --verbose (LOWVRAM_FT_VERBOSE=1): torch's
# deprecation notices for torchao's enums, bitsandbytes' optional CPU kernel package, and per-tensor /
# per-row progress bars for loads and dataset passes that take well under a second at our sizes.
QUIET_LOGGERS = ("torch.utils._pytree", "bitsandbytes.backends.cpu.ops")
QUIET_PROGRESS = ("Loading weights",)
VERBOSE_ENV = "LOWVRAM_FT_VERBOSE"


def import_unsloth():
    """Import unsloth first (it patches transformers, trl and peft); the only import site in the package."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no network call home from a training tool
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_known_noise()
    try:
        import unsloth  # noqa: F401  (must precede trl / transformers / peft)
    except ImportError as error:
        raise ModelError(f"unsloth is not importable ({error}) — run `make venv` (README, Installation)") from None
    quiet_progress_bars()
    return unsloth


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_known_noise() -> None:
    """Silence the known-harmless warnings (QUIET_LOGGERS) before the libraries are imported."""
    if verbose():
        return
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # datasets' map/filter bars


def quiet_progress_bars() -> None:
    """No weight-loading bar (QUIET_PROGRESS); Hub download bars stay, through transformers' public hook."""
    if verbose():
        return
    from transformers.utils import logging as hf_logging

    def hook(factory, args, kwargs):
        if kwargs.get("desc") in QUIET_PROGRESS:
            kwargs = {**kwargs, "disable": True}
        return factory(*args, **kwargs)

    hf_logging.set_tqdm_hook(hook)


def detect_device() -> Device:
    """Where training runs and in which dtype — decided once, with the reason."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        bf16 = torch.cuda.is_bf16_supported()
        why = "GPU supports bf16" if bf16 else "GPU has no bf16 (pre-Ampere): float16"
        total = props.total_memory / 2**30
        cap = os.environ.get("LOWVRAM_FT_VRAM_GIB")
        if cap:  # emulate a smaller card on a bigger one (benchmarks, tests, "will it fit on 16 GB?")
            total = min(total, emulated_card_gib(cap))
            free, card = torch.cuda.mem_get_info(0)  # creates the CUDA context, which a real card holds too
            context = max(card - free - torch.cuda.memory_reserved(0), 0)
            torch.cuda.set_per_process_memory_fraction(emulated_card_fraction(total, card, context), 0)
            why += (f"; memory capped at {total:.1f} GiB by LOWVRAM_FT_VRAM_GIB (emulated card, its "
                    f"{context / 2**30:.2f} GiB CUDA context included)")
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
        raise ModelError(f"LOWVRAM_FT_VRAM_GIB={text!r}: expected the emulated card's memory in GiB, e.g. 16")
    return value


def emulated_card_fraction(card_gib: float, total_bytes: int, context_bytes: int = 0) -> float:
    """torch.cuda.set_per_process_memory_fraction value that emulates a card of `card_gib` on a bigger
    one: the CUDA context (outside torch's allocator) lives on a real card too, so it comes off the card.
    Note: Unsloth sizes its loss chunks from torch.cuda.mem_get_info, which a fraction does not change."""
    if not card_gib > 0 or total_bytes <= 0:
        raise ModelError(f"emulated card of {card_gib} GiB on a device of {total_bytes} bytes: both must be positive")
    usable = card_gib * 2**30 - context_bytes
    return min(max(usable / total_bytes, 0.0), 1.0)


def input_device(model):
    """Where a model's inputs go: its compute device. `model.device`, which Unsloth points at the GPU when
    the input embedding is offloaded to host RAM (model.offload_embedding) — the first parameter is then
    the CPU embedding, and inputs placed there fail after training, in the probe, evaluation and chat."""
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


def resolve_model_path(name: str) -> str:
    """A local folder, the embedded model's folder, or the Hub id unchanged. Raises ModelError for a
    path that does not exist (a typo should not turn into a Hub lookup)."""
    if name in EMBEDDED_MODELS:
        from .embedded import embedded_model_dir

        return str(embedded_model_dir(name))
    path = Path(os.path.expanduser(name))  # ~unknown-user stays as typed (Path.expanduser raises)
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelError(f"{name}: folder has no config.json — point --model at a saved model folder")
        return str(path)
    if path.exists():
        raise ModelError(f"{name}: is a file — --model takes a Hub id (org/name) or a model folder")
    if looks_like_path(name):
        raise ModelError(f"{name}: no such folder — check the path, or pass a Hub id like unsloth/gpt-oss-20b")
    return name


def looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'org/name' without path punctuation; anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name


def is_gpt_oss(name: str, model_type: str | None = None) -> bool:
    return model_type == "gpt_oss" or "gpt-oss" in name.lower() or name == EMBEDDED_MODEL


def load_bits(cfg: Config, device: Device) -> str:
    """'4bit' | '8bit' | '16bit' — what model.load_in=auto means on this device."""
    if cfg.model.full_finetuning:
        return "16bit"
    if cfg.model.load_in != "auto":
        return cfg.model.load_in
    return "4bit" if device.kind == "cuda" else "16bit"


def load_model(cfg: Config, device: Device):
    """(model, tokenizer) through FastLanguageModel.from_pretrained; errors become one-line ModelErrors."""
    unsloth = import_unsloth()
    path = resolve_model_path(cfg.model.name)
    bits = load_bits(cfg, device)
    dtype = None if cfg.model.dtype == "auto" else getattr(__import__("torch"), cfg.model.dtype)
    try:
        model, tokenizer = unsloth.FastLanguageModel.from_pretrained(
            model_name=path,
            max_seq_length=cfg.model.max_seq_length,
            dtype=dtype,
            load_in_4bit=bits == "4bit",
            load_in_8bit=bits == "8bit",
            load_in_16bit=bits == "16bit",
            full_finetuning=cfg.model.full_finetuning,
            use_gradient_checkpointing=checkpointing_value(cfg.model.gradient_checkpointing),
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
            # Only when asked: otherwise Unsloth's own automatic choice stands.
            **({"offload_embedding": True} if cfg.model.offload_embedding else {}),
        )
    except Exception as error:  # noqa: BLE001 — translated into one actionable line
        raise explain_load_error(cfg.model.name, error) from error
    if cfg.model.tokenizer == "gpt-oss":
        from .gptoss_tokenizer import load_gptoss_tokenizer

        tokenizer = load_gptoss_tokenizer()
    elif cfg.model.tokenizer:
        tokenizer = load_tokenizer(cfg.model.tokenizer)
    return model, tokenizer


def load_tokenizer(name: str):
    """A tokenizer by name: 'gpt-oss' (offline o200k_harmony), 'embedded', a folder or a Hub id."""
    if name == "gpt-oss":
        from .gptoss_tokenizer import load_gptoss_tokenizer

        return load_gptoss_tokenizer()
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001
        raise explain_load_error(name, error) from error


def checkpointing_value(setting: str):
    return {"unsloth": "unsloth", "true": True, "false": False}[setting]


def explain_load_error(name: str, error: Exception) -> ModelError:
    """Turn Hub / file errors into one line naming the model and the way out."""
    text = f"{type(error).__name__}: {error}"
    first = text.splitlines()[0][:300]
    offline = any(s in text for s in ("offline", "OfflineModeIsEnabled", "ConnectError", "Connection", "resolve",
                                      "couldn't connect", "LocalEntryNotFound", "Max retries"))
    missing = any(s in text for s in ("RepositoryNotFound", "404", "is not a local folder and is not a valid model"))
    if offline or missing:
        return ModelError(
            f"{name}: cannot load this model from the Hugging Face Hub ({first}) — check the id, or download it "
            f"where there is network (`hf download {name} --local-dir DIR`) and pass --model DIR")
    if isinstance(error, (MemoryError,)) or "out of memory" in text.lower():
        return ModelError(f"{name}: out of memory while loading ({first}) — try model.load_in=4bit or a smaller model")
    return ModelError(f"{name}: could not be loaded ({first})")


def expert_target_parameters(model, target_modules: list[str]) -> list[str]:
    """PEFT target_parameters for fused MoE expert weights (gpt-oss: mlp.experts.gate_up_proj / down_proj)
    selected by the usual projection names, so the experts train whatever the device. Empty when the
    model has no fused expert Parameters (dense models, or 4-bit checkpoints with per-expert linears,
    which target_modules already reaches)."""
    import torch

    wanted = set(target_modules)
    found = set()
    for name, param in model.named_parameters():
        match = re.search(r"(mlp\.experts\.(gate_up_proj|down_proj))$", name)
        if match and isinstance(param, torch.nn.Parameter) and param.dim() == 3:
            if wanted & set(MOE_EXPERT_PARAMETERS[match.group(2)]):
                found.add(match.group(1))
    return sorted(found)


def add_lora(model, cfg: Config):
    """Wrap the model in LoRA adapters (no-op for full fine-tuning); experts included for MoE."""
    unsloth = import_unsloth()
    if cfg.model.full_finetuning:
        return model
    lora = cfg.lora
    kwargs = {}
    experts = expert_target_parameters(model, lora.target_modules)
    if experts:
        kwargs["target_parameters"] = experts
    if ties_trained_embeddings(model, lora.modules_to_save):
        # One trained matrix for a tied pair on every device: Unsloth's GPU path turns this on by itself
        # when both names are listed, its CPU path never does (two diverging copies, and a merge that
        # keeps only one). PEFT then trains embed_tokens and ties lm_head to it.
        kwargs["ensure_weight_tying"] = True
    return unsloth.FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        use_rslora=lora.use_rslora,
        modules_to_save=list(lora.modules_to_save) or None,
        use_gradient_checkpointing=checkpointing_value(cfg.model.gradient_checkpointing),
        random_state=cfg.train.seed,
        max_seq_length=cfg.model.max_seq_length,
        **kwargs,
    )


def ties_trained_embeddings(model, modules_to_save: list[str]) -> bool:
    """Whether the model ties lm_head to embed_tokens (small Qwen3, Gemma) and the input embedding is
    trained in full. With lm_head alone Unsloth's GPU path does not tie, so neither do we: the trainable
    set must not depend on the device."""
    return bool(getattr(model.config, "tie_word_embeddings", False)) and "embed_tokens" in modules_to_save


def trainable_parameters(model) -> dict[str, int]:
    """Trainable parameter counts split into attention / experts / other, plus total and all."""
    counts = {"attention": 0, "experts": 0, "other": 0}
    total = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if not param.requires_grad:
            continue
        counts[parameter_group(name)] += param.numel()
    counts["trainable"] = sum(counts.values())
    counts["all"] = total
    return counts


def parameter_group(name: str) -> str:
    if "experts" in name:
        return "experts"
    if "self_attn" in name or ".attn." in name or "attention" in name:
        return "attention"
    return "other"


def check_trainable(counts: dict[str, int], cfg: Config, is_moe: bool) -> None:
    """Refuse a run whose trainable set silently misses what was asked for."""
    if counts["trainable"] == 0:
        raise ModelError("no trainable parameters — check lora.target_modules against the model's module names")
    wants_mlp = bool(set(cfg.lora.target_modules) & {"gate_proj", "up_proj", "down_proj"})
    if is_moe and wants_mlp and not cfg.model.full_finetuning and counts["experts"] == 0:
        raise ModelError("lora.target_modules names MLP projections but no expert weight is trainable — "
                         "this Unsloth/PEFT version did not route them to the MoE experts")
