"""The evaluation's reports: tables in the terminal, Markdown and a PNG chart in the run folder.

Numbers come in already computed (statistics.aggregate / compare rows); this module only lays them out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from ..terminal import print_table
from .languages import language_name


def print_language_table(rows: list[dict], title: str, console=None) -> None:
    """Aggregate or comparison rows from scoring as a rich table narrow enough for 80 columns
    (eval.md keeps the full table)."""
    headers, cells = compact_cells(rows)
    print_table(headers, cells, title, console)


def compact_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells with each rate, its count and its 95% interval in one cell."""
    if rows and "think_diff" in rows[0]:
        headers = ["group", "think before", "think after", "Δ think", "CIs overlap", "of all: before → after",
                   "answer before", "answer after"]
        return headers, [[r["group"], pct(r["think_before"]), pct(r["think_after"]), signed(r["think_diff"]),
                          {None: "—", True: "yes", False: "no"}[r["think_overlap"]],
                          f"{pct(r.get('think_all_before'))} → {pct(r.get('think_all_after'))}",
                          pct(r["answer_before"]), pct(r["answer_after"])] for r in rows]
    headers = ["group", "n", "scored", "cut", "unparsed", "think match (95% CI)", "share", "answer match (95% CI)"]
    return headers, [[r["group"], str(r["n"]), str(r["scorable"]), str(r["truncated"]), str(r["unparsed"]),
                      rate_cell(r["think_match"], r["think_n"], r["think_ci"]),
                      "—" if r["think_share_mean"] is None else f"{r['think_share_mean']:.2f}",
                      rate_cell(r["answer_match"], r["answer_n"], r["answer_ci"])] for r in rows]


def rate_cell(k: int, n: int, ci) -> str:
    return "—" if not n else f"{k}/{n} {100 * k / n:.0f}% ({100 * ci[0]:.0f}–{100 * ci[1]:.0f})"


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def signed(x) -> str:
    return "—" if x is None else f"{100 * x:+.1f} pt"


def labels_line(trained: Sequence[str] | None, zero_shot: Sequence[str] | None, source: str) -> str:
    """Which asked languages are trained and which zero-shot, and where that comes from; without a run:
    "trained: unknown"."""
    if trained is None:
        return f"trained: unknown — {source}; no trained / zero-shot rows"
    def names(codes):
        return ", ".join(language_name(c) for c in codes) or "none"
    return f"trained: {names(trained)}; zero-shot: {names(zero_shot or [])} (from {source})"


def result_labels_line(result: Mapping) -> str:
    return labels_line(result.get("trained_languages"), result.get("zero_shot_languages"),
                       result.get("labels_from") or "no run")


def print_eval(result: dict, console=None) -> None:
    """The evaluation's tables: each phase, then before vs after, then perplexity."""
    from rich.console import Console

    console = console or Console(highlight=False)
    console.print(result_labels_line(result), highlight=False)
    for phase, rows in result["tables"].items():
        print_language_table(rows, f"reasoning language — {phase_title(phase)}", console)
    if result.get("comparison"):
        print_language_table(result["comparison"], "reasoning language — before vs after", console)
    console.print("perplexity on held-out rows: " + ", ".join(
        f"{phase_title(p)} {format_ppl(v)}" for p, v in result["perplexity"].items()), highlight=False)


def phase_title(phase: str) -> str:
    return {"before": "base (adapter off)", "after": "tuned (adapter on)"}.get(phase, phase)


def format_ppl(value) -> str:
    return "n/a (no held-out rows)" if value is None else f"{value:.2f}"


def eval_markdown(result: dict) -> str:
    """eval.md: settings, per-phase tables, the comparison, perplexity, and how to read them."""
    s = result["settings"]
    lines = [
        "# Reasoning-language evaluation",
        "",
        f"Target languages: {', '.join(s['languages'])}. {s['prompts']} prompts × "
        f"{s['samples_per_prompt']} sample(s), max {s['max_new_tokens']} new tokens, "
        + ("greedy decoding" if s["greedy"] else f"sampling temperature {s['temperature']}, top_p {s['top_p']}, top_k {s['top_k']}")
        + f", reasoning effort {s['reasoning_effort']}, seed {s['seed']}; answers expected in the {s['answer_in']}'s language.",
        "",
        result_labels_line(result) + ". Trained = the languages the run's training rows reason in; "
        "zero-shot = every other asked language.",
        "",
        "think match = the reasoning's dominant language (judged sentence by sentence) is the target; "
        "answer match = the final answer is in the expected language. Rates are over scorable samples "
        "(parsed, not truncated); 95% Wilson intervals. \"of all\" counts every sample asked, unparsed and "
        "cut-off ones as not matching (a base model that never writes Harmony channels scores 0% there).",
        "",
    ]
    for phase, rows in result["tables"].items():
        lines += [f"## {phase_title(phase)}", "", to_markdown(rows), ""]
    if result.get("comparison"):
        lines += ["## Before vs after", "", to_markdown(result["comparison"]), ""]
    lines += ["## Perplexity (held-out rows, trained tokens)", ""]
    lines += [f"- {phase_title(p)}: {format_ppl(v)}" for p, v in result["perplexity"].items()]
    return "\n".join(lines) + "\n"


def eval_chart(result: dict, path: Path) -> bool:
    """Bar chart of think-match rate per language, before vs after, with Wilson intervals; False (no
    chart, the tables stay) when matplotlib, an optional extra, is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(result["tables"])
    groups = [r["group"] for r in result["tables"][phases[0]]]
    width = 0.8 / len(phases)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups)), 3.6))
    for k, phase in enumerate(phases):
        rows = {r["group"]: r for r in result["tables"][phase]}
        rates = [rows[g]["think_rate"] or 0.0 for g in groups]
        low = [max(0.0, r - rows[g]["think_ci"][0]) if rows[g]["think_n"] else 0 for g, r in zip(groups, rates)]
        high = [max(0.0, rows[g]["think_ci"][1] - r) if rows[g]["think_n"] else 0 for g, r in zip(groups, rates)]
        xs = [i + (k - (len(phases) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, rates, width, yerr=[low, high], capsize=3, label=phase_title(phase))
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("think match (share of scorable samples)")
    ax.set_title("Reasoning in the requested language, 95% Wilson intervals")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


# --------------------------------------------------------------------------- language tables (eval.md, `score`)

def table_cells(rows: Sequence[Mapping]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells for aggregate rows or compare rows."""
    if rows and "think_diff" in rows[0]:
        headers = ["group", "n before", "n after", "think before", "think after", "Δ think", "CIs overlap",
                   "think of all before", "think of all after", "answer before", "answer after", "Δ answer"]
        cells = [[str(r["group"]), str(r["n_before"]), str(r["n_after"]),
                  pct(r["think_before"]), pct(r["think_after"]), signed(r["think_diff"]),
                  "—" if r["think_overlap"] is None else ("yes" if r["think_overlap"] else "no"),
                  pct(r.get("think_all_before")), pct(r.get("think_all_after")),
                  pct(r["answer_before"]), pct(r["answer_after"]), signed(r["answer_diff"])]
                 for r in rows]
        return headers, cells
    headers = ["group", "n", "scorable", "unparsed", "truncated", "think match", "think 95% CI",
               "think share", "answer match", "answer 95% CI"]
    cells = [[str(r["group"]), str(r["n"]), str(r["scorable"]), str(r["unparsed"]), str(r["truncated"]),
              f"{r['think_match']}/{r['think_n']} ({pct(r['think_rate'])})", interval(r["think_ci"], r["think_n"]),
              "—" if r["think_share_mean"] is None else f"{r['think_share_mean']:.2f}",
              f"{r['answer_match']}/{r['answer_n']} ({pct(r['answer_rate'])})", interval(r["answer_ci"], r["answer_n"])]
             for r in rows]
    return headers, cells


def interval(ci: Sequence[float], n: int) -> str:
    return "—" if not n else f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%"


def format_table(rows: Sequence[Mapping]) -> str:
    """Aggregate or compare rows as an aligned plain-text table."""
    headers, cells = table_cells(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def to_markdown(rows: Sequence[Mapping]) -> str:
    """Aggregate or compare rows as a markdown table."""
    headers, cells = table_cells(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)
