"""The embedded default model: a tiny GptOssForCausalLM and a compact Harmony tokenizer, built offline.

Same architecture as gpt-oss (top-k routed experts, attention sinks, alternating sliding-window and
full attention, YaRN-free RoPE), about a million parameters, so the whole pipeline — Unsloth loading,
LoRA on attention and experts, Harmony rendering, evaluation — runs on two CPU cores in minutes.
The tokenizer is a byte-level BPE trained on the shipped sample data plus the Harmony special
tokens. Both are deterministic: the same package version builds the same files, byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
HARMONY_SPECIAL_TOKENS = [
    "<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>",
    "<|start|>", "<|end|>", "<|message|>", "<|call|>",
]
VOCAB_SIZE = 2048
SEED = 1234
# Shape of the tiny model: gpt-oss-20b's layout (GQA 8:1 → 2:1 here, 32 experts top-4 → 4 top-2,
# sliding window 128 → 64) scaled down until a training step takes milliseconds on a CPU.
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=128,
    layer_types=["sliding_attention", "full_attention"],
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    tie_word_embeddings=False,
)
BUILD_VERSION = "1"  # bump when the recipe changes, so cached builds are rebuilt


def embedded_model_dir(cache_root: str | Path | None = None) -> Path:
    """The folder holding the embedded model and tokenizer, built on first use (atomically)."""
    root = Path(cache_root or os.environ.get("LOWVRAM_FT_CACHE", Path.home() / ".cache" / "lowvram_ft"))
    target = root / f"embedded-gpt-oss-{recipe_fingerprint()}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".embedded-", dir=root))
    try:
        build_embedded(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def recipe_fingerprint() -> str:
    """Changes whenever the shape, the seed, the tokenizer corpus or the chat template change."""
    from .harmony import chat_template

    h = hashlib.sha256()
    h.update(json.dumps([BUILD_VERSION, VOCAB_SIZE, SEED, MODEL_SHAPE], sort_keys=True).encode())
    h.update(chat_template().encode())
    for path in corpus_files():
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def corpus_files() -> list[Path]:
    return [ASSETS / "sample_train.jsonl"]


def corpus_texts() -> list[str]:
    """Every string of the sample data, in file order: what the BPE merges are learned from."""
    texts = []
    for path in corpus_files():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts.extend(str(row[k]) for k in ("developer", "user", "analysis", "final") if row.get(k))
    # The zero-shot evaluation languages must still encode as bytes; a few of their characters help.
    texts.append("推理语言 中文 한국어 추론 언어 日本語 推論")
    return texts


def build_tokenizer(out_dir: Path):
    """Byte-level BPE with the Harmony special tokens and the Harmony chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .harmony import chat_template

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=HARMONY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template()
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_model(out_dir: Path, tokenizer) -> None:
    """GptOssForCausalLM with seeded random weights, saved as safetensors in float32."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM, GenerationConfig

    config = GptOssConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    torch.manual_seed(SEED)
    model = GptOssForCausalLM(config).to(torch.float32)
    # gpt-oss stops on <|return|> (end of answer) and <|call|> (tool call), as its generation config does.
    stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<|return|>", "<|call|>")]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
    )
    model.save_pretrained(out_dir, safe_serialization=True)


def build_embedded(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    build_model(out_dir, tokenizer)
    (out_dir / "lowvram_ft_embedded.json").write_text(json.dumps(
        {"recipe": recipe_fingerprint(), "shape": MODEL_SHAPE, "vocab_size": len(tokenizer), "seed": SEED},
        indent=2, sort_keys=True))
