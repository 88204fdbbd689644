"""Errors the sampler reports as one line: bad usage (exit 2) and failures (exit 1)."""


class SampleUsageError(ValueError):
    """Bad flags or a path that is not there: the CLI prints the message and exits 2."""


class SampleFailure(RuntimeError):
    """Something present but unusable (a corrupt checkpoint): the CLI prints the message and exits 1."""
