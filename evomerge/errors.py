"""User-facing errors.

An ``EvomergeError`` is something the user can fix (a bad path, a bad config
value, a model that does not fit). The CLI prints it as one line, ``error: ...``,
and exits with status 2 -- never a traceback. Its message must name the file,
field, tensor or model at fault.

Every config the user writes (search config, genome, merge recipe, task file, lm-eval
options) is a ``StrictModel``, and every pydantic error becomes one line through
``validation_message``, so a typo reads the same in all of them:
``<file>: <dotted.field>: unknown field``.
"""

import re

from pydantic import BaseModel, ConfigDict, ValidationError


class EvomergeError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(EvomergeError):
    """A config file or field is invalid."""


class CheckpointError(EvomergeError):
    """A model directory cannot be read, or sources do not fit together."""


# -- config models ---------------------------------------------------------------------------

UNKNOWN_FIELD = "unknown field"

# A check on a whole model names the field it is about at the front of its message
# ("base: 'x' is not one of the sources"); that name joins the location instead of repeating it.
_NAMED = re.compile(r"^[A-Za-z_][\w]*(\.\w+)*: ")


class StrictModel(BaseModel):
    """A config model: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


def validation_message(exc: ValidationError, where: str | None, section: str = "") -> str:
    """The first error of ``exc`` as one line, ``<where>: <dotted.field>: <message>``.

    ``where`` names the file (None: no file, e.g. a dict given in Python); ``section`` is the
    dotted path of the validated model within it (``genome`` for a search config's genome)."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in ([section] if section else []) + list(err["loc"]))
    if err["type"] == "extra_forbidden":
        msg = UNKNOWN_FIELD
    else:
        cause = (err.get("ctx") or {}).get("error")
        msg = str(cause) if isinstance(cause, EvomergeError) else err["msg"].removeprefix("Value error, ")
    if _NAMED.match(msg):
        line = f"{loc}.{msg}" if loc else msg
    else:
        line = f"{loc}: {msg}" if loc else msg
    return f"{where}: {line}" if where else line


def validate(model: type[BaseModel], data: object, where: str | None, section: str = ""):
    """``model.model_validate(data)``, a ValidationError raised as a one-line ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, where, section)) from None
