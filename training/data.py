"""Training and evaluation examples: a scene, its image(s), a chat, and the one right answer.

`make_example(rng, style)` draws a question type (weighted), one or two scenes, renders them, and
builds the chat exactly as a client of the API would send it (an optional system message, a user
turn with the image(s) and the question), plus the answer the assistant must give.

`make_chat(rng)` is the training form: often several questions about the same image in one chat
(each answered), so that one drawn image, and one pass of the vision tower over it, teaches the
language model several answers. Evaluation asks one question per chat, as clients mostly do.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
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
    # further (question, answer) turns about the same image(s), asked after the first answer
    more: list[tuple[str, str]] = field(default_factory=list)

    def turns(self) -> list[tuple[str, str]]:
        return [(self.question, self.answer), *self.more]

    def messages(self, *, answered: bool = False) -> list[dict[str, Any]]:
        """The chat in Hugging Face's format (image placeholders), as the engine renders it.

        Without `answered`: up to the first question (the prompt). With it: every turn with its
        answer, the whole conversation a training example is.
        """
        parts: list[dict[str, Any]] = [{"type": "image"} for _ in self.images]
        text = {"type": "text", "text": self.question}
        content = [*parts, text] if self.image_first else [text, *parts]
        chat: list[dict[str, Any]] = []
        if self.system is not None:
            chat.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        chat.append({"role": "user", "content": content})
        if not answered:
            return chat
        for k, (question, answer) in enumerate(self.turns()):
            if k:
                chat.append({"role": "user", "content": [{"type": "text", "text": question}]})
            chat.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return chat


def sample_scene(
    rng: random.Random,
    text_rate: float,
    number_rate: float,
    bitmap_face: float,
    bitmap_numbers: float | None,
    text_anywhere: float = 0.0,
    text_drift: float = 0.0,
) -> tuple[world.Scene, bool | None]:
    """A training scene, and whether its text is to be printed in the bitmap face.

    With `bitmap_numbers` None the face is chosen when the text is drawn (`world._draw_text`)
    and this draws nothing more than `world.sample_scene` does (None). Otherwise the face is
    chosen first, a `bitmap_face` share of the time, and the bitmap face's texts are numbers
    `bitmap_numbers` of the time (the other faces' `number_rate`). `text_anywhere` and
    `text_drift`: see `world.sample_scene`."""
    bitmap: bool | None = None
    rate = number_rate
    if bitmap_numbers is not None and bitmap_face:
        bitmap = rng.random() < bitmap_face
        rate = bitmap_numbers if bitmap else number_rate
    scene = world.sample_scene(
        rng,
        text_rate=text_rate,
        number_rate=rate,
        text_anywhere=text_anywhere,
        text_drift=text_drift,
    )
    return scene, bitmap


def make_example(
    rng: random.Random,
    style: world.Style = "train",
    kind: world.QuestionType | None = None,
    *,
    system_rate: float = 0.35,
    draw_max: int | None = None,
    made_faces: float = 0.0,
    bitmap_face: float = 0.0,
    real_faces: float = 0.0,
    text_rate: float | None = None,
    number_rate: float = world.NUMBER_RATE,
    bitmap_numbers: float | None = None,
    text_anywhere: float = 0.0,
    text_drift: float = 0.0,
    shapes: world.ShapeVariety = world.TRAINING_SHAPES,
    bitmap_wide: float | None = None,
) -> Example:
    if kind is None:
        kinds = list(TRAIN_MIX)
        kind = rng.choices(kinds, weights=[TRAIN_MIX[k] for k in kinds])[0]
    system = rng.choice(world.SYSTEM_PROMPTS) if rng.random() < system_rate else None
    image_first = rng.random() < 0.8
    if kind == "pair":
        rate = 0.5 if text_rate is None else text_rate
        sampled = [
            sample_scene(
                rng, rate, number_rate, bitmap_face, bitmap_numbers, text_anywhere, text_drift
            )
            for _ in range(2)
        ]
        question, answer = world.ask_pair(sampled[0][0], sampled[1][0], rng)
    else:
        rate = (0.75 if kind == "text" else 0.4) if text_rate is None else text_rate
        sampled = [
            sample_scene(
                rng, rate, number_rate, bitmap_face, bitmap_numbers, text_anywhere, text_drift
            )
        ]
        question, answer = world.ask(sampled[0][0], rng, kind)
    scenes = [scene for scene, _ in sampled]
    drawn = [
        world.render_labelled(
            scene,
            rng,
            style,
            draw_max=draw_max,
            made_faces=made_faces,
            bitmap_face=bitmap_face,
            real_faces=real_faces,
            bitmap=bitmap,
            shapes=shapes,
            bitmap_wide=bitmap_wide,
        )
        for scene, bitmap in sampled
    ]
    images = [image for image, _ in drawn]
    labels = [label for _, label in drawn]
    return Example(kind, system, question, answer, images, image_first, scenes, labels)


# Several questions about one image: how often, and how many at most.
MULTI_RATE = 0.5
MULTI_TURNS = 4
SYSTEM_RATE = 0.35


def make_chat(
    rng: random.Random,
    kind: world.QuestionType,
    *,
    turns: int | None = None,
    system: bool | None = None,
    draw_max: int | None = None,
    made_faces: float = 0.0,
    bitmap_face: float = 0.0,
    real_faces: float = 0.0,
    text_rate: float | None = None,
    number_rate: float = world.NUMBER_RATE,
    bitmap_numbers: float | None = None,
    mix: Mapping[world.QuestionType, float] = TRAIN_MIX,
    text_anywhere: float = 0.0,
    text_drift: float = 0.0,
    shapes: world.ShapeVariety = world.TRAINING_SHAPES,
    bitmap_wide: float | None = None,
) -> Example:
    """A training chat: `kind` first, and (for one image) possibly further questions about the
    same image. A description, which names everything, is only ever the last turn, so no earlier
    answer gives away what a later question asks the image for.

    `turns` (1 to MULTI_TURNS questions; drawn when None: one half the time, else 2 to
    MULTI_TURNS) and `system` (whether a system message comes first; drawn when None) let a
    batch give all its rows the same layout, so that they pad to similar lengths. `draw_max`,
    `made_faces`, `bitmap_face` and `real_faces`: see `world.render_labelled`; `text_rate`, how
    often a scene has printed text (None: the question's own rate, as evaluation draws them) and
    `number_rate`, how often that text is a number: see `world.sample_scene`;
    `bitmap_numbers`, how often the bitmap face's texts are (None: `number_rate`, and the face
    chosen as the text is drawn): see `sample_scene`; `mix`, the weights the further questions
    are drawn with (`TRAIN_MIX`, or `train.py --mix`); `text_anywhere`, the share of texts
    printed at a random height, and `text_drift`, the share of the others printed anywhere in
    their band: see `world.sample_scene`; `shapes`, how varied the shapes are drawn
    (`world.ShapeVariety`); `bitmap_wide`, the bitmap face's share on wide pictures: see
    `world.render_labelled`."""
    if turns is None:
        turns = 1 if rng.random() >= MULTI_RATE else rng.randint(2, MULTI_TURNS)
    if system is None:
        system = rng.random() < SYSTEM_RATE
    if kind == "pair" or turns == 1:
        return make_example(
            rng,
            kind=kind,
            system_rate=1.0 if system else 0.0,
            draw_max=draw_max,
            made_faces=made_faces,
            bitmap_face=bitmap_face,
            real_faces=real_faces,
            text_rate=text_rate,
            number_rate=number_rate,
            bitmap_numbers=bitmap_numbers,
            text_anywhere=text_anywhere,
            text_drift=text_drift,
            shapes=shapes,
            bitmap_wide=bitmap_wide,
        )
    singles = [k for k in mix if k != "pair"]
    kinds = [kind, *rng.choices(singles, weights=[mix[k] for k in singles], k=turns - 1)]
    kinds = [k for k in kinds if k != "describe"] + (["describe"] if "describe" in kinds else [])
    prompt = rng.choice(world.SYSTEM_PROMPTS) if system else None
    rate = (0.6 if "text" in kinds else 0.4) if text_rate is None else text_rate
    scene, bitmap = sample_scene(
        rng, rate, number_rate, bitmap_face, bitmap_numbers, text_anywhere, text_drift
    )
    asked: list[tuple[str, str]] = []
    for k in kinds:
        question, answer = world.ask(scene, rng, k)
        if all(question != q for q, _ in asked):
            asked.append((question, answer))
    image, labels = world.render_labelled(
        scene,
        rng,
        draw_max=draw_max,
        made_faces=made_faces,
        bitmap_face=bitmap_face,
        real_faces=real_faces,
        bitmap=bitmap,
        shapes=shapes,
        bitmap_wide=bitmap_wide,
    )
    (question, answer), *more = asked
    return Example(
        kinds[0], prompt, question, answer, [image], rng.random() < 0.8, [scene], [labels], more
    )
