"""The bench's training rows: the shipped sample conversations (or filler text) tokenized into one
stream and cut into rows of exactly seq_len tokens, every token trained, identical for both stacks."""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

from ..data import SAMPLE_FILE
from .matrix import BenchError, Case


def fixed_length_rows(stream: Sequence[int], seq_len: int, rows: int, vocab_size: int) -> list[list[int]]:
    """`rows` rows of exactly seq_len ids, cut from the token stream read cyclically; ids folded into
    the vocabulary so that a tokenizer larger than the model cannot index past its embedding."""
    if not stream:
        raise BenchError("empty token stream: the benchmark text produced no tokens")
    n = len(stream)
    return [[int(stream[(r * seq_len + i) % n]) % vocab_size for i in range(seq_len)] for r in range(rows)]


def benchmark_dataset(case: Case, tokenizer, model):
    """(Dataset of input_ids + labels, trained tokens per optimizer step, digest of the ids): rows of
    exactly seq_len tokens, every token trained, so every step trains the same number of tokens."""
    from datasets import Dataset

    rows = fixed_length_rows(benchmark_tokens(tokenizer), case.seq_len, case.steps * case.batch_size * case.grad_accum,
                             int(model.config.vocab_size))
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
    return Dataset.from_dict({"input_ids": rows, "labels": rows}), case.batch_size * case.grad_accum * case.seq_len, digest


def benchmark_tokens(tokenizer, minimum: int = 4096) -> list[int]:
    """A token stream: the shipped sample rows rendered with the tokenizer's chat template (plain text
    when it has none), or generated filler text when the sample file is absent."""
    texts = []
    for conversation in sample_conversations():
        try:
            texts.append(tokenizer.apply_chat_template(conversation["messages"], tokenize=False,
                                                       reasoning_language=conversation["language"]))
        except Exception:  # noqa: BLE001 — no (Harmony) chat template: the text alone
            texts.append("\n\n".join(m["thinking"] or m["content"] for m in conversation["messages"]))
    if not texts:
        texts = filler_texts()
    stream: list[int] = []
    while len(stream) < minimum:
        for text in texts:
            stream += tokenizer(text, add_special_tokens=False)["input_ids"]
    return stream


def sample_conversations() -> list[dict]:
    if not SAMPLE_FILE.is_file():
        return []
    conversations = []
    for line in SAMPLE_FILE.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("user") and row.get("final"):
            conversations.append({"language": row.get("reasoning_language"), "messages": [
                {"role": "developer", "content": row.get("developer") or "", "thinking": None},
                {"role": "user", "content": row["user"], "thinking": None},
                {"role": "assistant", "content": row["final"], "thinking": row.get("analysis")}]})
    return conversations


def filler_texts() -> list[str]:
    """Deterministic English-like text (used only when the sample data is not shipped)."""
    words = ("the model reads each token and predicts the next one while the optimizer updates the low "
             "rank adapters of every attention and expert projection in the network").split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(200)) + f" {i}." for i in range(32)]
