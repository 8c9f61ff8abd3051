"""VRAM fit planner: the peak GPU memory of a fine-tuning run, predicted from config.json alone.

Pure arithmetic on plain values (no torch, no weights): `predict` turns a model's config.json and the
run's settings into a `Breakdown` of named components in GiB, `recommend` lists the changes that make
an over-budget run fit (fastest first), `max_seq_len_that_fits` and `min_vram_gib` search the
longest sequence and the smallest GPU, `decide_fit` is the check before a GPU run and `run` the
`lowvram_ft plan` command.

One module per concern, each importing only the ones listed before it:

    precision       the dtype Unsloth trains in on a card
    inputs          PlanInput, the settings it accepts, PlanError, a lowvram_ft Config mapped onto it
    shapes          architecture numbers and exact parameter counts from config.json
    model_configs   where config.json comes from (folder, bundled, Hub, embedded recipe)
    weights         exact bytes: weights, adapters, gradients, optimizer states
    transients      modelled bytes of one step: activations, attention, routing, dequantized weights
    estimate        `predict` (the peak, by phase: reserved and what the card must hold)
    calibration     the published GPU measurements (CALIBRATION) and the error the planner shows on them
    recommendations what to change so that a run fits
    longcontext     the longest sequence per card, next to published anchors
    report          the printed table and recommendations, the `plan` command (--json, --max-context)
    fit             `decide_fit`, the check before a GPU run

The calibration (`calibration.CALIBRATION`, the published cases, and `estimate.FACTORS`) is read where it
lives; `plan.CALIBRATION` is the same tuple, but replacing it (a test, a measured calibration) takes effect
only in `calibration`.
"""
from __future__ import annotations

from .calibration import CALIBRATION, Case, basis_text, case_error, predict_case, stated_error
from .estimate import (
    CUDA_CONTEXT_GIB,
    EXACT_COMPONENTS,
    FUSED_LINEAR_CHUNK_GIB,
    Breakdown,
    Component,
    calibrate,
    fused_loss_rows,
    predict,
)
from .fit import FitDecision, decide_fit
from .inputs import (
    LORA_MODULE_NAMES,
    LORA_TARGET_PRESETS,
    NO_PACKING_MODEL_TYPES,
    OPTIMIZERS,
    PlanError,
    PlanInput,
    plan_input_from_config,
    plan_problems,
)
from .longcontext import ANCHORS, CARDS, anchor_rows, longest_at_batch_one, max_context_rows
from .model_configs import MODEL_CONFIG_DIR, bundled_model_ids, model_config_for, resolve_model_config
from .precision import Precision, has_bf16, unsloth_precision
from .recommendations import (
    SAFETY_MARGIN,
    SEQ_LEN_STEP,
    Recommendation,
    budget_gib,
    fits,
    max_seq_len_that_fits,
    min_vram_gib,
    recommend,
    same_model_change,
)
from .report import format_breakdown, format_max_context, format_recommendations, plan_report, run, verdict
from .shapes import (
    LinearGroup,
    ModelShape,
    ParameterCounts,
    count_parameters,
    linear_groups,
    lora_groups,
    lora_parameters,
    model_shape,
)
from .transients import MOE_FP16_STACK_CAP_GIB, layer_bytes_per_token
from .weights import quantized_bytes

__all__ = [
    "ANCHORS", "CARDS", "anchor_rows", "longest_at_batch_one", "max_context_rows", "format_max_context",
    "plan_report", "verdict", "CALIBRATION", "Case", "basis_text", "case_error", "predict_case", "stated_error", "fused_loss_rows",
    "CUDA_CONTEXT_GIB", "EXACT_COMPONENTS", "FUSED_LINEAR_CHUNK_GIB", "LORA_MODULE_NAMES", "LORA_TARGET_PRESETS",
    "MODEL_CONFIG_DIR", "MOE_FP16_STACK_CAP_GIB", "NO_PACKING_MODEL_TYPES", "OPTIMIZERS", "SAFETY_MARGIN",
    "SEQ_LEN_STEP", "Breakdown", "Component", "FitDecision", "LinearGroup", "ModelShape", "ParameterCounts",
    "PlanError", "PlanInput", "Precision", "Recommendation", "budget_gib", "bundled_model_ids", "calibrate", "count_parameters",
    "decide_fit", "fits", "format_breakdown", "format_recommendations", "has_bf16", "layer_bytes_per_token",
    "linear_groups", "lora_groups", "lora_parameters", "max_seq_len_that_fits", "min_vram_gib", "model_config_for",
    "model_shape", "plan_input_from_config", "plan_problems", "predict", "quantized_bytes", "recommend",
    "resolve_model_config", "run", "same_model_change", "unsloth_precision",
]
