"""The published GPU measurements the planner is checked against (`CALIBRATION`), what each one measures,
how the planner predicts it (`predict_case`), and the error it shows on them (`stated_error`), which is
the error the planner reports (`±X% measured on N cases`) and the fit policy allows.

The cases are lowvram_ft/assets/published_peaks.jsonl (a copy of data/published_peaks.jsonl: provenance,
settings, config.json values, the figure and what it measures). What the file says in prose and the
planner needs as settings (the stack, the loss, Tiled MLP, a generation before training, tokens that are
only a cap) is written out per case below, each with the line of the file that says it.
"""
from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .estimate import predict
from .inputs import PlanError, PlanInput
from .precision import unsloth_precision

CASES_FILE = Path(__file__).parent.parent / "assets" / "published_peaks.jsonl"
# Per-case target of the tests: within this relative error, unless the case documents why its own
# noise is larger (Case.tolerance).
TARGET_ERROR = 0.15

# Cards as torch reports them (total_memory / 1024^3, GiB), where the source prints them.
CARD_GIB = {"T4 16 GB": 14.748, "A100 80 GB": 79.318}
# The L40S prints no capacity in PEFT's JSON: 46,068 MiB as nvidia-smi lists it (assumed).
L40S_GIB = 44.99

# What the file says in prose, as planner settings. "basis": "exact" (every setting and the token
# count known), "upper_bound" (rows padded to a longest row that is not stated: predicted at the cap),
# "approx" (something the planner cannot express; `approx` says what). "calibrates": the terms the case
# checks, as far as it transfers to Unsloth 2026.10.9 (old releases had other loss paths).
CASE_SETTINGS: dict[str, dict] = {
    "nb_llama31_8b_alpaca_t4": dict(
        basis="upper_bound", loss="inplace", calibrates=("weights", "load_reserved", "adapters+optimizer"),
        tolerance=0.20,
        why="Alpaca rows are far shorter than the 2048 cap (tokens_in_batch) and the full logits of the "
            "2024 loss grow with them: predicted at the cap, the figure is an upper bound by up to 20%"),
    "nb_llama32_3b_conversational_t4": dict(
        basis="upper_bound", loss="inplace", calibrates=("weights", "load_reserved", "adapters+optimizer", "tied embeddings")),
    "nb_tinyllama_packed4096_t4": dict(
        basis="approx", calibrates=("activations without checkpointing", "weights"),
        approx="Unsloth 2024.1's loss path (caveats: 'full fp32 logits path of that era') is modelled as the "
               "2023-2024 in-place loss; the card was nearly full (13.5 of 14.75 GiB), where the allocator "
               "behaves differently", loss="inplace", tolerance=0.20,
        why="the activations the planner counts match autograd's count for Unsloth's current kernels; "
            "Unsloth 2024.1 (its kernels, its loss and whether it set expandable segments) kept about 1.5 GiB "
            "more, which a first-principles count of today's stack cannot express: allowed 20%"),
    "nb_mistral_nemo12b_alpaca_t4": dict(
        basis="upper_bound", loss="inplace", calibrates=("weights", "load_reserved", "adapters+optimizer")),
    "nb_qwen25_7b_alpaca_t4": dict(
        basis="upper_bound", loss="inplace", calibrates=("weights", "load_reserved", "adapters+optimizer"),
        tolerance=0.25,
        why="Alpaca rows are far shorter than the 2048 cap and the 152k vocabulary makes the logits at the cap "
            "2.9 GiB: predicted at the cap, the figure is an upper bound by up to 25%"),
    "nb_qwen3_14b_alpaca_t4": dict(
        basis="approx", calibrates=("weights", "dynamic 4-bit"), kept_16bit="dynamic",
        approx="dynamic 4-bit checkpoint whose 16-bit linears are not stated: counted by Unsloth's '<10% more' "
               "claim; rows shorter than the cap"),
    "nb_gptoss20b_t4": dict(
        basis="upper_bound", calibrates=("gpt-oss weights on a card without bf16", "generation before training"),
        generate_tokens=512, bf16=False,
        why="three generate cells before training (caveats) are predicted at 512 tokens, their length is not "
            "stated; training rows are padded to an unstated longest row under the 1024 cap"),
    "nb_gptoss20b_500k_a100_80": dict(
        basis="exact", calibrates=("gpt-oss long-context activations", "Tiled MLP", "fused loss"), tiled_mlp=True),
    "peft_lora_llama32_3b_qv_l40s": dict(
        basis="upper_bound", calibrates=("plain transformers stack", "full logits", "16-bit weights"),
        card_gib=L40S_GIB, generate_tokens=800, generate_batch=50,
        why="the max includes PEFT's evaluation generation (batch 50, max_length 800) and length-bucketed "
            "training batches padded to an unstated longest row under the 768 cap"),
    "axolotl_ministral8b_qlora": dict(
        basis="approx", calibrates=("Cut Cross Entropy", "plain stack QLoRA"), loss="chunked",
        approx="neither the GPU nor the metric is stated (Axolotl logs allocated, active and reserved); "
               "predicted as reserved"),
    "axolotl_devstral_small2505_qlora": dict(
        basis="approx", calibrates=("Cut Cross Entropy", "plain stack QLoRA"), loss="chunked", tolerance=0.25,
        approx="'about 21GB': unit (GB or GiB) and metric not stated, the dims are Mistral Small 3.1's (not "
               "confirmed from Devstral's config.json)",
        why="the figure itself is uncertain by 7% (GB vs GiB) on top of the metric: allowed 25%"),
}


@dataclass(frozen=True)
class Case:
    """One published peak: where it comes from, what it measures, and the run as the planner sees it."""

    id: str
    source: str
    date: str
    stack_version: str
    gpu: str
    card_gib: float | None        # the card as torch reports it; None when the source does not say
    measured_gib: float
    measures: str                 # "reserved" (torch.cuda.max_memory_reserved, no CUDA context) | "unstated"
    basis: str                    # "exact" | "upper_bound" | "approx"
    calibrates: tuple[str, ...]
    plan_input: PlanInput = field(repr=False)
    tolerance: float = TARGET_ERROR
    approx: str = ""              # what the planner cannot express ("approx" cases)
    why: str = ""                 # why the prediction is an upper bound, or why the tolerance is wider


def load_cases(path: Path = CASES_FILE) -> tuple[Case, ...]:
    """The published cases, with the settings of CASE_SETTINGS. PlanError naming the file on a bad row."""
    cases = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            cases.append(_case(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise PlanError(f"{path}:{number}: cannot read this case ({exc})") from exc
    return tuple(cases)


def _case(row: Mapping) -> Case:
    settings = dict(CASE_SETTINGS[row["id"]])
    config = {k: v for k, v in row["config"].items() if not k.startswith("_") and v is not None}
    inp = {k: v for k, v in row["plan_input"].items() if k != "note"}
    bf16 = settings.pop("bf16", True)
    if not bf16:  # the precision Unsloth picks on the card, not the file's dtype label
        precision = unsloth_precision(row["model_type"], bf16=False)
        inp.update(dtype=precision.compute, weights_dtype=precision.weights)
    for name in ("loss", "tiled_mlp", "kept_16bit", "generate_tokens", "generate_batch"):
        if name in settings:
            inp[name] = settings.pop(name)
    if isinstance(inp.get("lora_targets"), list):
        inp["lora_targets"] = tuple(inp["lora_targets"])
    card = settings.pop("card_gib", CARD_GIB.get(row["gpu_capacity"]))
    reserved = "max_memory_reserved" in row["measured"] or "accelerator_memory_max" in row["measured"]
    return Case(
        id=row["id"], source=row["source"], date=_date(row["source"]), stack_version=row["framework"],
        gpu=row["gpu"], card_gib=card, measured_gib=float(row["figure"]),
        measures="reserved" if reserved else "unstated", plan_input=PlanInput(model_config=config, **inp),
        **settings,
    )


def _date(source: str) -> str:
    """The first ISO date in the source line (when the figure was published or the run made)."""
    found = re.findall(r"\d{4}-\d{2}-\d{2}", source)
    return found[-1] if found else ""


def predict_case(case: Case) -> float:
    """The planner's figure for what the case measured: torch's reserved peak (the card peak less the
    CUDA context), on the case's card."""
    return predict(case.plan_input, case.card_gib).reserved_gib


def case_error(case: Case) -> float:
    """Relative error of the planner on the case: predicted / measured - 1."""
    return predict_case(case) / case.measured_gib - 1


# The published cases (see the module docstring). Our own GPU runs join them as Cases when measured.
CALIBRATION: tuple[Case, ...] = load_cases()


def stated_error() -> tuple[bool, float, int]:
    """(calibrated, relative error, number of cases): the largest |error| of the planner over the
    CALIBRATION cases; with no case, an uncalibrated estimate and UNCALIBRATED_ERROR."""
    if not CALIBRATION:
        return False, UNCALIBRATED_ERROR, 0
    return True, max(abs(case_error(case)) for case in CALIBRATION), len(CALIBRATION)


def error_summary() -> dict:
    """Median and largest |error| over the cases, and how many lie within TARGET_ERROR."""
    errors = [abs(case_error(case)) for case in CALIBRATION]
    if not errors:
        return {"cases": 0}
    return {"cases": len(errors), "median_abs_error": statistics.median(errors), "max_abs_error": max(errors),
            "within_target": sum(e <= TARGET_ERROR for e in errors)}


def basis_text() -> str:
    """The basis of every estimate, as printed: "±X% measured on N published cases" or "uncalibrated"."""
    calibrated, error, count = stated_error()
    if not calibrated:
        return f"uncalibrated estimate, ±{error:.0%}"
    return f"calibrated estimate, ±{error:.0%} measured on {count} published cases"


# Uncertainty stated for an estimate no measurement has checked (CALIBRATION empty): a guess. Such an
# estimate warns; it never blocks a run.
UNCALIBRATED_ERROR = 0.20
