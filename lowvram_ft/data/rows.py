"""Row shapes: recognise a row's shape and normalise it into a Conversation (or PlainText), with every
problem located by field.

Rules decided here:
- Every rule about a row is checked while reading it, before any model or tokenizer loads, so
  `data --check` reports everything `data` and `train` would refuse: among them text that is not valid
  Unicode (a lone surrogate such as a JSON "\\ud800" escape) and, in conversations, Harmony control tokens
  (`<|start|>`, `<|end|>`, ...), which would be read as chat structure rather than text.
- A file's shape is the one most of its rows have (data.format forces one): a row of another shape is
  one located problem, not a reason to misread the others.
- Role order: system/developer turns only before the first user turn; the first turn after them is a
  user turn; consecutive user turns are allowed (rendered as separate turns); two assistant turns in a
  row are not (merge them); a tool turn follows an assistant or tool turn; at least one assistant turn,
  and no assistant turn with an empty answer.
- Prompts (train.method=grpo reads only the instructions and the user turn): the answer columns may be
  absent (PROMPT_NEEDS) and a conversation needs no assistant turn; every other rule holds.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from ..conversation import REASONING_EFFORTS, ROLES, Conversation, Message
from ..harmony import CONTROL_TOKENS
from .problems import Issues, Problem, type_name

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
# The columns a prompt needs where they differ from SHAPES' (the answer is optional for GRPO's prompts).
PROMPT_NEEDS: dict[str, tuple[str, ...]] = {"multilingual_thinking": ("user",), "alpaca": ("instruction",)}
# Role names accepted in messages / conversations: unsloth's standardize_sharegpt aliases (compared
# case-insensitively, stripped) plus Harmony's developer and tool.
ROLE_ALIASES = {
    "system": "system", "developer": "developer", "user": "user", "human": "user", "input": "user",
    "assistant": "assistant", "gpt": "assistant", "output": "assistant", "tool": "tool",
}
REASONING_KEYS = ("thinking", "reasoning_content", "reasoning")
LANGUAGE_LINE = re.compile(r"[ \t]*reasoning language:[ \t]*(\S[^\n]*?)[ \t]*(?:\r?\n|$)", re.IGNORECASE)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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


def detect_shape(columns: list[str], forced: str, label: str, prompts: bool = False) -> tuple[str | None, Problem | None]:
    """The row shape from the columns (or data.format); a problem naming what was found otherwise."""
    found = ", ".join(columns) or "(none)"
    rename = "rename columns with data.columns={old: new}"
    if forced != "auto":
        missing = [c for c in needed_columns(forced, prompts) if c not in columns]
        if missing:
            return None, Problem(label, None, f"missing column {', '.join(missing)} for the {forced} shape "
                                 f"(data.format={forced}); columns found: {found}",
                                 f"{rename} or choose another data.format", "missing column", fatal=True)
        return forced, None
    shape, complete = closest_shape(columns, prompts)
    if complete:
        return shape, None
    if shape:
        missing = [c for c in needed_columns(shape, prompts) if c not in columns]
        return None, Problem(label, None, f"looks like the {shape} shape but has no column {', '.join(missing)}; "
                             f"columns found: {found}", f"{rename} or set data.format", "missing column", fatal=True)
    expected = "messages | conversations | user+final | instruction+output | text"
    return None, Problem(label, None, f"cannot tell the row shape from the columns ({found}); expected {expected}",
                         f"{rename} or set data.format", "missing column", fatal=True)


def closest_shape(columns: list[str], prompts: bool = False) -> tuple[str | None, bool]:
    """(the first shape, in SHAPES order, whose needed columns are all there, True), else (the shape
    sharing the most columns, False), else (None, False)."""
    for shape in SHAPES:
        if all(c in columns for c in needed_columns(shape, prompts)):
            return shape, True
    hits, shape = max((sum(c in columns for c in needed + optional), shape)
                      for shape, (needed, optional) in SHAPES.items())
    return (shape if hits else None), False


def file_shape(rows: list[dict], columns: list[str], forced: str, label: str,
               prompts: bool = False) -> tuple[str | None, Problem | None]:
    """data.format, else the shape most rows come closest to (the earliest on a tie) — so one stray row
    cannot change how the others are read. When no row has every column of a shape, detect_shape on all
    the columns explains what is missing."""
    guesses = [closest_shape(filled(row), prompts) for row in rows]
    if forced != "auto" or not any(complete for _, complete in guesses):
        return detect_shape(columns, forced, label, prompts)
    votes = Counter(shape for shape, _ in guesses if shape)
    return votes.most_common(1)[0][0], None  # most_common keeps first-seen order among equal counts


def stray_row(row: dict, shape: str, where: str, number: int, prompts: bool = False) -> Problem | None:
    """A row complete in another shape that lacks a column of the file's shape: one problem naming both
    shapes, instead of a misleading 'missing' for each column."""
    own, complete = closest_shape(filled(row), prompts)
    needed = needed_columns(shape, prompts)
    if not complete or own == shape or all(c in filled(row) for c in needed):
        return None
    return Problem(where, None, f"a row of the {own} shape ({' + '.join(needed_columns(own, prompts))}) among rows of the "
                   f"{shape} shape ({' + '.join(needed)})", "write it like the other rows or move it to a file of "
                   "its own", "other shape", row=number)


def filled(row: dict) -> list[str]:
    """The columns of a row that hold a value."""
    return [k for k, v in row.items() if v is not None]


def needed_columns(shape: str, prompts: bool = False) -> tuple[str, ...]:
    """The columns every row of `shape` must have: for prompts only (GRPO), not the answer's."""
    return PROMPT_NEEDS.get(shape, SHAPES[shape][0]) if prompts else SHAPES[shape][0]


def parse_row(row: dict, shape: str, prompts: bool = False) -> tuple[Conversation | PlainText | None, Issues]:
    """One row of a known shape as a Conversation (PlainText for `text`), or the problems found.
    prompts: read for GRPO, the answer optional (a conversation may end at its user turn)."""
    issues = Issues()
    item = PARSERS[shape](row, issues, prompts)
    return (None if issues else item), issues


def parse_text(row: dict, issues: Issues, prompts: bool = False) -> PlainText | None:
    """Plain text is tokenized as it is: it may hold rendered Harmony on purpose, so control tokens stay."""
    text = text_field(row, "text", issues, "text", control_tokens=False)
    if text is not None and not text.strip():
        issues.add("text", "empty text", "fill it or remove the row", "empty text")
    return PlainText(text) if text else None


def parse_multilingual_thinking(row: dict, issues: Issues, prompts: bool = False) -> Conversation | None:
    columns = read_columns(row, issues, "multilingual_thinking", ("user", "final"), ("analysis", "developer"), prompts)
    if columns is None:
        return None
    return single_turn(row, issues, columns["developer"], columns["user"], "final", columns["final"],
                       columns["analysis"] or None, prompts)


def parse_alpaca(row: dict, issues: Issues, prompts: bool = False) -> Conversation | None:
    columns = read_columns(row, issues, "alpaca", ("instruction", "output"), ("input", "system"), prompts)
    if columns is None:
        return None
    extra = columns["input"]
    prompt = columns["instruction"] + (f"\n\n{extra}" if extra and extra.strip() else "")
    return single_turn(row, issues, columns["system"], prompt, "output", columns["output"], prompts=prompts)


def read_columns(row: dict, issues: Issues, shape: str, required: tuple[str, ...],
                 optional: tuple[str, ...], prompts: bool = False) -> dict[str, str | None] | None:
    """The text columns of a single-turn shape, or None when any of them has a problem; for prompts the
    answer column is optional too."""
    if prompts:
        optional += tuple(key for key in required if key not in needed_columns(shape, prompts))
        required = needed_columns(shape, prompts)
    columns = {key: text_field(row, key, issues, shape) for key in required}
    columns.update({key: text_field(row, key, issues, shape, required=False) for key in optional})
    return None if issues else columns


def single_turn(row: dict, issues: Issues, system: str | None, prompt: str, answer_key: str, answer: str | None,
                reasoning: str | None = None, prompts: bool = False) -> Conversation | None:
    """[system,] user, assistant from one row's columns; an empty answer is a problem at `answer_key`
    (for prompts: no assistant turn)."""
    instructions = [Message("system", system)] if system and system.strip() else []
    if prompts and not (answer or "").strip():
        return finish_conversation(row, [*instructions, Message("user", prompt)], issues)
    if not answer.strip():
        issues.add(answer_key, "empty assistant answer", "give the answer text or remove the row",
                   "empty assistant turn")
        return None
    messages = [*instructions, Message("user", prompt), Message("assistant", answer, reasoning)]
    return finish_conversation(row, messages, issues)


def parse_messages(row: dict, issues: Issues, prompts: bool = False, key: str = "messages") -> Conversation | None:
    """OpenAI `messages` ({role, content, thinking|reasoning_content|reasoning}) or, with
    key='conversations', ShareGPT ({from, value}); inline <think>…</think> becomes the reasoning."""
    turns = read_turns(row.get(key), key, issues)
    if issues:
        return None
    check_order(turns, key, issues, prompts)
    if issues:
        return None
    return finish_conversation(row, [message for _, _, message in turns], issues)


def parse_sharegpt(row: dict, issues: Issues, prompts: bool = False) -> Conversation | None:
    return parse_messages(row, issues, prompts, key="conversations")


PARSERS: dict[str, Callable[[dict, Issues, bool], Conversation | PlainText | None]] = {
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


def check_order(turns: list[tuple[str, str, Message]], key: str, issues: Issues, prompts: bool = False) -> None:
    """The role-order rules in the module docstring; one problem per offending turn. Prompts need no
    assistant turn, and theirs are never read (an empty one is no problem)."""
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
            if not message.content.strip() and not prompts:
                issues.add(content_path, "empty assistant turn", "give the answer text or remove the turn",
                           "empty assistant turn")
        started, previous = True, role
    if not answers and turns and not prompts:
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
    gold = read_gold(row, issues)
    if issues:
        return None
    language = (column.strip() if column and column.strip() else None) or from_line
    return Conversation(tuple(messages), reasoning_language=language, reasoning_effort=effort, gold=gold)


def read_gold(row: dict, issues: Issues) -> str | None:
    """The optional gold answer column (text or a number; empty or absent = None), for GRPO's accuracy."""
    value = row.get("gold")
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        issues.add("gold", f"gold answer is {type_name(value)}", "give it as text or a number", "bad value")
        return None
    return str(value).strip() or None


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
    the message, so the line breaks between the language line and the rest become that one blank line.
    It is the form gpt-oss is prompted with at inference (evaluate, chat), so training and serving agree.
    A message holding only the language line keeps its trailing line breaks, as openai-harmony renders
    the same text (Conversation.developer_text writes blank instruction text right after the line)."""
    if not messages or messages[0].role not in ("system", "developer"):
        return messages, None
    first = messages[0]
    match = LANGUAGE_LINE.match(first.content)
    if not match:
        return messages, None
    rest = first.content[match.end():].lstrip("\r\n")
    if not rest.strip():  # only line breaks (or nothing) after the line: kept as they stand
        rest = first.content[match.end(1):].lstrip(" \t")
    kept = [Message(first.role, rest)] if rest else []
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
