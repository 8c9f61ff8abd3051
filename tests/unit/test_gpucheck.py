"""`make gpu-check`'s plumbing on the CPU: every step writes its result as it finishes, a slow step is
cut at its time box without losing the others, a step whose prerequisite failed is skipped, and the
targets are judged from the records. The steps end to end on the embedded model, with the results copied
for retrieval: e2e/test_gpucheck.py."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT
from helpers import read_jsonl
from lowvram_ft import gpucheck


def test_a_slow_step_is_cut_at_its_time_box_and_what_needs_it_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(gpucheck.TIME_BOX_S, "headline", 2)
    sleepy = gpucheck.Step("headline", [sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(gpucheck, "make_step", lambda check, name, python: sleepy if name == "headline" else
                        gpucheck.Step(name, [sys.executable, "-c", "print('fine')"]))
    check = gpucheck.Check(tmp_path / "out", tmp_path / "work", model="embedded")
    records = gpucheck.run_check(check, ["headline", "smoke", "environment"], budget_s=60)
    assert [(r["step"], r["status"]) for r in records] == [("headline", "timeout"), ("smoke", "skipped"),
                                                           ("environment", "ok")]
    assert records[0]["seconds"] < 10 and "needs the headline step, which is timeout" in records[1]["reason"]
    assert len(read_jsonl(check.out_dir / f"{check.stem}.jsonl")) == 3


def test_results_are_written_after_every_step(tmp_path, monkeypatch):
    seen = []

    def step(check, name, python):
        written = check.out_dir / f"{check.stem}.jsonl"
        seen.append(len(read_jsonl(written)) if written.is_file() else 0)
        return gpucheck.Step(name, [sys.executable, "-c", "raise SystemExit(3)" if name == "build" else "pass"])

    monkeypatch.setattr(gpucheck, "make_step", step)
    check = gpucheck.Check(tmp_path / "out", tmp_path / "work")
    records = gpucheck.run_check(check, ["environment", "build", "headline", "pytest"], budget_s=60)
    assert seen == [0, 1]  # headline and pytest never started: their prerequisite, build, failed
    assert [r["status"] for r in records] == ["ok", "failed", "skipped", "skipped"] and records[1]["exit_code"] == 3


def test_an_exhausted_budget_skips_the_rest(tmp_path):
    check = gpucheck.Check(tmp_path / "out", tmp_path / "work", model="embedded")
    records = gpucheck.run_check(check, ["environment", "smoke"], budget_s=1)
    assert {r["status"] for r in records} == {"skipped"} and "out of time" in records[0]["reason"]


def test_targets_are_judged_from_the_measured_records():
    headline = {"step": "headline", "status": "ok", "figures": {
        "memory": {"train": {"peak_reserved_gib": 11.2}}, "card_gib": 16.0, "predicted_peak_gib": 14.4,
        "prediction_basis": "uncalibrated estimate, ±20%"}}
    def row(stack, seq, status="ok", tokens_per_s=None, reserved=None, budget=None):
        return {"status": status, "stack": stack, "case": {"seq_len": seq, "budget_gib": budget},
                "tokens_per_s": tokens_per_s, "memory": {"train": {"peak_reserved_gib": reserved}}}

    rows = [row("lowvram_ft", 1024, tokens_per_s=3000, reserved=11), row("hf", 1024, tokens_per_s=1000, reserved=44),
            row("lowvram_ft", 2048, tokens_per_s=3000, reserved=12), row("hf", 2048, tokens_per_s=2000, reserved=44),
            row("lowvram_ft", 8192, budget=16), row("lowvram_ft", 16384, status="OOM", budget=16)]
    lines = gpucheck.target_lines([headline, {"step": "bench", "status": "ok", "figures": {"rows": rows}}])
    assert "11.20 GiB peak reserved: met (goal 12 GiB: met)" in lines[0] and "predicted 14.4 GiB" in lines[0]
    assert "seq 1024: ours 3.00x the hf stack's tokens/s at 0.25 of its peak reserved: met" in lines[1]
    assert "seq 2048: ours 1.50x" in lines[2] and "NOT met" in lines[2]
    assert lines[3] == "longest sequence at batch 1 within 16 GiB: 8192 tokens (NOT met, target >= 16k)"
    assert gpucheck.target_lines([])[0] == "headline train within 16 GiB: not measured"


def test_bad_arguments_are_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "lowvram_ft.gpucheck", "--steps", "environment,typo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --steps") and "Traceback" not in proc.stderr


def test_the_optional_grpo_step_starts_only_when_the_budget_holds_its_time_box(tmp_path, monkeypatch):
    started = []

    def step(check, name, python):
        started.append(name)
        return gpucheck.Step(name, [sys.executable, "-c", "pass"])

    monkeypatch.setattr(gpucheck, "make_step", step)
    check = gpucheck.Check(tmp_path / "out", tmp_path / "work", model="embedded")
    records = gpucheck.run_check(check, ["environment", "grpo"], budget_s=gpucheck.TIME_BOX_S["grpo"] - 30)
    assert started == ["environment"] and records[1]["status"] == "skipped"
    assert records[1]["reason"].startswith("optional: the budget leaves") and "it needs 240 s" in records[1]["reason"]
    check = gpucheck.Check(tmp_path / "out2", tmp_path / "work2", model="embedded")
    records = gpucheck.run_check(check, ["environment", "grpo"], budget_s=gpucheck.TIME_BOX_S["grpo"] + 60)
    assert [r["status"] for r in records] == ["ok", "ok"] and started[-1] == "grpo"


def test_the_grpo_step_trains_the_built_model_in_4bit_with_grpo_on_the_emulated_card(tmp_path):
    check = gpucheck.Check(tmp_path / "out", tmp_path / "work", card_gib=16.0)
    step = gpucheck.make_step(check, "grpo", "python")
    assert "train.method=grpo" in step.command and "model.load_in=4bit" in step.command
    assert str(check.model_dir) in step.command and step.env == {"LOWVRAM_FT_VRAM_GIB": "16.0"}
    assert gpucheck.NEEDS["grpo"] == "build" and gpucheck.DEFAULT_STEPS[-1] == "grpo"
