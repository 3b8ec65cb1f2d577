"""The wire contract: OpenAI's chat-completion request and response shapes as pydantic models.

Requests are parsed straight from bytes (`parse_chat_request`); a failure becomes an
`InvalidRequest`/`InvalidJSON` whose `param` names the offending field in OpenAI's dotted form
(`messages[1].content[0].image_url.url`) and whose message never echoes the input (a data URI
can be a megabyte of base64).

Union branches carry tags that start with `~` so that they can be dropped from error locations.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
)

from oculo.errors import InvalidJSON, InvalidRequest

# --------------------------------------------------------------------------- requests


class _Lenient(BaseModel):
    """Request models ignore fields they do not know, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_string(cls, value: Any) -> Any:
        # Some clients send "image_url": "data:..." instead of {"url": ...}.
        return {"url": value} if isinstance(value, str) else value


def _part_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"~{kind}" if kind in ("text", "image_url") else None


ContentPart = Annotated[
    Annotated[TextPart, Tag("~text")] | Annotated[ImagePart, Tag("~image_url")],
    Discriminator(
        _part_tag,
        custom_error_type="invalid_content_part",
        custom_error_message="content parts must have type 'text' or 'image_url'",
    ),
]


def _content_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "~str"
    if isinstance(value, list | tuple):
        return "~parts"
    return None


Content = Annotated[
    Annotated[str, Tag("~str")] | Annotated[list[ContentPart], Tag("~parts")],
    Discriminator(
        _content_tag,
        custom_error_type="invalid_content",
        custom_error_message="content must be a string or an array of content parts",
    ),
]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Content | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class JSONSchemaFormat(_Lenient):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatCompletionRequest(_Lenient):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    # vLLM's, SGLang's and llama.cpp's extension: never end at the end-of-text token, so that
    # the answer runs to max_tokens (load tests; a fixed output length)
    ignore_eos: bool = False
    n: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    user: str | None = None
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if len(value) > 4:
                raise ValueError("at most 4 stop sequences are allowed")
            if any(s == "" for s in value):
                raise ValueError("stop sequences must not be empty")
        return value

    @property
    def wants_usage_chunk(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# --------------------------------------------------------------------------- parsing


def param_of(loc: tuple[int | str, ...]) -> str | None:
    """('messages', 1, 'content', '~parts', 0, 'image_url', 'url') -> messages[1].content[0]..."""
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif item.startswith("~") or item.startswith("function-"):
            continue
        else:
            out += f".{item}" if out else item
    return out or None


def _describe(error: Any) -> str:
    """A pydantic error in words, without the input value."""
    kind = error["type"]
    msg = str(error["msg"])
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind == "literal_error":
        return msg[0].lower() + msg[1:]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return msg[0].lower() + msg[1:] if msg else "is invalid"


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        raise request_error(exc) from None


def request_error(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return InvalidJSON(
            "The request body is not valid JSON: "
            + str(first.get("ctx", {}).get("error", "parse error")),
        )
    if first["type"] == "model_type" and not first["loc"]:
        return InvalidJSON("The request body must be a JSON object.")
    # Prefer the deepest location: it names the precise field.
    best = max(errors, key=lambda e: len(e["loc"]))
    param = param_of(tuple(best["loc"]))
    if best["type"] == "invalid_content_part" and param:
        param += ".type"
    where = param or "request body"
    return InvalidRequest(f"Invalid value for '{where}': {_describe(best)}.", param=param)


# --------------------------------------------------------------------------- responses


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptTokensDetails(_Wire):
    cached_tokens: int = 0
    image_tokens: int = 0


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(_Wire):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None


class Choice(_Wire):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(_Wire):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ChunkDelta(_Wire):
    """A streamed delta; fields that are None are left out, as OpenAI does (`{}` at the end)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(_Wire):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_Wire):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None

    @model_serializer(mode="wrap")
    def _usage_only_when_present(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("usage") is None:
            data.pop("usage", None)
        return data


class ModelCard(_Wire):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(_Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]
