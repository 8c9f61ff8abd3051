"""The run report's data and markup, without a browser: the structure built from a hand-written run
folder (tests/data/report_run), the reasoning cut into the scorer's judged sentences, reward columns
read generically, escaping, relative links, the comparison page, bad folders, and the call at the end
of a run that never fails it."""
from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import unicodedata

import pytest
from rich.console import Console

from conftest import DATA, ROOT
from lowvram_ft.cli import main
from lowvram_ft.evaluate.scoring import identify_text, judge_sentences
from lowvram_ft.report import ReportError, build_report_data, report_after_run, write_report
from lowvram_ft.report.data import reward_series, run_drift
from lowvram_ft.report.drift import trace_segments
from lowvram_ft.report.svg import line_chart, nice_ticks

FIXTURE = DATA / "report_run"


@pytest.fixture
def run(tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(FIXTURE, folder)
    return folder


# --------------------------------------------------------------------------- the scorer's sentences


def test_judge_sentences_are_the_verdicts_identify_text_counts():
    text = "We add the numbers. Nous vérifions le résultat ensuite. Ok.\n```\nx = 1\n```\n合計は四十二になります。"
    judged = judge_sentences(text)
    assert judged == [("We add the numbers.", "en"), ("Nous vérifions le résultat ensuite.", "fr"), ("Ok.", None),
                      ("合計は四十二になります。", "ja")]
    verdict = identify_text(text)
    assert verdict.judged == 3 and verdict.unjudged == 1
    assert verdict.counts == {"en": 1, "fr": 1, "ja": 1}
    assert judge_sentences(None) == judge_sentences("") == []


@pytest.mark.parametrize("text", [
    "We need to add twelve and thirty together. Check: `12 + 30 = 42`. So the answer is clear.",
    "Let $x^2 = 9$, so x is three or minus three.\n\n- First, we test it.\n- **Then** we verify the sign.",
    "```python\nprint('We are in code.')\n```\nThe code prints a sentence. Voilà la réponse finale.",
    "十二と三十を足す必要があります。合計は四十二になります。Okay.",
    "Cafe\u0301 au lait is a drink we like. See https://example.com/a.b for details.",
])
def test_segments_give_back_the_whole_trace(text):
    segments = trace_segments(text)
    assert "".join(s["text"] for s in segments) == unicodedata.normalize("NFC", text)
    judged = [(s["text"], s["language"]) for s in segments if s["judged"]]
    assert [language for _, language in judged] == [language for _, language in judge_sentences(text) if language]


def test_segments_carry_the_scorers_languages_and_keep_code_as_unjudged_text():
    segments = trace_segments("We need to add twelve and thirty. Check: `12 + 30 = 42`. Nous vérifions le résultat.")
    assert [(s["text"], s["language"]) for s in segments if s["text"].strip()] == [
        ("We need to add twelve and thirty.", "en"), ("Check: `12 + 30 = 42`.", None),
        ("Nous vérifions le résultat.", "fr")]


# --------------------------------------------------------------------------- the page's data


def test_report_data_of_the_fixture_run(run):
    data = build_report_data(run)
    assert data["name"] == "runs/fixture"
    assert data["missing"] == ["eval.md"]
    assert data["environment"]["compute_dtype"] == "bfloat16"
    assert data["environment"]["versions"]["trl"] == "1.15.0"
    assert data["data"]["reasoning_languages"] == {"French": 240, "English": 240}
    assert data["data"]["tokens"]["trained_share"] == 0.62
    assert "file" not in data["data"]["sources"]["sample"]  # a path, not shown
    assert [s["key"] for s in data["series"]] == ["loss", "learning_rate", "tokens_per_s", "peak_memory_gib"]
    assert data["series"][0]["points"] == [(10, 9.5), (20, 4.25), (30, 2.125)]
    assert data["rewards"] == []
    assert data["training"]["planned_peak_gib"] is None
    assert [f["name"] for f in data["files"]][:3] == ["summary.json", "metrics.jsonl", "config.yaml"]


def test_evaluation_rows_per_language_with_groups_and_intervals(run):
    evaluation = build_report_data(run)["evaluation"]
    assert [p["key"] for p in evaluation["phases"]] == ["before", "after"]
    rows = {r["group"]: r for r in evaluation["rows"]}
    assert list(rows) == ["fr", "ja", "trained", "zero-shot", "overall"]
    assert (rows["fr"]["name"], rows["fr"]["kind"]) == ("French", "trained")
    assert rows["ja"]["kind"] == "zero-shot" and rows["overall"]["kind"] == "pooled"
    before, after = rows["ja"]["phases"]["before"]["think"], rows["ja"]["phases"]["after"]["think"]
    assert (before["k"], before["n"], after["k"], after["n"]) == (0, 2, 1, 2)
    assert before["ci"][0] == 0.0 and 0.6 < before["ci"][1] < 0.7  # Wilson 0/2: (0, 0.658)


def test_groups_come_from_the_run_and_are_unknown_without_it(run):
    evaluation = json.loads((run / "eval.json").read_text())
    for key in ("trained_languages", "zero_shot_languages"):
        del evaluation[key]
    (run / "eval.json").write_text(json.dumps(evaluation))
    assert {r["group"]: r["kind"] for r in build_report_data(run)["evaluation"]["rows"]}["fr"] == "unknown"
    evaluation["language_groups"] = {"French": "trained", "ja": "zero-shot"}
    (run / "eval.json").write_text(json.dumps(evaluation))
    kinds = {r["group"]: r["kind"] for r in build_report_data(run)["evaluation"]["rows"]}
    assert (kinds["fr"], kinds["ja"]) == ("trained", "zero-shot")


def test_drift_pairs_base_and_tuned_and_marks_what_changed(run):
    drift = run_drift(build_report_data(run))
    assert drift["columns"] == ["base (adapter off)", "tuned (adapter on)"]
    assert drift["languages"] == ["fr", "ja"]
    changed = {item["key"]: item["changed"] for item in drift["items"]}
    assert changed == {"math-sum|fr|0": True, "everyday-sleep|fr|0": False, "math-sum|ja|0": True,
                       "everyday-sleep|ja|0": False}
    item = next(i for i in drift["items"] if i["key"] == "math-sum|ja|0")
    assert item["target_name"] == "Japanese"
    assert [s["language"] for s in item["cells"][1]["analysis"] if s["judged"]] == ["ja", "ja"]


def test_reward_curves_from_any_rewards_mean_column():
    metrics = [{"step": 1, "loss": 1.0, "rewards/language_reward/mean": 0.2, "rewards/format/mean": 1.0,
                "rewards/language_reward/std": 0.1},
               {"step": 2, "loss": 0.9, "rewards/language_reward/mean": 0.6, "rewards/format/mean": None}]
    series = reward_series(metrics)
    assert [(s["key"], s["points"]) for s in series] == [("language_reward", [(1, 0.2), (2, 0.6)]),
                                                         ("format", [(1, 1.0)])]
    metrics[0].update(reward=1.2, kl=0.01)
    assert [s["key"] for s in reward_series(metrics)] == ["language_reward", "format", "reward", "kl"]
    assert reward_series([{"step": 1, "loss": 1.0, "reward": 0.5}]) == []  # no reward function: not a GRPO log


def test_a_cut_off_last_metrics_line_is_left_out(run):
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 40, "loss": 1.')
    assert len(build_report_data(run)["series"][0]["points"]) == 3


# --------------------------------------------------------------------------- the page


def test_page_escapes_every_text_and_holds_no_machine_path(run):
    path = write_report([run])
    html = path.read_text(encoding="utf-8")
    assert path == run / "report.html"
    assert html.count("<script") == 1  # the page's own script, inline
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;b&gt;Explain&lt;/b&gt;" in html
    assert str(run.parent) not in html and str(ROOT) not in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing fetched from anywhere
    assert re.findall(r'href="([^"#]+)"', html)[:2] == ["summary.json", "metrics.jsonl"]
    assert "<svg" in html and "training loss" in html and "@media (prefers-color-scheme: dark)" in html
    assert "@media print" in html


def test_reward_curves_appear_on_the_page(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for i, record in enumerate(records):
        record["rewards/reasoning_language/mean"] = 0.25 * i
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    html = write_report([run]).read_text(encoding="utf-8")
    assert 'id="rewards"' in html and "reward: reasoning_language" in html


def test_comparison_page_of_two_runs(tmp_path):
    a, b = tmp_path / "sft", tmp_path / "grpo"
    shutil.copytree(FIXTURE, a)
    shutil.copytree(FIXTURE, b)
    (b / "config.yaml").write_text((b / "config.yaml").read_text().replace("learning_rate: 0.004", "learning_rate: 0.001"))
    path = write_report([a, b])
    assert path == a / "compare-grpo.html"
    html = path.read_text(encoding="utf-8")
    assert "train.learning_rate: 0.004 -&gt; 0.001" in html
    assert 'href="../grpo/summary.json"' in html and 'href="summary.json"' in html
    assert "A: tuned (adapter on)" in html and "B: tuned (adapter on)" in html
    assert str(tmp_path) not in html


def test_line_chart_and_ticks():
    assert nice_ticks(0, 9.5) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(10, 30) == [10, 15, 20, 25, 30]
    svg = line_chart("loss <b>", [{"label": "a&b", "points": [(1, 2.0), (2, 1.0)]}])
    assert svg.startswith("<svg") and "loss &lt;b&gt;" in svg and "a&amp;b" in svg and "<b>" not in svg
    assert line_chart("empty", [{"label": "x", "points": []}]) == ""


# --------------------------------------------------------------------------- commands and failures


def test_report_command_writes_the_page_and_refuses_a_folder_that_is_no_run(tmp_path, run, capsys):
    assert main(["report", "--run", str(run)]) == 0
    assert f"report written to {run / 'report.html'}" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", "--run", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {empty}: no summary.json, eval.json or metrics.jsonl — pass the --output folder of a "
                   "train or eval run"]
    assert list(empty.iterdir()) == []
    assert main(["report", "--run", str(run), "--run", str(run), "--run", str(run)]) == 2


def test_a_damaged_file_is_named(run):
    (run / "eval.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"eval.json:1: not valid JSON"):
        build_report_data(run)


def test_report_after_run_never_fails_the_run(run):
    (run / "summary.json").write_text("{broken")
    console = Console(record=True, width=300)
    assert report_after_run(run, console) is None
    lines = console.export_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[lowvram_ft] report: not written (ReportError:")
    assert not (run / "report.html").exists()


def test_the_report_room_imports_no_model_trainer_or_heavy_library():
    for path in (ROOT / "lowvram_ft" / "report").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [n for n in names if re.search(r"(^|\.)(model|train|torch|transformers|trl|peft|unsloth)\b", n)], path
    code = "import sys, lowvram_ft.report; print(sorted({'torch', 'transformers', 'trl'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip() == "[]"


def test_the_planners_estimate_stands_beside_the_measured_peak(run):
    summary = json.loads((run / "summary.json").read_text())
    summary.update(peak_memory_gib=11.5, peak_memory_kind="peak_reserved_vram",
                   plan={"peak_gib": 12.25, "basis": "calibrated estimate, ±6%", "action": "fits"})
    (run / "summary.json").write_text(json.dumps(summary))
    data = build_report_data(run)
    assert data["series"][3]["reference"] == (12.25, "planner's estimate")
    html = write_report([run]).read_text(encoding="utf-8")
    assert "peak reserved VRAM</td><td>11.50 GiB (planner&#x27;s estimate 12.25 GiB, calibrated estimate, ±6%)" in html
    assert 'class="reference"' in html


def test_an_eval_only_folder_gets_a_page(run):
    for name in ("summary.json", "metrics.jsonl", "config.yaml"):
        (run / name).unlink()
    data = build_report_data(run)
    assert data["name"] == "run" and data["command"] is None and data["series"] == []
    html = write_report([run]).read_text(encoding="utf-8")
    assert 'id="drift"' in html and 'id="training"' not in html
    assert "Not in this run folder: summary.json, metrics.jsonl, config.yaml, eval.md." in html


def test_the_eval_command_ends_with_the_report(tmp_path, monkeypatch, capsys):
    import lowvram_ft.cli as cli

    def fake_run_eval(cfg, adapter, out_dir, smoke=False, run_dir=None):  # the evaluation's files, as evaluate.run_eval writes them
        shutil.copytree(FIXTURE, out_dir, ignore=shutil.ignore_patterns("summary.json", "metrics.jsonl", "config.yaml"))
        return json.loads((FIXTURE / "eval.json").read_text())

    monkeypatch.setattr(cli.evaluate, "run_eval", fake_run_eval)
    out = tmp_path / "eval"
    assert main(["eval", "--output", str(out)]) == 0
    assert f"[lowvram_ft] report: {out / 'report.html'}" in capsys.readouterr().out
    assert (out / "report.html").is_file()
