"""What loaded and ran inside a case process, read off the trained model: the adapters' dtypes, the
attention forward in use, and the MoE experts' path (per-expert loop or grouped kernels, counted with
forward hooks). Facts for the result line, so a figure always says what produced it."""
from __future__ import annotations

import os
import re
import sys

from .metrics import attention_summary, moe_path_summary

# Per-expert modules of a split MoE layout (gpt-oss bnb-4bit): called one by one only by the per-expert loop.
PER_EXPERT_MODULE = re.compile(r"\.experts\.(gate_up_projs|down_projs)\.\d+$")


def adapter_dtypes(model) -> dict[str, int]:
    """Trainable parameters per dtype (the LoRA adapters: float32 in both stacks)."""
    counts: dict[str, int] = {}
    for param in model.parameters():
        if param.requires_grad:
            name = str(param.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + param.numel()
    return counts


class PerExpertCalls:
    """Counts the forward calls of a split MoE layout's per-expert modules (experts.gate_up_projs.<i>,
    experts.down_projs.<i>) through forward hooks: the per-expert loop calls each routed expert's
    module, the grouped path reads their weights and never calls them. No modules (fused experts, dense
    models): nothing is counted."""

    def __init__(self, model):
        self.calls = 0
        self.modules = [m for name, m in model.named_modules() if PER_EXPERT_MODULE.search(name)]
        for module in self.modules:
            module.register_forward_hook(self.count)

    def count(self, module, args, output) -> None:
        self.calls += 1


def compute_path(model, expert_calls: PerExpertCalls | None) -> dict:
    """The row's "attention" and "moe" facts (after training, so that every lazy choice is made)."""
    return {"attention": attention_path(model), "moe": moe_path(model, expert_calls)}


def attention_path(model) -> dict | None:
    """The attention implementation in the model's config, where the attention layers' forward comes
    from (Unsloth replaces gpt-oss's), and whether Unsloth's flex-attention-with-sinks forward is on."""
    attention = next((m for m in model.modules() if type(m).__name__.endswith("Attention")), None)
    if attention is None:
        return None
    forward = type(attention).forward
    info = {"implementation": getattr(model.config, "_attn_implementation", None),
            "forward": f"{forward.__module__}.{forward.__qualname__}",
            "unsloth_flex_attention": os.environ.get("UNSLOTH_ENABLE_FLEX_ATTENTION") == "1"}
    info["ran"] = attention_summary(info)
    return info


def moe_path(model, expert_calls: PerExpertCalls | None) -> dict | None:
    """The MoE experts' path (None for a dense model): the backend Unsloth selected (unsloth_zoo's
    select_moe_backend: grouped_mm / unsloth_triton / native_torch, from UNSLOTH_MOE_BACKEND and what
    this machine supports; None where unsloth_zoo's MoE utilities are not loaded, as in the hf stack or
    Unsloth's CPU backend), whether torch has a usable grouped_mm, transformers' experts dispatch, the
    experts' class and forward, and the per-expert module calls counted during training (None when the
    layout has no per-expert modules or nothing was trained); "path" sums them up (moe_path_summary)."""
    experts = experts_module(model)
    if experts is None:
        return None
    forward = type(experts).forward
    modules = (len(expert_calls.modules) if expert_calls is not None
               else sum(1 for name, _ in model.named_modules() if PER_EXPERT_MODULE.search(name)))
    info = {
        "backend": unsloth_moe_backend(),
        "backend_requested": os.environ.get("UNSLOTH_MOE_BACKEND"),
        "grouped_mm_available": grouped_mm_available(next(experts.parameters(), None)),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "experts_module": type(experts).__name__,
        "experts_forward": f"{forward.__module__}.{forward.__qualname__}",
        "per_expert_modules": modules,
        "per_expert_calls": expert_calls.calls if expert_calls is not None and modules else None,
    }
    info["path"] = moe_path_summary(info)
    return info


def experts_module(model):
    """The first MoE experts module (`...mlp.experts`), unwrapped from PEFT's layers (target_parameters
    wraps it once per expert parameter); None for a dense model."""
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            return module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return None


def unsloth_moe_backend() -> str | None:
    """unsloth_zoo's selected MoE backend, or None when its MoE utilities were never loaded here."""
    moe_utils = sys.modules.get("unsloth_zoo.temporary_patches.moe_utils")
    select = getattr(moe_utils, "select_moe_backend", None)
    if select is None:
        return None
    try:
        return select()
    except Exception:  # noqa: BLE001 — informational
        return None


def grouped_mm_available(param) -> bool:
    """Whether torch offers grouped_mm (torch.nn.functional.grouped_mm or torch._grouped_mm) for the
    device `param` is on: on CUDA, compute capability 8.0 or newer (transformers' rule for torch >= 2.9)."""
    import torch

    if not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if param is not None and param.device.type == "cuda":
        return torch.cuda.get_device_capability(param.device) >= (8, 0)
    return True
