"""The exact part of the estimate: bytes of the weights (quantized and not), the trainable adapters,
their gradients and the optimizer states, from the parameter counts and how bitsandbytes, Unsloth and
the optimizers store them. Held on the GPU for the whole step."""
from __future__ import annotations

import math

from .inputs import DTYPE_BYTES, FP32, OPTIMIZERS, PlanInput
from .shapes import LinearGroup, ModelShape, ParameterCounts, linear_groups

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

# bitsandbytes 8-bit Adam: 2 states of 1 byte each, quantized blockwise with one fp32 absmax per 256
# values (code: bitsandbytes optim/optimizer.py, blocksize = 256).
ADAM_8BIT_BLOCKSIZE = 256
ADAM_8BIT_BYTES_PER_PARAM = 2 * (1 + FP32 / ADAM_8BIT_BLOCKSIZE)
# Unsloth's dynamic 4-bit checkpoints ("-unsloth-bnb-4bit") leave a model-dependent set of linears in
# 16 bits; the set is in each repo's quantization_config, not in config.json. Unsloth states the cost:
# "<10% more VRAM than BnB 4-bit" (claim: Unsloth blog "Unsloth Dynamic 4-bit Quants", 2024-12), so the
# 4-bit linears are counted at most 10% larger; a layout given by module names is exact instead.
DYNAMIC_4BIT_MAX_OVERHEAD = 0.10


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


def weight_bytes(inp: PlanInput, shape: ModelShape, counts: ParameterCounts) -> dict[str, float]:
    """Bytes of the frozen weights on the GPU: quantized linears and what stays in 16 (or 32) bits."""
    offloaded = counts.embedding if inp.offload_embedding and not shape.tied_embeddings else 0
    if inp.full_finetuning:
        return {"quantized_weights": 0, "unquantized_weights": counts.total * FULL_FT_PARAM_BYTES[inp.dtype]}
    sixteen = DTYPE_BYTES[inp.weights_dtype or inp.dtype]
    if inp.load_bits == 16:
        return {"quantized_weights": 0, "unquantized_weights": (counts.total - offloaded) * sixteen}
    kept = () if isinstance(inp.kept_16bit, str) else tuple(inp.kept_16bit)
    groups = linear_groups(shape)
    quantized = sum(quantized_bytes(g, inp.load_bits) for g in groups if g.name not in kept)
    kept_linears = sum(g.in_features * g.out_features * g.count for g in groups if g.name in kept)
    parts = {"quantized_weights": quantized,
             "unquantized_weights": (counts.kept_16bit + kept_linears - offloaded) * sixteen}
    if inp.kept_16bit == "dynamic" and inp.load_bits == 4:
        parts["dynamic_16bit_linears"] = DYNAMIC_4BIT_MAX_OVERHEAD * quantized
    return parts


def training_bytes(inp: PlanInput, counts: ParameterCounts, trainable: int) -> dict[str, float]:
    """Bytes of what training adds for `trainable` parameters: adapters, gradients, optimizer states."""
    param_bytes = FULL_FT_PARAM_BYTES[inp.dtype] if inp.full_finetuning else LORA_PARAM_BYTES
    states, kind = OPTIMIZERS[inp.optimizer]
    state_bytes = {"8bit": ADAM_8BIT_BYTES_PER_PARAM / 2, "fp32": FP32, "param": param_bytes}[kind]
    return {
        "trainable_weights": 0 if inp.full_finetuning else trainable * LORA_PARAM_BYTES,
        "gradients": trainable * param_bytes,
        "optimizer_states": trainable * states * state_bytes,
    }
