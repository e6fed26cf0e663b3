"""Exceptions that the CLI turns into exit codes.

Library code raises :class:`RescompressError` (or a subclass) for anything a user can fix: a bad file,
mismatched data, an impossible target. The CLI prints its message as one ``Error: ...`` line and exits 1
(:class:`UsageError`, an option value that cannot be used: exit 2). :class:`CheckFailed` means the work
ran but a requested threshold did not hold (exit 3).
"""


class RescompressError(Exception):
    """A problem the user can act on; the message is shown as one line."""


class UsageError(RescompressError):
    """An option value the command cannot use (unknown choice, out of range). Exit code 2, like a parse error."""


class UnsupportedModelError(RescompressError):
    """The file is not a model this tool can load (or loading it would need trust)."""


class DataError(RescompressError):
    """The data source is missing, empty, unreadable, or does not match the model."""


class CheckFailed(RescompressError):
    """A requested threshold (accuracy drop, agreement, latency) did not hold. Exit code 3.

    ``details`` holds what was measured on the way (for ``--json`` output of the failure).
    """

    def __init__(self, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.details = dict(details or {})
