"""Faults injected into a real training run, for the tests of what survives a kill (tests/e2e/test_resume.py,
tests/e2e/test_distributed.py): set LOWVRAM_FT_FAULT to a comma-separated list of

- `kill@step=N`: SIGKILL at the end of step N, before its checkpoint is written;
- `kill@checkpoint=N`: SIGKILL while checkpoint N is being written (the Trainer has written it, its
  optimizer file is removed as if the kill came first, our completion mark is not written yet);
- `oom@step=N`: a CUDA out-of-memory error as step N begins.

`fault_callbacks()` is empty unless the variable is set; the training story adds what it returns ahead
of its own callbacks, through the Trainer's public callback API, so the product path holds no test code.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

from ..errors import UserError

FAULT_ENV = "LOWVRAM_FT_FAULT"


class FaultSpecError(UserError, ValueError):
    """LOWVRAM_FT_FAULT holds something that is not a fault this module injects."""


def planned_faults(env=None) -> set[tuple[str, str, int]]:
    """{(action, where, step)} from LOWVRAM_FT_FAULT, e.g. "kill@step=3" -> ("kill", "step", 3)."""
    spec = (env if env is not None else os.environ).get(FAULT_ENV, "")
    faults = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        action, _, point = item.partition("@")
        where, _, step = point.partition("=")
        if action not in ("kill", "oom") or where not in ("step", "checkpoint") or not step.isdigit():
            raise FaultSpecError(f"{FAULT_ENV}={spec!r}: {item!r} is not kill@step=N, kill@checkpoint=N or "
                                 f"oom@step=N — fix or unset {FAULT_ENV} (a testing hook)")
        faults.add((action, where, int(step)))
    return faults


def fault_callbacks(env=None) -> list:
    """[a TrainerCallback that injects the planned faults], or [] when none is planned; FaultSpecError (a
    UserError: one line, exit 2) when the variable holds anything else."""
    faults = planned_faults(env)
    if not faults:
        return []
    from transformers import TrainerCallback

    class FaultCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if ("oom", "step", state.global_step + 1) in faults:
                import torch

                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB "
                                                  f"(simulated by {FAULT_ENV})")

        def on_step_end(self, args, state, control, **kwargs):
            if ("kill", "step", state.global_step) in faults:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_save(self, args, state, control, **kwargs):
            if args.should_save and ("kill", "checkpoint", state.global_step) in faults:  # the main process
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                (folder / "optimizer.pt").unlink(missing_ok=True)
                os.kill(os.getpid(), signal.SIGKILL)

    return [FaultCallback()]
