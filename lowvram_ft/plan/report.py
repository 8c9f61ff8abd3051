"""What the planner prints: the estimate as a table (`format_breakdown`), the recommendations as
ready-to-paste overrides (`format_recommendations`), the longest sequence per card
(`format_max_context`), the same as plain values (`plan_report`, `plan --json`), and the `lowvram_ft
plan` command (`run`)."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from typing import Mapping, Sequence

from .calibration import basis_text, stated_error
from .estimate import Breakdown, loss_kind, predict
from .inputs import PlanError, PlanInput, config_precision, plan_input_from_config, raise_problems
from .longcontext import CARDS, anchor_rows, max_context_rows
from .model_configs import model_config_for
from .shapes import model_shape
from .precision import has_bf16
from .transients import attention_impl
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
    "dynamic_16bit_linears": "16-bit linears of a dynamic 4-bit checkpoint",
    "load_reserved": "reserved by torch after loading",
    "trainable_weights": "LoRA adapters (fp32)",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "checkpointed activations",
    "layer_recompute": "one layer's recomputed activations",
    "backward_workspace": "gradients inside one layer's backward",
    "mlp_tile": "one Tiled MLP tile and its gradients",
    "attention": "attention scores / workspace",
    "moe_routing": "MoE routing buffers",
    "dequant_buffers": "dequantized weight buffers",
    "logits_and_loss": "logits and loss",
    "kv_cache": "KV cache of the generation before training",
    "generation": "prefill of the generation before training",
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
    lines.append(f"  (torch's reserved peak, without the CUDA context: {breakdown.reserved_gib:.2f} GiB; "
                 f"{basis_text()})")
    if breakdown.training_gib is not None:
        lines.append(f"  (the generation before training is counted; training alone: {breakdown.training_gib:.2f} GiB)")
    skipped = [COMPONENT_LABELS[c.name] for c in breakdown.components if not c.at_peak]
    if skipped:
        phase = {"loss": "the loss", "layer": "one layer's backward",
                 "generate": "the generation before training"}[breakdown.peak_phase]
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


def verdict(total_gib: float, vram_gib: float) -> str:
    """"fits" (under the card less the margin), "may not fit" (over it, by no more than the estimate's
    stated error) or "does not fit" (over the card by more than that error: what the fit policy refuses
    when the estimate is calibrated)."""
    if total_gib <= budget_gib(vram_gib):
        return "fits"
    calibrated, error, _ = stated_error()
    if calibrated and total_gib > vram_gib * (1 + error):
        return "does not fit"
    return "may not fit"


def _verdict(total_gib: float, vram_gib: float) -> str:
    word = verdict(total_gib, vram_gib)
    if word == "fits":
        return f"GPU {vram_gib:.2f} GiB: estimated to fit, {vram_gib - total_gib:.2f} GiB to spare"
    over = (f"GPU {vram_gib:.2f} GiB: estimated NOT to fit, {total_gib - budget_gib(vram_gib):.2f} GiB over the "
            f"budget ({SAFETY_MARGIN:.0%} kept free)")
    if word == "may not fit":
        return over + f"; within the estimate's error ({basis_text()}): it may still fit"
    return over + f"; beyond the estimate's error ({basis_text()}): does not fit"


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


def format_max_context(inp: PlanInput, name: str = "") -> str:
    """The longest sequence at batch 1 per card, and the published anchors for the same model."""
    lines = [f"  longest sequence at batch 1 (estimate){' for ' + name if name else ''}:"]
    lines += [f"  {card:>7}: {tokens:>9,} tokens" for card, tokens in max_context_rows(inp)]
    anchors = [(a, n) for a, n in anchor_rows(model_config_for) if a.settings and _same_model(a.model, inp)]
    for anchor, tokens in anchors:
        lines.append(f"  published: {anchor.what}: {anchor.tokens:,} tokens; the planner, for that run: {tokens:,}")
    return "\n".join(lines)


def _same_model(model_id: str, inp: PlanInput) -> bool:
    try:
        return model_config_for(model_id) == dict(inp.model_config)
    except PlanError:
        return False


def plan_report(cfg, inp: PlanInput, breakdown: Breakdown, vram_gib: float | None, precision) -> dict:
    """Everything `plan` prints, as plain values (`plan --json`)."""
    calibrated, error, cases = stated_error()
    report = {
        "model": cfg.model.name,
        "precision": {"weights": precision.weights, "compute": precision.compute, "why": precision.why},
        "settings": {"stack": inp.stack, "attention": attention_impl(inp, model_shape(inp.model_config)),
                     "loss": loss_kind(inp), "tiled_mlp": inp.tiled_mlp, "kept_16bit": _plain(inp.kept_16bit),
                     "optimizer": inp.optimizer, "load_bits": inp.load_bits, "batch_size": inp.batch_size,
                     "seq_len": inp.seq_len, "gradient_checkpointing": inp.gradient_checkpointing},
        **breakdown.as_dict(),
        "basis": {"calibrated": calibrated, "error": round(error, 4), "cases": cases, "text": basis_text()},
        "vram_gib": vram_gib,
        "verdict": verdict(breakdown.total_gib, vram_gib) if vram_gib is not None else None,
    }
    if vram_gib is None:
        report["min_vram_gib"] = min_vram_gib(inp)
    else:
        report["recommendations"] = [
            {"overrides": list(r.overrides), "peak_gib": round(r.peak_gib, 3), "fits": r.fits,
             "slowdown": round(r.slowdown, 3), "why": r.why, "changes_training": r.changes_training}
            for r in recommend(inp, vram_gib)]
        report["max_seq_len_that_fits"] = max_seq_len_that_fits(inp, vram_gib)
    return report


def _plain(value):
    return value if isinstance(value, str) else list(value)


def run(cfg, vram_gib: float | None = None, compute_capability: float | None = None, as_json: bool = False,
        max_context: bool = False, settings: Mapping | None = None) -> int:
    """`lowvram_ft plan`: print the estimate (and, given the GPU size, what to change) in the precision
    Unsloth uses on that card (`compute_capability`, e.g. 7.5 for a T4; unknown = a bf16 card).
    `settings`: plan-only PlanInput fields (stack, loss, attention, tiled_mlp, kept_16bit) for a run made
    with another stack or Unsloth option. `as_json`: the same as one JSON object on stdout;
    `max_context`: the longest sequence at batch 1 per card. Exit status 0 when it fits or no GPU size
    was given, 1 when it does not fit, 2 on bad input."""
    try:
        if vram_gib is not None and not 0 < vram_gib < math.inf:  # nan fails every comparison
            raise PlanError(f"--vram: got {vram_gib}; expected the GPU's memory in GiB, a positive number (e.g. 16)")
        if compute_capability is not None and not 1 <= compute_capability < 100:
            raise PlanError(f"--compute-capability: got {compute_capability}; expected e.g. 7.5 (T4), 8.6, 9.0 (H100)")
        model_config = model_config_for(cfg.model.name)
        bf16 = has_bf16(compute_capability)
        inp = replace(plan_input_from_config(cfg, model_config, bf16), **dict(settings or {}))
        raise_problems(inp)
        breakdown = predict(inp, vram_gib)
    except (PlanError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    precision = config_precision(cfg, model_config, bf16)
    status = 0 if vram_gib is None or breakdown.total_gib <= budget_gib(vram_gib) else 1
    if as_json:
        report = plan_report(cfg, inp, breakdown, vram_gib, precision)
        if max_context:
            report["max_context"] = {card: tokens for card, tokens in max_context_rows(inp)}
            report["max_context_cards_gib"] = dict(CARDS)
        print(json.dumps(report, indent=1))
        return status
    card = (f"compute capability {compute_capability}" if compute_capability is not None
            else "a card with bf16 assumed (pass --compute-capability 7.5 for a T4)")
    print(f"precision: {precision.why} ({card})")
    print(format_breakdown(breakdown, vram_gib))
    if max_context:
        print(format_max_context(inp, cfg.model.name))
    if cfg.train.method == "grpo":
        print(format_grpo_terms(grpo_terms_for(cfg, model_config)))
    if vram_gib is None:
        print(f"  smallest GPU that fits: {min_vram_gib(inp):.2f} GiB ({SAFETY_MARGIN:.0%} kept free)")
        return status
    print(format_recommendations(recommend(inp, vram_gib), vram_gib))
    print(f"  longest sequence that fits as configured: {max_seq_len_that_fits(inp, vram_gib)} tokens")
    return status


def format_grpo_terms(terms: dict[str, float]) -> str:
    lines = ["GRPO, on top of the estimate above and not in the fit below (modelled, uncalibrated):"]
    lines += [f"  {name:38} {gib:8.2f} GiB" for name, gib in terms.items()]
    return "\n".join(lines)
