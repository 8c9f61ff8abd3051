"""Loading a model through Unsloth and wrapping it with LoRA.

`import_unsloth()` imports unsloth itself, before trl / transformers / peft are imported anywhere in the
process, because it patches them; every other unsloth import of the package (its chat templates, here)
runs after it. Device and dtype are decided once, by `device.detect_device()`, and passed along.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .device import Device
from .errors import UserError, is_out_of_memory
from .config import EMBEDDED_MODEL, EMBEDDED_MODELS, PACKAGED_MODELS, Config
from .embedded import embedded_model_dir
from .gptoss_tokenizer import load_gptoss_tokenizer
from .packaged import gguf_model_dir, packaged_model_dir
from .terminal import verbose

MOE_EXPERT_PARAMETERS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class ModelError(UserError, RuntimeError):
    """A model that cannot be found, reached or loaded; the message is one line that says what to do."""


# Library output a user cannot act on, silenced unless --verbose (LOWVRAM_FT_VERBOSE=1): torch's
# deprecation notices for torchao's enums, bitsandbytes' optional CPU kernel package, and per-tensor /
# per-row progress bars for loads and dataset passes that take well under a second at our sizes.
QUIET_LOGGERS = ("torch.utils._pytree", "bitsandbytes.backends.cpu.ops")
QUIET_PROGRESS = ("Loading weights", "Writing model shards")


def import_unsloth():
    """Import unsloth first (it patches transformers, trl and peft); the only import site in the package."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no network call home from a training tool
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_known_noise()
    try:
        import unsloth  # noqa: F401  (must precede trl / transformers / peft)
    except ImportError as error:
        raise ModelError(f"unsloth is not importable ({error}) — run `make venv` (docs/installation.md)") from None
    quiet_progress_bars()
    return unsloth


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


def input_device(model):
    """Where a model's inputs go: its compute device. `model.device`, which Unsloth points at the GPU when
    the input embedding is offloaded to host RAM (model.offload_embedding) — the first parameter is then
    the CPU embedding, and inputs placed there fail after training, in the probe, evaluation and chat."""
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


def resolve_model_path(name: str) -> str:
    """A local folder, the embedded or packaged model's folder (built on first use), the folder converted
    from a .gguf file, or the Hub id unchanged. Raises ModelError for a path that does not exist (a typo
    should not turn into a Hub lookup)."""
    if name in EMBEDDED_MODELS:
        return str(embedded_model_dir(name))
    if name in PACKAGED_MODELS:
        return str(packaged_model_dir(name))
    path = Path(os.path.expanduser(name))  # ~unknown-user stays as typed (Path.expanduser raises)
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelError(f"{name}: folder has no config.json — point --model at a saved model folder")
        return str(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(gguf_model_dir(path))
    if path.exists():
        raise ModelError(f"{name}: is a file — --model takes a Hub id (org/name), a model folder or a .gguf file")
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
        tokenizer = load_gptoss_tokenizer()
    elif cfg.model.tokenizer:
        tokenizer = load_tokenizer(cfg.model.tokenizer)
    return model, with_chat_template(tokenizer, cfg.data.chat_template)


def load_tokenizer(name: str):
    """A tokenizer by name: 'gpt-oss' (offline o200k_harmony), 'embedded', a folder or a Hub id."""
    if name == "gpt-oss":
        return load_gptoss_tokenizer()
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001
        raise explain_load_error(name, error) from error


def load_tokenizer_for(cfg: Config):
    """The tokenizer a run with this config renders with (model.tokenizer or the model's own, with
    data.chat_template applied), without loading the model."""
    if cfg.data.chat_template:
        import_unsloth()  # before load_tokenizer imports transformers
    return with_chat_template(load_tokenizer(cfg.model.tokenizer or cfg.model.name), cfg.data.chat_template)


def with_chat_template(tokenizer, name: str | None):
    """The tokenizer with Unsloth's registered chat template `name` (data.chat_template); as it is for None."""
    if name is None:
        return tokenizer
    import_unsloth()
    from unsloth.chat_templates import get_chat_template

    return get_chat_template(tokenizer, chat_template=name)


def checkpointing_value(setting: str):
    return {"unsloth": "unsloth", "true": True, "false": False}[setting]


def explain_load_error(name: str, error: BaseException) -> ModelError:
    """Turn a load error into one line naming the model and the way out, by the Hub's typed exceptions
    found anywhere in its chain (transformers and Unsloth re-raise them as OSError / RuntimeError)."""
    from huggingface_hub import errors as hub

    first = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    cause = hub_cause(error, (hub.GatedRepoError, hub.RepositoryNotFoundError, hub.RevisionNotFoundError,
                              hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled, MemoryError))
    page = f"https://huggingface.co/{name}"
    if isinstance(cause, hub.GatedRepoError):
        return ModelError(f"{name}: a gated model — accept its terms on {page}, then set HF_TOKEN to a token of "
                          "that account")
    if isinstance(cause, hub.RepositoryNotFoundError):
        return ModelError(f"{name}: no such model on the Hugging Face Hub (or a private one: set HF_TOKEN) — "
                          "check the id, or pass a local folder")
    if isinstance(cause, hub.RevisionNotFoundError):
        return ModelError(f"{name}: the requested revision does not exist on the Hub ({first})")
    if isinstance(cause, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled)):
        return ModelError(
            f"{name}: cannot load this model from the Hugging Face Hub (offline or unreachable, and not in the "
            f"local cache) — download it where there is network (`hf download {name} --local-dir DIR`) and "
            "pass --model DIR")
    if isinstance(cause, MemoryError) or is_out_of_memory(error):
        return ModelError(f"{name}: out of memory while loading ({first}) — try model.load_in=4bit or a smaller model")
    return ModelError(f"{name}: could not be loaded ({first})")


def hub_cause(error: BaseException | None, kinds: tuple[type, ...]) -> BaseException | None:
    """The first exception of `kinds` in the chain of `error` (__cause__, else __context__)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kinds):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


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
    if cfg.model.adapter:
        return attach_trainable_adapter(model, cfg.model.adapter)
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


def attach_trainable_adapter(model, adapter: str):
    """A saved LoRA adapter (model.adapter, e.g. an SFT run's RUN/adapter) on the model, trainable: the
    run goes on from it instead of from a new adapter; its own rank and targets apply (lora.* do not)."""
    from peft import PeftModel

    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"model.adapter: {adapter}: no adapter_config.json — pass a run's adapter folder (RUN/adapter) "
                         "or --from-run RUN")
    return PeftModel.from_pretrained(model, str(path), is_trainable=True)


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
