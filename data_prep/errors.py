"""The one exception type of data_prep."""


class DataError(ValueError):
    """Bad input data or a bad prepared folder; str() is one line naming the file, key or value at fault."""

    def __init__(self, message: str):
        # Callers print str(error) as the whole diagnosis, so keep it on one line.
        super().__init__(" ".join(str(message).split()))


def one_line(error: BaseException) -> str:
    """A library's error as one short line for a DataError's parentheses (its type's name if it has no text)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."
