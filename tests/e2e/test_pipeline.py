"""End to end on the embedded default, exactly as `make demo` runs it (configs/embedded.yaml).

One training run per test session (about 2–3 minutes on 2 CPU cores); every test below reads its
outputs and asserts an effect that could fail: the loss fell, the adapters — experts included — moved
away from their zero init, a reload in a process without Unsloth reproduces the trained logits, and
the tuned model reasons in the requested language far more often than the base model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, precision_atol
from helpers import read_jsonl

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lowvram_ft", "train", "--config", "configs/embedded.yaml",
                           "--output", str(run_dir)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=2700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"dir": run_dir, "stdout": proc.stdout, "seconds": time.perf_counter() - started}


def test_run_folder_holds_every_promised_file(demo):
    run = demo["dir"]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer.json", "eval.json", "eval.md",
                 "eval.png", "eval_samples.jsonl", "report.html"):
        assert (run / name).is_file(), name
    assert f"[lowvram_ft] report: {run / 'report.html'}" in demo["stdout"]  # the run's page, said in one line
    assert not list(run.glob(".*partial*")) and not list(run.glob(".*.tmp")), "no half-written leftovers"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["device"]["kind"] == "cpu" and summary["peak_memory_kind"] == "peak_rss"
    assert summary["versions"]["unsloth"] == "2026.10.9" and summary["versions"]["torch"].startswith("2.14")
    assert summary["trained_tokens"] > 100_000 and summary["steps"] == 400
    record = read_jsonl(run / "metrics.jsonl")[-1]
    assert {"step", "loss", "learning_rate", "tokens_per_s", "peak_memory_gib"} <= set(record)
    assert record["tokens_per_s"] > 0 and record["peak_memory_gib"] > 0.1
    # One meaning of peak memory (memory.py): the same fields per step and per phase in the summary.
    from lowvram_ft.memory import FIELDS

    assert set(FIELDS) <= set(record) and set(summary["memory"]["train"]) == set(FIELDS) == set(summary["memory"]["load"])
    assert record["peak_rss_gib"] == record["peak_memory_gib"] and record["peak_reserved_gib"] is None
    assert summary["dtype"] in ("float32", "bfloat16") and summary["packing"]["used"] is False


def test_loss_falls(demo):
    losses = [r["loss"] for r in read_jsonl(demo["dir"] / "metrics.jsonl")]
    assert losses[0] > 7.0, "a random model starts near ln(vocab)"
    assert losses[-1] < 0.4 * losses[0], losses


def test_log_shows_each_step_and_the_trainable_split(demo):
    out = demo["stdout"]
    for step in ("config", "device", "model", "lora", "data", "train", "save", "done"):
        assert f"[lowvram_ft] {step}:" in out
    line = next(line for line in out.splitlines() if line.startswith("[lowvram_ft] lora:"))
    assert "attention 28,672, experts 81,920" in line, line


def test_adapters_moved_attention_and_experts_included(demo):
    from safetensors.torch import load_file

    tensors = load_file(str(demo["dir"] / "adapter" / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in tensors.items() if "lora_B" in k}
    experts = [v for k, v in lora_b.items() if "experts" in k]
    attention = [v for k, v in lora_b.items() if "self_attn" in k]
    assert experts and attention
    # LoRA B starts at exactly zero: non-zero means training changed the experts' effective weights.
    assert all(float(v.abs().max()) > 1e-4 for v in experts + attention)


def test_reload_without_unsloth_reproduces_trained_logits(demo):
    """Plain transformers + PEFT, in a fresh process without Unsloth, on the saved adapter."""
    code = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
adapter = {str(demo["dir"] / "adapter")!r}
base = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
tok = AutoTokenizer.from_pretrained(adapter)
summary = json.load(open({str(demo["dir"] / "summary.json")!r}))
dtype = getattr(torch, summary["dtype"])  # the weights as trained: bf16 on a CPU with native bf16, else fp32
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter).eval()
probe = summary["reload_probe"]
ids = tok(probe["text"], add_special_tokens=False, return_tensors="pt")["input_ids"]
with torch.inference_mode():
    logits = model(input_ids=ids).logits[0, -1]
assert "unsloth" not in sys.modules
print(json.dumps({{"ids": probe["top_ids"], "want": probe["top_logits"], "got": logits[probe["top_ids"]].tolist(),
                   "top": torch.topk(logits, len(probe["top_ids"])).indices.tolist()}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((demo["dir"] / "summary.json").read_text())
    # fp32: the same computation up to thread-order rounding; bf16: a few bf16 roundings of the logits.
    atol = precision_atol(summary["compute_dtype"], max(abs(v) for v in result["want"]), floor=1e-3)
    assert result["got"] == pytest.approx(result["want"], abs=atol)
    assert result["top"][0] == result["ids"][0]


def test_tuned_model_reasons_in_the_requested_language(demo):
    """A real learning effect, measured by the evaluation harness itself."""
    result = json.loads((demo["dir"] / "eval.json").read_text())
    # Trained vs zero-shot from the run's data: the shipped sample data reasons in Japanese too.
    assert result["language_groups"] == {**dict.fromkeys(["en", "fr", "de", "es", "it", "ja"], "trained"),
                                         "zh": "zero-shot", "ko": "zero-shot"}
    assert result["zero_shot_languages"] == ["zh", "ko"]
    before = {r["group"]: r for r in result["tables"]["before"]}
    after = {r["group"]: r for r in result["tables"]["after"]}
    assert after["trained"]["think_all_rate"] > before["trained"]["think_all_rate"] + 0.5
    assert after["trained"]["think_rate"] >= 0.8
    assert after["trained"]["think_match"] > before["trained"]["think_match"]
    ppl = result["perplexity"]
    assert ppl["after"] < ppl["before"] / 10, ppl
    samples = read_jsonl(demo["dir"] / "eval_samples.jsonl")
    assert {s["phase"] for s in samples} == {"before", "after"}
    assert len(samples) == 2 * after["overall"]["n"]
    pairs = {(s["prompt_id"], s["target_language"]) for s in samples if s["phase"] == "before"}
    assert pairs == {(s["prompt_id"], s["target_language"]) for s in samples if s["phase"] == "after"}


def test_smoke_is_the_short_evaluation_and_gates_on_think_match(demo):
    from lowvram_ft.evaluate.run import SMOKE_MAX_NEW_TOKENS

    ok = subprocess.run([sys.executable, "-m", "lowvram_ft", "smoke", "--run", str(demo["dir"]),
                         "--min-think-match", "0.5"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    # "A minute" is a work size, not a wall-clock race on a shared machine: few prompts, short answers.
    smoke = json.loads((demo["dir"] / "smoke" / "eval.json").read_text())
    full = json.loads((demo["dir"] / "eval.json").read_text())
    assert smoke["settings"]["smoke"] is True and smoke["settings"]["max_new_tokens"] <= SMOKE_MAX_NEW_TOKENS
    assert smoke["trained_languages"] == full["trained_languages"] and "summary.json" in smoke["labels_from"]
    def asked(result):
        return {r["group"]: r for r in result["tables"]["after"]}["overall"]["n"]

    assert 0 < asked(smoke) < asked(full)
    strict = subprocess.run([sys.executable, "-m", "lowvram_ft", "smoke", "--run", str(demo["dir"]),
                             "--min-think-match", "1.01"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert strict.returncode == 1
    assert "below --min-think-match 1.01" in strict.stderr
