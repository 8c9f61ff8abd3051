"""`make bench`: measured memory and throughput of our trainer against the plain Hugging Face stack.

The story: `run_bench(matrix)` reads a case matrix (benchmarks/cases/*.yaml), probes the device, and
runs every case in its own process (`python -m lowvram_ft.bench --case FILE --result FILE`) with a
timeout, so an out-of-memory case, a crash or a hang is one `OOM` / `error` / `timeout` line and never
stops the suite. Budget searches (emulated 14-65 GiB cards) are sequences of such cases. The results
go to benchmarks/results/<date>-<device>.jsonl (one line per case, with the environment), a Markdown
table and a PNG chart. benchmarks/README.md is the protocol; this docstring is the short version.

Two stacks, same model, data, sequence length, batch, LoRA targets, optimizer, learning rate and steps:
- `lowvram_ft`: lowvram_ft.model / lowvram_ft.train (Unsloth imported first, our defaults: 4-bit on
  GPU, Unsloth's offloaded gradient checkpointing).
- `hf`: transformers + peft + TRL's SFTTrainer with no Unsloth in the process (checked), set up like
  the Hugging Face / OpenAI gpt-oss recipe: bf16 weights (MXFP4 dequantized), eager attention, LoRA on
  attention and on the experts through PEFT target_parameters; other models 4-bit NF4, double
  quantization, bf16 compute. On CPU both stacks load 16/32-bit weights.

Measured per case, between device syncs with warm-up steps excluded: step times, tokens/s (trained,
non-padding tokens: every row is exactly seq_len tokens), peak allocated / reserved (torch, reset after
loading), peak device memory seen by NVML (sampled every 10 ms), model-load memory, MFU, the losses of
the first steps and the trainable parameter count. On CPU: peak RSS instead of device memory.

MFU = tokens/s x training FLOPs per token / the GPU's peak dense bf16 FLOP/s, with
training FLOPs per token = 6 x active parameters + 12 x sum over layers of heads x head_dim x T_eff
(PaLM's convention: every weight counted as trained, no causal halving of attention; T_eff is the
sequence length, or the sliding window on sliding-window layers; active parameters exclude the input
embedding and the experts a token is not routed to). LoRA skips the weight gradients of frozen weights
and checkpointing recomputes the forward: MFU is model FLOPs, not hardware FLOPs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

STACKS = ("lowvram_ft", "hf")
CASES_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "cases"
DEFAULT_MATRIX = {"cpu": CASES_DIR / "cpu.yaml", "cuda": CASES_DIR / "gpu.yaml"}
DEFAULT_OUT_DIR = "benchmarks/results"
LOG_ROOT = Path("runs") / "bench"  # per-case logs and case files (git-ignored)
GIB = 2**30
MONITOR_INTERVAL_S = 0.01
HEARTBEAT_INTERVAL_S = 0.5
STATUSES = ("ok", "OOM", "timeout", "error")
SAMPLE_FILE = Path(__file__).parent / "assets" / "sample_train.jsonl"

# Peak dense bf16 tensor FLOP/s (FP32 accumulate, no sparsity) from NVIDIA's data sheets, matched in
# order against the torch device name: more specific names first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.4),
    ("H100", 989.4),   # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.05),
    ("L40", 181.05),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
)

# Random-weight models built locally (speed and memory do not depend on the weight values). The shape
# comes from the bundled config.json; `changes` are applied on top.
RANDOM_MODELS = {
    "gpt-oss-20b-random": {
        "config": "gpt-oss-20b.json",
        "changes": {},
        "about": "gpt-oss-20b shape (24 layers, 32 experts top-4, hidden 2880), random bf16 weights",
    },
    "dense-8b-random": {
        "config": "Qwen3-8B.json",
        # The offline tokenizer is o200k_harmony, so the vocabulary is gpt-oss's (201,088 rows instead
        # of Qwen3's 151,936: +0.4B parameters in embedding and head).
        "changes": {"vocab_size": 201088, "bos_token_id": 199998, "eos_token_id": 200002, "pad_token_id": 199999},
        "about": "Qwen3-8B layers (36 x 4096, GQA 32/8, MLP 12288) with the o200k_harmony vocabulary, random bf16 weights",
    },
}


class BenchError(ValueError):
    """A case matrix or a request that cannot be run; the message says what to do."""


# --------------------------------------------------------------------------- cases and matrices


@dataclass(frozen=True)
class Case:
    """One training measurement: a stack, a model and its settings. Plain values (JSON round-trip)."""

    stack: str
    model: str = "embedded"           # 'embedded', a RANDOM_MODELS key, or a local model folder
    seq_len: int = 256                # tokens per row; every row is exactly this long
    batch_size: int = 1
    grad_accum: int = 1
    steps: int = 8                    # optimizer steps
    warmup_steps: int = 2             # steps excluded from timing (compilation, allocator warm-up)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    optimizer: str = "adamw_torch"
    learning_rate: float = 2e-4
    dtype: str = "bfloat16"           # compute dtype of both stacks (float32 on CPUs without bf16)
    seed: int = 3407
    budget_gib: float | None = None   # emulated card: cap this process's CUDA memory
    timeout_s: int = 900
    search: str = ""                  # "" | "longest_seq" | "fastest": why the case ran
    model_path: str = ""              # resolved by the runner

    @property
    def setting(self) -> str:
        """Everything but the stack: the two stacks of one setting are compared."""
        name = self.model if self.model in RANDOM_MODELS or self.model == "embedded" else Path(self.model).name
        text = f"{name} s{self.seq_len} b{self.batch_size}"
        if self.grad_accum > 1:
            text += f"x{self.grad_accum}"
        if self.budget_gib is not None:
            text += f" @{self.budget_gib:g}GiB"
        return text

    @property
    def name(self) -> str:
        return f"{self.setting} {self.stack}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.name} {self.search}").strip("-")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_dict(data: dict) -> "Case":
        data = dict(data)
        if "lora_targets" in data:
            data["lora_targets"] = tuple(data["lora_targets"])
        return Case(**data)


CASE_KEYS = {f.name for f in dataclasses.fields(Case)} - {"stack", "model_path", "search"}
LISTABLE = ("model", "seq_len", "batch_size", "grad_accum", "budget_gib")
BUDGET_KEYS = {"gib", "models", "stacks", "seq_ladder", "bisect_steps", "seq_multiple", "grid"}


@dataclass(frozen=True)
class BudgetSearch:
    """For each emulated card and stack: the longest seq_len at batch 1, then the fastest grid setting."""

    gib: tuple[float, ...]
    models: tuple[str, ...]
    stacks: tuple[str, ...] = STACKS
    seq_ladder: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
    bisect_steps: int = 2
    seq_multiple: int = 256
    grid_batch: tuple[int, ...] = (1, 2, 4, 8)
    grid_seq: tuple[int, ...] = (1024, 2048, 4096)
    base: Case = field(default_factory=lambda: Case(stack="lowvram_ft"))


@dataclass(frozen=True)
class Matrix:
    name: str
    device: str                       # "cpu" or "cuda": where the matrix's figures are meant to come from
    cases: tuple[Case, ...]
    budgets: BudgetSearch | None


def read_matrix(path: str | Path) -> Matrix:
    """A case matrix from YAML: `device`, `defaults` (Case fields), `cases` (each value may be a list:
    the cartesian product is taken; `stacks` defaults to both), optional `budgets`. Every problem is
    reported at once."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"{path}: no such case matrix — pass a file from benchmarks/cases/ with --config")
    data = read_matrix_yaml(p)
    problems: list[str] = []
    unknown = set(data) - {"device", "defaults", "cases", "budgets"}
    if unknown:
        problems.append(f"{p}: unknown top-level key(s) {sorted(unknown)} — accepted: device, defaults, cases, budgets")
    device = data.get("device", "cpu")
    if device not in ("cpu", "cuda"):
        problems.append(f"{p}: device: got {device!r}; expected cpu or cuda")
    defaults = data.get("defaults") or {}
    if not check_keys(defaults, CASE_KEYS, f"{p}: defaults", problems):
        defaults = {}
    entries = data.get("cases") or []
    if not isinstance(entries, list):
        problems.append(f"{p}: cases: must be a list of mappings (one per case)")
        entries = []
    cases = []
    for i, entry in enumerate(entries, start=1):
        where = f"{p}: cases[{i}]"
        if check_keys(entry, CASE_KEYS | {"stacks"}, where, problems):
            cases += expand_entry({**defaults, **entry}, where, problems)
    budgets = read_budgets(data.get("budgets"), defaults, f"{p}: budgets", problems) if data.get("budgets") else None
    if not cases and budgets is None:
        problems.append(f"{p}: no cases and no budgets — nothing to run")
    if problems:
        raise BenchError("\n".join(problems))
    return Matrix(p.stem, device, tuple(cases), budgets)


def read_matrix_yaml(p: Path) -> dict:
    """The mapping at the top of a matrix file (empty for an empty file); BenchError otherwise."""
    import yaml

    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise BenchError(f"{p}{where}: invalid YAML ({str(getattr(error, 'problem', None) or error).splitlines()[0]})"
                         " — fix the file, or start from one in benchmarks/cases/") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        shown = "a list" if isinstance(data, list) else repr(data)
        raise BenchError(f"{p}: the top level is {shown}; it must be a mapping with the keys device, defaults, "
                         "cases, budgets — see benchmarks/cases/cpu.yaml")
    return data


def check_keys(entry: Any, accepted: set[str], where: str, problems: list[str]) -> bool:
    """Adds a problem for each unknown key of `entry`, or one when it is not a mapping (then False)."""
    if not isinstance(entry, dict):
        problems.append(f"{where}: must be a mapping")
        return False
    for key in sorted(set(entry) - accepted):
        problems.append(f"{where}: unknown key {key!r} — accepted: {', '.join(sorted(accepted))}")
    return True


def expand_entry(entry: dict, where: str, problems: list[str]) -> list[Case]:
    """One matrix entry -> its cases: lists in LISTABLE fields multiply, stacks last (pairs stay adjacent)."""
    import itertools

    stacks = as_list(entry.pop("stacks", list(STACKS)))
    bad = [s for s in stacks if s not in STACKS]
    if bad:
        problems.append(f"{where}: unknown stack(s) {bad} — accepted: {', '.join(STACKS)}")
        return []
    axes = {k: as_list(entry[k]) for k in LISTABLE if k in entry}
    cases = []
    for values in itertools.product(*axes.values()):
        fields = {**entry, **dict(zip(axes, values))}
        for stack in stacks:
            case = Case.from_dict({**fields, "stack": stack})
            found = case_problems(case)
            if found:
                problems += [f"{where}: {text}" for text in found]
                return cases
            cases.append(case)
    return cases


def case_problems(case: Case) -> list[str]:
    """What is wrong with a case's values (the case process would fail on them)."""
    problems = []
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "lora_r", "lora_alpha", "timeout_s"):
        value = getattr(case, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name}: got {value!r}; expected a positive integer")
    steps = case.steps if isinstance(case.steps, int) else 0
    if not isinstance(case.warmup_steps, int) or not 0 <= case.warmup_steps < steps:
        problems.append(f"warmup_steps: got {case.warmup_steps!r}; expected 0 to steps - 1 (some steps must be timed)")
    if case.dtype not in ("bfloat16", "float16", "float32"):
        problems.append(f"dtype: got {case.dtype!r}; expected bfloat16, float16 or float32")
    if case.budget_gib is not None and (not isinstance(case.budget_gib, (int, float)) or case.budget_gib <= 0):
        problems.append(f"budget_gib: got {case.budget_gib!r}; expected a positive number of GiB")
    return problems


def read_budgets(spec: dict, defaults: dict, where: str, problems: list[str]) -> BudgetSearch | None:
    check_keys(spec, BUDGET_KEYS | CASE_KEYS, where, problems)
    if not isinstance(spec, dict) or "gib" not in spec or "models" not in spec:
        problems.append(f"{where}: needs gib (a list of card sizes) and models")
        return None
    grid = spec.get("grid") or {}
    overrides = {k: v for k, v in spec.items() if k in CASE_KEYS}
    bad = [s for s in as_list(spec.get("stacks", [])) if s not in STACKS]
    if bad:
        problems.append(f"{where}: unknown stack(s) {bad} — accepted: {', '.join(STACKS)}")
    try:
        search = budget_search(spec, grid, {**defaults, **overrides})
    except (TypeError, ValueError) as error:
        problems.append(f"{where}: {error} — budgets take numbers (gib, seq_ladder, grid) and model names")
        return None
    problems += [f"{where}: {text}" for text in case_problems(search.base)]
    return search


def budget_search(spec: dict, grid: dict, case_fields: dict) -> BudgetSearch:
    return BudgetSearch(
        gib=tuple(sorted((float(g) for g in as_list(spec["gib"])), reverse=True)),
        models=tuple(as_list(spec["models"])),
        stacks=tuple(as_list(spec.get("stacks", list(STACKS)))),
        seq_ladder=tuple(int(s) for s in as_list(spec.get("seq_ladder", list(BudgetSearch.seq_ladder)))),
        bisect_steps=int(spec.get("bisect_steps", 2)),
        seq_multiple=int(spec.get("seq_multiple", 256)),
        grid_batch=tuple(int(b) for b in as_list(grid.get("batch_size", list(BudgetSearch.grid_batch)))),
        grid_seq=tuple(int(s) for s in as_list(grid.get("seq_len", list(BudgetSearch.grid_seq)))),
        base=Case.from_dict({**case_fields, "stack": "lowvram_ft"}),
    )


def as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# --------------------------------------------------------------------------- pure measurement maths


def tokens_per_second(step_times: Sequence[float], tokens_per_step: int, warmup_steps: int) -> float | None:
    """Trained tokens per step / the median time of the steps after warm-up. The median, not the mean:
    with a handful of timed steps one stray pause (garbage collection, another process) would
    otherwise move the figure by tens of percent."""
    median = median_step_s(step_times, warmup_steps)
    return tokens_per_step / median if median else None


def median_step_s(step_times: Sequence[float], warmup_steps: int) -> float | None:
    timed = list(step_times)[warmup_steps:]
    return statistics.median(timed) if timed else None


def attention_layers(config: dict) -> list[tuple[int, int, int | None]]:
    """(query heads, head_dim, sliding window or None) per decoder layer, from config.json."""
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    types = config.get("layer_types") or ["full_attention"] * layers
    window = config.get("sliding_window")
    return [(heads, head_dim, window if t == "sliding_attention" and window else None) for t in types[:layers]]


def training_flops_per_token(active_params: int, seq_len: int, layers: Iterable[tuple[int, int, int | None]]) -> int:
    """6 x active parameters + 12 x sum(heads x head_dim x T_eff) — see the module docstring."""
    attention = sum(12 * heads * head_dim * (min(seq_len, window) if window else seq_len)
                    for heads, head_dim, window in layers)
    return 6 * active_params + attention


def model_flops_utilization(tokens_per_s: float | None, flops_per_token: int | None,
                            peak_flops: float | None) -> float | None:
    if not tokens_per_s or not flops_per_token or not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops


def peak_bf16_flops(gpu_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by its torch name; None for an unknown GPU or a CPU."""
    for needle, tflops in PEAK_BF16_TFLOPS:
        if gpu_name and needle.lower() in gpu_name.lower():
            return tflops * 1e12
    return None


def budget_fraction(budget_gib: float, total_bytes: int, context_bytes: int = 0) -> float:
    """torch.cuda.set_per_process_memory_fraction value that emulates a card of budget_gib: the CUDA
    context (outside torch's allocator) lives on a real card too, so it is taken off the budget."""
    if budget_gib <= 0 or total_bytes <= 0:
        raise BenchError(f"budget {budget_gib} GiB on a device of {total_bytes} bytes: both must be positive")
    usable = budget_gib * GIB - context_bytes
    return min(max(usable / total_bytes, 0.0), 1.0)


def loss_max_abs_diff(a: Sequence[float], b: Sequence[float], steps: int | None = None) -> float | None:
    """Largest |a_i - b_i| over the first `steps` (default: all common) logged losses."""
    n = min(len(a), len(b)) if steps is None else min(len(a), len(b), steps)
    if n == 0:
        return None
    return max(abs(float(x) - float(y)) for x, y in zip(a[:n], b[:n]))


def fixed_length_rows(stream: Sequence[int], seq_len: int, rows: int, vocab_size: int) -> list[list[int]]:
    """`rows` rows of exactly seq_len ids, cut from the token stream read cyclically; ids folded into
    the vocabulary so that a tokenizer larger than the model cannot index past its embedding."""
    if not stream:
        raise BenchError("empty token stream: the benchmark text produced no tokens")
    n = len(stream)
    return [[int(stream[(r * seq_len + i) % n]) % vocab_size for i in range(seq_len)] for r in range(rows)]


def longest_seq(trains: Callable[[int], bool], ladder: Sequence[int], bisect_steps: int,
                multiple: int) -> int | None:
    """The longest sequence length that trains: climb the ladder until the first failure, then bisect
    between the last success and that failure `bisect_steps` times (on multiples of `multiple`)."""
    best, failed = None, None
    for seq in ladder:
        if trains(seq):
            best = seq
        else:
            failed = seq
            break
    if best is None or failed is None:
        return best
    low, high = best, failed
    for _ in range(bisect_steps):
        mid = (low + high) // 2 // multiple * multiple
        if mid <= low or mid >= high:
            break
        if trains(mid):
            low = mid
        else:
            high = mid
    return low


def fastest(records: Iterable[dict]) -> dict | None:
    """The ok record with the highest tokens/s."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("tokens_per_s")]
    return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None


def failure_record(case: Case, status: str, reason: str, memory: dict | None = None) -> dict:
    """The result line of a case that did not finish: status OOM / timeout / error, why, and the memory
    seen when it failed (GiB). Same keys as a finished case, figures None."""
    if status not in STATUSES or status == "ok":
        raise ValueError(f"not a failure status: {status!r}")
    record = empty_figures()
    record.update(case=dataclasses.asdict(case), setting=case.setting, stack=case.stack, status=status,
                  error=reason, memory_at_failure_gib=memory or {})
    return record


def empty_figures() -> dict:
    return {
        "status": None, "error": None, "memory_at_failure_gib": {},
        "load_gib": None, "peak_allocated_gib": None, "peak_reserved_gib": None, "peak_nvml_gib": None,
        "peak_rss_gib": None, "step_times_s": [], "median_step_s": None, "tokens_per_step": None,
        "tokens_per_s": None, "flops_per_token": None, "mfu": None, "losses": [], "trainable_parameters": None,
        "unsloth_imported": None, "load_average": None,
    }


def device_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; a CPU run is 'cpu'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "cpu"


def result_stem(day: date, device_name: str, matrix_name: str) -> str:
    """<date>-<device>, plus -<matrix> for a matrix other than the device's default (cpu / gpu), so
    that a budgets run on the same day does not replace the throughput table."""
    stem = f"{day.isoformat()}-{device_slug(device_name)}"
    return stem if matrix_name in ("cpu", "gpu") else f"{stem}-{matrix_name}"


# --------------------------------------------------------------------------- reports


def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "—"
    return format(value, spec)


def markdown_report(records: list[dict], env: dict) -> str:
    """The Markdown file: what was run where, the per-case table, the stack comparison and budgets."""
    gpu = env["device"]["kind"] == "cuda"
    title = f"# Benchmark — {env['date']}, {env['device']['name']}"
    if gpu:
        note = ("GPU figures. Memory in GiB: peak allocated / reserved by torch during training (reset after "
                "loading), peak device memory seen by NVML during training (whole device, CUDA context "
                "included), load = allocated after loading the model and adding LoRA. tokens/s = trained tokens "
                "per step / median step time, warm-up steps excluded, steps timed between "
                "torch.cuda.synchronize() calls. MFU against "
                f"{fmt(env.get('peak_tflops'), '.0f')} TFLOP/s dense bf16 (formula: benchmarks/README.md).")
    else:
        note = ("CPU figures (no GPU on this machine; GPU figures need a GPU): peak RSS of the whole case "
                "process in GiB (libraries included), load = RSS growth while loading the model and adding "
                "LoRA, tokens/s = trained tokens per step / median step time, warm-up steps excluded.")
    lines = [title, "", note, "", f"Command: `{env['command']}`", ""]
    busy = busy_warning(records, env)
    if busy:
        lines += [busy, ""]
    lines += case_table([r for r in records if not r["case"].get("search")], gpu)
    lines += ["", "## lowvram_ft vs hf (same setting)", ""] + comparison_table(records, gpu)
    searched = [r for r in records if r["case"].get("search")]
    if searched:
        lines += ["", "## Emulated budgets", "",
                  f"Budgets are emulated on one {env['device']['name']} ({fmt(env['device'].get('total_gib'), '.1f')} GiB) "
                  "with torch.cuda.set_per_process_memory_fraction, minus the measured CUDA context: not "
                  "measured on cards of that size.", ""]
        lines += budget_table(searched)
    return "\n".join(lines) + "\n"


def busy_warning(records: list[dict], env: dict) -> str | None:
    """CPU timings are only meaningful on an otherwise idle machine: say so when a case saw a 1-minute
    load average above the number of cores (the case itself accounts for about one core's worth)."""
    if env["device"]["kind"] == "cuda":
        return None
    worst = max((r.get("load_average") or 0.0 for r in records), default=0.0)
    cores = env.get("cpu_count") or 1
    if worst <= cores + 0.5:
        return None
    return (f"**Warning: other processes were using the CPU (1-minute load average up to {worst:.1f} on {cores} "
            "cores): these CPU timings are not reliable; re-run on an idle machine.**")


def case_table(records: list[dict], gpu: bool) -> list[str]:
    if gpu:
        head = ["setting", "stack", "status", "tokens/s", "median step s", "peak alloc", "peak reserved",
                "NVML peak", "load", "MFU", "trainable", "first losses"]
    else:
        head = ["setting", "stack", "status", "tokens/s", "median step s", "peak RSS", "load", "trainable",
                "first losses"]
    rows = []
    for r in records:
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**"
        trainable = (r.get("trainable_parameters") or {}).get("trainable")
        losses = ", ".join(f"{x:.4f}" for x in r.get("losses", [])[:3]) or "—"
        cells = [r["setting"], r["stack"], status, fmt(r["tokens_per_s"], ",.0f"), fmt(r["median_step_s"], ".3f")]
        if gpu:
            cells += [fmt(r["peak_allocated_gib"]), fmt(r["peak_reserved_gib"]), fmt(r["peak_nvml_gib"]),
                      fmt(r["load_gib"]), "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"]
        else:
            cells += [fmt(r["peak_rss_gib"]), fmt(r["load_gib"])]
        cells += [fmt(trainable, ",d"), losses]
        rows.append(cells)
    return markdown_rows(head, rows)


def comparison_table(records: list[dict], gpu: bool) -> list[str]:
    memory = "peak reserved" if gpu else "peak RSS"
    head = ["setting", "tokens/s lowvram_ft / hf", f"{memory} lowvram_ft / hf", "trainable equal", "same data",
            "max |Δloss|"]
    rows = []
    for setting, pair in paired(records).items():
        ours, hf = pair.get("lowvram_ft"), pair.get("hf")
        if not ours or not hf:
            continue
        key = "peak_reserved_gib" if gpu else "peak_rss_gib"
        speed = ratio(ours["tokens_per_s"], hf["tokens_per_s"])
        mem = ratio(ours[key], hf[key])
        counts = [(r.get("trainable_parameters") or {}).get("trainable") for r in (ours, hf)]
        equal = "—" if None in counts else ("yes" if counts[0] == counts[1] else f"no ({counts[0]:,} vs {counts[1]:,})")
        rows.append([setting, fmt(speed, ".2f") + ("x" if speed else ""), fmt(mem, ".2f") + ("x" if mem else ""),
                     equal, "yes" if ours.get("data_digest") == hf.get("data_digest") else "**no**",
                     fmt(loss_max_abs_diff(ours["losses"], hf["losses"]), ".2e")])
    return markdown_rows(head, rows)


def budget_table(records: list[dict]) -> list[str]:
    head = ["card (emulated)", "model", "stack", "longest seq at batch 1", "fastest setting that fits", "tokens/s"]
    rows = []
    for (budget, model, stack), group in grouped_searches(records).items():
        longest = max((r["case"]["seq_len"] for r in group if r["case"]["batch_size"] == 1 and r["status"] == "ok"),
                      default=None)
        best = fastest(group)
        setting = f"batch {best['case']['batch_size']} x seq {best['case']['seq_len']}" if best else "nothing fits"
        rows.append([f"{budget:g} GiB", model, stack, fmt(longest, ",d") if longest else "does not train",
                     setting, fmt(best["tokens_per_s"], ",.0f") if best else "—"])
    return markdown_rows(head, rows)


def grouped_searches(records: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        c = r["case"]
        groups.setdefault((c["budget_gib"], Case.from_dict(c).setting.split(" ")[0], c["stack"]), []).append(r)
    return groups


def paired(records: list[dict]) -> dict[str, dict[str, dict]]:
    pairs: dict[str, dict[str, dict]] = {}
    for r in records:
        if not r["case"].get("search"):
            pairs.setdefault(r["setting"], {})[r["stack"]] = r
    return pairs


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def markdown_rows(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def bench_chart(records: list[dict], env: dict, path: Path) -> None:
    """tokens/s and peak memory per setting, the two stacks side by side (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = env["device"]["kind"] == "cuda"
    pairs = paired(records)
    settings = list(pairs)
    memory_key, memory_label = ("peak_reserved_gib", "peak reserved (GiB)") if gpu else ("peak_rss_gib", "peak RSS (GiB)")
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(settings) + 4), 4))
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s (trained tokens)"), (axes[1], memory_key, memory_label)):
        for k, stack in enumerate(STACKS):
            xs = [i + (k - 0.5) * 0.4 for i in range(len(settings))]
            values = [(pairs[s].get(stack) or {}).get(key) or 0.0 for s in settings]
            bars = ax.bar(xs, values, 0.4, label=stack)
            for bar, s in zip(bars, settings):
                status = (pairs[s].get(stack) or {}).get("status")
                if status and status != "ok":
                    ax.annotate(status, (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(settings)), settings, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.25 * max([b.get_height() for b in ax.patches] + [1e-9]))  # room for the legend
        ax.legend(fontsize=8, loc="upper right")
    kind = "GPU" if gpu else "CPU figures"
    fig.suptitle(f"{kind}: {env['device']['name']}, {env['date']}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    from .pipeline import write_text_atomic as write  # one atomic writer for the package (light import)

    write(path, text)


def write_results(records: list[dict], env: dict, out_dir: Path, stem: str) -> Path:
    """<stem>.jsonl (one line per case, environment included), <stem>.md and <stem>.png, atomically.
    Lines already in today's <stem>.jsonl are kept unless this run measured the same case again, so a
    matrix can be run in parts (--cases) into one file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{stem}.jsonl"
    records = merge_records(read_jsonl(jsonl), [{**r, "environment": env} for r in records])
    write_text_atomic(jsonl, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))
    write_text_atomic(out_dir / f"{stem}.md", markdown_report(records, env))
    if paired(records):
        bench_chart(records, env, out_dir / f"{stem}.png")
    (out_dir / f"{stem}.partial.jsonl").unlink(missing_ok=True)
    return jsonl


def merge_records(old: list[dict], new: list[dict]) -> list[dict]:
    """Old lines in their order with re-measured cases replaced, then the new cases."""
    def key(r: dict) -> tuple:
        return r["setting"], r["stack"], r["case"].get("search", "")

    fresh = {key(r): r for r in new}
    merged = [fresh.pop(key(r), r) for r in old]
    return merged + [r for r in new if key(r) in fresh]


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_partial(record: dict, out_dir: Path, stem: str) -> None:
    """Each record as soon as its case ends, so that an interrupted run keeps what it measured."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / f"{stem}.partial.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


# --------------------------------------------------------------------------- the suite (parent process)


def add_bench_arguments(parser) -> None:
    """Flags of `python -m lowvram_ft bench` beyond --config (the case matrix)."""
    parser.add_argument("--out", default=DEFAULT_OUT_DIR, metavar="DIR", help=f"results folder (default {DEFAULT_OUT_DIR})")
    parser.add_argument("--cases", action="append", metavar="TEXT",
                        help="run only cases whose setting contains TEXT (repeatable), e.g. --cases 'gpt-oss-20b'")
    parser.add_argument("--budgets", metavar="GiB,...",
                        help="emulated cards to search, a subset of the matrix's (e.g. 16,24)")


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
            raise BenchError(f"--budgets: matrix {matrix.name} has no budget search — use benchmarks/cases/budgets.yaml")
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


def run_case(case: Case, models: "ModelStore", device: dict, log_dir: Path, console, position: str = "") -> dict:
    """Run one case in a fresh process with a timeout; always returns its result record."""
    try:
        case = dataclasses.replace(case, model_path=models.path_for(case.model))
    except BenchError as error:
        log(console, f"case {position} {case.name}: error: {error}")
        return failure_record(case, "error", str(error))
    log(console, f"case {position} {case.name} ...")
    case_file, result_file, log_file = (log_dir / f"{case.slug}.{s}" for s in ("case.json", "result.json", "log"))
    write_text_atomic(case_file, case.to_json())
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


def run_process(command: list[str], log_file: Path, timeout_s: float) -> int | None:
    """Run a case process in its own session (so a timeout ends it and every child it started); its
    output goes to log_file. Returns the exit code, or None after a timeout."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    # Budgets are the cases' budget_gib, applied to both stacks alike; model.detect_device's own card
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


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def summarize(raw: dict, case: Case, device: dict) -> dict:
    """Derived figures (tokens/s, median step, MFU) from a case process's raw measurements."""
    record = empty_figures()
    record.update(raw)
    record.update(case=dataclasses.asdict(case), setting=case.setting, stack=case.stack)
    times, warmup = raw.get("step_times_s") or [], case.warmup_steps
    record["median_step_s"] = median_step_s(times, warmup)
    if raw.get("tokens_per_step"):
        record["tokens_per_s"] = tokens_per_second(times, raw["tokens_per_step"], warmup)
    config = model_config(case.model_path)
    active = active_parameters(config)
    if active is not None:
        record["flops_per_token"] = training_flops_per_token(active, case.seq_len, attention_layers(config))
    if device["kind"] == "cuda":
        record["mfu"] = model_flops_utilization(record["tokens_per_s"], record["flops_per_token"],
                                                peak_bf16_flops(device["name"]))
    return record


def model_config(model_path: str) -> dict:
    return read_json(Path(model_path) / "config.json") or {}


def active_parameters(config: dict) -> int | None:
    """Parameters a token passes through (planner's exact count), or None if it cannot tell."""
    try:
        from .plan import count_parameters

        return count_parameters(config).active
    except Exception:  # noqa: BLE001 — MFU is optional; the planner may not know this architecture
        return None


def predicted_peak_gib(case: Case, device: dict) -> float | None:
    """The planner's prediction for this case (GPU only), to set beside the measurement; None when the
    planner is absent or does not cover the model."""
    if device["kind"] != "cuda":
        return None
    try:
        from .plan import PlanInput, predict

        config = model_config(case.model_path)
        gpt_oss = config.get("model_type") == "gpt_oss"
        ours = case.stack == "lowvram_ft"
        inp = PlanInput(
            model_config=config, load_bits=4 if ours or not gpt_oss else 16, lora_r=case.lora_r,
            lora_targets=list(case.lora_targets), batch_size=case.batch_size, seq_len=case.seq_len,
            gradient_accumulation=case.grad_accum, gradient_checkpointing="unsloth" if ours else "true",
            optimizer=case.optimizer, dtype=case.dtype, attention="auto" if ours or not gpt_oss else "eager",
            unsloth_kernels=ours,
        )
        return round(predict(inp, vram_gib=case.budget_gib).total_gib, 3)
    except Exception:  # noqa: BLE001 — optional
        return None


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


def print_summary(records: list[dict], device: dict, console) -> None:
    from .report import print_table

    gpu = device["kind"] == "cuda"
    memory = "peak reserved GiB" if gpu else "peak RSS GiB"
    rows = [[r["setting"], r["stack"], r["status"], fmt(r["tokens_per_s"], ",.0f"),
             fmt(r["peak_reserved_gib"] if gpu else r["peak_rss_gib"]),
             fmt((r.get("trainable_parameters") or {}).get("trainable"), ",d")] for r in records]
    title = f"benchmark — {device['name']}" + ("" if gpu else " (CPU figures; GPU figures need a GPU)")
    print_table(["setting", "stack", "status", "tokens/s", memory, "trainable"], rows, title, console)


def one_line(record: dict, device: dict) -> str:
    if record["status"] != "ok":
        return f"{record['status']}: {str(record['error'])[:200]}"
    memory = (f"peak reserved {fmt(record['peak_reserved_gib'])} GiB" if device["kind"] == "cuda"
              else f"peak RSS {fmt(record['peak_rss_gib'])} GiB")
    return f"ok, {fmt(record['tokens_per_s'], ',.0f')} tokens/s, {memory}"


def log(console, message: str) -> None:
    console.print(f"[lowvram_ft] bench: {message}", highlight=False, markup=False)


def environment(device: dict) -> dict:
    """Versions, device and the exact command; nothing that names the host."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from .pipeline import versions

    env = {"date": date.today().isoformat(), "versions": versions(), "device": device, "command": invoking_command(),
           "platform": f"{platform.system()} {platform.machine()}", "cpu_count": os.cpu_count(),
           "budgets": "emulated with torch.cuda.set_per_process_memory_fraction" if device["kind"] == "cuda" else None,
           "peak_tflops": (peak_bf16_flops(device["name"]) or 0) / 1e12 or None}
    for name in ("accelerate", "nvidia-ml-py"):
        try:
            env["versions"][name] = version(name)
        except PackageNotFoundError:
            env["versions"][name] = None
    return env


def invoking_command() -> str:
    """The command line that started this run, without paths that name the machine or the user."""
    argv = list(sys.argv)
    scripts = {os.path.join("lowvram_ft", "__main__.py"): "lowvram_ft", os.path.join("lowvram_ft", "bench.py"): "lowvram_ft.bench"}
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


class ModelStore:
    """Local folders of the models cases name: the embedded model, random-weight checkpoints (built once
    per run on the GPU in a child process, removed afterwards unless cached before) or a user's folder."""

    def __init__(self, device: dict, log_dir: Path, console):
        self.device, self.log_dir, self.console = device, log_dir, console
        self.paths: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.built: list[Path] = []

    def path_for(self, model: str) -> str:
        """The model's folder; BenchError (remembered: a failed build is not retried per case)."""
        if model in self.failed:
            raise BenchError(self.failed[model])
        if model not in self.paths:
            try:
                self.paths[model] = self.resolve(model)
            except Exception as error:  # noqa: BLE001 — every case of this model becomes an error record
                self.failed[model] = f"{model}: {error}" if not isinstance(error, BenchError) else str(error)
                raise BenchError(self.failed[model]) from None
        return self.paths[model]

    def resolve(self, model: str) -> str:
        if model in RANDOM_MODELS:
            return str(self.random_model(model))
        from .model import resolve_model_path

        path = resolve_model_path(model)
        if not Path(path).is_dir():
            raise BenchError(f"{model}: benchmark models are local folders, 'embedded' or one of "
                             f"{', '.join(RANDOM_MODELS)} — download Hub models first")
        return path

    def random_model(self, key: str) -> Path:
        target = random_models_dir() / f"random-{key}"
        if (target / "config.json").is_file():
            return target
        if self.device["kind"] != "cuda":
            raise BenchError(f"{key}: random-weight models are built on the GPU; this machine has none")
        log(self.console, f"building {key} ({RANDOM_MODELS[key]['about']}) in {target} ...")
        log_file = self.log_dir / f"build-{key}.log"
        code = run_process([sys.executable, "-m", "lowvram_ft.bench", "--build", key, "--model-dir", str(target)],
                           log_file, 3600)
        if code != 0 or not (target / "config.json").is_file():
            raise BenchError(f"{key}: building the random-weight model failed — see {log_file}: {log_tail(log_file)}")
        self.built.append(target)
        return target

    def clean_up(self) -> None:
        """Random checkpoints are tens of GB: keep them only when LOWVRAM_FT_BENCH_KEEP_MODELS=1."""
        if os.environ.get("LOWVRAM_FT_BENCH_KEEP_MODELS") == "1":
            return
        import shutil

        for path in self.built:
            shutil.rmtree(path, ignore_errors=True)


def random_models_dir() -> Path:
    root = Path(os.environ.get("LOWVRAM_FT_CACHE", Path.home() / ".cache" / "lowvram_ft"))
    return root / "bench-models"


def random_model_config(key: str) -> dict:
    """config.json of a random-weight model: the bundled shape, unquantized bf16, with its changes."""
    spec = RANDOM_MODELS[key]
    config = json.loads((Path(__file__).parent / "assets" / "model_configs" / spec["config"]).read_text())
    config.pop("quantization_config", None)  # MXFP4 describes OpenAI's files, not random bf16 weights
    config.update(spec["changes"], torch_dtype="bfloat16", use_cache=False)
    return config


# --------------------------------------------------------------------------- the case process


def main(argv: list[str] | None = None) -> int:
    """`python -m lowvram_ft.bench [--config MATRIX] [--out DIR] [--cases TEXT] [--budgets 16,24]` runs
    the suite, like `python -m lowvram_ft bench`; the internal modes --case, --probe and --build are
    what the suite starts in its child processes."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lowvram_ft.bench", description="Measure lowvram_ft against the "
                                     "plain Hugging Face stack (protocol: benchmarks/README.md).")
    parser.add_argument("--config", metavar="FILE.yaml", help="case matrix (default: benchmarks/cases/gpu.yaml "
                        "on a GPU, cpu.yaml otherwise)")
    add_bench_arguments(parser)
    parser.add_argument("--case", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build", choices=sorted(RANDOM_MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(describe_device()))
    elif args.build:
        build_random_model(random_model_config(args.build), args.model_dir)
    elif args.case:
        return case_main(args.case, args.result)
    else:
        try:
            run_bench(args.config, args.out, only=args.cases, budgets=args.budgets)
        except BenchError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


def case_main(case_file: Path, result_file: Path) -> int:
    """One case in this process: read it, measure it, write its raw record (atomically)."""
    case = Case.from_dict(json.loads(case_file.read_text(encoding="utf-8")))
    record = measure_case(case, result_file.with_suffix(".heartbeat.json"))
    write_text_atomic(result_file, json.dumps(record, default=str))
    return 0


def describe_device() -> dict:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"kind": "cuda", "name": props.name, "total_gib": round(props.total_memory / GIB, 2),
                "cuda": torch.version.cuda, "driver": nvml_driver_version()}
    return {"kind": "cpu", "name": "cpu", "total_gib": None, "cuda": None, "driver": None,
            "threads": torch.get_num_threads()}


def nvml_driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        value = pynvml.nvmlSystemGetDriverVersion()
        return value.decode() if isinstance(value, bytes) else value
    except Exception:  # noqa: BLE001 — informational
        return None


class MemoryMonitor:
    """Samples device memory used (NVML, GPU) or the resident set (psutil, CPU) every 10 ms in a thread,
    keeps the peak per phase, and writes a heartbeat file so that a case killed mid-way still reports
    the memory it had reached."""

    def __init__(self, gpu: bool, heartbeat: Path):
        self.gpu, self.heartbeat = gpu, heartbeat
        self.phase, self.peak, self.overall_peak = "start", 0, 0
        self._stop = threading.Event()
        self._read = self._nvml_reader() if gpu else self._rss_reader()
        self.baseline = self._read() if self._read else None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _nvml_reader(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
            return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:  # noqa: BLE001 — no NVML: the torch figures remain
            return None

    @staticmethod
    def _rss_reader():
        import psutil

        process = psutil.Process()
        return lambda: int(process.memory_info().rss)

    def start(self) -> "MemoryMonitor":
        self._thread.start()
        return self

    def _run(self) -> None:
        last_beat = 0.0
        while not self._stop.wait(MONITOR_INTERVAL_S):
            self.sample()
            if time.monotonic() - last_beat > HEARTBEAT_INTERVAL_S:
                last_beat = time.monotonic()
                self.write_heartbeat()

    def sample(self) -> int | None:
        if self._read is None:
            return None
        value = self._read()
        self.peak, self.overall_peak = max(self.peak, value), max(self.overall_peak, value)
        return value

    def start_phase(self, phase: str) -> None:
        self.phase = phase
        self.peak = self.sample() or 0

    def write_heartbeat(self) -> None:
        key = "nvml_used" if self.gpu else "rss"
        try:
            peak = round(self.overall_peak / GIB, 3)
            write_text_atomic(self.heartbeat, json.dumps({"phase": self.phase, f"peak_{key}": peak}))
        except OSError:
            pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        self.sample()


def measure_case(case: Case, heartbeat: Path) -> dict:
    """Load, wrap in LoRA and train one case; the raw figures (never raises for OOM or errors)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    gpu = gpu_visible()
    monitor = MemoryMonitor(gpu, heartbeat).start()  # NVML baseline before CUDA is initialised
    record: dict[str, Any] = {"status": "error", "error": None}
    try:
        import_stack(case.stack)
        record.update(train_case(case, monitor))
        record["status"] = "ok"
    except BaseException as error:  # noqa: BLE001 — every failure becomes a record, the suite goes on
        traceback.print_exc()  # into the case's log
        record.update(status="OOM" if is_oom(error) else "error", error=f"{type(error).__name__}: {first_line(error)}",
                      memory_at_failure_gib=memory_now(gpu, monitor))
    finally:
        monitor.stop()
    record["unsloth_imported"] = unsloth_imported()
    if case.stack == "hf" and record["unsloth_imported"]:
        record.update(status="error", error="unsloth was imported in the hf process: the comparison is void")
    return record


def import_stack(stack: str) -> None:
    """The stack's libraries, imported before anything is measured (so load memory is the model's):
    Unsloth first for ours (it patches transformers, trl and peft), never for hf."""
    if stack == "lowvram_ft":
        from .model import import_unsloth

        import_unsloth()
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401


def gpu_visible() -> bool:
    """Whether this process will train on a GPU, asked through NVML so CUDA is not initialised yet."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch.cuda.is_available()


def unsloth_imported() -> bool:
    return any(m == "unsloth" or m.startswith(("unsloth.", "unsloth_zoo")) for m in sys.modules)


def is_oom(error: BaseException) -> bool:
    names = {t.__name__ for t in type(error).__mro__}
    return bool(names & {"OutOfMemoryError", "MemoryError"}) or "out of memory" in str(error).lower()


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines() or [""])[0][:400]


def memory_now(gpu: bool, monitor: MemoryMonitor) -> dict:
    """Peaks reached so far (GiB), read right after a failure and before anything is freed."""
    figures = {"phase": monitor.phase}
    if gpu:
        import torch

        if torch.cuda.is_initialized():
            figures.update(allocated=round(torch.cuda.max_memory_allocated() / GIB, 3),
                           reserved=round(torch.cuda.max_memory_reserved() / GIB, 3))
        figures["nvml_used"] = round(monitor.overall_peak / GIB, 3) if monitor.overall_peak else None
    else:
        figures["rss"] = round(peak_rss_bytes() / GIB, 3)
    return figures


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def train_case(case: Case, monitor: MemoryMonitor) -> dict:
    """The measurement proper: emulate the budget, load (memory), add LoRA (counts), train (timings)."""
    import torch

    gpu = monitor.gpu
    figures: dict[str, Any] = {"budget": apply_budget(case, monitor) if gpu else None}
    monitor.start_phase("load")
    before_load = monitor.sample() or 0
    model, tokenizer, device, settings = load_stack(case, gpu)
    figures["load_settings"] = settings
    if gpu:
        figures["load_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)
        figures["load_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        torch.cuda.reset_peak_memory_stats()
    else:
        figures["load_gib"] = round(((monitor.sample() or 0) - before_load) / GIB, 3)
    from .model import trainable_parameters

    figures["trainable_parameters"] = trainable_parameters(model)
    dataset, figures["tokens_per_step"], figures["data_digest"] = benchmark_dataset(case, tokenizer, model)
    timer = make_step_timer(torch.cuda.synchronize if gpu else (lambda: None))
    trainer = make_trainer(case, model, tokenizer, dataset, device, timer)
    monitor.start_phase("train")
    trainer.train()
    monitor.stop()
    figures.update(step_times_s=[round(t, 6) for t in timer.step_times], losses=timer.losses,
                   load_average=round(os.getloadavg()[0], 2))
    if gpu:
        figures.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 3),
                       peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 3),
                       peak_nvml_gib=round(monitor.peak / GIB, 3) if monitor.peak else None)
    else:
        figures.update(peak_rss_gib=round(peak_rss_bytes() / GIB, 3),
                       peak_rss_train_gib=round(monitor.peak / GIB, 3))
    return figures


def apply_budget(case: Case, monitor: MemoryMonitor) -> dict:
    """Create the CUDA context, measure it, and cap torch's allocator to the emulated card."""
    import torch

    torch.zeros(1, device="cuda")  # the context exists from here on
    used = monitor.sample()
    context = used - monitor.baseline if used is not None and monitor.baseline is not None else 0
    total = torch.cuda.get_device_properties(0).total_memory
    info = {"device_total_gib": round(total / GIB, 3), "cuda_context_gib": round(context / GIB, 3),
            "budget_gib": case.budget_gib, "memory_fraction": None, "emulated": case.budget_gib is not None}
    if case.budget_gib is not None:
        fraction = budget_fraction(case.budget_gib, total, context)
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
        info["memory_fraction"] = round(fraction, 6)
    return info


def run_config(case: Case):
    """Our Config for this case (both stacks read their shared settings from it)."""
    from .config import load_config

    return load_config(None, {
        "model": {"name": case.model_path, "max_seq_length": case.seq_len, "dtype": case.dtype},
        "lora": {"r": case.lora_r, "alpha": case.lora_alpha, "dropout": 0.0, "target_modules": list(case.lora_targets)},
        "train": {"batch_size": case.batch_size, "gradient_accumulation_steps": case.grad_accum,
                  "max_steps": case.steps, "warmup_steps": 0, "lr_scheduler": "constant",
                  "learning_rate": case.learning_rate, "optimizer": case.optimizer, "seed": case.seed,
                  "logging_steps": 1, "max_grad_norm": 1.0},
        "eval": {"enabled": False},
    })


def load_stack(case: Case, gpu: bool):
    """(model with LoRA, tokenizer, Device, what was loaded how)."""
    if case.stack == "lowvram_ft":
        return load_lowvram_ft(case)
    return load_hf(case, gpu)


def load_lowvram_ft(case: Case):
    from . import model as models

    cfg = run_config(case)
    device = models.detect_device()
    model, tokenizer = models.load_model(cfg, device)
    model = models.add_lora(model, cfg)
    settings = {"weights": models.load_bits(cfg, device), "gradient_checkpointing": cfg.model.gradient_checkpointing,
                "optimizer": case.optimizer, "device_reason": device.reason}
    return model, tokenizer, device, settings


def load_hf(case: Case, gpu: bool):
    """The plain Hugging Face recipe: no unsloth in this process."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import Device, expert_target_parameters

    dtype = getattr(torch, case.dtype)
    config = model_config(case.model_path)
    gpt_oss = config.get("model_type") == "gpt_oss"
    kwargs: dict[str, Any] = {"dtype": dtype, "use_cache": False}
    if gpt_oss:
        kwargs["attn_implementation"] = "eager"  # the OpenAI cookbook's setting (attention sinks)
        if (config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
            from transformers import Mxfp4Config

            kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    elif gpu:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if gpu:
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(case.model_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(case.model_path)
    experts = expert_target_parameters(model, list(case.lora_targets))
    lora = LoraConfig(r=case.lora_r, lora_alpha=case.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(case.lora_targets), task_type="CAUSAL_LM",
                      **({"target_parameters": experts} if experts else {}))
    torch.manual_seed(case.seed)  # the same seed Unsloth sets before get_peft_model: identical LoRA init
    model = get_peft_model(model, lora)
    name = torch.cuda.get_device_properties(0).name if gpu else "cpu"
    device = Device("cuda" if gpu else "cpu", name, None, case.dtype == "bfloat16", f"hf stack: {case.dtype}")
    quant = kwargs.get("quantization_config")
    settings = {"weights": "4bit-nf4-double-quant" if quant is not None and not gpt_oss else
                ("mxfp4-dequantized-bf16" if quant is not None else case.dtype),
                "attention": kwargs.get("attn_implementation", "default"), "gradient_checkpointing": "true",
                "target_parameters": experts, "optimizer": case.optimizer}
    return model, tokenizer, device, settings


def make_trainer(case: Case, model, tokenizer, dataset, device, timer):
    from .train import build_trainer, sft_config_kwargs

    import atexit
    import shutil

    cfg = run_config(case)
    run_dir = Path(tempfile.mkdtemp(prefix="lowvram-bench-"))  # save_strategy "no": stays empty
    atexit.register(shutil.rmtree, run_dir, True)
    if case.stack == "lowvram_ft":
        return build_trainer(model, tokenizer, dataset, cfg, device, run_dir, [timer])
    from trl import SFTConfig, SFTTrainer

    if device.kind == "cpu":
        use_torch_log_probs()
    # Same SFTConfig as ours except checkpointing, which the HF recipe leaves to the Trainer.
    kwargs = sft_config_kwargs(cfg, device, str(run_dir / "checkpoints"))
    kwargs.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    return SFTTrainer(model=model, args=SFTConfig(**kwargs), train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[timer])


def use_torch_log_probs() -> None:
    """TRL 1.15's SFTTrainer computes its loss through a fused LM head whose kernel is Triton (CUDA / XPU
    only), so plain TRL cannot train on a CPU. For CPU figures the hf stack swaps in `torch_log_probs`,
    the same quantities in plain torch; on a GPU TRL's own kernel runs untouched."""
    from trl.trainer import utils as trl_utils

    if hasattr(trl_utils, "_ChunkedLogProbFunction"):
        trl_utils._ChunkedLogProbFunction = type("TorchLogProbs", (), {"apply": staticmethod(torch_log_probs)})


def torch_log_probs(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                    logit_scale=1.0, outputs=("log_probs",)):
    """(log p(target), entropy, log sum p^2, mean logit, is top-1) per token, as TRL's kernel defines
    them: logits x logit_scale, then softcapping, then / temperature, in float32. Only log p carries
    gradients (the rest are metrics)."""
    import torch

    z = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
    if final_logit_softcapping is not None:
        z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
    z = z / temperature
    log_z = torch.logsumexp(z, dim=-1)
    log_probs = z.gather(-1, targets[:, None]).squeeze(-1) - log_z
    with torch.no_grad():
        probs = (z - log_z[:, None]).exp()
        extra = {
            "entropy": log_z - (probs * z).sum(-1),
            "log_sum_sq_probs": torch.logsumexp(2 * z, dim=-1) - 2 * log_z,
            "mean_logits": z.mean(-1),
            "is_top1": z.argmax(-1) == targets,
        }
    return (log_probs, *(extra[name] if name in outputs else None for name in extra))


def make_step_timer(sync: Callable[[], None]):
    """A TrainerCallback timing each optimizer step between device syncs and keeping the logged losses."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_times: list[float] = []
            self.losses: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.step_times.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def benchmark_dataset(case: Case, tokenizer, model):
    """(Dataset of input_ids + labels, trained tokens per optimizer step, digest of the ids): rows of
    exactly seq_len tokens, every token trained, so every step trains the same number of tokens."""
    import hashlib

    from datasets import Dataset

    rows = fixed_length_rows(benchmark_tokens(tokenizer), case.seq_len, case.steps * case.batch_size * case.grad_accum,
                             int(model.config.vocab_size))
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
    return Dataset.from_dict({"input_ids": rows, "labels": rows}), case.batch_size * case.grad_accum * case.seq_len, digest


def benchmark_tokens(tokenizer, minimum: int = 4096) -> list[int]:
    """A token stream: the shipped sample rows rendered with the tokenizer's chat template (plain text
    when it has none), or generated filler text when the sample file is absent."""
    texts = []
    for conversation in sample_conversations():
        try:
            texts.append(tokenizer.apply_chat_template(conversation["messages"], tokenize=False,
                                                       reasoning_language=conversation["language"]))
        except Exception:  # noqa: BLE001 — no (Harmony) chat template: the text alone
            texts.append("\n\n".join(m["thinking"] or m["content"] for m in conversation["messages"]))
    if not texts:
        texts = filler_texts()
    stream: list[int] = []
    while len(stream) < minimum:
        for text in texts:
            stream += tokenizer(text, add_special_tokens=False)["input_ids"]
    return stream


def sample_conversations() -> list[dict]:
    if not SAMPLE_FILE.is_file():
        return []
    conversations = []
    for line in SAMPLE_FILE.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("user") and row.get("final"):
            conversations.append({"language": row.get("reasoning_language"), "messages": [
                {"role": "developer", "content": row.get("developer") or "", "thinking": None},
                {"role": "user", "content": row["user"], "thinking": None},
                {"role": "assistant", "content": row["final"], "thinking": row.get("analysis")}]})
    return conversations


def filler_texts() -> list[str]:
    """Deterministic English-like text (used only when the sample data is not shipped)."""
    words = ("the model reads each token and predicts the next one while the optimizer updates the low "
             "rank adapters of every attention and expert projection in the network").split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(200)) + f" {i}." for i in range(32)]


# --------------------------------------------------------------------------- random-weight models


def build_random_model(config: dict, out_dir: Path, device: str | None = None) -> Path:
    """Save a random-weight checkpoint (bf16 safetensors, created directly on the device) with the
    offline o200k_harmony tokenizer, atomically (built in a sibling folder, then renamed)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .gptoss_tokenizer import load_gptoss_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
    hf_config = AutoConfig.for_model(config["model_type"], **settings)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
        model.save_pretrained(staging, max_shard_size="4GB")
        del model
        load_gptoss_tokenizer().save_pretrained(staging)
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


if __name__ == "__main__":
    sys.exit(main())
