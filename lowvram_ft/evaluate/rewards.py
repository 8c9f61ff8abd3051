"""Rewards for reinforcement learning (GRPO), built on the evaluation's scorer: plain completions in,
numbers out. Pure logic, no model: the training room (train/grpo.py) wraps each in TRL's signature and
`score --rewards` applies them to a completions file offline.

What each pays, and why it cannot be gamed cheaply:

- `language` ∈ [0, 1]: the target-language share of the reasoning, weighted by letters (a CJK
  character weighs CJK_WEIGHT Latin letters, as in the scorer), judged sentence by sentence with the
  evaluation's `identify_sentence`. Letters, not sentence counts, so that many short target sentences
  around one long English run do not pay. A sentence is paid for only when a reader would call it the
  target language: it is identified as the target *and* the target's script holds at least
  TARGET_SCRIPT_SHARE of its weighted letters. The scorer's CJK weight lets an English sentence
  sprinkled with a dozen kana be identified as Japanese; this rule does not pay for it. Sentences too
  short to identify still count in the total: they are paid when written in the target's script
  (a short English aside in Japanese reasoning costs), and for a Latin-script target any short
  Latin sentence is paid (its language cannot be told). It is 0 when the completion does not parse,
  was cut off, has no reasoning, has fewer than MIN_REASONING_LETTERS letters of judgeable prose, or
  keeps less than MIN_PROSE_SHARE of its letters outside code and LaTeX (reasoning hidden there).
- `format` ∈ {0, 1}: the completion parses (Harmony channels, or a closed `<think>`), was not cut
  off, and has non-empty reasoning and a non-empty answer.
- `answer_language` ∈ {0, 1} or None: the answer's language (by judged sentences) is the user's
  (answer_in="user") or the target (answer_in="target"); 0 when unparsed, cut off or without an
  answer; None when the answer is too short to judge (a bare number).
- `accuracy` ∈ {0, 1} or None: the answer matches the gold answer (last number equal, or the
  normalised gold text contained in the answer); None for a row without a gold answer, which TRL then
  leaves out of that reward.
- `repetition` (training only: TRL's token-id penalty, `trl.rewards.get_repetition_penalty_reward`,
  which needs the completion's token ids) lives in train/grpo.py.
"""
from __future__ import annotations

import importlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

from .languages import LANGUAGES, normalize_language
from ..errors import UserError
from .scoring import (CJK_SCRIPTS, CJK_WEIGHT, Parsed, identify_text, judge_sentences, parse_completion,
                      parse_think, script_letters)

REWARD_NAMES = ("language", "format", "answer_language", "accuracy", "repetition")
TEXT_REWARDS = ("language", "format", "answer_language", "accuracy")  # computable from text alone
TARGET_SCRIPT_SHARE = 0.6     # a target sentence must be mostly (this share of weighted letters) target script
MIN_REASONING_LETTERS = 40    # fewer weighted letters of judgeable prose: too short to pay for
MIN_PROSE_SHARE = 0.5         # less of the reasoning's letters left after removing code/LaTeX: hidden


class RewardError(UserError, ValueError):
    """A reward that cannot be built (an unknown name, an unimportable module:function); one line, exit 2."""


@dataclass(frozen=True)
class Sample:
    """One completion to reward. `completion` is the raw text with special tokens kept; `truncated`:
    the token limit cut it (None: unknown, judged from the text). `harmony` says how to split it."""

    completion: str
    target_language: str
    user_language: str = "en"
    gold: str | None = None
    truncated: bool | None = None
    harmony: bool = True


def split(sample: Sample) -> Parsed:
    """Reasoning and answer of a completion: Harmony channels, or <think> tags when the completion
    has them (or the sample is not Harmony)."""
    text = sample.completion
    if not sample.harmony or "</think>" in text or text.lstrip().startswith("<think>"):
        return parse_think(text, stopped=not sample.truncated)
    return parse_completion(text, stopped=sample.truncated or None)


def usable(parsed: Parsed) -> bool:
    return parsed.parsed_ok and not parsed.truncated


def weighted(counts: Counter) -> float:
    return sum(n * (CJK_WEIGHT if script in CJK_SCRIPTS else 1) for script, n in counts.items())


def target_scripts(code: str) -> tuple[str, ...]:
    script = LANGUAGES[code][1]
    return CJK_SCRIPTS if script == "cjk" else (script,)


def language_reward(parsed: Parsed, target_language: str) -> float:
    """The letter-weighted target share of the reasoning, gated (see the module docstring)."""
    if not usable(parsed) or not parsed.analysis or not parsed.analysis.strip():
        return 0.0
    target = normalize_language(target_language)
    scripts = target_scripts(target)
    paid = total = 0.0
    for sentence, language in judge_sentences(parsed.analysis):
        counts = script_letters(sentence)
        letters = weighted(counts)
        total += letters
        in_script = weighted(Counter({s: counts[s] for s in scripts}))
        if language is None:
            paid += letters if letters and in_script / letters >= TARGET_SCRIPT_SHARE else 0.0
        elif language == target and in_script / letters >= TARGET_SCRIPT_SHARE:
            paid += letters
    raw = weighted(script_letters(unicodedata.normalize("NFC", parsed.analysis)))
    if total < MIN_REASONING_LETTERS or total < MIN_PROSE_SHARE * raw:
        return 0.0
    return paid / total


def format_reward(parsed: Parsed) -> float:
    ok = usable(parsed) and bool(parsed.analysis and parsed.analysis.strip()) and bool(parsed.final and parsed.final.strip())
    return 1.0 if ok else 0.0


def answer_language_reward(parsed: Parsed, expected_language: str) -> float | None:
    if not usable(parsed) or not parsed.final or not parsed.final.strip():
        return 0.0
    answer = identify_text(parsed.final)
    if answer.dominant is None:
        return None
    return 1.0 if answer.dominant == normalize_language(expected_language) else 0.0


_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)?")


def accuracy_reward(parsed: Parsed, gold: str | None) -> float | None:
    """1.0 when the answer's last number equals the gold's (or, for a gold without a number, the
    normalised gold text is in the answer); None without a gold answer."""
    if gold is None or not str(gold).strip():
        return None
    if not usable(parsed) or not parsed.final:
        return 0.0
    final = unicodedata.normalize("NFKC", parsed.final)
    gold_text = unicodedata.normalize("NFKC", str(gold)).strip()
    gold_numbers = _NUMBER.findall(gold_text)
    if gold_numbers:
        numbers = _NUMBER.findall(final.replace(",", ""))
        return 1.0 if numbers and float(numbers[-1]) == float(gold_numbers[-1].replace(",", "")) else 0.0
    return 1.0 if gold_text.casefold() in final.casefold() else 0.0


def text_rewards(sample: Sample, answer_in: str = "user") -> dict[str, float | None]:
    """Every reward computable from the text, for one sample."""
    expected = sample.user_language if answer_in == "user" else sample.target_language
    return parsed_rewards(split(sample), sample.target_language, expected, sample.gold)


def parsed_rewards(parsed: Parsed, target_language: str, expected_answer_language: str,
                   gold: str | None = None) -> dict[str, float | None]:
    return {
        "language": language_reward(parsed, target_language),
        "format": format_reward(parsed),
        "answer_language": answer_language_reward(parsed, expected_answer_language),
        "accuracy": accuracy_reward(parsed, gold),
    }


def line_rewards(row: Mapping, answer_in: str = "user") -> dict:
    """{"rewards": {...}} for one checked line of a `score` input file (`completion`, or `analysis` /
    `final`; `target_language`, optional `user_language`, `truncated` / `stopped`, `gold`)."""
    cut = bool(row.get("truncated")) or bool(row.get("stopped"))
    user = row.get("user_language") or "en"
    gold = row.get("gold")
    gold = None if gold is None else str(gold)
    if "completion" in row:
        sample = Sample(row["completion"], row["target_language"], user, gold, truncated=cut or None)
        return {"rewards": text_rewards(sample, answer_in)}
    parsed = Parsed(row.get("analysis"), row.get("final"), parsed_ok=True, truncated=cut)
    expected = user if answer_in == "user" else row["target_language"]
    return {"rewards": parsed_rewards(parsed, row["target_language"], expected, gold)}


def check_rewards(names, languages) -> list[str]:
    """Problems of grpo.rewards / grpo.languages, one line each: a name that is neither a reward of
    REWARD_NAMES nor a module:function; a module:function that cannot be imported, or raises on one
    probe completion; a language the scorer cannot judge."""
    problems = []
    for name in names:
        if ":" in name:
            try:
                probe_user_reward(load_user_reward(name), name)
            except RewardError as error:
                problems.append(str(error))
        elif name not in REWARD_NAMES:
            problems.append(f"grpo.rewards: unknown reward {name!r} — accepted: {', '.join(REWARD_NAMES)}, "
                            "or module:function of your own")
    for language in languages:
        try:
            normalize_language(language)
        except ValueError as error:
            problems.append(f"grpo.languages: the scorer cannot judge {language!r} ({error})")
    return problems


def load_user_reward(spec: str):
    """The callable named by 'module:function' (TRL's reward signature); RewardError saying why not."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 — any failure importing user code is bad input
        raise RewardError(f"grpo.rewards: cannot import {module_name!r} for {spec!r} ({type(error).__name__}: "
                          f"{error}) — put the module on PYTHONPATH") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise RewardError(f"grpo.rewards: {module_name!r} has no function {attr!r} — name a callable as module:function")
    return function


def probe_user_reward(function, spec: str) -> None:
    """Call a user's reward once on a made-up completion, as TRL will: it must return one number (or
    None) per completion. RewardError with its exception otherwise."""
    kwargs = {"prompts": ["<|start|>user<|message|>1+1?<|end|><|start|>assistant"],
              "completions": ["<|channel|>analysis<|message|>1+1=2.<|end|><|start|>assistant<|channel|>final<|message|>2<|return|>"],
              "completion_ids": [[0, 1, 2]], "target_language": ["ja"], "user_language": ["en"], "gold": [None],
              "trainer_state": None}
    try:
        values = function(**kwargs)
    except Exception as error:  # noqa: BLE001 — the user's code failing is bad input
        raise RewardError(f"grpo.rewards: {spec} raised {type(error).__name__}: {error} on a probe completion — "
                          "it is called as f(prompts=, completions=, completion_ids=, **columns)") from None
    ok = isinstance(values, (list, tuple)) and len(values) == 1 and (values[0] is None or isinstance(values[0], (int, float)))
    if not ok:
        raise RewardError(f"grpo.rewards: {spec} returned {values!r} for one completion — return a list with one "
                          "number (or None) per completion")
