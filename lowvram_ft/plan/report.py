"""What the planner prints: the estimate as a table (`format_breakdown`), the recommendations as
ready-to-paste overrides (`format_recommendations`), and the `lowvram_ft plan` command (`run`)."""
from __future__ import annotations

import math
import sys
from typing import Sequence

from .estimate import Breakdown, predict
from .inputs import PlanError, config_precision, plan_input_from_config
from .model_configs import model_config_for
from .precision import has_bf16
from .recommendations import (
    SAFETY_MARGIN,
    Recommendation,
    budget_gib,
    max_seq_len_that_fits,
    min_vram_gib,
    recommend,
)
from .transients import grpo_terms_for

# Component name -> its label in the table.
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
    budget = budget_gib(vram_gib)
    if total_gib <= budget:
        return f"GPU {vram_gib:.2f} GiB: estimated to fit, {vram_gib - total_gib:.2f} GiB to spare"
    return (f"GPU {vram_gib:.2f} GiB: estimated NOT to fit, {total_gib - budget:.2f} GiB over the budget "
            f"({SAFETY_MARGIN:.0%} kept free)")


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
    precision = config_precision(cfg, model_config, bf16)
    card = (f"compute capability {compute_capability}" if compute_capability is not None
            else "a card with bf16 assumed (pass --compute-capability 7.5 for a T4)")
    print(f"precision: {precision.why} ({card})")
    print(format_breakdown(breakdown, vram_gib))
    if cfg.train.method == "grpo":
        print(format_grpo_terms(grpo_terms_for(cfg, model_config)))
    if vram_gib is None:
        print(f"  smallest GPU that fits: {min_vram_gib(inp):.2f} GiB ({SAFETY_MARGIN:.0%} kept free)")
        return 0
    print(format_recommendations(recommend(inp, vram_gib), vram_gib))
    print(f"  longest sequence that fits as configured: {max_seq_len_that_fits(inp, vram_gib)} tokens")
    return 0 if breakdown.total_gib <= budget_gib(vram_gib) else 1


def format_grpo_terms(terms: dict[str, float]) -> str:
    lines = ["GRPO, on top of the estimate above and not in the fit below (modelled, uncalibrated):"]
    lines += [f"  {name:38} {gib:8.2f} GiB" for name, gib in terms.items()]
    return "\n".join(lines)
