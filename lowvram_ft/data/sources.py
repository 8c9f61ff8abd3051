"""Sources: read each data.dataset entry (a local .jsonl / .json / .csv / .parquet file, the shipped
sample, or a Hub data set) into rows, rename columns, decide the file's shape and parse every row.

A .json file holding one object that is itself a row (e.g. one {"messages": [...]}) is one row.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import SAMPLE_DATASET, Config
from .problems import Problem, first_line, type_name
from .rows import Example, closest_shape, file_shape, filled, parse_row, stray_row

SAMPLE_FILE = Path(__file__).parent.parent / "assets" / "sample_train.jsonl"
SAMPLE_HELDOUT_FILE = Path(__file__).parent.parent / "assets" / "sample_heldout.jsonl"
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


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
    prompts = cfg.train.method == "grpo"  # GRPO reads the prompts only: the answers may be absent
    result.shape, problem = file_shape([row for _, row in rows], result.columns, cfg.data.format, label, prompts)
    if problem:
        result.problems.append(problem)
        return result
    parse_rows(rows, result, prompts)
    return result


def shipped_heldout(cfg: Config) -> list:
    """The sample set's fixed held-out file (never trained on): the evaluation rows of the demo."""
    result = read_source(str(SAMPLE_HELDOUT_FILE), cfg)
    return list(result.examples)


def parse_rows(rows: list[tuple[int, dict]], result: SourceResult, prompts: bool = False) -> None:
    """Each row under the file's shape: an Example, or its located problems (a row of another shape is
    one problem). Problems end up in row order."""
    for number, row in rows:
        where = f"{result.label}:{number}"
        stray = stray_row(row, result.shape, where, number, prompts)
        if stray:
            result.problems.append(stray)
            continue
        item, issues = parse_row(row, result.shape, prompts)
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
                            "--local-dir DIR) and pass a local file, e.g. --dataset DIR/train.jsonl, or try the "
                            "tool on the shipped sample with --dataset sample",
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


def empty_data_problem(results: list[SourceResult], problems: list[Problem]) -> str:
    skipped = Counter(p.where for p in problems if not p.fatal)
    counts = ", ".join(f"{r.label}: {r.rows_read} read" for r in results)
    return (f"data.dataset: no usable rows ({counts}; {len(skipped)} invalid) — fix the invalid rows "
            "(python -m lowvram_ft data --check lists them) or check data.weights")
