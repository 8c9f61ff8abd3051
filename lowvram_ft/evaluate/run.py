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

from .. import folders
from ..config import Config, EvalConfig, load_config
from ..conversation import Conversation, Message
from ..data import load_data, tokenize_data
from ..device import detect_device
from ..errors import UserError
from ..harmony import HarmonyOptions
from ..io import write_atomic, write_json
from ..model import import_unsloth, input_device, load_model
from . import report
from .generation import attach_adapter, generate, parse_output, prompt_text, ready_for_generation, uses_harmony
from .languages import TRAINED, ZERO_SHOT, language_groups, training_languages
from .scoring import normalize_language, score_sample
from .statistics import aggregate, compare

SUITE = Path(__file__).parents[1] / "assets" / "eval_prompts.yaml"


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
    languages: list[str]  # which languages to ask, in order (trained / zero-shot comes from the run's data)
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
    # A suite written before `languages:` lists trained_languages / zero_shot_languages: asked, as their union.
    asked = [str(x) for key in ("languages", "trained_languages", "zero_shot_languages") for x in data.get(key) or []]
    return Suite(prompts, list(dict.fromkeys(asked)), [str(s) for s in data.get("smoke") or []])


def build_cases(suite: Suite, languages: list[str], samples: int, smoke: bool = False) -> list[Case]:
    """Every prompt × target language × sample, in a fixed order (the order seeds follow)."""
    prompts = [p for p in suite.prompts if p["id"] in suite.smoke] if smoke and suite.smoke else suite.prompts
    return [Case(p["id"], p["category"], p["text"], lang, s)
            for lang in languages for p in prompts for s in range(samples)]


def target_languages(cfg: EvalConfig, suite: Suite) -> list[str]:
    return list(cfg.languages) or list(suite.languages)


def language_labels(asked: list[str], trained: list[str] | None, source: str) -> dict:
    """What eval.json records about trained vs zero-shot: the run's training languages (None: no run,
    trained unknown), the asked ones it did not train (None likewise), each asked language's group
    and where the labels came from."""
    groups = language_groups(asked, trained)
    return {"trained_languages": trained,
            "zero_shot_languages": None if trained is None else [c for c, g in groups.items() if g == ZERO_SHOT],
            "language_groups": groups, "labels_from": source}


def run_training_languages(run_dir: Path | None) -> tuple[list[str] | None, str]:
    """(the training languages of a run folder, from its summary.json, where they came from); None
    (trained: unknown) without a run folder or a summary.json (an unfinished run)."""
    if run_dir is None:
        return None, "no run (pass --run RUN_DIR to label trained / zero-shot languages)"
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None, f"{path} not found (an unfinished run?)"
    try:
        counts = json.loads(path.read_text(encoding="utf-8"))["data"]["rows"]["reasoning_languages"]
    except (ValueError, KeyError, TypeError):
        raise EvalError(f"{path}: no data.rows.reasoning_languages to label trained / zero-shot languages — "
                        "pass the folder of a finished train run, or re-run its training") from None
    return training_languages(counts), f"{path}: data.rows.reasoning_languages"


def case_conversation(case: Case) -> Conversation:
    return Conversation(messages=(Message("user", case.user),), reasoning_language=case.target_language)


def render_prompts(cases: list[Case], tokenizer, cfg: Config) -> list[str]:
    """The generation prompt of each case, by the same renderer that formats training data."""
    options = HarmonyOptions(reasoning_effort=cfg.data.reasoning_effort, date=cfg.data.date)
    return [prompt_text(case_conversation(c), tokenizer, options) for c in cases]


# --------------------------------------------------------------------------- perplexity


def perplexity(model, tokenizer, conversations: list, cfg: Config) -> float | None:
    """exp(mean NLL) over the trained tokens of held-out rows; None without held-out rows."""
    import torch

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


def evaluate_model(model, tokenizer, cfg: Config, run_dir: Path, *, trained_languages: list[str] | None,
                   labels_from: str = "", heldout=None, console=None, smoke: bool = False,
                   has_adapter: bool = True) -> dict:
    """Base vs tuned on the same prompts; writes eval.json, eval.md, eval.png, eval_samples.jsonl.
    trained_languages: the languages the run's training rows reason in (`training_languages`); every
    other asked language is zero-shot. None = no run to tell: trained unknown, no pooled rows."""
    import time

    import_unsloth()
    suite = load_suite(cfg.eval.prompts)
    languages = target_languages(cfg.eval, suite)
    cases = build_cases(suite, languages, cfg.eval.samples_per_prompt, smoke=smoke)
    prompts = render_prompts(cases, tokenizer, cfg)
    ready_for_generation(model)
    started = time.perf_counter()
    phases = {}
    if has_adapter:
        with model.disable_adapter():
            phases["before"] = evaluate_phase(model, tokenizer, cases, prompts, cfg, "before", heldout)
        phases["after"] = evaluate_phase(model, tokenizer, cases, prompts, cfg, "after", heldout)
    else:
        phases["before"] = evaluate_phase(model, tokenizer, cases, prompts, cfg, "before", heldout)
    labels = language_labels(languages, trained_languages, labels_from)
    pooled = {name: None if trained_languages is None else [c for c, g in labels["language_groups"].items() if g == name]
              for name in (TRAINED, ZERO_SHOT)}
    tables = {phase: aggregate(samples, trained=pooled[TRAINED], zero_shot=pooled[ZERO_SHOT])
              for phase, (samples, _) in phases.items()}
    result = {
        "settings": {"languages": languages, "prompts": len({c.prompt_id for c in cases}),
                     "samples_per_prompt": cfg.eval.samples_per_prompt, "max_new_tokens": cfg.eval.max_new_tokens,
                     "greedy": cfg.eval.greedy or cfg.eval.temperature == 0, "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p,
                     "top_k": cfg.eval.top_k, "reasoning_effort": cfg.data.reasoning_effort,
                     "seed": cfg.train.seed, "answer_in": cfg.eval.answer_in, "smoke": smoke},
        **labels,
        "perplexity": {phase: ppl for phase, (_, ppl) in phases.items()},
        "tables": tables,
        "comparison": compare(tables["before"], tables["after"]) if "after" in tables else None,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    write_eval(run_dir, result, [s for samples, _ in phases.values() for s in samples])
    report.print_eval(result, console)
    return result


def write_eval(run_dir: Path, result: dict, samples: list[dict]) -> None:

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


def run_eval(cfg: Config, adapter: str | None, out_dir: Path, smoke: bool = False, console=None,
             run_dir: Path | None = None) -> dict:
    """Load the model once (plus the adapter, if any) and evaluate base vs tuned into out_dir; trained /
    zero-shot languages from run_dir's summary.json (without one: trained unknown)."""
    import dataclasses

    if smoke:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(
            cfg.eval, max_new_tokens=min(cfg.eval.max_new_tokens, SMOKE_MAX_NEW_TOKENS), **SMOKE_OVERRIDES))
    trained, labels_from = run_training_languages(run_dir)
    with folders.hold(out_dir, "evaluating"):  # not while another process trains or evaluates there
        import_unsloth()
        device = detect_device()
        model, tokenizer = load_model(cfg, device)
        if adapter:
            model = attach_adapter(model, adapter)
        heldout = heldout_rows(cfg, load_data)
        return evaluate_model(model, tokenizer, cfg, out_dir, trained_languages=trained, labels_from=labels_from,
                              heldout=heldout, console=console, smoke=smoke, has_adapter=bool(adapter))


def heldout_rows(cfg: Config, load_data) -> list:
    """Held-out rows for perplexity: the run's held-out split, or the shipped held-out sample file."""
    try:
        data = load_data(cfg)
    except Exception:  # noqa: BLE001 — perplexity is a sanity check; unreadable data only skips it
        return []
    return list(data.heldout)


def run_config(run_dir: Path, overrides: list[str]) -> Config:
    """The resolved config a run was trained with, plus overrides."""

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise EvalError(f"{run_dir}: not a run folder (no config.yaml) — pass the --output folder of a train run")
    return load_config(path, overrides)
