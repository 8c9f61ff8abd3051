"""`make gpu-check`'s steps end to end on the CPU with the embedded model: each writes its result, the
results are copied for retrieval and the report names the targets. The plumbing alone: unit/test_gpucheck.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from helpers import read_jsonl
from lowvram_ft import gpucheck

pytestmark = pytest.mark.slow


def test_the_steps_run_end_to_end_on_the_embedded_model(tmp_path):
    out, work, copy = tmp_path / "results", tmp_path / "work", tmp_path / "copy"
    proc = subprocess.run([sys.executable, "-m", "lowvram_ft.gpucheck", "--model", "embedded", "--steps",
                           "environment,build,headline,smoke,grpo", "--train-steps", "3", "--smoke-tokens", "16",
                           "--budget-s", "900", "--out", str(out), "--work", str(work)],
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", gpucheck.RESULTS_COPY_ENV: str(copy)},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (jsonl,) = out.glob("*-gpu.jsonl")
    records = read_jsonl(jsonl)
    assert [(r["step"], r["status"]) for r in records] == [("environment", "ok"), ("build", "ok"), ("headline", "ok"),
                                                           ("smoke", "ok"), ("grpo", "ok")]
    rl = records[4]["figures"]  # a few GRPO steps: rewards logged per step, the planner's GRPO estimate beside
    assert rl["steps"] == 3 and [s["step"] for s in rl["per_step"]] == [1, 2, 3] and rl["predicted_peak_gib"] > 0
    assert all("rewards/language/mean" in s and "completions/mean_length" in s for s in rl["per_step"])
    env, head, smoke = records[0]["figures"], records[2]["figures"], records[3]["figures"]
    assert env["torch"] and env["cuda_available"] is False
    assert head["steps"] == 3 and head["predicted_peak_gib"] > 0 and "estimate" in head["prediction_basis"]
    assert set(head["memory"]["train"]) == {"peak_allocated_gib", "peak_reserved_gib", "device_peak_gib", "peak_rss_gib"}
    assert smoke["perplexity"]["before"] > 0
    md = jsonl.with_suffix(".md").read_text()
    assert "| headline | ok |" in md and "## Targets" in md and "not measured" in md and "GRPO, 3 steps" in md
    assert sorted(p.name for p in copy.iterdir()) == sorted([jsonl.name, jsonl.with_suffix(".md").name])
