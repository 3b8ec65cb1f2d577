"""The engine boundary: what every model backend receives and yields.

Nothing here imports torch. A request reaches an engine as a `GenerationRequest`: chat messages
whose content is text and image placeholders, the decoded images (Pillow, RGB, first frame, EXIF
orientation applied) in the order the placeholders appear, and the sampling parameters. The
engine yields `Delta`s: text as it is made, then a last one with the finish reason and counts.

An engine that forwards requests rather than running a model (`remote`) says so with
`EngineInfo.needs_pixels = False`: it is then given no decoded images, only `sources`, the
checked images as they came (bytes, format, size, detail), which it passes on as data URIs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from PIL import Image

Role = Literal["system", "developer", "user", "assistant"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class TextSegment:
    text: str


@dataclass(frozen=True)
class ImageSegment:
    """Placeholder for `GenerationRequest.images[index]`."""

    index: int


Segment = TextSegment | ImageSegment


@dataclass(frozen=True)
class Message:
    role: Role
    content: tuple[Segment, ...]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.content if isinstance(s, TextSegment))


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the engine's default / the context
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # run to max_tokens: the end-of-text token is never chosen
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # which of temperature / top_p the request or the model's catalog entry set (the others
    # are OpenAI's defaults): a remote engine forwards only these
    chosen: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ImageSource:
    """A checked image as the client sent it: what a forwarding engine passes on."""

    data: bytes
    format: str  # "png", "jpeg", "gif", "webp": sniffed from the bytes
    width: int
    height: int
    detail: str = "auto"  # "low": to be shrunk to fit 560 x 560 before the model sees it
    url: str | None = None  # the data URI the client sent, when it can be passed on as it is


@dataclass
class GenerationRequest:
    messages: Sequence[Message]
    images: Sequence[Image.Image]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    sources: Sequence[ImageSource] = ()  # the same images, undecoded
    stream: bool = True  # whether the client reads the answer as it comes


@dataclass(frozen=True)
class Delta:
    """A piece of the answer. The last delta of a generation has `finish_reason` set and the
    engine's own counts (prompt positions including image positions, generated tokens)."""

    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    image_positions: int | None = None
    completion_tokens: int | None = None
    upstream: str | None = None  # a remote engine: the server that answered


@dataclass(frozen=True)
class EngineInfo:
    id: str
    engine: str  # "transformers", "remote", ...
    context_length: int
    owned_by: str = "oculo"
    created: int = 0
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    needs_pixels: bool = True  # False: `generate` reads `sources`, not decoded `images`


@runtime_checkable
class Engine(Protocol):
    @property
    def info(self) -> EngineInfo: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the answer. Closing the iterator early (client gone) stops generation."""
        ...

    def count_text_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens the model's tokenizer sees for the rendered prompt, image positions excluded."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class Startable(Protocol):
    """An engine with background work (health checks) to start on the server's event loop."""

    async def start(self) -> None: ...
