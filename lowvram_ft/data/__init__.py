"""Training data: read rows, recognise their shape, normalise them into Conversations, check them, mix
and split them, then render, mask and tokenize them (cached on disk).

The story of one run: `load_data(cfg)` → LoadedData (train / held-out examples + row statistics), then
`tokenize_data(examples, tokenizer, cfg)` → TokenizedData (a datasets.Dataset of input_ids + labels and
token statistics). `inspect(cfg)` is the `data` command: statistics, rendered examples with the trained
tokens highlighted, --export and --check.

One module per step, each importing only those listed before it:
- problems: DataError and the located one-line Problem every other module reports with.
- rows: row shapes (multilingual_thinking, messages, sharegpt, alpaca, text) → Conversation / PlainText.
- sources: local files, the shipped sample and Hub data sets → parsed rows, per data.dataset entry.
- mixing: data.weights / data.max_rows / data.eval_fraction → `load_data`.
- cache: the tokenized-data cache and its key.
- masking: one row → token ids + labels (Harmony or the tokenizer's chat template, data.train_on).
- tokenizing: all rows → `tokenize_data`, in worker processes, through the cache.
- command: the `data` command.

Every problem is one line `FILE:ROW:FIELD: what is wrong — what to do`, and every rule about a row is
checked while reading it, before any model or tokenizer loads.
"""
from __future__ import annotations

from .problems import DataError, Problem, location_key
from .rows import SHAPES, Example, PlainText, detect_shape
from .sources import SAMPLE_FILE, check_data, looks_like_hub_id, resolve_source, unclosed_quote_line
from .mixing import LoadedData, load_data, mix_sources, mixture_counts, split_heldout
from .masking import chat_messages, no_chat_template, reasoning_inline, render_chat
from .tokenizing import TokenizedData, processes_for, tokenize_data
from .command import describe_stats, export_jsonl, highlight_markup, inspect, runs

__all__ = [
    "DataError", "Problem", "location_key",
    "SHAPES", "Example", "PlainText", "detect_shape",
    "SAMPLE_FILE", "check_data", "looks_like_hub_id", "resolve_source", "unclosed_quote_line",
    "LoadedData", "load_data", "mix_sources", "mixture_counts", "split_heldout",
    "chat_messages", "no_chat_template", "reasoning_inline", "render_chat",
    "TokenizedData", "processes_for", "tokenize_data",
    "describe_stats", "export_jsonl", "highlight_markup", "inspect", "runs",
]
