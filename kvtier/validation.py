"""pydantic validation errors in kvtier's words: where the bad value is, and what is wrong.

Request bodies (the HTTP API) and settings (the config file, ``--set``) are both validated by
pydantic models; both report a bad value as a path and a short phrase, e.g.
``messages[0].role: must be one of 'system', 'user', ...`` or ``model.block_size: must be a
multiple of 16``. Validators state their own rule by raising ``ValueError("must ...")``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

# pydantic's error types, phrased the way kvtier has always phrased them: ``{shown}`` is the input
# as JSON (shortened), the other fields are pydantic's context of the error.
_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "is not a known field",
    "string_type": "expected a string, got {shown}",
    "int_type": "expected an integer, got {shown}",
    "int_parsing": "expected an integer, got {shown}",
    "float_type": "expected a number, got {shown}",
    "bool_type": "expected true or false, got {shown}",
    "list_type": "expected an array, got {shown}",
    "model_type": "expected an object, got {shown}",
    "dict_type": "expected an object, got {shown}",
    "literal_error": "must be one of {expected}, got {shown}",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be more than {gt}",
    "less_than_equal": "must be at most {le}",
    "multiple_of": "must be a multiple of {multiple_of}",
    "finite_number": "must be finite",
    "string_too_short": "must be at least {min_length} character(s) long",
    "string_too_long": "must be at most {max_length} characters long",
    "too_short": "must hold at least {min_length} item(s)",
    "too_long": "must hold at most {max_length} item(s)",
    "value_error": "{error}",
}


def location(loc: tuple[int | str, ...]) -> str:
    """``messages[0].content`` for ``('messages', 0, 'content')``; empty for the whole value."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def describe(error: ErrorDetails) -> str:
    """What is wrong, as a phrase that follows the value's location."""
    template = _MESSAGES.get(error["type"])
    if template is None:
        return error["msg"]
    context = {name: _number(value) for name, value in error.get("ctx", {}).items()}
    return template.format(shown=_shown(error["input"]), **context)


def first_error(exc: ValidationError) -> tuple[str, str]:
    """The first error's location and description (pydantic lists errors in field order)."""
    error = exc.errors(include_url=False)[0]
    return location(error["loc"]), describe(error)


def _shown(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _number(value: Any) -> Any:
    """``2`` rather than ``2.0`` for a bound written as a float."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
