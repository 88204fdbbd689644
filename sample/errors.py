"""The sampler's errors; common.exits.run_command turns them into exit codes like every command's."""

from common.exits import Failure, UsageError


class SampleUsageError(UsageError):
    """Bad flags or a path that is not there: the CLI prints the message and exits 2."""


class SampleFailure(Failure):
    """Something present but unusable (a corrupt checkpoint): the CLI prints the message and exits 1."""
