"""`make bench`: measured memory and throughput of our trainer against the plain Hugging Face stack.

The story: `run_bench(matrix)` reads a case matrix (benchmarks/cases/*.yaml), probes the device, and
runs every case in its own process (`python -m lowvram_ft.bench --case FILE --result FILE`) with a
timeout, so an out-of-memory case, a crash or a hang is one `OOM` / `error` / `timeout` line and never
stops the suite. Budget searches (emulated 14-65 GiB cards) are sequences of such cases. The results
go to benchmarks/results/<date>-<device>.jsonl (one line per case, with the environment), a Markdown
table and a PNG chart. benchmarks/README.md is the protocol; this docstring is the short version.

Two stacks, same model shape, data, sequence length, batch, LoRA targets, optimizer, learning rate and
steps:
- `lowvram_ft`: lowvram_ft.model / lowvram_ft.train (Unsloth imported first, our defaults: 4-bit on
  GPU, Unsloth's offloaded gradient checkpointing). A random gpt-oss is a checkpoint in the split
  bnb-4bit layout of unsloth/gpt-oss-20b-unsloth-bnb-4bit, the one users of unsloth/gpt-oss-20b load.
- `hf`: transformers + peft + TRL's SFTTrainer with no Unsloth in the process (checked), set up like
  the Hugging Face / OpenAI gpt-oss recipe: bf16 weights (MXFP4 dequantized; a random gpt-oss is built
  directly in GPU memory from its config, no file), eager attention, LoRA on attention and on the
  experts through PEFT target_parameters, adapters in float32 as Unsloth keeps them; other models 4-bit
  NF4, double quantization, bf16 compute. On CPU both stacks load 16/32-bit weights.
Both case processes run with the same caching-allocator setting (`allocator_setting`).

Measured per case, between device syncs with warm-up steps excluded: step times, tokens/s (trained,
non-padding tokens: every row is exactly seq_len tokens), memory.py's FIELDS for a "load" and a "train"
phase (peaks reset after loading, before training, as in train runs), MFU, the losses, the trainable
parameter count, what was loaded (`gptoss_checkpoint.describe_loaded`: a 4-bit case whose experts are
not 4-bit is "invalid"), and what ran: the attention implementation and the MoE experts' path.

MFU = tokens/s x training FLOPs per token / the GPU's peak dense bf16 FLOP/s, with
training FLOPs per token = 6 x active parameters + 12 x sum over layers of heads x head_dim x T_eff
(PaLM's convention: every weight counted as trained, no causal halving of attention; T_eff is the
sequence length, or the sliding window on sliding-window layers; active parameters exclude the input
embedding and the experts a token is not routed to). LoRA skips the weight gradients of frozen weights
and checkpointing recomputes the forward: MFU is model FLOPs, not hardware FLOPs.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, MutableMapping, Sequence

from .errors import UserError
from .gptoss_checkpoint import build_split_checkpoint, describe_loaded
from .io import write_atomic, write_jsonl
from .memory import FIELDS, MemoryMonitor, peak_figures, reset_peaks, rss_reader
from .gptoss_tokenizer import load_gptoss_tokenizer
from .model import Device, emulated_card_fraction, expert_target_parameters, trainable_parameters

STACKS = ("lowvram_ft", "hf")
CASES_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "cases"
DEFAULT_MATRIX = {"cpu": CASES_DIR / "cpu.yaml", "cuda": CASES_DIR / "gpu.yaml"}
DEFAULT_OUT_DIR = "benchmarks/results"
LOG_ROOT = Path("runs") / "bench"  # per-case logs and case files (git-ignored)
GIB = 2**30
# invalid: the case ran, but not on what it asked for (a 4-bit case whose experts loaded unquantized);
# its figures are left out of every comparison.
STATUSES = ("ok", "OOM", "timeout", "error", "invalid")
# What unsloth_zoo sets at import when the user set nothing; the hf stack gets it too (allocator_setting).
DEFAULT_ALLOCATOR_CONF = "expandable_segments:True"
# Per-expert modules of a split MoE layout (gpt-oss bnb-4bit): called one by one only by the per-expert loop.
PER_EXPERT_MODULE = re.compile(r"\.experts\.(gate_up_projs|down_projs)\.\d+$")
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

# Random-weight models (speed and memory do not depend on the weight values). The shape comes from the
# bundled config.json, `changes` on top. `checkpoint`: the layout of the folder built once per run for
# the stacks that load one ("split-bnb4": gptoss_checkpoint's split bnb-4bit layout, what Unsloth loads
# for unsloth/gpt-oss-20b in 4-bit; "bf16": save_pretrained of random bf16 weights, quantized on load).
# `hf`: "in-memory" when the hf stack's recipe is bf16 and needs no file (weights created on the GPU in
# the case process), "checkpoint" when it quantizes while loading (NF4 for dense models).
RANDOM_MODELS = {
    "gpt-oss-20b-random": {
        "config": "gpt-oss-20b.json",
        "changes": {},
        "checkpoint": "split-bnb4",
        "hf": "in-memory",
        "about": "gpt-oss-20b shape (24 layers, 32 experts top-4, hidden 2880), random weights",
    },
    "dense-8b-random": {
        "config": "Qwen3-8B.json",
        # The offline tokenizer is o200k_harmony, so the vocabulary is gpt-oss's (201,088 rows instead
        # of Qwen3's 151,936: +0.4B parameters in embedding and head).
        "changes": {"vocab_size": 201088, "bos_token_id": 199998, "eos_token_id": 200002, "pad_token_id": 199999},
        "checkpoint": "bf16",
        "hf": "checkpoint",
        "about": "Qwen3-8B layers (36 x 4096, GQA 32/8, MLP 12288) with the o200k_harmony vocabulary, random bf16 weights",
    },
}
ROUTES = ("folder", "split-bnb4", "bf16", "in-memory")


class BenchError(UserError, ValueError):
    """A case matrix or a request that cannot be run; the message says what to do (exit code 2)."""


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
    model_path: str = ""              # resolved by the runner ("" for a model built in memory)

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


def classify_loaded(requested_bits: str, loaded: dict | None) -> tuple[str, str | None]:
    """("ok", None), or ("invalid", why) when what loaded is not what the case asked for: a 4-bit case
    whose expert weights are not all 4-bit (Unsloth's fused quantize-while-loading path can leave them
    16-bit with only a warning) or in which nothing is 4-bit measured another model than users run.
    `loaded` is gptoss_checkpoint.describe_loaded's report."""
    if requested_bits != "4bit" or loaded is None:
        return "ok", None
    experts, experts_4bit = loaded["expert_weights"], loaded["expert_weights_4bit"]
    held = parameters_text(loaded["parameters_by_dtype"])
    if experts and not loaded["experts_4bit"]:
        return "invalid", (f"asked for 4-bit weights, but {experts - experts_4bit} of {experts} expert weights "
                           f"loaded unquantized (parameters: {held}) — not the model users train")
    if not loaded["params4bit"]:
        return "invalid", f"asked for 4-bit weights, but no weight loaded as 4-bit (parameters: {held})"
    return "ok", None


def moe_path_summary(moe: dict | None) -> str | None:
    """What the MoE experts ran on, in a few words, from moe_path's facts; None for a dense model."""
    if moe is None:
        return None
    if moe["per_expert_modules"]:  # split layout: the loop calls the per-expert modules, the grouped path never
        if moe["per_expert_calls"] is None:
            return "not run"
        return "per-expert loop" if moe["per_expert_calls"] else "grouped (stacked 4-bit experts)"
    forward, implementation = moe["experts_forward"] or "", moe["experts_implementation"]
    if "loop" in forward:
        return "per-expert loop"
    if "grouped_mm" in forward or implementation == "grouped_mm":
        return "grouped_mm" if moe["grouped_mm_available"] else "per-expert loop (no grouped_mm in torch)"
    if implementation in (None, "eager"):
        return "per-expert loop (eager)"
    return implementation


def attention_summary(attention: dict | None) -> str | None:
    """The attention that ran in training: Unsloth's gpt-oss forward (installed with
    UNSLOTH_ENABLE_FLEX_ATTENTION=1) trains with flex attention plus sinks whatever the config says;
    anything else runs the config's implementation."""
    if attention is None:
        return None
    if attention["forward"].startswith("unsloth") and attention["unsloth_flex_attention"]:
        return "flex_attention_with_sink (Unsloth)"
    return attention["implementation"]


def allocator_setting(environ: Mapping[str, str], torch_version: tuple[int, int]) -> dict:
    """The caching-allocator setting both stacks run with, for the case process to put in its
    environment before it imports torch: the user's (PYTORCH_ALLOC_CONF, else PYTORCH_CUDA_ALLOC_CONF),
    else expandable_segments:True, which unsloth_zoo sets at import when the user set none (and then
    keeps any setting it finds), so the hf stack gets it too. torch >= 2.10 reads PYTORCH_ALLOC_CONF
    (the CUDA name is deprecated there, and unsloth_zoo deletes it in its own process only); older torch
    reads PYTORCH_CUDA_ALLOC_CONF."""
    user = environ.get("PYTORCH_ALLOC_CONF") or environ.get("PYTORCH_CUDA_ALLOC_CONF")
    variable = "PYTORCH_ALLOC_CONF" if torch_version >= (2, 10) else "PYTORCH_CUDA_ALLOC_CONF"
    return {"variable": variable, "value": user or DEFAULT_ALLOCATOR_CONF, "source": "user" if user else "bench"}


def apply_allocator_setting(setting: dict, environ: MutableMapping[str, str]) -> None:
    environ[setting["variable"]] = setting["value"]
    if setting["variable"] == "PYTORCH_ALLOC_CONF":
        environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)


def model_route(case: Case) -> str:
    """Where the case's stack gets its model (one of ROUTES): "folder" (the embedded model or a local
    folder), a random checkpoint built once per run in the layout this stack loads ("split-bnb4",
    "bf16"), or "in-memory" (random weights created on the device inside the case process, no file)."""
    spec = RANDOM_MODELS.get(case.model)
    if spec is None:
        return "folder"
    if case.stack == "hf" and spec["hf"] == "in-memory":
        return "in-memory"
    return spec["checkpoint"]


def train_memory(record: dict, field: str) -> float | None:
    """A training-phase memory figure (memory.FIELDS) of a result line. Lines written before the
    load/train blocks (flat peak_* keys, NVML as peak_nvml_gib) read the same."""
    phase = (record.get("memory") or {}).get("train") or {}
    if phase.get(field) is not None:
        return phase[field]
    return record.get(field, record.get({"device_peak_gib": "peak_nvml_gib"}.get(field, ""), None))


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
        "load_gib": None, "memory": {"load": dict.fromkeys(FIELDS), "train": dict.fromkeys(FIELDS)},
        "step_times_s": [], "median_step_s": None, "tokens_per_step": None, "tokens_per_s": None,
        "flops_per_token": None, "mfu": None, "losses": [], "trainable_parameters": None, "adapter_dtypes": None,
        "loaded": None, "attention": None, "moe": None, "allocator": None,
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
                "loading), device peak = the device's used memory seen by NVML during training (whole device, "
                "CUDA context included), load = allocated after loading the model and adding LoRA. Both stacks "
                "ran with the allocator setting shown under 'What ran'. tokens/s = trained tokens "
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
                  "measured on cards of that size. Unsloth sizes its loss chunks (and offload buffers) from "
                  "torch.cuda.mem_get_info, which a per-process memory cap does not change: on a real card of "
                  "that size those chunks would be smaller.", ""]
        lines += budget_table(searched)
    lines += ["", "## What ran", ""] + compute_path_table(records)
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        lines += ["", "## Not measured", "", "Cases that did not train (OOM, timeout, error) or trained on other "
                  "weights than they asked for (invalid), and why; none of them has figures above.", ""]
        lines += failure_table(failed)
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
                "device peak", "load", "MFU", "trainable", "first losses"]
    else:
        head = ["setting", "stack", "status", "tokens/s", "median step s", "peak RSS", "load", "trainable",
                "first losses"]
    rows = []
    for r in records:
        if r["status"] != "ok":  # no figure of a case that did not train what it names ("Not measured" says why)
            rows.append([r["setting"], r["stack"], f"**{r['status']}**"] + ["—"] * (len(head) - 3))
            continue
        trainable = (r.get("trainable_parameters") or {}).get("trainable")
        losses = ", ".join(f"{x:.4f}" for x in r.get("losses", [])[:3]) or "—"
        cells = [r["setting"], r["stack"], "ok", fmt(r["tokens_per_s"], ",.0f"), fmt(r["median_step_s"], ".3f")]
        if gpu:
            cells += [fmt(train_memory(r, "peak_allocated_gib")), fmt(train_memory(r, "peak_reserved_gib")),
                      fmt(train_memory(r, "device_peak_gib")), fmt(r["load_gib"]),
                      "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"]
        else:
            cells += [fmt(train_memory(r, "peak_rss_gib")), fmt(r["load_gib"])]
        cells += [fmt(trainable, ",d"), losses]
        rows.append(cells)
    return markdown_rows(head, rows)


def compute_path_table(records: list[dict]) -> list[str]:
    """Per case: what loaded, the attention and MoE path that ran, and the allocator setting."""
    head = ["setting", "stack", "weights loaded", "attention", "MoE path", "MoE backend", "allocator"]
    rows = []
    for r in records:
        moe = r.get("moe") or {}
        allocator = r.get("allocator") or {}
        rows.append([r["setting"], r["stack"], loaded_summary(r.get("loaded")),
                     attention_summary(r.get("attention")) or "—", moe.get("path") or "—",
                     moe.get("backend") or "—", f"{allocator.get('variable')}={allocator.get('value')}" if allocator else "—"])
    return markdown_rows(head, rows)


def loaded_summary(loaded: dict | None) -> str:
    """'nf4 11.3B, bfloat16 1.6B; expert weights 4-bit: 1536/1536' from describe_loaded's report."""
    if not loaded:
        return "—"
    text = parameters_text(loaded["parameters_by_dtype"])
    if loaded["expert_weights"]:
        text += f"; expert weights 4-bit: {loaded['expert_weights_4bit']}/{loaded['expert_weights']}"
    return text


def parameters_text(by_dtype: dict[str, int]) -> str:
    """{'nf4': 11_300_000_000, 'float32': 1_130_000} -> 'nf4 11.3B, float32 1.13M'."""
    return ", ".join(f"{name} {count / 1e9:.3g}B" if count >= 1e9 else f"{name} {count / 1e6:.3g}M"
                     for name, count in by_dtype.items())


def failure_table(records: list[dict]) -> list[str]:
    rows = [[r["setting"], r["stack"], r["status"], str(r.get("error") or "—").replace("|", "/")[:300]] for r in records]
    return markdown_rows(["setting", "stack", "status", "why"], rows)


def comparison_table(records: list[dict], gpu: bool) -> list[str]:
    memory = "peak reserved" if gpu else "peak RSS"
    head = ["setting", "tokens/s lowvram_ft / hf", f"{memory} lowvram_ft / hf", "trainable equal", "same data",
            "max |Δloss|"]
    rows = []
    for setting, pair in paired(records).items():
        ours, hf = pair.get("lowvram_ft"), pair.get("hf")
        if not ours or not hf or "invalid" in (ours["status"], hf["status"]):
            continue
        key = "peak_reserved_gib" if gpu else "peak_rss_gib"
        speed = ratio(ours["tokens_per_s"], hf["tokens_per_s"])
        mem = ratio(train_memory(ours, key), train_memory(hf, key))
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
            values = [chart_value(pairs[s].get(stack), key) for s in settings]
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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, png.getvalue())


def chart_value(record: dict | None, key: str) -> float:
    """A bar's height: 0 for a missing, failed or invalid case (annotated with its status instead)."""
    if not record or record["status"] != "ok":
        return 0.0
    value = record.get(key) if key == "tokens_per_s" else train_memory(record, key)
    return value or 0.0


def write_results(records: list[dict], env: dict, out_dir: Path, stem: str) -> Path:
    """<stem>.jsonl (one line per case, environment included), <stem>.md and <stem>.png, atomically.
    Lines already in today's <stem>.jsonl are kept unless this run measured the same case again, so a
    matrix can be run in parts (--cases) into one file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{stem}.jsonl"
    records = merge_records(read_jsonl(jsonl), [{**r, "environment": env} for r in records])
    write_jsonl(jsonl, records)
    write_atomic(out_dir / f"{stem}.md", markdown_report(records, env))
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
    config = case_config(case)
    active = active_parameters(config)
    if active is not None:
        record["flops_per_token"] = training_flops_per_token(active, case.seq_len, attention_layers(config))
    if device["kind"] == "cuda":
        record["mfu"] = model_flops_utilization(record["tokens_per_s"], record["flops_per_token"],
                                                peak_bf16_flops(device["name"]))
    return record


def model_config(model_path: str) -> dict:
    """A folder's config.json ({} without one; "" is a model built in memory)."""
    if not model_path:
        return {}
    return read_json(Path(model_path) / "config.json") or {}


def case_config(case: Case) -> dict:
    """config.json of the case's model: a random model's shape (whichever way its stack gets it), else
    its folder's."""
    if case.model in RANDOM_MODELS:
        return random_model_config(case.model)
    return model_config(case.model_path)


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

        config = case_config(case)
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
             fmt(train_memory(r, "peak_reserved_gib" if gpu else "peak_rss_gib")),
             fmt((r.get("trainable_parameters") or {}).get("trainable"), ",d")] for r in records]
    title = f"benchmark — {device['name']}" + ("" if gpu else " (CPU figures; GPU figures need a GPU)")
    print_table(["setting", "stack", "status", "tokens/s", memory, "trainable"], rows, title, console)


def one_line(record: dict, device: dict) -> str:
    if record["status"] != "ok":
        return f"{record['status']}: {str(record['error'])[:200]}"
    memory = (f"peak reserved {fmt(train_memory(record, 'peak_reserved_gib'))} GiB" if device["kind"] == "cuda"
              else f"peak RSS {fmt(train_memory(record, 'peak_rss_gib'))} GiB")
    ran = ", ".join(filter(None, [attention_summary(record.get("attention")), (record.get("moe") or {}).get("path")]))
    return f"ok, {fmt(record['tokens_per_s'], ',.0f')} tokens/s, {memory}" + (f" ({ran})" if ran else "")


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
    """Local folders of the models cases load: the embedded model, a user's folder, or a random-weight
    checkpoint in the layout the case's stack loads (model_route), built once per run on the GPU in a
    child process and removed afterwards unless it was cached before. A stack that builds its random
    model in memory needs no folder."""

    def __init__(self, device: dict, log_dir: Path, console):
        self.device, self.log_dir, self.console = device, log_dir, console
        self.paths: dict[tuple[str, str], str] = {}
        self.failed: dict[tuple[str, str], str] = {}
        self.built: list[Path] = []

    def path_for(self, case: Case) -> str:
        """The folder the case loads its model from, "" for a model built in memory; BenchError
        (remembered: a failed build is not retried per case)."""
        key = (case.model, model_route(case))
        if key in self.failed:
            raise BenchError(self.failed[key])
        if key not in self.paths:
            try:
                self.paths[key] = self.resolve(*key)
            except Exception as error:  # noqa: BLE001 — every case of this model becomes an error record
                self.failed[key] = f"{case.model}: {error}" if not isinstance(error, BenchError) else str(error)
                raise BenchError(self.failed[key]) from None
        return self.paths[key]

    def resolve(self, model: str, route: str) -> str:
        if route in ("in-memory", "split-bnb4", "bf16") and self.device["kind"] != "cuda":
            raise BenchError(f"{model}: random-weight models are built on the GPU; this machine has none")
        if route == "in-memory":
            return ""
        if route != "folder":
            return str(self.random_checkpoint(model, route))
        from .model import resolve_model_path

        path = resolve_model_path(model)
        if not Path(path).is_dir():
            raise BenchError(f"{model}: benchmark models are local folders, 'embedded' or one of "
                             f"{', '.join(RANDOM_MODELS)} — download Hub models first")
        return path

    def random_checkpoint(self, key: str, layout: str) -> Path:
        target = random_checkpoint_dir(key, layout)
        if (target / "config.json").is_file():
            return target
        log(self.console, f"building {key} ({RANDOM_MODELS[key]['about']}, {layout} layout) in {target} ...")
        log_file = self.log_dir / f"build-{key}-{layout}.log"
        code = run_process([sys.executable, "-m", "lowvram_ft.bench", "--build", key, "--layout", layout,
                            "--model-dir", str(target)], log_file, 3600)
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


def random_checkpoint_dir(model: str, layout: str) -> Path:
    """The cache folder of a random model's checkpoint. The layout is in the name, so a folder of another
    layout (the fused bf16 gpt-oss checkpoints of earlier versions) is never reused."""
    return random_models_dir() / f"random-{model.removesuffix('-random')}-{layout}"


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
    parser.add_argument("--layout", choices=("split-bnb4", "bf16"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(describe_device()))
    elif args.build:
        build_random_checkpoint(args.build, args.layout or RANDOM_MODELS[args.build]["checkpoint"], args.model_dir)
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
    write_atomic(result_file, json.dumps(record, default=str))
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


class Heartbeat:
    """MemoryMonitor's on_sample: writes the phase and its memory FIELDS so far (GiB) to a file about
    twice a second, so that a case killed mid-way still reports the memory it had reached."""

    def __init__(self, path: Path):
        self.path, self.phase = path, "start"

    def figures(self, monitor: MemoryMonitor) -> dict:
        return {"phase": self.phase, **peak_figures(monitor.gpu, monitor)}

    def __call__(self, monitor: MemoryMonitor) -> None:
        try:
            write_atomic(self.path, json.dumps(self.figures(monitor)))
        except OSError:
            pass


def measure_case(case: Case, heartbeat_file: Path) -> dict:
    """Load, wrap in LoRA and train one case; the raw figures (never raises for OOM or errors)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    allocator = allocator_setting(os.environ, installed_torch_version())
    apply_allocator_setting(allocator, os.environ)  # before torch is imported: it reads the setting once
    allocator["set_before_torch"] = "torch" not in sys.modules
    gpu = gpu_visible()
    heartbeat = Heartbeat(heartbeat_file)
    monitor = MemoryMonitor(gpu, on_sample=heartbeat).start()  # NVML baseline before CUDA is initialised
    record: dict[str, Any] = {"status": "error", "error": None}
    try:
        import_stack(case.stack)
        train_case(case, monitor, heartbeat, record)
    except BaseException as error:  # noqa: BLE001 — every failure becomes a record, the suite goes on
        traceback.print_exc()  # into the case's log
        record.update(status="OOM" if is_oom(error) else "error", error=f"{type(error).__name__}: {first_line(error)}",
                      memory_at_failure_gib=heartbeat.figures(monitor))  # before anything is freed
    finally:
        monitor.stop()
    record["allocator"] = {**allocator, "after_run": os.environ.get(allocator["variable"])}
    record["unsloth_imported"] = unsloth_imported()
    if case.stack == "hf" and record["unsloth_imported"]:
        record.update(status="error", error="unsloth was imported in the hf process: the comparison is void")
    return record


def installed_torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch, read from its metadata without importing it."""
    from importlib.metadata import version

    match = re.match(r"(\d+)\.(\d+)", version("torch"))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def import_stack(stack: str) -> None:
    """The stack's libraries, imported before anything is measured (so load memory is the model's):
    Unsloth first for ours (it patches transformers, trl and peft), never for hf."""
    if stack == "lowvram_ft":
        from .model import import_unsloth

        import_unsloth()
    import bitsandbytes  # noqa: F401  (describe_loaded; 8-bit optimizers)
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


def train_case(case: Case, monitor: MemoryMonitor, heartbeat: Heartbeat, record: dict) -> None:
    """The measurement proper, filling `record` as it goes (a failure keeps what was measured before
    it): budget and load (load phase: memory, what loaded), the check that it is what the case asked
    for, the data, training (train phase: memory, timings), and what ran."""
    import torch

    gpu = monitor.gpu
    model, tokenizer, device = load_phase(case, monitor, heartbeat, record)
    record.update(trainable_parameters=trainable_parameters(model), adapter_dtypes=adapter_dtypes(model))
    status, reason = classify_loaded(record["load_settings"]["requested_bits"], record["loaded"])
    if status != "ok":  # training it would measure another model than the case names
        record.update(status=status, error=reason, **compute_path(model, None))
        return
    dataset, record["tokens_per_step"], record["data_digest"] = benchmark_dataset(case, tokenizer, model)
    timer = make_step_timer(torch.cuda.synchronize if gpu else (lambda: None))
    expert_calls = PerExpertCalls(model)
    reset_peaks(gpu, monitor)  # the training phase's peaks start here, as in train runs (pipeline.train)
    heartbeat.phase = "train"
    make_trainer(case, model, tokenizer, dataset, device, timer).train()
    record["memory"]["train"] = peak_figures(gpu, monitor)
    record.update(step_times_s=[round(t, 6) for t in timer.step_times], losses=timer.losses, status="ok",
                  load_average=round(os.getloadavg()[0], 2), **compute_path(model, expert_calls))


def load_phase(case: Case, monitor: MemoryMonitor, heartbeat: Heartbeat, record: dict) -> tuple:
    """(model with LoRA, tokenizer, Device) after the budget and the load; adds to `record` the budget,
    the load phase's memory FIELDS (from the start of the process, as in train runs), what is held after
    loading (load_gib: allocated on GPU, RSS growth on CPU) and what loaded (describe_loaded)."""
    import torch

    gpu = monitor.gpu
    record["budget"] = apply_budget(case, monitor) if gpu else None
    read_rss = rss_reader()
    heartbeat.phase = "load"
    rss_before = read_rss()
    model, tokenizer, device, settings = load_stack(case, gpu)
    held = torch.cuda.memory_allocated() if gpu else read_rss() - rss_before
    record.update(load_settings=settings, load_gib=round(held / GIB, 3), loaded=describe_loaded(model),
                  memory={"load": peak_figures(gpu, monitor), "train": dict.fromkeys(FIELDS)})
    return model, tokenizer, device


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
        fraction = emulated_card_fraction(case.budget_gib, total, context)
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
        info["memory_fraction"] = round(fraction, 6)
    return info


def adapter_dtypes(model) -> dict[str, int]:
    """Trainable parameters per dtype (the LoRA adapters: float32 in both stacks)."""
    counts: dict[str, int] = {}
    for param in model.parameters():
        if param.requires_grad:
            name = str(param.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + param.numel()
    return counts


# --------------------------------------------------------------------------- what ran


class PerExpertCalls:
    """Counts the forward calls of a split MoE layout's per-expert modules (experts.gate_up_projs.<i>,
    experts.down_projs.<i>) through forward hooks: the per-expert loop calls each routed expert's
    module, the grouped path reads their weights and never calls them. No modules (fused experts, dense
    models): nothing is counted."""

    def __init__(self, model):
        self.calls = 0
        self.modules = [m for name, m in model.named_modules() if PER_EXPERT_MODULE.search(name)]
        for module in self.modules:
            module.register_forward_hook(self.count)

    def count(self, module, args, output) -> None:
        self.calls += 1


def compute_path(model, expert_calls: PerExpertCalls | None) -> dict:
    """The row's "attention" and "moe" facts (after training, so that every lazy choice is made)."""
    return {"attention": attention_path(model), "moe": moe_path(model, expert_calls)}


def attention_path(model) -> dict | None:
    """The attention implementation in the model's config, where the attention layers' forward comes
    from (Unsloth replaces gpt-oss's), and whether Unsloth's flex-attention-with-sinks forward is on."""
    attention = next((m for m in model.modules() if type(m).__name__.endswith("Attention")), None)
    if attention is None:
        return None
    forward = type(attention).forward
    info = {"implementation": getattr(model.config, "_attn_implementation", None),
            "forward": f"{forward.__module__}.{forward.__qualname__}",
            "unsloth_flex_attention": os.environ.get("UNSLOTH_ENABLE_FLEX_ATTENTION") == "1"}
    info["ran"] = attention_summary(info)
    return info


def moe_path(model, expert_calls: PerExpertCalls | None) -> dict | None:
    """The MoE experts' path (None for a dense model): the backend Unsloth selected (unsloth_zoo's
    select_moe_backend: grouped_mm / unsloth_triton / native_torch, from UNSLOTH_MOE_BACKEND and what
    this machine supports; None where unsloth_zoo's MoE utilities are not loaded, as in the hf stack or
    Unsloth's CPU backend), whether torch has a usable grouped_mm, transformers' experts dispatch, the
    experts' class and forward, and the per-expert module calls counted during training (None when the
    layout has no per-expert modules or nothing was trained); "path" sums them up (moe_path_summary)."""
    experts = experts_module(model)
    if experts is None:
        return None
    forward = type(experts).forward
    modules = (len(expert_calls.modules) if expert_calls is not None
               else sum(1 for name, _ in model.named_modules() if PER_EXPERT_MODULE.search(name)))
    info = {
        "backend": unsloth_moe_backend(),
        "backend_requested": os.environ.get("UNSLOTH_MOE_BACKEND"),
        "grouped_mm_available": grouped_mm_available(next(experts.parameters(), None)),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "experts_module": type(experts).__name__,
        "experts_forward": f"{forward.__module__}.{forward.__qualname__}",
        "per_expert_modules": modules,
        "per_expert_calls": expert_calls.calls if expert_calls is not None and modules else None,
    }
    info["path"] = moe_path_summary(info)
    return info


def experts_module(model):
    """The first MoE experts module (`...mlp.experts`), unwrapped from PEFT's layers (target_parameters
    wraps it once per expert parameter); None for a dense model."""
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            return module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return None


def unsloth_moe_backend() -> str | None:
    """unsloth_zoo's selected MoE backend, or None when its MoE utilities were never loaded here."""
    moe_utils = sys.modules.get("unsloth_zoo.temporary_patches.moe_utils")
    select = getattr(moe_utils, "select_moe_backend", None)
    if select is None:
        return None
    try:
        return select()
    except Exception:  # noqa: BLE001 — informational
        return None


def grouped_mm_available(param) -> bool:
    """Whether torch offers grouped_mm (torch.nn.functional.grouped_mm or torch._grouped_mm) for the
    device `param` is on: on CUDA, compute capability 8.0 or newer (transformers' rule for torch >= 2.9)."""
    import torch

    if not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if param is not None and param.device.type == "cuda":
        return torch.cuda.get_device_capability(param.device) >= (8, 0)
    return True


# --------------------------------------------------------------------------- the two stacks


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
    """(model with LoRA, tokenizer, Device, settings: how it was loaded, incl. requested_bits)."""
    if case.stack == "lowvram_ft":
        return load_lowvram_ft(case)
    return load_hf(case, gpu)


def load_lowvram_ft(case: Case):
    from . import model as models

    cfg = run_config(case)
    device = models.detect_device()
    model, tokenizer = models.load_model(cfg, device)
    model = models.add_lora(model, cfg)
    bits = models.load_bits(cfg, device)
    settings = {"requested_bits": bits, "weights": bits, "route": model_route(case),
                "gradient_checkpointing": cfg.model.gradient_checkpointing, "optimizer": case.optimizer,
                "device_reason": device.reason}
    return model, tokenizer, device, settings


def load_hf(case: Case, gpu: bool):
    """The plain Hugging Face recipe: no unsloth in this process."""
    import torch

    if model_route(case) == "in-memory":
        model = build_in_memory(random_model_config(case.model), case.dtype, "cuda" if gpu else "cpu", case.seed)
        tokenizer = load_gptoss_tokenizer()  # the tokenizer the lowvram_ft stack's checkpoint carries
        settings = {"requested_bits": "16bit", "weights": f"{case.dtype}, random, built in memory"}
    else:
        model, settings = load_hf_folder(case, gpu)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(case.model_path)
    model, experts = add_hf_lora(model, case)
    name = torch.cuda.get_device_properties(0).name if gpu else "cpu"
    device = Device("cuda" if gpu else "cpu", name, None, case.dtype == "bfloat16", f"hf stack: {case.dtype}")
    settings.update(route=model_route(case), attention=getattr(model.config, "_attn_implementation", None),
                    gradient_checkpointing="true", target_parameters=experts, optimizer=case.optimizer)
    return model, tokenizer, device, settings


def build_in_memory(config: dict, dtype: str, device: str, seed: int):
    """A random-weight model created directly on `device` from a config.json dict (no file): what the
    hf stack's bf16 recipe would load, without writing and reading 39 GiB. gpt-oss gets eager attention,
    as in the OpenAI cookbook; the cache is off for training."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": "eager"} if config.get("model_type") == "gpt_oss" else {}
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(config, use_cache=False), dtype=getattr(torch, dtype), **kwargs)
    return model


def hf_config(config: dict, **changes):
    """transformers' config object of a config.json dict."""
    from transformers import AutoConfig

    settings = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
    return AutoConfig.for_model(config["model_type"], **{**settings, **changes})


def load_hf_folder(case: Case, gpu: bool):
    """(model, settings) from a folder: gpt-oss in bf16 (MXFP4 dequantized) with eager attention, other
    models 4-bit NF4 on GPU (the QLoRA recipe quantizes while loading)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(case.model_path)
    gpt_oss = config.get("model_type") == "gpt_oss"
    kwargs: dict[str, Any] = {"dtype": getattr(torch, case.dtype), "use_cache": False}
    weights = case.dtype
    if gpt_oss:
        kwargs["attn_implementation"] = "eager"  # the OpenAI cookbook's setting (attention sinks)
        if (config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
            from transformers import Mxfp4Config

            kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
            weights = "mxfp4-dequantized-bf16"
    elif gpu:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        weights = "4bit-nf4-double-quant"
    if gpu:
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(case.model_path, **kwargs)
    return model, {"requested_bits": "4bit" if weights.startswith("4bit") else "16bit", "weights": weights}


def add_hf_lora(model, case: Case):
    """(PEFT model, expert target_parameters): LoRA on the case's modules and, through target_parameters,
    on fused expert weights. Adapters in float32 as Unsloth keeps them: autocast_adapter_dtype=True (PEFT's
    default, made explicit) upcasts bf16 / fp16 adapters to float32."""
    import torch
    from peft import LoraConfig, get_peft_model

    experts = expert_target_parameters(model, list(case.lora_targets))
    lora = LoraConfig(r=case.lora_r, lora_alpha=case.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(case.lora_targets), task_type="CAUSAL_LM",
                      **({"target_parameters": experts} if experts else {}))
    torch.manual_seed(case.seed)  # the same seed Unsloth sets before get_peft_model: identical LoRA init
    return get_peft_model(model, lora, autocast_adapter_dtype=True), experts


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


def build_random_checkpoint(model: str, layout: str, out_dir: Path) -> Path:
    """The random model's checkpoint in `layout` (the --build mode, run on the GPU in a child process):
    "split-bnb4" through gptoss_checkpoint.build_split_checkpoint, "bf16" through build_random_model."""
    config = random_model_config(model)
    if layout == "split-bnb4":
        return build_split_checkpoint(config, out_dir, seed=0)
    return build_random_model(config, out_dir)


def build_random_model(config: dict, out_dir: Path, device: str | None = None) -> Path:
    """Save a random-weight checkpoint (bf16 safetensors, created directly on the device) with the
    offline o200k_harmony tokenizer, atomically (built in a sibling folder, then renamed)."""
    import shutil

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model = build_in_memory(config, "bfloat16", device, seed=0)
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
