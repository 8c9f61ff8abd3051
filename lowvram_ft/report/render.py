"""The report's markup: the page shell (template, styles and script shipped as package data in
lowvram_ft/assets/report/, inlined), tables, and the sections of a run page. Plain values in (the
structures of data.py and drift.py), one HTML string out. Every text from a run is escaped here
(`esc`), so a completion holding `<script>` shows as text; `Raw` marks markup this module built."""
from __future__ import annotations

import re
from html import escape
from pathlib import Path
from urllib.parse import quote

from . import svg
from .drift import language_name

ASSETS = Path(__file__).parents[1] / "assets" / "report"
KNOWN_LANGUAGE_COLOURS = ("en", "fr", "de", "es", "it", "pt", "nl", "ja", "zh", "ko", "ru")


class Raw(str):
    """Markup built here, inserted as it is (everything else is escaped)."""


def esc(value) -> str:
    if isinstance(value, Raw):
        return value
    return escape("—" if value is None else str(value), quote=True)


RUN_FOOTER = "from the files of the run folder"


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]], source: str = RUN_FOOTER) -> str:
    """The whole page: sections are (anchor id, heading, markup); empty markup leaves a section out;
    `source` says in the footer what it was written from."""
    template = (ASSETS / "page.html").read_text(encoding="utf-8")
    shown = [(anchor, heading, body) for anchor, heading, body in sections if body]
    parts = {
        "title": esc(title),
        "subtitle": esc(subtitle),
        "source": esc(source),
        "nav": "".join(f'<a href="#{anchor}">{esc(heading)}</a>' for anchor, heading, _ in shown),
        "body": "\n".join(f'<section id="{anchor}"><h2>{esc(heading)}</h2>\n{body}\n</section>'
                          for anchor, heading, body in shown),
        "css": (ASSETS / "report.css").read_text(encoding="utf-8"),
        "js": (ASSETS / "report.js").read_text(encoding="utf-8"),
    }
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], template)  # one pass: inserted text stays as it is


def table(headers: list[str], rows: list[list], css_class: str = "") -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return (f'<div class="table-wrap"><table class="{css_class}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{body}</tbody></table></div>')


def key_values(pairs: list[tuple[str, object]]) -> str:
    rows = [[k, v] for k, v in pairs if v not in (None, "", {}, [])]
    return table(["", ""], rows, "kv") if rows else ""


def number(value, spec: str = ",") -> str | None:
    if value is None:
        return None
    return format(value, spec)


def percent(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def rate_cell(rate: dict | None) -> str:
    """'7/9 78% (45–94%)': matches / scored, the rate and its 95% Wilson interval."""
    if not rate:
        return "—"
    lo, hi = rate["ci"]
    return f"{rate['k']}/{rate['n']} {100 * rate['rate']:.0f}% ({100 * lo:.0f}–{100 * hi:.0f}%)"


def language_class(code: str | None) -> str:
    return f"lang-{code}" if code in KNOWN_LANGUAGE_COLOURS else "lang-other"


# --------------------------------------------------------------------------- sections


def overview_section(data: dict) -> str:
    env, fig = data["environment"], data["training"]
    measured = number(fig["peak_memory_gib"], ".2f")
    kind = {"peak_reserved_vram": "peak reserved VRAM", "peak_rss": "peak RSS (host memory)"}.get(fig["peak_memory_kind"] or "", "peak memory")
    planned = number(fig["planned_peak_gib"], ".2f")
    details = [kind for kind in [env["device_kind"]] if kind and kind != env["device"]]
    details += [f"{env['device_memory_gib']:.1f} GiB"] if env["device_memory_gib"] else []
    device = env["device"] and env["device"] + (f" ({', '.join(details)})" if details else "")
    parts = [key_values([
        ("model", env["model"]), ("device", device), ("why this device and dtype", env["device_reason"]),
        ("weights dtype", env["dtype"]), ("compute dtype", env["compute_dtype"]), ("processes", env["processes"]),
        ("packing", (env["packing"] or {}).get("why") if env["packing"] else None),
        ("trainable parameters", trainable_text(env["trainable_parameters"])),
        ("steps", fig["steps"]), ("loss first → final", loss_text(fig)),
        ("trained tokens", number(fig["trained_tokens"])), ("training time", seconds(fig["train_runtime_s"])),
        ("whole run", seconds(fig["wall_time_s"])),
        (kind, measured and f"{measured} GiB" + (f" (planner's estimate {planned} GiB"
                                                  + (f", {fig['plan_basis']}" if fig["plan_basis"] else "") + ")"
                                                  if planned else "")),
    ])]
    if data["command"]:
        parts.append(f"<h3>Command</h3><pre>{esc(data['command'])}</pre>")
    if env["versions"]:
        parts.append("<h3>Versions</h3>" + table(["package", "version"], [[k, v] for k, v in env["versions"].items()]))
    if data["missing"]:
        parts.append(f'<p class="note">Not in this run folder: {esc(", ".join(data["missing"]))}.</p>')
    return "".join(parts)


def trainable_text(counts: dict | None) -> str | None:
    if not counts:
        return None
    share = 100 * counts.get("trainable", 0) / max(counts.get("all", 1), 1)
    return f"{counts.get('trainable', 0):,} of {counts.get('all', 0):,} ({share:.2f}%)"


def loss_text(fig: dict) -> str | None:
    if fig["first_loss"] is None and fig["final_loss"] is None:
        return None
    return f"{number(fig['first_loss'], '.4f') or '—'} → {number(fig['final_loss'], '.4f') or '—'}"


def seconds(value) -> str | None:
    return None if value is None else f"{value:,.1f} s"


def data_section(data: dict) -> str:
    stats = data["data"]
    tokens = stats["tokens"]
    parts = [key_values([
        ("training rows", number(stats["train_rows"])), ("held-out rows", number(stats["heldout_rows"])),
        ("skipped rows", number(stats["skipped_rows"])), ("mixing", stats["mixing"]),
        ("row shapes", ", ".join(f"{k} {v}" for k, v in stats["shapes"].items())),
        ("tokens per row (min / median / max)", tokens.get("median_tokens") is not None and
         f"{tokens.get('min_tokens')} / {tokens.get('median_tokens')} / {tokens.get('max_tokens')}"),
        ("tokens in all", number(tokens.get("total_tokens"))), ("trained tokens", number(tokens.get("trained_tokens"))),
        ("trained share", tokens.get("trained_share") is not None and percent(tokens["trained_share"])),
        ("rows cut at max_seq_length", number(tokens.get("truncated"))),
    ])]
    languages = stats["reasoning_languages"]
    if languages:
        parts.append(table(["reasoning language", "rows"], [[k, v] for k, v in languages.items()]))
    if stats["sources"]:
        parts.append(table(["source", "shape", "rows read", "valid", "used"],
                           [[name, s.get("shape"), s.get("rows"), s.get("valid"), s.get("used")]
                            for name, s in stats["sources"].items()]))
    return "".join(p for p in parts if p)


def charts_section(series_sets: list[list[dict]], labels: list[str]) -> str:
    """One chart per metric; a series per run (one run: one line)."""
    titles = list(dict.fromkeys(s["title"] for series in series_sets for s in series))
    charts = []
    for title in titles:
        lines = [{"label": label, "points": s["points"]}
                 for series, label in zip(series_sets, labels) for s in series if s["title"] == title]
        unit = next(s["unit"] for series in series_sets for s in series if s["title"] == title)
        references = [s["reference"] for series in series_sets for s in series if s["title"] == title and s.get("reference")]
        charts.append(svg.line_chart(title, lines, "step", unit, references[0] if len(series_sets) == 1 and references else None))
    return f'<div class="grid">{"".join(charts)}</div>' if charts else ""


def evaluation_section(evaluations: list[tuple[str, dict]]) -> str:
    """evaluations: (label, evaluation_rows) per run; a column per run and phase."""
    columns = [(f"{label}{': ' if label else ''}{phase['title']}", evaluation, phase["key"])
               for label, evaluation in evaluations if evaluation for phase in evaluation["phases"]]
    if not columns:
        return ""
    groups = list(dict.fromkeys((r["group"], r["name"], r["kind"]) for _, ev, _ in columns for r in ev["rows"]))
    rows_of = [{r["group"]: r for r in ev["rows"]} for _, ev, _ in columns]
    headers = ["language", "group"] + [f"think match — {title}" for title, _, _ in columns] + \
              [f"answer match — {title}" for title, _, _ in columns]
    rows = []
    for group, name, kind in groups:
        cells = [(rows_of[i].get(group) or {"phases": {}})["phases"].get(phase) for i, (_, _, phase) in enumerate(columns)]
        rows.append([name if name == group else f"{name} ({group})", kind]
                    + [rate_cell(c and c["think"]) for c in cells] + [rate_cell(c and c["answer"]) for c in cells])
    languages = [g for g, _, kind in groups if kind != "pooled"]
    # Two runs: each run's last phase only (tuned vs tuned); the table above keeps every column.
    charted = [i for i, (_, ev, phase) in enumerate(columns)
               if len(evaluations) == 1 or phase == ev["phases"][-1]["key"]]
    chart = svg.bar_chart("reasoning in the requested language (think match, 95% Wilson intervals)", languages, [
        {"label": columns[i][0], "values": [rate_of(rows_of[i].get(g), columns[i][2]) for g in languages],
         "intervals": [ci_of(rows_of[i].get(g), columns[i][2]) for g in languages]}
        for i in charted], "share of scored samples", y_max=1.0, percent=True)
    notes = []
    for label, evaluation in evaluations:
        if evaluation:
            notes.append(settings_note(label, evaluation))
    return (table(headers, rows) + chart
            + '<p class="note">think match: the reasoning\'s dominant language, judged sentence by sentence, is '
            "the one asked for; over scored samples (parsed, not cut off), k/n rate (95% Wilson interval). "
            "group: trained / zero-shot as the run's evaluation recorded it (unknown when it did not).</p>"
            + "".join(notes))


def rate_of(row: dict | None, phase: str):
    cell = (row or {}).get("phases", {}).get(phase)
    return cell and cell["think"] and cell["think"]["rate"]


def ci_of(row: dict | None, phase: str):
    cell = (row or {}).get("phases", {}).get(phase)
    return cell and cell["think"] and tuple(cell["think"]["ci"])


def settings_note(label: str, evaluation: dict) -> str:
    s = evaluation["settings"]
    decoding = "greedy" if s.get("greedy") else f"temperature {s.get('temperature')}, top_p {s.get('top_p')}"
    ppl = ", ".join(f"{k} {v:.2f}" if isinstance(v, (int, float)) else f"{k} n/a"
                    for k, v in evaluation["perplexity"].items())
    text = (f"{label + ': ' if label else ''}{s.get('prompts', '?')} prompts × {s.get('samples_per_prompt', '?')} "
            f"sample(s), max {s.get('max_new_tokens', '?')} new tokens, {decoding}, seed {s.get('seed', '?')}"
            + (f"; held-out perplexity {ppl}" if ppl else "") + ".")
    return f'<p class="note">{esc(text)}</p>'


def files_section(files: list[dict], prefix: str = "") -> str:
    """Links relative to the page (prefix: the run folder seen from the page's folder)."""
    if not files:
        return ""
    items = []
    for f in files:
        href = quote(prefix + f["name"]) + ("/" if f["folder"] else "")
        size = "folder" if f["folder"] else f"{f['bytes']:,} bytes"
        items.append(f'<li><a href="{esc(href)}">{esc(f["name"])}{"/" if f["folder"] else ""}</a> '
                     f'<span class="note">({esc(size)})</span></li>')
    return "<ul>" + "".join(items) + "</ul>"


def config_section(config_yaml: str | None) -> str:
    return f"<details open><summary>config.yaml</summary><pre>{esc(config_yaml)}</pre></details>" if config_yaml else ""


# --------------------------------------------------------------------------- the drift view


def drift_section(drift: dict) -> str:
    """Each sample: the requested language named, one column per phase (or run), each reasoning
    sentence coloured by the language the scorer gave it (grey: not judged), then the answer."""
    if not drift["items"]:
        return ""
    seen = sorted({seg["language"] for item in drift["items"] for c in item["cells"] if c
                   for seg in c["analysis"] if seg["language"]})
    options = "".join(f'<option value="{esc(code)}">{esc(language_name(code))} ({esc(code)})</option>'
                      for code in drift["languages"])
    filters = ('<div class="filters">'
               f'<label>requested language <select id="f-lang"><option value="all">all</option>{options}</select></label>'
               '<label><input type="checkbox" id="f-changed"> changed only '
               f'<span class="note">({sum(i["changed"] for i in drift["items"])} of {len(drift["items"])}: '
               "reasoning language or match differs between the first and last column)</span></label>"
               '<span id="f-count" class="note"></span></div>')
    legend = ('<p class="legend">sentence language (click to focus): '
              + "".join(f'<button type="button" class="legend-chip {language_class(code)}" data-language="{esc(code)}" '
                        f'aria-pressed="false">{esc(language_name(code))}</button> ' for code in seen)
              + '<span class="seg unjudged">grey: not judged (too short, code or math)</span>; '
              "wavy underline: not the requested language</p>")
    return filters + legend + "".join(sample_markup(item, drift["columns"]) for item in drift["items"])


def sample_markup(item: dict, columns: list[str]) -> str:
    head = (f'<div class="sample-head"><span class="asked">asked: {esc(item["target_name"])} '
            f'({esc(item["target_language"])})</span><span>{esc(item["prompt_id"])}'
            f'{" #" + str(item["sample"]) if item["sample"] else ""}</span>'
            + ('<span class="badge changed">changed</span>' if item["changed"] else "")
            + f'</div><div class="note">{esc(item["user"])}</div>')
    cells = "".join(cell_markup(cell, title, item["target_language"]) for cell, title in zip(item["cells"], columns))
    return (f'<article class="sample" data-key="{esc(item["key"])}" data-lang="{esc(item["target_language"])}" '
            f'data-changed="{str(item["changed"]).lower()}">{head}<div class="columns">{cells}</div></article>')


def cell_markup(cell: dict | None, title: str, target: str) -> str:
    if cell is None:
        return f'<div class="cell"><h4>{esc(title)}</h4><p class="note">no such sample in this column</p></div>'
    verdict = {True: '<span class="yes">in the requested language</span>',
               False: '<span class="no">not in the requested language</span>',
               None: '<span class="note">not scored</span>'}[cell["think_match"]]
    why = ("cut off at the token limit" if cell["truncated"] else
           "no reasoning / answer channels found" if not cell["parsed_ok"] else "")
    share = "" if cell["think_share"] is None else f", {100 * cell['think_share']:.0f}% of judged sentences in it"
    status = (f'<div>reasoning: {esc(language_name(cell["think_language"]))} — {verdict}{esc(share)}'
              + (f' <span class="note">({esc(why)})</span>' if why else "") + "</div>")
    trace = "".join(segment_markup(seg, target) for seg in cell["analysis"])
    body = (f'<div class="trace">{trace}</div>' if trace else
            f'<pre class="trace">{esc(cell["raw"])}</pre>' if cell["raw"] else '<p class="note">no reasoning</p>')
    answer = (f'<div class="answer"><span class="label">answer: </span>{esc(cell["final"])}</div>'
              if cell["final"] else "")
    return f'<div class="cell"><h4>{esc(title)}</h4>{status}{body}{answer}</div>'


def segment_markup(seg: dict, target: str) -> str:
    code = seg["language"]
    if code is None:
        return f'<span class="seg unjudged" data-language="">{esc(seg["text"])}</span>'
    off = " off-target" if code != target else ""
    return (f'<span class="seg {language_class(code)}{off}" data-language="{esc(code)}" '
            f'title="{esc(language_name(code))}">{esc(seg["text"])}</span>')




# --------------------------------------------------------------------------- other reports as pages


def markdown_sections(markdown: str, first: str = "Results") -> list[tuple[str, str, str]]:
    """The simple Markdown our other reports write (## headings, paragraphs, pipe tables, `code`,
    **bold**) as page sections, every text escaped; the # title line is left to the page."""
    sections: list[tuple[str, list[str]]] = [(first, [])]
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            sections[-1][1].append(table(rows[0], rows[2:]) if len(rows) > 2 else "")
            rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            inner = line.strip().removeprefix("|").removesuffix("|")  # cells split at " | ": "max |Δloss|" is one
            rows.append([inline(cell.strip()) for cell in re.split(r"(?<=\s)\|(?=\s)", inner)])
            continue
        flush()
        if line.startswith("## "):
            sections.append((line[3:].strip(), []))
        elif line.strip() and not line.startswith("# "):
            sections[-1][1].append(f"<p>{inline(line)}</p>")
    flush()
    return [(re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or f"s{i}", heading, "".join(parts))
            for i, (heading, parts) in enumerate(sections)]


def inline(text: str) -> Raw:
    """`code` and **bold** of one Markdown line, the rest escaped."""
    parts = re.split(r"(`[^`]+`|\*\*[^*]+\*\*)", text)
    return Raw("".join(f"<code>{esc(p[1:-1])}</code>" if p.startswith("`") and len(p) > 1 else
                       f"<strong>{esc(p[2:-2])}</strong>" if p.startswith("**") and len(p) > 3 else esc(p)
                       for p in parts))
