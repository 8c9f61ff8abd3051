"""The offline gpt-oss tokenizer against OpenAI's own encoders (openai-harmony and tiktoken).

The tokenizer is built once into the default disk cache (about 12 s the first time), then loaded from it.
"""
from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lowvram_ft.gptoss_tokenizer import (
    O200K_BASE_SHA256,
    SPECIAL_TOKENS,
    harmony_encoding,
    load_gptoss_tokenizer,
    o200k_base_file,
    use_offline_vocabulary,
)

HARMONY_IDS = {
    "<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
    "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012,
}

TEXTS = [
    "Hello, world!",
    "The quick brown fox doesn't jump; it'LL wait. I'm sure they've gone.",
    "Le raisonnement doit être en français : où est l'élève ? Ça dépend, déjà vu, naïve cœur.",
    "推論は日本語で行ってください。東京タワーの高さは333メートルです。",
    "请用中文进行推理。北京是中国的首都。",
    "한국어로 추론하세요. 서울은 대한민국의 수도입니다.",
    "يجب أن يكون التفكير باللغة العربية.",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷🇯🇵 ✔️",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\nclass A:\n\tpass\n",
    "   leading and trailing spaces   ",
    "tabs\t\tand\r\nwindows\r\nlines\n\n\n\nand        long   runs\u00a0nbsp\u3000ideographic",
    "Numbers: 0 7 42 123 1234 12345 3.14159 1,000,000 -17 2e10 0x1F 2025-08-05",
    "MiXeD CaSe ALLCAPS camelCaseWord snake_case_word kebab-case-word",
    "https://example.com/path?q=1&r=%20 user@example.org",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tokenizer(gptoss_tokenizer):
    return gptoss_tokenizer


@pytest.fixture(scope="module")
def harmony(harmony_reference):
    return harmony_reference


@pytest.fixture(scope="module")
def tiktoken_harmony():
    use_offline_vocabulary()
    import tiktoken

    return tiktoken.get_encoding("o200k_harmony")


def hf_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_openai_encoders(tokenizer, harmony, tiktoken_harmony, text):
    ids = hf_ids(tokenizer, text)
    assert ids == harmony.encode(text)
    assert ids == tiktoken_harmony.encode(text)


def test_ids_match_on_random_mixed_scripts(tokenizer, harmony):
    rng = random.Random(1234)
    ranges = [(0x20, 0x7F), (0xA0, 0x250), (0x300, 0x370), (0x600, 0x650), (0x900, 0x950),
              (0x3040, 0x3100), (0x4E00, 0x4E80), (0xAC00, 0xAC40), (0x1F600, 0x1F650)]
    alphabet = [chr(c) for lo, hi in ranges for c in range(lo, hi)] + ["\n", "\r\n", "\t", "  ", "\u200d", "'s"]
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert hf_ids(tokenizer, text) == harmony.encode(text), repr(text)


@pytest.mark.parametrize("token", SPECIAL_TOKENS[:-1])
def test_special_tokens_match_openai_harmony(tokenizer, harmony, token):
    ids = hf_ids(tokenizer, token)
    assert ids == harmony.encode(token, allowed_special="all")
    assert len(ids) == 1
    assert HARMONY_IDS.get(token, ids[0]) == ids[0]


def test_named_harmony_ids(tokenizer):
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in HARMONY_IDS} == HARMONY_IDS


def test_vocabulary_is_the_one_openai_gpt_oss_ships(tokenizer, harmony):
    # The HF gpt-oss tokenizer: 199,998 o200k_base tokens + 21 added (199998-200018), ending with
    # o200k_base's <|endofprompt|>. openai-harmony names 200018 <|reserved_200018|> and also knows
    # reserved tokens up to 201088; the model's embedding has 201,088 rows.
    assert len(tokenizer) == 200_019
    assert tokenizer.vocab_size == 199_998
    assert tokenizer.convert_tokens_to_ids("<|endofprompt|>") == 200_018
    assert harmony.encode("<|reserved_200018|>", allowed_special="all") == [200_018]
    assert len(hf_ids(tokenizer, "<|reserved_200500|>")) > 1


def test_bos_eos_pad_follow_the_model_config(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|startoftext|>", "<|return|>", "<|endoftext|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (199998, 200002, 199999)
    assert hf_ids(tokenizer, "Hi") == tokenizer("Hi")["input_ids"]  # no BOS/EOS added by default


@pytest.mark.parametrize("text", TEXTS + [
    "<|start|>user<|message|>Bonjour !<|end|><|start|>assistant<|channel|>final<|message|>Salut<|return|>",
])
def test_decode_round_trips(tokenizer, text):
    assert tokenizer.decode(hf_ids(tokenizer, text)) == text


def test_vocabulary_file_is_verified_and_repaired(tmp_path):
    damaged = tmp_path / "encodings" / "o200k_base.tiktoken"
    damaged.parent.mkdir()
    damaged.write_bytes(b"not a vocabulary")
    assert o200k_base_file(tmp_path) == damaged
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == O200K_BASE_SHA256


def test_second_load_comes_from_the_cache(tokenizer, monkeypatch):
    """Nothing is rebuilt: the tokenizer is read from the folder the first load saved (the session's
    `tokenizer` came from that folder too, so reading it again would only repeat a 200k-token parse)."""
    import transformers

    import lowvram_ft.gptoss_tokenizer as module

    def refuse(root):
        raise AssertionError("rebuilt instead of loading the cache")

    class Read:
        chat_template = None

        @classmethod
        def from_pretrained(cls, path):
            cls.path = path
            return cls()

    monkeypatch.setattr(module, "_build_tokenizer", refuse)
    monkeypatch.setattr(transformers, "PreTrainedTokenizerFast", Read)
    load_gptoss_tokenizer()
    assert tokenizer.name_or_path == Read.path and (Path(Read.path) / "tokenizer.json").is_file()


def test_missing_openai_harmony_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai_harmony", None)
    with pytest.raises(ImportError, match=r"openai_harmony is not installed — pip install 'lowvram_ft\[harmony\]'"):
        harmony_encoding.__wrapped__()


def test_importing_these_modules_loads_no_heavy_package():
    code = ("import sys, lowvram_ft.harmony, lowvram_ft.gptoss_tokenizer; "
            "print(sorted({'torch', 'transformers', 'tiktoken', 'openai_harmony'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
