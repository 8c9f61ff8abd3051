"""Runs that survive, end to end: resume after SIGKILL (bit-identical on CPU), Ctrl-C / SIGTERM, out of
memory in training, a full disk. Refused resumes and the pure pieces: unit/test_resume.py.

The tests train the embedded model for 12 steps (batch 4 of 32 rows, so the run crosses an epoch boundary
at step 8) and kill it with real SIGKILLs at chosen points through the LOWVRAM_FT_FAULT testing hook
(lowvram_ft.testing.faults), then compare with one uninterrupted run of the same seed.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import conftest
from conftest import EPS, ROOT
from helpers import steps_of
from lowvram_ft.testing.faults import FAULT_ENV
from lowvram_ft.train import checkpoints

pytestmark = pytest.mark.slow

ENV = {**conftest.ENV, "PYTHONUNBUFFERED": "1"}  # one CPU thread (conftest), the child's lines as printed
SHORT = ["--config", "configs/embedded.yaml", "train.max_steps=12", "train.save_steps=4", "train.logging_steps=1",
         "train.batch_size=4", "data.max_rows=32", "model.max_seq_length=256", "eval.enabled=false"]


def train(run_dir: Path, *args: str, fault: str | None = None, timeout: int = 300,
          python: tuple[str, ...] = ("-m", "lowvram_ft")) -> subprocess.CompletedProcess:
    env = {**ENV, FAULT_ENV: fault} if fault else ENV
    return subprocess.run([sys.executable, *python, "train", "--output", str(run_dir), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# The command line in a process whose disk reports no free space (shutil.disk_usage, what the checks read).
FULL_DISK = ("-c", "import runpy, shutil, sys, types; "
                   "shutil.disk_usage = lambda path: types.SimpleNamespace(total=2**40, used=2**40, free=0); "
                   "sys.argv[0] = 'lowvram_ft'; runpy.run_module('lowvram_ft', run_name='__main__')")


# The same, once the run's first checkpoint is complete: the disk fills up mid-run (argv[3] is --output's value).
FILLS_UP = ("-c", "import pathlib, runpy, shutil, sys, types; real = shutil.disk_usage; "
                  "shutil.disk_usage = lambda path: types.SimpleNamespace(total=2**40, used=2**40, free=0) "
                  "if any(pathlib.Path(sys.argv[3]).glob('checkpoints/*/lowvram_ft_state.json')) else real(path); "
                  "sys.argv[0] = 'lowvram_ft'; runpy.run_module('lowvram_ft', run_name='__main__')")


def start(run_dir: Path, *args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lowvram_ft", "train", "--output", str(run_dir), *args],
                            cwd=ROOT, env=ENV, stdout=stdout, stderr=subprocess.PIPE, text=True)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def squeeze(text: str) -> str:
    """The log without whitespace: the console wraps long lines (run folder paths) anywhere."""
    return re.sub(r"\s+", "", text)


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if any(r["step"] >= step for r in metrics(run_dir)):
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = train(run_dir, *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


# --------------------------------------------------------------------------- end to end


def test_killed_three_times_then_resumed_equals_the_uninterrupted_run(reference, tmp_path):
    run_dir = tmp_path / "run"
    # 1. SIGKILL at the end of step 6, between checkpoints 4 and 8.
    proc = train(run_dir, *SHORT, fault="kill@step=6")
    assert proc.returncode == -signal.SIGKILL
    assert steps_of(run_dir) == [4]

    # 2. Resumed from 4, SIGKILL while checkpoint 8 is half written: 4 stays the newest complete one.
    proc = train(run_dir, "--resume", fault="kill@checkpoint=8")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    partial = run_dir / "checkpoints" / "checkpoint-8"
    assert (partial / "adapter_model.safetensors").is_file() and not (partial / "optimizer.pt").exists()
    assert not (partial / checkpoints.STATE_FILE).exists(), "a checkpoint killed mid-write has no mark"
    assert steps_of(run_dir) == [4]

    # 3. Resumed from 4 again (the half-written 8 ignored), SIGKILL at the end of step 11 (after 8, past the epoch).
    proc = train(run_dir, "--resume", fault="kill@step=11")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "continuingfrom" in squeeze(proc.stdout) and "checkpoint-4(step4)" in squeeze(proc.stdout)
    assert steps_of(run_dir) == [4, 8]
    assert checkpoints.list_checkpoints(run_dir)[1] == [], "the half-written 8 was rewritten and marked"

    # 4. Resumed from 8 to the end.
    proc = train(run_dir, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint-8(step8)" in squeeze(proc.stdout)
    assert steps_of(run_dir) == [8, 12]  # train.keep_checkpoints=2, and the end is always checkpointed

    import torch

    want, got = adapter(reference), adapter(run_dir)
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        assert torch.allclose(want[name], got[name], rtol=0, atol=1e-7), name
    want_log, got_log = metrics(reference), metrics(run_dir)
    assert [r["step"] for r in got_log] == list(range(1, 13)), "every step logged exactly once"
    assert [r["loss"] for r in got_log] == pytest.approx([r["loss"] for r in want_log], rel=1e-6, abs=0)
    assert [r["tokens"] for r in got_log] == [r["tokens"] for r in want_log]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["first_loss"] == pytest.approx(want_log[0]["loss"], rel=1e-6)
    assert summary["trained_tokens"] == want_log[-1]["tokens"]


def test_a_disk_full_mid_run_stops_cleanly_says_how_to_resume_and_the_resume_equals_the_uninterrupted_run(
        reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = train(run_dir, *SHORT, python=FILLS_UP)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "not enough free disk space for checkpoint checkpoint-8" in lines[0]
    assert lines[1] == (f"error: checkpoint {run_dir / 'checkpoints' / 'checkpoint-4'} (step 4) is intact — once there "
                        f"is room, continue with: python -m lowvram_ft train --output {run_dir} --resume")
    assert steps_of(run_dir) == [4]

    proc = train(run_dir, "--resume")  # the command as printed, with room again
    assert proc.returncode == 0, proc.stderr[-3000:]
    import torch

    want, got = adapter(reference), adapter(run_dir)
    assert want.keys() == got.keys() and all(torch.equal(want[name], got[name]) for name in want)
    assert [r["loss"] for r in metrics(run_dir)] == [r["loss"] for r in metrics(reference)]


def test_a_damaged_newest_checkpoint_is_passed_over_for_the_newest_intact_one(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = train(run_dir, *SHORT, fault="kill@step=10")
    assert proc.returncode == -signal.SIGKILL and steps_of(run_dir) == [4, 8]
    optimizer = run_dir / "checkpoints" / "checkpoint-8" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the checksum can tell
    optimizer.write_bytes(bytes(data))

    proc = train(run_dir, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = squeeze(proc.stdout)
    assert "checkpoint-4(step4)" in out and "passedoverdamagedorincompletecheckpoint-8(optimizer.ptdoesnotmatchitschecksum)" in out
    assert "Traceback" not in proc.stderr
    dtype = json.loads((run_dir / "summary.json").read_text())["compute_dtype"]
    assert [r["loss"] for r in metrics(run_dir)] == pytest.approx([r["loss"] for r in metrics(reference)],
                                                                  rel=max(1e-6, EPS[dtype] / 4))


def test_sigint_and_sigterm_finish_the_step_checkpoint_and_say_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    long = [a if a != "train.max_steps=12" else "train.max_steps=500" for a in SHORT]
    for signum, code, resume in ((signal.SIGINT, 130, []), (signal.SIGTERM, 143, ["--resume"])):
        proc = start(run_dir, *(resume or long), stdout=subprocess.DEVNULL)  # unread: a full pipe would block it
        before = max([r["step"] for r in metrics(run_dir)], default=0)
        wait_for_step(proc, run_dir, before + 2)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err[-3000:]
        latest = checkpoints.latest_checkpoint(run_dir)
        assert latest is not None and latest.step >= before + 2
        assert f"interrupted ({signum.name}) at step {latest.step}" in err
        assert f"resume with: python -m lowvram_ft train --output {run_dir} --resume" in err
        assert "Traceback" not in err
        assert [r["step"] for r in metrics(run_dir)] == list(range(1, latest.step + 1))
        assert not (run_dir / "summary.json").exists()


def test_a_signal_before_training_stops_at_once_and_leaves_no_folder(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, *SHORT)
    for line in proc.stdout:  # the run folder exists from here on; the model is still loading
        if line.startswith("[lowvram_ft] config:"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "interrupted (SIGTERM) before the first checkpoint: nothing saved" in err and "Traceback" not in err
    assert not run_dir.exists()


def test_out_of_memory_in_training_gives_advice_exit_3_and_a_resumable_checkpoint(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = train(run_dir, *SHORT, fault="oom@step=6")
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert lines[0].startswith("error: out of memory in training step 6 (CUDA out of memory.")
    text = "\n".join(lines)
    assert "peak RSS (host RAM) reached" in text and "GiB of" in text
    assert "the planner predicts a peak of" in text and "train.batch_size=2 train.gradient_accumulation_steps=2" in text
    assert f"checkpoint {run_dir / 'checkpoints' / 'checkpoint-4'} (step 4) is intact" in text
    command = next(line for line in lines if "continue from it with:" in line).split("with: ", 1)[1]
    assert command == f"python -m lowvram_ft train --output {run_dir} --resume train.batch_size=2 train.gradient_accumulation_steps=2"
    assert "Traceback" not in proc.stderr and steps_of(run_dir) == [4]

    # The advised resume (smaller micro-batches, same effective batch) finishes the run on the same path.
    proc = train(run_dir, *command.split()[6:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = metrics(reference), metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, 13))
    # Micro-batches of 2 instead of 4 sum the same rows in another order: fp32 agrees to ~1e-7, bf16
    # (a CPU with native bf16) to a fraction of one bf16 rounding (measured 2e-4 relative).
    dtype = json.loads((run_dir / "summary.json").read_text())["compute_dtype"]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=max(1e-5, EPS[dtype] / 4))


def test_a_full_disk_stops_a_new_run_before_training_and_leaves_no_folder(tmp_path):
    run_dir = tmp_path / "run"
    proc = train(run_dir, *SHORT, python=FULL_DISK)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert "not enough free disk space for 3 checkpoints and the adapter" in line and "0.00 GiB free" in line
    assert not run_dir.exists()



def test_a_run_in_progress_holds_its_folder_against_every_other_train_until_it_dies(tmp_path):
    """Two real trainings into one folder: the second is refused, with or without --overwrite / --resume
    (following the advice of old, --overwrite, would have moved the live run aside); after a SIGKILL of
    the first the folder is free at once (the OS dropped the lock)."""
    from lowvram_ft import folders

    run_dir = tmp_path / "run"
    long = [a if a != "train.max_steps=12" else "train.max_steps=500" for a in SHORT]
    first = start(run_dir, *long, stdout=subprocess.DEVNULL)
    try:
        wait_for_step(first, run_dir, 1)
        for flags in ([], ["--overwrite"], ["--resume"]):
            second = train(run_dir, *flags, *([] if flags == ["--resume"] else long))
            assert second.returncode == 2, second.stderr[-3000:]
            line = next(line for line in second.stderr.splitlines() if line.startswith("error: "))
            assert f"{run_dir}: in use by process {first.pid} (training; python -m lowvram_ft train --output " in line
            assert first.poll() is None and "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run_dir / "config.yaml").is_file() and metrics(run_dir)  # the first run's folder, untouched
    folders.hold(run_dir, "training").release()
