"""The `data` command: statistics, rendered examples with the trained tokens highlighted, --export and
--check."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .. import model as models
from ..config import Config
from ..harmony import IGNORE_INDEX
from .mixing import load_data
from .problems import MAX_LISTED, DataError, location_key
from .rows import Example
from .sources import check_data
from ..terminal import say
from .tokenizing import tokenize_data


def inspect(cfg: Config, show: int = 3, export: str | None = None, check: bool = False, console=None) -> int:
    """The `data` command. check=True: validate every row, print every problem (first 20, then a
    count), exit code 2 if any. Otherwise: statistics, `show` rendered examples with trained tokens in
    bold green and masked ones dim, and with `export` every rendered train row as JSON Lines, in the
    order of data.dataset, each naming the FILE:ROW it came from."""
    from rich.console import Console

    console = console or Console(highlight=False)
    if check:
        return print_check(cfg, console)
    if export:
        check_export_target(export)  # before the tokenizer (or a model) loads
    loaded = load_data(cfg)
    tokenizer = models.load_tokenizer_for(cfg)
    tokenized = tokenize_data(loaded.train, tokenizer, cfg)
    for line in describe_stats(loaded.stats, tokenized.stats):
        say(console, line)
    for n in range(min(show, len(tokenized.kept))):
        row = tokenized.dataset[n]
        trained = sum(label != IGNORE_INDEX for label in row["labels"])
        where = loaded.train[tokenized.kept[n]].where
        size = len(row["input_ids"])
        say(console, f"\n── example {n + 1}: {where} ({size} tokens, {trained} trained: bold green; "
                     "masked: dim) ──")
        console.print(highlight_markup(row["input_ids"], row["labels"], tokenizer), highlight=False, soft_wrap=True)
    if export:
        kept = [loaded.train[i] for i in tokenized.kept]
        order = input_order(kept, list(cfg.data.dataset))  # training order is shuffled; the file keeps the input's
        count = export_jsonl(tokenized.dataset.select(order), [kept[n].where for n in order], tokenizer, export)
        say(console, f"\nexported {count} rendered rows to {export} (in data.dataset order; source = FILE:ROW)")
    return 0


def input_order(examples: list[Example], entries: list[str]) -> list[int]:
    """Indices of the examples sorted as their rows stand in data.dataset: entry by entry, row by row."""
    rank = {entry: entries.index(entry) for entry in entries}
    return sorted(range(len(examples)), key=lambda i: (rank.get(examples[i].source, len(rank)),
                                                       location_key(examples[i].where)))


def print_check(cfg: Config, console) -> int:
    problems = check_data(cfg)
    for line in problems[:MAX_LISTED]:
        say(console, line)
    if len(problems) > MAX_LISTED:
        say(console, f"... and {len(problems) - MAX_LISTED} more")
    if problems:
        say(console, f"{len(problems)} problem{'s' if len(problems) != 1 else ''} found")
        return 2
    say(console, f"ok: every row of {', '.join(cfg.data.dataset)} is valid")
    return 0


def describe_stats(rows: dict, tokens: dict) -> list[str]:
    """The statistics block of the `data` command, one line per topic (no token lines without tokens)."""
    def counts(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], str(kv[0])))) or "none"

    lines = [f"source   {entry}: {s['valid']} valid of {s['rows']} read ({s['shape'] or '?'}), {s['used']} used"
             for entry, s in rows["sources"].items()]
    lines += [
        f"rows     {rows['train_rows']} train, {rows['heldout_rows']} held out; mixing: {rows['mixing']}",
        f"shapes   {counts(rows['shapes'])}",
        f"reasoning languages (train rows with reasoning; none = without)  {counts(rows['reasoning_languages'])}",
        f"skipped  {rows['skipped_rows']} rows" + (f" ({counts(rows['skipped'])})" if rows["skipped"] else ""),
    ]
    if not tokens:  # GRPO's prompts are not tokenized as training rows (train.grpo.inspect_prompts)
        return lines
    lines += [
        f"tokens   per row min {tokens['min_tokens']} / median {tokens['median_tokens']} / max {tokens['max_tokens']}; "
        f"trained share {100 * tokens['trained_share']:.1f}% ({tokens['trained_tokens']} of {tokens['tokens']}, "
        f"renderer {tokens['renderer']}, train_on={tokens['train_on']})",
        f"length   {tokens['truncated']} truncated, {tokens['dropped_rows']} dropped"
        + (f" ({counts(tokens['dropped'])})" if tokens["dropped"] else ""),
        f"cache    {tokens['cache']}" + (f" {tokens['cache_path']}" if tokens.get("cache_path") else ""),
    ]
    if tokens.get("reasoning_dropped_rows"):
        lines.append(f"warning  the chat template dropped the reasoning of {tokens['reasoning_dropped_rows']} rows "
                     "(it has no reasoning_content/thinking field): only their answers are trained")
    if tokens.get("untrained_turns"):
        lines.append(f"warning  {tokens['untrained_turns']} earlier assistant turns could not be located in the "
                     "template's output and are not trained (the template rewrites the history)")
    return lines


def highlight_markup(ids: list[int], labels: list[int], tokenizer) -> str:
    """Rich markup of a rendered row: trained runs bold green, masked runs dim."""
    from rich.markup import escape

    parts = []
    for trained, run in runs(ids, labels):
        text = escape(tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False))
        parts.append(f"[bold green]{text}[/]" if trained else f"[dim]{text}[/]")
    return "".join(parts)


def runs(ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive ids grouped by whether they are trained."""
    out: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if out and out[-1][0] == trained:
            out[-1][1].append(token)
        else:
            out.append((trained, [token]))
    return out


def check_export_target(path: str) -> None:
    """DataError, before any work, for an --export path that cannot become a file."""
    target = Path(path)
    if target.is_dir():
        raise DataError([f"{path}: --export names a folder — give a file path, e.g. {target / 'rendered.jsonl'}"])
    folder = next((p for p in target.parents if p.exists()), Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise DataError([f"{path}: cannot create the export file ({folder} is not a writable folder) — "
                         "choose another --export path"])


def export_jsonl(dataset, sources: list[str], tokenizer, path: str) -> int:
    """Every row as {source, text, input_ids, labels} (source = the FILE:ROW it was rendered from, text =
    the decoded ids), written atomically; a failure is a DataError naming `path`, never the staging file."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}-",
                                             suffix=".tmp", delete=False)
    except OSError as error:
        raise export_error(path, error) from None
    try:
        with handle:
            for source, row in zip(sources, dataset):
                text = tokenizer.decode(row["input_ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                handle.write(json.dumps({"source": source, "text": text, "input_ids": row["input_ids"],
                                         "labels": row["labels"]}, ensure_ascii=False) + "\n")
        os.replace(handle.name, target)
    except BaseException as error:
        Path(handle.name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise export_error(path, error) from None
        raise
    return len(dataset)


def export_error(path: str, error: OSError) -> DataError:
    return DataError([f"{path}: cannot write the export ({error.strerror or error}) — choose another --export path "
                      "or free some space"])
