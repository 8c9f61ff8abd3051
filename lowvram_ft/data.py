"""Training data: read rows, recognise their shape, normalise them into Conversations, check them, mix
and split them, then render, mask and tokenize them (cached on disk).

The story of one run: `load_data(cfg)` → LoadedData (train / held-out examples + row statistics), then
`tokenize_data(examples, tokenizer, cfg)` → TokenizedData (a datasets.Dataset of input_ids + labels and
token statistics). `inspect(cfg)` is the `data` command: statistics, rendered examples with the trained
tokens highlighted, --export and --check.

Rules decided here:
- Every problem is one line `FILE:ROW:FIELD: what is wrong — what to do`. ROW is the 1-based line of a
  JSON Lines file, the 1-based record of .json / .csv (header not counted) / .parquet / Hub data.
- Every rule about a row is checked while reading it, before any model or tokenizer loads, so
  `data --check` reports everything `data` and `train` would refuse: among them text that is not valid
  Unicode (a lone surrogate such as a JSON "\ud800" escape) and, in conversations, Harmony control tokens
  (`<|start|>`, `<|end|>`, ...), which would be read as chat structure rather than text.
- A file's shape is the one most of its rows have (data.format forces one): a row of another shape is
  one located problem, not a reason to misread the others. A .json file holding one object that is
  itself a row (e.g. one {"messages": [...]}) is one row.
- Role order: system/developer turns only before the first user turn; the first turn after them is a
  user turn; consecutive user turns are allowed (rendered as separate turns); two assistant turns in a
  row are not (merge them); a tool turn follows an assistant or tool turn; at least one assistant turn,
  and no assistant turn with an empty answer.
- Mixing with data.weights: the largest total such that no data set is over-sampled (each is sampled
  without replacement), capped by data.max_rows; rows per data set are the weights' shares of that total
  (largest remainder), drawn with data.seed. Without weights every valid row of every data set is used
  (a seeded random subset of data.max_rows when set). The held-out split is a seeded draw from the result.
- Tokenized data is cached under data.cache_dir, keyed by the content of the rows being tokenized (so
  a changed file, Hub revision, column mapping, mix or split all change it), the tokenizer (vocabulary,
  merges, added tokens, chat template), the render settings (train_on, reasoning_effort, date,
  max_seq_length, overlength, on_invalid) and the source of this module and harmony.py.
- Packing (data.packing) is left to TRL: SFTConfig(packing=True) packs our input_ids/labels rows with
  best-fit decreasing and emits position_ids that restart at each row, so under flash/flex attention rows
  never attend to each other. Nothing here may merge rows or add columns TRL would pack wrongly: the
  dataset holds exactly input_ids and labels, one example per row, each within model.max_seq_length.
"""
from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import io
import json
import os
import random
import re
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .config import SAMPLE_DATASET, Config
from .conversation import REASONING_EFFORTS, ROLES, Conversation, Message
from .harmony import CONTROL_TOKENS, IGNORE_INDEX

SAMPLE_FILE = Path(__file__).parent / "assets" / "sample_train.jsonl"
SAMPLE_HELDOUT_FILE = Path(__file__).parent / "assets" / "sample_heldout.jsonl"
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_LISTED = 20  # problems shown before "... and N more"
CACHE_FORMAT = "1"  # bump when the cached layout changes
HARMONY_MARKERS = ("<|start|>", "<|channel|>", "<|message|>")  # a tokenizer with these renders Harmony
# With data.num_proc unset, each worker process gets at least this much text (~2M tokens, ~5 s of work
# for one process with o200k_harmony): starting a worker (pickling the 12 MB tokenizer, unpickling it,
# writing and joining shards) took 1.5-3 s per worker here, so smaller shares cost more than they save.
MIN_CHARS_PER_PROCESS = 8_000_000

# shape: (columns every row needs, columns it may have). Auto-detection takes the first shape, in this
# order, whose needed columns are all present — so a row carrying both the Multilingual-Thinking columns
# and `messages` is read from the columns.
SHAPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "multilingual_thinking": (("user", "final"), ("reasoning_language", "developer", "analysis")),
    "messages": (("messages",), ()),
    "sharegpt": (("conversations",), ()),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "text": (("text",), ()),
}
# Role names accepted in messages / conversations: unsloth's standardize_sharegpt aliases (compared
# case-insensitively, stripped) plus Harmony's developer and tool.
ROLE_ALIASES = {
    "system": "system", "developer": "developer", "user": "user", "human": "user", "input": "user",
    "assistant": "assistant", "gpt": "assistant", "output": "assistant", "tool": "tool",
}
REASONING_KEYS = ("thinking", "reasoning_content", "reasoning")
LANGUAGE_LINE = re.compile(r"[ \t]*reasoning language:[ \t]*(\S[^\n]*?)[ \t]*(?:\r?\n|$)", re.IGNORECASE)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# --------------------------------------------------------------------------- types


class DataError(UserError, ValueError):
    """Problems with the training data, one line each (the first 20, then how many more)."""

    def __init__(self, problems: list[str], hint: str | None = None):
        self.problems = [str(p) for p in problems]
        lines = self.problems[:MAX_LISTED]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"... and {len(self.problems) - MAX_LISTED} more")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class PlainText:
    """A continued-pre-training row: every token is trained, the tokenizer's end-of-text token closes it."""

    text: str


@dataclass(frozen=True)
class Example:
    """One usable row: its normalised content and where it came from."""

    item: Conversation | PlainText
    where: str  # FILE:ROW, the prefix of any message about this row
    source: str  # the data.dataset entry
    shape: str


@dataclass(frozen=True)
class LoadedData:
    train: list[Example]
    heldout: list[Example]
    stats: dict  # train_rows, heldout_rows, sources, shapes, reasoning_languages, skipped, mixing


@dataclass(frozen=True)
class TokenizedData:
    dataset: Any  # datasets.Dataset with exactly input_ids and labels (-100 where not trained)
    stats: dict  # rows, min/median/max_tokens, trained_share, truncated, dropped, cache, cache_path, ...
    kept: list[int]  # for each dataset row, its index in the items given to tokenize_data


@dataclass(frozen=True)
class Problem:
    where: str  # FILE or FILE:ROW
    field: str | None
    what: str
    fix: str
    reason: str  # short category, for the skip counts
    fatal: bool = False  # the whole data set is unusable: never skipped
    row: int = 0  # for ordering a file's problems by row

    def __str__(self) -> str:
        return f"{self.where}{':' + self.field if self.field else ''}: {self.what} — {self.fix}"


class Issues(list):
    """Problems of one row, as (field, what, fix, reason), collected by the shape parsers."""

    def add(self, field: str, what: str, fix: str, reason: str) -> None:
        self.append((field, what, fix, reason))


@dataclass
class SourceResult:
    entry: str
    label: str
    shape: str | None = None
    rows_read: int = 0
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)  # holding a value in some row, after data.columns
    raw_columns: list[str] = field(default_factory=list)  # as the file names them, before data.columns


# --------------------------------------------------------------------------- loading


def load_data(cfg: Config) -> LoadedData:
    """Every valid row of every data set, mixed, capped and split; DataError when the data is unusable
    (or has invalid rows and data.on_invalid=error). Skipped rows are counted by reason in the stats."""
    results, problems = read_all(cfg)
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise DataError(fatal)
    if problems and cfg.data.on_invalid == "error":
        raise DataError(problems, "fix these rows, or set data.on_invalid=skip to drop them (they are counted)")
    pools = [r.examples for r in results]
    mixed, used = mix_sources(pools, cfg.data.weights, cfg.data.seed, cfg.data.max_rows)
    if not mixed:
        raise DataError([empty_data_problem(results, problems)])
    train, heldout = split_heldout(mixed, cfg.data.eval_fraction, cfg.data.seed)
    if not heldout and list(cfg.data.dataset) == ["sample"]:
        heldout = shipped_heldout(cfg)
    return LoadedData(train, heldout, row_stats(results, problems, used, train, heldout, cfg))


def shipped_heldout(cfg: Config) -> list:
    """The sample set's fixed held-out file (never trained on): the evaluation rows of the demo."""
    result = read_source(str(SAMPLE_HELDOUT_FILE), cfg)
    return list(result.examples)


def check_data(cfg: Config) -> list[str]:
    """Every problem in the configured data, one line each, whatever data.on_invalid says (for --check)."""
    results, problems = read_all(cfg)
    lines = [str(p) for p in problems]
    if not any(r.examples for r in results) and not any(p.fatal for p in problems):
        lines.append(empty_data_problem(results, problems))
    return lines


def read_all(cfg: Config) -> tuple[list[SourceResult], list[Problem]]:
    """Read, remap, detect and parse every data set; problems of all of them, in order."""
    results = [read_source(entry, cfg) for entry in cfg.data.dataset]
    problems = unused_renames(cfg.data.columns, results)  # first: a typo there explains problems below
    problems += [p for r in results for p in r.problems]
    return results, problems


def read_source(entry: str, cfg: Config) -> SourceResult:
    """One data.dataset entry: its rows parsed into Examples, and every problem found."""
    label, path, problem = resolve_source(entry, cfg.data.split)
    result = SourceResult(entry, label)
    if problem:
        result.problems.append(problem)
        return result
    rows, problems = read_hub(entry, label, cfg) if path is None else read_file(path, label)
    result.problems += problems
    if any(p.fatal for p in problems):
        return result
    result.raw_columns = list(dict.fromkeys(key for _, row in rows for key in row))
    rows = [(number, rename_columns(row, cfg.data.columns)) for number, row in rows]
    result.rows_read = len(rows) + len(problems)
    if not rows and not problems:
        result.problems.append(Problem(label, None, "no rows", "add rows to the file or remove it from data.dataset",
                                       "empty", fatal=True))
        return result
    result.columns = present_columns(row for _, row in rows)
    result.shape, problem = file_shape([row for _, row in rows], result.columns, cfg.data.format, label)
    if problem:
        result.problems.append(problem)
        return result
    parse_rows(rows, result)
    return result


def parse_rows(rows: list[tuple[int, dict]], result: SourceResult) -> None:
    """Each row under the file's shape: an Example, or its located problems (a row of another shape is
    one problem). Problems end up in row order."""
    for number, row in rows:
        where = f"{result.label}:{number}"
        stray = stray_row(row, result.shape, where, number)
        if stray:
            result.problems.append(stray)
            continue
        item, issues = parse_row(row, result.shape)
        if issues:
            result.problems += [Problem(where, *issue, row=number) for issue in issues]
        else:
            result.examples.append(Example(item, where, result.entry, result.shape))
    result.problems.sort(key=lambda p: p.row)


def resolve_source(entry: str, split: str) -> tuple[str, Path | None, Problem | None]:
    """(label for messages, local file or None for a Hub id, problem). 'sample' is the shipped set."""
    if entry == SAMPLE_DATASET:
        if not SAMPLE_FILE.is_file():
            return str(SAMPLE_FILE), None, Problem(str(SAMPLE_FILE), None, "the shipped sample set is missing",
                                                   "reinstall lowvram_ft", "unreadable", fatal=True)
        return str(SAMPLE_FILE), SAMPLE_FILE, None
    path = Path(os.path.expanduser(entry))  # ~unknown-user stays as typed (Path.expanduser raises)
    if path.is_dir():
        return entry, None, Problem(entry, None, "is a directory, not a file",
                                    f"pass one {'/'.join(SUFFIXES)} file inside it", "unreadable", fatal=True)
    if path.exists():
        if path.suffix.lower() not in SUFFIXES:
            return entry, None, Problem(entry, None, f"unsupported file type '{path.suffix or '(none)'}'",
                                        f"convert it to one of {', '.join(SUFFIXES)}", "unreadable", fatal=True)
        return entry, path, None
    if path.suffix.lower() in SUFFIXES or not looks_like_hub_id(entry):
        return entry, None, Problem(entry, None, "file not found",
                                    "check the path (Hub ids look like owner/name)", "unreadable", fatal=True)
    return f"{entry}[{split}]", None, None


def looks_like_hub_id(entry: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", entry) is not None


def read_file(path: Path, label: str) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """Rows of a local file as (row number, dict), with the problems found while reading."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return [], [Problem(label, None, f"cannot read the file ({error.strerror})",
                            "check that it exists and is readable",
                            "unreadable", fatal=True)]
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_json_lines(data, label)
    if suffix == ".parquet":
        return read_parquet(path, label)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return [], [Problem(label, None, f"not UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start})",
                            "re-save the file as UTF-8", "not UTF-8", fatal=True)]
    return read_json(data, text, label) if suffix == ".json" else read_csv(text, label)


def read_json_lines(data: bytes, label: str) -> tuple[list[tuple[int, dict]], list[Problem]]:
    rows, problems = [], []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{label}:{number}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            what = f"not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
            problems.append(Problem(where, None, what, "re-save the file as UTF-8", "not UTF-8", row=number))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(Problem(where, None, f"invalid JSON ({error.msg} at column {error.colno})",
                                    "fix or remove this line", "bad JSON line", row=number))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(where, None, f"expected a JSON object, got {type_name(row)}",
                                    "write one {...} object per line", "not an object", row=number))
            continue
        rows.append((number, row))
    return rows, problems


def read_json(data: bytes, text: str, label: str) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """A JSON array of row objects, {"key": [rows]}, or one row object; JSON Lines saved as .json are
    read as such."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":
            return read_json_lines(data, label)
        return [], [Problem(f"{label}:{error.lineno}", None, f"invalid JSON ({error.msg} at column {error.colno})",
                            "fix the file", "bad JSON", fatal=True)]
    value = json_rows(value)
    if not isinstance(value, list):
        return [], [Problem(label, None, f"expected a list of row objects, got {type_name(value)}",
                            "write [{...}, {...}] or JSON Lines", "bad JSON", fatal=True)]
    rows, problems = [], []
    for number, row in enumerate(value, 1):
        if isinstance(row, dict):
            rows.append((number, row))
        else:
            problems.append(Problem(f"{label}:{number}", None, f"expected a JSON object, got {type_name(row)}",
                                    "make every list item a {...} object", "not an object", row=number))
    return rows, problems


def json_rows(value: Any) -> Any:
    """The rows a .json file's top level holds: a list as it is, {"key": [rows]} as that list, and any
    other object as one row — {"messages": [...]} is one conversation, not a list of rows."""
    if not isinstance(value, dict):
        return value
    lists = [v for v in value.values() if isinstance(v, list)]
    is_row = closest_shape(list(value))[1] or bool(lists and lists[0] and all(map(is_message, lists[0])))
    return lists[0] if len(lists) == 1 and len(value) == 1 and not is_row else [value]


def is_message(value: Any) -> bool:
    return isinstance(value, dict) and ("role" in value or "from" in value)


def read_csv(text: str, label: str) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """Rows of a CSV file with a header line; a quote that never closes is a syntax error, not a short row."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = [(number, {k: v for k, v in row.items() if k is not None}) for number, row in enumerate(reader, 1)]
    except csv.Error as error:
        return [], [Problem(label, None, f"CSV syntax error on line {reader.line_num} ({error})", "fix the file",
                            "bad CSV", fatal=True)]
    line = unclosed_quote_line(text)
    if line:
        return [], [Problem(label, None, f"CSV syntax error: the quoted field opened on line {line} is never "
                            "closed, so the rest of the file would be read into it",
                            'close the quote (a quote inside a quoted field is written twice: "")', "bad CSV",
                            fatal=True)]
    return rows, []


def unclosed_quote_line(text: str) -> int | None:
    """The line where the last CSV record starts when it opens a quote that never closes (the csv module
    then reads the rest of the file into that field without a word), else None."""
    if '"' not in text:
        return None
    reader = csv.reader(io.StringIO(text, newline=""))
    start = end = 0
    for _ in reader:
        start, end = end + 1, reader.line_num
    tail = io.StringIO(text, newline="").readlines()[start - 1:] if start else []
    try:
        for _ in csv.reader(tail, strict=True):  # strict: the end of the file inside a quote is an error
            pass
    except csv.Error as error:
        return start if "end of data" in str(error) else None
    return None


def read_parquet(path: Path, label: str) -> tuple[list[tuple[int, dict]], list[Problem]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # noqa: BLE001 — pyarrow raises several types; one line says it all
        return [], [Problem(label, None, f"not a readable Parquet file ({first_line(error)})",
                            "re-export the file", "unreadable", fatal=True)]
    return list(enumerate(table.to_pylist(), 1)), []


def read_hub(entry: str, label: str, cfg: Config) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """A Hub data set through datasets.load_dataset (served from the local cache when offline)."""
    import datasets

    try:
        dataset = datasets.load_dataset(entry, cfg.data.subset, split=cfg.data.split)
    except Exception as error:  # noqa: BLE001 — network, auth, missing split: one actionable line
        return [], [Problem(label, None, f"cannot load this data set from the Hugging Face Hub ({first_line(error)})",
                            f"download it where there is network (hf download {entry} --repo-type dataset "
                            "--local-dir DIR) and pass a local file, e.g. data.dataset=[DIR/train.jsonl]",
                            "unreadable", fatal=True)]
    return list(enumerate(dataset.to_list(), 1)), []


def rename_columns(row: dict, columns: dict[str, str]) -> dict:
    """Apply data.columns {old: new}; a renamed column replaces one already called `new`."""
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns}
    out.update({new: row[old] for old, new in columns.items() if old in row})
    return out


def unused_renames(columns: dict[str, str], results: list[SourceResult]) -> list[Problem]:
    """A data.columns entry that renames a column no data set has is a typo, not a no-op."""
    read = [r for r in results if r.raw_columns]
    names = [c for r in read for c in r.raw_columns]
    found = "; ".join(f"{r.label}: {', '.join(r.raw_columns)}" for r in read)
    problems = []
    for old in columns:
        if not read or old in names:
            continue
        close = difflib.get_close_matches(old, names, n=1)
        fix = f"fix the name{f' (did you mean {close[0]!r}?)' if close else ''} or remove the entry"
        problems.append(Problem("data.columns", None, f"no data set has a column '{old}' (columns in {found})", fix,
                                "bad config", fatal=True))
    return problems


def present_columns(rows) -> list[str]:
    """Columns that hold a value in at least one row, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update((k, None) for k in filled(row))
    return list(seen)


def detect_shape(columns: list[str], forced: str, label: str) -> tuple[str | None, Problem | None]:
    """The row shape from the columns (or data.format); a problem naming what was found otherwise."""
    found = ", ".join(columns) or "(none)"
    rename = "rename columns with data.columns={old: new}"
    if forced != "auto":
        missing = [c for c in SHAPES[forced][0] if c not in columns]
        if missing:
            return None, Problem(label, None, f"missing column {', '.join(missing)} for the {forced} shape "
                                 f"(data.format={forced}); columns found: {found}",
                                 f"{rename} or choose another data.format", "missing column", fatal=True)
        return forced, None
    shape, complete = closest_shape(columns)
    if complete:
        return shape, None
    if shape:
        missing = [c for c in SHAPES[shape][0] if c not in columns]
        return None, Problem(label, None, f"looks like the {shape} shape but has no column {', '.join(missing)}; "
                             f"columns found: {found}", f"{rename} or set data.format", "missing column", fatal=True)
    expected = "messages | conversations | user+final | instruction+output | text"
    return None, Problem(label, None, f"cannot tell the row shape from the columns ({found}); expected {expected}",
                         f"{rename} or set data.format", "missing column", fatal=True)


def closest_shape(columns: list[str]) -> tuple[str | None, bool]:
    """(the first shape, in SHAPES order, whose needed columns are all there, True), else (the shape
    sharing the most columns, False), else (None, False)."""
    for shape, (needed, _) in SHAPES.items():
        if all(c in columns for c in needed):
            return shape, True
    hits, shape = max((sum(c in columns for c in needed + optional), shape)
                      for shape, (needed, optional) in SHAPES.items())
    return (shape if hits else None), False


def file_shape(rows: list[dict], columns: list[str], forced: str, label: str) -> tuple[str | None, Problem | None]:
    """data.format, else the shape most rows come closest to (the earliest on a tie) — so one stray row
    cannot change how the others are read. When no row has every column of a shape, detect_shape on all
    the columns explains what is missing."""
    guesses = [closest_shape(filled(row)) for row in rows]
    if forced != "auto" or not any(complete for _, complete in guesses):
        return detect_shape(columns, forced, label)
    votes = Counter(shape for shape, _ in guesses if shape)
    return votes.most_common(1)[0][0], None  # most_common keeps first-seen order among equal counts


def stray_row(row: dict, shape: str, where: str, number: int) -> Problem | None:
    """A row complete in another shape that lacks a column of the file's shape: one problem naming both
    shapes, instead of a misleading 'missing' for each column."""
    own, complete = closest_shape(filled(row))
    needed = SHAPES[shape][0]
    if not complete or own == shape or all(c in filled(row) for c in needed):
        return None
    return Problem(where, None, f"a row of the {own} shape ({' + '.join(SHAPES[own][0])}) among rows of the "
                   f"{shape} shape ({' + '.join(needed)})", "write it like the other rows or move it to a file of "
                   "its own", "other shape", row=number)


def filled(row: dict) -> list[str]:
    """The columns of a row that hold a value."""
    return [k for k, v in row.items() if v is not None]


def empty_data_problem(results: list[SourceResult], problems: list[Problem]) -> str:
    skipped = Counter(p.where for p in problems if not p.fatal)
    counts = ", ".join(f"{r.label}: {r.rows_read} read" for r in results)
    return (f"data.dataset: no usable rows ({counts}; {len(skipped)} invalid) — fix the invalid rows "
            "(python -m lowvram_ft data --check lists them) or check data.weights")


# --------------------------------------------------------------------------- shapes


def parse_row(row: dict, shape: str) -> tuple[Conversation | PlainText | None, Issues]:
    """One row of a known shape as a Conversation (PlainText for `text`), or the problems found."""
    issues = Issues()
    item = PARSERS[shape](row, issues)
    return (None if issues else item), issues


def parse_text(row: dict, issues: Issues) -> PlainText | None:
    """Plain text is tokenized as it is: it may hold rendered Harmony on purpose, so control tokens stay."""
    text = text_field(row, "text", issues, "text", control_tokens=False)
    if text is not None and not text.strip():
        issues.add("text", "empty text", "fill it or remove the row", "empty text")
    return PlainText(text) if text else None


def parse_multilingual_thinking(row: dict, issues: Issues) -> Conversation | None:
    shape = "multilingual_thinking"
    user, final = text_field(row, "user", issues, shape), text_field(row, "final", issues, shape)
    analysis = text_field(row, "analysis", issues, shape, required=False)
    developer = text_field(row, "developer", issues, shape, required=False)
    if issues:
        return None
    if not final.strip():
        issues.add("final", "empty assistant answer", "give the answer text or remove the row", "empty assistant turn")
        return None
    instructions = [Message("system", developer)] if developer and developer.strip() else []
    messages = [*instructions, Message("user", user), Message("assistant", final, analysis or None)]
    return finish_conversation(row, messages, issues)


def parse_alpaca(row: dict, issues: Issues) -> Conversation | None:
    shape = "alpaca"
    instruction, output = text_field(row, "instruction", issues, shape), text_field(row, "output", issues, shape)
    extra = text_field(row, "input", issues, shape, required=False)
    system = text_field(row, "system", issues, shape, required=False)
    if issues:
        return None
    if not output.strip():
        issues.add("output", "empty assistant answer", "give the answer text or remove the row", "empty assistant turn")
        return None
    prompt = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
    instructions = [Message("system", system)] if system and system.strip() else []
    return finish_conversation(row, [*instructions, Message("user", prompt), Message("assistant", output)], issues)


def parse_messages(row: dict, issues: Issues, key: str = "messages") -> Conversation | None:
    """OpenAI `messages` ({role, content, thinking|reasoning_content|reasoning}) or, with
    key='conversations', ShareGPT ({from, value}); inline <think>…</think> becomes the reasoning."""
    turns = read_turns(row.get(key), key, issues)
    if issues:
        return None
    check_order(turns, key, issues)
    if issues:
        return None
    return finish_conversation(row, [message for _, _, message in turns], issues)


def parse_sharegpt(row: dict, issues: Issues) -> Conversation | None:
    return parse_messages(row, issues, key="conversations")


PARSERS: dict[str, Callable[[dict, Issues], Conversation | PlainText | None]] = {
    "multilingual_thinking": parse_multilingual_thinking,
    "messages": parse_messages,
    "sharegpt": parse_sharegpt,
    "alpaca": parse_alpaca,
    "text": parse_text,
}


def read_turns(value: Any, key: str, issues: Issues) -> list[tuple[str, str, Message]]:
    """(role field path, content field path, Message) per turn; roles normalised as standardize_sharegpt does."""
    value = json_list(value)
    if not isinstance(value, list):
        issues.add(key, f"expected a list of messages, got {type_name(value)}",
                   'write it as [{"role": ..., "content": ...}, ...]', "bad value")
        return []
    turns = []
    for index, message in enumerate(value):
        path = f"{key}[{index}]"
        if not isinstance(message, dict):
            issues.add(path, f"expected a message object, got {type_name(message)}",
                       'write {"role": ..., "content": ...}', "bad value")
            continue
        role_key, content_key = ("from", "value") if "from" in message else ("role", "content")
        raw = message.get(role_key)
        role = ROLE_ALIASES.get(raw.strip().lower()) if isinstance(raw, str) else None
        if role is None:
            issues.add(f"{path}.{role_key}", f"unknown role {raw!r}",
                       f"use one of {', '.join(ROLES)} (ShareGPT: human, gpt)", "unknown role")
            continue
        content = message.get(content_key)
        if not isinstance(content, str):
            issues.add(f"{path}.{content_key}", f"expected text, got {type_name(content)}",
                       "make the content a string (lists of parts and tool calls are not supported)",
                       "non-string content")
            continue
        check_text(content, f"{path}.{content_key}", issues)
        thinking = None
        if role == "assistant":
            thinking = read_reasoning(message, path, issues)
            content, thinking = split_inline_think(content, thinking, f"{path}.{content_key}", issues)
        turns.append((f"{path}.{role_key}", f"{path}.{content_key}", Message(role, content, thinking)))
    return turns


def read_reasoning(message: dict, path: str, issues: Issues) -> str | None:
    """The first of thinking / reasoning_content / reasoning that holds a value ('' counts as none)."""
    for key in REASONING_KEYS:
        value = message.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            issues.add(f"{path}.{key}", f"expected text, got {type_name(value)}", "make the reasoning a string",
                       "non-string content")
            return None
        check_text(value, f"{path}.{key}", issues)
        if value.strip():
            return value
    return None


def split_inline_think(content: str, thinking: str | None, field: str, issues: Issues) -> tuple[str, str | None]:
    """A leading <think>…</think> block in an assistant answer becomes its reasoning."""
    stripped = content.lstrip()
    if not stripped.startswith(THINK_OPEN):
        return content, thinking
    end = stripped.find(THINK_CLOSE)
    if end < 0:
        issues.add(field, "<think> block is never closed", "close it with </think> before the answer", "bad value")
        return content, thinking
    if thinking:
        issues.add(field, "reasoning given twice: a reasoning field and an inline <think> block",
                   "keep one of them", "bad value")
    inline = stripped[len(THINK_OPEN):end].strip()
    return stripped[end + len(THINK_CLOSE):].lstrip(), inline or None


def check_order(turns: list[tuple[str, str, Message]], key: str, issues: Issues) -> None:
    """The role-order rules in the module docstring; one problem per offending turn."""
    started, previous, answers = False, None, 0
    for role_path, content_path, message in turns:
        role = message.role
        if role in ("system", "developer"):
            if started:
                issues.add(role_path, f"{role} message after the conversation started",
                           "put system/developer messages first", "role order")
            continue
        if not started and role != "user":
            issues.add(role_path, f"conversation starts with a{'n' if role == 'assistant' else ''} {role} turn",
                       "start with a user turn (after any system message)", "role order")
        elif role == "assistant" and previous == "assistant":
            issues.add(role_path, "two assistant turns in a row", "merge them into one turn", "role order")
        elif role == "tool" and previous not in ("assistant", "tool"):
            issues.add(role_path, "tool turn that does not follow an assistant turn",
                       "put the assistant turn that called the tool before it", "role order")
        if role == "assistant":
            answers += 1
            if not message.content.strip():
                issues.add(content_path, "empty assistant turn", "give the answer text or remove the turn",
                           "empty assistant turn")
        started, previous = True, role
    if not answers and turns:
        issues.add(key, "no assistant turn, so nothing to train on", "add the assistant's answer or remove the row",
                   "no assistant turn")
    elif not turns:
        issues.add(key, "empty conversation", "add messages or remove the row", "no assistant turn")


def finish_conversation(row: dict, messages: list[Message], issues: Issues) -> Conversation | None:
    """Pull 'reasoning language: X' out of the first instruction line (a reasoning_language column
    wins) and read the per-row reasoning_effort column."""
    messages, from_line = extract_language_line(messages)
    column = text_field(row, "reasoning_language", issues, "", required=False)
    effort = read_effort(row, issues)
    if issues:
        return None
    language = (column.strip() if column and column.strip() else None) or from_line
    return Conversation(tuple(messages), reasoning_language=language, reasoning_effort=effort)


def read_effort(row: dict, issues: Issues) -> str | None:
    """The per-row reasoning_effort column: low | medium | high (any case), empty or absent = None."""
    value = row.get("reasoning_effort")
    if value is None or value == "":
        return None
    effort = value.strip().lower() if isinstance(value, str) else None
    if effort not in REASONING_EFFORTS:
        issues.add("reasoning_effort", f"unknown reasoning effort {value!r}",
                   f"use one of {', '.join(REASONING_EFFORTS)}", "bad value")
        return None
    return effort


def extract_language_line(messages: list[Message]) -> tuple[list[Message], str | None]:
    """Multilingual-Thinking writes the language as the system message's first line; keep it once, as
    Conversation.reasoning_language, and drop the line (and the message, if nothing else is left).

    The one normalisation of message text (all other text is rendered verbatim, as openai-harmony does):
    the renderer writes the line back as `reasoning language: X`, then one blank line, then the rest of
    the message, so the line breaks between the language line and the rest become that one blank line,
    and a message holding only the language line (and blank lines) renders as the line alone. It is the
    form gpt-oss is prompted with at inference (evaluate, chat), so training and serving agree."""
    if not messages or messages[0].role not in ("system", "developer"):
        return messages, None
    first = messages[0]
    match = LANGUAGE_LINE.match(first.content)
    if not match:
        return messages, None
    rest = first.content[match.end():].lstrip("\r\n")
    kept = [Message(first.role, rest)] if rest.strip() else []
    return kept + messages[1:], match.group(1)


def text_field(row: dict, key: str, issues: Issues, shape: str, required: bool = True,
               control_tokens: bool = True) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            issues.add(key, f"missing (the {shape} shape needs it)", f"add a {key} value or remove the row",
                       "missing field")
        return None
    if not isinstance(value, str):
        issues.add(key, f"expected text, got {type_name(value)}", "make it a string", "non-string content")
        return None
    check_text(value, key, issues, control_tokens)
    return value


def check_text(text: str, field: str, issues: Issues, control_tokens: bool = True) -> None:
    """Text every renderer and the cache can take: valid Unicode (a lone surrogate, from a JSON escape such
    as \\ud800, cannot be encoded) and, unless told otherwise, no Harmony control token (inside a message
    it would be read as chat structure). harmony.py refuses the same tokens when rendering."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        issues.add(field, f"not valid Unicode: lone surrogate \\u{ord(text[error.start]):04x} at character "
                   f"{error.start + 1}", "fix the \\u escape in the file (surrogates come in pairs, e.g. "
                   "\\ud83d\\ude00) or remove the row", "invalid Unicode")
    found = [token for token in CONTROL_TOKENS if token in text] if control_tokens else []
    if found:
        issues.add(field, f"contains the Harmony control token {found[0]}",
                   "remove it: inside a message it would be read as chat structure, not as text", "control token")


def json_list(value: Any) -> Any:
    """CSV cells (and some Parquet exports) hold message lists as JSON text: decode those."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def type_name(value: Any) -> str:
    return {type(None): "null", str: "text", list: "a list", dict: "an object", bool: "true/false",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text.splitlines()[0][:200]


# --------------------------------------------------------------------------- mixing and splitting


def mix_sources(pools: list[list], weights: list[float], seed: int, max_rows: int | None) -> tuple[list, list[int]]:
    """Rows drawn from each pool (see the module docstring for the rule), shuffled; also rows used per pool."""
    rng = random.Random(seed)
    if not weights:
        mixed = [row for pool in pools for row in pool]
        rng.shuffle(mixed)
        mixed = mixed[:max_rows] if max_rows else mixed
        ids = {id(row) for row in mixed}
        return mixed, [sum(id(row) in ids for row in pool) for pool in pools]
    counts = mixture_counts([len(pool) for pool in pools], weights, max_rows)
    mixed = [row for pool, count in zip(pools, counts) for row in rng.sample(pool, count)]
    rng.shuffle(mixed)
    return mixed, counts


def mixture_counts(sizes: list[int], weights: list[float], max_rows: int | None) -> list[int]:
    """Rows per pool: the largest total with no pool over-sampled, capped by max_rows, split by weight."""
    total_weight = sum(weights)
    shares = [w / total_weight for w in weights]
    total = min(int(size / share + 1e-9) for size, share in zip(sizes, shares) if share > 0)
    if max_rows:
        total = min(total, max_rows)
    quotas = [share * total for share in shares]
    counts = [min(int(q), size) for q, size in zip(quotas, sizes)]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (quotas[i] - int(quotas[i])), reverse=True)
    for i in by_remainder:
        if sum(counts) >= total:
            break
        if counts[i] < sizes[i] and shares[i] > 0:
            counts[i] += 1
    return counts


def split_heldout(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded draw of round(fraction × rows) held-out rows (at least one when the
    fraction is positive, never all of them); the two lists are disjoint."""
    if fraction <= 0 or len(rows) < 2:
        return list(rows), []
    count = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    order = list(range(len(rows)))
    random.Random(seed + 1).shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def row_stats(results, problems, used, train, heldout, cfg: Config) -> dict:
    skipped: Counter = Counter()
    first_reason: dict[str, str] = {}
    for p in problems:
        first_reason.setdefault(p.where, p.reason)
    skipped.update(first_reason.values())
    return {
        "train_rows": len(train),
        "heldout_rows": len(heldout),
        "sources": {r.entry: {"file": r.label, "shape": r.shape, "rows": r.rows_read, "valid": len(r.examples),
                              "used": n} for r, n in zip(results, used)},
        "shapes": dict(Counter(e.shape for e in train + heldout)),
        "reasoning_languages": dict(Counter(language_of(e) for e in train)),
        "skipped_rows": sum(skipped.values()),
        "skipped": dict(skipped),
        "mixing": mixing_note(cfg, results, used),
    }


def language_of(example: Example) -> str:
    item = example.item
    return (item.reasoning_language if isinstance(item, Conversation) else None) or "none"


def mixing_note(cfg: Config, results, used) -> str:
    if not cfg.data.weights:
        return "all valid rows" + (f", seeded subset of {cfg.data.max_rows}" if cfg.data.max_rows else "")
    parts = [f"{r.entry} {n}/{len(r.examples)}" for r, n in zip(results, used)]
    return (f"weights {cfg.data.weights}: largest total with no data set over-sampled"
            + (f" (capped at {cfg.data.max_rows})" if cfg.data.max_rows else "") + "; " + ", ".join(parts))


# --------------------------------------------------------------------------- rendering + tokenizing


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
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError([f"{name}: the tokenizer has no chat template, so conversations cannot be rendered — use a "
                         "model that ships one, set data.format=text for plain text, or pass --tokenizer gpt-oss "
                         "to render Harmony for gpt-oss"])
    text_end = tokenizer.convert_tokens_to_ids("<|endoftext|>") if renderer == "harmony" else tokenizer.eos_token_id
    return {
        "renderer": renderer or "text",
        "train_on": cfg.data.train_on,
        "reasoning_effort": cfg.data.reasoning_effort,
        "date": cfg.data.date,
        "max_length": cfg.model.max_seq_length,
        "overlength": cfg.data.overlength,
        "on_invalid": cfg.data.on_invalid,  # decides whether refused rows are dropped: part of the cache key
        "text_end_id": text_end,
    }


def choose_renderer(tokenizer) -> str | None:
    """'harmony' for tokenizers with Harmony's special tokens, 'chat_template' for any other with a
    template, None when the tokenizer cannot render conversations."""
    unknown = {None, getattr(tokenizer, "unk_token_id", None)}
    if all(tokenizer.convert_tokens_to_ids(t) not in unknown for t in HARMONY_MARKERS):
        return "harmony"
    return "chat_template" if getattr(tokenizer, "chat_template", None) else None


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


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """datasets' progress bars on or off for a block, restored after."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.disable_progress_bars if was_disabled else datasets.enable_progress_bars)()


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


def render_ids(item: Conversation | PlainText, tokenizer, settings: dict, notes: dict) -> tuple[list[int], list[int]]:
    """Token ids and labels of one row under the configured renderer and data.train_on."""
    from .harmony import HarmonyOptions, encode, render_training

    if isinstance(item, PlainText):
        ids = tokenizer(item.text)["input_ids"]
        end = settings["text_end_id"]
        if end is not None and (not ids or ids[-1] != end):
            ids = ids + [end]
        return ids, list(ids)
    if settings["renderer"] == "harmony":
        options = HarmonyOptions(reasoning_effort=settings["reasoning_effort"], date=settings["date"])
        return encode(select_trained(render_training(item, options), settings["train_on"]), tokenizer)
    return chat_template_ids(item, tokenizer, settings["train_on"], notes)


def select_trained(segments: list[tuple[str, bool]], train_on: str) -> list[tuple[str, bool]]:
    """data.train_on over (text, trained) segments whose trained runs are the assistant turns:
    assistant = as rendered, last_assistant = only the last trained run, all = everything."""
    if train_on == "all":
        return [(text, True) for text, _ in segments]
    if train_on == "last_assistant":
        last = max((i for i, (_, trained) in enumerate(segments) if trained), default=-1)
        return [(text, trained and i == last) for i, (text, trained) in enumerate(segments)]
    return segments


def chat_template_ids(conv: Conversation, tokenizer, train_on: str, notes: dict) -> tuple[list[int], list[int]]:
    """Ids of the whole rendered conversation; assistant spans found by rendering growing prefixes.

    For assistant turn i: its text starts where the render of messages[:i] with the generation prompt
    ends, and ends with its stop token (or where the render of messages[:i+1] ends) — provided both are
    prefixes of the whole render (assistant_span). Templates that rewrite history (dropping earlier
    reasoning) are handled there; a turn that still cannot be located stays untrained and is counted.
    """
    messages = chat_messages(conv)
    full = render_chat(tokenizer, messages, False)
    spans = [assistant_span(tokenizer, messages, i, full) for i, m in enumerate(messages) if m["role"] == "assistant"]
    notes["untrained_turns"] = sum(span is None for span in spans)
    located = [span for span in spans if span is not None]
    if not located:
        raise ValueError("the chat template renders no assistant turn where expected (it may rewrite the history)")
    closing = conv.turns()[-1] if conv.turns() else None
    if closing and closing.role == "assistant" and closing.thinking and closing.thinking.strip() not in full:
        notes["reasoning_dropped"] = True
    segments, cursor = [], 0
    for start, end in located:
        segments += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    segments.append((full[cursor:], False))
    segments = select_trained([s for s in segments if s[0]], train_on)
    return encode_by_offsets(segments, tokenizer)


def chat_messages(conv: Conversation) -> list[dict]:
    """Messages for apply_chat_template: one system message (with the reasoning-language line),
    reasoning under both keys templates use (reasoning_content: Qwen/DeepSeek; thinking: gpt-oss)."""
    instructions = conv.instructions()
    if conv.reasoning_language:
        instructions = "\n\n".join(filter(None, [f"reasoning language: {conv.reasoning_language}", instructions]))
    messages = [{"role": "system", "content": instructions}] if instructions else []
    for m in conv.turns():
        message = {"role": m.role, "content": m.content}
        if m.thinking:
            message.update(reasoning_content=m.thinking, thinking=m.thinking)
        messages.append(message)
    return messages


def render_chat(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_span(tokenizer, messages: list[dict], index: int, full: str) -> tuple[int, int] | None:
    """Where assistant turn `index` lies in `full`, the render of the whole conversation; None when the
    template's output does not let it be located.

    It starts where the render of the history with the generation prompt ends (so the training text
    holds exactly the prompt the model is given at inference) and ends just after its first stop token
    (the tokenizer's eos): generation stops there, so glue the template writes after it (ChatML's
    newline) is context, not trained. The turn's text is found as the render of messages[:index+1]
    that is a prefix of `full`, with its reasoning or without it (templates that drop the reasoning of
    earlier turns); else, for templates that render a closing turn unlike a history turn (Qwen3 gives
    a closing turn without reasoning an empty <think></think>), as what precedes the next message,
    up to its stop token.
    """
    prompt = render_chat(tokenizer, messages[:index], True)
    if not full.startswith(prompt):
        return None
    start = len(prompt)
    for message in (messages[index], without_reasoning(messages[index])):
        upto = render_chat(tokenizer, messages[:index] + [message], False)
        if full.startswith(upto) and len(upto) > start:
            return start, through_stop(full, start, len(upto), tokenizer.eos_token) or len(upto)
    if index + 1 < len(messages):
        upto = render_chat(tokenizer, messages[:index + 2], False)
        end = through_stop(full, start, len(upto), tokenizer.eos_token) if full.startswith(upto) else None
        return (start, end) if end else None
    return None


def through_stop(text: str, start: int, end: int, stop: str | None) -> int | None:
    """The position just after the first `stop` in text[start:end], or None."""
    found = text.find(stop, start, end) if stop else -1
    return found + len(stop) if found >= 0 else None


def without_reasoning(message: dict) -> dict:
    return {k: v for k, v in message.items() if k not in ("reasoning_content", "thinking")}


def encode_by_offsets(segments: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    """Tokenize the joined text once (the ids a model sees for it), labelling each token by the segment
    its first character falls in. Tokenizers without offsets tokenize segment by segment instead."""
    from .harmony import encode

    if not getattr(tokenizer, "is_fast", False):
        return encode(segments, tokenizer)
    text = "".join(t for t, _ in segments)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained_at = [False] * (len(text) + 1)
    position = 0
    for t, trained in segments:
        if trained:
            trained_at[position:position + len(t)] = [True] * len(t)
        position += len(t)
    ids = encoded["input_ids"]
    labels = [i if trained_at[start] else IGNORE_INDEX for i, (start, _) in zip(ids, encoded["offset_mapping"])]
    return ids, labels


def fit_length(ids: list[int], labels: list[int], max_length: int, overlength: str) -> tuple[list[int], list[int], str]:
    """data.overlength for one row: (ids, labels, status). Truncation cuts from the end; a row left
    without a trained token is dropped, not trained on."""
    if not any(label != IGNORE_INDEX for label in labels):
        return [], [], "dropped:no trained tokens"
    if len(ids) <= max_length:
        return ids, labels, "ok"
    if overlength == "error":
        return [], [], "overlength"
    if overlength == "drop":
        return [], [], "dropped:longer than model.max_seq_length"
    ids, labels = ids[:max_length], labels[:max_length]
    if not any(label != IGNORE_INDEX for label in labels):
        return [], [], "dropped:no trained token left after truncation"
    return ids, labels, "truncated"


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


def location_key(where: str) -> tuple[str, int]:
    """'FILE:ROW' sorts by file, then by row number."""
    name, _, row = where.rpartition(":")
    return (name, int(row)) if row.isdigit() else (where, 0)


# --------------------------------------------------------------------------- cache


def cache_root(cfg: Config) -> Path:
    """data.cache_dir, else $LOWVRAM_FT_CACHE/data, else ~/.cache/lowvram_ft/data."""
    if cfg.data.cache_dir:
        return Path(os.path.expanduser(cfg.data.cache_dir))
    return Path(os.environ.get("LOWVRAM_FT_CACHE") or Path.home() / ".cache" / "lowvram_ft") / "data"


def cache_key(records: list[str], tokenizer, settings: dict) -> str:
    """Changes with the rows' content, the tokenizer, the render settings and the rendering code."""
    import tokenizers

    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT, settings, tokenizers.__version__], sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for module in ("data.py", "harmony.py"):
        h.update((Path(__file__).parent / module).read_bytes())
    for record in records:
        h.update(record.encode())
        h.update(b"\n")
    return h.hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and merges (or the vocabulary), added and special tokens, chat template."""
    h = hashlib.sha256(vocabulary_hash(tokenizer).encode())
    h.update(json.dumps([len(tokenizer), tokenizer.get_added_vocab(), tokenizer.special_tokens_map],
                        sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    return h.hexdigest()


_VOCABULARY_HASHES: dict[int, tuple[Any, str]] = {}  # id -> (tokenizer kept alive so the id stays its own, hash)


def vocabulary_hash(tokenizer) -> str:
    """The expensive part of the fingerprint (o200k_harmony's model serialises to ~30 MB), once per object."""
    known = _VOCABULARY_HASHES.get(id(tokenizer))
    if known is not None and known[0] is tokenizer:
        return known[1]
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    if len(_VOCABULARY_HASHES) >= 4:
        _VOCABULARY_HASHES.clear()
    _VOCABULARY_HASHES[id(tokenizer)] = (tokenizer, h.hexdigest())
    return h.hexdigest()


def read_cache(path: Path):
    """(dataset, stats, kept) from a finished cache entry, or None."""
    if not (path / "meta.json").is_file():
        return None
    import datasets

    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        return datasets.load_from_disk(str(path / "dataset")), meta["stats"], meta["kept"]
    except (OSError, ValueError, KeyError):
        return None  # damaged entry: tokenize again (and overwrite it)


def write_cache(path: Path, dataset, stats: dict, kept: list[int]):
    """Save under a temporary name, then rename: a reader never sees half an entry. Returns the dataset
    (memory-mapped from the cache when written) and whether it was written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    except OSError:
        return dataset, False  # read-only cache location: train from memory
    try:
        with progress_bars(len(dataset) >= 20_000):
            dataset.save_to_disk(str(staging / "dataset"))
        (staging / "meta.json").write_text(json.dumps({"stats": stats, "kept": kept}), encoding="utf-8")
        shutil.rmtree(path, ignore_errors=True)  # a damaged entry of the same key
        os.replace(staging, path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (path / "meta.json").is_file():
            return dataset, False
    cached = read_cache(path)
    return (cached[0], True) if cached else (dataset, False)


# --------------------------------------------------------------------------- the `data` command


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
    from .model import load_tokenizer

    loaded = load_data(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
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


def say(console, line: str) -> None:
    """One plain line: no markup (messages hold [brackets]), no hard wrap (lines stay greppable). A lone
    surrogate quoted from the data is printed as its escape: the terminal could not encode it."""
    line = line.encode("utf-8", "backslashreplace").decode("utf-8")
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def describe_stats(rows: dict, tokens: dict) -> list[str]:
    """The statistics block of the `data` command, one line per topic."""
    def counts(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], str(kv[0])))) or "none"

    lines = [f"source   {entry}: {s['valid']} valid of {s['rows']} read ({s['shape'] or '?'}), {s['used']} used"
             for entry, s in rows["sources"].items()]
    lines += [
        f"rows     {rows['train_rows']} train, {rows['heldout_rows']} held out; mixing: {rows['mixing']}",
        f"shapes   {counts(rows['shapes'])}",
        f"reasoning languages (train)  {counts(rows['reasoning_languages'])}",
        f"skipped  {rows['skipped_rows']} rows" + (f" ({counts(rows['skipped'])})" if rows["skipped"] else ""),
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
