"""Bad input found by users, through the command line: `plan` on a broken config.json or a nonsense
--vram, `bench` on a matrix whose top level is not a mapping, `generate` with an empty prompt, and `chat`
without input. Each is one `error:` line and exit 2 (or a clean exit 0 for chat), never a traceback.
Temperature 0 means greedy decoding, checked once through `generate` on the embedded model (~10 s).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowvram_ft", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300, **kwargs)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a clean failure: exit 2, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


# --------------------------------------------------------------------------- plan


@pytest.mark.parametrize("config, key", [
    ([{"hidden_size": 64}], "JSON object"),
    ({"model_type": "llama", "hidden_size": "big", "num_hidden_layers": 2, "vocab_size": 100}, "hidden_size"),
    ({"model_type": "llama", "hidden_size": -64, "num_hidden_layers": 2, "vocab_size": 100}, "hidden_size"),
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100,
      "num_attention_heads": 2.5}, "num_attention_heads"),
], ids=["list", "string", "negative", "fraction"])
def test_plan_names_the_config_file_and_the_bad_key(tmp_path, config, key):
    (tmp_path / "config.json").write_text(json.dumps(config))
    line = one_error_line(cli("plan", "--model", str(tmp_path)))
    assert f"{tmp_path / 'config.json'}: " in line and key in line


@pytest.mark.parametrize("vram", ["-5", "0", "nan", "inf"])
def test_plan_rejects_a_vram_that_is_not_a_positive_number(vram):
    line = one_error_line(cli("plan", f"--vram={vram}"))
    assert line.startswith(f"error: --vram: got {float(vram)}; expected") and "positive" in line


# --------------------------------------------------------------------------- bench


@pytest.mark.parametrize("text, shown", [("- device: cpu\n- cases: []\n", "a list"), ("just words\n", "'just words'"),
                                         ("42\n", "42")])
@pytest.mark.slow
def test_bench_matrix_whose_top_level_is_not_a_mapping(tmp_path, text, shown):
    path = tmp_path / "cases.yaml"
    path.write_text(text)
    line = one_error_line(cli("bench", "--config", str(path), "--out", str(tmp_path / "out")))
    assert line.startswith(f"error: {path}: the top level is {shown}; it must be a mapping")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- generate and chat


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_generate_rejects_an_empty_prompt(prompt):
    line = one_error_line(cli("generate", "--prompt", prompt))
    assert line.startswith("error: --prompt is empty")


@pytest.mark.slow
def test_generate_with_temperature_zero_decodes_greedily():
    proc = cli("generate", "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(proc.stdout.strip().splitlines()[-1])) == {"analysis", "final", "truncated"}


def test_chat_with_stdin_closed_ends_cleanly():
    proc = cli("chat", "--max-new-tokens", "4", stdin=None, preexec_fn=lambda: os.close(0))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "stdin" in proc.stderr


@pytest.mark.slow
def test_chat_with_stdin_at_end_of_input_ends_cleanly():
    proc = cli("chat", "--max-new-tokens", "4", stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
