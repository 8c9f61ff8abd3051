"""The modelled part of the estimate: what one training step allocates and frees, layer by layer:
activations saved for backward (checkpointed or not), one layer's recompute and backward, attention
scores or workspace, MoE routing buffers and dequantized weights. Each constant names its source:
"code" (read in the installed unsloth / unsloth_zoo / bitsandbytes / transformers sources), "claim" or
"first principles" (an autograd count or a guess that calibration replaces)."""
from __future__ import annotations

import math

from ..io import GIB
from typing import Mapping

from .inputs import DTYPE_BYTES, FP32, INT64, LORA_MODULE_NAMES, LORA_TARGET_PRESETS, PlanInput
from .shapes import ModelShape, linear_groups, lora_groups, lora_parameters, model_shape

# --- Activations (bytes saved for backward, per token, per decoder layer) ------------------------
# Unsloth's LoRA MLP saves the gate and up projections and recomputes SwiGLU in backward (code:
# unsloth/kernels/fast_lora.py LoRA_MLP save_for_backward(..., X, e, g)); plain PyTorch also keeps
# act(gate) and the product fed to down_proj (first principles, autograd).
SWIGLU_SAVED_WIDTHS = {True: 2, False: 4}
# gpt-oss experts in training (Unsloth): the fused clamped-SwiGLU saves only its gate_up input for
# backward (code: unsloth_zoo temporary_patches/moe_fused_swiglu.py "saves only gate_up for backward",
# save_for_backward(gate_up)), in the compute dtype; the frozen grouped GEMMs save no input for a dX-only
# backward (moe_utils.py ~1141); the down output is kept for the routing-weight product. So per routed
# (token, expert): 2 x intermediate + hidden values. LoRA on the experts also keeps both GEMM inputs.
GPT_OSS_SAVED_WIDTHS = {"gate_up": 2, "down_out": 1}
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

# --- Tiled MLP -----------------------------------------------------------------------------------
# Unsloth's unsloth_tiled_mlp=True runs the MLP in row tiles, saving only the MLP input and recomputing
# each tile in backward (code: unsloth_zoo tiled_mlp.py TiledMLP). The tile length comes from
# get_max_flat_qlen(hd, mlp_size, nbytes, target_gb) with target_gb = half the memory free at the
# first call (_default_target_gb): rows = (target / nbytes - 3 hd mlp) / (11 hd + 3 mlp), a multiple of 64.
TILED_MLP_FREE_FRACTION = 0.5
TILED_MLP_ROW_MULTIPLE = 64

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


def step_tokens(inp: PlanInput) -> int:
    """Tokens in one micro-batch (packed rows are exactly seq_len long)."""
    return inp.batch_size * inp.seq_len


def attention_impl(inp: PlanInput, shape: ModelShape) -> str:
    """The attention implementation the run trains with. Unsloth always uses its own: flex attention with
    sinks for gpt-oss, its fused/SDPA attention otherwise (code: unsloth models/llama.py, unsloth_zoo
    flex_attention) — both O(seq) memory, never eager score matrices. Plain transformers: as set; "auto"
    is sdpa, eager for gpt-oss (transformers' default for its sinks; the OpenAI cookbook recipe)."""
    if inp.unsloth_kernels:
        return "flex" if shape.attention_sinks else "sdpa"
    if inp.attention != "auto":
        return inp.attention
    return "eager" if shape.attention_sinks else "sdpa"


def layer_bytes_per_token(inp: PlanInput, shape: ModelShape) -> float:
    """Bytes autograd keeps per token for one decoder layer (LoRA on every linear assumed)."""
    return _attention_bytes_per_token(inp, shape) + mlp_bytes_per_token(inp, shape)


def _attention_bytes_per_token(inp: PlanInput, shape: ModelShape) -> float:
    dt = DTYPE_BYTES[inp.dtype]
    h = shape.hidden
    q_dim, kv_dim = shape.q_heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # norm input and output, q/k/v after RoPE, attention output, fp32 logsumexp per head
    attention = dt * (2 * h + 2 * q_dim + 2 * kv_dim) + FP32 * shape.q_heads
    if shape.qk_norm:
        attention += dt * (q_dim + kv_dim)
    # x @ lora_A (r values) saved per wrapped attention linear
    wrapped = [] if inp.full_finetuning else lora_groups(shape, inp.lora_targets)
    return attention + dt * inp.lora_r * sum(1 for g in wrapped if g.kind == "attention")


def mlp_bytes_per_token(inp: PlanInput, shape: ModelShape) -> float:
    """Bytes the MLP (or the routed experts) of one layer keeps per token for backward, untiled."""
    dt = DTYPE_BYTES[inp.dtype]
    h = shape.hidden
    wrapped = [] if inp.full_finetuning else lora_groups(shape, inp.lora_targets)
    lora = dt * inp.lora_r * sum(shape.experts_per_token if g.kind == "expert" else 1 for g in wrapped
                                 if g.kind != "attention")
    swiglu = SWIGLU_SAVED_WIDTHS[inp.unsloth_kernels]
    if not shape.experts:
        return dt * (2 * h + swiglu * shape.intermediate) + lora
    i, k = shape.expert_intermediate, shape.experts_per_token
    if shape.fused_gate_up and inp.unsloth_kernels:
        per_expert = dt * (GPT_OSS_SAVED_WIDTHS["gate_up"] * i + GPT_OSS_SAVED_WIDTHS["down_out"] * h)
        if any(g.kind == "expert" for g in wrapped):
            per_expert += dt * (h + i)  # the inputs of the LoRA A matmuls of gate_up and down
    else:
        # plain PyTorch: gathered input, gate and up (or gate_up), activation and product, down output
        per_expert = dt * (2 * h + swiglu * i)
    return dt * 2 * h + k * per_expert + lora


def tiled_mlp_rows(inp: PlanInput, shape: ModelShape, free_bytes: float) -> int:
    """Rows per MLP tile under Unsloth's Tiled MLP when `free_bytes` are free at its first call (code:
    unsloth_zoo tiled_mlp.get_max_flat_qlen, with mlp_size = config intermediate_size)."""
    dt = DTYPE_BYTES[inp.dtype]
    h = shape.hidden
    mlp = shape.expert_intermediate or shape.intermediate
    target = TILED_MLP_FREE_FRACTION * max(free_bytes, 0.0)
    rows = math.ceil((target / dt - 3 * h * mlp) / (10 * h + 3 * mlp + h))
    return max(TILED_MLP_ROW_MULTIPLE, rows // TILED_MLP_ROW_MULTIPLE * TILED_MLP_ROW_MULTIPLE)


def activation_bytes(inp: PlanInput, shape: ModelShape, mlp_rows: int | None = None) -> dict[str, float]:
    """Bytes of the checkpointed activations, one layer's recompute and backward, attention and routing.
    `mlp_rows`: rows per tile under Tiled MLP (None: the MLP is not tiled).

    A layer's backward runs its MLP first, then its attention, so under Tiled MLP the tile
    ("mlp_tile") and the attention's backward ("backward_workspace", "attention") are never live
    together; estimate.py takes the larger of the two."""
    tokens, dt = step_tokens(inp), DTYPE_BYTES[inp.dtype]
    tiled = inp.tiled_mlp and inp.unsloth_kernels and mlp_rows is not None and mlp_rows < tokens
    mlp = mlp_bytes_per_token(inp, shape)
    # a tiled MLP saves only its input for backward
    per_token = _attention_bytes_per_token(inp, shape) + (dt * shape.hidden if tiled else mlp)
    per_layer = tokens * per_token
    hidden_state = tokens * shape.hidden * dt
    mode = inp.gradient_checkpointing
    if mode == "unsloth":
        activations, recompute = OFFLOADED_CHECKPOINT_GPU_BUFFERS * hidden_state, per_layer
    elif mode == "true":
        activations, recompute = shape.layers * hidden_state, per_layer
    else:
        activations, recompute = shape.layers * per_layer, 0.0
    attention_saved, attention_transient = attention_bytes(inp, shape)
    routing = routing_bytes(inp, shape)
    layers_held = 1 if mode != "false" else shape.layers
    parts = {
        "activations": activations,
        "layer_recompute": recompute,
        "backward_workspace": BACKWARD_WORKSPACE_FRACTION * per_layer,
        "attention": layers_held * attention_saved + attention_transient,
        "moe_routing": layers_held * routing,
    }
    if tiled:
        # one tile's saved tensors, plus the gradient of the layer output and of the MLP input
        parts["mlp_tile"] = mlp_rows * mlp + 2 * hidden_state
    return parts


def attention_bytes(inp: PlanInput, shape: ModelShape) -> tuple[float, float]:
    """(saved per layer, transient of the layer being computed) for the attention scores."""
    tokens = step_tokens(inp)
    if attention_impl(inp, shape) != "eager":
        q_size = tokens * shape.q_heads * shape.head_dim
        return 0.0, FLASH_BACKWARD_FP32_ACCUMULATORS * FP32 * q_size
    sink = 1 if shape.attention_sinks else 0
    if inp.packing:
        # padding-free packing flattens the micro-batch into one row: eager attends across all of it
        scores = shape.q_heads * tokens * (tokens + sink)
    else:
        scores = inp.batch_size * shape.q_heads * inp.seq_len * (inp.seq_len + sink)
    return EAGER_SAVED_BYTES_PER_SCORE * scores, EAGER_TRANSIENT_BYTES_PER_SCORE * scores


def routing_bytes(inp: PlanInput, shape: ModelShape) -> float:
    """Bytes of one MoE layer's routing buffers (0 for a dense model)."""
    if not shape.experts:
        return 0.0
    per_token = (
        ROUTING_SCORE_TENSORS * shape.experts * DTYPE_BYTES[inp.dtype]
        + shape.experts_per_token * (ROUTING_INT64_PER_TOKEN_EXPERT * INT64 + FP32)
    )
    return step_tokens(inp) * per_token


def dequant_bytes(inp: PlanInput, shape: ModelShape) -> float:
    """Bytes of the weights dequantized at once for the layer being computed (0 for 16-bit weights)."""
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


def generation_bytes(inp: PlanInput, shape: ModelShape) -> dict[str, float]:
    """Bytes of a generation of inp.generate_tokens tokens (batch 1) run before training in the same
    process (generate_batch rows): the KV cache of every layer and the prefill of one layer (its hidden states, the attention
    scores where the stack generates with eager attention — Unsloth's gpt-oss does — and the routed
    experts), with logits for the last position only (transformers' generate, logits_to_keep=1)."""
    tokens, rows = inp.generate_tokens, inp.generate_batch
    if not tokens:
        return {}
    dt = DTYPE_BYTES[inp.dtype]
    kv = rows * shape.layers * 2 * shape.kv_heads * shape.head_dim * tokens * dt
    prefill = rows * tokens * (mlp_bytes_per_token(inp, shape) + 4 * shape.hidden * dt)
    if shape.attention_sinks or attention_impl(inp, shape) == "eager":
        # scores, sinks concatenated and the fp32 softmax, one layer at a time
        prefill += rows * shape.q_heads * tokens * (tokens + 1) * (2 * dt + FP32)
    return {"kv_cache": kv, "generation": prefill + rows * shape.vocab * FP32}


# --- GRPO (train.method=grpo) --------------------------------------------------------------------
# On top of a training step: the KV cache of generating group x (prompt + completion) tokens, the fp32
# log-probabilities of the group's completions, and the reference copy of the adapter TRL keeps when
# grpo.beta > 0 (code: trl grpo_trainer.py, the "ref" adapter). First principles, not yet calibrated.

def grpo_terms(model_config: Mapping, *, completions: int, micro_batch: int, tokens: int, completion_tokens: int,
               beta: float, lora_r: int, lora_targets, dtype_bytes: int = 2) -> dict[str, float]:
    """GiB per GRPO term. `completions`: generated together (batch x accumulation); `micro_batch`: scored
    per forward; `tokens`: prompt + completion per sequence. Sliding-window layers (gpt-oss) keep at
    most their window of keys and values."""
    shape = model_shape(model_config)
    window = model_config.get("sliding_window") or tokens
    kinds = model_config.get("layer_types") or ["full_attention"] * shape.layers
    cached = sum(min(tokens, window) if kind == "sliding_attention" else tokens for kind in kinds)
    kv = 2 * shape.kv_heads * shape.head_dim * dtype_bytes * completions * cached
    logits = micro_batch * completion_tokens * shape.vocab * FP32
    reference = lora_parameters(shape, lora_targets, lora_r) * dtype_bytes if beta > 0 else 0
    return {"generation KV cache": kv / GIB, "completion log-probabilities (fp32)": logits / GIB,
            "reference adapter (beta > 0)": reference / GIB}


def grpo_terms_for(cfg, model_config: Mapping) -> dict[str, float]:
    """grpo_terms of a resolved lowvram_ft Config (prompt + completion bounded by model.max_seq_length)."""
    g, t = cfg.grpo, cfg.train
    targets = tuple(x for x in cfg.lora.target_modules if x in LORA_MODULE_NAMES) or LORA_TARGET_PRESETS["attention"]
    return grpo_terms(model_config, completions=t.batch_size * t.gradient_accumulation_steps, micro_batch=t.batch_size,
                      tokens=cfg.model.max_seq_length, completion_tokens=g.max_completion_length, beta=g.beta,
                      lora_r=cfg.lora.r, lora_targets=targets)
