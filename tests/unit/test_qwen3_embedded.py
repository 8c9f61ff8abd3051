"""The embedded Qwen3-shaped default (`embedded-qwen3`): a dense family trained, evaluated and exported
end to end on the CPU, rendered with Qwen3's real chat template.

Fast tier: the build (shape, tied embeddings, tokens, template, determinism), and the training text
under Qwen3's template — the prompt of each assistant turn is exactly what the template renders for
inference, the trained tokens exactly what the model generates (reasoning in <think>, answer,
<|im_end|>), earlier turns without their reasoning as Qwen3 renders them.
Slow tier: one training run per session (configs/embedded-qwen3.yaml); each test reads its outputs
and asserts an effect that could fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import precision_atol

from lowvram_ft.config import load_config
from lowvram_ft.conversation import Conversation, Message
from lowvram_ft.embedded import QWEN3_TEMPLATE, build_embedded, embedded_model_dir

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
CONFIG = "configs/embedded-qwen3.yaml"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir("embedded-qwen3"))


# --------------------------------------------------------------------------- the build


def test_build_is_a_small_tied_qwen3_and_deterministic(tmp_path):
    from safetensors.torch import load_file

    build_embedded(tmp_path / "a", "embedded-qwen3")
    build_embedded(tmp_path / "b", "embedded-qwen3")
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors", "config.json",
                 "generation_config.json", "chat_template.jinja"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["num_key_value_heads"] < config["num_attention_heads"], "grouped-query attention"
    weights = load_file(str(tmp_path / "a" / "model.safetensors"))
    names, parameters = list(weights), sum(w.numel() for w in weights.values())
    assert any("q_norm" in n for n in names) and any("k_norm" in n for n in names)
    assert not any(n.startswith("lm_head") for n in names), "lm_head is the embedding, not a stored copy"
    assert 0.5e6 < parameters < 1.5e6, parameters
    generation = json.loads((tmp_path / "a" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [config["eos_token_id"], config["pad_token_id"]]  # <|im_end|>, <|endoftext|>


def test_tokenizer_has_the_tokens_qwen3s_template_writes(tokenizer):
    for token in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>" and tokenizer.bos_token is None
    ids = tokenizer("<think>\nHmm.\n</think>\n\nYes.<|im_end|>", add_special_tokens=False)["input_ids"]
    # As in Qwen3's tokenizer, the think tags are added tokens that decoding keeps.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nHmm.\n</think>\n\nYes."
    assert tokenizer.chat_template == QWEN3_TEMPLATE.read_text(encoding="utf-8")


def test_chat_template_is_unsloths_qwen3_registry_entry():
    """The shipped template is the string Unsloth registers as CHAT_TEMPLATES["qwen3"], verbatim. Read from
    the installed unsloth/chat_templates.py without importing unsloth (which would patch transformers for
    every test after this one, and takes a minute on a busy 2-core machine)."""
    import ast
    import importlib.util

    source = Path(importlib.util.find_spec("unsloth").origin).with_name("chat_templates.py").read_text(encoding="utf-8")
    strings, registered = {}, None
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target, value = node.targets[0], node.value
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant) and isinstance(value.value, str):
            strings[target.id] = value.value
        elif (isinstance(target, ast.Subscript) and ast.unparse(target) == "CHAT_TEMPLATES['qwen3']"
              and isinstance(value, ast.Tuple)):
            registered = strings[ast.unparse(value.elts[0])]
    assert registered == QWEN3_TEMPLATE.read_text(encoding="utf-8")


def test_config_names_the_embedded_qwen3_and_its_attention_and_mlp():
    cfg = load_config(ROOT / CONFIG)
    assert cfg.model.name == "embedded-qwen3"
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "embed_tokens" in cfg.lora.modules_to_save


def test_model_name_resolves_to_the_built_folder():
    from lowvram_ft.model import resolve_model_path

    assert resolve_model_path("embedded-qwen3") == str(embedded_model_dir("embedded-qwen3"))
    assert resolve_model_path("embedded") == str(embedded_model_dir("embedded"))


# --------------------------------------------------------------------------- what is trained


SINGLE = Conversation((
    Message("system", "You are a helpful assistant."),
    Message("user", "What is 2 + 3?"),
    Message("assistant", "2 + 3 = 5.", thinking="L'utilisateur demande 2 + 3. La réponse est 5."),
), reasoning_language="French")
MULTI = Conversation((
    Message("user", "Name a fruit."),
    Message("assistant", "Apple.", thinking="Any fruit works."),
    Message("user", "Another one?"),
    Message("assistant", "Pear.", thinking="Not an apple, then."),
), reasoning_language="English")
# The same conversations as a user would send them to the model (the reasoning language is a system line).
MESSAGES = {
    "single": [
        {"role": "system", "content": "reasoning language: French\n\nYou are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5.", "reasoning_content": "L'utilisateur demande 2 + 3. La réponse est 5."},
    ],
    "multi": [
        {"role": "system", "content": "reasoning language: English"},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple.", "reasoning_content": "Any fruit works."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Pear.", "reasoning_content": "Not an apple, then."},
    ],
}
TRAINED = {
    "single": ["<think>\nL'utilisateur demande 2 + 3. La réponse est 5.\n</think>\n\n2 + 3 = 5.<|im_end|>"],
    # Qwen3 renders an earlier turn without its reasoning: trained as rendered, its answer only.
    "multi": ["Apple.<|im_end|>", "<think>\nNot an apple, then.\n</think>\n\nPear.<|im_end|>"],
}


def tokenize(conversation, tokenizer, tmp_path):
    from lowvram_ft.data import tokenize_data

    cfg = load_config(overrides={"data": {"cache_dir": str(tmp_path / "cache")}})
    tokenized = tokenize_data([conversation], tokenizer, cfg)
    assert tokenized.stats["untrained_turns"] == 0 and tokenized.stats["reasoning_dropped_rows"] == 0
    return tokenized.dataset[0]


@pytest.mark.parametrize("case, conversation", [("single", SINGLE), ("multi", MULTI)])
def test_prompt_is_the_inference_prompt_and_only_the_assistant_part_trains(case, conversation, tokenizer, tmp_path):
    from lowvram_ft.data import runs

    row = tokenize(conversation, tokenizer, tmp_path)
    ids, labels = row["input_ids"], row["labels"]
    render = tokenizer.apply_chat_template
    # The training text is what the model's own template renders for this conversation ...
    assert tokenizer.decode(ids) == render(MESSAGES[case], tokenize=False)
    # ... before each assistant turn stands exactly the generation prompt of its history, token for token ...
    starts = [i for i, label in enumerate(labels) if label != -100 and (i == 0 or labels[i - 1] == -100)]
    turns = [i for i, m in enumerate(MESSAGES[case]) if m["role"] == "assistant"]
    assert len(starts) == len(turns)
    for start, turn in zip(starts, turns):
        prompt = render(MESSAGES[case][:turn], add_generation_prompt=True, tokenize=False)
        assert ids[:start] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # ... and the trained tokens are exactly what the model generates after it, up to its stop token.
    trained = [tokenizer.decode(run) for is_trained, run in runs(ids, labels) if is_trained]
    assert trained == TRAINED[case]
    assert all(label in (-100, token) for token, label in zip(ids, labels))


def test_evaluation_and_chat_ask_with_the_training_prompt(tokenizer, tmp_path):
    from lowvram_ft.chat import render
    from lowvram_ft.evaluate.generation import parse_output
    from lowvram_ft.evaluate.run import Case, render_prompts

    cfg = load_config()
    question = Conversation((Message("user", "What is 2 + 3?"),), reasoning_language="French")
    row = tokenize(Conversation(question.messages + (Message("assistant", "5.", thinking="Je calcule."),),
                                reasoning_language="French"), tokenizer, tmp_path)
    first_trained = next(i for i, label in enumerate(row["labels"]) if label != -100)
    prompt = tokenizer.decode(row["input_ids"][:first_trained])
    assert render_prompts([Case("p", "math", "What is 2 + 3?", "French", 0)], tokenizer, cfg) == [prompt]
    assert render(question, tokenizer, cfg.data.date) == prompt
    completion = tokenizer.decode(row["input_ids"][first_trained:])  # what a model that learned it generates
    parsed = parse_output(completion, stopped=True, harmony=False)
    assert (parsed.analysis, parsed.final, parsed.parsed_ok, parsed.truncated) == ("Je calcule.", "5.", True, False)


# --------------------------------------------------------------------------- end to end (slow)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowvram_ft", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def qwen3_run(tmp_path_factory):
    """One `make demo`-style run of configs/embedded-qwen3.yaml, exported as a LoRA adapter and as a
    merged 16-bit model."""
    run_dir = tmp_path_factory.mktemp("qwen3") / "run"
    started = time.perf_counter()
    proc = cli("train", "--config", CONFIG, "--output", str(run_dir), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seconds = time.perf_counter() - started
    for fmt in ("lora", "merged-16bit"):
        export = cli("export", "--run", str(run_dir), "--format", fmt)
        assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    return {"dir": run_dir, "stdout": proc.stdout, "seconds": seconds, "lora": run_dir / "export" / "lora",
            "merged": run_dir / "export" / "merged-16bit"}


@pytest.mark.slow
def test_loss_falls(qwen3_run):
    losses = [r["loss"] for r in read_jsonl(qwen3_run["dir"] / "metrics.jsonl")]
    assert losses[0] > 7.0, "a random model starts near ln(vocab)"
    assert losses[-1] < 0.4 * losses[0], losses
    summary = json.loads((qwen3_run["dir"] / "summary.json").read_text())
    assert summary["steps"] == 400 and summary["device"]["kind"] == "cpu"


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_exports_reload_without_unsloth_tied_and_with_the_trained_logits(qwen3_run):
    """`export --format lora` with plain PEFT and `--format merged-16bit` with plain transformers, in a
    process that never imports Unsloth: both keep the embeddings tied and reproduce the logits the
    trained model gave at the end of training (summary.json's probe)."""
    code = f"""
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
lora, merged = {str(qwen3_run["lora"])!r}, {str(qwen3_run["merged"])!r}
summary = json.load(open({str(qwen3_run["dir"] / "summary.json")!r}))
base = json.load(open(lora + "/adapter_config.json"))["base_model_name_or_path"]
probe = summary["reload_probe"]
ids = AutoTokenizer.from_pretrained(lora)(probe["text"], add_special_tokens=False, return_tensors="pt")["input_ids"]
models = {{"lora": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, summary["dtype"])), lora),
          "merged": AutoModelForCausalLM.from_pretrained(merged)}}
result = {{"ids": probe["top_ids"], "want": probe["top_logits"], "merged_dtype": str(models["merged"].dtype).removeprefix("torch."),
          "merged_keys": sorted(load_file(merged + "/model.safetensors"))}}
for name, model in models.items():
    with torch.inference_mode():
        logits = model.eval()(input_ids=ids).logits[0, -1].float()
    result[name] = {{"got": logits[probe["top_ids"]].tolist(), "top": int(logits.argmax()),
                    "tied": model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()}}
result["merged_config_ties"] = models["merged"].config.tie_word_embeddings
assert "unsloth" not in sys.modules and "unsloth_zoo" not in sys.modules
print(json.dumps(result))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_chat_shows_the_thinking_apart_and_forgets_it_in_the_next_prompt(qwen3_run, tokenizer):
    """A scripted `chat` with the trained run: each answer is shown as 'thinking:' then 'assistant:'
    with the <think> tags parsed away, and the second prompt is what Qwen3's template renders for the
    conversation so far — the first answer without its reasoning."""
    first, second = "Convert 47 centimetres to inches.", "And 12 centimetres?"
    proc = subprocess.run([sys.executable, "-m", "lowvram_ft", "chat", "--run", str(qwen3_run["dir"]),
                           "--reasoning-language", "French", "--temperature", "0", "--max-new-tokens", "160",
                           "--show-prompt"], input=f"{first}\n{second}\n/exit\n", cwd=ROOT,
                          env={**ENV, "COLUMNS": "200"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prompts = [json.loads(line.split("prompt: ", 1)[1]) for line in proc.stdout.splitlines() if "prompt: " in line]
    system = {"role": "system", "content": "reasoning language: French"}
    assert prompts[0] == tokenizer.apply_chat_template([system, {"role": "user", "content": first}],
                                                       add_generation_prompt=True, tokenize=False)
    assert prompts[1].startswith(prompts[0]) and prompts[1].endswith(
        f"<|im_start|>user\n{second}<|im_end|>\n<|im_start|>assistant\n")
    assert "<think>" not in prompts[1], "an earlier turn's reasoning stays out of the prompt"
    shown = "\n".join(line for line in proc.stdout.splitlines() if "prompt: " not in line)
    assert shown.count("thinking: ") == 2 and shown.count("tokens/s") == 2
    for tag in ("<think>", "</think>", "<|im_end|>"):
        assert tag not in shown, tag
