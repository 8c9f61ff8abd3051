"""train.method=grpo end to end from the command line on the embedded model (CPU): rewards logged per
step in the step line, metrics.jsonl and completions.jsonl; resume after SIGKILL reproduces the
uninterrupted run's rewards and adapter; GRPO starts from an SFT run's adapter with --from-run.

The random embedded model writes noise, so the language and format rewards pay 0 here (their values are
tested on hand-written completions in unit/test_rewards.py); a reward of the test's own
(grpo_rewards.even_share) varies, so the advantages are not zero and the adapter moves.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import conftest
from conftest import ROOT
from helpers import steps_of

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
ENV = {**conftest.ENV, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{ROOT}:{HERE}"}
REWARDS = ["language", "format", "repetition", "grpo_rewards:even_share"]
GRPO = ["--config", "configs/embedded.yaml", "train.method=grpo", "train.max_steps=6", "train.save_steps=2",
        "train.logging_steps=1", "train.warmup_steps=0", "train.batch_size=4", "train.gradient_accumulation_steps=1",
        "grpo.num_generations=2", "grpo.max_completion_length=24", f"grpo.rewards=[{', '.join(REWARDS)}]",
        "grpo.learning_rate=1e-3", "grpo.languages=[Japanese, Korean]", "data.max_rows=16", "eval.enabled=false"]


def train(run_dir: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, "LOWVRAM_FT_FAULT": fault} if fault else ENV
    return subprocess.run([sys.executable, "-m", "lowvram_ft", "train", "--output", str(run_dir), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo") / "run"
    proc = train(run_dir, *GRPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_grpo_trains_and_logs_every_reward(reference):
    run_dir, proc = reference
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, 7))
    for name in ("language", "format", "repetition", "even_share"):
        assert all(f"rewards/{name}/mean" in r and f"rewards/{name}/std" in r for r in metrics), name
    assert "reward" in proc.stdout and "even_share" in proc.stdout  # the step line carries them
    assert any(r["rewards/even_share/std"] > 0 for r in metrics)  # not all advantages zero
    completions = read_jsonl(run_dir / "completions.jsonl")
    assert sorted({c["step"] for c in completions}) == list(range(1, 7))
    assert all(len([c for c in completions if c["step"] == s]) == 4 for s in range(1, 7))  # 2 prompts x 2
    assert {c["target_language"] for c in completions} == {"ja", "ko"}
    assert set(completions[0]["rewards"]) == {"language", "format", "answer_language", "accuracy"}
    assert all(c["question"] and isinstance(c["completion"], str) for c in completions)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "grpo" and summary["steps"] == 6
    weights = adapter(run_dir)
    assert any(t.abs().max() > 0 for k, t in weights.items() if "lora_B" in k), "the adapter did not move"


def test_resume_after_sigkill_reproduces_the_rewards_and_the_adapter(reference, tmp_path):
    ref, _ = reference
    run_dir = tmp_path / "run"
    proc = train(run_dir, *GRPO, fault="kill@step=3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert steps_of(run_dir) == [2]
    proc = train(run_dir, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = read_jsonl(ref / "metrics.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 7)), "every step logged exactly once"
    for key in ("reward", "rewards/even_share/mean", "rewards/repetition/mean", "completions/mean_length"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-6, abs=1e-9), key
    assert [c["step"] for c in read_jsonl(run_dir / "completions.jsonl")] == \
        [c["step"] for c in read_jsonl(ref / "completions.jsonl")]
    import torch

    a, b = adapter(ref), adapter(run_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-7), name


def test_grpo_starts_from_an_sft_runs_adapter(tmp_path):
    sft = tmp_path / "sft"
    proc = train(sft, "--config", "configs/embedded.yaml", "train.max_steps=2", "data.max_rows=16", "eval.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "grpo"
    steps = [a if a != "train.max_steps=6" else "train.max_steps=1" for a in GRPO if a not in ("--config", "configs/embedded.yaml")]
    proc = train(run_dir, "--from-run", str(sft), *steps)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = (run_dir / "config.yaml").read_text()
    assert f"adapter: {sft / 'adapter'}" in config
    start, end = adapter(sft), adapter(run_dir)
    assert start.keys() == end.keys()  # the same adapter, trained on
