"""What to change when a run does not fit: `recommend` lists the changes that bring the predicted peak
under the card (fastest first, changes to what is trained after the others, a shorter sequence last),
`same_model_change` the ones train.fit=auto may apply, `fits`, `min_vram_gib` and
`max_seq_len_that_fits` search the card and the sequence length. Each change is a config override."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from .estimate import predict
from .inputs import EIGHT_BIT_OPTIMIZERS, LORA_TARGET_PRESETS, PlanInput
from .shapes import lora_groups, model_shape

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
# PlanInput fields whose change leaves the trained model the same (train.fit=auto may change them).
SAME_MODEL_FIELDS = ("offload_embedding", "gradient_checkpointing", "batch_size", "gradient_accumulation")


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


def budget_gib(vram_gib: float, margin: float = SAFETY_MARGIN) -> float:
    """What a run may use on a card of `vram_gib`: all but the margin kept free."""
    return vram_gib * (1 - margin)


def fits(inp: PlanInput, vram_gib: float, margin: float = SAFETY_MARGIN) -> bool:
    return predict(inp, vram_gib).total_gib <= budget_gib(vram_gib, margin)


def min_vram_gib(inp: PlanInput, margin: float = SAFETY_MARGIN) -> float:
    """Smallest GPU (GiB, to 0.01) on which `inp` is predicted to fit with the margin kept free.
    Not simply predict(inp).total_gib: Unsloth's loss takes up to half the free memory, so it
    shrinks on a smaller GPU."""
    low, high = 0.0, predict(inp).total_gib / (1 - margin)
    while high - low > 0.005:
        mid = (low + high) / 2
        low, high = (low, mid) if fits(inp, mid, margin) else (mid, high)
    return math.ceil(high * 100) / 100


def max_seq_len_that_fits(inp: PlanInput, vram_gib: float, margin: float = SAFETY_MARGIN,
                          limit: int | None = None) -> int:
    """Longest sequence (a multiple of SEQ_LEN_STEP, up to `limit` tokens, by default the model's
    context) predicted to fit; 0 when even SEQ_LEN_STEP tokens do not."""
    limit = (limit or model_shape(inp.model_config).max_positions) // SEQ_LEN_STEP
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
    budget = budget_gib(vram_gib, margin)
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


def same_model_change(inp: PlanInput, vram_gib: float, budget: float) -> Recommendation | None:
    """The fastest combination of changes that keep the trained model the same (SAME_MODEL_FIELDS) and
    fit, else the one with the lowest peak; None when there is nothing to change."""
    dimensions = [[o for o in options if set(o[0]) <= set(SAME_MODEL_FIELDS)] for options in _change_dimensions(inp)]
    dimensions = [options for options in dimensions if options]
    if not dimensions:
        return None
    return _best_combination(inp, dimensions, vram_gib, budget)[0]


def undo_overrides(inp: PlanInput, change: Recommendation) -> tuple[str, ...]:
    """The overrides that restore in `inp` what `change` (a `same_model_change`) changed."""
    keys = {OVERRIDE_KEYS[name]: name for name in SAME_MODEL_FIELDS}
    changed = [keys[o.split("=", 1)[0]] for o in change.overrides]
    return tuple(_override(name, getattr(inp, name)) for name in changed)
