"""What the user reads in the terminal: one plain, greppable line at a time. Messages hold [brackets]
and paths, so rich's markup and highlighting are off; lines are soft-wrapped, never broken, so a line
stays one line in a log file."""
from __future__ import annotations

import os
from pathlib import Path

VERBOSE_ENV = "LOWVRAM_FT_VERBOSE"  # set by --verbose: show the libraries' own warnings and progress bars


def verbose() -> bool:
    """--verbose was given: known-harmless library output (model.quiet_known_noise) is shown too."""
    return os.environ.get(VERBOSE_ENV) == "1"


def say(console, line: str) -> None:
    """One plain line. A lone surrogate quoted from user data is printed as its escape (the terminal
    could not encode it)."""
    line = line.encode("utf-8", "backslashreplace").decode("utf-8")
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def log(console, step: str, message: str) -> None:
    """One greppable line per step: `[lowvram_ft] step: message`."""
    say(console, f"[lowvram_ft] {step}: {message}")


def print_table(headers: list[str], cells: list[list[str]], title: str, console=None) -> None:
    """A titled table, the first column left-aligned and never wrapped, the figures right-aligned."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    table = Table(title=title, title_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in cells:
        table.add_row(*row)
    console.print(table)


def save_quietly(model, out_dir: Path) -> None:
    """save_pretrained without its "Writing model shards" bar (a built model's one shard, a second or less;
    unless --verbose), through transformers' public progress-bar switch, restored after."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if not verbose():
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
