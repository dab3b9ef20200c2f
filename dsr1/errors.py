"""One error family for dsr1, mapped to exit codes in one place.

Library code raises these; only `dsr1.cli.main` turns them into a message and an
exit code. Every message should name the fix: the flag, command or variable.
Exit codes are documented in docs/cli.md (a test keeps the two in step).
"""

from __future__ import annotations


class Dsr1Error(Exception):
    """Base of every error dsr1 reports to a user."""

    exit_code = 1
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class UsageError(Dsr1Error, ValueError):
    """Bad flags or arguments."""

    exit_code = 2


class ConfigError(Dsr1Error, ValueError):
    """A profile, catalog or settings file is malformed."""

    exit_code = 3


class NotFoundError(Dsr1Error, LookupError):
    """A model, profile, repo or file does not exist."""

    exit_code = 4


class HardwareError(Dsr1Error, RuntimeError):
    """The machine cannot do what was asked (nothing fits, no usable device)."""

    exit_code = 5


class NetworkError(Dsr1Error, ConnectionError):
    """A remote endpoint could not be reached or refused us."""

    exit_code = 6


class IntegrityError(Dsr1Error, ValueError):
    """Stored or downloaded data failed verification."""

    exit_code = 7


class DiskSpaceError(Dsr1Error, OSError):
    """Not enough free disk for the operation."""

    exit_code = 8


class AuthError(Dsr1Error, PermissionError):
    """Missing or wrong credentials (HF_TOKEN, API key)."""

    exit_code = 9


class ServerError(Dsr1Error, RuntimeError):
    """The model server failed to start or to answer."""

    exit_code = 10


# Exit codes not tied to an error class.
EXIT_OK = 0
EXIT_INTERRUPTED = 130

# (code, meaning) in the order docs/cli.md lists them.
EXIT_CODES: list[tuple[int, str]] = [
    (EXIT_OK, "success (for `doctor`: this machine can serve at least one model)"),
    (Dsr1Error.exit_code, "unexpected error reported by dsr1"),
    (UsageError.exit_code, "bad command-line usage or argument value"),
    (ConfigError.exit_code, "malformed profile, catalog or settings file"),
    (NotFoundError.exit_code, "model, profile, repo or file not found"),
    (HardwareError.exit_code, "this machine cannot run what was asked (for `doctor`: nothing fits)"),
    (NetworkError.exit_code, "endpoint unreachable or answered with an error"),
    (IntegrityError.exit_code, "verification failed (checksum, corrupt file)"),
    (DiskSpaceError.exit_code, "not enough free disk"),
    (AuthError.exit_code, "missing or rejected credentials"),
    (ServerError.exit_code, "the model server failed"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C); partial work is kept and resumable"),
]
