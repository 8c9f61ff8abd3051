"""Runs that survive, without training: refused resumes, which checkpoints count as complete, metrics
rewound to a checkpoint, disk space and out-of-memory messages. Resume after real SIGKILLs (bit-identical on
CPU), Ctrl-C / SIGTERM, out of memory in training and a full disk, end to end: e2e/test_resume.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT
from helpers import cli_here as cli, steps_of
from lowvram_ft.config import load_config, to_dict, to_yaml
from lowvram_ft.errors import is_out_of_memory
from lowvram_ft.train import checkpoints, run_state


# --------------------------------------------------------------------------- refusals (no model is loaded)


def fake_run(tmp_path: Path, steps=(4,), finished=False, overrides=(), processes=1, launch=None) -> Path:
    """A run folder as training leaves it, with checkpoints that pass the completeness check."""
    run_dir = tmp_path / "run"
    cfg = load_config(ROOT / "configs/embedded.yaml", ["train.max_steps=12", "eval.enabled=false", *overrides])
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    for step in steps:
        folder = run_dir / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir()
        rng = [f"rng_state_{rank}.pth" for rank in range(processes)] if processes > 1 else ["rng_state.pth"]
        for name in (*checkpoints.REQUIRED_FILES, *rng, "adapter_model.safetensors"):
            (folder / name).write_text("x")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        checkpoints.mark_complete(folder, step, processes=processes, launch=launch)
    if finished:
        (run_dir / "summary.json").write_text("{}")
    return run_dir


def test_resume_refuses_a_config_that_changes_the_run_and_lists_the_keys(tmp_path):
    run_dir = fake_run(tmp_path)
    proc = cli("train", "--output", str(run_dir), "--resume", "lora.r=8", "train.learning_rate=1e-3", "eval.greedy=false")
    assert proc.returncode == 2
    assert "cannot resume with a config that changes what is trained (2 keys differ" in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[1] == "error:   lora.r: 16 -> 8"
    assert lines[2].startswith("error:   train.learning_rate: ") and lines[2].endswith(" -> 0.001")
    assert "eval.greedy" not in proc.stderr and "Traceback" not in proc.stderr


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    cases = {
        "missing": (tmp_path / "nowhere", "no such run folder — nothing to resume"),
        "finished": (fake_run(tmp_path / "f", finished=True), "this run has finished (summary.json) — nothing to resume"),
        "no checkpoint": (fake_run(tmp_path / "n", steps=()), "no intact checkpoint to resume from"),
    }
    broken = fake_run(tmp_path / "b", steps=(4,))
    (broken / "checkpoints" / "checkpoint-4" / "optimizer.pt").unlink()
    cases["broken checkpoint"] = (broken, "no intact checkpoint to resume from")
    for name, (run_dir, message) in cases.items():
        proc = cli("train", "--output", str(run_dir), "--resume")
        assert proc.returncode == 2, name
        assert proc.stderr.startswith(f"error: {run_dir}: {message}"), (name, proc.stderr)
    assert cli("train", "--resume").stderr.startswith("error: --resume: name the run to continue with --output RUN")


def test_resume_with_another_number_of_processes_is_refused_naming_both(tmp_path):
    launch = "accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 -m lowvram_ft"
    run_dir = fake_run(tmp_path, steps=(4,), processes=2, launch=launch)
    proc = cli("train", "--output", str(run_dir), "--resume")  # one process
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0] == (
        f"error: {run_dir}: the run was started with 2 processes, this resume has 1 process — resume it with 2, "
        f"as it was started: {launch} train --output {run_dir} --resume")
    single = fake_run(tmp_path / "one", steps=(4,))
    with pytest.raises(checkpoints.ResumeError, match="started with 1 process, this resume has 4 processes"):
        checkpoints.check_processes(single, checkpoints.latest_checkpoint(single), 4)
    checkpoints.check_processes(single, checkpoints.latest_checkpoint(single), 1)


def test_the_resume_hints_give_the_command_that_started_the_run(tmp_path):
    run = run_state.RunState(load_config(ROOT / "configs/embedded.yaml"))
    run.launch = "torchrun --nproc_per_node 2 -m lowvram_ft"
    run.run_dir, run.fresh, run.phase, run.step = fake_run(tmp_path, steps=(4,)), False, "train", 5
    message = run.interrupt_message(15, at_once=False)
    assert message.endswith(f"resume with: torchrun --nproc_per_node 2 -m lowvram_ft train --output {run.run_dir} --resume")


def test_an_interrupted_run_folder_suggests_resume_and_a_finished_one_needs_overwrite(tmp_path):
    unfinished = fake_run(tmp_path / "u", steps=(4, 8))
    proc = cli("train", "--config", "configs/embedded.yaml", "--output", str(unfinished))
    assert proc.returncode == 2
    assert "holds an unfinished run (last checkpoint: step 8) — continue it with --resume" in proc.stderr
    finished = fake_run(tmp_path / "f", finished=True)
    proc = cli("train", "--config", "configs/embedded.yaml", "--output", str(finished))
    assert proc.returncode == 2 and "holds a finished run — pass --overwrite" in proc.stderr
    assert (finished / "summary.json").is_file() and steps_of(finished) == [4], "nothing was touched"


# --------------------------------------------------------------------------- pure pieces


def test_run_changes_allow_only_what_cannot_change_the_weights():
    saved = to_dict(load_config(ROOT / "configs/embedded.yaml"))
    same = ["eval.greedy=false", "output.overwrite=true", "output.dir=elsewhere", "train.logging_steps=5",
            "train.save_steps=50", "train.keep_checkpoints=5", "data.num_proc=2", "model.gradient_checkpointing=true",
            "train.batch_size=2", "train.gradient_accumulation_steps=4"]  # 8 x 1 -> 2 x 4: same effective batch
    assert checkpoints.run_changes(saved, to_dict(load_config(ROOT / "configs/embedded.yaml", same))) == []
    changed = checkpoints.run_changes(saved, to_dict(load_config(ROOT / "configs/embedded.yaml",
                                                                ["train.batch_size=4", "train.max_steps=10", "lora.r=8"])))
    assert [line.split(":")[0] for line in changed] == ["lora.r", "train.batch_size", "train.max_steps"]


def test_incomplete_and_unmarked_checkpoints_are_ignored(tmp_path):
    run_dir = fake_run(tmp_path, steps=(4, 8, 12, 16))
    (run_dir / "checkpoints" / "checkpoint-12" / "trainer_state.json").write_text('{"global_step": 1')  # cut short
    (run_dir / "checkpoints" / "checkpoint-8" / "trainer_state.json").write_text('{"global_step": 7}')  # not step 8
    (run_dir / "checkpoints" / "checkpoint-16" / checkpoints.STATE_FILE).unlink()  # killed before its mark
    complete, broken = checkpoints.list_checkpoints(run_dir)
    assert [c.step for c in complete] == [4]
    assert sorted(p.name for p in broken) == ["checkpoint-12", "checkpoint-16", "checkpoint-8"]
    assert checkpoints.resume_point(run_dir).step == 4

def test_a_truncated_file_makes_a_checkpoint_incomplete_and_the_older_one_is_used(tmp_path):
    run_dir = fake_run(tmp_path, steps=(4, 8))
    for step in (4, 8):
        folder = run_dir / "checkpoints" / f"checkpoint-{step}"
        (folder / "optimizer.pt").write_bytes(b"\0" * 5000)
        checkpoints.mark_complete(folder, step, processes=1)
    with open(run_dir / "checkpoints" / "checkpoint-8" / "optimizer.pt", "r+b") as handle:
        handle.truncate(1000)
    latest = checkpoints.resume_point(run_dir)
    assert latest.step == 4 and latest.skipped == ("checkpoint-8 (optimizer.pt has 1,000 bytes, 5000 were written)",)
    with open(run_dir / "checkpoints" / "checkpoint-4" / "optimizer.pt", "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(checkpoints.ResumeError, match="no intact checkpoint to resume from .*damaged: checkpoint-4"):
        checkpoints.resume_point(run_dir)


def test_rewind_metrics_drops_later_steps_and_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    kept = checkpoints.rewind_metrics(path, 4)
    assert [r["step"] for r in kept] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_disk_space_is_checked_before_anything_is_written(tmp_path, monkeypatch):
    with pytest.raises(run_state.DiskSpaceError, match=r"not enough free disk space for the adapter: needs about"):
        run_state.check_free_space(tmp_path, 10**15, "the adapter")  # a petabyte
    run_state.check_free_space(tmp_path, 1000, "the adapter")

    import torch

    model = torch.nn.Linear(100, 10)  # 1,010 trainable float32 weights
    model.bias.requires_grad_(False)
    assert run_state.adapter_bytes(model) == 4000
    assert run_state.save_sizes(model, "adamw_torch") == (4000, 4000 + 2 * 4 * 1000)
    assert run_state.save_sizes(model, "adamw_8bit") == (4000, 4000 + int(2 * 1.02 * 1000))


def test_the_space_for_a_next_checkpoint_is_the_size_of_the_one_already_written(tmp_path, monkeypatch):
    import torch

    model = torch.nn.Linear(100, 10)
    run_dir = fake_run(tmp_path, steps=(4,))
    latest = checkpoints.latest_checkpoint(run_dir).path
    (latest / "optimizer.pt").write_bytes(b"x" * 4_500_000)  # the embedded demo's checkpoint: about 4.5 MB
    checkpoints.mark_complete(latest, 4, processes=1)
    size = checkpoints.checkpoint_bytes(latest)
    assert size == sum(p.stat().st_size for p in latest.iterdir())
    assert run_state.checkpoint_need(run_dir, model, "adamw_torch") == (size, run_state.MEASURED_SLACK_BYTES)
    assert run_state.checkpoint_need(tmp_path / "new", model, "adamw_torch") == (
        run_state.save_sizes(model, "adamw_torch")[1], run_state.SAVE_SLACK_BYTES)  # nothing written yet: estimated
    monkeypatch.setattr(run_state, "free_bytes", lambda path: 7 * 10**6)  # 7 MB free: room for one more
    run = run_state.RunState(load_config(ROOT / "configs/embedded.yaml", ["train.keep_checkpoints=1"]))
    run.run_dir = run_dir
    run_state.check_run_space(run, model, "adamw_torch")  # asked 0.07 GiB before it knew the size
    monkeypatch.setattr(run_state, "free_bytes", lambda path: 4 * 10**6)
    with pytest.raises(run_state.DiskSpaceError, match=r"1 checkpoint and the adapter: needs about 0.01 GiB, 0.00 GiB free"):
        run_state.check_run_space(run, model, "adamw_torch")


def test_a_full_disk_in_training_says_how_to_resume_once_there_is_room(tmp_path):
    import errno

    run = run_state.RunState(load_config(ROOT / "configs/embedded.yaml"))
    run.run_dir, run.phase, run.launch = fake_run(tmp_path, steps=(4, 8)), "train", "python -m lowvram_ft"
    resume = f"continue with: python -m lowvram_ft train --output {run.run_dir} --resume"
    checked = run_state.DiskSpaceError(f"{run.run_dir}: not enough free disk space for checkpoint checkpoint-12: ...")
    refused_write = OSError(errno.ENOSPC, "No space left on device", str(run.run_dir / "x.pt"))
    for error in (checked, refused_write):
        lines = str(run_state.disk_full(run, error)).splitlines()
        assert lines[1] == (f"checkpoint {run.run_dir / 'checkpoints' / 'checkpoint-8'} (step 8) is intact — once "
                            f"there is room, {resume}")
    assert str(run_state.disk_full(run, refused_write)).startswith(f"{run.run_dir / 'x.pt'}: the disk is full (No space")
    assert run_state.disk_full(run, ValueError("x")) is None
    run.run_dir = fake_run(tmp_path / "new", steps=())  # no checkpoint yet: nothing to resume
    assert run_state.disk_full(run, checked) is checked


def test_out_of_memory_message_names_the_phase_and_the_planner_advice():
    cfg = load_config(ROOT / "configs/gpt-oss-20b.yaml")
    run = run_state.RunState(cfg)
    run.phase = "load"
    error = run_state.out_of_memory(run, MemoryError())
    assert str(error).startswith("out of memory while loading the model (MemoryError)")
    assert "the planner predicts a peak of" in str(error)
    run.phase, run.run_dir = "eval", Path("runs/x")
    error = run_state.out_of_memory(run, MemoryError())
    assert str(error).startswith("out of memory during the evaluation (MemoryError)")
    assert "the trained adapter is saved in runs/x/adapter: evaluate it with `python -m lowvram_ft eval --run runs/x`" in str(error)
    assert not is_out_of_memory(RuntimeError("could not load"))
    wrapped = RuntimeError("could not load")
    wrapped.__cause__ = MemoryError()
    assert is_out_of_memory(wrapped)


def test_out_of_memory_without_any_change_proposed_does_not_speak_of_these_changes(tmp_path, monkeypatch):
    run = run_state.RunState(load_config(ROOT / "configs/embedded.yaml"))
    run.run_dir, run.phase, run.launch = fake_run(tmp_path, steps=(4,)), "train", "python -m lowvram_ft"
    monkeypatch.setattr(run_state.plan, "recommend", lambda inp, budget: [])  # the planner finds nothing to change
    lines = str(run_state.out_of_memory(run, MemoryError())).splitlines()
    assert "  the planner finds no change that lowers it: lower model.max_seq_length or use a larger GPU" in lines
    assert not any("these changes" in line for line in lines)
    assert lines[-1].startswith("once the settings fit, start a new run (--overwrite)")
