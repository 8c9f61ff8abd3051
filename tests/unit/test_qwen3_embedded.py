"""The embedded Qwen3-shaped default (`embedded-qwen3`) without training: the build (shape, tied
embeddings, tokens, template, determinism), and the training text under Qwen3's template — the prompt
of each assistant turn is exactly what the template renders for inference, the trained tokens exactly
what the model generates (reasoning in <think>, answer, <|im_end|>), earlier turns without their
reasoning as Qwen3 renders them. Trained, evaluated and exported end to end: e2e/test_qwen3_embedded.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT
from helpers import QWEN3_CONFIG
from lowvram_ft.config import load_config
from lowvram_ft.conversation import Conversation, Message
from lowvram_ft.embedded import QWEN3_TEMPLATE, build_embedded, embedded_model_dir


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


def test_tokenizer_has_the_tokens_qwen3s_template_writes(qwen3_tokenizer):
    for token in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"):
        assert len(qwen3_tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert qwen3_tokenizer.eos_token == "<|im_end|>" and qwen3_tokenizer.pad_token == "<|endoftext|>"
    assert qwen3_tokenizer.bos_token is None
    ids = qwen3_tokenizer("<think>\nHmm.\n</think>\n\nYes.<|im_end|>", add_special_tokens=False)["input_ids"]
    # As in Qwen3's tokenizer, the think tags are added tokens that decoding keeps.
    assert qwen3_tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nHmm.\n</think>\n\nYes."
    assert qwen3_tokenizer.chat_template == QWEN3_TEMPLATE.read_text(encoding="utf-8")


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
    cfg = load_config(ROOT / QWEN3_CONFIG)
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
def test_prompt_is_the_inference_prompt_and_only_the_assistant_part_trains(case, conversation, qwen3_tokenizer,
                                                                            tmp_path):
    from lowvram_ft.data import runs

    row = tokenize(conversation, qwen3_tokenizer, tmp_path)
    ids, labels = row["input_ids"], row["labels"]
    render = qwen3_tokenizer.apply_chat_template
    # The training text is what the model's own template renders for this conversation ...
    assert qwen3_tokenizer.decode(ids) == render(MESSAGES[case], tokenize=False)
    # ... before each assistant turn stands exactly the generation prompt of its history, token for token ...
    starts = [i for i, label in enumerate(labels) if label != -100 and (i == 0 or labels[i - 1] == -100)]
    turns = [i for i, m in enumerate(MESSAGES[case]) if m["role"] == "assistant"]
    assert len(starts) == len(turns)
    for start, turn in zip(starts, turns):
        prompt = render(MESSAGES[case][:turn], add_generation_prompt=True, tokenize=False)
        assert ids[:start] == qwen3_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # ... and the trained tokens are exactly what the model generates after it, up to its stop token.
    trained = [qwen3_tokenizer.decode(run) for is_trained, run in runs(ids, labels) if is_trained]
    assert trained == TRAINED[case]
    assert all(label in (-100, token) for token, label in zip(ids, labels))


def test_evaluation_and_chat_ask_with_the_training_prompt(qwen3_tokenizer, tmp_path):
    from lowvram_ft.chat import render
    from lowvram_ft.evaluate.generation import parse_output
    from lowvram_ft.evaluate.run import Case, render_prompts

    cfg = load_config()
    question = Conversation((Message("user", "What is 2 + 3?"),), reasoning_language="French")
    row = tokenize(Conversation(question.messages + (Message("assistant", "5.", thinking="Je calcule."),),
                                reasoning_language="French"), qwen3_tokenizer, tmp_path)
    first_trained = next(i for i, label in enumerate(row["labels"]) if label != -100)
    prompt = qwen3_tokenizer.decode(row["input_ids"][:first_trained])
    assert render_prompts([Case("p", "math", "What is 2 + 3?", "French", 0)], qwen3_tokenizer, cfg) == [prompt]
    assert render(question, qwen3_tokenizer, cfg.data.date) == prompt
    completion = qwen3_tokenizer.decode(row["input_ids"][first_trained:])  # what a model that learned it generates
    parsed = parse_output(completion, stopped=True, harmony=False)
    assert (parsed.analysis, parsed.final, parsed.parsed_ok, parsed.truncated) == ("Je calcule.", "5.", True, False)
