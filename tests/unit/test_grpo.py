"""lowvram_ft.train.grpo and the grpo config group: settings checked, mapped onto TRL's GRPOConfig,
prompts rendered as the evaluation renders them. No model is loaded."""
from __future__ import annotations

import pytest

from lowvram_ft.config import ConfigError, load_config
from lowvram_ft.conversation import Conversation, Message
from lowvram_ft.data import DataError, Example
from lowvram_ft.device import Device
from lowvram_ft.evaluate.run import Case, case_conversation
from lowvram_ft.harmony import HarmonyOptions, render_prompt
from lowvram_ft.train import grpo

CPU = Device("cpu", "cpu", None, True, "test")
GPU = Device("cuda", "GPU", 16.0, True, "test", 8.9)


def problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.method=grpo", *overrides])
    return error.value.problems


def test_sft_is_the_default_and_grpo_has_documented_defaults():
    cfg = load_config(None, [])
    assert cfg.train.method == "sft"
    assert (cfg.grpo.num_generations, cfg.grpo.beta, cfg.grpo.rewards) == (4, 0.0, ["language", "format"])


def test_group_size_must_divide_the_completions_per_step():
    assert problems("grpo.num_generations=3") == [
        "grpo.num_generations: 3 does not divide train.batch_size x gradient_accumulation_steps = 4 completions "
        "per step — make the batch a multiple of it"]
    load_config(None, ["train.method=grpo", "grpo.num_generations=2"])  # 4 = 2 x 2
    load_config(None, ["grpo.num_generations=3"])  # only checked for GRPO


def test_full_finetuning_of_a_4bit_model_is_refused_for_grpo():
    found = problems("model.full_finetuning=true", "model.name=unsloth/gpt-oss-20b-unsloth-bnb-4bit")
    assert len(found) == 1 and found[0].startswith("train.method=grpo: full fine-tuning of a 4-bit model")


def test_reward_weights_one_per_reward():
    assert problems("grpo.reward_weights=[1.0]")[0].startswith("grpo.reward_weights: 1 weights for 2 rewards")


def test_check_names_rewards_languages_and_a_missing_adapter(tmp_path):
    cfg = load_config(None, ["train.method=grpo", "grpo.rewards=[language, nosuch]", "grpo.languages=[Klingon]",
                             f"model.adapter={tmp_path}"])
    with pytest.raises(ConfigError) as error:
        grpo.check(cfg)
    assert [p.split(":")[0] for p in error.value.problems] == ["grpo.rewards", "grpo.languages", "model.adapter"]
    grpo.check(load_config(None, ["train.method=grpo"]))  # the defaults pass


def test_grpo_config_kwargs_on_cpu_and_gpu():
    cfg = load_config(None, ["train.method=grpo", "grpo.num_generations=2", "grpo.max_completion_length=64",
                             "grpo.beta=0.04", "grpo.reward_weights=[1.0, 0.5]", "train.max_steps=3"])
    cpu = grpo.grpo_config_kwargs(cfg, CPU, "/run/checkpoints")
    assert (cpu["use_cpu"], cpu["bf16"], cpu["fp16"]) == (True, False, False)
    assert (cpu["num_generations"], cpu["max_completion_length"], cpu["beta"]) == (2, 64, 0.04)
    assert cpu["reward_weights"] == [1.0, 0.5] and cpu["max_steps"] == 3
    assert cpu["learning_rate"] == grpo.DEFAULT_LEARNING_RATE and cpu["router_aux_loss_coef"] == 0.0
    assert "max_prompt_length" not in cpu  # gone in TRL 1.15
    gpu = grpo.grpo_config_kwargs(cfg, GPU, "/run/checkpoints")
    assert (gpu["use_cpu"], gpu["bf16"], gpu["optim"]) == (False, True, "adamw_8bit")


def test_grpo_config_accepts_the_kwargs():
    from trl import GRPOConfig

    cfg = load_config(None, ["train.method=grpo", "grpo.num_generations=2"])
    args = GRPOConfig(**grpo.grpo_config_kwargs(cfg, CPU, "/tmp/unused-checkpoints"))
    assert (args.num_generations, args.beta, args.use_cpu) == (2, 0.0, True)


class HarmonyTokenizer:
    def get_vocab(self):
        return {"<|start|>": 1, "<|channel|>": 2, "<|message|>": 3}


def example(conv, row: int) -> Example:
    return Example(conv, f"data.jsonl:{row}", "data.jsonl", "messages")


def test_prompts_are_rendered_as_the_evaluation_renders_them():
    conv = Conversation((Message("user", "What is 2+2?"), Message("assistant", "4", "2+2=4")), reasoning_language="French")
    cfg = load_config(None, ["train.method=grpo", "grpo.languages=[Japanese, Korean]"])
    rows = grpo.prompt_rows([example(conv, 1), example(conv, 2)], HarmonyTokenizer(), cfg)
    options = HarmonyOptions(reasoning_effort=cfg.data.reasoning_effort, date=cfg.data.date)
    expected = render_prompt(case_conversation(Case("p", "math", "What is 2+2?", "Japanese", 0)), options)
    assert rows[0]["prompt"] == expected  # the assistant turn is ignored; the language assigned in turn
    assert [r["target_language"] for r in rows] == ["ja", "ko"]
    assert rows[0]["question"] == "What is 2+2?" and rows[0]["user_language"] == "en"
    own = grpo.prompt_rows([example(conv, 1)], HarmonyTokenizer(), load_config(None, ["grpo.languages=[]"]))
    assert own[0]["target_language"] == "fr"  # no grpo.languages: the row's own


def test_rows_without_a_user_turn_are_named():
    conv = Conversation((Message("assistant", "4", "2+2=4"),))
    with pytest.raises(DataError) as error:
        grpo.prompt_rows([example(conv, 7)], HarmonyTokenizer(), load_config(None, ["train.method=grpo"]))
    assert str(error.value).startswith("data.jsonl:7:messages: no user turn")


@pytest.mark.parametrize("override, message", [
    ("grpo.rewards=[langauge]", "error: grpo.rewards: unknown reward 'langauge'"),
    ("grpo.rewards=[no_such_module_x:f]", "error: grpo.rewards: cannot import 'no_such_module_x'"),
    ("grpo.languages=[Klingon]", "error: grpo.languages: the scorer cannot judge 'Klingon'"),
    ("grpo.num_generations=3", "error: grpo.num_generations: 3 does not divide"),
])
def test_bad_grpo_settings_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, override, message):
    from lowvram_ft.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "--output", str(run_dir), "train.method=grpo", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
    assert not run_dir.exists()


def test_dry_run_says_what_grpo_would_do(capsys):
    from lowvram_ft.cli import main

    assert main(["train", "--dry-run", "train.method=grpo", "grpo.num_generations=2"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "would train grpo 2 prompt(s) x 2 completions of <= 256 tokens per step" in out
    assert "reward 1 x language + 1 x format, beta 0, languages Japanese" in out


def test_planner_grpo_terms_for_gpt_oss_20b():
    import json

    from lowvram_ft.plan.transients import grpo_terms

    config = json.loads((grpo.Path(__file__).parents[2] / "lowvram_ft/assets/model_configs/gpt-oss-20b.json").read_text())
    terms = grpo_terms(config, completions=4, micro_batch=1, tokens=1024, completion_tokens=1024, beta=0.0,
                       lora_r=8, lora_targets=("q_proj",))
    # 24 layers, half of them sliding (window 128): (12 x 1024 + 12 x 128) tokens x 2 (K, V) x 8 heads x 64 x 2 bytes x 4
    assert terms["generation KV cache"] * 2**30 == (12 * 1024 + 12 * 128) * 2 * 8 * 64 * 2 * 4
    assert terms["completion log-probabilities (fp32)"] * 2**30 == 1024 * 201088 * 4
    assert terms["reference adapter (beta > 0)"] == 0.0
    with_ref = grpo_terms(config, completions=4, micro_batch=1, tokens=1024, completion_tokens=1024, beta=0.04,
                          lora_r=8, lora_targets=("q_proj",))
    assert with_ref["reference adapter (beta > 0)"] > 0


def test_plan_prints_the_grpo_terms(capsys):
    from lowvram_ft.cli import main

    assert main(["plan", "--model", "unsloth/gpt-oss-20b", "train.method=grpo"]) == 0
    out = capsys.readouterr().out
    assert "GRPO, on top of the estimate above" in out and "generation KV cache" in out
    assert main(["plan", "--model", "unsloth/gpt-oss-20b"]) == 0
    assert "GRPO" not in capsys.readouterr().out


def test_a_gold_column_reaches_the_accuracy_reward():
    from lowvram_ft.data.rows import parse_row

    row = {"user": "What is 6 x 7?", "final": "42", "analysis": "6 x 7 = 42.", "gold": 42}
    conv, issues = parse_row(row, "multilingual_thinking")
    assert not issues and conv.gold == "42"
    rows = grpo.prompt_rows([example(conv, 1)], HarmonyTokenizer(), load_config(None, ["train.method=grpo"]))
    assert rows[0]["gold"] == "42"
    conv, issues = parse_row({**row, "gold": [42]}, "multilingual_thinking")
    assert conv is None and [i[0] for i in issues] == ["gold"]


def test_evidence_table_and_its_drift_rate(tmp_path, capsys, monkeypatch):
    import importlib.util
    import json
    import sys

    spec = importlib.util.spec_from_file_location("grpo_evidence", grpo.Path(__file__).parents[2] / "scripts/grpo_evidence.py")
    evidence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evidence)
    ja = "まず、りんごの数を数えます。太郎さんは三つのりんごを持っています。"
    en = "Then we add the four apples that Hanako gave him to the total."
    assert evidence.drifts(ja + en, "ja") is True
    assert evidence.drifts(ja, "ja") is False
    assert evidence.drifts(en + ja, "ja") is False  # started in English: wrong from the start, not a drift
    assert evidence.drifts("はい。", "ja") is None
    base = {"phase": "after", "scorable": True, "parsed_ok": True, "truncated": False, "new_tokens": 100,
            "answer_match": True}
    samples = [{**base, "target_language": "ja", "analysis": ja + en, "think_share": 0.67, "think_match": True},
               {**base, "target_language": "ja", "analysis": ja, "think_share": 1.0, "think_match": True},
               {**base, "target_language": "fr", "analysis": en, "think_share": 0.0, "think_match": False},
               {**base, "target_language": "ja", "analysis": ja, "think_share": 1.0, "think_match": True,
                "scorable": False, "truncated": True, "new_tokens": 160}]  # cut off: not judged, "no" of all asked
    run = tmp_path / "sft"
    run.mkdir()
    (run / "eval_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["grpo_evidence.py", str(run)])
    evidence.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| sft | RL target ja | 0.83 | 1/2 50% (9%–91%) | 2/2 100% (34%–100%) | 2/3 67% "
                               "(21%–94%) | 1/2 50% (9%–91%) | 2/2 100% (34%–100%) | 3/3 / 1 | 64 | 100 |"), lines[2]
    assert lines[3].startswith("| sft | never in RL zh/ko | n/a |")
    assert lines[4].startswith("| sft | SFT languages | 0.00 | 0/1 0%")


PROMPT_ONLY = {  # one file per supported shape, every row without an answer
    "messages.jsonl": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is 91 prime?"}]},
                       {"messages": [{"role": "user", "content": "Is 97 prime?"}, {"role": "assistant", "content": ""}]}],
    "sharegpt.jsonl": [{"conversations": [{"from": "human", "value": "Name a prime above 100."}]}],
    "mt.jsonl": [{"user": "How far is 3 km in miles?", "reasoning_language": "French"}],
    "alpaca.jsonl": [{"instruction": "Convert 20 C to F.", "input": "Show the formula.", "gold": "68"}],
}


def write_jsonl(path, rows) -> str:
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_prompt_only_rows_of_every_shape_are_grpo_prompts_and_sft_still_refuses_them(tmp_path):
    from lowvram_ft.data import check_data, load_data

    files = [write_jsonl(tmp_path / name, rows) for name, rows in PROMPT_ONLY.items()]
    cfg = load_config(None, ["train.method=grpo", "grpo.languages=[German]", "data.on_invalid=error",
                             f"data.dataset=[{', '.join(files)}]", "data.eval_fraction=0"])
    rows = grpo.prompt_rows(load_data(cfg).train, HarmonyTokenizer(), cfg)
    assert sorted(r["question"] for r in rows) == ["Convert 20 C to F.\n\nShow the formula.", "How far is 3 km in miles?",
                                                   "Is 91 prime?", "Is 97 prime?", "Name a prime above 100."]
    assert {r["gold"] for r in rows} == {None, "68"}
    sft = load_config(None, ["data.on_invalid=error", f"data.dataset=[{', '.join(files)}]", "data.eval_fraction=0"])
    lines = check_data(sft)  # every problem, as `data --check` prints them
    assert lines[0].startswith(f"{files[0]}:1:messages: no assistant turn")
    assert lines[1].startswith(f"{files[0]}:2:messages[1].content: empty assistant turn")
    assert lines[2].startswith(f"{files[1]}:1:conversations: no assistant turn")
    assert lines[3].startswith(f"{files[2]}: looks like the multilingual_thinking shape but has no column final")
    assert lines[4].startswith(f"{files[3]}: looks like the alpaca shape but has no column output") and len(lines) == 5


def test_a_prompt_file_with_a_row_without_a_user_turn_names_it(tmp_path):
    from lowvram_ft.data import load_data

    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]},
                                             {"messages": [{"role": "system", "content": "Only instructions."}]}])
    cfg = load_config(None, ["train.method=grpo", f"data.dataset=[{path}]", "data.eval_fraction=0"])
    with pytest.raises(DataError) as error:
        grpo.prompt_rows(load_data(cfg).train, HarmonyTokenizer(), cfg)
    assert str(error.value).startswith(f"{path}:2:messages: no user turn")


def test_the_data_command_under_grpo_shows_the_prompts_and_refuses_export(tmp_path, capsys):
    from lowvram_ft.cli import main

    path = write_jsonl(tmp_path / "p.jsonl", PROMPT_ONLY["messages.jsonl"])
    assert main(["data", "--dataset", path, "--show", "1", "train.method=grpo", "grpo.languages=[French]"]) == 0
    out = capsys.readouterr().out
    assert "prompts  2 for GRPO (assistant turns ignored), target languages fr 2, 0 with a gold answer" in out
    assert out.count("── prompt ") == 1 and "reasoning language: French" in out
    export = tmp_path / "x.jsonl"
    assert main(["data", "--dataset", path, "--export", str(export), "train.method=grpo"]) == 2
    assert capsys.readouterr().err.startswith("error: --export writes tokenized SFT training rows") and not export.exists()
