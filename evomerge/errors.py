"""User-facing errors.

An ``EvomergeError`` is something the user can fix (a bad path, a bad config
value, a model that does not fit). The CLI prints it as one line, ``error: ...``,
and exits with status 2 -- never a traceback. Its message must name the file,
field, tensor or model at fault.
"""


class EvomergeError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(EvomergeError):
    """A config file or field is invalid."""


class CheckpointError(EvomergeError):
    """A model directory cannot be read, or sources do not fit together."""
