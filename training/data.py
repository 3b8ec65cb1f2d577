"""Training and evaluation examples: a scene, its image(s), a chat, and the one right answer.

`make_example(rng, style)` draws a question type (weighted), one or two scenes, renders them, and
builds the chat exactly as a client of the API would send it (an optional system message, a user
turn with the image(s) and the question), plus the answer the assistant must give.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from training import world

# How often each question type is drawn for training.
TRAIN_MIX: dict[world.QuestionType, float] = {
    "describe": 0.26,
    "count": 0.10,
    "color": 0.17,
    "exists": 0.17,
    "text": 0.18,
    "pair": 0.12,
}


@dataclass
class Example:
    kind: world.QuestionType
    system: str | None
    question: str
    answer: str
    images: list[Image.Image]  # as drawn (RGB); evaluation sends them through a file format
    image_first: bool = True
    scenes: list[world.Scene] = field(default_factory=list)  # one per image
    labels: list[world.Labels] = field(default_factory=list)  # where things are, per image

    def messages(self) -> list[dict[str, Any]]:
        """The chat in Hugging Face's format (image placeholders), as the engine renders it."""
        parts: list[dict[str, Any]] = [{"type": "image"} for _ in self.images]
        text = {"type": "text", "text": self.question}
        content = [*parts, text] if self.image_first else [text, *parts]
        chat: list[dict[str, Any]] = []
        if self.system is not None:
            chat.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        chat.append({"role": "user", "content": content})
        return chat


def make_example(
    rng: random.Random,
    style: world.Style = "train",
    kind: world.QuestionType | None = None,
    *,
    system_rate: float = 0.35,
) -> Example:
    if kind is None:
        kinds = list(TRAIN_MIX)
        kind = rng.choices(kinds, weights=[TRAIN_MIX[k] for k in kinds])[0]
    system = rng.choice(world.SYSTEM_PROMPTS) if rng.random() < system_rate else None
    image_first = rng.random() < 0.8
    if kind == "pair":
        first, second = world.sample_scene(rng), world.sample_scene(rng)
        question, answer = world.ask_pair(first, second, rng)
        scenes = [first, second]
    else:
        scene = world.sample_scene(rng, text_rate=0.75 if kind == "text" else 0.4)
        question, answer = world.ask(scene, rng, kind)
        scenes = [scene]
    drawn = [world.render_labelled(scene, rng, style) for scene in scenes]
    images = [image for image, _ in drawn]
    labels = [label for _, label in drawn]
    return Example(kind, system, question, answer, images, image_first, scenes, labels)
