"""Request and response schemas: one definition validates a request and documents it.

Each schema node can check a decoded JSON value (raising :class:`InvalidRequest` that names the
offending parameter) and render itself as JSON Schema (the dialect of OpenAPI 3.1), so
``/openapi.json`` is generated from exactly what the handlers enforce. The ``parse_*`` functions
turn a checked body into the engine's boundary types.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvtier.engine.api import SESSION_ID_PATTERN, ChatMessage, GenerationRequest, SamplingParams
from kvtier.errors import InvalidRequest
_INT64 = (-(2**63), 2**63 - 1)
_MAX_TOKENS_LIMIT = 2**31 - 1

JsonSchema = dict[str, Any]


class Schema(Protocol):
    def check(self, value: Any, param: str) -> Any:
        """The value, converted where the schema says so; raises InvalidRequest naming ``param``."""

    def json_schema(self, components: dict[str, JsonSchema]) -> JsonSchema:
        """JSON Schema; named objects are added to ``components`` and referenced."""


def _fail(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{param or 'body'}: {message}", param or None)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _doc(schema: JsonSchema, description: str, examples: tuple[Any, ...] = ()) -> JsonSchema:
    if description:
        schema["description"] = description
    if examples:
        schema["examples"] = list(examples)
    return schema


@dataclass(frozen=True, slots=True)
class String:
    min_length: int = 0
    max_length: int | None = None
    pattern: str | None = None
    enum: tuple[str, ...] = ()
    description: str = ""
    examples: tuple[str, ...] = ()
    message: str = ""
    """What to say when the value breaks the pattern or the enum."""

    def check(self, value: Any, param: str) -> str:
        if not isinstance(value, str):
            raise _fail(param, f"expected a string, got {_type_name(value)}")
        if self.enum and value not in self.enum:
            raise _fail(param, self.message or f"must be one of {', '.join(self.enum)}")
        if len(value) < self.min_length:
            raise _fail(param, f"must be at least {self.min_length} characters")
        if self.max_length is not None and len(value) > self.max_length:
            raise _fail(param, f"must be at most {self.max_length} characters")
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise _fail(param, self.message or f"must match {self.pattern}")
        return value

    def json_schema(self, components: dict[str, JsonSchema]) -> JsonSchema:
        schema: JsonSchema = {"type": "string"}
        if self.enum:
            schema["enum"] = list(self.enum)
        if self.min_length:
            schema["minLength"] = self.min_length
        if self.max_length is not None:
            schema["maxLength"] = self.max_length
        if self.pattern:
            schema["pattern"] = self.pattern
        return _doc(schema, self.description, self.examples)


@dataclass(frozen=True, slots=True)
class Integer:
    minimum: int | None = None
    maximum: int | None = None
    description: str = ""
    message: str = ""
    """What to say when the value is out of range."""

    def check(self, value: Any, param: str) -> int:
        # JSON Schema counts 2.0 as an integer; so do we.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(param, f"expected an integer, got {_type_name(value)}")
        self._range(value, param)
        return value

    def parse(self, raw: str, param: str) -> int:
        """A query-string value."""
        try:
            value = int(raw, 10)
        except ValueError:
            raise _fail(param, f"expected an integer, got {raw!r}") from None
        self._range(value, param)
        return value

    def _range(self, value: int, param: str) -> None:
        if self.minimum is not None and value < self.minimum:
            raise _fail(param, self.message or f"must be at least {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise _fail(param, self.message or f"must be at most {self.maximum}")

    def json_schema(self, components: dict[str, JsonSchema]) -> JsonSchema:
        return _bounded("integer", self.minimum, self.maximum, self.description)


def _bounded(kind: str, minimum: float | None, maximum: float | None, description: str
             ) -> JsonSchema:
    schema: JsonSchema = {"type": kind}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return _doc(schema, description)


@dataclass(frozen=True, slots=True)
class Number:
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""

    def check(self, value: Any, param: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(param, f"expected a number, got {_type_name(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise _fail(param, "must be finite")
        if self.minimum is not None and value < self.minimum:
            raise _fail(param, f"must be at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise _fail(param, f"must be at most {self.maximum:g}")
        return value

    def json_schema(self, components: dict[str, JsonSchema]) -> JsonSchema:
        return _bounded("number", self.minimum, self.maximum, self.description)


@dataclass(frozen=True, slots=True)
class Boolean:
    const: bool | None = None
    """Only this value is accepted (a feature kvtier does not offer)."""
    description: str = ""
    message: str = ""

    def check(self, value: Any, param: str) -> bool:
        if not isinstance(value, bool):
            raise _fail(param, f"expected a boolean, got {_type_name(value)}")
        if self.const is not None and value is not self.const:
            raise _fail(param, self.message or f"must be {str(self.const).lower()}")
        return value

    def json_schema(self, components: dict[str, JsonSchema]) -> JsonSchema:
        schema: JsonSchema = {"type": "boolean"}
        if self.const is not None:
            schema["const"] = self.const
        return _doc(schema, self.description)


@dataclass(frozen=True, slots=True)
class Array:
    items: Schema
    min_items: int = 0
    max_items: int | None = None
    description: str = ""
    message: str = ""
    """What to say when the array is too long."""

    def check(self, value: Any, param: str) -> list[Any]:
        if not isinstance(value, list):
            raise _fail(param, f"expected an array, got {_type_name(value)}")
        if len(value) < self.min_items:
            raise _fail(param, f"must hold at least {self.min_items} item(s)")
        if self.max_items is not None and len(value) > self.max_items:
            raise _fail(param, self.message or f"must hold at most {self.max_items} item(s)")
        return [self.items.check(item, f"{param}[{i}]") for i, item in enumerate(value)]

    def json_schema(self, components: dict[str, JsonSchema]) -> JsonSchema:
        schema: JsonSchema = {"type": "array", "items": self.items.json_schema(components)}
        if self.min_items:
            schema["minItems"] = self.min_items
        if self.max_items is not None:
            schema["maxItems"] = self.max_items
        return _doc(schema, self.description)


@dataclass(frozen=True, slots=True)
class AnyOf:
    options: tuple[Schema, ...]
    description: str = ""
    message: str = ""

    def check(self, value: Any, param: str) -> Any:
        errors: list[InvalidRequest] = []
        for option in self.options:
            try:
                return option.check(value, param)
            except InvalidRequest as exc:
                errors.append(exc)
        raise _fail(param, self.message) if self.message else errors[-1]

    def json_schema(self, components: dict[str, JsonSchema]) -> JsonSchema:
        return _doc({"anyOf": [o.json_schema(components) for o in self.options]},
                    self.description)


@dataclass(frozen=True, slots=True)
class AnyValue:
    """Anything (documented as a free-form object); used only in responses."""
    description: str = ""

    def check(self, value: Any, param: str) -> Any:
        return value

    def json_schema(self, components: dict[str, JsonSchema]) -> JsonSchema:
        return _doc({"type": "object"}, self.description)


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    schema: Schema
    required: bool = False
    nullable: bool = True
    """Optional fields accept ``null`` as "not given", as many OpenAI clients send it."""
    default: Any = None
    """Documented default (the value used when the field is absent or null)."""


@dataclass(frozen=True, slots=True)
class Object:
    fields: tuple[Field, ...]
    title: str = ""
    """Names the object in ``components/schemas``."""
    description: str = ""
    additional: bool = True
    """Unknown fields are ignored (clients send extensions), unless this is False."""
    _by_name: dict[str, Field] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {f.name: f for f in self.fields})

    def check(self, value: Any, param: str) -> dict[str, Any]:
        """The known fields that are present and not null, checked."""
        if not isinstance(value, dict):
            raise _fail(param, f"expected an object, got {_type_name(value)}")
        out: dict[str, Any] = {}
        for f in self.fields:
            sub = f"{param}.{f.name}" if param else f.name
            if f.name not in value:
                if f.required:
                    raise _fail(sub, "is required")
                continue
            item = value[f.name]
            if item is None and (f.nullable and not f.required):
                continue
            out[f.name] = f.schema.check(item, sub)
        if not self.additional:
            for name in value:
                if name not in self._by_name:
                    raise _fail(f"{param}.{name}" if param else name, "is not a known field")
        return out

    def json_schema(self, components: dict[str, JsonSchema]) -> JsonSchema:
        if self.title and self.title in components:
            return {"$ref": f"#/components/schemas/{self.title}"}
        if self.title:
            components[self.title] = {}  # reserve the name: objects may nest themselves
        properties: dict[str, JsonSchema] = {}
        for f in self.fields:
            prop = f.schema.json_schema(components)
            if f.nullable and not f.required:
                prop = {"anyOf": [prop, {"type": "null"}]}
            if f.default is not None:
                prop["default"] = f.default
            properties[f.name] = prop
        schema: JsonSchema = {"type": "object", "properties": properties}
        required = [f.name for f in self.fields if f.required]
        if required:
            schema["required"] = required
        if not self.additional:
            schema["additionalProperties"] = False
        _doc(schema, self.description)
        if not self.title:
            return schema
        schema["title"] = self.title
        components[self.title] = schema
        return {"$ref": f"#/components/schemas/{self.title}"}


# -- requests ------------------------------------------------------------------------------------

SESSION_ID = String(pattern=SESSION_ID_PATTERN, description="Letters, digits, '_' and '-'.",
                    examples=("my-chat-1",),
                    message="must be 1 to 128 letters, digits, '_' or '-'")
MODEL = String(min_length=1, max_length=256, description=(
    "The model (see GET /v1/models); omitted means the server's default model."))

TEXT_PART = Object(title="TextContentPart", additional=False, fields=(
    Field("type", String(enum=("text",), message="only text content parts are supported"),
          required=True),
    Field("text", String(), required=True),
))
MESSAGE = Object(title="ChatMessage", fields=(
    Field("role", String(enum=("system", "developer", "user", "assistant"),
                         description="'developer' is treated as 'system'."), required=True),
    Field("content", AnyOf((String(), Array(TEXT_PART)),
                           message="must be a string or an array of text parts")),
    Field("name", String()),
))

_DEFAULTS = SamplingParams()
_SAMPLING_FIELDS = (
    Field("model", MODEL),
    Field("temperature", Number(0.0, 2.0, "0 is greedy."), default=_DEFAULTS.temperature),
    Field("top_p", Number(0.0, 1.0), default=_DEFAULTS.top_p),
    Field("top_k", Integer(0, 1_000_000, "llama.cpp extension; 0 disables."),
          default=_DEFAULTS.top_k),
    Field("min_p", Number(0.0, 1.0, "llama.cpp extension."), default=_DEFAULTS.min_p),
    Field("repeat_penalty", Number(0.0, 10.0, "llama.cpp extension; 1 disables."),
          default=_DEFAULTS.repeat_penalty),
    Field("presence_penalty", Number(-2.0, 2.0), default=_DEFAULTS.presence_penalty),
    Field("frequency_penalty", Number(-2.0, 2.0), default=_DEFAULTS.frequency_penalty),
    Field("seed", Integer(*_INT64)),
    Field("stop", AnyOf((String(min_length=1),
                         Array(String(min_length=1), max_items=16)),
                        message="must be a string or an array of at most 16 non-empty strings")),
    Field("n", Integer(1, 1, message="must be 1: kvtier returns one choice per request")),
    Field("stream", Boolean(), default=False),
    Field("stream_options", Object(title="StreamOptions", fields=(
        Field("include_usage", Boolean(), default=False),
    ))),
    Field("user", String()),
)

CHAT_REQUEST = Object(title="ChatCompletionRequest", fields=(
    Field("messages", Array(MESSAGE, min_items=1), required=True),
    *_SAMPLING_FIELDS,
    Field("max_tokens", Integer(1, _MAX_TOKENS_LIMIT,
                                "Omitted: until an end token or the end of the context.")),
    Field("max_completion_tokens", Integer(1, _MAX_TOKENS_LIMIT, "Overrides max_tokens.")),
    Field("session_id", SESSION_ID),
    Field("logprobs", Boolean(const=False, message="log probabilities are not supported")),
    Field("tools", Array(AnyValue(), max_items=0, message="tools are not supported")),
    Field("response_format", Object(title="ResponseFormat", fields=(
        Field("type", String(enum=("text",), message="only the 'text' response format is "
                             "supported"), required=True),
    ))),
))

COMPLETION_REQUEST = Object(title="CompletionRequest", fields=(
    Field("prompt", AnyOf((String(), Array(String(), min_items=1, max_items=1)),
                          message="must be a string or an array of one string"),
          required=True),
    *_SAMPLING_FIELDS,
    Field("max_tokens", Integer(1, _MAX_TOKENS_LIMIT), default=16),
    Field("session_id", SESSION_ID),
    Field("echo", Boolean(const=False, message="echo is not supported")),
    Field("best_of", Integer(1, 1, message="must be 1")),
    Field("logprobs", Integer(0, 0, message="log probabilities are not supported")),
))

FORK_REQUEST = Object(title="ForkSessionRequest", fields=(
    Field("new_id", SESSION_ID),
))

LIST_LIMIT = Integer(1, 100, "Sessions per page.")
SESSION_HEADERS = (
    Field("X-Session-Id", SESSION_ID),
)
SESSION_LIST_QUERY = (
    Field("after", SESSION_ID),
    Field("limit", LIST_LIMIT, default=20),
)


@dataclass(frozen=True, slots=True)
class ParsedGeneration:
    request: GenerationRequest
    stream: bool
    include_usage: bool


def _sampling(body: dict[str, Any], max_tokens: int | None) -> SamplingParams:
    names = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
             "frequency_penalty", "seed")
    values = {name: body[name] for name in names if name in body}
    stop = body.get("stop", ())
    values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return SamplingParams(max_tokens=max_tokens, **values)


def _content(message: dict[str, Any]) -> str:
    content = message.get("content", "")
    if isinstance(content, list):
        return "".join(part["text"] for part in content)
    return content


def _session_id(checked: dict[str, Any], header_session_id: str | None) -> str | None:
    """The body's ``session_id`` wins over the ``X-Session-Id`` header."""
    if "session_id" in checked or header_session_id is None:
        return checked.get("session_id")
    return SESSION_ID.check(header_session_id, "session_id")


def parse_chat(body: Any, header_session_id: str | None, request_id: str) -> ParsedGeneration:
    checked = CHAT_REQUEST.check(body, "")
    session_id = _session_id(checked, header_session_id)
    messages = tuple(
        ChatMessage("system" if m["role"] == "developer" else m["role"], _content(m))
        for m in checked["messages"])
    max_tokens = checked.get("max_completion_tokens", checked.get("max_tokens"))
    return ParsedGeneration(
        GenerationRequest(messages=messages, sampling=_sampling(checked, max_tokens),
                          session_id=session_id, model=checked.get("model"),
                          request_id=request_id),
        stream=checked.get("stream", False),
        include_usage=checked.get("stream_options", {}).get("include_usage", False))


def parse_completion(body: Any, header_session_id: str | None, request_id: str
                     ) -> ParsedGeneration:
    checked = COMPLETION_REQUEST.check(body, "")
    prompt = checked["prompt"]
    return ParsedGeneration(
        GenerationRequest(prompt=prompt if isinstance(prompt, str) else prompt[0],
                          sampling=_sampling(checked, checked.get("max_tokens", 16)),
                          session_id=_session_id(checked, header_session_id),
                          model=checked.get("model"), request_id=request_id),
        stream=checked.get("stream", False),
        include_usage=checked.get("stream_options", {}).get("include_usage", False))


def parse_query(fields: tuple[Field, ...], query: Any) -> dict[str, Any]:
    """Query-string parameters (strings) checked against their schemas."""
    out: dict[str, Any] = {}
    for f in fields:
        raw = query.get(f.name)
        if raw is None:
            if f.default is not None:
                out[f.name] = f.default
            continue
        if isinstance(f.schema, Integer):
            out[f.name] = f.schema.parse(raw, f.name)
        else:
            out[f.name] = f.schema.check(raw, f.name)
    return out


# -- responses (documentation, and the tests' conformance checks) -------------------------------

_STR = String()
_INT = Integer()


def _req(name: str, schema: Schema) -> Field:
    return Field(name, schema, required=True, nullable=False)


def _null(name: str, schema: Schema) -> Field:
    """Always present, possibly null."""
    return Field(name, AnyOf((schema, _NULL)), required=True, nullable=False)


@dataclass(frozen=True, slots=True)
class _Null:
    def check(self, value: Any, param: str) -> None:
        if value is not None:
            raise _fail(param, "expected null")

    def json_schema(self, components: dict[str, JsonSchema]) -> JsonSchema:
        return {"type": "null"}


_NULL = _Null()
FINISH_REASON = String(enum=("stop", "length"))

USAGE = Object(title="Usage", fields=(
    _req("prompt_tokens", _INT),
    _req("completion_tokens", _INT),
    _req("total_tokens", _INT),
    _req("prompt_tokens_details", Object(title="PromptTokensDetails", fields=(
        _req("cached_tokens", Integer(description=(
            "Prompt tokens whose KV was reused or restored from the cache, not computed."))),
    ))),
))
_COMMON = (_req("id", _STR), _req("created", _INT), _req("model", _STR))
CHAT_COMPLETION = Object(title="ChatCompletion", fields=(
    *_COMMON,
    _req("object", String(enum=("chat.completion",))),
    _req("choices", Array(Object(title="ChatChoice", fields=(
        _req("index", _INT),
        _req("message", Object(title="AssistantMessage", fields=(
            _req("role", String(enum=("assistant",))),
            _req("content", _STR),
        ))),
        _req("finish_reason", FINISH_REASON),
        _null("logprobs", AnyValue()),
    )), min_items=1, max_items=1)),
    _req("usage", USAGE),
    Field("session_id", SESSION_ID),
))
COMPLETION = Object(title="Completion", fields=(
    *_COMMON,
    _req("object", String(enum=("text_completion",))),
    _req("choices", Array(Object(title="CompletionChoice", fields=(
        _req("index", _INT),
        _req("text", _STR),
        _req("finish_reason", FINISH_REASON),
        _null("logprobs", AnyValue()),
    )), min_items=1, max_items=1)),
    _req("usage", USAGE),
))
CHAT_CHUNK = Object(title="ChatCompletionChunk", fields=(
    *_COMMON,
    _req("object", String(enum=("chat.completion.chunk",))),
    _req("choices", Array(Object(title="ChatChunkChoice", fields=(
        _req("index", _INT),
        _req("delta", Object(title="ChatDelta", fields=(
            Field("role", String(enum=("assistant",))),
            Field("content", _STR),
        ))),
        _null("finish_reason", FINISH_REASON),
        _null("logprobs", AnyValue()),
    )), max_items=1)),
    Field("usage", USAGE),
    Field("session_id", SESSION_ID),
))
COMPLETION_CHUNK = Object(title="CompletionChunk", fields=(
    *_COMMON,
    _req("object", String(enum=("text_completion",))),
    _req("choices", Array(Object(title="CompletionChunkChoice", fields=(
        _req("index", _INT),
        _req("text", _STR),
        _null("finish_reason", FINISH_REASON),
        _null("logprobs", AnyValue()),
    )), max_items=1)),
    Field("usage", USAGE),
))
MODEL_OBJECT = Object(title="Model", fields=(
    _req("id", _STR),
    _req("object", String(enum=("model",))),
    _req("created", _INT),
    _req("owned_by", _STR),
))
MODEL_LIST = Object(title="ModelList", fields=(
    _req("object", String(enum=("list",))),
    _req("data", Array(MODEL_OBJECT)),
))
_SESSION_FIELDS = (
    _req("id", SESSION_ID),
    _req("object", String(enum=("session",))),
    _req("created", Number(description="Unix time.")),
    _req("last_used", Number(description="Unix time.")),
    _req("model", _STR),
    _req("n_tokens", _INT),
    _req("n_messages", _INT),
    _req("blocks_per_tier", AnyValue("Stored KV blocks per tier name.")),
    _null("parent", SESSION_ID),
)
SESSION_SUMMARY = Object(title="SessionSummary", fields=_SESSION_FIELDS)
SESSION = Object(title="Session", fields=(
    *_SESSION_FIELDS,
    _req("messages", Array(Object(title="StoredMessage", fields=(
        _req("role", _STR), _req("content", _STR))))),
))
SESSION_LIST = Object(title="SessionList", fields=(
    _req("object", String(enum=("list",))),
    _req("data", Array(SESSION_SUMMARY)),
    _null("first_id", SESSION_ID),
    _null("last_id", SESSION_ID),
    _req("has_more", Boolean()),
))
SESSION_DELETED = Object(title="SessionDeleted", fields=(
    _req("id", SESSION_ID),
    _req("object", String(enum=("session.deleted",))),
    _req("deleted", Boolean()),
))
TIER_STATS = Object(title="TierStats", fields=(
    _req("name", _STR),
    *(_req(name, Number()) for name in ("blocks", "bytes", "budget", "compression_ratio",
                                        "hits", "misses", "promotions", "demotions", "drops")),
    Field("corrupt", Number(description="Records that failed their checksum.")),
))
CACHE_STATS = Object(title="CacheStats", fields=(
    _req("object", String(enum=("cache.stats",))),
    _req("tiers", Array(TIER_STATS)),
    _req("tokens", Object(title="TokenCounts", fields=tuple(
        _req(name, _INT) for name in ("restored", "prefilled", "hot_reused", "generated")))),
    _req("slots", Object(title="SlotCounts", fields=tuple(
        _req(name, _INT) for name in ("total", "busy", "queued")))),
    Field("throughput", AnyValue("Measured prefill and restore speeds (tokens/s) that decide "
                                 "between restoring and recomputing.")),
))
HEALTH = Object(title="Health", fields=(
    _req("status", String(enum=("ok", "shutting_down"))),
    _req("model", _STR),
    _req("slots", AnyValue("total, busy, queued")),
    _req("cache", Array(Object(title="TierSummary", fields=(
        _req("name", _STR), _req("blocks", _INT), _req("bytes", _INT))))),
))
ERROR = Object(title="Error", fields=(
    _req("error", Object(title="ErrorDetail", fields=(
        _req("message", _STR),
        _req("type", _STR),
        _null("param", _STR),
        _null("code", _STR),
    ))),
))
