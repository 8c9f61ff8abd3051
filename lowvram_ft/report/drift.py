"""The drift view's data: each evaluated sample's reasoning cut into the sentences the scorer judged
(`scoring.judge_sentences`), each with the language it was given, and the text between them (code,
math, removed noise) kept as unjudged fragments, so the whole trace is shown as it was generated.
Samples of several columns (base / tuned, or run A / run B) are paired on the same prompt, requested
language and sample number. Pure: plain values in, plain values out."""
from __future__ import annotations

import unicodedata

from ..evaluate.languages import LANGUAGES
from ..evaluate.scoring import judge_sentences


def trace_segments(text: str | None) -> list[dict]:
    """`text` as consecutive segments {text, language}: the scorer's sentences with their language
    (None: too short to judge) and, between them, what the scorer removed before judging (language
    None, judged False). Joined, the segments give back `text` (NFC-normalised)."""
    if not text:
        return []
    source = unicodedata.normalize("NFC", text)
    segments: list[dict] = []
    position = 0
    for sentence, language in judge_sentences(source):
        span = locate(source, sentence, position)
        if span is None:
            continue
        start, end = span
        if start > position:
            segments.append({"text": source[position:start], "language": None, "judged": False})
        segments.append({"text": source[start:end], "language": language, "judged": language is not None})
        position = end
    if position < len(source):
        segments.append({"text": source[position:], "language": None, "judged": False})
    return segments


def locate(source: str, sentence: str, position: int) -> tuple[int, int] | None:
    """Where the judged `sentence` lies in `source`, searching from `position`. The scorer only removes
    characters (code, math, emphasis) and collapses spaces, so the sentence's characters appear in order:
    the span starts at its first word and ends at its last character, matched one by one."""
    chars = [c for c in sentence if not c.isspace()]
    if not chars:
        return None
    first_word = sentence.split()[0]
    start = source.find(first_word, position)
    if start < 0:
        start = source.find(chars[0], position)
    if start < 0:
        return None
    end = start
    for c in chars:
        found = source.find(c, end)
        if found < 0:
            return None
        end = found + 1
    return start, end


def sample_key(sample: dict) -> tuple:
    return str(sample.get("prompt_id")), str(sample.get("target_language")), int(sample.get("sample") or 0)


def drift_items(columns: list[tuple[str, list[dict]]]) -> dict:
    """Pair the samples of each (title, samples) column by prompt, requested language and sample
    number. Each item: its key, prompt, category, requested language (code and name), `changed` (the
    reasoning's language or its match differs between the first and the last column) and one cell per
    column (None where that column lacks the sample)."""
    indexed = [{sample_key(s): s for s in samples} for _title, samples in columns]
    keys = list(dict.fromkeys(k for index in indexed for k in index))
    items = []
    for key in keys:
        cells = [cell(index.get(key)) for index in indexed]
        anyone = next(index[key] for index in indexed if key in index)
        present = [c for c in cells if c is not None]
        changed = len(present) > 1 and ((present[0]["think_language"], present[0]["think_match"])
                                         != (present[-1]["think_language"], present[-1]["think_match"]))
        items.append({
            "key": "|".join(map(str, key)), "prompt_id": key[0], "target_language": key[1],
            "target_name": language_name(key[1]), "sample": key[2], "category": anyone.get("category"),
            "user": anyone.get("user"), "changed": changed, "cells": cells,
        })
    return {"columns": [title for title, _ in columns], "items": items,
            "languages": sorted({item["target_language"] for item in items})}


def cell(sample: dict | None) -> dict | None:
    if sample is None:
        return None
    return {
        "think_language": sample.get("think_language"),
        "think_match": sample.get("think_match"),
        "think_share": sample.get("think_share"),
        "scorable": sample.get("scorable"),
        "truncated": bool(sample.get("truncated")),
        "parsed_ok": sample.get("parsed_ok", True),
        "analysis": trace_segments(sample.get("analysis")),
        "final": sample.get("final"),
        "raw": None if sample.get("analysis") or sample.get("final") else sample.get("completion"),
    }


def language_name(code: str | None) -> str:
    if code is None:
        return "not judged"
    return LANGUAGES[code][0] if code in LANGUAGES else code
