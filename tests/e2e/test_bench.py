"""The benchmark harness on the embedded model, on the CPU: what loaded and what ran (bitsandbytes and
torch), the hf stack's in-memory gpt-oss build, and one run of both stacks (each case in its own process).
The measurement maths and the result files: unit/test_bench.py; a GPU run: gpu/test_bench.py."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import date

import pytest

from conftest import ROOT
from lowvram_ft.bench import inspection, metrics, supervisor
from lowvram_ft.memory import FIELDS

pytestmark = pytest.mark.slow


# Both stacks train the same fp32 weights on the same rows with the same LoRA init (seed 3407 set right
# before get_peft_model in both). What differs is the attention kernel (Unsloth's CPU path vs eager) and
# the loss kernel (Unsloth's chunked cross-entropy vs TRL's log-probs in plain torch): fp32 rounding,
# ~1e-7 relative on a loss of ~6, measured 0 to 1e-6. Four Adam steps of lr 2e-4 can amplify a rounding
# difference in a near-zero gradient to at most ~lr per weight; 1e-3 leaves room for that and still
# fails on any real difference (another batch, another init, a missing aux loss: >= 1e-2 here).
CPU_LOSS_TOLERANCE = 1e-3


def tiny_split_experts(quantized: bool):
    """A model-shaped module with two split gpt-oss experts (experts.gate_up_projs.<i>), NF4 or bf16."""
    import bitsandbytes as bnb
    import torch

    model = torch.nn.Module()
    model.mlp = torch.nn.Module()
    model.mlp.experts = torch.nn.Module()
    model.mlp.experts.gate_up_projs = torch.nn.ModuleList(torch.nn.Linear(64, 128, dtype=torch.bfloat16) for _ in range(2))
    if quantized:  # bitsandbytes quantizes NF4 on the CPU too
        for linear in model.mlp.experts.gate_up_projs:
            linear.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")._quantize("cpu")
    return model


def test_a_4bit_case_whose_experts_loaded_16bit_is_invalid():
    from lowvram_ft.gptoss_checkpoint import describe_loaded

    split_4bit, split_bf16 = describe_loaded(tiny_split_experts(True)), describe_loaded(tiny_split_experts(False))
    assert metrics.classify_loaded("4bit", split_4bit) == ("ok", None)
    assert metrics.classify_loaded("4bit", split_bf16) == ("invalid", "asked for 4-bit weights, but 2 of 2 expert weights "
                                                         "loaded unquantized (parameters: bfloat16 0.0166M) — not the "
                                                         "model users train")
    assert metrics.classify_loaded("16bit", split_bf16) == ("ok", None)  # the hf stack's bf16 recipe
    dense = {"parameters_by_dtype": {"bfloat16": 10}, "params4bit": 0, "expert_weights": 0, "expert_weights_4bit": 0,
             "experts_4bit": False}
    assert metrics.classify_loaded("4bit", dense)[0] == "invalid"
    assert metrics.classify_loaded("4bit", {**dense, "params4bit": 3})[0] == "ok"
    assert "invalid" in metrics.STATUSES


def test_per_expert_calls_tell_the_loop_from_the_grouped_path():
    import torch

    model = tiny_split_experts(False)
    calls = inspection.PerExpertCalls(model)
    assert len(calls.modules) == 2 and calls.calls == 0
    x = torch.ones(1, 64, dtype=torch.bfloat16)
    for expert in model.mlp.experts.gate_up_projs:  # what the per-expert loop does
        expert(x)
    assert calls.calls == 2
    facts = {"per_expert_modules": 2, "per_expert_calls": 2, "experts_forward": "x.GptOssExpertsBnb4bit.forward",
             "experts_implementation": None, "grouped_mm_available": True}
    assert metrics.moe_path_summary(facts) == "per-expert loop"
    assert metrics.moe_path_summary({**facts, "per_expert_calls": 0}) == "grouped (stacked 4-bit experts)"
    assert metrics.moe_path_summary({**facts, "per_expert_calls": None}) == "not run"
    fused = {**facts, "per_expert_modules": 0, "per_expert_calls": None}
    assert metrics.moe_path_summary({**fused, "experts_forward": "unsloth_zoo.temporary_patches.moe_utils."
                                   "forward_native_moe_loop"}) == "per-expert loop"
    assert metrics.moe_path_summary({**fused, "experts_implementation": "grouped_mm"}) == "grouped_mm"
    assert metrics.moe_path_summary({**fused, "experts_implementation": "grouped_mm", "grouped_mm_available": False}) == (
        "per-expert loop (no grouped_mm in torch)")
    assert metrics.moe_path_summary({**fused, "experts_implementation": "eager"}) == "per-expert loop (eager)"
    assert metrics.moe_path_summary(None) is None


def test_the_hf_stack_builds_gpt_oss_in_memory_with_eager_attention_and_float32_adapters():
    """The hf stack's in-memory build and LoRA on the embedded model's config (tiny; CPU, bf16), in a
    process of its own: transformers must not be imported here before unsloth is, in a later test."""
    code = """
import json, torch
from lowvram_ft.bench import baselines, inspection, matrix, models
from lowvram_ft.embedded import embedded_model_dir
config = json.loads((embedded_model_dir() / "config.json").read_text())
model = models.build_in_memory(config, "bfloat16", "cpu", seed=3407)
base = {str(p.dtype) for p in model.parameters()}
model, experts = baselines.add_hf_lora(model, matrix.Case(stack="hf", lora_r=8, lora_alpha=16))
print(json.dumps({"attention": model.config._attn_implementation, "use_cache": model.config.use_cache, "base": sorted(base),
                  "adapters": inspection.adapter_dtypes(model), "experts": experts,
                  "moe": inspection.moe_path(model, None)["experts_module"]}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["attention"] == "eager" and facts["use_cache"] is False and facts["base"] == ["torch.bfloat16"]
    assert list(facts["adapters"]) == ["float32"] and facts["adapters"]["float32"] > 0
    assert facts["experts"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"] and facts["moe"] == "GptOssExperts"


def test_both_stacks_train_the_embedded_model_on_cpu(tmp_path):
    """Two cases, each in its own process: both finish with throughput, the same trainable parameters and
    data, the hf process never imported unsloth, and the losses agree."""
    cases = tmp_path / "pair.yaml"
    cases.write_text("device: cpu\ndefaults: {model: embedded, dtype: float32, optimizer: adamw_torch, "
                      "steps: 4, warmup_steps: 1, timeout_s: 120}\ncases:\n  - {seq_len: 128, batch_size: 1}\n")
    path = supervisor.run_bench(cases, out_dir=tmp_path / "results", log_root=tmp_path / "logs")
    assert path.name == f"{date.today().isoformat()}-cpu-pair.jsonl"
    assert path.with_suffix(".md").is_file() and path.with_suffix(".png").stat().st_size > 0
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_stack = {r["stack"]: r for r in lines}
    assert set(by_stack) == {"lowvram_ft", "hf"}
    for r in lines:
        assert r["status"] == "ok", r["error"]
        assert r["tokens_per_s"] > 0 and r["memory"]["train"]["peak_rss_gib"] > 0 and len(r["losses"]) == 4
        assert r["environment"]["versions"]["torch"] and r["environment"]["device"]["kind"] == "cpu"
    ours, hf = by_stack["lowvram_ft"], by_stack["hf"]
    assert ours["unsloth_imported"] is True and hf["unsloth_imported"] is False
    assert ours["trainable_parameters"]["trainable"] == hf["trainable_parameters"]["trainable"] > 0
    assert ours["trainable_parameters"]["experts"] > 0  # the experts train in both stacks
    assert ours["data_digest"] == hf["data_digest"]
    assert metrics.loss_max_abs_diff(ours["losses"], hf["losses"]) <= CPU_LOSS_TOLERANCE
    for r in lines:
        # memory.py's FIELDS for both phases, reset after loading; GPU-only fields are None on the CPU
        assert set(r["memory"]) == {"load", "train"}
        for phase in r["memory"].values():
            assert list(phase) == list(FIELDS) and phase["peak_rss_gib"] > 0
            assert phase["peak_allocated_gib"] is phase["peak_reserved_gib"] is phase["device_peak_gib"] is None
        # what loaded (16-bit asked, 16-bit loaded: ok) and what ran
        assert r["loaded"]["expert_weights"] > 0 and r["loaded"]["experts_4bit"] is False
        assert r["load_settings"]["requested_bits"] == "16bit" and r["adapter_dtypes"] == {"float32": r["trainable_parameters"]["trainable"]}
        assert r["attention"]["implementation"] and r["attention"]["ran"] and r["attention"]["forward"]
        assert set(r["moe"]) >= {"backend", "backend_requested", "grouped_mm_available", "experts_implementation",
                                 "experts_module", "experts_forward", "per_expert_calls", "path"}
        assert isinstance(r["moe"]["grouped_mm_available"], bool) and r["moe"]["path"]
        assert r["allocator"]["value"] and r["allocator"]["set_before_torch"] is True
    assert ours["allocator"] == hf["allocator"]  # both stacks ran the same caching-allocator setting
    assert "## What ran" in path.with_suffix(".md").read_text()
