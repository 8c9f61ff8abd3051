"""The one error base class: what the user did or must do, said in one line, with its exit code.

Every error meant for the user (bad config, data, model id, folder, resume, disk space, out of memory)
derives from `UserError`; the command line prints its lines as `error: ...` and exits with its
`exit_code`, so a new error class cannot turn into a traceback by being left off a list. Anything else
reaching the command line is a bug and keeps its traceback. Standard library only.
"""
from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_OUT_OF_MEMORY = 3


class UserError(Exception):
    """An error the user can act on; `lines()` are printed, `exit_code` is returned."""

    exit_code = EXIT_BAD_INPUT

    def lines(self) -> list[str]:
        return str(self).splitlines() or [type(self).__name__]
