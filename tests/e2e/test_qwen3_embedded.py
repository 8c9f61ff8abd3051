"""The embedded Qwen3-shaped default (`embedded-qwen3`), a dense family trained, evaluated and exported
end to end on the CPU, rendered with Qwen3's real chat template: one training run per session
(configs/embedded-qwen3.yaml); each test reads its outputs and asserts an effect that could fail.
The build and the training text without training: unit/test_qwen3_embedded.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, precision_atol
from helpers import QWEN3_CONFIG, read_jsonl, reload_exports, scripted_chat
from lowvram_ft.embedded import embedded_model_dir

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowvram_ft", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def qwen3_run(tmp_path_factory):
    """One `make demo`-style run of configs/embedded-qwen3.yaml, exported as a LoRA adapter and as a
    merged 16-bit model."""
    run_dir = tmp_path_factory.mktemp("qwen3") / "run"
    started = time.perf_counter()
    proc = cli("train", "--config", QWEN3_CONFIG, "--output", str(run_dir), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seconds = time.perf_counter() - started
    for fmt in ("lora", "merged-16bit"):
        export = cli("export", "--run", str(run_dir), "--format", fmt)
        assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    return {"dir": run_dir, "stdout": proc.stdout, "seconds": seconds, "lora": run_dir / "export" / "lora",
            "merged": run_dir / "export" / "merged-16bit"}


def test_loss_falls(qwen3_run):
    losses = [r["loss"] for r in read_jsonl(qwen3_run["dir"] / "metrics.jsonl")]
    assert losses[0] > 7.0, "a random model starts near ln(vocab)"
    assert losses[-1] < 0.4 * losses[0], losses
    summary = json.loads((qwen3_run["dir"] / "summary.json").read_text())
    assert summary["steps"] == 400 and summary["device"]["kind"] == "cpu"


def test_lora_moved_attention_and_mlp_and_trained_the_tied_embeddings_as_one(qwen3_run):
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(qwen3_run["dir"] / "adapter" / "adapter_model.safetensors"))
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        lora_b = [v for k, v in tensors.items() if f".{projection}.lora_B" in k]
        assert lora_b, projection
        # LoRA B starts at exactly zero: non-zero means training changed the projection's weights.
        assert all(float(v.abs().max()) > 1e-4 for v in lora_b), projection
    # The embeddings train in full (modules_to_save) and are saved with the adapter ...
    embed = [v for k, v in tensors.items() if k.endswith("embed_tokens.weight")]
    assert len(embed) == 1, sorted(tensors)[:5]
    base = load_file(str(embedded_model_dir("embedded-qwen3") / "model.safetensors"))["model.embed_tokens.weight"]
    assert (embed[0].float() - base.float()).abs().max() > 0.1, "the embeddings were trained"
    # ... as one matrix, as Qwen3-0.6B ties them: lm_head, where PEFT saves it at all, is that matrix.
    assert all(torch.equal(v, embed[0]) for k, v in tensors.items() if k.endswith("lm_head.weight"))
    adapter_config = json.loads((qwen3_run["dir"] / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["ensure_weight_tying"] is True


def test_tuned_model_reasons_in_the_requested_language(qwen3_run):
    """As the gpt-oss demo, with a lower bar on the share of all requests: greedy decoding of this tiny
    tied-embedding model falls into repetition loops on some prompts (cut off at eval.max_new_tokens,
    not scorable), so that share varied from 49% to 86% between seeds, dtypes and step counts (the
    base: 0%). Where the reasoning completes it is in the requested language (93-100%)."""
    result = json.loads((qwen3_run["dir"] / "eval.json").read_text())
    before = {r["group"]: r for r in result["tables"]["before"]}
    after = {r["group"]: r for r in result["tables"]["after"]}
    assert after["trained"]["think_all_rate"] > before["trained"]["think_all_rate"] + 0.3
    assert after["trained"]["think_all_ci"][0] > before["trained"]["think_all_ci"][1], "beyond sampling noise"
    assert after["trained"]["think_rate"] >= 0.8
    ppl = result["perplexity"]
    assert ppl["after"] < ppl["before"] / 10, ppl
    samples = [s for s in read_jsonl(qwen3_run["dir"] / "eval_samples.jsonl") if s["phase"] == "after"]
    assert all("<think>" not in (s["analysis"] or "") + (s["final"] or "") for s in samples), "tags parsed away"


def test_exports_reload_without_unsloth_tied_and_with_the_trained_logits(qwen3_run):
    """`export --format lora` with plain PEFT and `--format merged-16bit` with plain transformers, in a
    process that never imports Unsloth: both keep the embeddings tied and reproduce the logits the
    trained model gave at the end of training (summary.json's probe)."""
    result = reload_exports(qwen3_run, timeout=300)
    summary = json.loads((qwen3_run["dir"] / "summary.json").read_text())
    magnitude = max(abs(v) for v in result["want"])
    # lora: the same weights, a few roundings of the compute dtype apart (fp32: thread order only).
    # merged: each merged weight rounded once more to 16 bits, then computed in 16 bits.
    tolerances = {"lora": precision_atol(summary["compute_dtype"], magnitude, floor=1e-3),
                  "merged": precision_atol(result["merged_dtype"], magnitude, floor=1e-3)}
    for name, atol in tolerances.items():
        assert result[name]["got"] == pytest.approx(result["want"], abs=atol), name
        assert result[name]["top"] == result["ids"][0], name
        assert result[name]["tied"], f"{name}: lm_head is not the input embedding"
    assert result["merged_dtype"] in ("bfloat16", "float16")
    # One stored copy: the merged checkpoint ties lm_head to the trained embedding, as Qwen3-0.6B's does.
    assert result["merged_config_ties"] is True and "lm_head.weight" not in result["merged_keys"]
    assert "model.embed_tokens.weight" in result["merged_keys"]


def test_generate_json_separates_reasoning_from_answer(qwen3_run):
    """`generate --json` on trained-style questions: the reasoning and the answer come apart, with no
    template tag left in either. Greedy output of this tiny model can loop (see the test above), so
    it asks up to three questions for one complete answer; every answer asked must parse cleanly."""
    questions = [("A train leaves at 12:27 and arrives at 17:20. How long is the journey?", "German"),
                 ("Convert 47 centimetres to inches.", "French"),
                 ("A delivery van travels at an average of 94 km/h for 2 hours and 30 minutes. How far does it go?",
                  "English")]
    complete = []
    for question, language in questions:
        proc = cli("generate", "--run", str(qwen3_run["dir"]), "--prompt", question, "--reasoning-language", language,
                   "--temperature", "0", "--max-new-tokens", "256", "--json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
        assert set(answer) == {"analysis", "final", "truncated"} and answer["analysis"], answer
        for tag in ("<think>", "</think>", "<|im_end|>", "<|im_start|>"):
            assert tag not in answer["analysis"] + (answer["final"] or ""), (tag, answer)
        if answer["final"] and not answer["truncated"]:
            complete.append(answer)
            break
    assert complete, "no question was answered with reasoning and a final answer"


def test_chat_shows_the_thinking_apart_and_forgets_it_in_the_next_prompt(qwen3_run, qwen3_tokenizer):
    """A scripted `chat` with the trained run: each answer is shown as 'thinking:' then 'assistant:'
    with the <think> tags parsed away, and the second prompt is what Qwen3's template renders for the
    conversation so far — the first answer without its reasoning."""
    first, second = "Convert 47 centimetres to inches.", "And 12 centimetres?"
    proc, prompts = scripted_chat(qwen3_run["dir"], [first, second], max_new_tokens=160, timeout=600)
    system = {"role": "system", "content": "reasoning language: French"}
    assert prompts[0] == qwen3_tokenizer.apply_chat_template([system, {"role": "user", "content": first}],
                                                             add_generation_prompt=True, tokenize=False)
    assert prompts[1].startswith(prompts[0]) and prompts[1].endswith(
        f"<|im_start|>user\n{second}<|im_end|>\n<|im_start|>assistant\n")
    assert "<think>" not in prompts[1], "an earlier turn's reasoning stays out of the prompt"
    shown = "\n".join(line for line in proc.stdout.splitlines() if "prompt: " not in line)
    assert shown.count("thinking: ") == 2 and shown.count("tokens/s") == 2
    for tag in ("<think>", "</think>", "<|im_end|>"):
        assert tag not in shown, tag
