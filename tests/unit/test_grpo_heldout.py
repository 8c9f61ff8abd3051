"""The evaluation suite stays held out from reinforcement learning: no prompt of a shipped GRPO config's
data (the user turns GRPO is trained on) contains an evaluation prompt, or shares a long n-gram with one.
DeepSeek-R1 decontaminates with 10-grams; 8 words (or 12 CJK characters) is stricter."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from lowvram_ft.config import load_config
from lowvram_ft.data import load_data

SUITE = ROOT / "lowvram_ft" / "assets" / "eval_prompts.yaml"
WORDS, CJK_CHARS = 8, 12
GRPO_CONFIGS = [p for p in sorted((ROOT / "configs").glob("*.yaml"))
                if (yaml.safe_load(p.read_text(encoding="utf-8")).get("train") or {}).get("method") == "grpo"]


def ngrams(text: str) -> set[str]:
    """Word 8-grams (case and punctuation ignored) and 12-character runs of CJK text."""
    words = re.findall(r"\w+", text.lower())
    grams = {" ".join(words[i:i + WORDS]) for i in range(len(words) - WORDS + 1)}
    for run in re.findall(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]+", text):
        grams |= {run[i:i + CJK_CHARS] for i in range(len(run) - CJK_CHARS + 1)}
    return grams


def overlaps(rl_prompts: list[str], eval_prompts: list[str]) -> list[str]:
    """The eval prompts that an RL prompt contains, or shares a long n-gram with."""
    rl_text = "\n".join(p.lower() for p in rl_prompts)
    rl_grams = set().union(*(ngrams(p) for p in rl_prompts)) if rl_prompts else set()
    return [e for e in eval_prompts if e.lower() in rl_text or ngrams(e) & rl_grams]


def user_turns(config: Path) -> list[str]:
    cfg = load_config(config, ["data.eval_fraction=0"])
    data = load_data(cfg)
    return [m.content for ex in data.train for m in getattr(ex.item, "messages", ()) if m.role == "user"]


def test_there_is_a_shipped_grpo_config():
    assert GRPO_CONFIGS, "configs/embedded-grpo.yaml (make demo-rl) is the one this test guards"


@pytest.mark.parametrize("config", GRPO_CONFIGS, ids=lambda p: p.name)
def test_rl_prompts_share_no_text_with_the_evaluation_suite(config):
    eval_prompts = [p["text"] for p in yaml.safe_load(SUITE.read_text(encoding="utf-8"))["prompts"]]
    prompts = user_turns(config)
    assert len(prompts) > 100
    assert overlaps(prompts, eval_prompts) == []


def test_the_check_finds_a_copied_prompt_and_a_long_shared_run():
    eval_prompts = ["Explain why the sky is blue during the day and red at sunset, in a few sentences.",
                    "日本の首都はどこですか。東京について詳しく教えてください。"]
    assert overlaps(["What is 2+2?"], eval_prompts) == []
    assert overlaps(["Please: explain why the sky is blue during the day and red at sunset!"], eval_prompts) == eval_prompts[:1]
    assert overlaps(["質問：日本の首都はどこですか。"], eval_prompts) == []  # 11 characters in a row: short
    assert overlaps(["東京について詳しく教えてください"], eval_prompts) == eval_prompts[1:]
