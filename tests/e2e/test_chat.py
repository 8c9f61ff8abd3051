"""Chat and generate through the terminal: a scripted `chat` session and `generate --json` on a briefly
trained embedded run. The session state, prompts and streamed view without a model: unit/test_chat.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from helpers import harmony
from lowvram_ft.conversation import Message

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("chat") / "run"
    proc = subprocess.run([sys.executable, "-m", "lowvram_ft", "train", "--config", "configs/embedded.yaml",
                           "--output", str(run_dir), "train.max_steps=2", "train.batch_size=2", "eval.enabled=false"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return run_dir


def chat(run: Path, lines: list[str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowvram_ft", "chat", "--run", str(run), "--max-new-tokens", "6",
                           "--show-prompt", *extra], input="".join(line + "\n" for line in lines), cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)


def shown_prompts(stdout: str) -> list[str]:
    return [json.loads(line.split("prompt: ", 1)[1]) for line in stdout.splitlines() if "prompt: " in line]


def test_scripted_session_is_multi_turn_and_obeys_effort_reset_and_exit(run):
    proc = chat(run, ["What is 2+2?", "/effort high", "And 3+3?", "/reset", "Bonjour", "/exit", "never read"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second, third = shown_prompts(proc.stdout)
    assert first == harmony([Message("user", "What is 2+2?")])
    # /effort high rewrote the system message; the first exchange is still there, answer only.
    assert second.startswith(harmony([], effort="high").removesuffix("<|start|>assistant"))
    assert "Reasoning: medium" not in second
    assert "<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant<|channel|>final<|message|>" in second
    assert "<|channel|>analysis" not in second
    assert second.endswith("<|start|>user<|message|>And 3+3?<|end|><|start|>assistant")
    # /reset forgot both exchanges but kept the effort.
    assert third == harmony([Message("user", "Bonjour")], effort="high")
    assert "reasoning effort: high" in proc.stdout and "conversation cleared" in proc.stdout
    assert proc.stdout.count("tokens/s") == 3  # three answers, then /exit: the last line was never read


def test_end_of_input_ends_the_session_cleanly(run):
    proc = chat(run, ["Hello"], "--reasoning-effort", "low", "--reasoning-language", "Italian")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shown_prompts(proc.stdout) == [harmony([Message("user", "Hello")], effort="low", language="Italian")]


def test_generate_json_prints_one_object_with_analysis_and_final(run):
    proc = subprocess.run([sys.executable, "-m", "lowvram_ft", "generate", "--run", str(run), "--prompt", "Hi",
                           "--max-new-tokens", "6", "--json"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # loading chatter went to stderr
    result = json.loads(lines[0])
    assert set(result) == {"analysis", "final", "truncated"}
    # A 2-step model writes noise: what is checked is the shape of the answer, which can fail.
    assert isinstance(result["truncated"], bool)
    assert all(result[k] is None or isinstance(result[k], str) for k in ("analysis", "final"))
