"""Bad input found by users, through the command line, where the command loads the embedded model: `bench`
on a matrix whose top level is not a mapping, `chat` at the end of its input, and temperature 0 as greedy
decoding through `generate` (~10 s). The cases that stop before a model is loaded: unit/test_bad_inputs_cli.py.
"""
from __future__ import annotations

import json
import subprocess

import pytest

from helpers import cli, one_error_line

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("text, shown", [("- device: cpu\n- cases: []\n", "a list"), ("just words\n", "'just words'"),
                                         ("42\n", "42")])
def test_bench_matrix_whose_top_level_is_not_a_mapping(tmp_path, text, shown):
    path = tmp_path / "cases.yaml"
    path.write_text(text)
    line = one_error_line(cli("bench", "--config", str(path), "--out", str(tmp_path / "out")))
    assert line.startswith(f"error: {path}: the top level is {shown}; it must be a mapping")
    assert not (tmp_path / "out").exists()


def test_generate_with_temperature_zero_decodes_greedily():
    proc = cli("generate", "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(proc.stdout.strip().splitlines()[-1])) == {"analysis", "final", "truncated"}


def test_chat_with_stdin_at_end_of_input_ends_cleanly():
    proc = cli("chat", "--max-new-tokens", "4", stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
