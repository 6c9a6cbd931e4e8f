"""The one error type every checkpoint problem is reported with."""


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit: the message names the file and what was expected."""
