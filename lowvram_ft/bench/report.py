"""What a bench run leaves behind: <date>-<device>.jsonl (one line per case), the Markdown report with
its tables (cases, the two stacks compared, budgets, what ran, what was not measured), the same as one
HTML page built from the run report's parts, the PNG chart, and the console lines and summary table."""
from __future__ import annotations

import io
import json
import re
from datetime import date
from pathlib import Path
from typing import Any

from ..io import write_atomic, write_jsonl
from ..report import svg
from ..report.render import markdown_sections, page
from .. import terminal
from ..terminal import print_table
from .matrix import STACKS, Case
from .metrics import attention_summary, fastest, loss_max_abs_diff, parameters_text, train_memory


def device_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; a CPU run is 'cpu'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "cpu"


def result_stem(day: date, device_name: str, matrix_name: str) -> str:
    """<date>-<device>, plus -<matrix> for a matrix other than the device's default (cpu / gpu), so
    that a budgets run on the same day does not replace the throughput table."""
    stem = f"{day.isoformat()}-{device_slug(device_name)}"
    return stem if matrix_name in ("cpu", "gpu") else f"{stem}-{matrix_name}"


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
    """tokens/s and peak memory per setting, the two stacks side by side (PNG, written atomically).
    Nothing without matplotlib (an optional extra): the tables hold the same numbers."""
    try:
        import matplotlib
    except ImportError:
        return

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


def html_report(records: list[dict], env: dict) -> str:
    """<stem>.html: the Markdown report's sections and the charts as one self-contained page, made of
    the run report's parts (page, tables, inline SVG; no network, light and dark, printable)."""
    gpu = env["device"]["kind"] == "cuda"
    pairs = paired(records)
    memory_key, memory_label = ("peak_reserved_gib", "peak reserved (GiB)") if gpu else ("peak_rss_gib", "peak RSS (GiB)")
    charts = [svg.bar_chart(title, list(pairs), [{"label": stack, "values": [chart_value(pairs[s].get(stack), key) or None
                                                                              for s in pairs]} for stack in STACKS], unit)
              for key, title, unit in (("tokens_per_s", "tokens/s (trained tokens)", "tokens/s"),
                                       (memory_key, memory_label, "GiB"))]
    sections = markdown_sections(markdown_report(records, env), "Cases")
    sections.insert(1, ("charts", "The two stacks per setting", '<div class="grid">' + "".join(charts) + "</div>"
                        if any(charts) else ""))
    return page(f"Benchmark — {env['date']}, {env['device']['name']}", "lowvram_ft bench", sections,
                "from the benchmark's results (the .jsonl beside this page)")


def write_results(records: list[dict], env: dict, out_dir: Path, stem: str) -> Path:
    """<stem>.jsonl (one line per case, environment included), <stem>.md, <stem>.html and <stem>.png, atomically.
    Lines already in today's <stem>.jsonl are kept unless this run measured the same case again, so a
    matrix can be run in parts (--cases) into one file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{stem}.jsonl"
    records = merge_records(read_jsonl(jsonl), [{**r, "environment": env} for r in records])
    write_jsonl(jsonl, records)
    write_atomic(out_dir / f"{stem}.md", markdown_report(records, env))
    write_atomic(out_dir / f"{stem}.html", html_report(records, env))
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


def print_summary(records: list[dict], device: dict, console) -> None:
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
    """The bench's step lines: `[lowvram_ft] bench: message`."""
    terminal.log(console, "bench", message)
