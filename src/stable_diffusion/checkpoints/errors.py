"""The one error type every checkpoint problem is reported with."""


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit: the message names the file and what was expected."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message as one short line (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
