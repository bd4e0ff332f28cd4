"""OpenAI's HTTP API as pydantic models: requests (strict: wrong types, unknown fields and values
out of range are errors that name the field) and responses (what the `openai` client reads).

Fields follow OpenAI's schema for /v1/completions and /v1/chat/completions field by field; fields
OpenAI defines that jaxlm does not implement (penalties, logit_bias, tools, ...) are declared so
that their default value passes and any other value is a 400 that says so. jaxlm's extras are
`top_k`, `min_p` and `repetition_penalty` (the sampler's knobs). `prompt`, `stop` and message
`content` take several JSON shapes; they are checked by hand so the error says which shapes
are allowed instead of listing every failed union branch.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_N = 16  # choices per prompt
MAX_STOP = 8  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string
MAX_LOGPROBS = 20  # alternatives per token
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_MESSAGES = 1024  # messages in one chat request
INT64 = 2**63


# (field, its "off" value, a hint) for OpenAI fields that are declared but not implemented
UNSUPPORTED = (("frequency_penalty", 0.0, " (use repetition_penalty)"), ("presence_penalty", 0.0,
               " (use repetition_penalty)"), ("logit_bias", {}, ""), ("suffix", "", ""), ("tools", [], ""),
               ("tool_choice", "none", ""))


class ProtocolError(ValueError):
    """A request the server cannot take: HTTP status, OpenAI error type, the field at fault."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code
        self.retry_after = retry_after  # seconds, sent as Retry-After (429, 503)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MAX_JSON_DEPTH = 64


def _reject_constant(name: str):
    raise ProtocolError(f"the body is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ProtocolError(f"the body holds the number {text[:40]}, which is out of range for a float")
    return x


def _check_tree(obj: Any, path: str, depth: int) -> None:
    """Nesting depth and text that UTF-8 cannot carry (lone surrogates from \\ud800 escapes)."""
    if depth > MAX_JSON_DEPTH:
        raise ProtocolError(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(f"{path or 'the body'}: the string holds a lone surrogate (\\ud800-\\udfff "
                                "escape without its pair), which is not Unicode text", param=path or None) from None
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_tree(k, path, depth + 1)
            _check_tree(v, f"{path}.{k}" if path else k, depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_tree(v, f"{path}.{i}" if path else str(i), depth + 1)


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object, strictly: UTF-8 only, no NaN/Infinity (Python's json takes
    them), no float overflow (1e999), no lone surrogates, bounded nesting. Raises ProtocolError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"the body is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError(f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, and ints over Python's digit limit
        if "Exceeds the limit" in str(e):
            raise ProtocolError("the body holds an integer with more than 4300 digits") from None
        raise ProtocolError(f"the body is not valid JSON: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"the body must be a JSON object, not {type(obj).__name__}")
    _check_tree(obj, "", 0)
    return obj


def validation_error(e: ValidationError, model: type[BaseModel]) -> ProtocolError:
    """The first pydantic error as one line naming the field and what is allowed."""
    err = e.errors(include_url=False)[0]
    loc = [str(x) for x in err["loc"]]
    param = ".".join(loc) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        if len(loc) == 1:
            allowed = ", ".join(sorted(model.model_fields))
            return ProtocolError(f"unknown field {param!r}; allowed fields: {allowed}", param=param)
        return ProtocolError(f"unknown field {param!r}", param=param)
    if err["type"] == "missing":
        return ProtocolError(f"{param}: this field is required", param=param)
    if err["type"] == "literal_error" and "input" in err:
        return ProtocolError(f"{param}: {str(err['input'])[:40]!r} is not allowed; {msg[0].lower()}{msg[1:]}",
                             param=param)
    return ProtocolError(f"{param}: {msg}" if param else msg, param=param)


def parse_request(obj: dict, model: type[BaseModel]):
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e, model) from None


def _check_stop(v: Any) -> list[str]:
    """`stop`: null, a string or a list of at most MAX_STOP non-empty strings."""
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError(f"must be a string or a list of at most {MAX_STOP} strings")
    if len(items) > MAX_STOP:
        raise ValueError(f"has {len(items)} strings; at most {MAX_STOP} are allowed")
    for s in items:
        if not s:
            raise ValueError("stop strings must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters (one has {len(s)})")
    return list(items)


class _Strict(BaseModel):
    # strict: "1" is not a number, 1 is not a bool, 1.0 is not an int; forbid: a misspelled field
    # is an error instead of a silently ignored setting.
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    """OpenAI's response_format.json_schema: a named JSON schema (`strict` is accepted either way:
    jaxlm always enforces the schema while decoding, infer/structured.py)."""

    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=4096)
    schema_: dict = Field(..., alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs the json_schema field ({"name": ..., "schema": {...}})')
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f'json_schema is only allowed with type "json_schema", not {self.type!r}')
        return self

    def as_dict(self) -> dict:
        out: dict = {"type": self.type}
        if self.json_schema is not None:
            out["json_schema"] = {"name": self.json_schema.name, "schema": self.json_schema.schema_}
        return out


class _SamplingFields(_Strict):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(None, max_length=256)  # optional when the server holds one model
    max_tokens: int | None = Field(None, ge=1, lt=INT64)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Any = Field(default_factory=list)  # normalized to list[str] by _stop
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None  # not implemented: only 0 passes (see _unsupported)
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256)  # accepted and ignored, as OpenAI's end-user id
    response_format: ResponseFormat | None = None  # JSON output enforced while decoding (infer/structured.py)
    # jaxlm extras (the sampler's knobs)
    top_k: int = Field(0, ge=0, lt=2**31)  # 0 = off
    min_p: float = Field(0.0, ge=0.0, lt=1.0)  # 0 = off
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # 1 = off

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        return _check_stop(v)

    @model_validator(mode="after")
    def _unsupported(self):
        """OpenAI fields jaxlm does not implement pass only at their 'off' value."""
        for name, off, hint in UNSUPPORTED:
            value = getattr(self, name, None)
            if value is not None and value != off:
                raise ValueError(f"{name} is not supported by this server{hint}; send {off!r} or leave it out")
        return self

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Any
    max_tokens: int | None = Field(None, ge=0, lt=INT64)  # 0 with echo + logprobs: score the prompt only
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None  # not implemented: only "" passes

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, v: Any) -> list[str] | list[list[int]]:
        """One shape out: a list of strings or a list of token-id lists, non-empty throughout."""
        shapes = "a non-empty string, a list of strings, a list of token ids or a list of token-id lists"
        if isinstance(v, str):
            v = [v]
        elif isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            v = [v]
        if not isinstance(v, list) or not v:
            raise ValueError(f"must be {shapes}")
        if len(v) > MAX_PROMPTS:
            raise ValueError(f"holds {len(v)} prompts; at most {MAX_PROMPTS} are allowed")
        if all(isinstance(p, str) for p in v):
            if not all(v):
                raise ValueError("must not be empty")
            return v
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in v):
            return v
        raise ValueError(f"must be {shapes}")

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of={self.best_of} is not supported; only best_of equal to n")
        return self


class ChatMessage(_Strict):
    """One message of the conversation; `content` is a string or a list of text parts."""

    role: Literal["system", "user", "assistant"]
    content: Any
    name: str | None = Field(None, max_length=64)

    @field_validator("content", mode="plain")
    @classmethod
    def _content(cls, v: Any) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v:
            texts = []
            for part in v:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                        and set(part) <= {"type", "text"}):
                    raise ValueError('must be a string or a list of {"type": "text", "text": string} parts '
                                     "(jaxlm models read text only)")
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError('must be a string or a list of {"type": "text", "text": string} parts')


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, lt=INT64)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # declared so that clients sending their defaults pass; any use is a 400 naming the field
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)

    @model_validator(mode="after")
    def _chat_rules(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; send one of them")
        return self


# ---- responses ----------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    """OpenAI's completions logprobs: per token its text, log-probability, top alternatives and
    character offset into the choice's text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "jaxlm"
    max_model_len: int | None = None  # vLLM's extension: the context in tokens


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
