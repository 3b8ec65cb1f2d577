"""Oculo messages as Hugging Face chat messages, and chat templates that refuse a conversation.

`to_hf_messages` turns the messages into Hugging Face chat messages: content lists of
`{"type": "text"}` and `{"type": "image", "image": <PIL image>}` parts, in order, with `developer`
sent as `system`.

`first_rendering` renders a conversation with a chat template, coping with templates that refuse
it: if the template raises (some reject a system role, or turns that do not alternate), it retries
with the system / developer text folded into the first user turn ("system text\\n\\n" + user text,
Gemma's own convention), then also with consecutive turns of one role merged; if the template still
refuses, the request is an `InvalidRequest` on `messages`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from jinja2 import TemplateError
from PIL import Image

from oculo.engines.base import ImageSegment, Message, TextSegment
from oculo.errors import InvalidRequest

__all__ = ["HFMessage", "first_rendering", "to_hf_messages"]

HFMessage = dict[str, Any]
T = TypeVar("T")


def to_hf_messages(
    messages: Sequence[Message], images: Sequence[Image.Image] | None
) -> list[HFMessage]:
    """Hugging Face chat messages; image parts carry their image (dropped if `images` is None).

    System and developer messages become one `system` text part (some templates read only the
    first part of a system message). A message left without parts gets one empty text part, since
    templates index `content[0]`.
    """
    out: list[HFMessage] = []
    for message in messages:
        if message.role in ("system", "developer"):
            out.append({"role": "system", "content": [{"type": "text", "text": message.text}]})
            continue
        parts: list[dict[str, Any]] = []
        for segment in message.content:
            if isinstance(segment, TextSegment):
                parts.append({"type": "text", "text": segment.text})
            elif isinstance(segment, ImageSegment) and images is not None:
                if not 0 <= segment.index < len(images):
                    raise InvalidRequest(
                        f"An image part refers to image {segment.index}, but the request has "
                        f"{len(images)} images.",
                        param="messages",
                    )
                parts.append({"type": "image", "image": images[segment.index]})
        out.append({"role": message.role, "content": parts or [{"type": "text", "text": ""}]})
    return out


def _conversation_variants(conversation: list[HFMessage]) -> Iterator[list[HFMessage]]:
    """The conversation as given, then with system text folded in, then with turns merged."""
    yield conversation
    if any(m["role"] == "system" for m in conversation):
        conversation = _fold_system(conversation)
        yield conversation
    roles = [m["role"] for m in conversation]
    if any(a == b for a, b in itertools.pairwise(roles)):
        yield _merge_turns(conversation)


def _fold_system(conversation: list[HFMessage]) -> list[HFMessage]:
    """Move the system text to the start of the first user turn, as Gemma's template does."""
    system = "\n\n".join(
        part["text"]
        for m in conversation
        if m["role"] == "system"
        for part in m["content"]
        if part["type"] == "text" and part["text"]
    )
    rest = [m for m in conversation if m["role"] != "system"]
    if not system:
        return rest
    prefix = {"type": "text", "text": system + "\n\n"}
    for i, message in enumerate(rest):
        if message["role"] == "user":
            content = message["content"]
            if content and content[0]["type"] == "text":
                first = {"type": "text", "text": prefix["text"] + content[0]["text"]}
                content = [first, *content[1:]]
            else:
                content = [prefix, *content]
            return [*rest[:i], {"role": "user", "content": content}, *rest[i + 1 :]]
    return [{"role": "user", "content": [{"type": "text", "text": system}]}, *rest]


def _merge_turns(conversation: list[HFMessage]) -> list[HFMessage]:
    """Merge consecutive messages of one role into one (text joined by a blank line)."""
    merged: list[HFMessage] = []
    for message in conversation:
        if merged and merged[-1]["role"] == message["role"]:
            previous = list(merged[-1]["content"])
            content = list(message["content"])
            if previous and content and previous[-1]["type"] == content[0]["type"] == "text":
                joined = previous[-1]["text"] + "\n\n" + content[0]["text"]
                previous[-1] = {"type": "text", "text": joined}
                content = content[1:]
            merged[-1] = {"role": message["role"], "content": previous + content}
        else:
            merged.append(message)
    return merged


def first_rendering(conversation: list[HFMessage], render: Callable[[list[HFMessage]], T]) -> T:
    """`render` applied to the first variant of the conversation the chat template accepts."""
    refusal: TemplateError | None = None
    for variant in _conversation_variants(conversation):
        try:
            return render(variant)
        except TemplateError as exc:
            refusal = refusal or exc
    raise InvalidRequest(
        f"The model's chat template does not accept this conversation: {refusal}",
        param="messages",
    ) from refusal
