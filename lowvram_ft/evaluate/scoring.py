"""Offline reasoning-language scoring: Harmony parsing, per-sentence language identification,
per-sample scores, Wilson intervals and before/after tables. Pure logic, no model.

How a trace is judged (the rules the numbers in a report rest on):

- Code, LaTeX, URLs, e-mail addresses and bare math/number runs are removed first
  (`clean_for_langid`); what is left is split into sentences (`split_sentences`).
- Each sentence is judged on its own (`identify_sentence`); a whole trace is never handed to the
  identifier in one call, because one Japanese sentence at the end of an English trace would flip it.
- The writing system decides first. Letters are counted per script, a CJK character weighing
  `CJK_WEIGHT` Latin letters (it is about one syllable, which Latin spells in about three letters), so
  a Japanese sentence with English terms in it stays Japanese. If CJK dominates:
  any hangul (more than kana) -> ko, any kana -> ja, Han only -> zh unless a Japanese-only kanji form
  (shinjitai such as 検, 関, 図) appears -> ja. Cyrillic, Arabic, Devanagari, Greek, Hebrew and Thai
  give ru, ar, hi, el, he, th. Only Latin-script sentences go to py3langid, which chooses among
  `LATIN_IDENTIFIED`: every Latin-script language of `LANGUAGES` and the close neighbours of each
  (`LATIN_NEIGHBOURS`: pt/gl/ca for es, nl/af/lb for de, ro/ca/es for it, ca for fr, …), whether
  or not they were asked for. So a model drifting into a neighbouring language is seen doing it:
  Portuguese reasoning asked for in Spanish is pt, not a Spanish match. (A sentence in a Latin-script
  language outside that set is still given the nearest language in it.)
- Too short to judge (None): fewer than `MIN_LETTERS` (12) letters of the dominant alphabetic
  script, a lone letter such as the x in "x = 3" not counted, or fewer than `MIN_CJK_CHARS` (4) CJK
  characters. This is the papers' "<= 15 characters count as consistent" rule, measured in letters
  after cleaning instead of raw characters: `Okay.` and `x = 3 + 4.` are never judged, "We verify
  this." (12 letters) is.
- A text's language (`identify_text`) is the one with the most judged sentences (each judged sentence
  counts once, whatever its length); ties go to the language with more letters, then by code.
- Reasoning matches when its language is the target; its share is its target sentences over its judged
  ones. A sentence identified as any other language, a neighbour outside `LANGUAGES` (gl, ca, ro, …)
  included, counts against the target.
- A sample whose completion was cut off or could not be parsed is not scored as wrong language: it is
  excluded from the match rates and counted separately.
"""
from __future__ import annotations

import functools
import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import UserError
from ..io import write_jsonl
from .languages import LATIN_IDENTIFIED, SCRIPT_LANGUAGE, UNDETERMINED, normalize_language
from .statistics import aggregate

MIN_LETTERS = 12     # alphabetic scripts: fewer letters (after cleaning) -> too short to judge
MIN_CJK_CHARS = 4    # CJK: fewer characters -> too short to judge
CJK_WEIGHT = 3       # one CJK character counts as this many letters when scripts compete

ANSWER_IN = ("user", "target")


# ---------------------------------------------------------------------------------------------
# Harmony parsing

_SPECIAL = re.compile(r"<\|(start|end|message|channel|constrain|return|call|endoftext|startoftext)\|>")
_TERMINATORS = {"end", "return", "call", "endoftext"}
# Decoded with skip_special_tokens=True, gpt-oss output reads "analysisWe…assistantfinalThe…": the
# text follows the channel name directly. A space or lowercase letter there means an ordinary word
# ("finally", "analysis of"), not a header.
_BARE_FIRST = re.compile(r"(analysis|commentary|final)(?=[^\sa-z])")
_BARE_NEXT = re.compile(r"assistant(analysis|commentary|final)(?=[^\sa-z])")


@dataclass(frozen=True)
class Parsed:
    """One assistant completion split into Harmony channels.

    analysis: the analysis messages joined by a blank line (None when there was none); commentary is
    ignored. final: the final message(s) (None when missing). parsed_ok: at least one channel header
    was found. truncated: the output stopped inside a message or header (no <|end|>, <|return|> or
    <|call|> closed it) or the caller said the token limit was hit.
    """

    analysis: str | None
    final: str | None
    parsed_ok: bool
    truncated: bool


def parse_completion(text: str, stopped: bool | None = None) -> Parsed:
    """Parse raw assistant text generated after `...<|start|>assistant` (special tokens verbatim).

    Also accepted: text that still starts with `<|start|>assistant`, a whole decoded conversation
    (non-assistant messages are skipped), tool calls ending in `<|call|>`, and the form decoded with
    special tokens skipped (`analysis…assistantfinal…`), whose truncation only `stopped` can tell.
    """
    if not _SPECIAL.search(text):
        return _parse_bare(text, stopped)
    messages: list[tuple[str | None, str]] = []  # (channel, content) of assistant messages
    role, channel, content = "assistant", None, None
    header_seen, open_tail = False, False
    pieces = _SPECIAL.split(text)
    # pieces: [text, token, text, token, text, ...]
    for i in range(1, len(pieces), 2):
        token, after = pieces[i], pieces[i + 1]
        if token == "startoftext":
            continue
        if token == "start":
            role, channel, content = (after.split() or [""])[0], None, None
        elif token == "channel":
            channel = (after.split() or [""])[0]
            header_seen = header_seen or role == "assistant"
        elif token == "message":
            content = after
        elif token in _TERMINATORS:
            if content is not None and role == "assistant":
                messages.append((channel, content))
            channel, content = None, None
        open_tail = token not in _TERMINATORS
    if open_tail and content is not None and role == "assistant":
        messages.append((channel, content))  # cut off mid-message: keep what was written
    truncated = bool(stopped) or open_tail
    return _collect(messages, parsed_ok=header_seen, truncated=truncated)


LEADING_THINK_TAGS = re.compile(r"^(\s*<think>)+")


def parse_think(text: str, stopped: bool) -> Parsed:
    """Split a `<think>reasoning</think>answer` completion (Qwen3, DeepSeek-R1; the opening tag may sit
    in the prompt). `stopped`: the model ended its turn (False = the token limit cut it). A completion
    still inside <think> is truncated when cut, unparsed when the model ended its turn there without an
    answer; one without tags is an answer without reasoning."""
    body = text
    for tail in ("<|im_end|>", "<|eot_id|>", "</s>", "<|endoftext|>"):
        body = body.replace(tail, "")
    if "</think>" in body:
        analysis, _, final = body.partition("</think>")
        # Tags a small model writes again (a second </think> in its answer) are not part of the text.
        return Parsed(analysis.replace("<think>", "").strip(), final.replace("</think>", "").strip(), True,
                      not stopped)
    if body.lstrip().startswith("<think>"):
        # The opening tag, and the same tag repeated right after it (a small model's stutter), go; the
        # text after them only grows, so chat's streamed view stays a prefix of it.
        return Parsed(LEADING_THINK_TAGS.sub("", body).strip(), None, not stopped, not stopped)
    return Parsed(None, body.strip(), True, not stopped)


def _parse_bare(text: str, stopped: bool | None) -> Parsed:
    """The form decoded without special tokens: `analysisWe need…assistantfinalThe answer…`.
    Nothing marks the end of a message there, so only `stopped` can say it was cut off."""
    body = text.lstrip()
    body = body[len("assistant"):] if body.startswith("assistant") else body
    first = _BARE_FIRST.match(body)
    if first is None:
        return Parsed(analysis=None, final=None, parsed_ok=False, truncated=bool(stopped))
    starts = [(first.group(1), first.end(), 0)]
    starts += [(m.group(1), m.end(), m.start()) for m in _BARE_NEXT.finditer(body, first.end())]
    messages = [(channel, body[begin:(starts[k + 1][2] if k + 1 < len(starts) else len(body))])
                for k, (channel, begin, _at) in enumerate(starts)]
    return _collect(messages, parsed_ok=True, truncated=bool(stopped))


def _collect(messages: list[tuple[str | None, str]], parsed_ok: bool, truncated: bool) -> Parsed:
    def joined(name: str) -> str | None:
        parts = [c.strip() for ch, c in messages if ch == name]
        return "\n\n".join(parts) if parts else None

    return Parsed(analysis=joined("analysis"), final=joined("final"), parsed_ok=parsed_ok, truncated=truncated)


# ---------------------------------------------------------------------------------------------
# Cleaning and sentence splitting

_FENCED_CODE = re.compile(r"(```|~~~).*?(?:\1|\Z)", re.S)
_DISPLAY_MATH = re.compile(r"\$\$.*?\$\$|\\\[.*?\\\]|\\begin\{([A-Za-z]+\*?)\}.*?\\end\{\1\}", re.S)
# $…$ by pandoc's rule (no space inside either dollar, no digit after the closing one), so "$5 and $10"
# stays text.
_INLINE_MATH = re.compile(r"\\\(.*?\\\)|(?<![\\$\w])\$(?=[^\s$])[^$\n]*?[^\s$\\]\$(?!\d)", re.S)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_URL = re.compile(r"\b(?:https?|ftp)://\S+|\bwww\.\S+", re.I)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+\*?")
_CODE_CHARS = re.compile(r"[=+*/^_<>{}\[\]|\\#@~$%&]")
_MATH_CHARS = re.compile(r"[0-9０-９=+*/^_<>{}\[\]|\\#@~$%&×÷±≤≥≠≈∑∫√∞→←⇒⇔·−–]")
_EMPHASIS = re.compile(r"(?<!\w)\*+|\*+(?!\w)")  # markdown **bold**, *italic*; a*b stays code-like
_EDGE_PUNCT = ".,;:!?\"'()[]«»“”‘’"


def clean_for_langid(sentence: str) -> str:
    """What is left of `sentence` for language identification: fenced and inline code, LaTeX
    ($…$, $$…$$, \\(…\\), \\[…\\], \\begin…\\end, stray \\commands), URLs, e-mail addresses,
    markdown emphasis, code-like tokens (snake_case, a.b, f(x), camelCase) and digit/operator runs
    removed (an unclosed ``` fence, as in a cut-off output, runs to the end); whitespace collapsed."""
    return " ".join(_strip_noise(sentence).split())


def _strip_noise(text: str) -> str:
    """clean_for_langid without collapsing newlines, so the result can still be split into lines."""
    text = unicodedata.normalize("NFC", text)
    text = _FENCED_CODE.sub("\n", text)
    text = _DISPLAY_MATH.sub("\n", text)
    text = _INLINE_MATH.sub(" ", text)
    text = _INLINE_CODE.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _EMAIL.sub(" ", text)
    text = _LATEX_COMMAND.sub(" ", text)
    text = _EMPHASIS.sub(" ", text)
    text = re.sub(r"[^\s]+", _drop_code_token, text)
    text = _MATH_CHARS.sub(" ", text)
    return "\n".join(re.sub(r"[ \t\f\v]+", " ", line).strip() for line in text.splitlines())


def _drop_code_token(match: re.Match) -> str:
    token = match.group(0)
    if not token.isascii():
        return token  # CJK and accented words: only their digits/operators go (char-level, later)
    core = token.strip(_EDGE_PUNCT)
    if not core:
        return token
    code_like = (
        not any(c.isalpha() for c in core)  # a lone operator: -, --, ...
        or any(c.isdigit() for c in core)
        or _CODE_CHARS.search(core)
        or re.search(r"[A-Za-z0-9][.(][A-Za-z0-9]", core)
        or re.search(r"[a-z][A-Z]", core)
    )
    # Keep sentence-ending punctuation so that splitting still sees the end of the sentence.
    return (" " + token[-1]) if code_like and token[-1] in ".!?" else (" " if code_like else token)


_SENTENCE_END = re.compile(r"[.!?…]+[\"'»”’)\]]*(?=\s|$)|[。！？]+[」』）】”’\"]*")
_BULLET = re.compile(r"^\s*(?:[-*•·+>]+|#+|\d+[.)]|[A-Za-z][.)](?=\s))\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: lines first (markdown bullets, numbers and headings stripped), then at
    . ! ? … followed by a space or the end, and after 。！？ (closing quotes/brackets stay with the
    sentence). A decimal point (3.14) does not end a sentence. Pieces without a letter or digit
    (left over from removed code or math) are dropped."""
    sentences = []
    for line in text.splitlines():
        line = _BULLET.sub("", line).strip()
        start = 0
        for m in _SENTENCE_END.finditer(line):
            sentences.append(line[start:m.end()].strip())
            start = m.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if any(c.isalnum() for c in s)]


# ---------------------------------------------------------------------------------------------
# Per-sentence identification

# Kanji forms used in Japanese but in neither simplified nor traditional Chinese (shinjitai, kokuji).
_JAPANESE_ONLY_KANJI = frozenset(
    "変関検円帰読単図気発駅楽広応経続総説実伝働込畑峠枠様薬鉄転軽価仏労営沢歩済県拡険験択訳駆観権歓"
    "悪亜圧囲緑処対剤雑焼従徳恵戸抜掲捜収斎暦歯瀬売覚譲豊賛辺遅郷録隠顔黒黙々〆"
)


# Letter -> script, by Unicode block. 々 and 〆 are Japanese marks, so they count as kana.
_SCRIPT_RANGES = (
    ("latin", ((0x0000, 0x024F), (0x1E00, 0x1EFF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF), (0xFF21, 0xFF5A))),
    ("kana", ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F), (0x3005, 0x3006))),
    ("han", ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF), (0x20000, 0x3FFFF))),
    ("hangul", ((0xAC00, 0xD7AF), (0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xD7B0, 0xD7FF))),
    ("cyrillic", ((0x0400, 0x052F),)),
    ("greek", ((0x0370, 0x03FF), (0x1F00, 0x1FFF))),
    ("hebrew", ((0x0590, 0x05FF),)),
    ("arabic", ((0x0600, 0x06FF), (0x0750, 0x077F), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF))),
    ("devanagari", ((0x0900, 0x097F),)),
    ("thai", ((0x0E00, 0x0E7F),)),
)
CJK_SCRIPTS = ("kana", "han", "hangul")


@functools.lru_cache(maxsize=4096)
def _script(ch: str) -> str:
    o = ord(ch)
    for script, ranges in _SCRIPT_RANGES:
        if any(lo <= o <= hi for lo, hi in ranges):
            return script
    return "other"


_LONE_LATIN_LETTER = re.compile(r"(?<![^\W\d_])[A-Za-zÀ-ɏ](?![^\W\d_])")


def _letter_counts(text: str) -> Counter:
    """Letters per script. A lone Latin letter is left out: it is mostly a variable (x, y, n)."""
    return Counter(_script(ch) for ch in _LONE_LATIN_LETTER.sub(" ", text) if ch.isalpha())


def _dominant_script(counts: Counter) -> tuple[str, int]:
    """(script, letters) of the dominant script, CJK pooled and weighted; ('', 0) without letters."""
    cjk = sum(counts[s] for s in CJK_SCRIPTS)
    weights = {s: n for s, n in counts.items() if s not in CJK_SCRIPTS}
    if cjk:
        weights["cjk"] = cjk * CJK_WEIGHT
    if not weights:
        return "", 0
    # Ties go to Latin: an even mix is usually a Latin sentence quoting CJK terms.
    script = max(weights, key=lambda s: (weights[s], s == "latin"))
    return script, (cjk if script == "cjk" else weights[script])


def _cjk_language(counts: Counter, text: str) -> str:
    """ko / ja / zh for a CJK sentence, by script alone (see the module docstring)."""
    if counts["hangul"] and counts["hangul"] >= counts["kana"]:
        return "ko"
    if counts["kana"]:
        return "ja"
    return "ja" if any(ch in _JAPANESE_ONLY_KANJI for ch in text) else "zh"


def identify_sentence(sentence: str) -> str | None:
    """Language code of one sentence, or None when too short to judge (see MIN_LETTERS,
    MIN_CJK_CHARS). Other scripts decide the language by themselves (ja, zh, ko, ru, …; 'und' for a
    script no language of LANGUAGES uses); a Latin-script sentence gets py3langid's choice among
    LATIN_IDENTIFIED, which may be a neighbour outside LANGUAGES (gl, ca, ro, …)."""
    cleaned = clean_for_langid(sentence)
    counts = _letter_counts(cleaned)
    script, letters = _dominant_script(counts)
    if script == "cjk":
        return _cjk_language(counts, cleaned) if letters >= MIN_CJK_CHARS else None
    if letters < MIN_LETTERS:
        return None
    if script != "latin":
        return SCRIPT_LANGUAGE.get(script, UNDETERMINED)
    latin_only = "".join(ch if not ch.isalpha() or _script(ch) == "latin" else " " for ch in cleaned)
    return _latin_identifier().classify(latin_only)[0]


@functools.lru_cache(maxsize=1)
def _latin_identifier():
    """py3langid restricted to LATIN_IDENTIFIED, in an instance of our own: the module-level
    identifier's set_languages would change it for every other user in the process."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as e:  # pragma: no cover - py3langid is a declared dependency
        raise ImportError("language scoring needs py3langid: pip install py3langid==0.4.0") from e
    identifier = LanguageIdentifier.from_model_file(MODEL_FILE)
    identifier.set_languages(sorted(LATIN_IDENTIFIED))
    return identifier


@dataclass(frozen=True)
class TextLanguage:
    """The language of a multi-sentence text, judged sentence by sentence.

    dominant: the language with the most judged sentences (None when none was judged).
    shares: judged sentences per language / judged. counts: judged sentences per language.
    judged / unjudged: sentences with a verdict / too short to judge.
    """

    dominant: str | None
    shares: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    judged: int = 0
    unjudged: int = 0


def judge_sentences(text: str | None) -> list[tuple[str, str | None]]:
    """Every sentence of `text` as the scorer judges it (code, math and URLs already removed, see
    `clean_for_langid`), with its language code or None when too short to judge. `identify_text`
    counts these verdicts; the run report colours the same sentences."""
    if not text:
        return []
    return [(sentence, identify_sentence(sentence)) for sentence in split_sentences(_strip_noise(text))]


def identify_text(text: str | None) -> TextLanguage:
    """Judge every sentence of `text` and report the dominant language by judged-sentence count
    (ties: more letters, then code order). Empty or None text -> TextLanguage(None)."""
    if not text:
        return TextLanguage(dominant=None)
    counts: Counter = Counter()
    letters: Counter = Counter()
    unjudged = 0
    for sentence, language in judge_sentences(text):
        if language is None:
            unjudged += 1
            continue
        counts[language] += 1
        letters[language] += sum(CJK_WEIGHT if _script(c) in CJK_SCRIPTS else 1 for c in sentence if c.isalpha())
    judged = sum(counts.values())
    if not judged:
        return TextLanguage(dominant=None, unjudged=unjudged)
    dominant = sorted(counts, key=lambda c: (-counts[c], -letters[c], c))[0]
    ordered = sorted(counts, key=lambda c: (-counts[c], c))
    return TextLanguage(
        dominant=dominant,
        shares={c: counts[c] / judged for c in ordered},
        counts={c: counts[c] for c in ordered},
        judged=judged,
        unjudged=unjudged,
    )


def script_letters(text: str) -> Counter:
    """Letters of `text` per script ('latin', 'kana', 'han', 'hangul', 'cyrillic', …) as written: no
    cleaning, no weighting (CJK_SCRIPTS names the scripts CJK_WEIGHT applies to)."""
    return Counter(_script(ch) for ch in text if ch.isalpha())



# ---------------------------------------------------------------------------------------------
# Per-sample scores

def score_sample(
    target_language: str,
    analysis: str | None = None,
    final: str | None = None,
    user_language: str = "en",
    answer_in: str = "user",
    *,
    parsed: Parsed | None = None,
    truncated: bool = False,
) -> dict:
    """Score one sample. Give `analysis`/`final` text, or a `parsed` completion (whose analysis,
    final, parsed_ok and truncated are then used).

    think_match: the reasoning's dominant language is the target (None when the sample is not
    scorable, has no analysis or no judged sentence). think_share: share of judged reasoning
    sentences in the target. answer_match: the final answer's dominant language is the user's
    (answer_in="user") or the target (answer_in="target"). A truncated or unparsed sample is not
    scorable: its matches are None (its detected languages are still reported).
    """
    if answer_in not in ANSWER_IN:
        raise ValueError(f"answer_in must be one of {ANSWER_IN}, got {answer_in!r}")
    target = normalize_language(target_language)
    user = normalize_language(user_language)
    parsed_ok = True
    if parsed is not None:
        if analysis is not None or final is not None:
            raise TypeError("score_sample: give either parsed or analysis/final, not both")
        analysis, final = parsed.analysis, parsed.final
        parsed_ok, truncated = parsed.parsed_ok, parsed.truncated or truncated
    expected = user if answer_in == "user" else target
    think = identify_text(analysis)
    answer = identify_text(final)
    scorable = parsed_ok and not truncated
    return {
        "target_language": target,
        "user_language": user,
        "parsed_ok": parsed_ok,
        "truncated": bool(truncated),
        "scorable": scorable,
        "has_analysis": bool(analysis and analysis.strip()),
        "think_language": think.dominant,
        "think_share": think.shares.get(target, 0.0) if think.judged else None,
        "think_sentences": think.judged,
        "think_match": (think.dominant == target) if scorable and think.judged else None,
        "answer_expected": expected,
        "answer_language": answer.dominant,
        "answer_match": (answer.dominant == expected) if scorable and answer.judged else None,
    }


# ---------------------------------------------------------------------------------------------
# The offline `score` command

class ScoreInputError(UserError, ValueError):
    """A bad completions file; the message is one line: FILE:LINE: what is wrong — what to do."""


def score_file(input_path: str | os.PathLike, output_path: str | os.PathLike, answer_in: str = "user",
               trained: Sequence[str] | None = None, zero_shot: Sequence[str] | None = None,
               extra: Callable[[dict, str], dict] | None = None) -> list[dict]:
    """Score every line of a completions.jsonl and write one JSON line per input line (its fields
    plus the scores of `score_sample`; language fields become codes) to `output_path`, atomically.
    A line gives `target_language` and either `completion` (raw Harmony text; it wins when both are
    there) or `analysis`/`final`; optional `user_language` (default English) and `truncated`/`stopped`.
    Returns the `aggregate` rows: pooled "trained" / "zero-shot" rows only for the languages given
    (completions come without a run, so by default which languages were trained is unknown and there
    are none). Every line is checked before anything is written; the first bad one raises
    ScoreInputError (the count of further bad lines is on the same line), as does an output that is
    the input file itself (it would be rewritten). `extra(line, answer_in)` adds fields to each output
    line (`score --rewards`: rewards.line_rewards)."""
    if answer_in not in ANSWER_IN:
        raise ValueError(f"answer_in must be one of {ANSWER_IN}, got {answer_in!r}")
    input_path, output_path = Path(input_path), Path(output_path)
    if is_same_file(input_path, output_path):
        raise ScoreInputError(f"--output {output_path} is the input file — name another file (the default is "
                              f"{input_path.name.removesuffix('.jsonl')}.scored.jsonl beside the input)")
    try:
        raw_lines = input_path.read_bytes().splitlines()
    except OSError as e:
        raise ScoreInputError(f"{input_path}:0: cannot read the file ({e.strerror}) — check the path") from None
    records, errors = [], []
    for lineno, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        try:
            records.append(_read_record(raw))
        except ValueError as e:
            errors.append(f"{input_path}:{lineno}: {e}")
    if errors:
        more = f" ({len(errors) - 1} more bad line(s) after it)" if len(errors) > 1 else ""
        raise ScoreInputError(errors[0] + more)
    if not records:
        raise ScoreInputError(f"{input_path}:1: no completions in the file — generate completions first")
    scored = [{**row, **_score_record(row, answer_in), **(extra(row, answer_in) if extra else {})} for row in records]
    write_jsonl(output_path, scored)
    return aggregate(scored, trained=trained, zero_shot=zero_shot)


def is_same_file(a: Path, b: Path) -> bool:
    """The same path once resolved (symlinks, `..`), or two names of one existing file (a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _read_record(raw: bytes) -> dict:
    """One input line, checked; ValueError('what — what to do') when it is unusable."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text — save the file as UTF-8") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno}) — write one JSON object per line") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__} — write one object per line")
    if "target_language" not in row:
        raise ValueError('missing "target_language" — add the requested reasoning language, e.g. "Japanese"')
    for key in ("target_language", "user_language"):
        if key == "target_language" or row.get(key) is not None:
            try:
                normalize_language(row[key])
            except ValueError as e:
                raise ValueError(f'bad "{key}": {e} — use one of the accepted names or codes') from None
    if "completion" in row:
        if not isinstance(row["completion"], str):
            raise ValueError('"completion" must be a string — give the raw Harmony assistant text')
    elif "analysis" in row or "final" in row:
        for key in ("analysis", "final"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise ValueError(f'"{key}" must be a string or null — give the channel text')
    else:
        raise ValueError('no "completion" and no "analysis"/"final" — add the generated text')
    for key in ("truncated", "stopped"):
        if row.get(key) is not None and not isinstance(row[key], bool):
            raise ValueError(f'"{key}" must be true, false or null — it says whether the token limit was hit')
    return row


def _score_record(row: Mapping, answer_in: str) -> dict:
    cut = bool(row.get("truncated")) or bool(row.get("stopped"))
    user = row.get("user_language") or "en"
    if "completion" in row:
        parsed = parse_completion(row["completion"], stopped=cut or None)
        return score_sample(row["target_language"], user_language=user, answer_in=answer_in, parsed=parsed)
    return score_sample(row["target_language"], row.get("analysis"), row.get("final"),
                        user_language=user, answer_in=answer_in, truncated=cut)
