"""Before/after reasoning-language evaluation: prompts → generations → scores → report.

Base (adapter disabled) and tuned (adapter enabled) are the same loaded model, asked the same prompts
with the same sampling settings, reasoning effort and seeds. Scoring is `scoring.py` (offline,
per sentence); a perplexity check on held-out rows catches a broken evaluation (e.g. a model that
generates fluent text without a causal mask).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError
from .config import Config, EvalConfig
from .conversation import Conversation, Message
from .data import chat_messages, no_chat_template, render_chat
from .io import write_atomic, write_json
from .model import input_device

SUITE = Path(__file__).parent / "assets" / "eval_prompts.yaml"
GENERATION_BATCH = 16  # prompts per generate() call: bounded so eager-attention generation stays small


class EvalError(UserError, RuntimeError):
    """A prompt suite or run folder that cannot be evaluated; one line that says what to do."""


@dataclass(frozen=True)
class Case:
    """One prompt asked in one target language (one sample of it)."""

    prompt_id: str
    category: str
    user: str
    target_language: str
    sample: int


@dataclass(frozen=True)
class Suite:
    prompts: list[dict]
    trained_languages: list[str]
    zero_shot_languages: list[str]
    smoke: list[str]


def load_suite(path: str | None = None) -> Suite:
    """The prompt suite YAML (default: the shipped one)."""
    import yaml

    p = Path(path) if path else SUITE
    if not p.is_file():
        raise EvalError(f"{p}: prompt suite not found — pass eval.prompts=FILE.yaml or leave it empty for the shipped suite")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    prompts = []
    for i, item in enumerate(data.get("prompts") or []):
        text = next((item.get(k) for k in ("text", "prompt", "user", "question") if item.get(k)), None)
        if not isinstance(text, str):
            raise EvalError(f"{p}: prompts[{i}]: needs a text field (text/prompt/user) — add the question text")
        prompts.append({"id": str(item.get("id", f"p{i}")), "category": str(item.get("category", "other")), "text": text})
    if not prompts:
        raise EvalError(f"{p}: no prompts — add a `prompts:` list")
    return Suite(prompts, list(data.get("trained_languages") or []), list(data.get("zero_shot_languages") or []),
                 [str(s) for s in data.get("smoke") or []])


def build_cases(suite: Suite, languages: list[str], samples: int, smoke: bool = False) -> list[Case]:
    """Every prompt × target language × sample, in a fixed order (the order seeds follow)."""
    prompts = [p for p in suite.prompts if p["id"] in suite.smoke] if smoke and suite.smoke else suite.prompts
    return [Case(p["id"], p["category"], p["text"], lang, s)
            for lang in languages for p in prompts for s in range(samples)]


def target_languages(cfg: EvalConfig, suite: Suite) -> list[str]:
    return list(cfg.languages) or suite.trained_languages + suite.zero_shot_languages


def case_conversation(case: Case) -> Conversation:
    return Conversation(messages=(Message("user", case.user),), reasoning_language=case.target_language)


# --------------------------------------------------------------------------- prompts and generation


def uses_harmony(tokenizer) -> bool:
    """gpt-oss-style tokenizers carry the Harmony control tokens; others use their own chat template."""
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in ("<|start|>", "<|channel|>", "<|message|>"))


def render_prompts(cases: list[Case], tokenizer, cfg: Config) -> list[str]:
    """The generation prompt of each case, by the same renderer that formats training data."""
    if uses_harmony(tokenizer):
        from .harmony import HarmonyOptions, render_prompt

        opts = HarmonyOptions(reasoning_effort=cfg.data.reasoning_effort, date=cfg.data.date)
        return [render_prompt(case_conversation(c), opts) for c in cases]
    if not getattr(tokenizer, "chat_template", None):
        raise EvalError(no_chat_template(tokenizer))
    return [render_chat(tokenizer, chat_messages(case_conversation(c)), True) for c in cases]


def stop_token_ids(tokenizer) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in ("<|return|>", "<|call|>") if t in vocab]
    return ids or [tokenizer.eos_token_id]


def generate(model, tokenizer, prompts: list[str], ev: EvalConfig, seed: int, streamer=None) -> list[dict]:
    """Completions (raw text with control tokens, whether a stop token ended them, new-token count).
    Batch b is sampled under seed + b, so two calls with the same prompts and seed draw alike.
    `streamer` (transformers' BaseStreamer interface, one prompt) receives the tokens as they come."""
    import torch

    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    tokenizer.padding_side = "left"
    device = input_device(model)
    results = []
    for b in range(0, len(prompts), GENERATION_BATCH):
        batch = tokenizer(prompts[b:b + GENERATION_BATCH], add_special_tokens=False, padding=True, return_tensors="pt")
        torch.manual_seed(seed + b)
        with torch.inference_mode():
            out = model.generate(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=ev.max_new_tokens, **sampling_kwargs(ev),
                eos_token_id=stops, pad_token_id=pad, streamer=streamer,
            )
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            results.append(cut_at_stop(row, stops, pad, tokenizer))
    return results


def sampling_kwargs(ev: EvalConfig) -> dict:
    """The sampling settings as generate() keyword arguments. Temperature 0 is greedy decoding (the
    limit of sampling as the temperature falls), which transformers wants as do_sample=False."""
    if ev.greedy or ev.temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": ev.temperature, "top_p": ev.top_p, "top_k": ev.top_k}


def cut_at_stop(ids: list[int], stops: list[int], pad: int, tokenizer) -> dict:
    """Decode new tokens up to and including the first stop token (padding after it removed)."""
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    kept = ids[: end + 1] if end is not None else [t for t in ids if t != pad] if pad not in stops else ids
    return {"completion": tokenizer.decode(kept, skip_special_tokens=False), "stopped": end is not None,
            "new_tokens": len(kept)}


def parse_output(text: str, stopped: bool, harmony: bool):
    """Split a completion into analysis and final: Harmony channels, or <think> tags for other models
    (Qwen3, DeepSeek-R1: `<think>reasoning</think>answer`; the opening tag may sit in the prompt).
    A completion still inside <think> is truncated when the token limit cut it, unparsed when the
    model ended its turn there without an answer; one without tags is an answer without reasoning."""
    from .scoring import Parsed, parse_completion

    if harmony:
        return parse_completion(text, stopped=not stopped)
    body = text
    for tail in ("<|im_end|>", "<|eot_id|>", "</s>", "<|endoftext|>"):
        body = body.replace(tail, "")
    if "</think>" in body:
        analysis, _, final = body.partition("</think>")
        return Parsed(analysis.replace("<think>", "").strip(), final.strip(), True, not stopped)
    if body.lstrip().startswith("<think>"):
        return Parsed(body.lstrip()[len("<think>"):].strip(), None, not stopped, not stopped)
    return Parsed(None, body.strip(), True, not stopped)


# --------------------------------------------------------------------------- perplexity


def perplexity(model, tokenizer, conversations: list, cfg: Config) -> float | None:
    """exp(mean NLL) over the trained tokens of held-out rows; None without held-out rows."""
    import torch

    from .data import tokenize_data

    rows = conversations[: cfg.eval.perplexity_rows]
    if not rows:
        return None
    dataset = tokenize_data(rows, tokenizer, cfg).dataset
    device = input_device(model)
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for example in dataset:
            ids = torch.tensor([example["input_ids"]], device=device)
            labels = torch.tensor([example["labels"]], device=device)
            logits = model(input_ids=ids).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            mask = shift_labels != -100
            if not mask.any():
                continue
            nll = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
            total_nll += float(nll)
            total_tokens += int(mask.sum())
    return math.exp(total_nll / total_tokens) if total_tokens else None


# --------------------------------------------------------------------------- the evaluation


def score_generations(cases: list[Case], generations: list[dict], harmony: bool, cfg: Config,
                      phase: str) -> list[dict]:
    from .scoring import normalize_language, score_sample

    samples = []
    for case, gen in zip(cases, generations):
        parsed = parse_output(gen["completion"], gen["stopped"], harmony)
        scores = score_sample(case.target_language, parsed=parsed, user_language="en", answer_in=cfg.eval.answer_in)
        samples.append({"phase": phase, **asdict(case), "target_language": normalize_language(case.target_language),
                        **gen, "analysis": parsed.analysis, "final": parsed.final, **scores})
    return samples


def evaluate_phase(model, tokenizer, cases, prompts, cfg: Config, phase: str, heldout) -> tuple[list[dict], float | None]:
    generations = generate(model, tokenizer, prompts, cfg.eval, seed=cfg.train.seed)
    samples = score_generations(cases, generations, uses_harmony(tokenizer), cfg, phase)
    return samples, perplexity(model, tokenizer, heldout or [], cfg)


def evaluate_model(model, tokenizer, cfg: Config, run_dir: Path, heldout=None, console=None,
                   smoke: bool = False, has_adapter: bool = True) -> dict:
    """Base vs tuned on the same prompts; writes eval.json, eval.md, eval.png, eval_samples.jsonl."""
    import time

    from . import report
    from .model import import_unsloth
    from .statistics import aggregate, compare

    unsloth = import_unsloth()
    suite = load_suite(cfg.eval.prompts)
    languages = target_languages(cfg.eval, suite)
    cases = build_cases(suite, languages, cfg.eval.samples_per_prompt, smoke=smoke)
    prompts = render_prompts(cases, tokenizer, cfg)
    unsloth.FastLanguageModel.for_inference(model)
    # TRL turns router logits on to train with the MoE auxiliary loss; generation must not compute it.
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = False
    started = time.perf_counter()
    phases = {}
    if has_adapter:
        with model.disable_adapter():
            phases["before"] = evaluate_phase(model, tokenizer, cases, prompts, cfg, "before", heldout)
        phases["after"] = evaluate_phase(model, tokenizer, cases, prompts, cfg, "after", heldout)
    else:
        phases["before"] = evaluate_phase(model, tokenizer, cases, prompts, cfg, "before", heldout)
    tables = {phase: aggregate([s for s in samples], trained=suite.trained_languages,
                               zero_shot=suite.zero_shot_languages) for phase, (samples, _) in phases.items()}
    result = {
        "settings": {"languages": languages, "prompts": len({c.prompt_id for c in cases}),
                     "samples_per_prompt": cfg.eval.samples_per_prompt, "max_new_tokens": cfg.eval.max_new_tokens,
                     "greedy": cfg.eval.greedy or cfg.eval.temperature == 0, "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p,
                     "top_k": cfg.eval.top_k, "reasoning_effort": cfg.data.reasoning_effort,
                     "seed": cfg.train.seed, "answer_in": cfg.eval.answer_in, "smoke": smoke},
        "trained_languages": suite.trained_languages,
        "zero_shot_languages": suite.zero_shot_languages,
        "perplexity": {phase: ppl for phase, (_, ppl) in phases.items()},
        "tables": tables,
        "comparison": compare(tables["before"], tables["after"]) if "after" in tables else None,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    write_eval(run_dir, result, [s for samples, _ in phases.values() for s in samples])
    report.print_eval(result, console)
    return result


def write_eval(run_dir: Path, result: dict, samples: list[dict]) -> None:
    from . import report

    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "eval_samples.jsonl",
                      "".join(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in samples))
    write_json(run_dir / "eval.json", result)
    charted = report.eval_chart(result, run_dir / "eval.png")
    write_atomic(run_dir / "eval.md", report.eval_markdown(result) + (
        "" if charted else "\n(no eval.png: charts need matplotlib — pip install 'lowvram_ft[bench]')\n"))


# --------------------------------------------------------------------------- the eval / smoke commands

SMOKE_OVERRIDES = {"samples_per_prompt": 1, "perplexity_rows": 8}
SMOKE_MAX_NEW_TOKENS = 256  # short, but room for a brief analysis + answer (truncated samples do not score)


def run_eval(cfg: Config, adapter: str | None, out_dir: Path, smoke: bool = False, console=None) -> dict:
    """Load the model once (plus the adapter, if any) and evaluate base vs tuned into out_dir."""
    import dataclasses

    from .data import load_data
    from .device import detect_device
    from .model import import_unsloth, load_model

    if smoke:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(
            cfg.eval, max_new_tokens=min(cfg.eval.max_new_tokens, SMOKE_MAX_NEW_TOKENS), **SMOKE_OVERRIDES))
    import_unsloth()
    device = detect_device()
    model, tokenizer = load_model(cfg, device)
    if adapter:
        model = attach_adapter(model, adapter)
    heldout = heldout_rows(cfg, load_data)
    return evaluate_model(model, tokenizer, cfg, out_dir, heldout=heldout, console=console, smoke=smoke,
                          has_adapter=bool(adapter))


def attach_adapter(model, adapter: str):
    """The saved LoRA adapter on top of the loaded base model (disable_adapter() gives the base back)."""
    from peft import PeftModel

    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise EvalError(f"{adapter}: no adapter_config.json — pass the run's adapter folder (RUN/adapter) or --run RUN")
    return PeftModel.from_pretrained(model, str(path), is_trainable=False)


def heldout_rows(cfg: Config, load_data) -> list:
    """Held-out rows for perplexity: the run's held-out split, or the shipped held-out sample file."""
    try:
        data = load_data(cfg)
    except Exception:  # noqa: BLE001 — perplexity is a sanity check; unreadable data only skips it
        return []
    return list(data.heldout)


def run_config(run_dir: Path, overrides: list[str]) -> Config:
    """The resolved config a run was trained with, plus overrides."""
    from .config import load_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise EvalError(f"{run_dir}: not a run folder (no config.yaml) — pass the --output folder of a train run")
    return load_config(path, overrides)
