"""The predicted peak GPU memory of one training step (`predict`), and its calibration.

One step has two memory high-water marks that are never live together: the loss (logits of every token
against the whole vocabulary) at the end of the forward, and the backward of one decoder layer (its
recomputed activations, gradients flowing through it, dequantized weights). Everything else (weights,
adapters, gradients, optimizer states, checkpointed hidden states, CUDA context) is held across the
whole step. So

    peak = CUDA context + static + max(loss phase, layer phase) + fragmentation of the per-step transients.

The exact parts come from weights.py, the modelled ones from transients.py. None of the constants is our
measurement yet: CALIBRATION is empty until `make bench` measures real runs, and `calibrate` turns a
measured peak into factors for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..io import GIB
from .inputs import DTYPE_BYTES, FP32, PlanInput, raise_problems
from .shapes import DENSE_MODEL_TYPES, ModelShape, ParameterCounts, count_parameters, lora_parameters, model_shape
from .transients import activation_bytes, attention_impl, dequant_bytes, step_tokens
from .weights import training_bytes, weight_bytes

# --- Logits and loss ------------------------------------------------------------------------------
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

# --- Fixed costs ----------------------------------------------------------------------------------
# CUDA context, cuBLAS/Triton workspaces and loaded kernels: not in torch's counters, visible in
# nvidia-smi (first principles; typical 0.3-0.6 GiB with lazy module loading).
CUDA_CONTEXT_GIB = 0.5
# Caching-allocator overhead on what is allocated and freed every step (activations, attention,
# routing, dequantized weights, loss chunks); weights, adapters, gradients and optimizer states are
# allocated once and reused, so they are not counted (first principles guess: calibrate with
# peak_reserved_gib / peak_allocated_gib from a real run).
FRAGMENTATION_FACTOR = 1.20

# --- Calibration ----------------------------------------------------------------------------------
# Component name -> factor from measurements (`calibrate`). Empty: nothing measured yet.
CALIBRATION: dict[str, float] = {}
# The largest relative error of the calibrated planner over the measured cases (benchmarks/results);
# None while CALIBRATION is empty.
CALIBRATION_ERROR: float | None = None
# Uncertainty stated for an estimate no measurement has checked yet (a guess: the published anchors
# suggest the uncalibrated planner is 5-15% high). Such an estimate warns; it never blocks a run.
UNCALIBRATED_ERROR = 0.20
# Exact arithmetic on the config (never calibrated); everything else is a model of runtime behaviour.
EXACT_COMPONENTS = ("quantized_weights", "unquantized_weights", "trainable_weights", "gradients", "optimizer_states")


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


def predict(inp: PlanInput, vram_gib: float | None = None) -> Breakdown:
    """Predicted peak GPU memory of one training step of `inp`.

    `vram_gib` matters only for Unsloth's fused loss, which sizes its chunks from the memory free on
    the GPU; without it the loss is sized as on a large GPU (its 4 GiB cap).
    """
    raise_problems(inp)
    shape = model_shape(inp.model_config)
    counts = count_parameters(shape)
    trainable = counts.total if inp.full_finetuning else lora_parameters(shape, inp.lora_targets, inp.lora_r)
    parts = {
        **weight_bytes(inp, shape, counts),
        **training_bytes(inp, counts, trainable),
        **activation_bytes(inp, shape),
        "dequant_buffers": dequant_bytes(inp, shape),
    }
    parts = {name: size * CALIBRATION.get(name, 1.0) for name, size in parts.items()}
    parts["logits_and_loss"] = _loss_bytes(inp, shape, parts, vram_gib) * CALIBRATION.get("logits_and_loss", 1.0)
    return _assemble(inp, shape, counts, trainable, parts, _phases(inp), vram_gib)


def _loss_bytes(inp: PlanInput, shape: ModelShape, parts: dict[str, float], vram_gib: float | None) -> float:
    """Bytes of the logits and loss; Unsloth's fused loss sizes its chunks from what the other parts leave
    free, so it is computed after them."""
    tokens = step_tokens(inp)
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
        f"checkpointing {inp.gradient_checkpointing}, {inp.optimizer}, {attention_impl(inp, shape)} attention"
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


def stated_error() -> tuple[bool, float]:
    """(calibrated, relative error) of the estimate: the measured error once CALIBRATION holds factors
    and CALIBRATION_ERROR is known, else the guess UNCALIBRATED_ERROR."""
    calibrated = bool(CALIBRATION) and CALIBRATION_ERROR is not None
    return calibrated, CALIBRATION_ERROR if calibrated else UNCALIBRATED_ERROR
