"""lowvram_ft.evaluate.rewards: each reward on hand-written completions, paying what a reader would."""
from __future__ import annotations

import json

import pytest

from lowvram_ft.evaluate.rewards import REWARD_NAMES, Sample, check_rewards, load_user_reward, split, text_rewards
from lowvram_ft.evaluate.scoring import identify_sentence, score_sample

JA = ["まず、りんごの数を数えます。",
      "太郎さんは三つのりんごを持っていて、花子さんから四つもらいました。",
      "したがって、合計は三と四を足した数になります。",
      "答えは七個だと考えられます。"]
EN = ["First, we need to count how many apples Taro has in total.",
      "He had three apples and received four more from Hanako.",
      "So the total is the sum of the two amounts, which gives seven."]
# Mostly English, padded with enough kana filler that the scorer's CJK weight calls each one Japanese.
KANA_SPRINKLED = ["We need to count the apples carefully here ですよね、まあそうですよね、ね。",
                  "He had three apples and got four more then ですよね、まあそうですよね、ね。",
                  "So the total should be the sum of both ですよね、まあそうですよね、ね。"]


def harmony(analysis: str, final: str = "答えは7個です。", end: str = "<|return|>") -> str:
    return (f"<|channel|>analysis<|message|>{analysis}<|end|>"
            f"<|start|>assistant<|channel|>final<|message|>{final}{end}")


def rewards(completion: str, target: str = "ja", **kw) -> dict:
    return text_rewards(Sample(completion, target, **kw))


def weight(text: str) -> int:
    """Letters as the reward weighs them: a CJK character 3, any other letter 1."""
    return sum(3 if "\u3040" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff" else 1 for c in text if c.isalpha())


def test_all_japanese_reasoning_is_paid_in_full():
    r = rewards(harmony("".join(JA)))
    assert r["language"] == 1.0
    assert r["format"] == 1.0


def test_japanese_drifting_into_english_is_paid_its_japanese_share_by_letters():
    r = rewards(harmony("".join(JA) + " " + " ".join(EN)))
    ja, en = sum(map(weight, JA)), sum(map(weight, EN))
    assert r["language"] == pytest.approx(ja / (ja + en))
    assert 0.3 < r["language"] < 0.8
    assert r["format"] == 1.0  # the format is fine; only the language drifted


def test_short_japanese_sentences_around_a_long_english_run_do_not_pay_by_sentence_count():
    analysis = "数えます。考えます。確認します。足します。次に進みます。そうですね。" + " ".join(EN)
    r = rewards(harmony(analysis))
    counted = score_sample("ja", analysis, "7")["think_share"]
    assert counted == pytest.approx(6 / 9)  # the scorer's sentence share: mostly Japanese
    assert r["language"] < 0.4  # by letters: mostly English, as a reader sees it


def test_english_sprinkled_with_kana_is_not_paid_though_the_scorer_calls_it_japanese():
    assert all(identify_sentence(s) == "ja" for s in KANA_SPRINKLED)  # the trap is real
    assert rewards(harmony(" ".join(KANA_SPRINKLED)))["language"] == 0.0


def test_japanese_with_english_terms_stays_japanese():
    analysis = "".join(JA) + "このAPIのresponseを確認します。"
    assert rewards(harmony(analysis))["language"] == 1.0


@pytest.mark.parametrize("hidden", [
    "$$\\text{total} = \\text{apples}_{\\text{Taro}} + \\text{apples}_{\\text{Hanako}} = "
    "\\frac{\\text{three} + \\text{four}}{\\text{one}} \\text{ and so the answer is seven apples in total}$$",
    "```python\ndef total_apples(taro_apples, hanako_apples):\n    # we count the apples and return the sum\n"
    "    return taro_apples + hanako_apples\nprint(total_apples(three, four))\n```",
])
def test_reasoning_hidden_in_latex_or_code_is_not_paid(hidden):
    r = rewards(harmony("まず数えます。答えは七個です。\n" + hidden))
    assert r["language"] == 0.0


def test_empty_and_very_short_reasoning_pay_nothing():
    assert rewards(harmony(""))["language"] == 0.0
    assert rewards(harmony(""))["format"] == 0.0
    assert rewards(harmony("はい。"))["language"] == 0.0


def test_truncated_completion_pays_nothing():
    cut = "<|channel|>analysis<|message|>" + "".join(JA)
    assert rewards(cut) == {"language": 0.0, "format": 0.0, "answer_language": 0.0, "accuracy": None}
    assert rewards(harmony("".join(JA)), truncated=True)["language"] == 0.0


@pytest.mark.parametrize("completion", [
    "<think>" + "".join(JA) + "</think>答えは7個です。<|im_end|>",  # opening tag generated
    "".join(JA) + "</think>\n\n答えは7個です。<|im_end|>",  # opening tag prefilled in the prompt
])
def test_qwen_think_with_and_without_the_prefilled_opening_tag(completion):
    r = rewards(completion, harmony=False, user_language="ja")
    assert r == {"language": 1.0, "format": 1.0, "answer_language": 1.0, "accuracy": None}


def test_qwen_think_still_open_is_truncated_or_unparsed():
    open_think = "<think>" + "".join(JA)
    assert rewards(open_think, harmony=False, truncated=True)["language"] == 0.0
    assert rewards(open_think, harmony=False, truncated=False)["format"] == 0.0


def test_harmony_without_channel_markers():
    # decoded with special tokens skipped: the channel names run into the text — still parsed
    bare = "analysis" + "".join(JA) + "assistantfinal答えは7個です。"
    assert rewards(bare)["language"] == 1.0
    # no channel at all (the model ignored the format): neither language nor format pays
    for plain in ("".join(JA) + "<|return|>", "".join(JA)):
        assert rewards(plain)["language"] == 0.0
        assert rewards(plain)["format"] == 0.0


def test_latin_target_is_paid_for_its_language_only():
    fr = "Il faut compter les pommes de Taro. Il en avait trois et en a reçu quatre de plus. Le total est donc sept."
    assert rewards(harmony(fr, "Sept."), "fr")["language"] == 1.0
    assert rewards(harmony(" ".join(EN), "Seven."), "fr")["language"] == 0.0


def test_answer_language_and_accuracy():
    english = harmony("".join(JA), "Taro has seven apples in total now.")
    assert rewards(english)["answer_language"] == 1.0  # the user's language: English by default
    assert rewards(english, user_language="ja")["answer_language"] == 0.0
    assert rewards(harmony("".join(JA), "7"))["answer_language"] is None  # too short to judge
    assert rewards(english, gold="7")["accuracy"] == 0.0  # "seven" is not the number 7
    assert rewards(harmony("".join(JA), "The answer is 7."), gold="7")["accuracy"] == 1.0
    assert rewards(harmony("".join(JA), "The answer is 1,234."), gold="1234")["accuracy"] == 1.0
    assert rewards(harmony("".join(JA), "Paris is the capital."), gold="paris")["accuracy"] == 1.0


def test_split_prefers_think_tags_when_present():
    parsed = split(Sample("<think>理由です。</think>答え", "ja"))
    assert (parsed.analysis, parsed.final) == ("理由です。", "答え")


def good_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def raising_reward(completions, **kwargs):
    raise KeyError("answer")


def test_reward_names_languages_and_user_functions():
    assert check_rewards(list(REWARD_NAMES) + [f"{__name__}:good_reward"], ["Japanese", "fr"]) == []
    problems = check_rewards(["langauge", "no_such_module_x:f", "os.path:nope", f"{__name__}:raising_reward",
                              "os.path:join"], ["Klingon"])
    assert len(problems) == 6
    assert problems[0].startswith("grpo.rewards: unknown reward 'langauge'")
    assert "cannot import 'no_such_module_x'" in problems[1]
    assert "has no function 'nope'" in problems[2]
    assert "raised KeyError" in problems[3]
    assert "os.path:join raised TypeError" in problems[4]
    assert problems[5].startswith("grpo.languages: the scorer cannot judge 'Klingon'")
    assert all("\n" not in p for p in problems)
    assert load_user_reward(f"{__name__}:good_reward") is good_reward


def test_score_rewards_adds_a_rewards_object_to_each_line(tmp_path, capsys):
    from lowvram_ft.cli import main

    lines = [{"target_language": "Japanese", "completion": harmony("".join(JA), "The answer is 7 apples in total."), "gold": 7},
             {"target_language": "ja", "analysis": " ".join(EN), "final": "Seven apples in total for Taro."},
             {"target_language": "ja", "completion": "<|channel|>analysis<|message|>" + "".join(JA)}]
    src = tmp_path / "completions.jsonl"
    src.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    assert main(["score", "--input", str(src), "--rewards"]) == 0
    out = [json.loads(x) for x in (tmp_path / "completions.scored.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [o["rewards"] for o in out] == [
        {"language": 1.0, "format": 1.0, "answer_language": 1.0, "accuracy": 1.0},
        {"language": 0.0, "format": 1.0, "answer_language": 1.0, "accuracy": None},
        {"language": 0.0, "format": 0.0, "answer_language": 0.0, "accuracy": None},
    ]
    assert main(["score", "--input", str(src)]) == 0  # without --rewards: no rewards object
    assert "rewards" not in json.loads((tmp_path / "completions.scored.jsonl").read_text(encoding="utf-8").splitlines()[0])
