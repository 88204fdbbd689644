"""The one mapping from errors to exit codes, for every command line (lit-prepare, lit-verify,
lit-train, lit-sample, lit-eval, lit-demo): 0 done, 1 failure, 2 bad usage or config, each error as one line."""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """Bad flags, config or paths: the command prints the message and exits 2."""


class Failure(RuntimeError):
    """Something present but unusable, or work that could not go on: the command prints it and exits 1."""


def run_command(prog: Optional[str], work: Callable[[], Any], usage: tuple = (), failure: tuple = ()) -> tuple[Any, int]:
    """(work(), 0), or (None, exit code) after `PROG: error: MESSAGE` on stderr: UsageError and the
    `usage` types exit 2, Failure and the `failure` types 1 (each command says which of the errors its
    callees raise mean which; the first that matches wins)."""
    try:
        return work(), EXIT_OK
    except (UsageError, *usage) as error:
        message, code = str(error), EXIT_USAGE
    except (Failure, *failure) as error:
        # an OSError with a file: the file and why, not "[Errno N] ..."
        named = isinstance(error, OSError) and error.filename is not None
        message, code = f"{error.filename}: {error.strerror}" if named else str(error), EXIT_FAILED
    print(f"{prog}: error: {message}" if prog else f"error: {message}", file=sys.stderr, flush=True)
    return None, code
