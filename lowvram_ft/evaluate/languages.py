"""The languages the evaluation asks for and recognises: codes, names, scripts, the close neighbours a
model may drift into, the name -> code normalisation every command uses, and which asked languages a
run trained (from its data). Pure data, no model."""
from __future__ import annotations

import re
from typing import Mapping, Sequence


# code -> (English name, script). Latin-script languages are decided by py3langid, the rest by script.
LANGUAGES: dict[str, tuple[str, str]] = {
    "en": ("English", "latin"),
    "fr": ("French", "latin"),
    "de": ("German", "latin"),
    "es": ("Spanish", "latin"),
    "it": ("Italian", "latin"),
    "pt": ("Portuguese", "latin"),
    "nl": ("Dutch", "latin"),
    "sv": ("Swedish", "latin"),
    "pl": ("Polish", "latin"),
    "tr": ("Turkish", "latin"),
    "id": ("Indonesian", "latin"),
    "vi": ("Vietnamese", "latin"),
    "ja": ("Japanese", "cjk"),
    "zh": ("Chinese", "cjk"),
    "ko": ("Korean", "cjk"),
    "ru": ("Russian", "cyrillic"),
    "ar": ("Arabic", "arabic"),
    "hi": ("Hindi", "devanagari"),
    "el": ("Greek", "greek"),
    "he": ("Hebrew", "hebrew"),
    "th": ("Thai", "thai"),
}
# For each Latin-script language of LANGUAGES, the close languages a model asked for it may drift into
# (py3langid codes). They are identified so that their sentences are not given to the language asked for;
# those outside LANGUAGES (gl, ca, ro, …) can be identified but not asked for. Occitan (for fr) and
# Frisian (for nl) are left out: py3langid hands them short French and English sentences ("La capitale
# du Canada est Ottawa." is oc, "So it travels km." fy), which costs more than the drift they would catch.
LATIN_NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "es": ("pt", "gl", "ca"),
    "pt": ("gl", "es"),
    "fr": ("ca",),
    "it": ("ro", "ca", "es"),
    "de": ("nl", "af", "lb"),
    "nl": ("af", "de"),
    "sv": ("da", "no"),
    "pl": ("cs", "sk"),
    "tr": ("az",),
    "id": ("ms",),
}
# What py3langid chooses among for a Latin-script sentence. Not its full set of 142 languages: that sends
# short Spanish sentences to Aragonese and Extremaduran (when this was chosen, 403/410 judged sentences of
# tests/data/langid_labelled.jsonl came out right with the full set, 405/410 with this one).
LATIN_IDENTIFIED = frozenset(
    [code for code, (_name, script) in LANGUAGES.items() if script == "latin"]
    + [code for neighbours in LATIN_NEIGHBOURS.values() for code in neighbours]
)
SCRIPT_LANGUAGE = {"cyrillic": "ru", "arabic": "ar", "devanagari": "hi", "greek": "el",
                    "hebrew": "he", "thai": "th"}
_ALIASES = {
    "français": "fr", "francais": "fr", "deutsch": "de", "español": "es", "espanol": "es",
    "castilian": "es", "italiano": "it", "português": "pt", "portugues": "pt", "nederlands": "nl",
    "日本語": "ja", "中文": "zh", "汉语": "zh", "漢語": "zh", "mandarin": "zh",
    "simplified chinese": "zh", "traditional chinese": "zh", "chinese (simplified)": "zh",
    "chinese (traditional)": "zh", "한국어": "ko", "русский": "ru",
}
UNDETERMINED = "und"  # a judged sentence in a script none of LANGUAGES uses

# The group of an asked language: the run's training rows reason in it, they do not, or there is no run to tell.
TRAINED, ZERO_SHOT, UNKNOWN = "trained", "zero-shot", "unknown"
NO_REASONING = "none"  # summary.json's count of training rows without reasoning (they train no language)

def normalize_language(name_or_code: str) -> str:
    """'Japanese', 'ja', 'JA', 'ja-JP', '日本語' -> 'ja'. Unknown -> ValueError naming the accepted set."""
    if not isinstance(name_or_code, str) or not name_or_code.strip():
        raise ValueError(f"language must be a non-empty string, got {name_or_code!r}; {_accepted()}")
    key = name_or_code.strip().lower()
    if key in LANGUAGES:
        return key
    for code, (name, _script) in LANGUAGES.items():
        if key == name.lower():
            return code
    if key in _ALIASES:
        return _ALIASES[key]
    primary = re.split(r"[-_]", key, maxsplit=1)[0]  # BCP 47 region/script tags: pt-BR, zh-Hans
    if primary != key and primary in LANGUAGES:
        return primary
    raise ValueError(f"unknown language {name_or_code!r}; {_accepted()}")


def _accepted() -> str:
    return "accepted: " + ", ".join(f"{name}/{code}" for code, (name, _s) in LANGUAGES.items())


def language_code(name_or_code: str) -> str:
    """normalize_language, except that a name it does not know stays as written (lower-cased): a data
    set may reason in a language the evaluation cannot ask for."""
    try:
        return normalize_language(name_or_code)
    except ValueError:
        return str(name_or_code).strip().lower()


def language_name(code: str) -> str:
    return LANGUAGES[code][0] if code in LANGUAGES else code


def training_languages(reasoning_languages: Mapping[str, int] | None) -> list[str] | None:
    """The languages a run trained reasoning in, as codes (LANGUAGES' order, then unknown names), from
    the row counts of summary.json's data.rows.reasoning_languages: every language with at least one
    training row whose closing assistant turn has reasoning. Rows without reasoning (counted under
    "none") make no language trained. None (unknown) when there are no counts to read."""
    if reasoning_languages is None:
        return None
    codes = {language_code(name) for name, count in reasoning_languages.items()
             if name != NO_REASONING and count and str(name).strip()}
    order = list(LANGUAGES)
    return sorted(codes, key=lambda c: (order.index(c) if c in LANGUAGES else len(order), c))


def language_groups(asked: Sequence[str], trained: Sequence[str] | None) -> dict[str, str]:
    """Asked language (code, in the order asked) -> "trained" when the run's training rows reason in
    it, "zero-shot" when they do not, "unknown" for every language when trained is None (no run)."""
    codes = list(dict.fromkeys(normalize_language(a) for a in asked))
    if trained is None:
        return {code: UNKNOWN for code in codes}
    known = {language_code(t) for t in trained}
    return {code: TRAINED if code in known else ZERO_SHOT for code in codes}
