"""The run report: one self-contained HTML page per run (or two runs compared), built from what the run
folder already holds. In the order its modules import each other: drift (the reasoning cut into the
scorer's judged sentences, samples paired across columns) → data (the run folder's files read into one
plain structure) → svg (inline charts) → render (markup, every text escaped; template, styles and script
from lowvram_ft/assets/report/) → pages (the run page, the comparison page, where they are written, and
the call at the end of train / eval). Imports no torch, no model, no Trainer."""
from .data import ReportError, build_report_data
from .pages import report_after_run, write_report

__all__ = ["ReportError", "build_report_data", "report_after_run", "write_report"]
