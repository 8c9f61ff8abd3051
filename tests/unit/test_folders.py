"""Nothing of the user's is ever lost: --overwrite replaces only folders this tool wrote, and only once
the new work has succeeded; a failed run leaves no folders behind but keeps what the user made.

The command-line cases fail before any model is loaded (a missing data set), so they take seconds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from helpers import cli_here
from lowvram_ft import folders
from lowvram_ft.config import load_config, to_yaml

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return cli_here(*args)  # every case stops before a model is loaded: in this process


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("four years of work\n")
    (path / "notes").mkdir()
    (path / "notes" / "a.md").write_text("x\n")
    return path


def finished_run(path: Path) -> Path:
    """A finished run of ours as train leaves it (marker, config, summary, adapter)."""
    path.mkdir(parents=True)
    folders.mark(path, "run")
    (path / "config.yaml").write_text(to_yaml(load_config(ROOT / "configs/embedded.yaml")))
    (path / "summary.json").write_text(json.dumps({"steps": 400}))
    (path / "adapter").mkdir()
    (path / "adapter" / "adapter_config.json").write_text("{}")
    return path


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


# --------------------------------------------------------------------------- train --output


def test_overwrite_never_deletes_a_folder_of_user_files(tmp_path):
    docs = user_folder(tmp_path / "docs")
    before = tree(docs)
    proc = cli("train", "--output", str(docs), "--overwrite", "--dataset", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert tree(docs) == before
    (line,) = error_lines(proc)
    assert "holds files lowvram_ft did not write (3 entries" not in line  # counted at the top level only
    assert "did not write (2 entries: notes/, thesis.txt)" in line and "never replaced" in line
    assert "Traceback" not in proc.stderr


def test_a_folder_of_user_files_is_not_called_an_unfinished_run(tmp_path):
    docs = user_folder(tmp_path / "docs")
    proc = cli("train", "--output", str(docs), "--dataset", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "unfinished run" not in line and "--overwrite" not in line and "choose another --output" in line


def test_a_failed_overwrite_keeps_the_finished_run(tmp_path):
    run = finished_run(tmp_path / "run")
    before = tree(run)
    proc = cli("train", "--output", str(run), "--overwrite", "--dataset", str(tmp_path / "typo.jsonl"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert tree(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "nothing moved aside is left over"


def test_a_finished_run_without_overwrite_is_refused_and_kept(tmp_path):
    run = finished_run(tmp_path / "run")
    before = tree(run)
    proc = cli("train", "--output", str(run), "--dataset", str(tmp_path / "typo.jsonl"))
    assert proc.returncode == 2 and "holds a finished run — pass --overwrite" in proc.stderr
    assert tree(run) == before


def test_a_failed_run_into_new_nested_folders_leaves_none_of_them(tmp_path):
    proc = cli("train", "--output", str(tmp_path / "a" / "b" / "c" / "run"), "--dataset", str(tmp_path / "no.jsonl"))
    assert proc.returncode == 2
    assert not (tmp_path / "a").exists()


def test_a_failed_run_keeps_the_empty_folder_the_user_made(tmp_path):
    (tmp_path / "mine").mkdir()
    proc = cli("train", "--output", str(tmp_path / "mine"), "--dataset", str(tmp_path / "no.jsonl"))
    assert proc.returncode == 2
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


# --------------------------------------------------------------------------- export --out


def test_export_overwrite_never_deletes_a_folder_of_user_files(tmp_path):
    run = finished_run(tmp_path / "run")
    mydocs = user_folder(tmp_path / "mydocs")
    before = tree(mydocs)
    proc = cli("export", "--run", str(run), "--format", "lora", "--out", str(mydocs), "--overwrite")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert tree(mydocs) == before
    assert "did not write" in error_lines(proc)[0]


def test_export_refuses_to_write_over_a_run_folder(tmp_path):
    run = finished_run(tmp_path / "run")
    other = finished_run(tmp_path / "other")
    proc = cli("export", "--run", str(run), "--format", "lora", "--out", str(other), "--overwrite")
    assert proc.returncode == 2 and "holds a train run, not an export" in proc.stderr
    assert (other / "summary.json").is_file()


# --------------------------------------------------------------------------- the rules, without a process


def test_only_marked_folders_or_legacy_run_folders_are_ours(tmp_path):
    assert folders.kind_of(finished_run(tmp_path / "run")) == "run"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.yaml").write_text("model: {}\n")
    (legacy / "metrics.jsonl").write_text("")
    assert folders.kind_of(legacy) == "run"
    (legacy / "thesis.txt").write_text("x")
    assert folders.kind_of(legacy) is None, "one foreign file makes a legacy folder not ours"
    assert folders.kind_of(user_folder(tmp_path / "docs")) is None
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / folders.MARKER).write_text("not json")
    assert folders.kind_of(tmp_path / "fake") is None


def test_replacement_moves_the_old_folder_aside_and_restores_it_on_abort(tmp_path):
    run = finished_run(tmp_path / "run")
    before = tree(run)
    replacement = folders.Replacement(run, "run")
    replacement.begin()
    assert tree(run) == {folders.MARKER: json.dumps({"tool": "lowvram_ft", "kind": "run"}) + "\n"}
    (run / "config.yaml").write_text("new")
    replacement.abort()
    assert tree(run) == before and folders.leftover_aside(run) == []


def test_replacement_commit_deletes_the_old_folder_only_then(tmp_path):
    run = finished_run(tmp_path / "run")
    replacement = folders.Replacement(run, "run")
    replacement.begin()
    assert len(folders.leftover_aside(run)) == 1
    (run / "summary.json").write_text("{}")
    replacement.commit()
    assert folders.leftover_aside(run) == [] and (run / "summary.json").read_text() == "{}"


def test_swap_into_replaces_an_earlier_export_only_when_the_new_one_is_complete(tmp_path):
    out, new = tmp_path / "out", tmp_path / ".out.partial"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    folders.swap_into(new, out)
    assert tree(out) == {"new.txt": "new"} and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("nested", [["a"], ["a", "b", "c"]])
def test_make_dirs_and_remove_made_undo_exactly_what_was_made(tmp_path, nested):
    (tmp_path / "keep").mkdir()
    made = folders.make_dirs(tmp_path.joinpath("keep", *nested, "run"))
    assert made[0] == tmp_path / "keep" / nested[0]
    folders.remove_made(made)
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == []
    assert (tmp_path / "keep").is_dir()


# --------------------------------------------------------------------------- a folder in use (two real processes)

HOLDER = """import sys, time
from lowvram_ft import folders
sys.argv = ["lowvram_ft", "train", "--output", sys.argv[1]]
lock = folders.hold(sys.argv[3], "training")
print("held", flush=True)
time.sleep(300)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock on tmp_path/run, as `train --output` does while it trains."""
    import signal

    run = finished_run(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_folder_held_by_another_process_is_refused_naming_it(holder):
    run, proc = holder
    with pytest.raises(folders.FolderInUse) as info:
        folders.hold(run, "training")
    (line,) = info.value.lines()
    assert f"in use by process {proc.pid} (training; python -m lowvram_ft train --output {run})" in line


@pytest.mark.parametrize("flags", [["--dataset", "missing.jsonl"], ["--overwrite", "--dataset", "missing.jsonl"],
                                   ["--resume"]])
def test_train_into_a_folder_in_use_is_refused_whatever_the_flags(holder, flags):
    run, proc = holder
    before = tree(run)
    result = cli("train", "--output", str(run), *flags)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = error_lines(result)
    assert f"{run}: in use by process {proc.pid}" in line and "Traceback" not in result.stderr
    assert tree(run) == before and proc.poll() is None


def test_export_eval_and_smoke_of_a_folder_in_use_are_refused(holder):
    run, proc = holder
    for args in (["export", "--run", str(run), "--format", "lora"], ["eval", "--run", str(run)],
                 ["smoke", "--run", str(run)]):
        result = cli(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"in use by process {proc.pid}" in "\n".join(error_lines(result))


def test_a_killed_holder_leaves_no_lock(holder):
    import signal

    run, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert folders.lock_file(run).exists()  # the file stays behind; the lock went with the process
    lock = folders.hold(run, "training")
    lock.release()
    assert not folders.lock_file(run).exists()


def test_the_lock_stays_with_the_path_when_the_folder_is_moved_aside(tmp_path):
    run = finished_run(tmp_path / "run")
    lock = folders.hold(run, "training")
    replacement = folders.Replacement(run, "run")
    replacement.begin()  # the earlier run moved aside, the new one created: still the same lock
    assert lock.path == folders.lock_file(run) and lock.path.is_file()
    result = subprocess.run([sys.executable, "-c", "import sys; from lowvram_ft import folders; "
                             "folders.hold(sys.argv[1], 'training')", str(run)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True)
    assert result.returncode != 0 and f"in use by process {os.getpid()}" in result.stderr
    replacement.commit()
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_second_hold_by_the_same_process_is_counted(tmp_path):
    first = folders.hold(tmp_path / "a" / "run", "training")
    second = folders.hold(tmp_path / "a" / "run", "evaluating")
    assert second is first
    second.release()
    assert first.path.is_file()
    first.release()
    assert not (tmp_path / "a").exists()  # the parent made for the lock file goes with it
