"""Errors the sampler reports as one line: bad usage (exit 2) and failures (exit 1)."""

import sys
from typing import Any, Callable


class SampleUsageError(ValueError):
    """Bad flags or a path that is not there: the CLI prints the message and exits 2."""


class SampleFailure(RuntimeError):
    """Something present but unusable (a corrupt checkpoint): the CLI prints the message and exits 1."""


def run_reporting_errors(prog: str, work: Callable[[], Any]) -> tuple[Any, int]:
    """(work(), 0), or (None, exit code) after one line on stderr for the errors above."""
    try:
        return work(), 0
    except SampleUsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return None, 2
    except SampleFailure as err:
        print(f"{prog}: failed: {err}", file=sys.stderr)
        return None, 1
