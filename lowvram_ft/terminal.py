"""What the user reads in the terminal: one plain, greppable line at a time. Messages hold [brackets]
and paths, so rich's markup and highlighting are off; lines are soft-wrapped, never broken, so a line
stays one line in a log file."""
from __future__ import annotations

import os

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
