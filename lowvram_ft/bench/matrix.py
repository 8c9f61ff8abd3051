"""The case matrix: what one bench case is (`Case`), the YAML matrices that list them (shipped in
lowvram_ft/bench/cases/, or a user's file), the budget searches, and where a case gets its model.
Plain values in, plain values out: nothing here imports torch."""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import load_config
from ..errors import UserError
from ..plan import MODEL_CONFIG_DIR

STACKS = ("lowvram_ft", "hf")
# The shipped matrices are package data, so an installed `bench` finds its defaults too.
CASES_DIR = Path(__file__).resolve().parent / "cases"
DEFAULT_MATRIX = {"cpu": CASES_DIR / "cpu.yaml", "cuda": CASES_DIR / "gpu.yaml"}

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
        raise BenchError(f"{path}: no such case matrix — pass --config a case matrix such as {CASES_DIR / 'cpu.yaml'}")
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
                         f" — fix the file, or start from one in {CASES_DIR}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        shown = "a list" if isinstance(data, list) else repr(data)
        raise BenchError(f"{p}: the top level is {shown}; it must be a mapping with the keys device, defaults, "
                         f"cases, budgets — see {CASES_DIR / 'cpu.yaml'}")
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


def random_model_config(key: str) -> dict:
    """config.json of a random-weight model: the bundled shape, unquantized bf16, with its changes."""
    spec = RANDOM_MODELS[key]
    config = json.loads((MODEL_CONFIG_DIR / spec["config"]).read_text())
    config.pop("quantization_config", None)  # MXFP4 describes OpenAI's files, not random bf16 weights
    config.update(spec["changes"], torch_dtype="bfloat16", use_cache=False)
    return config


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


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_config(case: Case):
    """Our Config for this case (both stacks read their shared settings from it)."""
    return load_config(None, {
        "model": {"name": case.model_path, "max_seq_length": case.seq_len, "dtype": case.dtype},
        "lora": {"r": case.lora_r, "alpha": case.lora_alpha, "dropout": 0.0, "target_modules": list(case.lora_targets)},
        "train": {"batch_size": case.batch_size, "gradient_accumulation_steps": case.grad_accum,
                  "max_steps": case.steps, "warmup_steps": 0, "lr_scheduler": "constant",
                  "learning_rate": case.learning_rate, "optimizer": case.optimizer, "seed": case.seed,
                  "logging_steps": 1, "max_grad_norm": 1.0},
        "eval": {"enabled": False},
    })
