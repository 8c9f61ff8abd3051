"""Tokenizing: Examples into a datasets.Dataset of input_ids + labels (batched, in worker processes,
cached on disk), with token statistics.

Packing (data.packing) is left to TRL: SFTConfig(packing=True) packs our input_ids/labels rows with
best-fit decreasing and emits position_ids that restart at each row, so under flash/flex attention rows
never attend to each other. Nothing here may merge rows or add columns TRL would pack wrongly: the
dataset holds exactly input_ids and labels, one example per row, each within model.max_seq_length.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..conversation import Conversation, Message
from ..harmony import IGNORE_INDEX
from .cache import cache_key, cache_root, progress_bars, read_cache, write_cache
from .masking import choose_renderer, fit_length, no_chat_template, reasoning_inline, render_ids
from .problems import DataError, first_line, location_key
from .rows import Example, PlainText

# With data.num_proc unset, each worker process gets at least this much text (~2M tokens, ~5 s of work
# for one process with o200k_harmony): starting a worker (pickling the 12 MB tokenizer, unpickling it,
# writing and joining shards) took 1.5-3 s per worker here, so smaller shares cost more than they save.
MIN_CHARS_PER_PROCESS = 8_000_000


@dataclass(frozen=True)
class TokenizedData:
    dataset: Any  # datasets.Dataset with exactly input_ids and labels (-100 where not trained)
    stats: dict  # rows, min/median/max_tokens, trained_share, truncated, dropped, cache, cache_path, ...
    kept: list[int]  # for each dataset row, its index in the items given to tokenize_data


def tokenize_data(items: list, tokenizer, cfg: Config) -> TokenizedData:
    """Render, mask and tokenize Examples (or bare Conversations / PlainTexts) into input_ids + labels.

    Harmony tokenizers render through harmony.render_training, others through their chat template;
    data.train_on picks the trained tokens, data.overlength handles rows over model.max_seq_length.
    Cached on disk under data.cache_dir, keyed by the rendered content, the tokenizer and the settings;
    stats['cache'] says 'hit' or 'miss'. Batched, in data.num_proc processes (unset: one per CPU core up
    to 8, each with at least MIN_CHARS_PER_PROCESS characters of rows).
    """
    started = time.perf_counter()
    examples = [x if isinstance(x, Example) else Example(x, f"item {i + 1}", "", "") for i, x in enumerate(items)]
    settings = render_settings(tokenizer, cfg, examples)
    records = [encode_item(e.item) for e in examples]
    path = cache_root(cfg) / cache_key(records, tokenizer, settings)
    cached = read_cache(path) if records else None
    if cached is not None:
        dataset, stats, kept = cached
        for build_only in ("num_proc", "rows_per_s"):
            stats.pop(build_only, None)
        stats.update(cache="hit", cache_path=str(path), seconds=round(time.perf_counter() - started, 3))
        return TokenizedData(dataset, stats, kept)
    num_proc = processes_for(len(records), sum(map(len, records)), cfg.data.num_proc)
    table = run_tokenizer(records, tokenizer, settings, num_proc, path.name)
    kept, stats = summarise(table, examples, settings, cfg)
    dataset = table.select(kept).select_columns(["input_ids", "labels"])
    seconds = time.perf_counter() - started
    stats.update(num_proc=num_proc, seconds=round(seconds, 3), rows_per_s=round(len(records) / max(seconds, 1e-9), 1))
    # datasets cannot load back a saved dataset of no rows, so an empty one is never cached.
    dataset, written = write_cache(path, dataset, stats, kept) if kept else (dataset, False)
    stats.update(cache="miss", cache_path=str(path) if written else None)
    return TokenizedData(dataset, stats, kept)


def render_settings(tokenizer, cfg: Config, examples: list[Example]) -> dict:
    """Everything the worker processes need besides the tokenizer, as plain values."""
    renderer = choose_renderer(tokenizer)
    if renderer is None and any(isinstance(e.item, Conversation) for e in examples):
        raise DataError([f"{no_chat_template(tokenizer)}; for plain text set data.format=text"])
    text_end = tokenizer.convert_tokens_to_ids("<|endoftext|>") if renderer == "harmony" else tokenizer.eos_token_id
    return {
        "renderer": renderer or "text",
        # where a chat template puts the reasoning: its own field, or inline (masking.THINK_OPEN)
        "reasoning": ("inline" if reasoning_inline(tokenizer) else "template") if renderer == "chat_template" else None,
        "train_on": cfg.data.train_on,
        "reasoning_effort": cfg.data.reasoning_effort,
        "date": cfg.data.date,
        "max_length": cfg.model.max_seq_length,
        "overlength": cfg.data.overlength,
        "on_invalid": cfg.data.on_invalid,  # decides whether refused rows are dropped: part of the cache key
        "text_end_id": text_end,
    }


def encode_item(item: Conversation | PlainText) -> str:
    """A row as compact JSON: what the worker processes decode, and what the cache key hashes."""
    if isinstance(item, PlainText):
        return json.dumps({"text": item.text}, ensure_ascii=False)
    return json.dumps({"messages": [[m.role, m.content, m.thinking] for m in item.messages],
                       "language": item.reasoning_language, "effort": item.reasoning_effort}, ensure_ascii=False)


def decode_item(record: str) -> Conversation | PlainText:
    value = json.loads(record)
    if "text" in value:
        return PlainText(value["text"])
    return Conversation(tuple(Message(*m) for m in value["messages"]), value["language"], value["effort"])


def processes_for(rows: int, characters: int, configured: int | None) -> int:
    """data.num_proc as given (never more than the rows); unset, one per core up to 8 with enough text each."""
    if configured:
        return max(1, min(configured, rows))
    return max(1, min(os.cpu_count() or 1, 8, characters // MIN_CHARS_PER_PROCESS))


def run_tokenizer(records: list[str], tokenizer, settings: dict, num_proc: int, fingerprint: str):
    """datasets.map over the records, batched, in num_proc processes: one output row per input row."""
    import datasets

    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "status": datasets.Value("string"),
        "full_tokens": datasets.Value("int32"),
        "trained_tokens": datasets.Value("int32"),
        "reasoning_dropped": datasets.Value("bool"),
        "untrained_turns": datasets.Value("int32"),
    })
    if not records:  # map() on no rows would not apply the features
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    with progress_bars(len(records) >= 20_000):  # a bar only where tokenizing takes a while
        table = datasets.Dataset.from_dict({"row": records})
        return table.map(tokenize_batch, batched=True, batch_size=64, num_proc=num_proc if num_proc > 1 else None,
                         fn_kwargs={"tokenizer": tokenizer, "settings": settings}, remove_columns=["row"],
                         features=features, new_fingerprint=fingerprint, desc="Tokenizing")


def tokenize_batch(batch: dict, tokenizer, settings: dict) -> dict:
    """The datasets.map function (module level so worker processes can unpickle it)."""
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "status", "full_tokens", "trained_tokens",
                                            "reasoning_dropped", "untrained_turns")}
    for record in batch["row"]:
        notes = {"reasoning_dropped": False, "untrained_turns": 0}
        try:
            ids, labels = render_ids(decode_item(record), tokenizer, settings, notes)
        except Exception as error:  # noqa: BLE001 — a row the renderer refuses becomes a located problem
            ids, labels, status = [], [], f"render:{first_line(error)}"
        else:
            status = "ok"
        full = len(ids)
        if status == "ok":
            ids, labels, status = fit_length(ids, labels, settings["max_length"], settings["overlength"])
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["status"].append(status)
        out["full_tokens"].append(full)
        out["trained_tokens"].append(sum(label != IGNORE_INDEX for label in labels))
        out["reasoning_dropped"].append(notes["reasoning_dropped"])
        out["untrained_turns"].append(notes["untrained_turns"])
    return out


def summarise(table, examples: list[Example], settings: dict, cfg: Config) -> tuple[list[int], dict]:
    """Kept row indices and token statistics; DataError for rows over the limit (overlength=error) or
    rows the renderer refused (on_invalid=error)."""
    columns = table.select_columns(["status", "full_tokens", "trained_tokens", "reasoning_dropped",
                                    "untrained_turns"]).to_dict()
    statuses, full, limit = columns["status"], columns["full_tokens"], settings["max_length"]
    in_file_order = sorted(range(len(statuses)), key=lambda i: location_key(examples[i].where))
    over = [f"{examples[i].where}: {full[i]} tokens, more than model.max_seq_length={limit} — raise "
            "model.max_seq_length, or set data.overlength=truncate or drop"
            for i in in_file_order if statuses[i] == "overlength"]
    if over:
        raise DataError(over)
    refused = [f"{examples[i].where}: cannot be rendered by the {settings['renderer']} renderer "
               f"({statuses[i].removeprefix('render:')}) — fix the row or set data.on_invalid=skip"
               for i in in_file_order if statuses[i].startswith("render:")]
    if refused and cfg.data.on_invalid == "error":
        raise DataError(refused)
    kept = [i for i, s in enumerate(statuses) if s in ("ok", "truncated")]
    dropped = Counter(s.removeprefix("dropped:") if s.startswith("dropped:") else "cannot be rendered"
                      for s in statuses if s not in ("ok", "truncated"))
    if statuses and not kept:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in dropped.items())
        raise DataError([f"data: no row left after tokenizing ({reasons}) — raise model.max_seq_length "
                         "or fix the rows (python -m lowvram_ft data --check)"])
    lengths = [min(full[i], limit) for i in kept]
    trained = sum(columns["trained_tokens"][i] for i in kept)
    return kept, {
        "rows": len(kept),
        "renderer": settings["renderer"],
        "train_on": settings["train_on"],
        "min_tokens": min(lengths, default=0),
        "median_tokens": int(statistics.median(lengths)) if lengths else 0,
        "max_tokens": max(lengths, default=0),
        "tokens": sum(lengths),
        "trained_tokens": trained,
        "trained_share": round(trained / max(sum(lengths), 1), 4),
        "truncated": statuses.count("truncated"),
        "dropped": dict(dropped),
        "dropped_rows": sum(dropped.values()),
        "reasoning_dropped_rows": sum(columns["reasoning_dropped"]),
        "untrained_turns": sum(columns["untrained_turns"]),
    }
