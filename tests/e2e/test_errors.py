"""Bad input through the command line that loads Unsloth (about 10 s each): an unknown model id, a missing
local model folder, a tokenizer without a chat template. Each is exit 2, one `error:` line that says what,
where and what to do, no traceback, and no output folder left behind. The cases that stop before a model
is loaded: unit/test_errors.py.
"""
from __future__ import annotations

import json
import shutil

import pytest

from helpers import QUICK, error_lines, train

pytestmark = pytest.mark.slow


def test_unknown_model_id_offline_says_it_cannot_be_reached_and_how_to_use_a_local_copy(tmp_path):
    proc, out = train(tmp_path, *QUICK, "--model", "nobody-xyz/does-not-exist-7b")
    [line] = error_lines(proc)
    assert line.startswith("error: nobody-xyz/does-not-exist-7b: cannot load this model from the Hugging Face Hub")
    assert "couldn't connect" in line or "offline" in line.lower()
    assert "hf download nobody-xyz/does-not-exist-7b --local-dir DIR" in line and "pass --model DIR" in line
    assert not out.exists()


def test_missing_local_model_folder(tmp_path):
    proc, out = train(tmp_path, *QUICK, "--model", str(tmp_path / "models") + "/")
    [line] = error_lines(proc)
    assert "no such folder — check the path" in line
    assert not out.exists()


def test_tokenizer_without_a_chat_template(tmp_path):
    """A word-level tokenizer with neither Harmony's special tokens nor a chat template cannot render
    conversations: the run stops after loading, before training, and leaves nothing."""
    from lowvram_ft.embedded import embedded_model_dir

    folder = tmp_path / "plain-tokenizer"
    folder.mkdir()
    shutil.copy(embedded_model_dir() / "config.json", folder / "config.json")
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1}, "unk_token": "[UNK]"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "unk_token": "[UNK]", "eos_token": "[UNK]"}))
    proc, out = train(tmp_path, *QUICK, "--tokenizer", str(folder))
    [line] = error_lines(proc)
    assert "the tokenizer has no chat template, so conversations cannot be rendered" in line
    assert not out.exists()
