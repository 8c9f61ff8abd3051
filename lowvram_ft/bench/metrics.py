"""Pure measurement maths of the bench and the shape of its result lines: tokens/s, MFU, loss agreement,
the longest-sequence search, what loaded and ran in a few words, the allocator setting both stacks share.

MFU = tokens/s x training FLOPs per token / the GPU's peak dense bf16 FLOP/s, with
training FLOPs per token = 6 x active parameters + 12 x sum over layers of heads x head_dim x T_eff
(PaLM's convention: every weight counted as trained, no causal halving of attention; T_eff is the
sequence length, or the sliding window on sliding-window layers; active parameters exclude the input
embedding and the experts a token is not routed to). LoRA skips the weight gradients of frozen weights
and checkpointing recomputes the forward: MFU is model FLOPs, not hardware FLOPs.
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Callable, Iterable, Mapping, MutableMapping, Sequence

from ..memory import FIELDS
from ..plan import PlanInput, count_parameters, predict
from .matrix import Case, case_config

# invalid: the case ran, but not on what it asked for (a 4-bit case whose experts loaded unquantized);
# its figures are left out of every comparison.
STATUSES = ("ok", "OOM", "timeout", "error", "invalid")
# What unsloth_zoo sets at import when the user set nothing; the hf stack gets it too (allocator_setting).
DEFAULT_ALLOCATOR_CONF = "expandable_segments:True"
# Peak dense bf16 tensor FLOP/s (FP32 accumulate, no sparsity) from NVIDIA's data sheets, matched in
# order against the torch device name: more specific names first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.4),
    ("H100", 989.4),   # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.05),
    ("L40", 181.05),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
)


def tokens_per_second(step_times: Sequence[float], tokens_per_step: int, warmup_steps: int) -> float | None:
    """Trained tokens per step / the median time of the steps after warm-up. The median, not the mean:
    with a handful of timed steps one stray pause (garbage collection, another process) would
    otherwise move the figure by tens of percent."""
    median = median_step_s(step_times, warmup_steps)
    return tokens_per_step / median if median else None


def median_step_s(step_times: Sequence[float], warmup_steps: int) -> float | None:
    timed = list(step_times)[warmup_steps:]
    return statistics.median(timed) if timed else None


def attention_layers(config: dict) -> list[tuple[int, int, int | None]]:
    """(query heads, head_dim, sliding window or None) per decoder layer, from config.json."""
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    types = config.get("layer_types") or ["full_attention"] * layers
    window = config.get("sliding_window")
    return [(heads, head_dim, window if t == "sliding_attention" and window else None) for t in types[:layers]]


def training_flops_per_token(active_params: int, seq_len: int, layers: Iterable[tuple[int, int, int | None]]) -> int:
    """6 x active parameters + 12 x sum(heads x head_dim x T_eff) — see the module docstring."""
    attention = sum(12 * heads * head_dim * (min(seq_len, window) if window else seq_len)
                    for heads, head_dim, window in layers)
    return 6 * active_params + attention


def model_flops_utilization(tokens_per_s: float | None, flops_per_token: int | None,
                            peak_flops: float | None) -> float | None:
    if not tokens_per_s or not flops_per_token or not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops


def peak_bf16_flops(gpu_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by its torch name; None for an unknown GPU or a CPU."""
    for needle, tflops in PEAK_BF16_TFLOPS:
        if gpu_name and needle.lower() in gpu_name.lower():
            return tflops * 1e12
    return None


def loss_max_abs_diff(a: Sequence[float], b: Sequence[float], steps: int | None = None) -> float | None:
    """Largest |a_i - b_i| over the first `steps` (default: all common) logged losses."""
    n = min(len(a), len(b)) if steps is None else min(len(a), len(b), steps)
    if n == 0:
        return None
    return max(abs(float(x) - float(y)) for x, y in zip(a[:n], b[:n]))


def longest_seq(trains: Callable[[int], bool], ladder: Sequence[int], bisect_steps: int,
                multiple: int) -> int | None:
    """The longest sequence length that trains: climb the ladder until the first failure, then bisect
    between the last success and that failure `bisect_steps` times (on multiples of `multiple`)."""
    best, failed = None, None
    for seq in ladder:
        if trains(seq):
            best = seq
        else:
            failed = seq
            break
    if best is None or failed is None:
        return best
    low, high = best, failed
    for _ in range(bisect_steps):
        mid = (low + high) // 2 // multiple * multiple
        if mid <= low or mid >= high:
            break
        if trains(mid):
            low = mid
        else:
            high = mid
    return low


def fastest(records: Iterable[dict]) -> dict | None:
    """The ok record with the highest tokens/s."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("tokens_per_s")]
    return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None


def classify_loaded(requested_bits: str, loaded: dict | None) -> tuple[str, str | None]:
    """("ok", None), or ("invalid", why) when what loaded is not what the case asked for: a 4-bit case
    whose expert weights are not all 4-bit (Unsloth's fused quantize-while-loading path can leave them
    16-bit with only a warning) or in which nothing is 4-bit measured another model than users run.
    `loaded` is gptoss_checkpoint.describe_loaded's report."""
    if requested_bits != "4bit" or loaded is None:
        return "ok", None
    experts, experts_4bit = loaded["expert_weights"], loaded["expert_weights_4bit"]
    held = parameters_text(loaded["parameters_by_dtype"])
    if experts and not loaded["experts_4bit"]:
        return "invalid", (f"asked for 4-bit weights, but {experts - experts_4bit} of {experts} expert weights "
                           f"loaded unquantized (parameters: {held}) — not the model users train")
    if not loaded["params4bit"]:
        return "invalid", f"asked for 4-bit weights, but no weight loaded as 4-bit (parameters: {held})"
    return "ok", None


def parameters_text(by_dtype: dict[str, int]) -> str:
    """{'nf4': 11_300_000_000, 'float32': 1_130_000} -> 'nf4 11.3B, float32 1.13M'."""
    return ", ".join(f"{name} {count / 1e9:.3g}B" if count >= 1e9 else f"{name} {count / 1e6:.3g}M"
                     for name, count in by_dtype.items())


def moe_path_summary(moe: dict | None) -> str | None:
    """What the MoE experts ran on, in a few words, from moe_path's facts; None for a dense model."""
    if moe is None:
        return None
    if moe["per_expert_modules"]:  # split layout: the loop calls the per-expert modules, the grouped path never
        if moe["per_expert_calls"] is None:
            return "not run"
        return "per-expert loop" if moe["per_expert_calls"] else "grouped (stacked 4-bit experts)"
    forward, implementation = moe["experts_forward"] or "", moe["experts_implementation"]
    if "loop" in forward:
        return "per-expert loop"
    if "grouped_mm" in forward or implementation == "grouped_mm":
        return "grouped_mm" if moe["grouped_mm_available"] else "per-expert loop (no grouped_mm in torch)"
    if implementation in (None, "eager"):
        return "per-expert loop (eager)"
    return implementation


def attention_summary(attention: dict | None) -> str | None:
    """The attention that ran in training: Unsloth's gpt-oss forward (installed with
    UNSLOTH_ENABLE_FLEX_ATTENTION=1) trains with flex attention plus sinks whatever the config says;
    anything else runs the config's implementation."""
    if attention is None:
        return None
    if attention["forward"].startswith("unsloth") and attention["unsloth_flex_attention"]:
        return "flex_attention_with_sink (Unsloth)"
    return attention["implementation"]


def allocator_setting(environ: Mapping[str, str], torch_version: tuple[int, int]) -> dict:
    """The caching-allocator setting both stacks run with, for the case process to put in its
    environment before it imports torch: the user's (PYTORCH_ALLOC_CONF, else PYTORCH_CUDA_ALLOC_CONF),
    else expandable_segments:True, which unsloth_zoo sets at import when the user set none (and then
    keeps any setting it finds), so the hf stack gets it too. torch >= 2.10 reads PYTORCH_ALLOC_CONF
    (the CUDA name is deprecated there, and unsloth_zoo deletes it in its own process only); older torch
    reads PYTORCH_CUDA_ALLOC_CONF."""
    user = environ.get("PYTORCH_ALLOC_CONF") or environ.get("PYTORCH_CUDA_ALLOC_CONF")
    variable = "PYTORCH_ALLOC_CONF" if torch_version >= (2, 10) else "PYTORCH_CUDA_ALLOC_CONF"
    return {"variable": variable, "value": user or DEFAULT_ALLOCATOR_CONF, "source": "user" if user else "bench"}


def apply_allocator_setting(setting: dict, environ: MutableMapping[str, str]) -> None:
    environ[setting["variable"]] = setting["value"]
    if setting["variable"] == "PYTORCH_ALLOC_CONF":
        environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)


def train_memory(record: dict, field: str) -> float | None:
    """A training-phase memory figure (memory.FIELDS) of a result line. Lines written before the
    load/train blocks (flat peak_* keys, NVML as peak_nvml_gib) read the same."""
    phase = (record.get("memory") or {}).get("train") or {}
    if phase.get(field) is not None:
        return phase[field]
    return record.get(field, record.get({"device_peak_gib": "peak_nvml_gib"}.get(field, ""), None))


def failure_record(case: Case, status: str, reason: str, memory: dict | None = None) -> dict:
    """The result line of a case that did not finish: status OOM / timeout / error, why, and the memory
    seen when it failed (GiB). Same keys as a finished case, figures None."""
    if status not in STATUSES or status == "ok":
        raise ValueError(f"not a failure status: {status!r}")
    record = empty_figures()
    record.update(case=dataclasses.asdict(case), setting=case.setting, stack=case.stack, status=status,
                  error=reason, memory_at_failure_gib=memory or {})
    return record


def empty_figures() -> dict:
    return {
        "status": None, "error": None, "memory_at_failure_gib": {},
        "load_gib": None, "memory": {"load": dict.fromkeys(FIELDS), "train": dict.fromkeys(FIELDS)},
        "step_times_s": [], "median_step_s": None, "tokens_per_step": None, "tokens_per_s": None,
        "flops_per_token": None, "mfu": None, "losses": [], "trainable_parameters": None, "adapter_dtypes": None,
        "loaded": None, "attention": None, "moe": None, "allocator": None,
        "unsloth_imported": None, "load_average": None,
    }


def summarize(raw: dict, case: Case, device: dict) -> dict:
    """Derived figures (tokens/s, median step, MFU) from a case process's raw measurements."""
    record = empty_figures()
    record.update(raw)
    record.update(case=dataclasses.asdict(case), setting=case.setting, stack=case.stack)
    times, warmup = raw.get("step_times_s") or [], case.warmup_steps
    record["median_step_s"] = median_step_s(times, warmup)
    if raw.get("tokens_per_step"):
        record["tokens_per_s"] = tokens_per_second(times, raw["tokens_per_step"], warmup)
    config = case_config(case)
    active = active_parameters(config)
    if active is not None:
        record["flops_per_token"] = training_flops_per_token(active, case.seq_len, attention_layers(config))
    if device["kind"] == "cuda":
        record["mfu"] = model_flops_utilization(record["tokens_per_s"], record["flops_per_token"],
                                                peak_bf16_flops(device["name"]))
    return record


def active_parameters(config: dict) -> int | None:
    """Parameters a token passes through (planner's exact count), or None if it cannot tell."""
    try:
        return count_parameters(config).active
    except Exception:  # noqa: BLE001 — MFU is optional; the planner may not know this architecture
        return None


def predicted_peak_gib(case: Case, device: dict) -> float | None:
    """The planner's prediction for this case (GPU only), to set beside the measurement; None when the
    planner does not cover the model."""
    if device["kind"] != "cuda":
        return None
    try:
        config = case_config(case)
        gpt_oss = config.get("model_type") == "gpt_oss"
        ours = case.stack == "lowvram_ft"
        inp = PlanInput(
            model_config=config, load_bits=4 if ours or not gpt_oss else 16, lora_r=case.lora_r,
            lora_targets=list(case.lora_targets), batch_size=case.batch_size, seq_len=case.seq_len,
            gradient_accumulation=case.grad_accum, gradient_checkpointing="unsloth" if ours else "true",
            optimizer=case.optimizer, dtype=case.dtype, attention="auto" if ours or not gpt_oss else "eager",
            unsloth_kernels=ours,
        )
        return round(predict(inp, vram_gib=case.budget_gib).total_gib, 3)
    except Exception:  # noqa: BLE001 — optional
        return None
