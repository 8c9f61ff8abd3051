"""The bench's child processes: each runs in its own session with a timeout and its output in a log
file, so that an out-of-memory case, a crash or a hang ends as one status and never stops the suite."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def run_process(command: list[str], log_file: Path, timeout_s: float) -> int | None:
    """Run a case process in its own session (so a timeout ends it and every child it started); its
    output goes to log_file. Returns the exit code, or None after a timeout."""
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding lowvram_ft/
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    # Budgets are the cases' budget_gib, applied to both stacks alike; device.detect_device's own card
    # emulation would cap the lowvram_ft stack alone.
    env.pop("LOWVRAM_FT_VRAM_GIB", None)
    with log_file.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            end_process_group(proc)
            return None
        except BaseException:  # Ctrl-C does not reach a process in its own session: end it here
            end_process_group(proc)
            raise


def end_process_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def classify_exit(returncode: int | None, log_file: Path, timeout_s: float) -> tuple[str, str]:
    """(status, reason) of a case process that wrote no result."""
    tail = log_tail(log_file)
    if returncode is None:
        return "timeout", f"no result after {timeout_s:g} s (killed)"
    memory = "out of memory" in tail.lower() or "OutOfMemoryError" in tail
    if returncode == -signal.SIGKILL:
        return "OOM", f"case process killed (SIGKILL: the system's out-of-memory killer); {tail}"
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        return ("OOM" if memory else "error"), f"case process died ({name}); {tail}"
    return ("OOM", tail) if memory else ("error", f"exit code {returncode}: {tail}")


def log_tail(log_file: Path, lines: int = 3) -> str:
    try:
        text = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "no output"
    return " | ".join(line.strip()[:300] for line in text[-lines:]) or "no output"
