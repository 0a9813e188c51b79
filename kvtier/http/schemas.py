"""Request bodies and parameters of the HTTP API as pydantic models, and their engine types.

One definition validates a request and documents it: /openapi.json is generated from these models
(:mod:`kvtier.http.openapi`), so it shows exactly what the handlers enforce. Types are strict, as
JSON Schema reads them: ``"2"`` is not a number and ``1`` is not ``true``, but ``2.0`` is an
integer. ``null`` for an optional field means "not given", as many OpenAI clients send it. Unknown
fields are ignored (clients send extensions), except inside a content part. :func:`parse` turns
the first validation error into an :class:`InvalidRequest` that names the parameter
(``messages[0].content``); the ``parse_*`` functions convert a checked body into the engine's
boundary types, in this one place.

Importing this module must not load llama.cpp: it needs pydantic and :mod:`kvtier.engine.api`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, \
    TypeAdapter, ValidationError, ValidatorFunctionWrapHandler, WrapValidator, model_validator
from pydantic_core import PydanticCustomError

from kvtier.engine import api
from kvtier.errors import InvalidRequest
from kvtier.validation import first_error

_INT64 = 2**63
_MAX_TOKENS_LIMIT = 2**31 - 1
_DEFAULTS = api.SamplingParams()
_DOC_KEYS = ("title", "description", "default", "examples")

M = TypeVar("M", bound=BaseModel)


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integral = BeforeValidator(_integral)
"""JSON Schema counts ``2.0`` as an integer; so do we. Put it after the bounds in ``Annotated``
(pydantic then keeps them in the schema)."""


def _a_boolean(value: Any) -> Any:
    # Literal[False] alone would take 0, which JSON Schema's "const": false refuses.
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


Boolean = BeforeValidator(_a_boolean)


_INVALID_UNICODE = "invalid_unicode"


def _utf8(value: str) -> str:
    # JSON may escape a lone surrogate ("\\ud800"): such a str has no UTF-8 form to tokenize.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            _INVALID_UNICODE, "contains a lone surrogate (U+{code}) at character {at}; text "
            "must be valid Unicode", {"code": f"{ord(value[exc.start]):04X}",
                                      "at": exc.start}) from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]
"""A string the model can read: valid Unicode, so it has a UTF-8 form (no lone surrogates)."""


def Explained(message: str) -> WrapValidator:
    """Any error of the value becomes ``message``: one sentence instead of a union's branches."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            # Invalid text inside an accepted shape says so, not what shapes are accepted.
            for error in exc.errors():
                if error["type"] == _INVALID_UNICODE:
                    raise PydanticCustomError(_INVALID_UNICODE, error["msg"]) from None
            raise ValueError(message) from None

    return WrapValidator(check)


def _null_allowed(schema: dict[str, Any]) -> None:
    """Optional properties accept null ("not given") in the published schema too."""
    required = set(schema.get("required", ()))
    properties = schema.get("properties", {})
    for name, prop in properties.items():
        if name in required or {"type": "null"} in prop.get("anyOf", ()):
            continue
        inner = {key: value for key, value in prop.items() if key not in _DOC_KEYS}
        options = inner["anyOf"] if list(inner) == ["anyOf"] else [inner]
        properties[name] = {**{key: prop[key] for key in _DOC_KEYS if key in prop},
                            "anyOf": [*options, {"type": "null"}]}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, use_attribute_docstrings=True,
                              json_schema_extra=_null_allowed)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        optional = {name for name, f in cls.model_fields.items() if not f.is_required()}
        return {name: value for name, value in data.items()
                if value is not None or name not in optional}


SessionId = Annotated[
    str, Field(pattern=api.SESSION_ID_PATTERN, description="Letters, digits, '_' and '-'.",
               examples=["my-chat-1"]),
    Explained("must be 1 to 128 letters, digits, '_' or '-'")]
_SESSION_ID = TypeAdapter(SessionId)


class TextContentPart(_Request):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    """'developer' is treated as 'system'."""
    content: Annotated[Text | list[TextContentPart],
                       Explained("must be a string or an array of text parts")] = ""
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: Annotated[Literal["text"],
                    Explained("only the 'text' response format is supported")]


_StopString = Annotated[Text, Field(min_length=1)]


class _Generation(_Request):
    """What chat and text completions share: the model, sampling, streaming and the session."""

    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """The model (see GET /v1/models); omitted means the server's default model."""
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = _DEFAULTS.temperature
    """0 is greedy."""
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = _DEFAULTS.top_p
    top_k: Annotated[int, Field(ge=0, le=1_000_000), Integral] = _DEFAULTS.top_k
    """llama.cpp extension; 0 disables."""
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = _DEFAULTS.min_p
    """llama.cpp extension."""
    repeat_penalty: Annotated[float, Field(ge=0.0, le=10.0)] = _DEFAULTS.repeat_penalty
    """llama.cpp extension; 1 disables."""
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = _DEFAULTS.presence_penalty
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = _DEFAULTS.frequency_penalty
    seed: Annotated[int, Field(ge=-_INT64, le=_INT64 - 1), Integral] | None = None
    stop: Annotated[_StopString | Annotated[list[_StopString], Field(max_length=16)],
                    Explained("must be a string or an array of at most 16 non-empty strings")
                    ] | None = None
    n: Annotated[int, Field(ge=1, le=1), Integral,
                 Explained("must be 1: kvtier returns one choice per request")] = 1
    stream: bool = False
    stream_options: StreamOptions = Field(default_factory=StreamOptions)
    user: str | None = None
    session_id: SessionId | None = None
    """Continue (or create) this session; wins over the X-Session-Id header."""


class ChatCompletionRequest(_Generation):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=_MAX_TOKENS_LIMIT), Integral] | None = None
    """Omitted: until an end token or the end of the context."""
    max_completion_tokens: Annotated[int, Field(ge=1, le=_MAX_TOKENS_LIMIT), Integral
                                     ] | None = None
    """Overrides max_tokens."""
    logprobs: Annotated[Literal[False], Boolean,
                        Explained("log probabilities are not supported")] = False
    tools: Annotated[list[dict[str, Any]], Field(max_length=0),
                     Explained("tools are not supported")] = []
    response_format: ResponseFormat | None = None


class CompletionRequest(_Generation):
    prompt: Annotated[Text | Annotated[list[Text], Field(min_length=1, max_length=1)],
                      Explained("must be a string or an array of one string")]
    max_tokens: Annotated[int, Field(ge=1, le=_MAX_TOKENS_LIMIT), Integral] = 16
    echo: Annotated[Literal[False], Boolean, Explained("echo is not supported")] = False
    best_of: Annotated[int, Field(ge=1, le=1), Integral, Explained("must be 1")] = 1
    logprobs: Annotated[int, Field(ge=0, le=0), Integral,
                        Explained("log probabilities are not supported")] | None = None


class ForkSessionRequest(_Request):
    new_id: SessionId | None = None
    """The new session's id; omitted: a random one."""


class SessionListQuery(BaseModel):
    """Query parameters: strings, converted (``limit=5``), unlike JSON bodies."""

    model_config = ConfigDict(use_attribute_docstrings=True)
    after: SessionId | None = None
    """The last id of the previous page."""
    limit: Annotated[int, Field(ge=1, le=100)] = 20
    """Sessions per page."""


# -- validation and conversion -------------------------------------------------------------------

def parse(model: type[M], data: Any) -> M:
    """``data`` checked as ``model``; the first error becomes an InvalidRequest naming the param."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        param, message = first_error(exc)
        raise InvalidRequest(f"{param or 'body'}: {message}", param or None) from None


def session_id_param(value: str, param: str = "session_id") -> str:
    """A session id from a path or a header, checked like one in a body."""
    try:
        return _SESSION_ID.validate_python(value)
    except ValidationError as exc:
        raise InvalidRequest(f"{param}: {first_error(exc)[1]}", param) from None


def session_list_query(query: Mapping[str, str]) -> SessionListQuery:
    """GET /v1/sessions's query string, checked."""
    return parse(SessionListQuery, dict(query))


@dataclass(frozen=True, slots=True)
class ParsedGeneration:
    """The engine's request, and how to answer it."""

    request: api.GenerationRequest
    stream: bool
    include_usage: bool


def _sampling(body: _Generation, max_tokens: int | None) -> api.SamplingParams:
    stop = body.stop or ()
    return api.SamplingParams(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        repeat_penalty=body.repeat_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, seed=body.seed, max_tokens=max_tokens,
        stop=(stop,) if isinstance(stop, str) else tuple(stop))


def _content(message: ChatMessage) -> str:
    if isinstance(message.content, list):
        return "".join(part.text for part in message.content)
    return message.content


def _session_id(body: _Generation, header_session_id: str | None) -> str | None:
    """The body's ``session_id`` wins over the ``X-Session-Id`` header."""
    if body.session_id is not None or header_session_id is None:
        return body.session_id
    return session_id_param(header_session_id)


def _generation(body: _Generation, header_session_id: str | None, request_id: str,
                tenant: str, max_tokens: int | None, **prompt: Any) -> ParsedGeneration:
    return ParsedGeneration(
        api.GenerationRequest(sampling=_sampling(body, max_tokens),
                              session_id=_session_id(body, header_session_id),
                              model=body.model, request_id=request_id, tenant=tenant, **prompt),
        stream=body.stream, include_usage=body.stream_options.include_usage)


def parse_chat(body: Any, header_session_id: str | None, request_id: str,
               tenant: str = api.DEFAULT_TENANT) -> ParsedGeneration:
    """A chat completion body as ``tenant``'s request to the engine."""
    chat = parse(ChatCompletionRequest, body)
    messages = tuple(api.ChatMessage("system" if m.role == "developer" else m.role, _content(m))
                     for m in chat.messages)
    max_tokens = chat.max_completion_tokens if chat.max_completion_tokens is not None \
        else chat.max_tokens
    return _generation(chat, header_session_id, request_id, tenant, max_tokens,
                       messages=messages)


def parse_completion(body: Any, header_session_id: str | None, request_id: str,
                     tenant: str = api.DEFAULT_TENANT) -> ParsedGeneration:
    """A text completion body as ``tenant``'s request to the engine."""
    completion = parse(CompletionRequest, body)
    prompt = completion.prompt if isinstance(completion.prompt, str) else completion.prompt[0]
    return _generation(completion, header_session_id, request_id, tenant,
                       completion.max_tokens, prompt=prompt)
