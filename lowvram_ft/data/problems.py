"""What is wrong with the data, and where: one line per problem, `FILE:ROW:FIELD: what is wrong — what
to do`. ROW is the 1-based line of a JSON Lines file, the 1-based record of .json / .csv (header not
counted) / .parquet / Hub data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserError

MAX_LISTED = 20  # problems shown before "... and N more"


class DataError(UserError, ValueError):
    """Problems with the training data, one line each (the first 20, then how many more)."""

    def __init__(self, problems: list[str], hint: str | None = None):
        self.problems = [str(p) for p in problems]
        lines = self.problems[:MAX_LISTED]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"... and {len(self.problems) - MAX_LISTED} more")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Problem:
    where: str  # FILE or FILE:ROW
    field: str | None
    what: str
    fix: str
    reason: str  # short category, for the skip counts
    fatal: bool = False  # the whole data set is unusable: never skipped
    row: int = 0  # for ordering a file's problems by row

    def __str__(self) -> str:
        return f"{self.where}{':' + self.field if self.field else ''}: {self.what} — {self.fix}"


class Issues(list):
    """Problems of one row, as (field, what, fix, reason), collected by the shape parsers."""

    def add(self, field: str, what: str, fix: str, reason: str) -> None:
        self.append((field, what, fix, reason))


def location_key(where: str) -> tuple[str, int]:
    """'FILE:ROW' sorts by file, then by row number."""
    name, _, row = where.rpartition(":")
    return (name, int(row)) if row.isdigit() else (where, 0)


def type_name(value: Any) -> str:
    return {type(None): "null", str: "text", list: "a list", dict: "an object", bool: "true/false",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text.splitlines()[0][:200]
