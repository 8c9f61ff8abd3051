"""Past one GPU without a run: the shipped Accelerate configs and which process writes (pure). Real
two-process runs on the CPU with the documented command: e2e/test_distributed.py."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import ROOT
from lowvram_ft.train.checkpoints import rng_state_files
from lowvram_ft.train.distributed import Processes, as_prepared, launch_command, processes, shared_run_dir

CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


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


def test_processes_are_sharded_only_when_the_accelerator_shards():
    fsdp_launch = processes({"RANK": "0", "WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"})
    assert as_prepared(fsdp_launch, "FSDP").sharded and as_prepared(fsdp_launch, "DEEPSPEED").sharded
    assert as_prepared(fsdp_launch, "MULTI_CPU") == Processes(rank=0, world_size=2, sharded=False)
    assert not as_prepared(processes({}), "FSDP").sharded  # one process holds everything


def test_one_process_prepares_the_run_folder_itself(tmp_path):
    calls = []
    assert shared_run_dir(processes({}), lambda: calls.append(1) or tmp_path) == tmp_path
    assert calls == [1]


def test_a_checkpoint_is_complete_with_one_rng_state_per_process(tmp_path):
    assert rng_state_files(tmp_path) == ("rng_state.pth",)
    (tmp_path / "lowvram_ft_state.json").write_text(json.dumps({"step": 2, "processes": 3}))
    assert rng_state_files(tmp_path) == ("rng_state_0.pth", "rng_state_1.pth", "rng_state_2.pth")


# --------------------------------------------------------------------------- the command a resume hint gives

PY = "/work/main/.venv/bin/python3.11"


@pytest.mark.parametrize("parent, world, want", [
    ([PY, "/venv/bin/accelerate", "launch", "--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "2",
      "-m", "lowvram_ft", "train", "--output", "runs/x", "--overwrite", ""], 2,
     "accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 -m lowvram_ft"),
    ([PY, "/venv/bin/torchrun", "--nproc_per_node", "4", "-m", "lowvram_ft", "train"], 4,
     "torchrun --nproc_per_node 4 -m lowvram_ft"),
    (["/usr/local/bin/accelerate", "launch", "--config_file", "my config.yaml", "-m", "lowvram_ft", "train"], 2,
     "accelerate launch --config_file 'my config.yaml' -m lowvram_ft"),
    ([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lowvram_ft", "train"], 2,
     "python -m torch.distributed.run --nproc_per_node 2 -m lowvram_ft"),
    (["-bash"], 1, "python -m lowvram_ft"),  # typed in a shell
    ([PY, "-m", "pytest", "tests"], 1, "python -m lowvram_ft"),
    ([PY, "-m", "lowvram_ft", "bench"], 1, "python -m lowvram_ft"),  # the bench's worker processes
    (None, 1, "python -m lowvram_ft"),  # no /proc
    (["mpirun", "-n", "2", "python", "wrapper.py"], 2, "accelerate launch --num_processes 2 -m lowvram_ft"),
])
def test_the_launch_command_is_the_launcher_with_its_options(parent, world, want):
    assert launch_command(parent, world) == want
