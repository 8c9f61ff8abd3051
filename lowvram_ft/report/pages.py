"""The two pages: one run (RUN/report.html) and two runs compared on the same prompts, and where
they are written. `write_report` is the `report` command; `report_after_run` is the one call at the
end of `train` and `eval`, which never fails a finished run."""
from __future__ import annotations

import os
from pathlib import Path

from ..io import write_atomic
from ..terminal import log
from .data import ReportError, build_report_data, comparison_drift, config_differences, run_drift
from .render import (charts_section, config_section, data_section, drift_section, esc, evaluation_section,
                     files_section, overview_section, page)

REPORT_NAME = "report.html"


def run_page(data: dict) -> str:
    """One run: overview, data, training curves, rewards, evaluation, drift view, config, files."""
    return page(f"lowvram_ft run {data['name']}", "training and evaluation report", [
        ("overview", "Overview", overview_section(data)),
        ("data", "Data", data_section(data)),
        ("training", "Training", charts_section([data["series"]], [""])),
        ("rewards", "Rewards per reward function", charts_section([data["rewards"]], [""])),
        ("evaluation", "Evaluation: base vs tuned", evaluation_section([("", data["evaluation"])])),
        ("drift", "Drift view: the reasoning, sentence by sentence", drift_section(run_drift(data))),
        ("config", "Resolved config", config_section(data["config_yaml"])),
        ("files", "Files of the run", files_section(data["files"])),
    ])


def comparison_page(runs: list[dict], prefixes: list[str]) -> str:
    """Two runs on the same prompts: A and B side by side (A is the first --run)."""
    labels = ["A", "B"]
    names = " vs ".join(f"{label} = {data['name']}" for label, data in zip(labels, runs))
    differences = config_differences(runs[0]["config_yaml"], runs[1]["config_yaml"])
    settings = ("<ul>" + "".join(f"<li><code>{esc(line)}</code></li>" for line in differences) + "</ul>"
                if differences else '<p class="note">The two resolved configs are the same.</p>')
    return page(f"lowvram_ft: {names}", "two runs compared on the same prompts", [
        *[(f"overview-{label}", f"Run {label}: {data['name']}", overview_section(data)) for label, data in zip(labels, runs)],
        ("settings", "Settings that differ (A -> B)", settings),
        ("training", "Training", charts_section([d["series"] for d in runs], labels)),
        ("rewards", "Rewards per reward function", charts_section([d["rewards"] for d in runs], labels)),
        ("evaluation", "Evaluation", evaluation_section([(label, d["evaluation"]) for label, d in zip(labels, runs)])),
        ("drift", "Drift view: A vs B, sentence by sentence", drift_section(comparison_drift(runs, labels))),
        *[(f"files-{label}", f"Files of run {label}", files_section(d["files"], prefix))
          for label, d, prefix in zip(labels, runs, prefixes)],
    ])


def default_output(runs: list[Path]) -> Path:
    """RUN/report.html for one run; A/compare-<B's folder name>.html for two."""
    if len(runs) == 1:
        return runs[0] / REPORT_NAME
    return runs[0] / f"compare-{runs[1].resolve().name}.html"


def write_report(runs: list[str | os.PathLike], out: str | os.PathLike | None = None) -> Path:
    """Build and write the page of one run, or the comparison of two; returns the file written."""
    folders = [Path(r) for r in runs]
    if len(folders) not in (1, 2):
        raise ReportError(f"--run given {len(folders)} times — give one run, or two to compare")
    path = Path(out) if out else default_output(folders)
    if path.is_dir():
        raise ReportError(f"{path}: is a folder — pass a file name ending in .html to --out")
    datas = [build_report_data(folder) for folder in folders]
    if len(datas) == 1 and out is None:
        html = run_page(datas[0])
    elif len(datas) == 1:
        html = run_page_at(datas[0], folders[0], path)
    else:
        html = comparison_page(datas, [relative_prefix(folder, path) for folder in folders])
    write_atomic(path, html)
    return path


def run_page_at(data: dict, folder: Path, path: Path) -> str:
    """One run's page written elsewhere (--out): its file links still point at the run folder."""
    prefix = relative_prefix(folder, path)
    return run_page({**data, "files": [{**f, "name": prefix + f["name"]} for f in data["files"]]}) if prefix else run_page(data)


def relative_prefix(folder: Path, page_path: Path) -> str:
    """The run folder as seen from the page's folder ('' when the page is in it), never absolute."""
    try:
        relative = os.path.relpath(folder.resolve(), page_path.resolve().parent)
    except ValueError:  # another drive (Windows): no relative path exists
        return ""
    return "" if relative == "." else relative.replace(os.sep, "/") + "/"


def report_after_run(run_dir: Path, console=None) -> Path | None:
    """The report at the end of train / eval, said in one line. Writing it never fails the finished run:
    a failure is one line saying how to retry."""
    from rich.console import Console

    console = console or Console(highlight=False, soft_wrap=True)
    try:
        path = write_report([run_dir])
    except Exception as error:  # noqa: BLE001 — the run's results are written; the page is a view of them
        log(console, "report", f"not written ({type(error).__name__}: {error}) — the run itself is complete; "
            f"retry with `python -m lowvram_ft report --run {run_dir}`")
        return None
    log(console, "report", f"{path}")
    return path
