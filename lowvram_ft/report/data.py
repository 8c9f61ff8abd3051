"""The page's data: what a run folder already holds (summary.json, metrics.jsonl, eval.json,
eval_samples.jsonl, config.yaml) read into one plain structure. Files in, a dict out; no model, no
torch, no markup (render.py lays it out). A file that is missing leaves its part of the page empty
and is named in `missing`; a file that is there but unreadable is an error naming it."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..config import diff
from ..errors import UserError
from ..evaluate.languages import normalize_language
from .drift import drift_items, language_name

# What a run folder may hold, in the order the page lists it.
RUN_FILES = ("summary.json", "metrics.jsonl", "config.yaml", "eval.json", "eval.md", "eval.png", "eval_samples.jsonl")
STEP_SERIES = (  # metrics.jsonl column -> chart title and unit
    ("loss", "training loss", ""),
    ("learning_rate", "learning rate", ""),
    ("tokens_per_s", "throughput (trained tokens/s)", "tokens/s"),
    ("peak_memory_gib", "peak memory (GiB)", "GiB"),
)
REWARD_COLUMN = re.compile(r"^rewards/(.+)/mean$")  # GRPO: one mean per reward function and logging step
REWARD_TOTALS = (("reward", "reward (all functions, weighted)"), ("kl", "KL divergence to the reference"),
                 ("completions/mean_length", "completion length (tokens)"))  # GRPO's other step figures
PHASE_TITLES = {"before": "base (adapter off)", "after": "tuned (adapter on)"}
POOLED_GROUPS = ("trained", "zero-shot", "overall")


class ReportError(UserError, ValueError):
    """A run folder the report cannot be built from; one line: where, what, what to do."""


def build_report_data(run_folder: str | os.PathLike) -> dict:
    """Everything the run's page shows, as plain values (see the module docstring)."""
    run = Path(run_folder)
    if not run.is_dir():
        raise ReportError(f"{run}: not a folder — pass the --output folder of a train or eval run")
    summary = read_json(run / "summary.json")
    evaluation = read_json(run / "eval.json")
    metrics = read_jsonl(run / "metrics.jsonl")
    samples = read_jsonl(run / "eval_samples.jsonl")
    if summary is None and evaluation is None and metrics is None:
        raise ReportError(f"{run}: no summary.json, eval.json or metrics.jsonl — pass the --output folder of a "
                          "train or eval run")
    config_text = read_text(run / "config.yaml")
    training = training_figures(summary or {}, metrics or [])
    return {
        "name": run_name(run, config_text),
        "missing": [name for name in RUN_FILES if name != "eval.png" and not (run / name).exists()],
        "command": reproduce_command(config_text),
        "config_yaml": config_text,
        "environment": environment(summary or {}),
        "data": data_statistics(summary or {}),
        "training": training,
        "series": step_series(metrics or [], training["planned_peak_gib"]),
        "rewards": reward_series(metrics or []),
        "evaluation": evaluation_rows(evaluation) if evaluation else None,
        "samples": samples or [],
        "files": run_files(run),
    }


# --------------------------------------------------------------------------- reading


def read_text(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ReportError(f"{path}: cannot read it ({error}) — check the file, or delete it and re-run") from None


def read_json(path: Path):
    text = read_text(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}:{e.lineno}: not valid JSON ({e.msg}) — the file is damaged; re-run the "
                          "command that wrote it") from None


def read_jsonl(path: Path) -> list[dict] | None:
    """One object per line; a last line cut off by a killed run is left out (the rest is good)."""
    text = read_text(path)
    if text is None:
        return None
    lines = text.splitlines()
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                break
            raise ReportError(f"{path}:{lineno}: not valid JSON ({e.msg}) — the file is damaged; re-run the "
                              "command that wrote it") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def run_name(run: Path, config_text: str | None) -> str:
    """The run as the user named it (output.dir in config.yaml), else the folder's own name."""
    named = (parse_yaml(config_text).get("output") or {}).get("dir")
    return str(named) if named else run.resolve().name


def reproduce_command(config_text: str | None) -> str | None:
    if not config_text:
        return None
    return "python -m lowvram_ft train --config config.yaml --output NEW_FOLDER   # run from this folder"


# --------------------------------------------------------------------------- summary.json


def environment(summary: dict) -> dict:
    device = summary.get("device") or {}
    return {
        "model": summary.get("model"),
        "device": device.get("name"),
        "device_kind": device.get("kind"),
        "device_memory_gib": device.get("total_gib"),
        "device_reason": device.get("reason"),
        "dtype": summary.get("dtype"),
        "compute_dtype": summary.get("compute_dtype"),
        "processes": summary.get("processes"),
        "packing": summary.get("packing"),
        "versions": summary.get("versions") or {},
        "trainable_parameters": summary.get("trainable_parameters"),
    }


def data_statistics(summary: dict) -> dict:
    data = summary.get("data") or {}
    rows, tokens = data.get("rows") or {}, data.get("tokens") or {}
    return {
        "train_rows": rows.get("train_rows"),
        "heldout_rows": rows.get("heldout_rows"),
        "skipped_rows": rows.get("skipped_rows"),
        "shapes": rows.get("shapes") or {},
        "reasoning_languages": rows.get("reasoning_languages") or {},
        "sources": {name: {k: v for k, v in (source or {}).items() if k != "file"}
                    for name, source in (rows.get("sources") or {}).items()},
        "mixing": rows.get("mixing"),
        "tokens": {k: tokens.get(k) for k in ("rows", "min_tokens", "median_tokens", "max_tokens", "total_tokens",
                                               "trained_tokens", "trained_share", "truncated", "dropped")
                   if tokens.get(k) is not None},
    }


def training_figures(summary: dict, metrics: list[dict]) -> dict:
    """The run's headline figures; the planner's prediction beside the measured peak when the run
    recorded one (a GPU run whose plan was made)."""
    plan = summary.get("plan") or {}
    return {
        "steps": summary.get("steps", metrics[-1].get("step") if metrics else None),
        "first_loss": summary.get("first_loss"),
        "final_loss": summary.get("final_loss"),
        "trained_tokens": summary.get("trained_tokens"),
        "train_runtime_s": summary.get("train_runtime_s"),
        "wall_time_s": summary.get("wall_time_s"),
        "peak_memory_gib": summary.get("peak_memory_gib"),
        "peak_memory_kind": summary.get("peak_memory_kind"),
        "planned_peak_gib": plan.get("peak_gib", summary.get("predicted_peak_gib")),
        "plan_basis": plan.get("basis"),
    }


# --------------------------------------------------------------------------- metrics.jsonl


def step_series(metrics: list[dict], planned_peak_gib: float | None = None) -> list[dict]:
    """One series per STEP_SERIES column that has numbers: {key, title, unit, points [(step, value)]};
    peak memory carries the planner's estimate as its reference line when the run recorded one."""
    found = []
    for key, title, unit in STEP_SERIES:
        points = numeric_points(metrics, key)
        if points:
            reference = (planned_peak_gib, "planner's estimate") if key == "peak_memory_gib" and planned_peak_gib else None
            found.append({"key": key, "title": title, "unit": unit, "points": points, "reference": reference})
    return found


def reward_series(metrics: list[dict]) -> list[dict]:
    """One series per `rewards/<name>/mean` column (GRPO runs), in the order first seen, then the total
    reward, KL and completion length where the run logged them."""
    names: list[str] = []
    for record in metrics:
        for key in record:
            match = REWARD_COLUMN.match(key)
            if match and match.group(1) not in names:
                names.append(match.group(1))
    found = [{"key": name, "title": f"reward: {name}", "unit": "",
              "points": numeric_points(metrics, f"rewards/{name}/mean")} for name in names]
    if not found:
        return []
    totals = [{"key": key, "title": title, "unit": "", "points": numeric_points(metrics, key)} for key, title in REWARD_TOTALS]
    return found + [series for series in totals if series["points"]]


def numeric_points(metrics: list[dict], key: str) -> list[tuple[float, float]]:
    points = []
    for i, record in enumerate(metrics):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            points.append((record.get("step", i + 1), float(value)))
    return points


# --------------------------------------------------------------------------- eval.json


def evaluation_rows(evaluation: dict) -> dict:
    """Per language (its group: trained / zero-shot / unknown) and per pooled group, each phase's
    think and answer rates with their Wilson intervals, as eval.json holds them."""
    tables = evaluation.get("tables") or {}
    phases = [p for p in ("before", "after") if p in tables] + [p for p in tables if p not in ("before", "after")]
    by_phase = {phase: {str(r.get("group")): r for r in tables[phase]} for phase in phases}
    names = [g for phase in phases for g in by_phase[phase]]
    languages = [g for g in dict.fromkeys(names) if g not in POOLED_GROUPS]
    pooled = [g for g in POOLED_GROUPS if g in names]
    groups = language_groups(evaluation)
    return {
        "phases": [{"key": p, "title": PHASE_TITLES.get(p, p)} for p in phases],
        "settings": evaluation.get("settings") or {},
        "perplexity": evaluation.get("perplexity") or {},
        "rows": [evaluation_row(g, language_name(g), groups.get(g, "unknown"), by_phase, phases) for g in languages]
                + [evaluation_row(g, g, "pooled", by_phase, phases) for g in pooled],
    }


def language_groups(evaluation: dict) -> dict[str, str]:
    """code -> 'trained' / 'zero-shot' / 'unknown': eval.json's `language_groups` (the run's data decides,
    evaluate/run.py), else the trained_languages / zero_shot_languages lists of older eval.json files."""
    groups = {code_of(k): str(v) for k, v in (evaluation.get("language_groups") or {}).items()}
    for name, key in (("trained", "trained_languages"), ("zero-shot", "zero_shot_languages")):
        for language in evaluation.get(key) or []:
            groups.setdefault(code_of(language), name)
    return groups


def evaluation_row(group: str, name: str, kind: str, by_phase: dict, phases: list[str]) -> dict:
    cells = {}
    for phase in phases:
        row = by_phase[phase].get(group)
        cells[phase] = None if row is None else {
            "n": row.get("n"), "scorable": row.get("scorable"),
            "think": rate(row, "think"), "answer": rate(row, "answer"),
            "think_share": row.get("think_share_mean"),
        }
    return {"group": group, "name": name, "kind": kind, "phases": cells}


def rate(row: dict, metric: str) -> dict | None:
    n = row.get(f"{metric}_n")
    if not n:
        return None
    lo, hi = row.get(f"{metric}_ci") or (0.0, 1.0)
    return {"k": row.get(f"{metric}_match"), "n": n, "rate": row.get(f"{metric}_rate"), "ci": [lo, hi]}


def code_of(language: str) -> str:
    try:
        return normalize_language(str(language))
    except ValueError:
        return str(language)


# --------------------------------------------------------------------------- files


def run_files(run: Path) -> list[dict]:
    """The run folder's own entries (hidden ones and the report itself left out): name, whether a folder,
    size in bytes of a file."""
    entries = []
    for path in sorted(run.iterdir(), key=lambda p: (RUN_FILES.index(p.name) if p.name in RUN_FILES else len(RUN_FILES), p.name)):
        if path.name.startswith(".") or path.name == "report.html" or path.name.endswith(".html"):
            continue
        entries.append({"name": path.name, "folder": path.is_dir(),
                        "bytes": path.stat().st_size if path.is_file() else None})
    return entries


# --------------------------------------------------------------------------- one run, two runs


def run_drift(data: dict) -> dict:
    """The drift view of one run: base vs tuned, sample by sample."""
    columns = [(p["key"], PHASE_TITLES.get(p["key"], p["key"])) for p in (data["evaluation"] or {}).get("phases", [])]
    if not columns:
        columns = [(phase, PHASE_TITLES.get(phase, phase)) for phase in dict.fromkeys(s.get("phase") for s in data["samples"])]
    return drift_items([(title, [s for s in data["samples"] if s.get("phase") == key]) for key, title in columns])


def comparison_drift(runs: list[dict], labels: list[str]) -> dict:
    """Two runs on the same prompts: each run's last phase (tuned when it has one), side by side."""
    columns = []
    for data, label in zip(runs, labels):
        phases = list(dict.fromkeys(s.get("phase") for s in data["samples"]))
        last = "after" if "after" in phases else (phases[-1] if phases else None)
        title = f"{label}: {PHASE_TITLES.get(last, last or 'no samples')}"
        columns.append((title, [s for s in data["samples"] if s.get("phase") == last]))
    return drift_items(columns)


def config_differences(a: str | None, b: str | None) -> list[str]:
    """'key: A -> B' for every setting that differs between two config.yaml texts."""
    return diff(parse_yaml(a), parse_yaml(b))


def parse_yaml(text: str | None) -> dict:
    import yaml

    try:
        tree = yaml.safe_load(text or "") or {}
    except yaml.YAMLError:
        return {}
    return tree if isinstance(tree, dict) else {}
