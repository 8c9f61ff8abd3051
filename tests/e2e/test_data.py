"""lowvram_ft.data against the real o200k_harmony tokenizer and against Unsloth itself (its chat template
registry, standardize_sharegpt, a template from its registry), which a child process imports (about 20 s).
Shapes, validation, masks, cache and export with tiny tokenizers: unit/test_data.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import (MT, SHAREGPT_ROWS, SHAREGPT_STANDARD, build_tokenizer, by_row, config, our_sharegpt,
                     rows_by_where, tokenize, trained_text)
from lowvram_ft import data
from lowvram_ft.config import CHAT_TEMPLATE_NAMES
from lowvram_ft.conversation import Conversation, Message
from lowvram_ft.harmony import HarmonyOptions, render_training

pytestmark = pytest.mark.slow


def test_real_gptoss_tokenizer_masks(tmp_path):
    from lowvram_ft.gptoss_tokenizer import load_gptoss_tokenizer

    tok = load_gptoss_tokenizer()
    loaded, tokenized = tokenize(tmp_path, tok, MT)
    conv = by_row(loaded)[2]
    row = rows_by_where(loaded, tokenized)[f"{MT}:2"]
    full = "".join(text for text, _ in render_training(conv, HarmonyOptions()))
    assert row["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    trained = trained_text(tok, row["input_ids"], row["labels"])
    assert trained == ["<|channel|>analysis<|message|>Der Nutzer fragt nach einer Grundfarbe. Rot ist eine.<|end|>"
                       "<|start|>assistant<|channel|>final<|message|>Red.<|return|>"]
    assert row["input_ids"][-1] == 200002  # <|return|>


UNSLOTH_CHECKS = r"""
import json, sys
from lowvram_ft.model import import_unsloth, with_chat_template
import_unsloth()  # first: it patches transformers
import datasets
from transformers import AutoTokenizer
from unsloth.chat_templates import CHAT_TEMPLATES, standardize_sharegpt

report = {"registry": list(CHAT_TEMPLATES)}
report["standardized"] = [[row["conversations"] for row in standardize_sharegpt(datasets.Dataset.from_list(rows))]
                          for rows in json.loads(sys.argv[1])]
with_chat_template(AutoTokenizer.from_pretrained(sys.argv[2]), "chatml").save_pretrained(sys.argv[3])
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def unsloth_side(tmp_path_factory) -> dict:
    """One child process that imports unsloth (about 20 s here) and runs every Unsloth-side step: its
    template registry, standardize_sharegpt on SHAREGPT_ROWS, and data.chat_template=chatml applied
    through our model.with_chat_template to a tokenizer that has no template (saved for the parent)."""
    folder = tmp_path_factory.mktemp("unsloth")
    build_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>").save_pretrained(
        folder / "plain")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}
    out = subprocess.run([sys.executable, "-c", UNSLOTH_CHECKS, json.dumps(SHAREGPT_ROWS), str(folder / "plain"),
                          str(folder / "chatml")], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("REPORT "))
    return {**json.loads(line.removeprefix("REPORT ")), "chatml": folder / "chatml"}


def test_chat_template_names_are_unsloths_registry(unsloth_side):
    registry = unsloth_side["registry"]
    assert len(set(CHAT_TEMPLATE_NAMES)) == len(CHAT_TEMPLATE_NAMES)
    assert set(CHAT_TEMPLATE_NAMES) == set(registry) - {"gpt-oss", "gptoss"}  # gpt-oss renders Harmony


def test_sharegpt_normalisation_agrees_with_unsloths_standardize_sharegpt(unsloth_side):
    theirs = [[[(m["role"], m["content"]) for m in conversation] for conversation in standardized]
              for standardized in unsloth_side["standardized"]]
    assert theirs == [our_sharegpt(rows) for rows in SHAREGPT_ROWS] == SHAREGPT_STANDARD


def test_a_template_from_unsloths_registry_renders_and_masks(unsloth_side, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(unsloth_side["chatml"])
    conversation = Conversation((Message("system", "Be kind."), Message("user", "Hello"),
                                 Message("assistant", "Hi there!")))
    cfg = config(tmp_path, "sample", chat_template="chatml")
    row = data.tokenize_data([conversation], tokenizer, cfg).dataset[0]
    messages = data.chat_messages(conversation)
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert trained_text(tokenizer, row["input_ids"], row["labels"]) == ["Hi there!<|im_end|>"]
