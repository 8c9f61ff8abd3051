"""Evaluation plumbing without a model: suite, cases, prompts, stop handling, parsing, reports."""
from __future__ import annotations

import hashlib
import json

import pytest

from lowvram_ft.config import load_config
from lowvram_ft.conversation import Conversation, Message
from lowvram_ft.evaluate.generation import cut_at_stop, parse_output
from lowvram_ft.evaluate.run import Case, EvalError, build_cases, case_conversation, load_suite, target_languages


def test_shipped_suite_has_the_required_prompts_and_languages():
    suite = load_suite()
    texts = [p["text"] for p in suite.prompts]
    assert "Solve x^5 + 3x^4 - 10 = 3." in texts
    assert {p["category"] for p in suite.prompts} >= {"math", "everyday", "code"}
    assert suite.languages == ["English", "French", "German", "Spanish", "Italian", "Japanese", "Chinese", "Korean"]
    assert set(suite.smoke) <= {p["id"] for p in suite.prompts} and 3 <= len(suite.smoke) <= 4


def test_cases_cover_every_prompt_language_and_sample_in_a_fixed_order():
    suite = load_suite()
    cfg = load_config()
    languages = target_languages(cfg.eval, suite)
    cases = build_cases(suite, languages, samples=2)
    assert len(cases) == len(suite.prompts) * 8 * 2
    assert cases[0] == Case(suite.prompts[0]["id"], suite.prompts[0]["category"], suite.prompts[0]["text"], "English", 0)
    assert build_cases(suite, languages, samples=2) == cases
    smoke = build_cases(suite, ["French"], samples=1, smoke=True)
    assert [c.prompt_id for c in smoke] == suite.smoke
    assert target_languages(load_config(None, ["eval.languages=[Japanese]"]).eval, suite) == ["Japanese"]


def test_case_becomes_a_conversation_with_the_language_line():
    conv = case_conversation(Case("p", "math", "What is 2+2?", "French", 0))
    assert conv == Conversation(messages=(Message("user", "What is 2+2?"),), reasoning_language="French")


def test_eval_prompt_is_the_training_renderer_prefix():
    """One renderer: the evaluation prompt equals the untrained prefix of a training example."""
    from lowvram_ft.harmony import HarmonyOptions, render_prompt, render_training

    case = Case("p", "math", "What is 2+2?", "German", 0)
    conv = case_conversation(case)
    trained = Conversation(conv.messages + (Message("assistant", "4", "Zuerst rechne ich."),), "German")
    segments = render_training(trained, HarmonyOptions())
    prefix = "".join(text for text, is_trained in segments[:1])
    assert render_prompt(conv, HarmonyOptions()) == prefix
    assert "reasoning language: German" in prefix and prefix.endswith("<|start|>assistant")


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        names = {1: "<|channel|>", 2: "analysis", 3: "<|message|>", 4: "hi", 9: "<|return|>", 0: "<pad>"}
        return "".join(names[i] for i in ids)


def test_cut_at_stop_keeps_the_stop_token_and_drops_padding():
    tok = FakeTokenizer()
    stopped = cut_at_stop([1, 2, 3, 4, 9, 0, 0], stops=[9], pad=0, tokenizer=tok)
    assert stopped == {"completion": "<|channel|>analysis<|message|>hi<|return|>", "stopped": True, "new_tokens": 5}
    cut = cut_at_stop([1, 2, 3, 4, 4], stops=[9], pad=0, tokenizer=tok)
    assert cut["stopped"] is False and cut["completion"].endswith("hihi")


def test_parse_output_harmony_and_think_tags():
    harmony = parse_output("<|channel|>analysis<|message|>Je pense.<|end|><|start|>assistant<|channel|>final"
                           "<|message|>42<|return|>", stopped=True, harmony=True)
    assert (harmony.analysis, harmony.final, harmony.parsed_ok, harmony.truncated) == ("Je pense.", "42", True, False)
    cut = parse_output("<|channel|>analysis<|message|>Je pen", stopped=False, harmony=True)
    assert cut.truncated is True
    think = parse_output("<think>Ich denke nach.</think>\n\nDie Antwort ist 42.<|im_end|>", stopped=True, harmony=False)
    assert (think.analysis, think.final, think.truncated) == ("Ich denke nach.", "Die Antwort ist 42.", False)
    plain = parse_output("Just an answer.", stopped=False, harmony=False)
    assert (plain.analysis, plain.final, plain.truncated) == (None, "Just an answer.", True)


def test_parse_output_scores_qwen3_think_tags():
    """Qwen3's completions (its generation prompt ends at `<|im_start|>assistant\\n`): the reasoning in
    <think>, scored for the requested language; still thinking at the end is truncated or unparsed."""
    from lowvram_ft.evaluate.scoring import Parsed, score_sample

    reasoning = "Je vais résoudre cela étape par étape. D'abord, je convertis le temps en heures."
    answer = "The delivery van covers a distance of two hundred kilometres."
    done = parse_output(f"<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>", stopped=True, harmony=False)
    assert done == Parsed(reasoning, answer, True, False)
    scores = score_sample("French", parsed=done)
    assert (scores["scorable"], scores["think_match"], scores["answer_match"]) == (True, True, True)
    assert score_sample("German", parsed=done)["think_match"] is False
    assert parse_output("<think>\nJe vais", stopped=False, harmony=False) == Parsed("Je vais", None, True, True)
    ended = parse_output(f"<think>\n{reasoning}<|im_end|>", stopped=True, harmony=False)
    assert ended == Parsed(reasoning, None, False, False) and score_sample("French", parsed=ended)["scorable"] is False
    empty = parse_output(f"<think>\n\n</think>\n\n{answer}<|im_end|>", stopped=True, harmony=False)
    assert empty == Parsed("", answer, True, False) and score_sample("French", parsed=empty)["think_match"] is None


def test_old_style_suite_asks_the_union_of_its_two_lists(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("trained_languages: [English, French]\nzero_shot_languages: [Korean, French]\n"
                   "prompts:\n  - {id: a, category: math, text: 'What is 2+2?'}\n")
    suite = load_suite(str(old))
    assert suite.languages == ["English", "French", "Korean"]
    assert target_languages(load_config().eval, suite) == ["English", "French", "Korean"]


# --------------------------------------------------------------------------- trained vs zero-shot, from the data

ASKED = ["English", "French", "German", "Spanish", "Italian", "Japanese", "Chinese", "Korean"]


def test_languages_the_training_rows_reason_in_are_trained_the_rest_zero_shot():
    from lowvram_ft.evaluate.languages import language_groups, training_languages

    # summary.json's data.rows.reasoning_languages of a run on the shipped sample data (names, as the data has them)
    counts = {"Japanese": 97, "English": 98, "French": 96, "German": 99, "Spanish": 97, "Italian": 95}
    trained = training_languages(counts)
    assert trained == ["en", "fr", "de", "es", "it", "ja"]
    assert language_groups(ASKED, trained) == {"en": "trained", "fr": "trained", "de": "trained", "es": "trained",
                                               "it": "trained", "ja": "trained", "zh": "zero-shot", "ko": "zero-shot"}
    # Rows without reasoning (counted under "none") make no language trained; a zero count neither.
    assert training_languages({"none": 40, "French": 3, "Japanese": 0}) == ["fr"]
    assert language_groups(["ja", "fr"], training_languages({"none": 40, "French": 3})) == {
        "ja": "zero-shot", "fr": "trained"}
    # A run whose rows carry no reasoning trains no language: all asked languages are zero-shot.
    assert set(language_groups(ASKED, training_languages({"none": 12})).values()) == {"zero-shot"}
    # No run (no counts): every asked language is unknown.
    assert training_languages(None) is None
    assert set(language_groups(ASKED, None).values()) == {"unknown"}
    # A language the evaluation cannot ask for is kept, as written.
    assert training_languages({"Klingon": 2, "ja-JP": 1}) == ["ja", "klingon"]


def test_eval_labels_come_from_the_run_summary(tmp_path):
    from lowvram_ft.evaluate.run import language_labels, run_training_languages

    run = tmp_path / "run"
    run.mkdir()
    assert run_training_languages(None)[0] is None
    trained, source = run_training_languages(run)  # no summary.json: an unfinished run
    assert trained is None and "summary.json not found" in source
    unknown = language_labels(["French", "Japanese"], None, source)
    assert unknown["trained_languages"] is None and unknown["zero_shot_languages"] is None
    assert unknown["language_groups"] == {"fr": "unknown", "ja": "unknown"}
    (run / "summary.json").write_text(json.dumps({"data": {"rows": {"reasoning_languages": {
        "Japanese": 5, "French": 4, "none": 2}}}}))
    trained, source = run_training_languages(run)
    assert trained == ["fr", "ja"] and source.endswith("summary.json: data.rows.reasoning_languages")
    labels = language_labels(["French", "Japanese", "Chinese", "Korean"], trained, source)
    assert labels["zero_shot_languages"] == ["zh", "ko"]
    assert labels["language_groups"] == {"fr": "trained", "ja": "trained", "zh": "zero-shot", "ko": "zero-shot"}
    (run / "summary.json").write_text("{}")
    with pytest.raises(EvalError, match="no data.rows.reasoning_languages"):
        run_training_languages(run)


def test_missing_suite_is_an_eval_error(tmp_path):
    with pytest.raises(EvalError, match="prompt suite not found"):
        load_suite(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts:\n  - id: a\n    category: math\n")
    with pytest.raises(EvalError, match=r"prompts\[0\]: needs a text field"):
        load_suite(str(bad))


def test_reports_are_written_from_result_tables(tmp_path):
    from lowvram_ft.evaluate.run import write_eval
    from lowvram_ft.evaluate.scoring import score_sample
    from lowvram_ft.evaluate.statistics import aggregate, compare

    samples = []
    for phase, analysis in (("before", None), ("after", "Je calcule d'abord la somme des deux nombres.")):
        for i in range(4):
            scores = score_sample("fr", analysis, "The answer is four, as computed above.")
            if analysis is None:
                scores.update(parsed_ok=False, scorable=False, think_match=None, answer_match=None)
            samples.append({"phase": phase, "id": i, **scores})
    tables = {p: aggregate([s for s in samples if s["phase"] == p], trained=["French"], zero_shot=["Japanese"])
              for p in ("before", "after")}
    result = {"settings": {"languages": ["French"], "prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 64,
                           "greedy": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "reasoning_effort": "medium",
                           "seed": 1, "answer_in": "user", "smoke": False},
              "trained_languages": ["fr"], "zero_shot_languages": ["ja"], "labels_from": "a test",
              "perplexity": {"before": 2000.0, "after": 5.0}, "tables": tables,
              "comparison": compare(tables["before"], tables["after"])}
    write_eval(tmp_path, result, samples)
    md = (tmp_path / "eval.md").read_text()
    assert "## Before vs after" in md and "| fr | 4 | 4 | — | 100.0% |" in md
    assert "trained: French; zero-shot: Japanese (from a test)" in md
    assert "- tuned (adapter on): 5.00" in md
    assert json.loads((tmp_path / "eval.json").read_text())["comparison"][0]["think_all_after"] == 1.0
    png = (tmp_path / "eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert len((tmp_path / "eval_samples.jsonl").read_text().splitlines()) == 8
    assert hashlib.sha256(png).hexdigest()  # written, readable
    unknown = {**result, "trained_languages": None, "zero_shot_languages": None, "labels_from": "no run",
               "tables": {p: aggregate([s for s in samples if s["phase"] == p]) for p in ("before", "after")}}
    write_eval(tmp_path, unknown, samples)
    assert "trained: unknown — no run; no trained / zero-shot rows" in (tmp_path / "eval.md").read_text()
    assert "trained" not in {r["group"] for r in json.loads((tmp_path / "eval.json").read_text())["tables"]["after"]}


def test_embedded_model_is_built_deterministically_and_quietly(tmp_path, capfd):
    from lowvram_ft.embedded import build_embedded

    build_embedded(tmp_path / "a")
    assert "Writing model shards" not in capfd.readouterr().err  # a harmless bar: only with --verbose
    build_embedded(tmp_path / "b")
    for name in ("tokenizer.json", "model.safetensors", "config.json", "chat_template.jinja"):
        a, b = (tmp_path / "a" / name), (tmp_path / "b" / name)
        if a.exists() or b.exists():
            assert a.read_bytes() == b.read_bytes(), name
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and config["num_local_experts"] == 4
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    from transformers import PreTrainedTokenizerFast  # the class the files name; AutoTokenizer's import costs ~2.5 s of CPU

    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "a")
    for special in ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")
