"""VRAM fit planner: the peak GPU memory of a fine-tuning run, predicted from config.json alone.

Pure arithmetic on plain values (no torch, no weights): `predict` turns a model's config.json and the
run's settings into a `Breakdown` of named components in GiB, `recommend` lists the changes that make
an over-budget run fit (fastest first), `max_seq_len_that_fits` and `min_vram_gib` search the
longest sequence and the smallest GPU.

How the peak is modelled. One training step has two memory high-water marks that are never live
together: the loss (logits of every token against the whole vocabulary) at the end of the forward,
and the backward of one decoder layer (its recomputed activations, gradients flowing through it,
dequantized weights). Everything else (weights, adapters, gradients, optimizer states, checkpointed
hidden states, CUDA context) is held across the whole step. So

    peak = CUDA context + static + max(loss phase, layer phase) + fragmentation of the per-step transients.

Every constant below says where it comes from: "code" (read in the installed unsloth / unsloth_zoo /
bitsandbytes / transformers sources), "claim" (someone's published number), "first principles" (an
autograd count or a guess to be replaced by a measurement). None is our measurement yet: the
CALIBRATION table is empty until `make bench` measures real runs, and `calibrate` turns a measured
peak into factors for it.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

from .errors import UserError

GIB = 1024**3

# --- Weights -------------------------------------------------------------------------------------
# bitsandbytes NF4: two 4-bit codes per byte, one absmax per block of 64 values (code: bitsandbytes
# nn/modules.py Params4bit, blocksize default 64).
NF4_BLOCKSIZE = 64
# Unsloth quantizes with bnb_4bit_use_double_quant=True (code: unsloth/models/decision.py): the
# absmax are themselves stored as 8-bit codes, with one fp32 absmax per 256 of them plus one fp32
# offset per tensor (code: bitsandbytes QuantState.state2, nested blocksize 256).
NF4_DOUBLE_QUANT = True
NF4_NESTED_BLOCKSIZE = 256
# LLM.int8: one byte per weight plus one fp32 scale per output row (code: bitsandbytes Int8Params.SCB).
INT8_SCALE_BYTES_PER_ROW = 4
# LoRA A/B are upcast to float32 whatever the base dtype (code: unsloth_zoo training_utils.py
# prepare_model_for_training, `upcast = True` for .lora_A./.lora_B.).
LORA_PARAM_BYTES = 4
# Unsloth full fine-tuning keeps bf16 weights ("bfloat16 full finetuning which cuts memory usage by
# 50%") but upcasts fp16 weights to fp32, which then are the master weights (code:
# unsloth/models/vision.py, unsloth_zoo training_utils.py).
FULL_FT_PARAM_BYTES = {"bfloat16": 2, "float16": 4, "float32": 4}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
FP32 = 4
INT64 = 8

# --- Optimizers ----------------------------------------------------------------------------------
# bitsandbytes 8-bit Adam: 2 states of 1 byte each, quantized blockwise with one fp32 absmax per 256
# values (code: bitsandbytes optim/optimizer.py, blocksize = 256).
ADAM_8BIT_BLOCKSIZE = 256
ADAM_8BIT_BYTES_PER_PARAM = 2 * (1 + FP32 / ADAM_8BIT_BLOCKSIZE)
# Optimizer -> (number of states, how a state is stored). "param": torch AdamW allocates its states
# like the parameter (zeros_like), so 8 bytes for fp32 LoRA weights and 4 for bf16 full fine-tuning.
OPTIMIZERS = {
    "adamw_8bit": (2, "8bit"),
    "paged_adamw_8bit": (2, "8bit"),
    "adamw_bnb_8bit": (2, "8bit"),
    "adamw_torch": (2, "param"),
    "adamw_torch_fused": (2, "param"),
    "adamw_hf": (2, "param"),
    "paged_adamw_32bit": (2, "fp32"),
    "sgd": (0, "param"),
}
EIGHT_BIT_OPTIMIZERS = tuple(name for name, (_, kind) in OPTIMIZERS.items() if kind == "8bit")

# --- Activations (bytes saved for backward, per token, per decoder layer) ------------------------
# Unsloth's LoRA MLP saves the gate and up projections and recomputes SwiGLU in backward (code:
# unsloth/kernels/fast_lora.py LoRA_MLP save_for_backward(..., X, e, g)); plain PyTorch also keeps
# act(gate) and the product fed to down_proj (first principles, autograd).
SWIGLU_SAVED_WIDTHS = {True: 2, False: 4}
# gpt-oss experts in training: swiglu_torch_forward runs in fp32 and autograd keeps 6 tensors of
# intermediate width per routed (token, expert): both clamp inputs, the sigmoid, the clamped gate,
# gelu output and up+1 (code: unsloth_zoo temporary_patches/gpt_oss.py; counted by hand).
GPT_OSS_SWIGLU_FP32_SAVED = 6
# While one layer is in backward, the gradients of its largest saved tensors coexist with them;
# assumed to add half a layer's activations (first principles guess: calibrate).
BACKWARD_WORKSPACE_FRACTION = 0.5
# Unsloth's offloaded checkpointing keeps the layer inputs in host RAM and double-buffers them on
# the GPU (code: unsloth_zoo gradient_checkpointing.py, double buffering).
OFFLOADED_CHECKPOINT_GPU_BUFFERS = 2
# Routed-token bookkeeping per (token, expert): router indices, the sort permutation, token ids,
# sorted token ids, expert ids, all int64 (code: unsloth_zoo gpt_oss_grouped_qlora.py); plus the
# router logits and the scattered scores per token and expert, in the compute dtype.
ROUTING_INT64_PER_TOKEN_EXPERT = 5
ROUTING_SCORE_TENSORS = 2

# --- Attention -----------------------------------------------------------------------------------
# Eager attention materialises scores of shape [batch, heads, seq, seq (+1 sink column on gpt-oss)]:
# autograd keeps the bf16 softmax output (2 bytes/score) per layer, and the forward/backward of one
# layer holds about three score-sized bf16 tensors at once (logits, masked+sinks concatenation,
# softmax; in backward their gradients) (first principles: transformers gpt_oss eager_attention_forward).
EAGER_SAVED_BYTES_PER_SCORE = 2
EAGER_TRANSIENT_BYTES_PER_SCORE = 6
# Flash / SDPA / flex attention keep O(seq) state: a logsumexp per token and head (counted in the
# layer activations) and, in backward, an fp32 dq accumulator of the query's size (first principles:
# FlashAttention-2 backward).
FLASH_BACKWARD_FP32_ACCUMULATORS = 1

# --- Logits and loss -----------------------------------------------------------------------------
# Unsloth's fused cross entropy never builds all logits: it budgets 16 bytes per (token, vocab)
# element (bf16 logits + fp32 upcast + saved log-softmax + gradient, "16 under softcapping") and
# picks chunks so one chunk fits min(half the free memory at the first loss call, 4 GiB)
# (code: unsloth_zoo fused_losses/cross_entropy_loss.py _CE_BYTES_PER_LOGIT, _CE_TARGET_GB_CAP,
# tiled_mlp._default_target_gb). Assumed: the compiled gpt-oss / llama forward uses it in training.
FUSED_CE_BYTES_PER_LOGIT = 16
FUSED_CE_TARGET_CAP_GIB = 4.0
FUSED_CE_FREE_FRACTION = 0.5
# Plain transformers loss: the whole [tokens, vocab] chain at once, 14 bytes per element (bf16 logits,
# fp32 upcast, saved log-softmax, fp32 gradient) (code comment, same unsloth_zoo file).
PLAIN_CE_BYTES_PER_LOGIT = 14

# --- Dequantization buffers ----------------------------------------------------------------------
# A 4/8-bit linear is dequantized to the compute dtype for each matmul and freed; forward recompute
# and backward can overlap by one weight (first principles: unsloth kernels/utils.py fast_dequantize).
DEQUANT_TRANSIENT_WEIGHTS = 2
# gpt-oss 4-bit experts (grouped path) dequantize all experts of a projection at once; inside a
# checkpoint recompute the gate_up and down stacks stay pinned until the layer's backward is done
# (code: unsloth_zoo moe_utils._moe_recompute_default, gpt_oss_grouped_qlora.py). Without
# checkpointing they are rebuilt one projection at a time.
# On fp16 GPUs (T4) the cuBLAS path caps each stack at 256 MiB (code: UNSLOTH_GPTOSS_FP16_CUBLAS_STACK_MB).
MOE_FP16_STACK_CAP_GIB = 0.25

# --- Fixed costs ---------------------------------------------------------------------------------
# CUDA context, cuBLAS/Triton workspaces and loaded kernels: not in torch's counters, visible in
# nvidia-smi (first principles; typical 0.3-0.6 GiB with lazy module loading).
CUDA_CONTEXT_GIB = 0.5
# Caching-allocator overhead on what is allocated and freed every step (activations, attention,
# routing, dequantized weights, loss chunks); weights, adapters, gradients and optimizer states are
# allocated once and reused, so they are not counted (first principles guess: calibrate with
# peak_reserved_gib / peak_allocated_gib from a real run).
FRAGMENTATION_FACTOR = 1.20

# --- Recommendations -----------------------------------------------------------------------------
# Keep this fraction of the GPU free: predictions are estimates.
SAFETY_MARGIN = 0.05
# Sequence lengths are searched in multiples of this (kernels tile by 64 or more).
SEQ_LEN_STEP = 64
# Estimated step-time factor of each change (1.0 = no slower). Guesses, except where a claim is named;
# `make bench` should replace them.
SLOWDOWN = {
    "optimizer": 1.00,           # 8-bit Adam costs about the same as fp32 Adam (claim: bitsandbytes paper)
    "offload_embedding": 1.01,   # a host-side lookup of batch x seq rows per step
    "checkpoint_offload": 1.02,  # offloading checkpoints vs keeping them (claim: Unsloth, +1.9%)
    "packing_off": 1.15,         # padding instead of packing wastes compute on pad tokens
    "batch_halving": 1.10,       # per halving of the micro-batch (smaller GEMMs)
    "checkpoint_on": 1.33,       # recompute costs about one extra forward (a third of a step)
    "load_4bit_from_16": 1.25,   # NF4 dequantization before every matmul
    "load_8bit_from_16": 1.60,   # bitsandbytes int8 matmuls are slow
    "load_4bit_from_8": 0.80,
    "fewer_lora_targets": 0.95,  # less adapter compute; changes what is trained: listed after the rest
    "lower_lora_rank": 1.00,     # changes what is trained: listed after the rest
    "shorter_sequence": 1.00,    # faster per step, but it truncates the data: always listed last
}
# Changes that alter what is trained rather than how: recommended only when nothing else fits.
TRAINING_CHANGES = ("lora_targets", "lora_r")
# Where each PlanInput field lives in the lowvram_ft config, for the printed overrides.
OVERRIDE_KEYS = {
    "load_bits": "model.load_in",
    "seq_len": "model.max_seq_length",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "offload_embedding": "model.offload_embedding",
    "batch_size": "train.batch_size",
    "gradient_accumulation": "train.gradient_accumulation_steps",
    "optimizer": "train.optimizer",
    "packing": "data.packing",
    "lora_targets": "lora.target_modules",
    "lora_r": "lora.r",
}

# Component name -> factor from measurements (`calibrate`). Empty: nothing measured yet.
CALIBRATION: dict[str, float] = {}
# The largest relative error of the calibrated planner over the measured cases (benchmarks/results);
# None while CALIBRATION is empty.
CALIBRATION_ERROR: float | None = None
# Uncertainty stated for an estimate no measurement has checked yet (a guess: the published anchors
# suggest the uncalibrated planner is 5-15% high). Such an estimate warns; it never blocks a run.
UNCALIBRATED_ERROR = 0.20
# PlanInput fields whose change leaves the trained model the same (train.fit=auto may change them).
SAME_MODEL_FIELDS = ("offload_embedding", "gradient_checkpointing", "batch_size", "gradient_accumulation")

# Model types for which Unsloth switches packing and padding-free off (code: unsloth trainer.py
# PADDING_FREE_BLOCKLIST ~197, applied ~1844): gpt-oss's flex attention with sinks mishandles them.
NO_PACKING_MODEL_TYPES = ("gpt_oss", "gemma2")

# --- Precision Unsloth uses on a card --------------------------------------------------------------
# bf16 needs compute capability 8.0 (Ampere) or newer; T4 (7.5) and V100 (7.0) have float16 only.
BF16_MIN_COMPUTE_CAPABILITY = 8.0
# Families Unsloth will not train in float16 (NaN gradients): on a card without bf16 it keeps the
# weights outside the 4-bit linears in float32 and computes in float16 (code: unsloth models/loader.py
# FORCE_FLOAT32 ~205-224, models/vision.py ~3613-3650). gpt_oss is one of them.
FORCE_FLOAT32_MODEL_TYPES = ("gpt_oss", "gemma3", "gemma3n", "gemma4", "glm4_moe", "qwen3_5", "qwen3_moe")

COMPONENT_LABELS = {
    "quantized_weights": "quantized linear weights (incl. absmax)",
    "unquantized_weights": "unquantized weights (embeddings, norms, ...)",
    "trainable_weights": "LoRA adapters (fp32)",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "checkpointed activations",
    "layer_recompute": "one layer's activations (recompute + backward)",
    "attention": "attention scores / workspace",
    "moe_routing": "MoE routing buffers",
    "dequant_buffers": "dequantized weight buffers",
    "logits_and_loss": "logits and loss",
    "cuda_context": "CUDA context",
    "fragmentation": "allocator fragmentation",
}
# Exact arithmetic on the config; everything else is a model of runtime behaviour.
EXACT_COMPONENTS = ("quantized_weights", "unquantized_weights", "trainable_weights", "gradients", "optimizer_states")

LORA_TARGET_PRESETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "attention+mlp": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
LORA_MODULE_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj")
CHECKPOINTING_MODES = ("unsloth", "true", "false")
ATTENTION_IMPLEMENTATIONS = ("auto", "flex", "sdpa", "flash", "eager")
DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MODEL_CONFIG_DIR = Path(__file__).parent / "assets" / "model_configs"


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
    attention: str = "auto"                 # auto = flex for gpt-oss, sdpa otherwise; eager for plain HF gpt-oss
    unsloth_kernels: bool = True            # False = plain transformers/PEFT (full logits, no fused paths)


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the planner needs, read from config.json."""

    model_type: str
    hidden: int
    layers: int
    vocab: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int           # dense MLP width; 0 when every layer is MoE
    experts: int                # 0 for dense models
    experts_per_token: int
    expert_intermediate: int
    fused_gate_up: bool         # gpt-oss: one gate_up matrix per expert, experts and router with biases
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool               # qwen3: RMSNorm on q and k per head
    attention_sinks: bool       # gpt-oss: one learned sink logit per head
    tied_embeddings: bool
    max_positions: int
    guessed: tuple[str, ...] = ()  # fields not in the config, filled with a default


@dataclass(frozen=True)
class LinearGroup:
    """`count` identical linear layers (the ones bitsandbytes quantizes and LoRA can target)."""

    name: str            # module name LoRA targets use
    kind: str            # "attention" | "mlp" | "expert"
    in_features: int
    out_features: int
    count: int
    bias: bool


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    active: int           # per token, as OpenAI counts it: everything but the input embedding, k experts
    embedding: int
    lm_head: int          # 0 when tied to the embedding
    linear_weights: int   # attention/MLP/expert linear weights: what 4/8-bit loading quantizes
    expert_weights: int   # the experts' share of linear_weights

    @property
    def kept_16bit(self) -> int:
        """Parameters never quantized: embeddings, lm_head, routers, norms, sinks, biases."""
        return self.total - self.linear_weights


@dataclass(frozen=True)
class Component:
    name: str
    gib: float
    phase: str            # "static" (held all step) | "loss" | "layer" (backward of one layer)
    at_peak: bool


@dataclass(frozen=True)
class Breakdown:
    """Predicted peak GPU memory, by component, in GiB. An estimate, not a measurement."""

    components: tuple[Component, ...]
    total_gib: float
    peak_phase: str
    host_ram_gib: float
    params: ParameterCounts
    trainable_params: int
    summary: str
    notes: tuple[str, ...]
    vram_gib: float | None = None  # the GPU size the loss chunks were sized for (None: a large GPU)

    def gib(self, name: str) -> float:
        """One component's size in GiB (0.0 for a component this run does not have)."""
        return next((c.gib for c in self.components if c.name == name), 0.0)

    def as_dict(self) -> dict:
        """Plain values for a JSON report."""
        return {
            "estimate_total_gib": round(self.total_gib, 3),
            "sized_for_vram_gib": self.vram_gib,
            "peak_phase": self.peak_phase,
            "host_ram_gib": round(self.host_ram_gib, 3),
            "components_gib": {c.name: round(c.gib, 3) for c in self.components},
            "not_at_peak": [c.name for c in self.components if not c.at_peak],
            "total_params": self.params.total,
            "trainable_params": self.trainable_params,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class Recommendation:
    overrides: tuple[str, ...]   # dotted config overrides, e.g. ("train.batch_size=1", ...)
    peak_gib: float              # predicted peak after the change
    fits: bool
    slowdown: float              # estimated step-time factor (SLOWDOWN)
    why: str
    changes_training: bool = False  # lowers LoRA rank or targets: a different fine-tune, not just slower


# One alternative setting for `recommend`: (PlanInput field changes, slowdown factor, one-line why).
Option = tuple


# --- Model configs -------------------------------------------------------------------------------

def resolve_model_config(model: str) -> dict:
    """config.json of `model`: a local folder (or config.json path), a bundled Hub id, or, when
    HF_HUB_OFFLINE is not set, config.json fetched from the Hub. Raises PlanError otherwise."""
    path = Path(os.path.expanduser(model))  # ~unknown-user stays as typed (Path.expanduser raises)
    if path.is_dir() and (path / "config.json").is_file():
        return _read_model_config(path / "config.json")
    if path.is_file() and path.name.endswith(".json"):
        return _read_model_config(path)
    if path.is_dir():
        raise PlanError(f"{model}: folder has no config.json; pass the model's folder or a bundled id")
    bundled = bundled_model_ids()
    match = next((name for name in bundled if name.lower() == model.lower()), None)
    if match:
        return _read_model_config(MODEL_CONFIG_DIR / bundled[match])
    downloaded = _download_config(model)
    if downloaded is not None:
        return downloaded
    raise PlanError(
        f"could not find config.json for {model!r}: not a local folder and not bundled "
        f"({', '.join(sorted(bundled))}); pass a local folder that holds config.json"
    )


def bundled_model_ids() -> dict[str, str]:
    """Hub id -> bundled config file name."""
    index = _read_json(MODEL_CONFIG_DIR / "index.json")
    return {name: file for name, file in index.items() if not name.startswith("_")}


def _read_json(path: Path) -> dict:
    """The JSON object in `path`; PlanError naming the file when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise PlanError(f"{path}: expected a JSON object, got {_json_kind(data)} — pass the model's own config.json")
    return data


def _read_model_config(path: Path) -> dict:
    """config.json, checked now so that a bad value is reported with the file that holds it."""
    config = _read_json(path)
    model_shape(config, source=str(path))
    return config


def _json_kind(value) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _download_config(model: str) -> dict | None:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false", "no"):
        return None
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(model, "config.json"))
    except Exception:  # no network, no such repo, gated repo: the caller reports one line
        return None
    return _read_model_config(path)


def model_shape(config: Mapping, source: str = "config.json") -> ModelShape:
    """Architecture numbers from config.json; multimodal configs use their text_config. A size that
    is not a positive integer is a PlanError naming `source` and the key."""
    cfg = config if "hidden_size" in config else config.get("text_config") or config
    if not isinstance(cfg, Mapping):
        raise PlanError(f"{source}: text_config: got {_json_kind(cfg)}; expected an object")

    def size(*keys: str) -> int:
        return _config_size(cfg, keys, source)

    hidden, layers, vocab = size("hidden_size"), size("num_hidden_layers"), size("vocab_size")
    missing = [key for key, value in zip(("hidden_size", "num_hidden_layers", "vocab_size"), (hidden, layers, vocab))
               if not value]
    if missing:
        raise PlanError(f"{source} lacks {', '.join(missing)}: cannot size this model")
    model_type = str(cfg.get("model_type") or config.get("model_type") or "unknown")
    guessed = []
    q_heads = size("num_attention_heads")
    if not q_heads:
        q_heads, guessed = max(1, hidden // 128), guessed + ["num_attention_heads"]
    experts = size("num_local_experts", "num_experts")
    intermediate = size("intermediate_size")
    if not intermediate:
        intermediate, guessed = 4 * hidden, guessed + ["intermediate_size"]
    is_gpt_oss = model_type == "gpt_oss"
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelShape(
        model_type=model_type,
        hidden=hidden,
        layers=layers,
        vocab=vocab,
        q_heads=q_heads,
        kv_heads=size("num_key_value_heads") or q_heads,
        head_dim=size("head_dim") or hidden // q_heads,
        intermediate=0 if experts else intermediate,
        experts=experts,
        experts_per_token=size("num_experts_per_tok", "experts_per_token") if experts else 0,
        expert_intermediate=(size("moe_intermediate_size") or intermediate) if experts else 0,
        fused_gate_up=is_gpt_oss,
        qkv_bias=attention_bias or model_type == "qwen2",
        o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        attention_sinks=is_gpt_oss,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_positions=size("max_position_embeddings") or 131072,
        guessed=tuple(guessed),
    )


def _config_size(cfg: Mapping, keys: Sequence[str], source: str) -> int:
    """The first of `keys` that config.json sets (null and 0 count as unset), as a positive integer;
    0 when none is set."""
    for key in keys:
        value = cfg.get(key)
        if value is None or value == 0:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PlanError(f"{source}: {key}: got {value!r}; expected a positive integer")
        return value
    return 0


def linear_groups(shape: ModelShape) -> list[LinearGroup]:
    """Every quantizable linear layer of the model, grouped by shape."""
    h, layers = shape.hidden, shape.layers
    q_dim, kv_dim = shape.q_heads * shape.head_dim, shape.kv_heads * shape.head_dim
    groups = [
        LinearGroup("q_proj", "attention", h, q_dim, layers, shape.qkv_bias),
        LinearGroup("k_proj", "attention", h, kv_dim, layers, shape.qkv_bias),
        LinearGroup("v_proj", "attention", h, kv_dim, layers, shape.qkv_bias),
        LinearGroup("o_proj", "attention", q_dim, h, layers, shape.o_bias),
    ]
    if not shape.experts:
        i = shape.intermediate
        return groups + [
            LinearGroup("gate_proj", "mlp", h, i, layers, shape.mlp_bias),
            LinearGroup("up_proj", "mlp", h, i, layers, shape.mlp_bias),
            LinearGroup("down_proj", "mlp", i, h, layers, shape.mlp_bias),
        ]
    i, n = shape.expert_intermediate, layers * shape.experts
    if shape.fused_gate_up:
        return groups + [
            LinearGroup("gate_up_proj", "expert", h, 2 * i, n, True),
            LinearGroup("down_proj", "expert", i, h, n, True),
        ]
    return groups + [
        LinearGroup("gate_proj", "expert", h, i, n, False),
        LinearGroup("up_proj", "expert", h, i, n, False),
        LinearGroup("down_proj", "expert", i, h, n, False),
    ]


def count_parameters(config_or_shape: Mapping | ModelShape) -> ParameterCounts:
    """Exact parameter counts of the architecture (no weights needed)."""
    shape = config_or_shape if isinstance(config_or_shape, ModelShape) else model_shape(config_or_shape)
    groups = linear_groups(shape)
    h, layers = shape.hidden, shape.layers
    linear = sum(g.in_features * g.out_features * g.count for g in groups)
    biases = sum(g.out_features * g.count for g in groups if g.bias)
    router = layers * shape.experts * (h + (1 if shape.fused_gate_up else 0))
    norms = layers * 2 * h + h + (layers * 2 * shape.head_dim if shape.qk_norm else 0)
    sinks = layers * shape.q_heads if shape.attention_sinks else 0
    embedding = shape.vocab * h
    lm_head = 0 if shape.tied_embeddings else shape.vocab * h
    total = linear + biases + router + norms + sinks + embedding + lm_head
    experts = [g for g in groups if g.kind == "expert"]
    expert_weights = sum(g.in_features * g.out_features * g.count for g in experts)
    expert_all = expert_weights + sum(g.out_features * g.count for g in experts if g.bias)
    idle = expert_all * (shape.experts - shape.experts_per_token) // shape.experts if shape.experts else 0
    return ParameterCounts(
        total=total,
        active=total - embedding - idle,
        embedding=embedding,
        lm_head=lm_head,
        linear_weights=linear,
        expert_weights=expert_weights,
    )


def quantized_bytes(group: LinearGroup, bits: int) -> int:
    """Bytes of one group's weights stored by bitsandbytes (biases stay 16-bit, counted elsewhere)."""
    numel = group.in_features * group.out_features
    if bits == 8:
        per_linear = numel + group.out_features * INT8_SCALE_BYTES_PER_ROW
    else:
        blocks = math.ceil(numel / NF4_BLOCKSIZE)
        if NF4_DOUBLE_QUANT:
            absmax = blocks + FP32 * math.ceil(blocks / NF4_NESTED_BLOCKSIZE) + FP32
        else:
            absmax = FP32 * blocks
        per_linear = math.ceil(numel / 2) + absmax
    return per_linear * group.count


def lora_groups(shape: ModelShape, targets: str | Sequence[str]) -> list[LinearGroup]:
    """The linear groups LoRA wraps. On gpt-oss, gate_proj/up_proj/down_proj name the experts."""
    names = set(LORA_TARGET_PRESETS[targets] if isinstance(targets, str) else targets)
    if shape.fused_gate_up and names & {"gate_proj", "up_proj"}:
        names.add("gate_up_proj")
    return [g for g in linear_groups(shape) if g.name in names]


def lora_parameters(shape: ModelShape, targets: str | Sequence[str], r: int) -> int:
    return sum(r * (g.in_features + g.out_features) * g.count for g in lora_groups(shape, targets))


# --- Prediction ----------------------------------------------------------------------------------

def predict(inp: PlanInput, vram_gib: float | None = None) -> Breakdown:
    """Predicted peak GPU memory of one training step of `inp`.

    `vram_gib` matters only for Unsloth's fused loss, which sizes its chunks from the memory free on
    the GPU; without it the loss is sized as on a large GPU (its 4 GiB cap).
    """
    _raise_problems(inp)
    shape = model_shape(inp.model_config)
    counts = count_parameters(shape)
    trainable = counts.total if inp.full_finetuning else lora_parameters(shape, inp.lora_targets, inp.lora_r)
    parts = {
        **_weight_bytes(inp, shape, counts),
        **_training_bytes(inp, counts, trainable),
        **_activation_bytes(inp, shape),
        "dequant_buffers": _dequant_bytes(inp, shape),
    }
    parts = {name: size * CALIBRATION.get(name, 1.0) for name, size in parts.items()}
    parts["logits_and_loss"] = _loss_bytes(inp, shape, parts, vram_gib) * CALIBRATION.get("logits_and_loss", 1.0)
    return _assemble(inp, shape, counts, trainable, parts, _phases(inp), vram_gib)


def _weight_bytes(inp: PlanInput, shape: ModelShape, counts: ParameterCounts) -> dict[str, float]:
    offloaded = counts.embedding if inp.offload_embedding and not shape.tied_embeddings else 0
    if inp.full_finetuning:
        return {"quantized_weights": 0, "unquantized_weights": counts.total * FULL_FT_PARAM_BYTES[inp.dtype]}
    sixteen = DTYPE_BYTES[inp.weights_dtype or inp.dtype]
    if inp.load_bits == 16:
        return {"quantized_weights": 0, "unquantized_weights": (counts.total - offloaded) * sixteen}
    quantized = sum(quantized_bytes(g, inp.load_bits) for g in linear_groups(shape))
    return {"quantized_weights": quantized, "unquantized_weights": (counts.kept_16bit - offloaded) * sixteen}


def _training_bytes(inp: PlanInput, counts: ParameterCounts, trainable: int) -> dict[str, float]:
    param_bytes = FULL_FT_PARAM_BYTES[inp.dtype] if inp.full_finetuning else LORA_PARAM_BYTES
    states, kind = OPTIMIZERS[inp.optimizer]
    state_bytes = {"8bit": ADAM_8BIT_BYTES_PER_PARAM / 2, "fp32": FP32, "param": param_bytes}[kind]
    return {
        "trainable_weights": 0 if inp.full_finetuning else trainable * LORA_PARAM_BYTES,
        "gradients": trainable * param_bytes,
        "optimizer_states": trainable * states * state_bytes,
    }


def _tokens(inp: PlanInput) -> int:
    return inp.batch_size * inp.seq_len


def _attention_impl(inp: PlanInput, shape: ModelShape) -> str:
    if inp.attention != "auto":
        return inp.attention
    if shape.attention_sinks:
        # Unsloth trains gpt-oss with flex attention (sinks); plain transformers recipes use eager.
        return "flex" if inp.unsloth_kernels else "eager"
    return "sdpa"


def layer_bytes_per_token(inp: PlanInput, shape: ModelShape) -> float:
    """Bytes autograd keeps per token for one decoder layer (LoRA on every linear assumed)."""
    dt = DTYPE_BYTES[inp.dtype]
    h = shape.hidden
    q_dim, kv_dim = shape.q_heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # norm input and output, q/k/v after RoPE, attention output, fp32 logsumexp per head
    attention = dt * (2 * h + 2 * q_dim + 2 * kv_dim) + FP32 * shape.q_heads
    if shape.qk_norm:
        attention += dt * (q_dim + kv_dim)
    swiglu = SWIGLU_SAVED_WIDTHS[inp.unsloth_kernels]
    if not shape.experts:
        mlp = dt * (2 * h + swiglu * shape.intermediate)
    elif shape.fused_gate_up:
        i, k = shape.expert_intermediate, shape.experts_per_token
        # per routed (token, expert): gathered input and SwiGLU output (bf16), down output kept for
        # the routing-weight product and the fp32 SwiGLU intermediates
        per_expert = dt * (h + i) + FP32 * (h + GPT_OSS_SWIGLU_FP32_SAVED * i)
        mlp = dt * 2 * h + k * per_expert
    else:
        i, k = shape.expert_intermediate, shape.experts_per_token
        mlp = dt * 2 * h + k * dt * (h + swiglu * i)
    # x @ lora_A (r values) saved per wrapped linear, per routed expert for the experts
    wrapped = [] if inp.full_finetuning else lora_groups(shape, inp.lora_targets)
    lora = dt * inp.lora_r * sum(shape.experts_per_token if g.kind == "expert" else 1 for g in wrapped)
    return attention + mlp + lora


def _activation_bytes(inp: PlanInput, shape: ModelShape) -> dict[str, float]:
    tokens, dt = _tokens(inp), DTYPE_BYTES[inp.dtype]
    per_layer = tokens * layer_bytes_per_token(inp, shape)
    hidden_state = tokens * shape.hidden * dt
    mode = inp.gradient_checkpointing
    if mode == "unsloth":
        activations, recompute = OFFLOADED_CHECKPOINT_GPU_BUFFERS * hidden_state, per_layer
    elif mode == "true":
        activations, recompute = shape.layers * hidden_state, per_layer
    else:
        activations, recompute = shape.layers * per_layer, 0.0
    attention_saved, attention_transient = _attention_bytes(inp, shape)
    routing = _routing_bytes(inp, shape)
    layers_held = 1 if mode != "false" else shape.layers
    return {
        "activations": activations,
        "layer_recompute": recompute + BACKWARD_WORKSPACE_FRACTION * per_layer,
        "attention": layers_held * attention_saved + attention_transient,
        "moe_routing": layers_held * routing,
    }


def _attention_bytes(inp: PlanInput, shape: ModelShape) -> tuple[float, float]:
    """(saved per layer, transient of the layer being computed) for the attention scores."""
    tokens = _tokens(inp)
    if _attention_impl(inp, shape) != "eager":
        q_size = tokens * shape.q_heads * shape.head_dim
        return 0.0, FLASH_BACKWARD_FP32_ACCUMULATORS * FP32 * q_size
    sink = 1 if shape.attention_sinks else 0
    if inp.packing:
        # padding-free packing flattens the micro-batch into one row: eager attends across all of it
        scores = shape.q_heads * tokens * (tokens + sink)
    else:
        scores = inp.batch_size * shape.q_heads * inp.seq_len * (inp.seq_len + sink)
    return EAGER_SAVED_BYTES_PER_SCORE * scores, EAGER_TRANSIENT_BYTES_PER_SCORE * scores


def _routing_bytes(inp: PlanInput, shape: ModelShape) -> float:
    if not shape.experts:
        return 0.0
    per_token = (
        ROUTING_SCORE_TENSORS * shape.experts * DTYPE_BYTES[inp.dtype]
        + shape.experts_per_token * (ROUTING_INT64_PER_TOKEN_EXPERT * INT64 + FP32)
    )
    return _tokens(inp) * per_token


def _dequant_bytes(inp: PlanInput, shape: ModelShape) -> float:
    if inp.load_bits == 16 or inp.full_finetuning:
        return 0.0
    dt = DTYPE_BYTES[inp.dtype]
    groups = linear_groups(shape)
    dense = [g for g in groups if g.kind != "expert"]
    largest = max(g.in_features * g.out_features for g in dense)
    buffers = DEQUANT_TRANSIENT_WEIGHTS * largest * dt
    experts = [g for g in groups if g.kind == "expert"]
    if experts and inp.unsloth_kernels and inp.load_bits == 4:  # the grouped NF4 path
        stacks = [shape.experts * g.in_features * g.out_features * dt for g in experts]
        if inp.dtype == "float16":
            stacks = [min(s, MOE_FP16_STACK_CAP_GIB * GIB) for s in stacks]
        pinned = sum(stacks) if inp.gradient_checkpointing != "false" else max(stacks)
        buffers = max(buffers, pinned)
    elif experts:
        largest_expert = max(g.in_features * g.out_features for g in experts)
        buffers = max(buffers, DEQUANT_TRANSIENT_WEIGHTS * largest_expert * dt)
    return buffers


def _loss_bytes(inp: PlanInput, shape: ModelShape, parts: dict[str, float], vram_gib: float | None) -> float:
    tokens = _tokens(inp)
    if not inp.unsloth_kernels:
        return tokens * shape.vocab * PLAIN_CE_BYTES_PER_LOGIT
    full = tokens * shape.vocab * FUSED_CE_BYTES_PER_LOGIT
    budget = FUSED_CE_TARGET_CAP_GIB * GIB
    if vram_gib is not None:
        # measured once, at the first loss call: before gradients and optimizer states exist
        resident = ("quantized_weights", "unquantized_weights", "trainable_weights", "activations", "dequant_buffers")
        held = CUDA_CONTEXT_GIB * GIB + sum(parts[name] for name in resident)
        budget = min(budget, FUSED_CE_FREE_FRACTION * max(vram_gib * GIB - held, 0.0))
    one_row = shape.vocab * FUSED_CE_BYTES_PER_LOGIT
    chunk = max(min(full, budget), one_row)
    # plus the fp32 gradient of the final hidden states the fused loss returns
    return chunk + tokens * shape.hidden * FP32


def _phases(inp: PlanInput) -> dict[str, str]:
    held_all_step = inp.gradient_checkpointing == "false"
    return {
        "quantized_weights": "static",
        "unquantized_weights": "static",
        "trainable_weights": "static",
        "gradients": "static",
        "optimizer_states": "static",
        "activations": "static",
        "layer_recompute": "layer",
        "attention": "static" if held_all_step else "layer",
        "moe_routing": "static" if held_all_step else "layer",
        "dequant_buffers": "layer",
        "logits_and_loss": "loss",
    }


def _assemble(inp, shape, counts, trainable, parts, phases, vram_gib) -> Breakdown:
    loss = sum(size for name, size in parts.items() if phases[name] == "loss")
    layer = sum(size for name, size in parts.items() if phases[name] == "layer")
    peak_phase = "loss" if loss > layer else "layer"
    components = [
        Component(name, size / GIB, phases[name], phases[name] in ("static", peak_phase))
        for name, size in parts.items()
    ]
    dynamic = sum(c.gib for c in components if c.at_peak and c.name not in EXACT_COMPONENTS)
    context = CUDA_CONTEXT_GIB * CALIBRATION.get("cuda_context", 1.0)
    components.append(Component("cuda_context", context, "static", True))
    fragmentation = (FRAGMENTATION_FACTOR - 1.0) * dynamic * CALIBRATION.get("fragmentation", 1.0)
    components.append(Component("fragmentation", fragmentation, "static", True))
    components = [c for c in components if c.gib > 0]
    return Breakdown(
        components=tuple(components),
        total_gib=sum(c.gib for c in components if c.at_peak),
        peak_phase=peak_phase,
        host_ram_gib=_host_ram_bytes(inp, shape, counts) / GIB,
        params=counts,
        trainable_params=trainable,
        summary=_summary(inp, shape, counts, trainable),
        notes=tuple(_notes(inp, shape)),
        vram_gib=vram_gib,
    )


def _host_ram_bytes(inp: PlanInput, shape: ModelShape, counts: ParameterCounts) -> float:
    offloaded = 0.0
    if inp.gradient_checkpointing == "unsloth":
        offloaded += shape.layers * _tokens(inp) * shape.hidden * DTYPE_BYTES[inp.dtype]
    if inp.offload_embedding and not shape.tied_embeddings:
        offloaded += counts.embedding * DTYPE_BYTES[inp.weights_dtype or inp.dtype]
    return offloaded


def _summary(inp: PlanInput, shape: ModelShape, counts: ParameterCounts, trainable: int) -> str:
    size = f"{counts.total / 1e9:.2f}B parameters"
    if shape.experts:
        size += f" ({counts.active / 1e9:.2f}B active per token, {shape.experts} experts)"
    if inp.full_finetuning:
        method = f"full fine-tuning in {inp.dtype}"
    else:
        targets = inp.lora_targets if isinstance(inp.lora_targets, str) else ",".join(inp.lora_targets)
        method = f"{inp.load_bits}-bit weights, LoRA r={inp.lora_r} on {targets} ({trainable / 1e6:.1f}M trainable)"
    run = (
        f"batch {inp.batch_size} x {inp.seq_len} tokens{' packed' if inp.packing else ''}, "
        f"checkpointing {inp.gradient_checkpointing}, {inp.optimizer}, {_attention_impl(inp, shape)} attention"
    )
    return f"{shape.model_type}, {size}\n{method}\n{run}"


def _notes(inp: PlanInput, shape: ModelShape) -> list[str]:
    notes = []
    if shape.guessed:
        notes.append(f"config lacks {', '.join(shape.guessed)}: filled with defaults, treat as rough")
    if shape.model_type not in DENSE_MODEL_TYPES + ("gpt_oss",):
        notes.append(f"model_type {shape.model_type!r} sized by the generic transformer formula")
    if inp.unsloth_kernels:
        notes.append("loss: Unsloth's chunked fused cross entropy (chunks use up to half the free memory, 4 GiB cap)")
    if inp.offload_embedding and shape.tied_embeddings:
        notes.append("embedding is tied to lm_head: offloading it saves no GPU memory")
    if inp.dtype == "float16" and shape.attention_sinks:
        notes.append("fp16 GPU: Unsloth computes parts of gpt-oss in fp32, activations may be higher")
    return notes


# --- Validation ----------------------------------------------------------------------------------

def _raise_problems(inp: PlanInput) -> None:
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
    for name in ("lora_r", "batch_size", "seq_len", "gradient_accumulation"):
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
    problems += _lora_target_problems(inp.lora_targets)
    return problems


def _lora_target_problems(targets) -> list[str]:
    if isinstance(targets, str):
        if targets in LORA_TARGET_PRESETS:
            return []
        return [f"lora_targets={targets!r}: use {', '.join(LORA_TARGET_PRESETS)} or a list of module names"]
    unknown = [t for t in targets if t not in LORA_MODULE_NAMES]
    if unknown or not targets:
        return [f"lora_targets has {unknown or 'nothing'}: module names are {', '.join(LORA_MODULE_NAMES)}"]
    return []


# --- Recommendations -----------------------------------------------------------------------------

def fits(inp: PlanInput, vram_gib: float, margin: float = SAFETY_MARGIN) -> bool:
    return predict(inp, vram_gib).total_gib <= vram_gib * (1 - margin)


def min_vram_gib(inp: PlanInput, margin: float = SAFETY_MARGIN) -> float:
    """Smallest GPU (GiB, to 0.01) on which `inp` is predicted to fit with the margin kept free.
    Not simply predict(inp).total_gib: Unsloth's loss takes up to half the free memory, so it
    shrinks on a smaller GPU."""
    low, high = 0.0, predict(inp).total_gib / (1 - margin)
    while high - low > 0.005:
        mid = (low + high) / 2
        low, high = (low, mid) if fits(inp, mid, margin) else (mid, high)
    return math.ceil(high * 100) / 100


def max_seq_len_that_fits(inp: PlanInput, vram_gib: float, margin: float = SAFETY_MARGIN) -> int:
    """Longest sequence (a multiple of SEQ_LEN_STEP, up to the model's context) predicted to fit;
    0 when even SEQ_LEN_STEP tokens do not."""
    limit = model_shape(inp.model_config).max_positions // SEQ_LEN_STEP
    low, high = 0, limit
    while low < high:  # predicted peak grows with seq_len, so bisect on the step count
        mid = (low + high + 1) // 2
        if fits(replace(inp, seq_len=mid * SEQ_LEN_STEP), vram_gib, margin):
            low = mid
        else:
            high = mid - 1
    return low * SEQ_LEN_STEP


def recommend(inp: PlanInput, vram_gib: float, margin: float = SAFETY_MARGIN) -> list[Recommendation]:
    """Changes that bring the predicted peak under vram_gib minus the margin, fastest first.

    Every single change that fits, ordered by estimated slowdown; when none does, the fitting
    combination with the smallest estimated slowdown. Changes to what is trained (LoRA targets or
    rank) come only after the others; a shorter sequence, which truncates the data, comes last.
    Every change keeps the effective batch (batch x accumulation). Empty when the run fits already.
    """
    budget = vram_gib * (1 - margin)
    if predict(inp, vram_gib).total_gib <= budget:
        return []
    dimensions = _change_dimensions(inp)
    singles = [_recommendation(inp, [option], vram_gib, budget) for options in dimensions for option in options]
    found = sorted((r for r in singles if r.fits), key=_order)
    chosen: list[Option] = []
    if not found:
        best, chosen = _best_combination(inp, dimensions, vram_gib, budget)
        if best.fits:
            return [best]
    # Last resort, or an alternative listed after the others: shorter rows.
    base = replace(inp, **_fields(chosen))
    seq = max_seq_len_that_fits(base, vram_gib, margin)
    if 0 < seq < inp.seq_len:
        why = f"only {seq} tokens per row fit: longer rows get truncated"
        shorter = ({"seq_len": seq}, SLOWDOWN["shorter_sequence"], why)
        found.append(_recommendation(inp, chosen + [shorter], vram_gib, budget))
    if not found:
        nothing = replace(best, why=best.why + "; does not fit even so: use a larger GPU or a smaller model")
        found.append(nothing)
    return found


def _order(r: Recommendation):
    """Speed-only changes first, then the fastest, then the fewest changes, then the lowest peak."""
    return (r.changes_training, round(r.slowdown, 6), len(r.overrides), r.peak_gib)


def _change_dimensions(inp: PlanInput) -> list[list[Option]]:
    """Independent settings that can lower the peak, each a list of alternatives to the current one."""
    dims = []
    if inp.optimizer not in EIGHT_BIT_OPTIMIZERS:
        dims.append([({"optimizer": "adamw_8bit"}, SLOWDOWN["optimizer"],
                      "8-bit Adam keeps 2 bytes of state per trained parameter instead of 8")])
    if not inp.offload_embedding and not inp.full_finetuning:
        dims.append([({"offload_embedding": True}, SLOWDOWN["offload_embedding"],
                      "the frozen input embedding is a lookup: it can live in host RAM")])
    if inp.gradient_checkpointing == "true":
        dims.append([({"gradient_checkpointing": "unsloth"}, SLOWDOWN["checkpoint_offload"],
                      "offloaded checkpointing moves every layer's saved input to host RAM")])
    if inp.gradient_checkpointing == "false":
        dims.append([
            ({"gradient_checkpointing": "true"}, SLOWDOWN["checkpoint_on"],
             "checkpointing keeps one layer's activations instead of all of them"),
            ({"gradient_checkpointing": "unsloth"}, SLOWDOWN["checkpoint_on"] * SLOWDOWN["checkpoint_offload"],
             "checkpointing keeps one layer's activations, and the layer inputs in host RAM"),
        ])
    if inp.packing:
        dims.append([({"packing": False}, SLOWDOWN["packing_off"], "without packing each row attends only to itself")])
    dims.append(_batch_options(inp))
    dims.append(_load_options(inp))
    dims.append(_lora_options(inp))
    return [options for options in dims if options]


def _batch_options(inp: PlanInput) -> list[Option]:
    options, effective = [], inp.batch_size * inp.gradient_accumulation
    for batch in sorted({b for b in range(1, inp.batch_size) if inp.batch_size % b == 0}, reverse=True):
        options.append((
            {"batch_size": batch, "gradient_accumulation": effective // batch},
            SLOWDOWN["batch_halving"] ** math.log2(inp.batch_size / batch),
            f"smaller micro-batches hold fewer activations; accumulation keeps the effective batch at {effective}",
        ))
    return options


def _load_options(inp: PlanInput) -> list[Option]:
    if inp.full_finetuning:
        return []
    if inp.load_bits == 16:
        return [({"load_bits": 4}, SLOWDOWN["load_4bit_from_16"], "4-bit NF4 weights take about a quarter of 16-bit"),
                ({"load_bits": 8}, SLOWDOWN["load_8bit_from_16"], "8-bit weights take half of 16-bit")]
    if inp.load_bits == 8:
        return [({"load_bits": 4}, SLOWDOWN["load_4bit_from_8"], "4-bit NF4 weights take about half of 8-bit")]
    return []


def _lora_options(inp: PlanInput) -> list[Option]:
    if inp.full_finetuning:
        return []
    shape = model_shape(inp.model_config)
    options = []
    attention_only = LORA_TARGET_PRESETS["attention"]
    if any(g.kind != "attention" for g in lora_groups(shape, inp.lora_targets)):
        what = "the experts" if shape.experts else "the MLP"
        options.append(({"lora_targets": attention_only}, SLOWDOWN["fewer_lora_targets"],
                        f"LoRA on attention only: no adapters, gradients or optimizer states for {what} (trains less)"))
    if inp.lora_r > 8:
        options.append(({"lora_r": inp.lora_r // 2}, SLOWDOWN["lower_lora_rank"],
                        "half the LoRA rank halves adapter, gradient and optimizer memory (trains less)"))
    # both together
    if len(options) == 2:
        options.append(({**options[0][0], **options[1][0]}, options[0][1] * options[1][1],
                        options[0][2] + "; " + options[1][2]))
    return options


def _best_combination(inp: PlanInput, dimensions: list[list[Option]], vram_gib: float,
                      budget: float) -> tuple[Recommendation, list[Option]]:
    """The fitting combination (one option or none per dimension) with the smallest slowdown,
    training changes last; when none fits, the one with the lowest peak."""
    best = None
    for choice in itertools.product(*[[None] + options for options in dimensions]):
        chosen = [option for option in choice if option is not None]
        if chosen:
            candidate = _recommendation(inp, chosen, vram_gib, budget)
            if best is None or _better(candidate, best[0]):
                best = (candidate, chosen)
    return best


def _better(a: Recommendation, b: Recommendation) -> bool:
    if a.fits != b.fits:
        return a.fits
    if not a.fits:
        return a.peak_gib < b.peak_gib
    return _order(a) < _order(b)


def _fields(options: list[Option]) -> dict:
    fields = {}
    for changes, _, _ in options:
        fields.update(changes)
    return fields


def _recommendation(inp: PlanInput, options: list[Option], vram_gib: float, budget: float) -> Recommendation:
    fields = _fields(options)
    peak = predict(replace(inp, **fields), vram_gib).total_gib
    return Recommendation(
        overrides=_overrides(fields),
        peak_gib=peak,
        fits=peak <= budget,
        slowdown=math.prod(cost for _, cost, _ in options),
        why="; ".join(why for _, _, why in options),
        changes_training=any(name in TRAINING_CHANGES for name in fields),
    )


def _overrides(fields: dict) -> tuple[str, ...]:
    return tuple(_override(name, value) for name, value in fields.items())


def _override(field: str, value) -> str:
    if field == "load_bits":
        text = f"{value}bit"
    elif isinstance(value, (list, tuple)):
        text = "[" + ",".join(value) + "]"  # a YAML list, as config overrides are read
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    return f"{OVERRIDE_KEYS[field]}={text}"


# --- Output and calibration ----------------------------------------------------------------------

def format_breakdown(breakdown: Breakdown, vram_gib: float | None = None) -> str:
    """A plain-text table of the estimate, GiB with two decimals."""
    width = max(len(label) for label in COMPONENT_LABELS.values()) + 2
    lines = ["VRAM estimate (not a measurement) for " + breakdown.summary.replace("\n", "\n  "), ""]
    lines.append(f"  {'component':<{width}}{'GiB':>9}")
    for c in breakdown.components:
        label = COMPONENT_LABELS[c.name]
        value = f"{c.gib:9.2f}" if c.at_peak else f"({c.gib:.2f})".rjust(9)
        lines.append(f"  {label:<{width}}{value}")
    lines.append("  " + "-" * (width + 9))
    lines.append(f"  {'estimated peak':<{width}}{breakdown.total_gib:9.2f}")
    skipped = [COMPONENT_LABELS[c.name] for c in breakdown.components if not c.at_peak]
    if skipped:
        phase = "the loss" if breakdown.peak_phase == "loss" else "one layer's backward"
        lines.append(f"  (in parentheses: not live at the peak, which is during {phase})")
    if breakdown.host_ram_gib > 0:
        lines.append(f"  host RAM for offloaded tensors: {breakdown.host_ram_gib:.2f} GiB")
    vram_gib = breakdown.vram_gib if vram_gib is None else vram_gib
    if vram_gib is not None:
        lines.append("  " + _verdict(breakdown.total_gib, vram_gib))
        if breakdown.vram_gib != vram_gib:
            sized = "a large GPU" if breakdown.vram_gib is None else f"a {breakdown.vram_gib:.2f} GiB GPU"
            lines.append(f"  (the loss was sized for {sized}; Unsloth shrinks its chunks to the free memory)")
    lines += [f"  note: {note}" for note in breakdown.notes]
    return "\n".join(lines)


def _verdict(total_gib: float, vram_gib: float) -> str:
    budget = vram_gib * (1 - SAFETY_MARGIN)
    if total_gib <= budget:
        return f"GPU {vram_gib:.2f} GiB: estimated to fit, {vram_gib - total_gib:.2f} GiB to spare"
    return (f"GPU {vram_gib:.2f} GiB: estimated NOT to fit, {total_gib - budget:.2f} GiB over the budget "
            f"({SAFETY_MARGIN:.0%} kept free)")


def calibrate(breakdown: Breakdown, measured: Mapping[str, float]) -> dict[str, float]:
    """Factors for CALIBRATION that make `breakdown` match `measured` (GiB).

    `measured` maps component names to measured sizes (factor = measured / predicted), and/or
    "total" to the measured peak of the whole GPU: torch's peak reserved plus the CUDA context
    (what nvidia-smi shows). A total is matched by scaling the modelled components (everything but
    EXACT_COMPONENTS, cuda_context and fragmentation) by one common factor. The factors are
    relative to this breakdown: multiply them into CALIBRATION (per model family and GPU kind, once
    the bench has measured enough runs). The peak phase is assumed not to change; names that are not
    components of this breakdown are ignored.
    """
    factors = {}
    for name, value in measured.items():
        if name != "total" and breakdown.gib(name) > 0:
            factors[name] = value / breakdown.gib(name)
    if "total" in measured:
        # total = context + exact parts + (1 + fragmentation) * f * modelled parts
        at_peak = [c for c in breakdown.components if c.at_peak and c.name not in ("cuda_context", "fragmentation")]
        modelled = sum(c.gib for c in at_peak if c.name not in EXACT_COMPONENTS)
        exact = sum(c.gib for c in at_peak if c.name in EXACT_COMPONENTS)
        frag = 1 + (FRAGMENTATION_FACTOR - 1) * CALIBRATION.get("fragmentation", 1.0)
        if modelled > 0:
            common = max(measured["total"] - breakdown.gib("cuda_context") - exact, 0.0) / frag / modelled
            for c in at_peak:
                if c.name not in EXACT_COMPONENTS:
                    factors.setdefault(c.name, common)
    return factors


def format_recommendations(recommendations: Sequence[Recommendation], vram_gib: float) -> str:
    """The recommendations as numbered lines, each ready to paste as overrides."""
    if not recommendations:
        return f"  fits in {vram_gib:.2f} GiB as configured: nothing to change"
    lines = [f"  to fit {vram_gib:.2f} GiB ({SAFETY_MARGIN:.0%} kept free), fastest first (estimates):"]
    for number, r in enumerate(recommendations, 1):
        verdict = "fits" if r.fits else "still too big"
        lines.append(f"  {number}. {' '.join(r.overrides)}")
        lines.append(f"     peak {r.peak_gib:.2f} GiB ({verdict}), step time x{r.slowdown:.2f}: {r.why}")
    return "\n".join(lines)


# --- lowvram_ft config glue ----------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    """What Unsloth computes in on a card: the dtype of the weights kept in 16 bits (outside the 4-bit
    linears), the compute dtype, and why."""

    weights: str
    compute: str
    why: str


def has_bf16(compute_capability: float | None) -> bool:
    """Whether a card of this compute capability (e.g. 7.5 for a T4) has bf16; unknown = assume yes."""
    return compute_capability is None or compute_capability >= BF16_MIN_COMPUTE_CAPABILITY


def unsloth_precision(model_type: str, bf16: bool, requested: str = "auto") -> Precision:
    """The precision Unsloth uses for this model family on a card with / without bf16, for
    model.dtype=`requested` (code: unsloth models/loader.py ~2994-3010, models/vision.py ~3613-3650)."""
    forced = model_type in FORCE_FLOAT32_MODEL_TYPES
    if requested == "float32":
        return Precision("float32", "float32", "float32 as asked (model.dtype)")
    if bf16 and requested in ("auto", "bfloat16"):
        return Precision("bfloat16", "bfloat16", "bf16: the card supports it")
    if forced:
        return Precision("float32", "float16", f"float32 weights with float16 compute: Unsloth will not train "
                         f"{model_type} in float16{'' if bf16 else ' and the card has no bf16'}")
    return Precision("float16", "float16", "float16: " + ("as asked" if bf16 else "the card has no bf16"))


def plan_input_from_config(cfg, model_config: Mapping, bf16: bool = True) -> PlanInput:
    """The PlanInput of a resolved lowvram_ft Config on a GPU with (or without) bf16. "auto" settings take
    their GPU defaults (4-bit, adamw_8bit) and the precision Unsloth picks for the card; LoRA targets the
    planner cannot size (e.g. lm_head) are left out."""
    model, train = cfg.model, cfg.train
    bits = {"4bit": 4, "8bit": 8, "16bit": 16}.get(model.load_in, 16 if model.full_finetuning else 4)
    targets = tuple(t for t in cfg.lora.target_modules if t in LORA_MODULE_NAMES) or LORA_TARGET_PRESETS["attention"]
    precision = unsloth_precision(str(model_config.get("model_type", "")), bf16, model.dtype)
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
    )


def model_config_for(name: str) -> dict:
    """config.json of the configured model; the embedded tiny model is sized from its recipe."""
    from .config import EMBEDDED_MODELS

    if name in EMBEDDED_MODELS:
        from .embedded import VOCAB_SIZE, recipe_for

        recipe = recipe_for(name)
        return {"model_type": recipe.model_type, "vocab_size": VOCAB_SIZE, **recipe.shape}
    return resolve_model_config(name)


@dataclass(frozen=True)
class FitDecision:
    """What the fit check decided before a GPU run (`decide_fit`).

    action: "fits" | "adjusted" (train.fit=auto changed settings that keep the trained model the same,
    and it now fits) | "warn" (does not fit as estimated; the run goes ahead) | "refuse" (a calibrated
    estimate over the card by more than its measured error)."""

    action: str
    peak_gib: float                  # as it will run (after train.fit=auto's changes)
    vram_gib: float
    basis: str                       # "uncalibrated estimate, ±20%" / "calibrated estimate, ±6%"
    precision: Precision
    configured_gib: float | None = None  # as configured, when train.fit=auto changed something
    overrides: tuple[str, ...] = ()  # applied by train.fit=auto
    undo: tuple[str, ...] = ()       # the overrides that restore what was configured
    report: str = ""                 # breakdown and recommendations, for a run that does not fit

    def lines(self) -> list[str]:
        """The log lines: the verdict, then each change and how to undo it."""
        before = f"{self.configured_gib:.2f} GiB as configured, " if self.overrides else ""
        head = (f"estimated peak {before}{self.peak_gib:.2f} GiB{' with the changes below' if before else ''} "
                f"({self.basis}) on a {self.vram_gib:.2f} GiB card, {self.precision.why}: ")
        head += {"fits": "fits", "adjusted": "fits (the changes keep the trained model the same)",
                 "warn": "may not fit — training anyway (the estimate is not a measurement)",
                 "refuse": "does not fit"}[self.action]
        changes = [f"train.fit=auto set {o} (undo: {u}, or train.fit=warn)" for o, u in zip(self.overrides, self.undo)]
        return [head, *changes]


def decide_fit(cfg, vram_gib: float, bf16: bool = True, model_config: Mapping | None = None) -> FitDecision | None:
    """The fit check of a run about to start on a GPU of `vram_gib` (train.fit decides what happens when
    the estimate is over the card). None when train.fit=off or the model's config.json is unknown.

    An estimate never blocks a run unless it is calibrated and over the card by more than its measured
    error. train.fit=auto applies the planner's changes that keep the trained model the same (embedding
    offload, checkpointing mode, micro-batch -> accumulation at the same effective batch); rank,
    targets and sequence length are never changed."""
    if cfg.train.fit == "off":
        return None
    try:
        inp = plan_input_from_config(cfg, model_config or model_config_for(cfg.model.name), bf16)
        breakdown = predict(inp, vram_gib)
    except PlanError:
        return None
    budget = vram_gib * (1 - SAFETY_MARGIN)
    calibrated = bool(CALIBRATION) and CALIBRATION_ERROR is not None
    error = CALIBRATION_ERROR if calibrated else UNCALIBRATED_ERROR
    basis = f"{'calibrated' if calibrated else 'uncalibrated'} estimate, ±{error:.0%}"
    decision = FitDecision("fits", breakdown.total_gib, vram_gib, basis, unsloth_precision(
        str(inp.model_config.get("model_type", "")), bf16, cfg.model.dtype))
    if breakdown.total_gib <= budget:
        return decision
    peak, overrides, undo = breakdown.total_gib, (), ()
    if cfg.train.fit == "auto":
        change = same_model_change(inp, vram_gib, budget)
        if change is not None and change.peak_gib < peak:
            peak, overrides = change.peak_gib, change.overrides
            undo = tuple(_override(name, getattr(inp, name)) for name in _changed_fields(inp, change))
    report = "\n".join([format_breakdown(breakdown, vram_gib), format_recommendations(recommend(inp, vram_gib), vram_gib)])
    if peak <= budget:
        action = "adjusted"
    elif calibrated and peak > vram_gib * (1 + error):
        action = "refuse"
    else:
        action = "warn"
    return replace(decision, action=action, peak_gib=peak, configured_gib=breakdown.total_gib, overrides=overrides,
                   undo=undo, report=report)


def same_model_change(inp: PlanInput, vram_gib: float, budget: float) -> Recommendation | None:
    """The fastest combination of changes that keep the trained model the same (SAME_MODEL_FIELDS) and
    fit, else the one with the lowest peak; None when there is nothing to change."""
    dimensions = [[o for o in options if set(o[0]) <= set(SAME_MODEL_FIELDS)] for options in _change_dimensions(inp)]
    dimensions = [options for options in dimensions if options]
    if not dimensions:
        return None
    return _best_combination(inp, dimensions, vram_gib, budget)[0]


def _changed_fields(inp: PlanInput, change: Recommendation) -> list[str]:
    keys = {OVERRIDE_KEYS[name]: name for name in SAME_MODEL_FIELDS}
    return [keys[o.split("=", 1)[0]] for o in change.overrides]


def run(cfg, vram_gib: float | None = None, compute_capability: float | None = None) -> int:
    """`lowvram_ft plan`: print the estimate (and, given the GPU size, what to change) in the precision
    Unsloth uses on that card (`compute_capability`, e.g. 7.5 for a T4; unknown = a bf16 card).
    Exit status 0 when it fits or no GPU size was given, 1 when it does not fit, 2 on bad input."""
    try:
        if vram_gib is not None and not 0 < vram_gib < math.inf:  # nan fails every comparison
            raise PlanError(f"--vram: got {vram_gib}; expected the GPU's memory in GiB, a positive number (e.g. 16)")
        if compute_capability is not None and not 1 <= compute_capability < 100:
            raise PlanError(f"--compute-capability: got {compute_capability}; expected e.g. 7.5 (T4), 8.6, 9.0 (H100)")
        model_config = model_config_for(cfg.model.name)
        bf16 = has_bf16(compute_capability)
        inp = plan_input_from_config(cfg, model_config, bf16)
        breakdown = predict(inp, vram_gib)
    except PlanError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    precision = unsloth_precision(str(model_config.get("model_type", "")), bf16, cfg.model.dtype)
    card = (f"compute capability {compute_capability}" if compute_capability is not None
            else "a card with bf16 assumed (pass --compute-capability 7.5 for a T4)")
    print(f"precision: {precision.why} ({card})")
    print(format_breakdown(breakdown, vram_gib))
    if vram_gib is None:
        print(f"  smallest GPU that fits: {min_vram_gib(inp):.2f} GiB ({SAFETY_MARGIN:.0%} kept free)")
        return 0
    print(format_recommendations(recommend(inp, vram_gib), vram_gib))
    print(f"  longest sequence that fits as configured: {max_seq_len_that_fits(inp, vram_gib)} tokens")
    return 0 if breakdown.total_gib <= vram_gib * (1 - SAFETY_MARGIN) else 1
