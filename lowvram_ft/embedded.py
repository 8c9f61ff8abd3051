"""The embedded default models: tiny random-weight models of two families, and their tokenizers, built offline.

- `embedded` (config.EMBEDDED_MODEL): GptOssForCausalLM — top-k routed experts, attention sinks,
  alternating sliding-window and full attention — with a compact Harmony tokenizer.
- `embedded-qwen3` (config.EMBEDDED_QWEN3_MODEL): Qwen3ForCausalLM — dense, GQA, RMSNorm on queries and
  keys, tied input/output embeddings as Qwen3-0.6B has them — with Qwen3's own chat template (reasoning
  in `<think>…</think>`, earlier turns shown without their reasoning), copied verbatim from Unsloth's
  registry (`unsloth.chat_templates.CHAT_TEMPLATES["qwen3"]`, checked by a test).

Both have two layers of width 128 (gpt-oss 1.1M parameters, most of them in idle experts; Qwen3 0.66M,
about the same compute per token), so the whole pipeline — Unsloth loading, LoRA, rendering,
evaluation, export — runs on two CPU cores in minutes. The tokenizer is a byte-level BPE trained on the
shipped sample data plus the family's special tokens. Both builds are deterministic: the same package
version builds the same files, byte for byte, into a cache folder named after the recipe's fingerprint.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import folders
from .config import EMBEDDED_MODEL, EMBEDDED_QWEN3_MODEL
from .harmony import chat_template
from .terminal import save_quietly

ASSETS = Path(__file__).parent / "assets"
TEMPLATES = ASSETS / "chat_templates"
QWEN3_TEMPLATE = TEMPLATES / "qwen3.jinja"  # Unsloth's CHAT_TEMPLATES["qwen3"], verbatim
HARMONY_SPECIAL_TOKENS = [
    "<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>",
    "<|start|>", "<|end|>", "<|message|>", "<|call|>",
]
VOCAB_SIZE = 2048
SEED = 1234
# Width, depth and attention heads the two tiny models share, so a training step costs about the same.
TINY_SHAPE = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
)
# Shape of the tiny gpt-oss: gpt-oss-20b's layout (GQA 8:1 → 2:1 here, 32 experts top-4 → 4 top-2,
# sliding window 128 → 64) scaled down until a training step takes milliseconds on a CPU.
MODEL_SHAPE = dict(
    TINY_SHAPE,
    intermediate_size=128,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=128,
    layer_types=["sliding_attention", "full_attention"],
    rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    tie_word_embeddings=False,
)
# Shape of the tiny Qwen3: Qwen3-0.6B's layout (GQA 16:8 → 4:2, MLP 3x hidden, tied embeddings, RoPE
# theta 1e6, every layer full attention) at the tiny gpt-oss's width and depth (0.66M parameters; a
# third layer would make each step ~60% slower).
QWEN3_SHAPE = dict(
    TINY_SHAPE,
    intermediate_size=384,
    rms_norm_eps=1e-6,
    attention_bias=False,
    use_sliding_window=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=True,
)


@dataclass(frozen=True)
class Recipe:
    """Everything one embedded model is built from; its fingerprint names the cache folder."""

    name: str                 # the model name users pass (--model / model.name)
    family: str               # cache folder prefix, and what the model card calls it
    architecture: str         # transformers class prefix: GptOss → GptOssConfig, GptOssForCausalLM
    model_type: str           # config.json's model_type
    shape: dict
    template: str             # "harmony" (harmony.py's renderer) or a file in assets/chat_templates
    special_tokens: list[str]  # special added tokens, first in the vocabulary (ids 0, 1, ...)
    bos: str | None
    eos: str                  # the tokenizer's end of turn: where generation stops
    pad: str
    stop_tokens: list[str]    # generation_config.eos_token_id, as the real model's
    sampling: dict            # generation_config's sampling defaults, as the real model's
    added_tokens: list[str] = field(default_factory=list)  # non-special added tokens (kept when decoding)
    version: str = "1"        # bump when the build code changes, so cached builds are rebuilt

    def chat_template(self) -> str:
        if self.template == "harmony":
            return chat_template()
        return (TEMPLATES / self.template).read_text(encoding="utf-8")


RECIPES = {
    EMBEDDED_MODEL: Recipe(
        name=EMBEDDED_MODEL, family="gpt-oss", architecture="GptOss", model_type="gpt_oss", shape=MODEL_SHAPE,
        template="harmony",
        special_tokens=HARMONY_SPECIAL_TOKENS, bos="<|startoftext|>", eos="<|return|>", pad="<|endoftext|>",
        # gpt-oss stops on <|return|> (end of answer) and <|call|> (tool call).
        stop_tokens=["<|return|>", "<|call|>"], sampling=dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)),
    EMBEDDED_QWEN3_MODEL: Recipe(
        name=EMBEDDED_QWEN3_MODEL, family="qwen3", architecture="Qwen3", model_type="qwen3", shape=QWEN3_SHAPE,
        template=QWEN3_TEMPLATE.name,
        # Qwen3's order and roles: <|endoftext|> pads (and is the config's bos), <|im_end|> ends a turn.
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
        pad="<|endoftext|>", stop_tokens=["<|im_end|>", "<|endoftext|>"],
        sampling=dict(do_sample=True, temperature=0.6, top_p=0.95, top_k=20),
        # Tags the template writes; added but not special, as in Qwen3's tokenizer (decoding keeps them).
        added_tokens=["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]),
}


def recipe_for(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"{name!r} is not an embedded model; expected one of {', '.join(RECIPES)}")
    return RECIPES[name]


def embedded_model_dir(name: str = EMBEDDED_MODEL, cache_root: str | Path | None = None) -> Path:
    """The folder holding embedded model `name` and its tokenizer, built on first use (atomically)."""
    recipe = recipe_for(name)
    root = Path(cache_root) if cache_root else folders.cache_root()
    target = root / f"embedded-{recipe.family}-{recipe_fingerprint(name)}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    return folders.build_staged(target, lambda staging: build_embedded(staging, name), ".embedded-")


def recipe_fingerprint(name: str = EMBEDDED_MODEL) -> str:
    """Changes whenever the recipe (shape, tokens, seed, vocabulary size), the tokenizer corpus or the
    chat template change."""
    recipe = recipe_for(name)
    h = hashlib.sha256()
    h.update(json.dumps([asdict(recipe), VOCAB_SIZE, SEED], sort_keys=True).encode())
    h.update(recipe.chat_template().encode())
    for path in corpus_files():
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def planner_config(name: str) -> dict:
    """The config.json the planner sizes an embedded model from, without building it (vocabulary: the
    BPE size plus the added tokens)."""
    recipe = recipe_for(name)
    return {"model_type": recipe.model_type, "vocab_size": VOCAB_SIZE + len(recipe.added_tokens), **recipe.shape}


def describe(name: str) -> str:
    """One line for logs and model cards."""
    return (f"the embedded tiny {recipe_for(name).family}-shaped model (random weights, built offline by "
            "lowvram_ft; a test model, not for use)")


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


def build_tokenizer(out_dir: Path, recipe: Recipe = RECIPES[EMBEDDED_MODEL]):
    """Byte-level BPE with the recipe's special and added tokens and its chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=recipe.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in recipe.added_tokens])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=recipe.bos,
        eos_token=recipe.eos,
        pad_token=recipe.pad,
        model_max_length=recipe.shape["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = recipe.chat_template()
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_model(out_dir: Path, tokenizer, recipe: Recipe = RECIPES[EMBEDDED_MODEL]) -> None:
    """The recipe's architecture with seeded random weights, saved as safetensors in float32."""
    import torch
    import transformers

    ids = tokenizer.convert_tokens_to_ids
    config = getattr(transformers, f"{recipe.architecture}Config")(
        vocab_size=len(tokenizer),
        # Qwen3's config.json names <|endoftext|> as bos although its tokenizer adds none.
        bos_token_id=ids(recipe.bos or recipe.pad),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **recipe.shape,
    )
    torch.manual_seed(SEED)
    model = getattr(transformers, f"{recipe.architecture}ForCausalLM")(config).to(torch.float32)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=[ids(t) for t in recipe.stop_tokens],
        pad_token_id=tokenizer.pad_token_id, **recipe.sampling,
    )
    save_quietly(model, out_dir)


def build_embedded(out_dir: Path, name: str = EMBEDDED_MODEL) -> None:
    recipe = recipe_for(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, recipe)
    build_model(out_dir, tokenizer, recipe)
    (out_dir / "lowvram_ft_embedded.json").write_text(json.dumps(
        {"name": name, "recipe": recipe_fingerprint(name), "shape": recipe.shape, "vocab_size": len(tokenizer),
         "seed": SEED}, indent=2, sort_keys=True))
