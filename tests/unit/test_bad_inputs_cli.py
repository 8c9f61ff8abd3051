"""Bad input found by users, through the command line: `plan` on a broken config.json or a nonsense
--vram, `generate` with an empty prompt, and `chat` with its input closed. Each is one `error:` line and
exit 2 (or a clean exit 0 for chat), never a traceback. The cases that load the embedded model (`bench`,
`chat` at the end of its input, greedy `generate`): e2e/test_bad_inputs_cli.py.
"""
from __future__ import annotations

import json
import os

import pytest

from helpers import cli, cli_here, one_error_line


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
    line = one_error_line(cli_here("plan", "--model", str(tmp_path)))
    assert f"{tmp_path / 'config.json'}: " in line and key in line


@pytest.mark.parametrize("vram", ["-5", "0", "nan", "inf"])
def test_plan_rejects_a_vram_that_is_not_a_positive_number(vram):
    line = one_error_line(cli_here("plan", f"--vram={vram}"))
    assert line.startswith(f"error: --vram: got {float(vram)}; expected") and "positive" in line


# --------------------------------------------------------------------------- generate and chat


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_generate_rejects_an_empty_prompt(prompt):
    line = one_error_line(cli_here("generate", "--prompt", prompt))
    assert line.startswith("error: --prompt is empty")


def test_chat_with_stdin_closed_ends_cleanly():
    proc = cli("chat", "--max-new-tokens", "4", stdin=None, preexec_fn=lambda: os.close(0))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "stdin" in proc.stderr
