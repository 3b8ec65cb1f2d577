"""Score a checkpoint: exact-match accuracy per question type on freshly drawn, held-out images.

    .venv/bin/python -m training.evaluate --model src/oculo/models/oculo-tiny [--n 200] [--card]

Two sets, both drawn from seeds the training never uses:
  held-out   the training drawing routine, new scenes;
  different  another drawing routine (anti-aliased edges, other shape proportions and sizes, a
             blocky bitmap font, JPEG / WebP / PNG / animated GIF files decoded as the server does).
Answers come from the real serving path: images are sent through oculo's media code (data URI,
sniffing, header probe, Pillow decode) and answered by `TransformersEngine` with greedy decoding.
Beside them, reading in typefaces the model never saw: words and numbers printed in a face made
up for each (`training/typefaces.py`), which no shipped recipe trains on; reported on a line of its
own, with no target (the issue's "different" set is about how an image is made, not the face).
With `--card`, the table is written into the checkpoint's model card (README.md).

`--lookups N` adds a diagnostic of the two question types that need a look-up: N plain scenes of
three different shapes in three different colours, each shape's colour asked, and "Is there ...?"
once for a pair that is there and once for its colour on another shape. A model that does not look
the named shape up names one colour for all three and says one word to every yes/no question:
the report counts both.

`--reading N` adds a diagnostic of reading: N text questions about images with text, on each
set, split by what was printed (numbers, words), by how wide its glyphs are at the model's input
(the image is stretched to a square there, so a wide image's glyphs come out narrow; numbers and
words apart too), by how much the image is stretched, and by the kind of mistake: an answer of
the wrong length (a character dropped or doubled) or of the right length with characters
confused, and which ones.

`--faces N` asks N text questions about images with text in each of three ways of printing
it: the training routine's usual face (Pillow's FreeType one, as the held-out set prints), Pillow's
6x11 bitmap face drawn the training's way (the share `train.py --bitmap-face` trains on), and the
different set's own texts (that bitmap face drawn its way). Scored as `--reading` scores them, and
the share of characters read in place: whether a face is read worse where it is drawn as trained
(the face is what is lost) or only where it is drawn otherwise (the drawing is).

`--placement N` asks N text questions a set about images with text, each image drawn five times
with the word at another height (`PLACEMENTS`): where both routines print it (centred in a band
at the top of the picture), at the top or the bottom of that band (a few pixels up or down), and
in a band across the middle or at the bottom of the picture; the same scenes and words each time.
Scored as the reading rows are: the share read whole.

`--seed-scene` asks the seed's question ("What is in this image?", after the seed's system
message) about the issue's picture, a blue star and the text "GO", in 12 drawings (640x480,
320x240, 1120x840 and 200x200, three seeds each), and counts the answers that name a blue star and
those that read "GO". `--pairs N` asks for N two-image descriptions on each set and
counts those right whole, and of the wrong ones, those wrong only in a printed text (the scene
described right, a word misread) and the rest (a shape, a colour or whether there is text); and
it asks "Describe the image." about each of the pair's two images alone (the same decoded
pixels), so that `alone` splits the pairs by how many of their images are described right alone:
a pair wrong whose images are both right alone was lost to answering about two at once.

`--scenes N` asks for N descriptions on each set and scores their shapes alone (the printed text
aside): the share right, by the number of shapes, by the smallest shape's shorter side at the
model's input, by how much the image is stretched to make it square, by the file format it was
sent in and by how its shapes were drawn (a square's corners rounded, a shape stretched or shaped
past the shipped training routine's proportions, the picture blurred: `world.Labels`); and what
the wrong ones get wrong (how many shapes, their order, a shape, a colour), which shapes are named
for which (each drawn shape with how it was drawn), and how often the answer says there is text
where there is none or none where there is.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

from oculo.engines.base import (
    GenerationRequest,
    ImageSegment,
    Message,
    SamplingParams,
    Segment,
    TextSegment,
)
from oculo.media import decode, inspect_image
from training import world
from training.data import Example, make_example

SETS: dict[str, world.Style] = {"held-out": "train", "different": "alt"}
TARGETS = {"describe": 90, "count": 90, "color": 90, "exists": 90, "text": 80, "pair": 90}
# Reading, scored apart: the "text" questions about images that have printed text (a "text"
# question about an image without any is answered "There is no text.", which a model that cannot
# read gets right too), as whole words and as characters in place; and whole again, split into
# numbers (random digits: nothing but the image says what they are) and words (from a list the
# language model knows, so a word half read can still come out whole).
READING = {
    "read": ("reading (images with text)", 80),
    "read_chars": ("characters read", None),
    "read_words": ("words read", None),
    "read_numbers": ("numbers read", None),
}


def reading_kind(printed: str) -> str:
    """Which reading row a printed text counts in besides "read": numbers or words."""
    return "read_numbers" if printed.isdigit() else "read_words"


def quoted(answer: str) -> str:
    """The word an answer says the image prints (its first quoted part), or ""."""
    found = re.search(r'"([^"]*)"', answer)
    return found.group(1) if found else ""


def characters_right(got: str, want: str) -> tuple[int, int]:
    """How many of the printed word's characters the answer's quoted word has in place."""
    said = quoted(got)
    return sum(a == b for a, b in zip(said, want, strict=False)), len(want)


def through_server_media(example: Example, rng: random.Random, style: world.Style) -> list[Any]:
    """Encode each image as a client would and decode it with oculo's own media code."""
    return sent(example, rng, style)[0]


def sent(example: Example, rng: random.Random, style: world.Style) -> tuple[list[Any], list[str]]:
    """`through_server_media`, and the file format each image was sent in ("png", "jpeg", ...)."""
    decoded, formats = [], []
    for image in example.images:
        data, mime = world.encode(image, rng, style)
        uri = f"data:{mime};base64," + base64.b64encode(data).decode()
        inspected = inspect_image(uri, param="image", max_pixels=40_000_000)
        decoded.append(
            decode(inspected.data, inspected.header, max_pixels=40_000_000, param="image")
        )
        formats.append(mime.removeprefix("image/"))
    return decoded, formats


def to_messages(example: Example) -> list[Message]:
    images: list[Segment] = [ImageSegment(i) for i in range(len(example.images))]
    question: list[Segment] = [TextSegment(example.question)]
    user = (*images, *question) if example.image_first else (*question, *images)
    messages = [Message("user", tuple(user))]
    if example.system is not None:
        messages.insert(0, Message("system", (TextSegment(example.system),)))
    return messages


async def answer(engine: Any, example: Example, images: list[Any]) -> str:
    request = GenerationRequest(
        messages=to_messages(example),
        images=images,
        sampling=SamplingParams(max_tokens=64, temperature=0.0),
    )
    return "".join([delta.text async for delta in engine.generate(request)])


@asynccontextmanager
async def served(model: Path) -> AsyncIterator[Any]:
    """`model` loaded as oculo serves it (`TransformersEngine`), closed at the end."""
    from oculo.engines.transformers import TransformersEngine

    engine = TransformersEngine(model, model_id="eval")
    try:
        yield engine
    finally:
        await engine.close()


async def evaluate(model: Path, n: int, seed: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    mistakes: dict[str, list[dict[str, str]]] = defaultdict(list)
    async with served(model) as engine:
        for name, style in SETS.items():
            rng = random.Random(f"evaluate:{name}:{seed}")
            scores: dict[str, list[int]] = {}
            chars = [0, 0]
            for kind in world.QUESTION_TYPES:
                hits = []
                for _ in range(n):
                    example = make_example(rng, style, kind)
                    images = through_server_media(example, rng, style)
                    got = await answer(engine, example, images)
                    ok = world.normalize(got) == world.normalize(example.answer)
                    hits.append(int(ok))
                    printed = example.scenes[0].text if kind == "text" else None
                    if printed:
                        scores.setdefault("read", []).append(int(ok))
                        scores.setdefault(reading_kind(printed), []).append(int(ok))
                        right, total = characters_right(got, printed)
                        chars[0] += right
                        chars[1] += total
                    if not ok and len(mistakes[f"{name}/{kind}"]) < 5:
                        mistakes[f"{name}/{kind}"].append(
                            {"q": example.question, "want": example.answer, "got": got}
                        )
                scores[kind] = hits
            results[name] = {k: round(100 * sum(v) / len(v), 1) for k, v in scores.items()}
            results[name]["read_chars"] = round(100 * chars[0] / max(1, chars[1]), 1)
        unseen = await unseen_faces(engine, n, seed)
    return {
        "accuracy": results,
        "unseen_faces": unseen,
        "n": n,
        "seed": seed,
        "mistakes": dict(mistakes),
    }


def with_text(
    rng: random.Random,
    style: world.Style,
    n: int,
    made_faces: float = 0.0,
    bitmap_face: float = 0.0,
) -> Iterator[tuple[Example, str]]:
    """`n` text questions drawn by `style` about images that do have text printed, and the text
    (the others drawn are skipped). `made_faces`, `bitmap_face`: see `world.render_labelled`."""
    asked = 0
    while asked < n:
        example = make_example(rng, style, "text", made_faces=made_faces, bitmap_face=bitmap_face)
        printed = example.scenes[0].text
        if printed:
            asked += 1
            yield example, printed


async def unseen_faces(engine: Any, n: int, seed: int) -> dict[str, float]:
    """Reading in typefaces the model never saw: `n` images of the training routine whose word
    or number is printed in a face made up for it (`training/typefaces.py`, which the shipped
    recipe does not train on), asked what the text says. Whole texts and characters in place."""
    rng = random.Random(f"evaluate:unseen-faces:{seed}")
    whole = chars = total = 0
    for example, printed in with_text(rng, "train", n, made_faces=1.0):
        got = await answer(engine, example, through_server_media(example, rng, "train"))
        whole += world.normalize(got) == world.normalize(example.answer)
        right, length = characters_right(got, printed)
        chars += right
        total += length
    return {"read": round(100 * whole / n, 1), "read_chars": round(100 * chars / total, 1)}


def _plain_scene(rng: random.Random) -> world.Scene:
    shapes = rng.sample(world.SHAPES, 3)
    colors = rng.sample(list(world.COLORS), 3)
    items = tuple(world.Item(s, c) for s, c in zip(shapes, colors, strict=True))
    return world.Scene(items, None, 256, 256, "plain")


async def lookups(model: Path, n: int, seed: int) -> dict[str, Any]:
    """The look-up diagnostic (see the module's docstring)."""
    rng = random.Random(f"lookups:{seed}")
    colours = one_colour = yes_no = said_yes = 0
    async with served(model) as engine:
        for _ in range(n):
            scene = _plain_scene(rng)
            image = world.render(scene, rng)
            named = set()
            for item in scene.items:
                example = Example("color", None, f"What color is the {item.shape}?", "", [image])
                got = world.normalize(await answer(engine, example, [image]))
                colours += got == item.color
                named.add(got)
            one_colour += len(named) == 1
            present = scene.items[rng.randrange(3)]
            other = next(i for i in scene.items if i is not present)
            for color, shape, want in (
                (present.color, present.shape, "yes"),
                (present.color, other.shape, "no"),
            ):
                question = f"Is there {world._a(color)} {shape}?"
                example = Example("exists", None, question, "", [image])
                got = world.normalize(await answer(engine, example, [image]))
                yes_no += got == want
                said_yes += got == "yes"
    return {
        "scenes": n,
        "colour_right": round(colours / (3 * n), 3),
        "one_colour_for_all_three": round(one_colour / n, 3),
        "yes_no_right": round(yes_no / (2 * n), 3),
        "said_yes": round(said_yes / (2 * n), 3),
    }


SEED_SCENE_SIZES = ((640, 480), (320, 240), (1120, 840), (200, 200))


async def seed_scene(model: Path) -> dict[str, Any]:
    """The seed-scene diagnostic (see the module's docstring)."""
    answers: Counter[str] = Counter()
    async with served(model) as engine:
        for width, height in SEED_SCENE_SIZES:
            for k in range(3):
                rng = random.Random(f"seed-scene:{width}:{k}")
                scene = world.Scene((world.Item("star", "blue"),), "GO", width, height, "plain")
                image = world.render(scene, rng, "train")
                question = "What is in this image?"
                example = Example("describe", world.SYSTEM_PROMPTS[0], question, "", [image])
                got = await answer(engine, example, through_server_media(example, rng, "train"))
                answers[got] += 1
    return {
        "drawings": answers.total(),
        "blue_star": sum(n for a, n in answers.items() if "blue star" in a.lower()),
        "reads_go": sum(n for a, n in answers.items() if '"GO"' in a),
        "answers": dict(answers.most_common()),
    }


def pair_mistake(got: str, want: str) -> str | None:
    """None if a two-image description is right; "text" if it is wrong only in what it quotes
    (the printed words), "scene" if a shape, a colour or whether there is text is wrong."""
    if world.normalize(got) == world.normalize(want):
        return None
    unquoted = [world.normalize(re.sub(r'"[^"]*"', '""', a)) for a in (got, want)]
    return "text" if unquoted[0] == unquoted[1] else "scene"


def wrong_halves(got: str, want: str) -> str:
    """Which of a wrong two-image description's halves ("The first image shows ...", "The second
    image shows ...") differ from the right one's: "first", "second", "both", or "unparsed"."""
    cut = "the second image shows"
    got_parts = world.normalize(got).split(cut)
    want_parts = world.normalize(want).split(cut)
    if len(got_parts) != 2 or len(want_parts) != 2:
        return "unparsed"
    first, second = (
        world.normalize(a) != world.normalize(b) for a, b in zip(got_parts, want_parts, strict=True)
    )
    return which_of_two(first, second) or "both"


def which_of_two(first: bool, second: bool) -> str | None:
    """Which of two things a pair of flags marks: "first", "second", "both", or None."""
    return {(True, False): "first", (False, True): "second", (True, True): "both"}.get(
        (first, second)
    )


async def described_alone(engine: Any, pair: Example, images: list[Any], i: int) -> bool:
    """Whether the pair's image `i`, sent alone (as decoded for the pair) and asked "Describe the
    image." with the pair's system message, is described right."""
    alone = Example(
        kind="describe",
        system=pair.system,
        question="Describe the image.",
        answer=world.describe(pair.scenes[i]),
        images=[pair.images[i]],
        scenes=[pair.scenes[i]],
    )
    got = await answer(engine, alone, [images[i]])
    return world.normalize(got) == world.normalize(alone.answer)


async def pairs(model: Path, n: int, seed: int) -> dict[str, Any]:
    """The two-image diagnostic (see the module's docstring), on each set."""

    def tally(rng: random.Random, style: world.Style) -> Iterator[tuple[Example, list[Any]]]:
        for _ in range(n):
            example = make_example(rng, style, "pair")
            yield example, through_server_media(example, rng, style)

    report: dict[str, Any] = {}
    async with served(model) as engine:
        for name, style in SETS.items():
            # the held-out set's seed as before the different set was asked too: its counts stand
            rng = random.Random(f"pairs:{seed}" if style == "train" else f"pairs:{seed}:{style}")
            verdicts: Counter[str | None] = Counter()
            together: Counter[str] = Counter()
            halves: Counter[str] = Counter()
            wrong: list[dict[str, str]] = []
            for example, images in tally(rng, style):
                got = await answer(engine, example, images)
                verdict = pair_mistake(got, example.answer)
                verdicts[verdict] += 1
                alone = [await described_alone(engine, example, images, i) for i in (0, 1)]
                outcome = "wrong" if verdict else "right"
                together[f"{outcome}_as_pair_{sum(alone)}_right_alone"] += 1
                if verdict:
                    wrong_alone = which_of_two(not alone[0], not alone[1]) or "none"
                    halves[f"{wrong_halves(got, example.answer)}_half;alone_{wrong_alone}"] += 1
                if verdict and len(wrong) < 5:
                    wrong.append({"want": example.answer, "got": got})
            report[name] = {
                "n": n,
                "right": verdicts[None],
                "wrong_only_in_text": verdicts["text"],
                "wrong_in_scene": verdicts["scene"],
                "alone": dict(sorted(together.items())),
                # a wrong pair: the half of its answer that is wrong; its images wrong alone
                "wrong_halves": dict(sorted(halves.items())),
                "examples": wrong,
            }
    return report


ITEM = re.compile(r"\b(?:a|an) (\w+) (\w+)")
SIDES = (0, 12, 20, 32, 1_000)  # the smallest shape's shorter side at the model's input, px
SQUEEZES = (1.0, 1.3, 2.0, 10.0)  # how much the image is stretched one way to make it square


def bucketed(
    rows: list[dict[str, Any]],
    key: str,
    edges: tuple[float, ...],
    share: Callable[[list[dict[str, Any]]], dict[str, Any]],
    unit: str = "",
) -> dict[str, Any]:
    """`share` of the rows whose `key` lies in each bucket between `edges` (the last open)."""
    return {
        f"{lo:g}-{hi:g}{unit}" if hi < edges[-1] else f">={lo:g}{unit}": share(
            [r for r in rows if lo <= r[key] < hi]
        )
        for lo, hi in pairwise(edges)
    }


def named_items(description: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a description names, left to right (a quoted text left out)."""
    return ITEM.findall(re.sub(r'"[^"]*"', '""', description.lower()))


def scene_mistake(got: str, scene: world.Scene) -> str | None:
    """What a description gets wrong about the shapes, its printed text aside: None, "count",
    "order" (the right shapes in another order), "shape", "colour" or "shape and colour" (in the
    places where it errs)."""
    named, want = named_items(got), [(i.color, i.shape) for i in scene.items]
    if named == want:
        return None
    if len(named) != len(want):
        return "count"
    if sorted(named) == sorted(want):
        return "order"
    colour = any(a[0] != b[0] for a, b in zip(named, want, strict=True))
    shape = any(a[1] != b[1] for a, b in zip(named, want, strict=True))
    return "shape and colour" if shape and colour else "shape" if shape else "colour"


def squeeze(scene: world.Scene) -> float:
    """How much the picture is stretched one way to make it square: its longer side over its
    shorter."""
    return max(scene.width / scene.height, scene.height / scene.width)


def smallest_side(example: Example, side: int) -> float:
    """The shorter side, at the model's `side` px square input, of the first image's smallest
    shape (its box)."""
    items = example.labels[0].items
    width, height = items.size
    sides = []
    for k in range(1, len(example.scenes[0].items) + 1):
        box = items.point(lambda v, k=k: 255 if v == k else 0).getbbox()
        if box:
            x0, y0, x1, y1 = box
            sides.append(min((x1 - x0) * side / width, (y1 - y0) * side / height))
    return min(sides, default=0.0)


def scene_row(example: Example, got: str, side: int) -> dict[str, Any]:
    """One description `got` for `example`, as `scene_summary` sums them up."""
    scene, labels = example.scenes[0], example.labels[0]
    named = named_items(got)
    marks = labels.shape_marks or [()] * len(scene.items)
    confused = [
        f"{item.shape}->{shape}" + "".join(f" ({m})" for m in drawn)
        for item, (_, shape), drawn in zip(scene.items, named, marks, strict=False)
        if shape != item.shape
    ]
    return {
        "mistake": scene_mistake(got, scene),
        "count": len(scene.items),
        "side": smallest_side(example, side),
        "squeeze": squeeze(scene),
        "confused": confused if len(named) == len(scene.items) else [],
        "text_presence_wrong": ("text says" in got.lower()) != bool(scene.text),
        "rounded": any("rounded" in m for m in marks),
        "proportions": any("proportions" in m for m in marks),
        "blurred": labels.blurred,
    }


FILES = ("png", "jpeg", "webp", "gif")


def drawn_otherwise(row: dict[str, Any]) -> bool:
    """Whether a `scene_row`'s picture was drawn in a way the training routine never draws:
    a square rounded or a shape past its proportions (its blur is the training's too, milder)."""
    return bool(row["rounded"] or row["proportions"])


def scene_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum up descriptions, each {"mistake" (`scene_mistake`), "count" (shapes drawn), "side"
    (`smallest_side`), "squeeze", "confused" (the shapes named in place of the drawn ones, with
    how each was drawn: `world.Labels.shape_marks`), "rounded", "proportions", "blurred" (how the
    picture was drawn), "file" (its format)}: the share whose shapes are right, overall and by
    each of those, and the mistakes."""

    def share(chosen: list[dict[str, Any]]) -> dict[str, Any]:
        right = sum(r["mistake"] is None for r in chosen)
        return {"n": len(chosen), "right": round(100 * right / len(chosen), 1) if chosen else None}

    confused: Counter[str] = Counter()
    for r in rows:
        confused.update(r["confused"])
    return {
        "all": share(rows),
        "by_count": {n: share([r for r in rows if r["count"] == n]) for n in (1, 2, 3)},
        "by_smallest_side_px": bucketed(rows, "side", SIDES, share),
        "by_squeeze": bucketed(rows, "squeeze", SQUEEZES, share),
        "by_file": {f: share([r for r in rows if r["file"] == f]) for f in FILES},
        "by_drawing": {
            "as the training draws": share([r for r in rows if not drawn_otherwise(r)]),
            "a square rounded": share([r for r in rows if r["rounded"]]),
            "a shape past the training's proportions": share([r for r in rows if r["proportions"]]),
            "blurred": share([r for r in rows if r["blurred"]]),
        },
        "mistakes": dict(Counter(r["mistake"] for r in rows if r["mistake"]).most_common()),
        "text_presence_wrong": sum(r["text_presence_wrong"] for r in rows),
        "shapes_confused": dict(confused.most_common(12)),
    }


async def scenes(model: Path, n: int, seed: int) -> dict[str, Any]:
    """The description diagnostic (see the module's docstring), on each set."""

    def descriptions(rng: random.Random, style: world.Style, bitmap: float) -> Iterator[Example]:
        return (make_example(rng, style, "describe", bitmap_face=bitmap) for _ in range(n))

    rows = await rows_on_each_set(model, f"scenes:{{}}:{seed}", descriptions, scene_row)
    return {name: scene_summary(chosen) for name, chosen in rows.items()}


WIDTHS = (0, 10, 16, 25, 1_000)  # glyph widths at the model's input, px: the buckets' edges


def glyph_width(example: Example, side: int) -> float:
    """The mean width of the first image's printed glyphs once the image is `side` px wide."""
    chars = example.labels[0].chars
    width = example.labels[0].items.size[0]
    return sum(box[2] - box[0] for _, box in chars) / len(chars) * side / width


def reading_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum up reading attempts, each {"printed", "got" (the answer), "width" (its glyphs' mean
    width at the model's input), "squeeze" (how much the image is stretched one way to make it
    square), "orientation" (`world.orientation`; optional)}: the share read whole, overall, of
    numbers and words, by glyph width (all, and numbers and words apart: is a kind short of
    pixels or of something else?), by squeeze and by orientation (wide pictures' glyphs squeezed
    narrow, tall ones' flat); of the misread, how many had the wrong length; and the characters
    confused most often in the misread of the right length."""

    rows = [{**r, "said": quoted(r["got"])} for r in rows]

    def share(chosen: list[dict[str, Any]]) -> dict[str, Any]:
        right = sum(r["said"] == r["printed"] for r in chosen)
        return {"n": len(chosen), "read": round(100 * right / len(chosen), 1) if chosen else None}

    misread = [r for r in rows if r["said"] != r["printed"]]
    confused: Counter[str] = Counter()
    for r in misread:
        if len(r["said"]) == len(r["printed"]):
            pairs = zip(r["printed"], r["said"], strict=True)
            confused.update(f"{a}->{b}" for a, b in pairs if a != b)
    numbers = [r for r in rows if r["printed"].isdigit()]
    words = [r for r in rows if not r["printed"].isdigit()]
    return {
        "all": share(rows),
        "numbers": share(numbers),
        "words": share(words),
        "by_glyph_width": bucketed(rows, "width", WIDTHS, share, unit="px"),
        "numbers_by_glyph_width": bucketed(numbers, "width", WIDTHS, share, unit="px"),
        "words_by_glyph_width": bucketed(words, "width", WIDTHS, share, unit="px"),
        "by_squeeze": bucketed(rows, "squeeze", SQUEEZES, share),
        "by_orientation": {
            kind: share([r for r in rows if r.get("orientation") == kind])
            for kind in world.ORIENTATIONS
        },
        "misread": len(misread),
        "wrong_length": sum(len(r["said"]) != len(r["printed"]) for r in misread),
        "confused": dict(confused.most_common(10)),
    }


def input_side(model: Path) -> int:
    """The side of the square every image is resized to for `model`, px."""
    config = json.loads((model / "processor_config.json").read_text())
    return int(config["image_processor"]["max_image_size"]["longest_edge"])


async def rows_on_each_set(
    model: Path,
    seed: str,
    examples: Callable[[random.Random, world.Style, float], Iterable[Example]],
    row: Callable[[Example, str, int], dict[str, Any]],
    ways: Mapping[str, tuple[world.Style, float]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """For each set (or each of `ways`: a routine and its share of texts in the bitmap face),
    the `row` (the example, the model's answer, the input's side) of each of the `examples`
    drawn from `Random(seed.format(its name))`, answered through the server's media code, with
    the file format its (first) image was sent in ("file")."""
    side = input_side(model)
    if ways is None:
        ways = {name: (style, 0.0) for name, style in SETS.items()}
    rows: dict[str, list[dict[str, Any]]] = {}
    async with served(model) as engine:
        for name, (style, bitmap) in ways.items():
            rng = random.Random(seed.format(name))
            rows[name] = []
            for example in examples(rng, style, bitmap):
                images, formats = sent(example, rng, style)
                got = await answer(engine, example, images)
                rows[name].append({**row(example, got, side), "file": formats[0]})
    return rows


def reading_row(example: Example, got: str, side: int) -> dict[str, Any]:
    """One answer to a text question about an image with text, as `reading_summary` takes it."""
    scene = example.scenes[0]
    return {
        "printed": scene.text,
        "got": got,
        "width": glyph_width(example, side),
        "squeeze": squeeze(scene),
        "orientation": world.orientation(scene),
    }


# The `--faces` diagnostic's three ways of printing a text: the routine that draws it, and the
# share of its texts printed in Pillow's 6x11 bitmap face (`world.render_labelled`).
FACES: dict[str, tuple[world.Style, float]] = {
    "training face": ("train", 0.0),  # Pillow's FreeType face, as the held-out set prints
    "bitmap face, the training's way": ("train", 1.0),  # as the training prints that face
    "bitmap face, the different set's way": ("alt", 0.0),  # the different set's own texts
}


def face_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`reading_summary` of `rows`, and the share of the printed characters read in place."""
    right = sum(characters_right(r["got"], r["printed"])[0] for r in rows)
    printed = sum(len(r["printed"]) for r in rows)
    characters = round(100 * right / printed, 1) if printed else None
    return {**reading_summary(rows), "characters": characters}


def texts(n: int) -> Callable[[random.Random, world.Style, float], Iterator[Example]]:
    """`rows_on_each_set`'s examples: `n` text questions about images with text."""

    def drawn(rng: random.Random, style: world.Style, bitmap: float) -> Iterator[Example]:
        return (example for example, _ in with_text(rng, style, n, bitmap_face=bitmap))

    return drawn


async def faces(model: Path, n: int, seed: int) -> dict[str, Any]:
    """The face diagnostic (see the module's docstring): `n` text questions about images with
    text for each of `FACES`, scored as `--reading` scores them."""
    rows = await rows_on_each_set(model, f"faces:{{}}:{seed}", texts(n), reading_row, FACES)
    return {name: face_summary(chosen) for name, chosen in rows.items()}


async def reading(model: Path, n: int, seed: int) -> dict[str, Any]:
    """The reading diagnostic (see the module's docstring), on each set."""
    rows = await rows_on_each_set(model, f"reading:{{}}:{seed}", texts(n), reading_row)
    return {name: reading_summary(chosen) for name, chosen in rows.items()}


def table(report: dict[str, Any]) -> str:
    sets = list(report["accuracy"])
    lines = [
        "| question type | target | " + " | ".join(sets) + " |",
        "|---|---|" + "---|" * len(sets),
    ]
    for kind in world.QUESTION_TYPES:
        row = [f"{report['accuracy'][s][kind]:.1f}%" for s in sets]
        lines.append(f"| {kind} | >= {TARGETS[kind]}% | " + " | ".join(row) + " |")
    for key, (label, target) in READING.items():
        if all(key in report["accuracy"][s] for s in sets):
            row = [f"{report['accuracy'][s][key]:.1f}%" for s in sets]
            goal = f">= {target}%" if target else "-"
            lines.append(f"| {label} | {goal} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def unseen_line(report: dict[str, Any]) -> str:
    unseen = report.get("unseen_faces")
    if not unseen:
        return ""
    return (
        f"\nIn typefaces it was never trained on (a face made up for each word, "
        f"`training/typefaces.py`, {report['n']} images of the training routine): "
        f"{unseen['read']:.1f}% of texts read whole, {unseen['read_chars']:.1f}% of characters "
        "in place.\n"
    )


# where the word is printed: (where its band starts, as a share of the picture's height; where the
# word sits in the band's free height, 0 its top, 1 its bottom); both routines print at "centred"
PLACEMENTS: dict[str, tuple[float, float]] = {
    "centred": (0.0, 0.5),
    "band top": (0.0, 0.0),
    "band bottom": (0.0, 1.0),
    "middle": ((1.0 - world.TEXT_BAND) / 2, 0.5),
    "bottom": (1.0 - world.TEXT_BAND, 0.5),
}


def placed(scene: world.Scene, rng: random.Random, style: world.Style, where: str) -> Example:
    """A text question about `scene` with its word printed at `where` (`PLACEMENTS`)."""
    band_top, text_y = PLACEMENTS[where]
    scene = replace(scene, band_top=band_top, text_y=text_y)
    question, answer = world.ask(scene, rng, "text")
    image, labels = world.render_labelled(scene, rng, style)
    return Example("text", None, question, answer, [image], True, [scene], [labels])


async def placement(model: Path, n: int, seed: int) -> dict[str, Any]:
    """The placement diagnostic (see the module's docstring): on each set, the share of `n`
    texts read whole with the word printed at each of `PLACEMENTS`."""
    report: dict[str, Any] = {}
    async with served(model) as engine:
        for name, style in SETS.items():
            scenes: list[world.Scene] = []
            draw = random.Random(f"placement:{name}:{seed}")
            while len(scenes) < n:
                scene = world.sample_scene(draw, text_rate=1.0)
                if scene.text:
                    scenes.append(scene)
            report[name] = {}
            for where in PLACEMENTS:
                rng = random.Random(f"placement:{name}:{seed}:drawing")  # the same each time
                right = 0
                for scene in scenes:
                    example = placed(scene, rng, style, where)
                    got = await answer(engine, example, through_server_media(example, rng, style))
                    right += quoted(got) == scene.text
                report[name][where] = {"n": n, "read": round(100 * right / n, 1)}
    return report


def write_card(model: Path, report: dict[str, Any], command: str) -> None:
    card = model / "README.md"
    text = card.read_text() if card.exists() else ""
    marker = "## Evaluation"
    text = text.split(marker)[0].rstrip() + "\n\n" if text else ""
    text += (
        f"{marker}\n\nExact match per question type, {report['n']} questions each, greedy "
        f"decoding through oculo's serving path. Command:\n\n```\n{command}\n```\n\n"
        f"{table(report)}\n{unseen_line(report)}"
    )
    card.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--n", type=int, default=200, help="questions per type and set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--card", action="store_true", help="write the table into README.md")
    parser.add_argument("--json", type=Path, help="write the whole report here")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 beside training)")
    parser.add_argument(
        "--reading",
        type=int,
        default=0,
        help="only the reading diagnostic, on this many images with text a set (see above)",
    )
    parser.add_argument(
        "--faces",
        type=int,
        default=0,
        help="only the face diagnostic, on this many images with text a face (see above)",
    )
    parser.add_argument(
        "--placement",
        type=int,
        default=0,
        help="only the placement diagnostic, on this many images with text a set (see above)",
    )
    parser.add_argument(
        "--lookups",
        type=int,
        default=0,
        help="only the look-up diagnostic, on this many three-shape scenes (see above)",
    )
    parser.add_argument(
        "--seed-scene",
        action="store_true",
        help="only the issue's picture (a blue star and GO) in 12 drawings (see above)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="only the two-image diagnostic, on this many pairs (see above)",
    )
    parser.add_argument(
        "--scenes",
        type=int,
        default=0,
        help="only the description diagnostic, on this many descriptions a set (see above)",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.lookups:
        print(json.dumps(asyncio.run(lookups(args.model, args.lookups, args.seed)), indent=1))
        return
    if args.reading:
        print(json.dumps(asyncio.run(reading(args.model, args.reading, args.seed)), indent=1))
        return
    if args.faces:
        print(json.dumps(asyncio.run(faces(args.model, args.faces, args.seed)), indent=1))
        return
    if args.placement:
        print(json.dumps(asyncio.run(placement(args.model, args.placement, args.seed)), indent=1))
        return
    if args.seed_scene:
        print(json.dumps(asyncio.run(seed_scene(args.model)), indent=1))
        return
    if args.scenes:
        print(json.dumps(asyncio.run(scenes(args.model, args.scenes, args.seed)), indent=1))
        return
    if args.pairs:
        print(json.dumps(asyncio.run(pairs(args.model, args.pairs, args.seed)), indent=1))
        return
    report = asyncio.run(evaluate(args.model, args.n, args.seed))
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(table(report) + unseen_line(report))
    for key, examples in report["mistakes"].items():
        for m in examples[:2]:
            print(f"  {key}: {m['q']!r} want {m['want']!r} got {m['got']!r}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.card:
        command = f".venv/bin/python -m training.evaluate --model {args.model} --n {args.n}"
        write_card(args.model, report, command + f" --seed {args.seed} --card")
    print(f"{report['seconds']} s")


if __name__ == "__main__":
    main()
