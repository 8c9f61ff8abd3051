"""The one error base class: what the user did or must do, said in one line, with its exit code.

Every error meant for the user (bad config, data, model id, folder, resume, disk space, out of memory)
derives from `UserError`; the command line prints its lines as `error: ...` and exits with its
`exit_code`, so a new error class cannot turn into a traceback by being left off a list. Anything else
reaching the command line is a bug and keeps its traceback. Standard library only.
"""
from __future__ import annotations

import importlib

EXIT_BAD_INPUT = 2
EXIT_OUT_OF_MEMORY = 3


class UserError(Exception):
    """An error the user can act on; `lines()` are printed, `exit_code` is returned."""

    exit_code = EXIT_BAD_INPUT

    def lines(self) -> list[str]:
        return str(self).splitlines() or [type(self).__name__]


def is_out_of_memory(error: BaseException | None) -> bool:
    """A GPU out-of-memory error (torch.OutOfMemoryError, by its class name so torch need not be
    imported; or a CUDA runtime error "out of memory" raised by a kernel, which torch gives no type of)
    or a host MemoryError, also when wrapped: loaders re-raise it as their cause or context."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, MemoryError) or "OutOfMemoryError" in {t.__name__ for t in type(error).__mro__}:
            return True
        if isinstance(error, RuntimeError) and "CUDA" in str(error) and "out of memory" in str(error).lower():
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


class MissingExtra(UserError, ImportError):
    """An optional package (pyproject's extras) that this use needs and that is not installed."""


def require(module: str, extra: str):
    """Import an optional package, or MissingExtra with the one command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{module} is not installed — pip install 'lowvram_ft[{extra}]' "
                           f"(or `make venv`, which installs every extra)") from None
