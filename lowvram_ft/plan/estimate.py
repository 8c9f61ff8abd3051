"""The predicted peak GPU memory of one training step (`predict`).

One step has two memory high-water marks that are never live together: the loss at the end of the
forward, and the backward of one decoder layer (its recomputed activations, gradients flowing through
it, dequantized weights). Everything else (weights, adapters, gradients, optimizer states, checkpointed
hidden states, what torch keeps reserved after loading) is held across the whole step. A generation run
before training in the same process (`generate_tokens`) is a third high-water mark. So

    reserved peak = static + max(loss phase, layer phase[, generation])  (+ fragmentation, plain stack)
    card peak     = reserved peak + CUDA context

The reserved peak is what torch.cuda.max_memory_reserved() reports (every published figure of
data/published_peaks.jsonl is one); the card must also hold the CUDA context, which torch does not count.
The exact parts come from weights.py, the modelled ones from transients.py; the published measurements
that check them are in calibration.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..io import GIB
from .inputs import DTYPE_BYTES, FP32, PlanInput, raise_problems
from .shapes import DENSE_MODEL_TYPES, ModelShape, ParameterCounts, count_parameters, lora_parameters, model_shape
from .transients import (
    activation_bytes,
    attention_impl,
    dequant_bytes,
    generation_bytes,
    step_tokens,
    tiled_mlp_rows,
)
from .weights import training_bytes, weight_bytes

# --- Logits and loss ------------------------------------------------------------------------------
# Unsloth (2026.10.9) trains with its fused linear cross entropy: hidden @ lm_head.T one row chunk at a
# time, fp32 logits plus their gradient in the compute dtype, never the full logits (code: unsloth_zoo
# fused_losses/fused_linear.py fused_linear_rows, _budget_bytes, _CHUNK_GB = 2.0; cross_entropy_loss.py
# _use_chunked_ce routes the default path there). Rows per chunk: the power of two at or below
# tokens x hidden / vocab, at least max(512, pow2(512 x 151936 / vocab) halved when above), at most
# 4096, and at most min(2 GiB, half the free memory at the first call) / (vocab x 4 bytes).
FUSED_LINEAR_CHUNK_GIB = 2.0
FUSED_LINEAR_FREE_FRACTION = 0.5
FUSED_LINEAR_MIN_LOGITS = 512 * 151936
FUSED_LINEAR_MIN_ROWS = 512
FUSED_LINEAR_MAX_ROWS = 4096
FUSED_LINEAR_LOGIT_BYTES = FP32
# Plain transformers loss (ForCausalLMLoss): the lm_head output in the compute dtype, its fp32 upcast,
# the saved fp32 log-softmax and its fp32 gradient, all [tokens, vocab] at once (first principles:
# transformers loss_utils.py `logits.float()` then cross_entropy).
PLAIN_CE_FP32_COPIES = 3
# Unsloth's releases of 2023-2024 (before its fused losses): fast_cross_entropy_loss on the full logits,
# the lm_head output in the compute dtype plus an fp32 copy, the gradient written into it in place (code:
# unsloth kernels/cross_entropy_loss.py of that era, backward in place; the fp32 copy per the published
# cases' caveat "full fp32 logits path of that era").
INPLACE_CE_FP32_COPIES = 1
# A loss that never builds full logits (Cut Cross Entropy, Liger, "chunked") holds the gradient of
# the hidden states it returns and an fp32 log-sum-exp per token (first principles: CCE's kernels
# keep logits tiles in on-chip memory).
CHUNKED_LOSS_FP32_PER_TOKEN = 2

# --- Fixed costs ----------------------------------------------------------------------------------
# CUDA context, cuBLAS/Triton workspaces and loaded kernels: not in torch's counters, visible in
# nvidia-smi (first principles; typical 0.3-0.6 GiB with lazy module loading). Counted for what the
# card must hold, never for a reserved figure.
CUDA_CONTEXT_GIB = 0.5
# What torch keeps reserved after loading a pre-quantized 4-bit model beyond the tensors it holds
# (measured: the median of start reserved - (weights + adapters) over the four clean Unsloth notebook
# loads of calibration.py, Llama-3.1-8B 0.52, Llama-3.2-3B 0.46, Mistral-Nemo 0.64, Qwen2.5-7B 0.45 GiB;
# tests/unit/test_plan_calibration.py recomputes it). 16-bit loads: nothing measured, none counted.
LOAD_RESERVED_GIB = 0.49
# Caching-allocator overhead on what is allocated and freed every step. Unsloth sets
# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True at import (code: unsloth_zoo __init__.py ~324), so
# segments grow in place and nothing is counted; the plain stack runs torch's default allocator, whose
# split blocks are assumed to waste 20% of the per-step transients (first principles guess).
FRAGMENTATION_FACTOR = 1.20

# Component name -> factor from our own GPU runs (`calibrate`). Empty: the published cases check the
# terms above directly (calibration.py), no term is scaled.
FACTORS: dict[str, float] = {}
# Exact arithmetic on the config (never calibrated); everything else is a model of runtime behaviour.
EXACT_COMPONENTS = ("quantized_weights", "unquantized_weights", "trainable_weights", "gradients", "optimizer_states")
# Held from loading on: the only components of a generation run before training.
LOAD_COMPONENTS = ("quantized_weights", "unquantized_weights", "dynamic_16bit_linears", "trainable_weights",
                   "load_reserved")
PHASES = {
    "quantized_weights": "static", "unquantized_weights": "static", "dynamic_16bit_linears": "static",
    "trainable_weights": "static", "load_reserved": "static", "gradients": "static", "optimizer_states": "static",
    "activations": "static", "layer_recompute": "layer", "dequant_buffers": "layer", "moe_routing": "layer",
    "backward_workspace": "layer_attention", "attention": "layer_attention", "mlp_tile": "layer_mlp",
    "logits_and_loss": "loss", "kv_cache": "generate", "generation": "generate",
}


@dataclass(frozen=True)
class Component:
    name: str
    gib: float
    phase: str            # "static" (held all step) | "loss" | "layer" / "layer_mlp" / "layer_attention" (backward of
                          # one layer: the MLP part, then the attention part) | "generate" (before training)
    at_peak: bool


@dataclass(frozen=True)
class Breakdown:
    """Predicted peak GPU memory, by component, in GiB. An estimate, not a measurement.

    total_gib is what the card must hold (torch's reserved peak plus the CUDA context); reserved_gib is
    what torch.cuda.max_memory_reserved() would report."""

    components: tuple[Component, ...]
    total_gib: float
    peak_phase: str
    host_ram_gib: float
    params: ParameterCounts
    trainable_params: int
    summary: str
    notes: tuple[str, ...]
    vram_gib: float | None = None  # the GPU size the loss chunks and MLP tiles were sized for (None: not sized)
    training_gib: float | None = None  # card peak of training alone, when a generation runs before it

    @property
    def reserved_gib(self) -> float:
        return self.total_gib - self.gib("cuda_context")

    def gib(self, name: str) -> float:
        """One component's size in GiB (0.0 for a component this run does not have)."""
        return next((c.gib for c in self.components if c.name == name), 0.0)

    def as_dict(self) -> dict:
        """Plain values for a JSON report."""
        return {
            "estimate_total_gib": round(self.total_gib, 3),
            "card_peak_gib": round(self.total_gib, 3),
            "reserved_peak_gib": round(self.reserved_gib, 3),
            "sized_for_vram_gib": self.vram_gib,
            "peak_phase": self.peak_phase,
            "host_ram_gib": round(self.host_ram_gib, 3),
            "components_gib": {c.name: round(c.gib, 3) for c in self.components},
            "component_phases": {c.name: c.phase for c in self.components},
            "not_at_peak": [c.name for c in self.components if not c.at_peak],
            "total_params": self.params.total,
            "trainable_params": self.trainable_params,
            "notes": list(self.notes),
        }


def predict(inp: PlanInput, vram_gib: float | None = None) -> Breakdown:
    """Predicted peak GPU memory of `inp`.

    `vram_gib` (the card as torch reports it) sizes what Unsloth sizes from the free memory: its loss
    chunks and, under Tiled MLP, the MLP tiles. Without it the loss takes its 2 GiB cap and the MLP is
    counted untiled (an upper bound)."""
    raise_problems(inp)
    shape = model_shape(inp.model_config)
    counts = count_parameters(shape)
    trainable = counts.total if inp.full_finetuning else lora_parameters(shape, inp.lora_targets, inp.lora_r)
    parts = {
        **weight_bytes(inp, shape, counts),
        "load_reserved": LOAD_RESERVED_GIB * GIB if inp.load_bits != 16 else 0.0,
        **training_bytes(inp, counts, trainable),
    }
    parts.update(activation_bytes(inp, shape))
    if inp.tiled_mlp and inp.unsloth_kernels and vram_gib is not None:
        free = _free_bytes(parts, vram_gib, ("activations",))
        parts.update(activation_bytes(inp, shape, tiled_mlp_rows(inp, shape, free)))
    parts["dequant_buffers"] = dequant_bytes(inp, shape)
    parts["logits_and_loss"] = _loss_bytes(inp, shape, parts, vram_gib)
    parts.update(generation_bytes(inp, shape))
    parts = {name: size * FACTORS.get(name, 1.0) for name, size in parts.items()}
    return _assemble(inp, shape, counts, trainable, parts, vram_gib)


def _free_bytes(parts: dict[str, float], vram_gib: float, also: tuple[str, ...]) -> float:
    """Memory free when Unsloth measures it (torch.cuda.mem_get_info): the card less the context and
    what is held from loading on, plus `also`."""
    held = CUDA_CONTEXT_GIB * GIB + sum(parts.get(name, 0.0) for name in LOAD_COMPONENTS + also)
    return max(vram_gib * GIB - held, 0.0)


def loss_kind(inp: PlanInput) -> str:
    """"fused" (Unsloth's own), "chunked" (never full logits), "full" or "inplace"."""
    if inp.loss != "auto":
        return "fused" if inp.loss == "chunked" and inp.unsloth_kernels else inp.loss
    return "fused" if inp.unsloth_kernels else "full"


def fused_loss_rows(tokens: int, hidden: int, vocab: int, free_bytes: float | None) -> int:
    """Rows per chunk of Unsloth's fused linear cross entropy (code: fused_linear.py fused_linear_rows)."""
    ideal = tokens * hidden / vocab
    rows = _pow2_at_or_below(ideal)
    minimum = _pow2_at_or_below(FUSED_LINEAR_MIN_LOGITS / vocab)
    minimum = min(max(minimum, FUSED_LINEAR_MIN_ROWS), FUSED_LINEAR_MAX_ROWS)
    rows = min(max(rows, minimum), FUSED_LINEAR_MAX_ROWS)
    budget = FUSED_LINEAR_CHUNK_GIB * GIB
    if free_bytes is not None and free_bytes > 0:
        budget = min(budget, FUSED_LINEAR_FREE_FRACTION * free_bytes)
    rows = min(rows, max(int(budget // (vocab * FUSED_LINEAR_LOGIT_BYTES)), 2))
    return max(min(rows, tokens), 1)


def _pow2_at_or_below(x: float) -> int:
    power = 1
    while power * 2 <= x:
        power *= 2
    return power


def _loss_bytes(inp: PlanInput, shape: ModelShape, parts: dict[str, float], vram_gib: float | None) -> float:
    """Bytes of the logits and loss, plus the gradient of the final hidden states the loss returns."""
    tokens, dt = step_tokens(inp), DTYPE_BYTES[inp.dtype]
    hidden_grad = tokens * shape.hidden * dt
    kind = loss_kind(inp)
    if kind == "full":
        return tokens * shape.vocab * (dt + PLAIN_CE_FP32_COPIES * FP32)
    if kind == "inplace":
        return tokens * shape.vocab * (dt + INPLACE_CE_FP32_COPIES * FP32) + hidden_grad
    if kind == "chunked":
        return hidden_grad + tokens * CHUNKED_LOSS_FP32_PER_TOKEN * FP32
    free = None if vram_gib is None else _free_bytes(parts, vram_gib, ("activations", "trainable_weights"))
    rows = fused_loss_rows(tokens, shape.hidden, shape.vocab, free)
    return rows * shape.vocab * (FUSED_LINEAR_LOGIT_BYTES + dt) + hidden_grad


def _assemble(inp, shape, counts, trainable, parts, vram_gib) -> Breakdown:
    phases = {name: PHASES[name] for name in parts}
    if inp.gradient_checkpointing == "false":  # every layer's attention and routing held all step
        phases.update(attention="static", moe_routing="static")
    by_phase = {phase: sum(size for name, size in parts.items() if phases[name] == phase)
                for phase in ("static", "loss", "layer", "layer_mlp", "layer_attention", "generate")}
    # within a layer's backward the MLP (tile) comes first, then the attention: the larger counts
    layer_part = "layer_mlp" if by_phase["layer_mlp"] > by_phase["layer_attention"] else "layer_attention"
    layer = by_phase["layer"] + by_phase[layer_part]
    train_phase = "loss" if by_phase["loss"] > layer else "layer"
    training = by_phase["static"] + (layer if train_phase == "layer" else by_phase["loss"])
    loaded = sum(parts.get(name, 0.0) for name in LOAD_COMPONENTS)
    generating = loaded + by_phase["generate"] if by_phase["generate"] else 0.0
    peak_phase = "generate" if generating > training else train_phase

    def at_peak(name: str) -> bool:
        if peak_phase == "generate":
            return name in LOAD_COMPONENTS or phases[name] == "generate"
        if peak_phase == "layer":
            return phases[name] in ("static", "layer", layer_part)
        return phases[name] in ("static", peak_phase)

    components = [Component(name, size / GIB, phases[name], at_peak(name)) for name, size in parts.items()]
    if not inp.unsloth_kernels:
        dynamic = sum(c.gib for c in components if c.at_peak and c.name not in EXACT_COMPONENTS + LOAD_COMPONENTS)
        components.append(Component("fragmentation", (FRAGMENTATION_FACTOR - 1.0) * dynamic, "static", True))
    components.append(Component("cuda_context", CUDA_CONTEXT_GIB, "static", True))
    components = [c for c in components if c.gib > 0]
    total = sum(c.gib for c in components if c.at_peak)
    return Breakdown(
        components=tuple(components),
        total_gib=total,
        peak_phase=peak_phase,
        host_ram_gib=_host_ram_bytes(inp, shape, counts) / GIB,
        params=counts,
        trainable_params=trainable,
        summary=_summary(inp, shape, counts, trainable),
        notes=tuple(_notes(inp, shape, vram_gib)),
        vram_gib=vram_gib,
        training_gib=(training / GIB + CUDA_CONTEXT_GIB) if by_phase["generate"] else None,
    )


def _host_ram_bytes(inp: PlanInput, shape: ModelShape, counts: ParameterCounts) -> float:
    offloaded = 0.0
    if inp.gradient_checkpointing == "unsloth":
        offloaded += shape.layers * step_tokens(inp) * shape.hidden * DTYPE_BYTES[inp.dtype]
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
        f"checkpointing {inp.gradient_checkpointing}, {inp.optimizer}, {attention_impl(inp, shape)} attention, "
        f"{inp.stack} stack, {loss_kind(inp)} loss{', tiled MLP' if inp.tiled_mlp else ''}"
    )
    return f"{shape.model_type}, {size}\n{method}\n{run}"


def _notes(inp: PlanInput, shape: ModelShape, vram_gib: float | None) -> list[str]:
    notes = []
    if shape.guessed:
        notes.append(f"config lacks {', '.join(shape.guessed)}: filled with defaults, treat as rough")
    if shape.model_type not in DENSE_MODEL_TYPES + ("gpt_oss",):
        notes.append(f"model_type {shape.model_type!r} sized by the generic transformer formula")
    if loss_kind(inp) == "fused":
        notes.append("loss: Unsloth's fused linear cross entropy (row chunks of fp32 logits, at most 2 GiB or "
                     "half the free memory)")
    if inp.tiled_mlp and vram_gib is None:
        notes.append("Tiled MLP: tiles are sized from the free memory; without --vram the MLP is counted untiled")
    if inp.kept_16bit == "dynamic":
        notes.append("dynamic 4-bit checkpoint: the 16-bit linears are counted by Unsloth's claim (<10% more)")
    if inp.offload_embedding and shape.tied_embeddings:
        notes.append("embedding is tied to lm_head: offloading it saves no GPU memory")
    if inp.dtype == "float16" and shape.attention_sinks:
        notes.append("fp16 GPU: Unsloth trains gpt-oss without autocast, parts in fp32; activations may be higher")
    return notes


def calibrate(breakdown: Breakdown, measured: Mapping[str, float]) -> dict[str, float]:
    """Factors for FACTORS that make `breakdown` match `measured` (GiB), from one of our own GPU runs.

    `measured` maps component names to measured sizes (factor = measured / predicted), and/or
    "reserved" to torch's peak reserved memory of the whole run. A reserved peak is matched by scaling
    the modelled components at the peak (everything but EXACT_COMPONENTS, cuda_context and
    fragmentation) by one common factor. Names that are not components of this breakdown are ignored.
    """
    factors = {}
    for name, value in measured.items():
        if name != "reserved" and breakdown.gib(name) > 0:
            factors[name] = value / breakdown.gib(name)
    if "reserved" in measured:
        at_peak = [c for c in breakdown.components if c.at_peak and c.name not in ("cuda_context", "fragmentation")]
        modelled = sum(c.gib for c in at_peak if c.name not in EXACT_COMPONENTS)
        exact = sum(c.gib for c in at_peak if c.name in EXACT_COMPONENTS)
        frag = 1 + (breakdown.gib("fragmentation") / modelled if modelled else 0.0)
        if modelled > 0:
            common = max(measured["reserved"] - exact, 0.0) / frag / modelled
            for c in at_peak:
                if c.name not in EXACT_COMPONENTS:
                    factors.setdefault(c.name, common)
    return factors
