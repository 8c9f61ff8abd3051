"""Bad input through the command line: each case is exit 2, one `error:` line per problem that says
what, where and what to do, no traceback, and no output folder left behind.

These cases stop before a model is loaded (data is read first), so they take a second or two; those that
load Unsloth (an unknown model id, a missing model folder, a tokenizer without a chat template):
e2e/test_errors.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import QUICK, error_lines, train_here as train

def unreadable_file(tmp_path: Path, name: str) -> Path:
    """A file that exists but cannot be read: mode 000, or for root (who reads anything) a link to
    /proc/self/mem, whose first page read fails with an I/O error."""
    path = tmp_path / name
    if os.geteuid() != 0:
        path.write_text("model:\n  name: embedded\n")
        path.chmod(0)
        return path
    if not Path("/proc/self/mem").exists():
        pytest.skip("running as root without /proc: no way to make an unreadable file")
    path.symlink_to("/proc/self/mem")
    return path


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder where nothing can be created: mode 555, or for root a path under /sys."""
    if os.geteuid() != 0:
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o555)
        return parent / "run"
    target = Path("/sys/lowvram-ft-test-run")
    try:
        target.mkdir()
    except OSError:
        return target
    target.rmdir()
    pytest.skip("running as root with a writable /sys: no way to make an unwritable folder")


# --------------------------------------------------------------------------- files


def test_missing_config_file(tmp_path):
    proc, out = train(tmp_path, "--config", str(tmp_path / "nope.yaml"))
    assert error_lines(proc) == [f"error: {tmp_path / 'nope.yaml'}: config file does not exist — pass an existing "
                                 "YAML file with --config"]
    assert not out.exists()


def test_unreadable_config_file(tmp_path):
    path = unreadable_file(tmp_path, "config.yaml")
    proc, out = train(tmp_path, "--config", str(path))
    [line] = error_lines(proc)
    assert line.startswith(f"error: {path}: cannot read the file (") and "check that it exists and is readable" in line
    assert not out.exists()


def test_directory_given_as_config_file(tmp_path):
    proc, out = train(tmp_path, "--config", str(tmp_path))
    assert error_lines(proc) == [f"error: {tmp_path}: config file is a directory — pass an existing YAML file with --config"]
    assert not out.exists()


def test_missing_dataset_file(tmp_path):
    proc, out = train(tmp_path, *QUICK, "--dataset", str(tmp_path / "nope.jsonl"))
    [line] = error_lines(proc)
    assert line.startswith(f"error: {tmp_path / 'nope.jsonl'}: file not found")
    assert not out.exists()


def test_unreadable_dataset_file(tmp_path):
    path = unreadable_file(tmp_path, "rows.jsonl")
    proc, out = train(tmp_path, *QUICK, "--dataset", str(path))
    [line] = error_lines(proc)
    assert line.startswith(f"error: {path}: cannot read the file (") and "readable" in line
    assert not out.exists()


def test_directory_given_as_dataset(tmp_path):
    proc, out = train(tmp_path, *QUICK, "--dataset", str(tmp_path))
    assert error_lines(proc) == [f"error: {tmp_path}: is a directory, not a file — pass one "
                                 ".jsonl/.json/.csv/.parquet file inside it"]
    assert not out.exists()


def test_dataset_with_zero_usable_rows(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    proc, out = train(tmp_path, *QUICK, "--dataset", str(empty))
    assert error_lines(proc) == [f"error: {empty}: no rows — add rows to the file or remove it from data.dataset"]
    assert not out.exists()

    invalid = tmp_path / "invalid.jsonl"  # every row invalid, and invalid rows skipped: nothing left
    invalid.write_text('{"user": "hi"}\n{"user": "", "final": ""}\n[1]\n')
    proc, out = train(tmp_path, "--dataset", str(invalid), *QUICK, "data.on_invalid=skip")
    [line] = error_lines(proc)
    assert line.startswith(f"error: data.dataset: no usable rows ({invalid}: 3 read; 3 invalid)")
    assert not out.exists()


def test_unwritable_output_folder(tmp_path):
    target = unwritable_dir(tmp_path)
    proc, _ = train(tmp_path, *QUICK, output=target)
    [line] = error_lines(proc)
    assert line.startswith(f"error: {target}: cannot write there (") and "choose a writable --output" in line
    assert not target.exists()


def test_output_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("keep me")
    proc, _ = train(tmp_path, *QUICK, output=path)
    assert error_lines(proc) == [f"error: {path}: is a file — pass a folder to --output"]
    assert path.read_text() == "keep me"


def test_config_problems_are_listed_together(tmp_path):
    proc, out = train(tmp_path, *QUICK, "lora.rr=8", "train.max_steps=abc")
    assert error_lines(proc) == ["error: lora.rr: unknown key — did you mean lora.r?",
                                 "error: train.max_steps: got 'abc'; expected an integer"]
    assert not out.exists()


# --------------------------------------------------------------------------- the package's error classes


def test_every_error_class_of_the_package_is_a_user_error_with_an_exit_code():
    """The command line turns UserErrors into lines and exit codes (errors.py): an error class outside
    that base would reach the user as a traceback."""
    import importlib
    import inspect
    import pkgutil

    import lowvram_ft
    from lowvram_ft.errors import UserError

    found = {}
    for info in pkgutil.walk_packages(lowvram_ft.__path__, "lowvram_ft."):  # subpackages too (lowvram_ft.data)
        if info.name.endswith(".__main__"):  # running it would run a command
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, Exception) and name != "UserError":
                found[name] = cls
    assert {"ConfigError", "DataError", "ModelError", "FolderError", "OutOfMemory", "BenchError"} <= set(found)
    assert [name for name, cls in found.items() if not issubclass(cls, UserError)] == []
    assert found["OutOfMemory"].exit_code == 3 and found["DataError"].exit_code == 2
