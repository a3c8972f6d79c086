"""User-facing errors: one line that names the problem, plus a hint that says what to do."""

from __future__ import annotations

#: Exit codes of the ``brainseg`` command (documented in docs/usage.md).
EXIT_OK = 0
EXIT_RUNTIME = 1  # a runtime failure: some files failed, a non-finite loss, disk full...
EXIT_USAGE = 2  # bad user input: a wrong option value, a missing or malformed file...
EXIT_INTERRUPTED = 130  # Ctrl-C


class BrainsegError(Exception):
    """An error the user can fix; the CLI prints it as one red line plus the hint.

    ``exit_code`` is 2 for usage / input errors (the default) and 1 for runtime failures.
    """

    def __init__(self, message: str, hint: str | None = None, *, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class BrainsegRuntimeError(BrainsegError):
    """A failure that is not the user's input (exit code 1)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint, exit_code=EXIT_RUNTIME)


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's text (its type name when empty), for one-line errors."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if limit is None else line[:limit]
