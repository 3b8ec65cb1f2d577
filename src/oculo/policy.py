"""The API's limits, applied to a parsed request: the result is an engine-neutral `Prompt`.

After this module nothing sees base64 or raw JSON (but for the data URI string each image keeps,
which only a remote engine reads, to pass it on unchanged). Image checks here read headers only
(format by magic bytes, width/height/frames, the pixel cap, the image count) and compute the
token estimate; decoding happens later, off the event loop (`decode_images`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from oculo.engines.base import (
    ImageSegment,
    ImageSource,
    Message,
    SamplingParams,
    Segment,
    TextSegment,
)
from oculo.errors import InvalidRequest, TooManyImages, UnsupportedParameter
from oculo.media import InspectedImage, decode, image_tokens, inspect_image
from oculo.protocol import ChatCompletionRequest, ImagePart, TextPart


@dataclass(frozen=True)
class Limits:
    max_images: int = 2
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class PromptImage:
    param: str  # where the image was in the request, for error messages
    image: InspectedImage
    detail: str
    tokens: int
    url: str  # the data URI as sent: a remote engine passes it on unchanged

    def source(self) -> ImageSource:
        header = self.image.header
        return ImageSource(
            data=self.image.data,
            format=header.format,
            width=header.width,
            height=header.height,
            detail=self.detail,
            url=self.url,
        )


@dataclass(frozen=True)
class Prompt:
    model: str
    messages: tuple[Message, ...]
    images: tuple[PromptImage, ...]
    sampling: SamplingParams
    stream: bool
    include_usage: bool

    @property
    def image_tokens(self) -> int:
        return sum(img.tokens for img in self.images)


def _check_parameters(request: ChatCompletionRequest) -> None:
    if request.n not in (None, 1):
        raise UnsupportedParameter(
            "Only n=1 is supported: send one request per completion you need.", param="n"
        )
    if request.logprobs:
        raise UnsupportedParameter("logprobs are not supported.", param="logprobs")
    if request.tools:
        raise UnsupportedParameter("Tool calls are not supported.", param="tools")
    if request.response_format is not None and request.response_format.type != "text":
        raise UnsupportedParameter(
            f"response_format type {request.response_format.type!r} is not supported yet; "
            "use 'text' and ask for JSON in the prompt.",
            param="response_format.type",
        )


def _count_images(request: ChatCompletionRequest) -> int:
    return sum(
        1
        for message in request.messages
        if isinstance(message.content, list)
        for part in message.content
        if isinstance(part, ImagePart)
    )


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves `temperature` / `top_p` out gets: OpenAI's 1.0, unless the
    model's catalog entry says otherwise (as a Modelfile's PARAMETER does for Ollama)."""

    temperature: float | None = None  # None: OpenAI's 1.0
    top_p: float | None = None


def _sampling(request: ChatCompletionRequest, defaults: SamplingDefaults) -> SamplingParams:
    stop = request.stop
    stops: tuple[str, ...] = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(s == "" for s in stops):
        raise InvalidRequest("Stop sequences must not be empty.", param="stop")
    temperature = defaults.temperature if request.temperature is None else request.temperature
    top_p = defaults.top_p if request.top_p is None else request.top_p
    chosen = frozenset(
        name
        for name, value in (("temperature", temperature), ("top_p", top_p))
        if value is not None
    )
    return SamplingParams(
        max_tokens=request.max_completion_tokens or request.max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        chosen=chosen,
        stop=stops,
        seed=request.seed,
        ignore_eos=request.ignore_eos,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
    )


def build_prompt(
    request: ChatCompletionRequest, limits: Limits, defaults: SamplingDefaults = SamplingDefaults()
) -> Prompt:
    """Check the request against the API's limits and turn it into a Prompt."""
    _check_parameters(request)
    count = _count_images(request)
    if count > limits.max_images:
        raise TooManyImages(
            f"A request may contain at most {limits.max_images} images; this one has {count}.",
            param="messages",
        )
    messages: list[Message] = []
    images: list[PromptImage] = []
    for i, message in enumerate(request.messages):
        content = message.content
        if content is None:
            if message.role == "assistant":
                continue
            raise InvalidRequest(
                f"Invalid value for 'messages[{i}].content': is required.",
                param=f"messages[{i}].content",
            )
        segments: list[Segment] = []
        if isinstance(content, str):
            segments.append(TextSegment(content))
        else:
            for j, part in enumerate(content):
                if isinstance(part, TextPart):
                    segments.append(TextSegment(part.text))
                    continue
                if message.role != "user":
                    raise InvalidRequest(
                        f"Image parts are only allowed in user messages, not in a "
                        f"{message.role} message.",
                        param=f"messages[{i}].content[{j}]",
                    )
                param = f"messages[{i}].content[{j}].image_url.url"
                inspected = inspect_image(
                    part.image_url.url, param=param, max_pixels=limits.max_pixels
                )
                detail = part.image_url.detail
                tokens = image_tokens(inspected.header.width, inspected.header.height, detail)
                segments.append(ImageSegment(len(images)))
                images.append(PromptImage(param, inspected, detail, tokens, part.image_url.url))
        role = "system" if message.role == "developer" else message.role
        messages.append(Message(role=role, content=tuple(segments)))
    return Prompt(
        model=request.model,
        messages=tuple(messages),
        images=tuple(images),
        sampling=_sampling(request, defaults),
        stream=request.stream,
        include_usage=request.wants_usage_chunk,
    )


def decode_images(images: Sequence[PromptImage], limits: Limits) -> list[Image.Image]:
    """Decode every accepted image (blocking: run it in a worker thread)."""
    return [
        decode(
            img.image.data,
            img.image.header,
            max_pixels=limits.max_pixels,
            detail=img.detail,
            param=img.param,
        )
        for img in images
    ]
