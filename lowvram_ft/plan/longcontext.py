"""The longest sequence that fits at batch 1, per card (`max_context_rows`), next to what others
published for the same model (`ANCHORS`), and why the two differ."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .inputs import PlanInput
from .recommendations import max_seq_len_that_fits

# Cards by their name on the box, as torch reports them (total_memory / 1024^3, GiB), all with bf16: RTX
# 4060 Ti / A4000 16 GB, RTX 4090 24 GB, A100 40 GB, L40S 48 GB, H100 / A100 80 GB, H200 141 GB. A T4
# (14.75 GiB, no bf16) is planned with `plan --vram 14.75 --compute-capability 7.5`.
CARDS = {"16 GB": 15.6, "24 GB": 23.65, "40 GB": 39.39, "48 GB": 44.99, "80 GB": 79.32, "141 GB": 139.80}
# Searched up to this many tokens, past a model's own context (Unsloth's long-context claims do so too).
SEARCH_LIMIT = 1_048_576


@dataclass(frozen=True)
class Anchor:
    """A published longest-context figure (a claim: Unsloth's blog posts) and the run it was made with."""

    model: str           # bundled model id
    card: str            # a CARDS key
    tokens: int
    what: str
    settings: dict       # PlanInput fields of that run


ANCHORS = (
    Anchor("openai/gpt-oss-20b", "80 GB", 81_000, "Unsloth: gpt-oss-20b QLoRA on one H100 80 GB (~81k)",
           dict(load_bits=4, lora_r=8, lora_targets="attention")),
    Anchor("openai/gpt-oss-20b", "80 GB", 60_000, "Unsloth: gpt-oss-20b bf16 LoRA on one H100 80 GB (~60k)",
           dict(load_bits=16, lora_r=8, lora_targets="attention")),
    Anchor("meta-llama/Llama-3.1-8B-Instruct", "16 GB", 40_724, "Unsloth: Llama-3.1-8B QLoRA on 16 GB",
           dict(load_bits=4, lora_r=32, lora_targets="attention+mlp")),
    Anchor("meta-llama/Llama-3.1-8B-Instruct", "80 GB", 342_733, "Unsloth: Llama-3.1-8B QLoRA on 80 GB",
           dict(load_bits=4, lora_r=32, lora_targets="attention+mlp")),
)


def longest_at_batch_one(inp: PlanInput, vram_gib: float) -> int:
    """Longest sequence (tokens, a multiple of 64) predicted to fit at batch 1 on a card of `vram_gib`."""
    return max_seq_len_that_fits(replace(inp, batch_size=1, packing=False), vram_gib, limit=SEARCH_LIMIT)


def max_context_rows(inp: PlanInput) -> list[tuple[str, int]]:
    """(card, longest sequence at batch 1) for every card of CARDS."""
    return [(card, longest_at_batch_one(inp, gib)) for card, gib in CARDS.items()]


def anchor_rows(model_config_for) -> list[tuple[Anchor, int]]:
    """Each anchor with the planner's figure for the same run (`model_config_for`: id -> config.json)."""
    rows = []
    for anchor in ANCHORS:
        inp = PlanInput(model_config_for(anchor.model), gradient_checkpointing="unsloth", **anchor.settings)
        rows.append((anchor, longest_at_batch_one(inp, CARDS[anchor.card])))
    return rows
