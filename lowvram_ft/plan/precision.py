"""The precision Unsloth trains in on a card: bf16 where the card has it, else float16; the families
Unsloth will not train in float16 keep 16-bit weights but train without autocast, in float32 where it
matters. Pure lookup on plain values."""
from __future__ import annotations

from dataclasses import dataclass

# bf16 needs compute capability 8.0 (Ampere) or newer; T4 (7.5) and V100 (7.0) have float16 only.
BF16_MIN_COMPUTE_CAPABILITY = 8.0
# Families Unsloth will not train in float16 (NaN gradients): on a card without bf16 it loads them in
# bfloat16 and casts to float16 (code: unsloth models/loader.py ~3008 "dtype = torch.bfloat16  # Change
# to bfloat16 loading", models/vision.py ~3719 "Forced float32 loads in bfloat16 then casts to
# float16"), so the weights outside the 4-bit linears take 2 bytes, not 4; the 4-bit linears compute in
# float16 (bnb_compute_dtype, vision.py ~3649) and the trainer runs without autocast ("Switching to
# float32 training", models/rl.py ~2635). gpt_oss is one of them (FORCE_FLOAT32 ~205-224).
FORCE_FLOAT32_MODEL_TYPES = ("gpt_oss", "gemma3", "gemma3n", "gemma4", "glm4_moe", "qwen3_5", "qwen3_moe")


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
        return Precision("float16", "float16", f"float16 weights, float32 training (no autocast): Unsloth will not "
                         f"train {model_type} in float16{'' if bf16 else ' and the card has no bf16'}")
    return Precision("float16", "float16", "float16: " + ("as asked" if bf16 else "the card has no bf16"))
