"""Several processes (accelerate launch / torchrun): which one writes, and what they share.

Under `accelerate launch -m lowvram_ft train ...` every process runs the whole training story; the
Trainer shards the data and averages the gradients. Only the main process (global rank 0) writes the
run folder — config, metrics, summary, adapter, evaluation — and the others learn its path from it.
Rank and world size come from the launcher's environment, so the decision is made before anything
heavy is imported and is a pure function of that environment.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..model import import_unsloth

# Where launchers put the global rank and the number of processes (torchrun / accelerate, then MPI
# launchers as accelerate reads them for multi-CPU runs).
RANK_KEYS = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")
WORLD_KEYS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE")
# accelerate's DistributedType names under which no process holds the whole model.
SHARDING_TYPES = ("FSDP", "DEEPSPEED")
PLAIN_LAUNCH = "python -m lowvram_ft"
LAUNCHERS = ("accelerate", "torchrun")  # the launchers' programs, as their console scripts are named


@dataclass(frozen=True)
class Processes:
    rank: int  # global rank of this process
    world_size: int  # number of processes
    sharded: bool  # FSDP or DeepSpeed: every process holds only a shard of the weights

    @property
    def main(self) -> bool:
        """This process writes the outputs."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1


def processes(env: Mapping[str, str] | None = None) -> Processes:
    """This process's place among the launched ones; a plain `python -m lowvram_ft` is rank 0 of 1."""
    env = os.environ if env is None else env
    rank = first_int(env, RANK_KEYS, 0)
    world = first_int(env, WORLD_KEYS, 1)
    sharded = any(env.get(k, "").lower() in ("1", "true") for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    return Processes(rank=rank, world_size=max(world, 1), sharded=sharded and world > 1)


def as_prepared(procs: Processes, distributed_type: str) -> Processes:
    """`procs` as the Trainer's accelerator really runs them (`distributed_type`, the name of accelerate's
    DistributedType): sharded only under FSDP or DeepSpeed. On CPU processes accelerate 1.15 runs an FSDP
    launch as plain data parallel (MULTI_CPU; its state only shards on GPU-like devices): every process
    then holds the whole model, saves and evaluates as under DDP."""
    return replace(procs, sharded=procs.several and distributed_type in SHARDING_TYPES)


def first_int(env: Mapping[str, str], keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        value = env.get(key, "").strip()
        if value.lstrip("-").isdigit():
            return int(value)
    return default


def launch_command(parent_argv: Sequence[str] | None, world_size: int) -> str:
    """The command that starts lowvram_ft as this process was started, up to `-m lowvram_ft`: the
    launcher with its own options (config file, process count) when one started it (`parent_argv`, the
    parent process's command line), else `python -m lowvram_ft`. What a resume hint puts before
    `train --output RUN --resume`."""
    argv = [str(a) for a in parent_argv or () if a != ""]
    if argv and "lowvram_ft" in argv:
        argv = argv[:argv.index("lowvram_ft") + 1]
        program = 1 if len(argv) > 1 and Path(argv[0]).name.startswith("python") else 0
        name = Path(argv[program]).name
        if name in LAUNCHERS:  # `.../python .../bin/accelerate launch ...` as its user typed it
            return shlex.join([name, *argv[program + 1:]])
        if program and argv[1:3] == ["-m", "torch.distributed.run"]:
            return shlex.join(["python", *argv[1:]])
    if world_size <= 1:
        return PLAIN_LAUNCH
    # Started some other way (a wrapper script, an MPI launcher): the documented command, this many processes.
    return f"accelerate launch --num_processes {world_size} -m lowvram_ft"


def this_launch(procs: Processes) -> str:
    """launch_command for this process (its parent's command line from /proc, where there is one)."""
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        parent = None
    return launch_command(parent, procs.world_size)


def shared_run_dir(procs: Processes, prepare: Callable[[], Path]) -> Path:
    """The main process prepares the run folder (`prepare()`), then every process gets its path. An
    error in the main process is raised in all of them, so none waits forever."""
    if not procs.several:
        return prepare()

    import_unsloth()  # before accelerate: Unsloth patches the Hugging Face stack when it is imported first
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    if not torch.cuda.is_available():
        # Accelerate names a CPU process's device `cpu:<local rank>` (cpu:0), and the Trainer resuming
        # a run of several processes loads the optimizer state with map_location=args.device, which
        # torch.load cannot map to ("don't know how to restore data location ... (tagged with cpu:0)").
        # The device accelerate reads from ACCELERATE_TORCH_DEVICE is used as given: plain `cpu`.
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    # Joins the process group the launcher set up: NCCL on GPUs; without CUDA, accelerate only builds
    # the gloo group when told it runs on the CPU (as the Trainer tells it later).
    PartialState(cpu=not torch.cuda.is_available())
    box: list = [None]
    if procs.main:
        try:
            box = [str(prepare())]
        except Exception as error:  # noqa: BLE001 — re-raised below, after the others hear of it
            box = [error]
    broadcast_object_list(box, from_process=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return Path(box[0])


def max_over_processes(procs: Processes, value: float) -> float:
    """The largest `value` of all processes (peak memory: the device that came closest to full)."""
    if not procs.several:
        return value
    from accelerate.utils import gather_object

    return max(gather_object([value]))


def wait_for_everyone(procs: Processes) -> None:
    if procs.several:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def wait_for_every_process() -> None:
    """A barrier when several processes train (accelerate launch / torchrun), else nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
