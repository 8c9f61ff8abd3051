"""Past one GPU: the shipped Accelerate configs, which process writes (pure), and one real two-process
run on the CPU (gloo) with the documented command, `accelerate launch --config_file
configs/accelerate/ddp.yaml -m lowvram_ft train ...`, checked against a one-process run of the same data.

Resuming a multi-process run is not run here: on the CPU, transformers 5.17 loads the optimizer state
with map_location=args.device, which accelerate names `cpu:0` for a multi-CPU run, and torch.load cannot
map storages to it ("don't know how to restore data location ... (tagged with cpu:0)"). What this file
checks is what a resume needs: a complete checkpoint holding every process's RNG state.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lowvram_ft.checkpoint import latest_checkpoint, rng_state_files
from lowvram_ft.distributed import Processes, processes, shared_run_dir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
SETTINGS = ["--config", "configs/embedded.yaml", "train.batch_size=2", "train.logging_steps=1", "eval.enabled=false"]


# --------------------------------------------------------------------------- the shipped configs


def test_the_three_accelerate_configs_ship_and_parse_as_accelerate_reads_them():
    from accelerate.commands.config.config_args import load_config_from_file

    assert [p.stem for p in CONFIGS] == ["ddp", "fsdp2", "zero3"]
    kinds = {p.stem: str(load_config_from_file(str(p)).distributed_type) for p in CONFIGS}
    assert kinds == {"ddp": "DistributedType.MULTI_GPU", "fsdp2": "DistributedType.FSDP",
                     "zero3": "DistributedType.DEEPSPEED"}
    assert yaml.safe_load((ROOT / "configs/accelerate/fsdp2.yaml").read_text())["fsdp_config"]["fsdp_version"] == 2
    assert yaml.safe_load((ROOT / "configs/accelerate/zero3.yaml").read_text())["deepspeed_config"]["zero_stage"] == 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_each_config_header_gives_the_command_and_the_batch_rule(path):
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert f"accelerate launch --config_file configs/accelerate/{path.name}" in header
    assert "-m lowvram_ft train" in header
    assert "effective batch = train.batch_size" in header and "x num_processes" in header


# --------------------------------------------------------------------------- who writes (pure)


def test_the_process_that_writes_is_global_rank_zero():
    assert processes({}) == Processes(rank=0, world_size=1, sharded=False)
    assert processes({}).main and not processes({}).several
    torchrun = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    assert processes(torchrun) == Processes(rank=1, world_size=2, sharded=False)
    assert not processes(torchrun).main and processes(torchrun).several
    # Second machine, first GPU: LOCAL_RANK is 0 but the global rank is not.
    assert not processes({"RANK": "4", "LOCAL_RANK": "0", "WORLD_SIZE": "8"}).main
    assert processes({"PMI_RANK": "0", "PMI_SIZE": "2"}) == Processes(rank=0, world_size=2, sharded=False)
    assert processes({"RANK": "0", "WORLD_SIZE": "4", "ACCELERATE_USE_FSDP": "true"}).sharded
    assert processes({"RANK": "0", "WORLD_SIZE": "4", "ACCELERATE_USE_DEEPSPEED": "true"}).sharded
    assert not processes({"ACCELERATE_USE_FSDP": "true"}).sharded  # one process holds everything


def test_one_process_prepares_the_run_folder_itself(tmp_path):
    calls = []
    assert shared_run_dir(processes({}), lambda: calls.append(1) or tmp_path) == tmp_path
    assert calls == [1]


def test_a_checkpoint_is_complete_with_one_rng_state_per_process(tmp_path):
    assert rng_state_files(tmp_path) == ("rng_state.pth",)
    (tmp_path / "lowvram_ft_state.json").write_text(json.dumps({"step": 2, "processes": 3}))
    assert rng_state_files(tmp_path) == ("rng_state_0.pth", "rng_state_1.pth", "rng_state_2.pth")


# --------------------------------------------------------------------------- two CPU processes


def launch(out: Path, *overrides: str, processes: int = 2) -> subprocess.CompletedProcess:
    if processes == 1:
        command = [sys.executable, "-m", "lowvram_ft"]
    else:
        command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                   "configs/accelerate/ddp.yaml", "--num_processes", str(processes), "-m", "lowvram_ft"]
    return subprocess.run([*command, "train", "--output", str(out), *SETTINGS, *overrides], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
