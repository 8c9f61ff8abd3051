"""Past one GPU: real two-process runs on the CPU (gloo) with the documented command, `accelerate launch
--config_file configs/accelerate/ddp.yaml -m lowvram_ft train ...`, checked against a one-process run of the
same data: DDP, the FSDP2 config (which accelerate 1.15 runs as DDP on CPU processes), and a run killed after
its first checkpoint and resumed with `--resume`. The configs and which process writes: unit/test_distributed.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from helpers import read_jsonl
from lowvram_ft.testing.faults import FAULT_ENV
from lowvram_ft.train.checkpoints import latest_checkpoint

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
SETTINGS = ["--config", "configs/embedded.yaml", "train.batch_size=2", "train.logging_steps=1", "eval.enabled=false"]


ACCELERATE = ("accelerate", "launch", "--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "2", "-m",
              "lowvram_ft")  # as launch() runs it, with the launcher by its name


def launch(out: Path, *overrides: str, processes: int = 2, accelerate_config: str = "ddp",
           fault: str | None = None) -> subprocess.CompletedProcess:
    if processes == 1:
        command = [sys.executable, "-m", "lowvram_ft"]
    else:
        command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                   f"configs/accelerate/{accelerate_config}.yaml", "--num_processes", str(processes), "-m", "lowvram_ft"]
    env = {**ENV, FAULT_ENV: fault} if fault else ENV
    return subprocess.run([*command, "train", "--output", str(out), *SETTINGS, *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate's launcher is not installed next to this Python")
    root = tmp_path_factory.mktemp("distributed")
    one = launch(root / "one", "train.max_steps=2", processes=1)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    two = launch(root / "two", "train.max_steps=3", "train.save_steps=2")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    return {"one": root / "one", "two": root / "two", "log": two.stdout + two.stderr}


@pytest.fixture(scope="module")
def fsdp2(runs, tmp_path_factory):
    """The FSDP2 config's command with the settings of the DDP run."""
    run = tmp_path_factory.mktemp("fsdp2") / "run"
    proc = launch(run, "train.max_steps=3", "train.save_steps=2", accelerate_config="fsdp2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run, proc.stdout + proc.stderr


def test_both_processes_train_and_only_the_first_writes_and_prints(runs):
    log, run = runs["log"], runs["two"]
    assert log.count("Unsloth (CPU): GptOssForCausalLM") == 2  # the model was loaded in two processes
    assert log.count("[lowvram_ft] config: resolved config saved") == 1  # one console speaks
    assert log.count("[lowvram_ft] save: adapter and tokenizer") == 1
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]  # one writer: no line twice
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in run.glob(".*")] == [".lowvram_ft"], "only the run folder's mark, no temporary file"


def test_metrics_are_aggregated_over_both_processes(runs):
    one, two = read_jsonl(runs["one"] / "metrics.jsonl"), read_jsonl(runs["two"] / "metrics.jsonl")
    # Accelerate hands process k the k-th of each pair of batches a single process would draw, so step 1
    # of the pair covers steps 1 and 2 of the single run. The warm-up's first learning rate is 0: the
    # single run's step 2 is computed on the same weights as its step 1.
    assert one[0]["learning_rate"] == 0.0
    assert two[0]["tokens"] == one[1]["tokens"]  # TRL's num_tokens is summed over the processes
    low, high = sorted([one[0]["loss"], one[1]["loss"]])
    assert low + 1e-4 < two[0]["loss"] < high - 1e-4  # the mean over both processes' tokens, not process 0's


def test_checkpoints_of_two_processes_are_complete_and_hold_both_rng_states(runs):
    run = runs["two"]
    for step in (2, 3):  # save_steps=2, and the last step is always checkpointed
        folder = run / "checkpoints" / f"checkpoint-{step}"
        assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "adapter_model.safetensors"} <= {
            p.name for p in folder.iterdir()}
        assert json.loads((folder / "lowvram_ft_state.json").read_text())["processes"] == 2
    assert latest_checkpoint(run).step == 3


def test_the_fsdp2_config_trains_on_two_cpu_processes_as_ddp_and_writes_one_adapter(runs, fsdp2):
    run, log = fsdp2
    assert log.count("[lowvram_ft] processes: sharding asked for, but accelerate runs the 2 processes as MULTI_CPU") == 1
    assert log.count("[lowvram_ft] save: adapter and tokenizer") == 1
    assert not (run / ".adapter.sharded").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3 and "reload_probe" in summary
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    one, got = adapter(runs["one"]), adapter(run)
    assert len(one) > 10 and {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in one.items()}
    # Under the hood the same run as DDP with the same settings: the same losses and weights.
    import torch

    want = adapter(runs["two"])
    assert all(torch.allclose(want[name], got[name], rtol=0, atol=1e-7) for name in want)
    losses = [r["loss"] for r in read_jsonl(runs["two"] / "metrics.jsonl")]
    assert [r["loss"] for r in read_jsonl(run / "metrics.jsonl")] == pytest.approx(losses, rel=1e-6, abs=0)


def test_a_two_process_run_killed_after_its_checkpoint_resumes_to_the_uninterrupted_result(runs, tmp_path):
    run = tmp_path / "run"
    killed = launch(run, "train.max_steps=3", "train.save_steps=2", fault="kill@step=3")  # both processes, before checkpoint 3
    assert killed.returncode != 0 and latest_checkpoint(run).step == 2
    refused = launch(run, "train.max_steps=3", "train.save_steps=2", "--resume", processes=1)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert (f"error: {run}: the run was started with 2 processes, this resume has 1 process — resume it with 2, as it "
            f"was started: {' '.join(ACCELERATE)} train --output {run} --resume") in refused.stderr
    resumed = launch(run, "train.max_steps=3", "train.save_steps=2", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "[lowvram_ft] resume: continuing from" in resumed.stdout and "checkpoint-2 (step 2)" in resumed.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    assert [p.name for p in run.iterdir() if "adapter" in p.name] == ["adapter"]  # no staging folder left
    want, got = read_jsonl(runs["two"] / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3]
    # RNG states, data position and optimizer state restored: the losses and weights of the uninterrupted run
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6, abs=0)
    import torch

    uninterrupted, resumed_adapter = adapter(runs["two"]), adapter(run)
    assert uninterrupted.keys() == resumed_adapter.keys()
    assert all(torch.allclose(uninterrupted[name], resumed_adapter[name], rtol=0, atol=1e-7) for name in uninterrupted)


def test_sigterm_under_accelerate_launch_says_the_launch_command_that_resumes_it(runs, tmp_path):
    """The hint after a stop is the launcher's command with its config file and process count; run as
    printed, it continues the run from its checkpoint with both processes."""
    import signal
    import shlex
    import time

    run = tmp_path / "run"
    command = [str(Path(sys.executable).with_name("accelerate")), *ACCELERATE[1:], "train", "--output", str(run),
               *SETTINGS, "train.max_steps=6"]
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() or not read_jsonl(run / "metrics.jsonl"):
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach its first step"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which passes it on to both processes
    _, err = proc.communicate(timeout=300)
    hint = next((line.split("resume with: ", 1)[1] for line in err.splitlines() if "resume with: " in line), None)
    assert hint == f"{' '.join(ACCELERATE)} train --output {run} --resume", err[-3000:]
    stopped_at = latest_checkpoint(run).step
    assert 1 <= stopped_at < 6
    argv = shlex.split(hint)
    resumed = subprocess.run([str(Path(sys.executable).with_name(argv[0])), *argv[1:]], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint-{stopped_at} (step {stopped_at})" in resumed.stdout
    assert json.loads((run / "summary.json").read_text())["processes"] == 2
