"""The suite, in the parent process: `run_bench(matrix)` reads a case matrix, probes the device in a
child, and runs every case in its own process (`python -m lowvram_ft.bench --case FILE --result FILE`,
worker.py) with a timeout, so an out-of-memory case, a crash or a hang is one `OOM` / `error` /
`timeout` line and never stops the suite. Budget searches (emulated cards) are sequences of such
cases. This process never imports torch nor initialises CUDA: its context would count in the figures."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Callable, Sequence

from ..device import stack_versions
from ..io import write_atomic
from .matrix import CASES_DIR, DEFAULT_MATRIX, BenchError, BudgetSearch, Case, Matrix, read_json, read_matrix
from .metrics import failure_record, longest_seq, peak_bf16_flops, predicted_peak_gib, summarize
from .models import ModelStore
from .processes import classify_exit, run_process
from .report import append_partial, log, one_line, paired, print_summary, result_stem, write_results

DEFAULT_OUT_DIR = "benchmarks/results"
LOG_ROOT = Path("runs") / "bench"  # per-case logs and case files (git-ignored)


def run_bench(matrix_path: str | Path | None = None, out_dir: str | Path = DEFAULT_OUT_DIR, console=None,
              only: Sequence[str] | None = None, budgets: str | Sequence[float] | None = None,
              log_root: str | Path = LOG_ROOT) -> Path:
    """Run a case matrix (default: gpu.yaml on a GPU, cpu.yaml otherwise), each case in its own process;
    write <date>-<device>.jsonl / .md / .png into out_dir and return the .jsonl path. `only` keeps the
    cases whose setting contains one of the texts; `budgets` narrows a budget search ("16,24");
    each case's log and inputs go to log_root/<stem>/."""
    from rich.console import Console

    console = console or Console(highlight=False)
    device = probe_device()
    matrix = choose_matrix(matrix_path, device, console)
    cases, search = select(matrix, only, budgets)
    env = environment(device)
    stem = result_stem(date.fromisoformat(env["date"]), device["name"], matrix.name)
    log_dir = Path(log_root) / stem
    log_dir.mkdir(parents=True, exist_ok=True)
    models = ModelStore(device, log_dir, console)

    def run(case: Case, position: str = "") -> dict:
        record = run_case(case, models, device, log_dir, console, position)
        append_partial(record, Path(out_dir), stem)
        return record

    try:
        records = [run(case, f"{i}/{len(cases)}") for i, case in enumerate(cases, 1)]
        if search is not None:
            records += search_budgets(search, run, console)
    finally:
        models.clean_up()
    path = write_results(records, env, Path(out_dir), stem)
    print_summary(records, device, console)
    chart = f", {path.with_suffix('.png')}" if paired(records) else ""
    log(console, f"results: {path}, {path.with_suffix('.md')}{chart}")
    return path


def choose_matrix(matrix_path: str | Path | None, device: dict, console) -> Matrix:
    """The matrix asked for, or the device's default; a GPU matrix on a machine without one is an error."""
    if matrix_path is None:
        matrix_path = DEFAULT_MATRIX[device["kind"]]
        if device["kind"] == "cpu":
            log(console, "no CUDA GPU found: running the CPU matrix (CPU figures). GPU figures need a GPU — "
                         "see benchmarks/README.md, 'On a GPU machine'.")
    matrix = read_matrix(matrix_path)
    if matrix.device == "cuda" and device["kind"] != "cuda":
        raise BenchError(f"{matrix_path}: this matrix measures GPU memory and needs a CUDA GPU — run without "
                         "--config for the CPU matrix")
    log(console, f"device: {device['name']}; matrix {matrix_path}")
    return matrix


def select(matrix: Matrix, only: Sequence[str] | None, budgets: str | Sequence[float] | None
           ) -> tuple[list[Case], BudgetSearch | None]:
    """The cases --cases keeps and the budget search --budgets narrows."""
    cases = [c for c in matrix.cases if not only or any(text in c.setting for text in only)]
    search = matrix.budgets
    if budgets is not None:
        if search is None:
            raise BenchError(f"--budgets: matrix {matrix.name} has no budget search — use --config "
                             f"{CASES_DIR / 'budgets.yaml'}")
        wanted = [float(b) for b in (budgets.split(",") if isinstance(budgets, str) else budgets)]
        missing = [b for b in wanted if b not in search.gib]
        if missing:
            raise BenchError(f"--budgets {missing}: not in the matrix's budgets {list(search.gib)}")
        search = dataclasses.replace(search, gib=tuple(sorted(wanted, reverse=True)))
    if only and search is not None:
        search = dataclasses.replace(search, models=tuple(m for m in search.models if any(t in m for t in only)))
    if not cases and (search is None or not search.models):
        raise BenchError(f"nothing to run: no case of {matrix.name} matches --cases {list(only or [])}")
    return cases, search


def run_case(case: Case, models: ModelStore, device: dict, log_dir: Path, console, position: str = "") -> dict:
    """Run one case in a fresh process with a timeout; always returns its result record."""
    try:
        case = dataclasses.replace(case, model_path=models.path_for(case))
    except BenchError as error:
        log(console, f"case {position} {case.name}: error: {error}")
        return failure_record(case, "error", str(error))
    log(console, f"case {position} {case.name} ...")
    case_file, result_file, log_file = (log_dir / f"{case.slug}.{s}" for s in ("case.json", "result.json", "log"))
    write_atomic(case_file, case.to_json())
    result_file.unlink(missing_ok=True)
    heartbeat = result_file.with_suffix(".heartbeat.json")
    heartbeat.unlink(missing_ok=True)
    command = [sys.executable, "-m", "lowvram_ft.bench", "--case", str(case_file), "--result", str(result_file)]
    returncode = run_process(command, log_file, case.timeout_s)
    raw = read_json(result_file)
    if raw is not None:
        record = summarize(raw, case, device)
    else:
        record = failure_record(case, *classify_exit(returncode, log_file, case.timeout_s), read_json(heartbeat))
    record["command"] = f"python -m lowvram_ft.bench --case {case_file}"
    record["log"] = str(log_file)
    record["predicted_peak_gib"] = predicted_peak_gib(case, device)
    log(console, f"case {position} {case.name}: {one_line(record, device)}")
    return record


def search_budgets(search: BudgetSearch, run: Callable[[Case], dict], console) -> list[dict]:
    """For each model, stack and emulated card (largest first): the longest seq_len at batch 1, then the
    grid settings up to that length; every setting that trained is a candidate for the fastest. A card
    smaller than one that could not train is skipped, and a smaller card's ladder stops at the larger
    card's longest sequence (less memory never trains longer sequences)."""
    records: list[dict] = []
    for model in search.models:
        for stack in search.stacks:
            ceiling: int | None = max(search.seq_ladder)
            for gib in search.gib:
                base = dataclasses.replace(search.base, model=model, stack=stack, budget_gib=gib)
                if ceiling is None:
                    log(console, f"{base.name}: skipped, a larger card could not train it")
                    continue
                ceiling = search_one_budget(base, search, ceiling, records, run)
    return records


def search_one_budget(base: Case, search: BudgetSearch, ceiling: int, records: list[dict],
                      run: Callable[[Case], dict]) -> int | None:
    """Longest batch-1 sequence up to `ceiling`, then the grid; appends every record; returns the longest."""
    measured: dict[tuple[int, int], dict] = {}

    def trains(seq: int, batch: int, why: str) -> bool:
        if (seq, batch) not in measured:
            measured[(seq, batch)] = run(dataclasses.replace(base, seq_len=seq, batch_size=batch, search=why))
            records.append(measured[(seq, batch)])
        return measured[(seq, batch)]["status"] == "ok"

    ladder = sorted({s for s in search.seq_ladder if s <= ceiling} | {ceiling})
    best = longest_seq(lambda seq: trains(seq, 1, "longest_seq"), ladder, search.bisect_steps, search.seq_multiple)
    if best is None:
        return None
    for batch in search.grid_batch:
        for seq in sorted(s for s in search.grid_seq if s <= best):
            if not trains(seq, batch, "fastest"):
                break  # a longer sequence at this batch size will not fit either
    return best


def environment(device: dict) -> dict:
    """Versions, device and the exact command; nothing that names the host."""
    env = {"date": date.today().isoformat(), "versions": stack_versions(), "device": device, "command": invoking_command(),
           "platform": f"{platform.system()} {platform.machine()}", "cpu_count": os.cpu_count(),
           "budgets": "emulated with torch.cuda.set_per_process_memory_fraction" if device["kind"] == "cuda" else None,
           "peak_tflops": (peak_bf16_flops(device["name"]) or 0) / 1e12 or None}
    return env


def invoking_command() -> str:
    """The command line that started this run, without paths that name the machine or the user."""
    argv = list(sys.argv)
    scripts = {os.path.join("lowvram_ft", "__main__.py"): "lowvram_ft",
               os.path.join("lowvram_ft", "bench", "__main__.py"): "lowvram_ft.bench"}
    for script, module in scripts.items():
        if argv and argv[0].endswith(script):
            return shlex.join(["python", "-m", module, *argv[1:]])
    if argv and argv[0] in ("-c", ""):
        return "python -c ... (called from Python)"
    return shlex.join([Path(argv[0]).name, *argv[1:]]) if argv else ""


def probe_device() -> dict:
    """The device the cases will see, probed in a child process so that this one never initialises
    CUDA (its context would count in the NVML figures) nor imports transformers."""
    out = subprocess.run([sys.executable, "-m", "lowvram_ft.bench", "--probe"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"})
    line = (out.stdout.strip().splitlines() or [""])[-1]
    try:
        return json.loads(line)
    except ValueError:
        raise BenchError(f"could not probe the device (exit {out.returncode}): {out.stderr.strip()[-300:]}") from None
