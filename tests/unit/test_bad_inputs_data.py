"""Bad training data found by the user study: each is a located problem (FILE:ROW:FIELD or the config key),
reported by `data --check` exactly as `data` and `train` would refuse it, and through the command line
exit 2 with one `error:` line per problem, no traceback, nothing half-written.

Model-free: every case stops before a tokenizer or model loads.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from lowvram_ft import data
from lowvram_ft.data import command
from lowvram_ft.config import load_config

OK = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "five"}]}


def config(tmp_path: Path, *datasets, **data_keys):
    data_keys.setdefault("cache_dir", str(tmp_path / "cache"))
    return load_config(overrides={"data": {"dataset": [str(d) for d in datasets], **data_keys}})


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LOWVRAM_FT_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "lowvram_ft", "data", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The `error:` lines of a clean failure: exit 2, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


# --------------------------------------------------------------------------- data.columns


def test_rename_of_a_missing_column_names_it_and_the_columns_the_file_has(tmp_path):
    # `user` exists already, so the typo'd rename {questoin: user} used to pass silently.
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "user": "u"}] * 2)
    problems = data.check_data(config(tmp_path, path, columns={"questoin": "user", "answer": "final"}))
    assert problems == [f"data.columns: no data set has a column 'questoin' (columns in {path}: question, answer, "
                        "user) — fix the name (did you mean 'question'?) or remove the entry"]


# --------------------------------------------------------------------------- rules --check must run


def test_lone_surrogate_is_located_by_check_and_refused_by_data(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(OK) + "\n" + '{"messages": [{"role": "user", "content": "bad \\ud800 here"}, '
                    '{"role": "assistant", "content": "a"}]}\n', encoding="utf-8")
    line = (f"{path}:2:messages[0].content: not valid Unicode: lone surrogate \\ud800 at character 5 — fix the \\u "
            "escape in the file (surrogates come in pairs, e.g. \\ud83d\\ude00) or remove the row")
    assert data.check_data(config(tmp_path, path)) == [line]
    with pytest.raises(data.DataError) as error:  # not UnicodeEncodeError from the cache key
        data.load_data(config(tmp_path, path))
    assert error.value.problems == [line]
    loaded = data.load_data(config(tmp_path, path, on_invalid="skip"))
    assert loaded.stats["skipped"] == {"invalid Unicode": 1} and loaded.stats["train_rows"] == 1


@pytest.mark.parametrize("token", ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>"])
def test_harmony_control_tokens_are_located_by_check(tmp_path, token):
    conversation = {"messages": [{"role": "system", "content": f"Be brief {token}"},
                                 {"role": "user", "content": f"q {token}"},
                                 {"role": "assistant", "content": "a", "thinking": f"t {token}"}]}
    columns = [{"user": "q", "final": "a"}, {"user": "q", "final": "a", "analysis": f"x {token}"},
               {"user": "q", "final": "a", "reasoning_language": f"French{token}"}]
    path = write_jsonl(tmp_path / "c.jsonl", [OK, conversation])
    columns_path = write_jsonl(tmp_path / "mt.jsonl", columns)
    fix = "remove it: inside a message it would be read as chat structure, not as text"
    assert data.check_data(config(tmp_path, path)) == [
        f"{path}:2:{field}: contains the Harmony control token {token} — {fix}"
        for field in ("messages[0].content", "messages[1].content", "messages[2].thinking")]
    assert data.check_data(config(tmp_path, columns_path)) == [
        f"{columns_path}:{row}:{field}: contains the Harmony control token {token} — {fix}"
        for row, field in ((2, "analysis"), (3, "reasoning_language"))]


def test_plain_text_rows_may_hold_rendered_harmony(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "<|start|>user<|message|>hi<|end|>"}])
    assert data.check_data(config(tmp_path, path)) == []


def test_check_and_data_refuse_the_same_rows_through_the_command_line(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [OK, {"messages": [{"role": "user", "content": "q <|end|>"},
                                                                {"role": "assistant", "content": "a"}]}])
    check = cli(tmp_path, "--dataset", str(path), "--check")
    assert check.returncode == 2 and "Traceback" not in check.stderr
    problem = f"{path}:2:messages[0].content: contains the Harmony control token <|end|>"
    assert check.stdout.splitlines()[0].startswith(problem)
    run = cli(tmp_path, "--dataset", str(path), "--show", "0")
    assert [line.split(" — ")[0] for line in error_lines(run)] == [
        f"error: {problem}", "error: fix these rows, or set data.on_invalid=skip to drop them (they are counted)"]


def test_surrogate_through_the_command_line_is_one_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}\n',
                    encoding="utf-8")
    lines = error_lines(cli(tmp_path, "--dataset", str(path), "--show", "0"))
    assert lines[0].startswith(f"error: {path}:1:messages[0].content: not valid Unicode")
    assert len(lines) == 2


# --------------------------------------------------------------------------- shapes and files


def test_json_file_holding_one_conversation_is_one_row(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps(OK), encoding="utf-8")
    loaded = data.load_data(config(tmp_path, one))
    assert [e.where for e in loaded.train] == [f"{one}:1"] and loaded.stats["shapes"] == {"messages": 1}
    wrapped = tmp_path / "wrapped.json"  # {"key": [rows]} is still a list of rows
    wrapped.write_text(json.dumps({"rows": [OK, OK]}), encoding="utf-8")
    assert data.load_data(config(tmp_path, wrapped)).stats["train_rows"] == 2
    renamed = tmp_path / "dialog.json"  # one conversation under a column renamed by data.columns
    renamed.write_text(json.dumps({"dialog": OK["messages"]}), encoding="utf-8")
    assert data.load_data(config(tmp_path, renamed, columns={"dialog": "messages"})).stats["train_rows"] == 1


@pytest.mark.parametrize("stray", [{"user": "q", "final": "a"}, {"text": "plain"}, {"instruction": "i", "output": "o"}])
def test_one_stray_row_is_the_only_problem(tmp_path, stray):
    path = write_jsonl(tmp_path / "m.jsonl", [OK, OK, stray, OK])
    problems = data.check_data(config(tmp_path, path))
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:3: a row of the ") and "among rows of the messages shape" in problems[0]
    loaded = data.load_data(config(tmp_path, path, on_invalid="skip"))
    assert loaded.stats["train_rows"] == 3 and loaded.stats["skipped"] == {"other shape": 1}


def test_stray_conversation_among_column_rows(tmp_path):
    path = write_jsonl(tmp_path / "mt.jsonl", [{"user": "q", "final": "a"}, OK, {"user": "q", "final": "a"}])
    assert data.check_data(config(tmp_path, path)) == [
        f"{path}:2: a row of the messages shape (messages) among rows of the multilingual_thinking shape "
        "(user + final) — write it like the other rows or move it to a file of its own"]


def test_unterminated_csv_quote_is_a_syntax_error_with_its_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('instruction,output\nSay hi,hi\n"Add,7\nSay bye,bye\n', encoding="utf-8")
    assert data.check_data(config(tmp_path, path)) == [
        f"{path}: CSV syntax error: the quoted field opened on line 3 is never closed, so the rest of the file would "
        'be read into it — close the quote (a quote inside a quoted field is written twice: "")']
    fine = tmp_path / "fine.csv"  # quoted fields over several lines, escaped quotes, blank lines at the end
    fine.write_text('instruction,output\n"Say\n""hi""",hi\n"Add",7\n\n\n', encoding="utf-8")
    assert data.check_data(config(tmp_path, fine)) == []
    assert data.unclosed_quote_line('a,b\n"x,1\n') == 2 and data.unclosed_quote_line("a,b\nx,1\n") is None


# --------------------------------------------------------------------------- --export


def test_export_to_a_folder_is_refused_before_the_tokenizer_loads(tmp_path, monkeypatch):
    import lowvram_ft.model

    def never(name):
        raise AssertionError("the tokenizer loaded before the export path was checked")

    monkeypatch.setattr(lowvram_ft.model, "load_tokenizer", never)
    with pytest.raises(data.DataError) as error:
        data.inspect(config(tmp_path, "sample"), show=0, export=str(tmp_path))
    assert str(error.value) == (f"{tmp_path}: --export names a folder — give a file path, e.g. "
                                f"{tmp_path / 'rendered.jsonl'}")


def test_export_failure_names_the_users_path_and_leaves_nothing(tmp_path, monkeypatch):
    class Tokenizer:
        def decode(self, ids, **kwargs):
            return "text"

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", src)

    monkeypatch.setattr(command.os, "replace", full_disk)
    target = tmp_path / "out" / "ex.jsonl"
    with pytest.raises(data.DataError) as error:
        data.export_jsonl([{"input_ids": [1], "labels": [1]}], ["f.jsonl:1"], Tokenizer(), str(target))
    assert str(error.value) == (f"{target}: cannot write the export (No space left on device) — choose another "
                                "--export path or free some space")
    assert list(target.parent.iterdir()) == []


def test_export_to_a_folder_through_the_command_line(tmp_path):
    lines = error_lines(cli(tmp_path, "--show", "0", "--export", str(tmp_path)))
    assert lines == [f"error: {tmp_path}: --export names a folder — give a file path, e.g. "
                     f"{tmp_path / 'rendered.jsonl'}"]
    assert ".tmp" not in lines[0]
