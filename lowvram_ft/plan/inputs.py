"""What the planner is given: `PlanInput` (one run, as plain values), the settings it accepts, the
problems it rejects (`PlanError`), and the mapping of a resolved lowvram_ft Config onto it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from ..errors import UserError
from .precision import Precision, unsloth_precision

# Bytes per element of each compute / storage dtype the planner accepts.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
FP32 = 4
INT64 = 8

# Optimizer -> (number of states, how a state is stored). "param": torch AdamW allocates its states
# like the parameter (zeros_like), so 8 bytes for fp32 LoRA weights and 4 for bf16 full fine-tuning.
# The names are transformers' `optim` values (OptimizerNames, 5.17), as users copy them from notebooks:
# adamw_8bit is an alias of adamw_bnb_8bit; adamw_torch_8bit is torchao's 8-bit AdamW (blockwise
# 8-bit states with one fp32 scale per 256 values, like bitsandbytes: torchao optim/subclass_8bit.py).
OPTIMIZERS = {
    "adamw_8bit": (2, "8bit"),
    "paged_adamw_8bit": (2, "8bit"),
    "adamw_bnb_8bit": (2, "8bit"),
    "adamw_torch_8bit": (2, "8bit"),
    "adamw_torch": (2, "param"),
    "adamw_torch_fused": (2, "param"),
    "adamw_hf": (2, "param"),
    "paged_adamw_32bit": (2, "fp32"),
    "sgd": (0, "param"),
}
EIGHT_BIT_OPTIMIZERS = tuple(name for name, (_, kind) in OPTIMIZERS.items() if kind == "8bit")

# Model types for which Unsloth switches packing and padding-free off (code: unsloth trainer.py
# PADDING_FREE_BLOCKLIST ~197, applied ~1844): gpt-oss's flex attention with sinks mishandles them.
NO_PACKING_MODEL_TYPES = ("gpt_oss", "gemma2")

# LoRA targets: a preset name or a list of these module names (gate_up_proj: the fused gpt-oss experts).
LORA_TARGET_PRESETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "attention+mlp": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
LORA_MODULE_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj")
CHECKPOINTING_MODES = ("unsloth", "true", "false")
ATTENTION_IMPLEMENTATIONS = ("auto", "flex", "sdpa", "flash", "eager")
# The training stack: Unsloth (its kernels, fused loss, offloaded checkpointing) or plain transformers + PEFT.
STACKS = ("unsloth", "transformers")
# How the loss is computed: auto = the stack's own (Unsloth: its fused linear cross entropy; transformers:
# full logits); "chunked" = a loss that never builds the full [tokens, vocab] logits (Cut Cross Entropy,
# Liger's fused linear cross entropy, Unsloth's fused loss); "full" = the whole logits at once;
# "inplace" = Unsloth's loss before its fused losses (2023-2024 releases): full logits, gradient in place.
LOSSES = ("auto", "chunked", "full", "inplace")
# Linears a pre-quantized checkpoint keeps in 16 bits: "none" (every linear 4-bit), "dynamic" (Unsloth's
# dynamic 4-bit checkpoints, "-unsloth-bnb-4bit": a model-dependent set whose layout the config does not
# say), or module names kept in 16 bits in every layer (e.g. q_proj,k_proj,v_proj,o_proj).
KEPT_16BIT_LAYOUTS = ("none", "dynamic")


class PlanError(UserError, ValueError):
    """A plan input or a model config that cannot be used; the message is one line."""


@dataclass(frozen=True)
class PlanInput:
    """One fine-tuning run, as the planner sees it. Plain values; `model_config` is config.json."""

    model_config: Mapping
    load_bits: int = 4                      # 4 (NF4 QLoRA), 8 (LLM.int8) or 16
    full_finetuning: bool = False           # train every weight (needs load_bits=16)
    lora_r: int = 16
    lora_targets: str | Sequence[str] = "attention+mlp"  # preset or module names; MoE experts included
    batch_size: int = 1
    seq_len: int = 1024                     # tokens per row (packed rows are exactly this long)
    gradient_accumulation: int = 1          # does not change the peak; kept for recommendations
    gradient_checkpointing: str = "unsloth"  # "unsloth" (offloaded to host RAM) | "true" | "false"
    optimizer: str = "adamw_8bit"
    packing: bool = False
    dtype: str = "bfloat16"                 # compute dtype: bfloat16 | float16 (T4) | float32
    weights_dtype: str | None = None        # dtype of the weights kept in 16 bits; None = dtype (float32
                                            # for gpt-oss on a card without bf16, see unsloth_precision)
    offload_embedding: bool = False         # keep the input embedding table in host RAM
    attention: str = "auto"                 # plain transformers only: auto = sdpa (eager for gpt-oss); Unsloth
                                            # always trains with its own attention (flex with sinks for gpt-oss)
    unsloth_kernels: bool = True            # the stack: False = plain transformers/PEFT (no fused paths)
    loss: str = "auto"                      # LOSSES: auto = the stack's own
    tiled_mlp: bool = False                 # Unsloth's unsloth_tiled_mlp=True: the MLP runs in row tiles
    kept_16bit: str | Sequence[str] = "none"  # KEPT_16BIT_LAYOUTS or module names kept in 16 bits
    generate_tokens: int = 0                # a generation of this many tokens (prompt + new) runs before
                                            # training in the same process (0 = none)
    generate_batch: int = 1                 # rows generated at once

    @property
    def stack(self) -> str:
        return "unsloth" if self.unsloth_kernels else "transformers"


def raise_problems(inp: PlanInput) -> None:
    """PlanError listing every problem with `inp` (`plan_problems`); nothing when there is none."""
    problems = plan_problems(inp)
    if problems:
        raise PlanError("; ".join(problems))


def plan_problems(inp: PlanInput) -> list[str]:
    """Every problem with `inp`, each naming the field and what is accepted."""
    problems = []
    if inp.load_bits not in (4, 8, 16):
        problems.append(f"load_bits={inp.load_bits!r}: use 4, 8 or 16")
    if inp.full_finetuning and inp.load_bits != 16:
        problems.append("full_finetuning needs load_bits=16 (quantized weights cannot be trained)")
    if inp.full_finetuning and inp.offload_embedding:
        problems.append("offload_embedding needs LoRA: full fine-tuning trains the embedding")
    for name in ("lora_r", "batch_size", "seq_len", "gradient_accumulation", "generate_batch"):
        value = getattr(inp, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name}={value!r}: use a positive integer")
    if inp.gradient_checkpointing not in CHECKPOINTING_MODES:
        problems.append(f"gradient_checkpointing={inp.gradient_checkpointing!r}: use {', '.join(CHECKPOINTING_MODES)}")
    if inp.optimizer not in OPTIMIZERS:
        problems.append(f"optimizer={inp.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if inp.dtype not in DTYPE_BYTES:
        problems.append(f"dtype={inp.dtype!r}: use bfloat16, float16 or float32")
    if inp.weights_dtype is not None and inp.weights_dtype not in DTYPE_BYTES:
        problems.append(f"weights_dtype={inp.weights_dtype!r}: use bfloat16, float16 or float32")
    if inp.attention not in ATTENTION_IMPLEMENTATIONS:
        problems.append(f"attention={inp.attention!r}: use {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if inp.loss not in LOSSES:
        problems.append(f"loss={inp.loss!r}: use {', '.join(LOSSES)}")
    if not isinstance(inp.generate_tokens, int) or isinstance(inp.generate_tokens, bool) or inp.generate_tokens < 0:
        problems.append(f"generate_tokens={inp.generate_tokens!r}: use 0 or a positive integer")
    problems += _module_problems("lora_targets", inp.lora_targets, LORA_TARGET_PRESETS)
    problems += _module_problems("kept_16bit", inp.kept_16bit, KEPT_16BIT_LAYOUTS)
    return problems


def _module_problems(field: str, value, presets) -> list[str]:
    """Problems with a field that holds a preset name or a list of linear module names."""
    if isinstance(value, str):
        if value in presets:
            return []
        return [f"{field}={value!r}: use {', '.join(presets)} or a list of module names"]
    unknown = [name for name in value if name not in LORA_MODULE_NAMES]
    if unknown or not value:
        return [f"{field} has {unknown or 'nothing'}: module names are {', '.join(LORA_MODULE_NAMES)}"]
    return []


def plan_input_from_config(cfg, model_config: Mapping, bf16: bool = True) -> PlanInput:
    """The PlanInput of a resolved lowvram_ft Config on a GPU with (or without) bf16. "auto" settings take
    their GPU defaults (4-bit, adamw_8bit) and the precision Unsloth picks for the card; LoRA targets the
    planner cannot size (e.g. lm_head) are left out."""
    model, train = cfg.model, cfg.train
    bits = {"4bit": 4, "8bit": 8, "16bit": 16}.get(model.load_in, 16 if model.full_finetuning else 4)
    targets = tuple(t for t in cfg.lora.target_modules if t in LORA_MODULE_NAMES) or LORA_TARGET_PRESETS["attention"]
    precision = config_precision(cfg, model_config, bf16)
    return PlanInput(
        model_config=model_config,
        load_bits=bits,
        full_finetuning=model.full_finetuning,
        lora_r=cfg.lora.r,
        lora_targets=targets,
        batch_size=train.batch_size,
        seq_len=model.max_seq_length,
        gradient_accumulation=train.gradient_accumulation_steps,
        gradient_checkpointing=model.gradient_checkpointing,
        optimizer="adamw_8bit" if train.optimizer == "auto" else train.optimizer,
        packing=cfg.data.packing and model_config.get("model_type") not in NO_PACKING_MODEL_TYPES,
        dtype=precision.compute,
        weights_dtype=precision.weights,
        offload_embedding=model.offload_embedding,
        kept_16bit=kept_16bit_layout(model.name, model_config, bits),
    )


def kept_16bit_layout(name: str, model_config: Mapping, load_bits: int) -> str:
    """"dynamic" for Unsloth's dynamic 4-bit checkpoints ("-unsloth-bnb-4bit"), else "none". gpt-oss's
    split checkpoint (unsloth/gpt-oss-20b-unsloth-bnb-4bit) quantizes every expert and attention linear:
    the T4 notebook's 12.81 GiB after loading and generating leaves no room for 16-bit attention
    (calibration.py, nb_gptoss20b_t4)."""
    dynamic = "unsloth-bnb-4bit" in name.lower() and model_config.get("model_type") != "gpt_oss"
    return "dynamic" if dynamic and load_bits == 4 else "none"


def config_precision(cfg, model_config: Mapping, bf16: bool) -> Precision:
    """The precision Unsloth uses for the configured model (model.dtype) on a card with / without bf16."""
    return unsloth_precision(str(model_config.get("model_type", "")), bf16, cfg.model.dtype)
