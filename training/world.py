"""The world oculo-tiny knows: flat shapes in colours, an optional printed word, and questions.

A `Scene` is 1 to 3 shapes (circle, square, triangle, star) in 8 colours, left to right, on a
plain, gradient or noisy background, at any size from 32 to 1,120 px and any aspect ratio,
optionally with one short word or number (2 to 6 letters or digits). `render` draws a scene in one
of two styles: "train" (the routine the model is trained on) and "alt" (made differently, for
evaluation only: anti-aliased edges by supersampling, other shape proportions and sizes, a blocky
bitmap font, JPEG / WebP compression, sometimes an animated GIF whose first frame is the scene).
`ask` makes a question and its one exact answer about a scene, in one of several phrasings.

Everything is driven by a `random.Random`, so a seed reproduces a data set exactly.
"""

from __future__ import annotations

import functools
import io
import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from training import fonts, typefaces

SHAPES = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 30),
    "green": (40, 170, 60),
    "blue": (30, 80, 220),
    "purple": (140, 50, 180),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
QuestionType = Literal["describe", "count", "color", "exists", "text", "pair"]
QUESTION_TYPES: tuple[QuestionType, ...] = ("describe", "count", "color", "exists", "text", "pair")

WORDS = """
GO STOP OPEN EXIT CAT DOG SUN MOON STAR HOME BOOK TREE FISH BIRD CAKE MILK RAIN SNOW
FIRE WIND LOVE HOPE PLAY WORK SHOP CAFE BANK PARK ROAD CITY TOWN BOAT SHIP CAR BUS
TAXI HOTEL MAP KEY DOOR LAMP DESK BED SOFA CUP PEN INK ART FILM SONG DANCE GAME BALL
GOLF TEAM GOAL WIN LOSE FAST SLOW HOT COLD NEW OLD BIG TINY HIGH LOW LEFT RIGHT UP DOWN
YES NO OK HELLO HI BYE THANKS SALE FREE PUSH PULL HELP INFO MENU FOOD TEA BEER WINE
PIZZA BREAD APPLE LEMON PEAR PLUM GRAPE MANGO HONEY SUGAR SALT RICE SOUP MEAT EGG
NORTH SOUTH EAST WEST CLOSED LOCKED QUIET SMILE HAPPY SAD ANGRY BRAVE CALM WILD ZOO
FARM FROG BEAR LION TIGER HORSE MOUSE SHEEP GOAT DUCK OWL WOLF FOX DEER ROSE LILY
GOLD SILVER IRON STONE GLASS PAPER WOOD SAND SEA LAKE RIVER HILL ROCK CLOUD STORM
ALPHA BETA GAMMA DELTA OMEGA ZERO ONE TWO THREE FOUR FIVE SIX TEN JAZZ ROCK BLUES
QUIZ TEXT NOTE MAIL POST NEWS DATA CODE WEB APP LOGIN USER ADMIN SAVE LOAD SEND
""".split()

SYSTEM_PROMPTS = (
    "You are a helpful assistant that can answer questions about the image.",
    "You are a helpful assistant.",
    "Answer questions about images briefly and accurately.",
    "You are a vision assistant. Look at the image and answer the question.",
    "Be concise.",
)

Style = Literal["train", "alt"]


@dataclass(frozen=True)
class Item:
    shape: str
    color: str


@dataclass(frozen=True)
class Scene:
    items: tuple[Item, ...]  # left to right
    text: str | None
    width: int
    height: int
    background: str  # "plain", "gradient" or "noise"
    # where the text is printed: its band (TEXT_BAND of the height) starts `band_top` of the way
    # down (0: the top; at most 1 - TEXT_BAND), and the word sits `text_y` of the way down the
    # band's free height (0: its top, 0.5: centred, 1: its bottom)
    band_top: float = 0.0
    text_y: float = 0.5


CharBox = tuple[str, tuple[float, float, float, float]]


@dataclass
class Labels:
    """Where things are in a drawn image: `items` ("L") holds 1 + the index of the shape at each
    pixel (0: background); `chars` each printed character with its box (x0, y0, x1, y1)."""

    items: Image.Image
    chars: list[CharBox]
    # how each shape was drawn, in the scene's order: () as the shipped training routine draws
    # its shapes (`TRAINING_SHAPES`), or marks of what it never does ("rounded": a square's
    # corners rounded; "proportions": stretched or shaped past its spread); and "blurred" when
    # the whole picture was (evaluation's diagnostics split their scores by these)
    shape_marks: list[tuple[str, ...]] = field(default_factory=list)
    blurred: bool = False


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def sample_size(rng: random.Random) -> tuple[int, int]:
    """Any size from 32 to 1,120 px on each side, any aspect ratio (clamped to 1:4)."""
    side = _log_uniform(rng, 48, 1120)
    aspect = _log_uniform(rng, 0.4, 2.5) if rng.random() < 0.7 else 1.0
    width = round(min(1120, max(32, side * math.sqrt(aspect))))
    height = round(min(1120, max(32, side / math.sqrt(aspect))))
    return width, height


LONGEST_TEXT = 6  # characters in a printed word (numbers have at most 4)


NUMBER_RATE = 0.3  # the share of printed texts that are numbers (the rest are words)
TEXT_BAND = 0.3  # the share of a picture's height that its text's band takes, shapes the rest
# a picture at least this many times as wide as it is tall is "wide": squeezed to the model's
# square input, its glyphs come out narrowest (`render_labelled`'s `bitmap_wide`)
WIDE = 1.3
ORIENTATIONS = ("wide", "square", "tall")


def orientation(scene: Scene) -> str:
    """ "wide" (at least `WIDE` times as wide as tall: squeezed to the square input, its glyphs
    come out narrow), "tall" (the other way round: flat) or "square"."""
    if scene.width >= WIDE * scene.height:
        return "wide"
    return "tall" if scene.height >= WIDE * scene.width else "square"


def sample_text(rng: random.Random, number_rate: float = NUMBER_RATE) -> str:
    """A word of `WORDS` or, `number_rate` of the time, a number of 2 to 4 digits."""
    if rng.random() < 1.0 - number_rate:
        return rng.choice([w for w in WORDS if 2 <= len(w) <= LONGEST_TEXT])
    digits = rng.choice((2, 2, 3, 3, 4))
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def sample_scene(
    rng: random.Random,
    *,
    text_rate: float = 0.5,
    number_rate: float = NUMBER_RATE,
    text_anywhere: float = 0.0,
    text_drift: float = 0.0,
) -> Scene:
    """A random scene. `text_anywhere`: the share of texts printed at a random height (their
    band anywhere from the top to the bottom, the word anywhere in it) instead of centred in a
    band at the top; `text_drift`: the share of the others printed anywhere in the band at the
    top, not centred in it (a few pixels up or down). 0 draws no random number for either."""
    width, height = sample_size(rng)
    count = rng.choice((1, 2, 3))
    items = tuple(Item(rng.choice(SHAPES), rng.choice(tuple(COLORS))) for _ in range(count))
    printed = rng.random() < text_rate and min(width, height) >= 64
    text = sample_text(rng, number_rate) if printed else None
    background = rng.choice(("plain", "plain", "gradient", "noise"))
    if text and text_anywhere and rng.random() < text_anywhere:
        band_top, text_y = rng.uniform(0.0, 1.0 - TEXT_BAND), rng.random()
        return Scene(items, text, width, height, background, band_top, text_y)
    if text and text_drift and rng.random() < text_drift:
        return Scene(items, text, width, height, background, 0.0, rng.random())
    return Scene(items, text, width, height, background)


# --------------------------------------------------------------------------- drawing


def _background_color(rng: random.Random, avoid: list[tuple[int, int, int]]) -> tuple[int, ...]:
    """A colour far from every shape colour in the scene (and from white/black text)."""
    for _ in range(200):
        candidate = tuple(rng.randrange(60, 200) for _ in range(3))
        if all(math.dist(candidate, c) > 110 for c in avoid):
            return candidate
    return (128, 128, 128)


def _draw_background(
    scene: Scene, rng: random.Random, size: tuple[int, int], grain_scale: float = 1.0
) -> Image.Image:
    """The scene's background at `size`; `grain_scale` scales the noise (`render_labelled`)."""
    avoid = [COLORS[i.color] for i in scene.items] + [(250, 250, 250), (15, 15, 15)]
    first = _background_color(rng, avoid)
    if scene.background == "plain":
        return Image.new("RGB", size, first)
    if scene.background == "gradient":
        second = _background_color(rng, avoid)
        ramp = Image.linear_gradient("L").resize(size)
        if rng.random() < 0.5:
            ramp = ramp.transpose(Image.Transpose.ROTATE_90).resize(size)
        return Image.composite(Image.new("RGB", size, second), Image.new("RGB", size, first), ramp)
    # Grey grain centred on 128, drawn from `rng` (Pillow's effect_noise uses C's rand()).
    sigma = rng.uniform(10, 30) * grain_scale
    values = np.random.default_rng(rng.getrandbits(64)).normal(128, sigma, (size[1], size[0]))
    noise = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    grain = Image.merge("RGB", [noise] * 3)
    return ImageChops.add(Image.new("RGB", size, first), grain, scale=1.0, offset=-128)


def _star(
    cx: float, cy: float, r: float, rot: float, inner: float = 0.45
) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * inner
        angle = rot + k * math.pi / 5 - math.pi / 2
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


TRAIN_SPREAD = 0.15  # how far the training routine varies a shape's proportions ("alt": twice)
ALT_ROUNDING = 0.15  # "alt" rounds half its squares' corners, this share of the shorter side
TRAIN_ROUNDING = (0.05, 0.3)  # the training routine's rounded corners: a radius drawn in this range


@dataclass(frozen=True)
class ShapeVariety:
    """How varied the training routine draws its shapes: `spread`, how far a shape's
    proportions vary (a circle's or square's stretch, a triangle's lean, a star's inner radius
    and turn; `TRAIN_SPREAD` as shipped), and `rounded`, the share of squares drawn with rounded
    corners (a radius of 5-30% of the shorter side; 0, as shipped, draws no random number for
    it, so the batches stay the shipped run's)."""

    spread: float = TRAIN_SPREAD
    rounded: float = 0.0


TRAINING_SHAPES = ShapeVariety()


class Outline(NamedTuple):
    """A shape as drawn: its `kind` ("ellipse", "rectangle" or "rounded": `points` its box's
    corners; "polygon": its points), its marks (`Labels.shape_marks`) and, "rounded", its
    corners' radius as a share of the box's shorter side."""

    kind: str
    points: list[tuple[float, float]]
    marks: tuple[str, ...] = ()
    rounding: float = 0.0


def _shape_outline(
    shape: str,
    box: tuple[float, float, float, float],
    rng: random.Random,
    style: Style,
    variety: ShapeVariety = TRAINING_SHAPES,
) -> Outline:
    """The shape's outline, with marks that say how the shipped training routine
    (`TRAINING_SHAPES`: `TRAIN_SPREAD`, no rounding) would not have drawn it.

    Both routines vary proportions (the training one less); "alt" rounds half its squares'
    corners, the training routine `variety.rounded` of them.
    """
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    r = min(x1 - x0, y1 - y0) / 2
    spread = 2 * TRAIN_SPREAD if style == "alt" else variety.spread
    log_stretch = rng.uniform(-spread, spread)
    stretch = math.exp(log_stretch)
    past = ("proportions",)
    if shape in ("circle", "square"):
        k = 1.0 if shape == "circle" else 0.9
        rx, ry = r * k * min(stretch, 1.0), r * k / max(stretch, 1.0)
        corners = [(cx - rx, cy - ry), (cx + rx, cy + ry)]
        marks = past if abs(log_stretch) > TRAIN_SPREAD else ()
        if shape == "circle":
            return Outline("ellipse", corners, marks)
        if style == "alt" and rng.random() < 0.5:
            return Outline("rounded", corners, ("rounded", *marks), ALT_ROUNDING)
        if style == "train" and variety.rounded and rng.random() < variety.rounded:
            return Outline("rounded", corners, ("rounded", *marks), rng.uniform(*TRAIN_ROUNDING))
        return Outline("rectangle", corners, marks)
    if shape == "triangle":
        lean = rng.uniform(-spread, spread)
        marks = past if abs(lean) > TRAIN_SPREAD else ()
        apex = lean * r
        points = [(cx + apex, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
        return Outline("polygon", points, marks)
    inner = rng.uniform(0.45 - spread / 2, 0.45 + spread / 2)
    rot = rng.uniform(-spread, spread)
    outside = abs(inner - 0.45) > TRAIN_SPREAD / 2 or abs(rot) > TRAIN_SPREAD
    return Outline("polygon", _star(cx, cy, r, rot, inner), past if outside else ())


def _fill(draw: ImageDraw.ImageDraw, outline: Outline, fill: Any) -> None:
    kind, points = outline.kind, outline.points
    if kind == "ellipse":
        draw.ellipse(points, fill=fill)
    elif kind == "rectangle":
        draw.rectangle(points, fill=fill)
    elif kind == "rounded":
        (a, b), (c, d) = points
        draw.rounded_rectangle(points, radius=min(c - a, d - b) * outline.rounding, fill=fill)
    else:
        draw.polygon(points, fill=fill)


def _layout(
    scene: Scene, rng: random.Random, size: tuple[int, int], text_band: float
) -> list[tuple[float, float, float, float]]:
    """Boxes for the shapes, left to right, in distinct columns so the order is unambiguous,
    in the larger of the spaces above and below the text's band (below, when they are equal)."""
    width, height = size
    n = len(scene.items)
    top, bottom = 0.0, float(height)
    if scene.text:
        above, below = height * scene.band_top, height * (scene.band_top + text_band)
        top, bottom = (0.0, above) if above > height - below else (below, float(height))
    column = width / n
    boxes = []
    for k in range(n):
        free_h = bottom - top
        side = min(column, free_h) * rng.uniform(0.5, 0.85)
        x = column * k + rng.uniform(0, column - side)
        y = top + rng.uniform(0, free_h - side)
        boxes.append((x, y, x + side, y + side))
    return boxes


@functools.cache
def _bitmap_face() -> ImageFont.ImageFont:
    """Pillow's 6x11 bitmap face, loaded once (each load decodes it again: 5 ms a batch)."""
    return ImageFont.load_default_imagefont()


@functools.lru_cache(maxsize=128)
def _pillow_face(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own FreeType face at `size` px, loaded once a size: drawing with it is the
    same either way."""
    return ImageFont.load_default(size=size)


def _glyphs(
    text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, stroke: int = 0
) -> tuple[Image.Image, list[tuple[float, float]]]:
    """`text` as a tight "L" mask, and each character's left and right edge in it."""
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font, stroke_width=stroke)
    mask = Image.new("L", (int(right - left) + 2, int(bottom - top) + 2), 0)
    ImageDraw.Draw(mask).text((1 - left, 1 - top), text, fill=255, font=font, stroke_width=stroke)
    spans = [
        (1 - left + font.getlength(text[:i]), 1 - left + font.getlength(text[: i + 1]))
        for i in range(len(text))
    ]
    return mask, spans


def _draw_text(
    image: Image.Image,
    scene: Scene,
    rng: random.Random,
    style: Style,
    band: float,
    made_faces: float = 0.0,
    bitmap_face: float = 0.0,
    real_faces: float = 0.0,
    bitmap: bool | None = None,
) -> list[CharBox]:
    """Print the scene's word in its band; return each character's box. `bitmap`: the
    face already chosen (True: the bitmap face; False: not it); None draws the choice here."""
    assert scene.text is not None
    width, height = image.size
    band_h = height * band
    color = (250, 250, 250) if rng.random() < 0.5 else (15, 15, 15)
    if bitmap is None:
        bitmap = style == "train" and bool(bitmap_face) and rng.random() < bitmap_face
    if style == "train" and bitmap:
        # Pillow's other built-in face, the 6x11 bitmap one, drawn the training's way: a height
        # anywhere from 60 to 100% of what the band allows, now and then squeezed or stretched,
        # blown up blocky (nearest neighbour) or smooth (bilinear). ("alt" draws this face too,
        # its own way: the largest whole size that fits, never squeezed, always blocky.)
        mask, spans = _glyphs(scene.text, _bitmap_face())
        scale_y = band_h * 0.8 * rng.uniform(0.6, 1.0) / mask.height
        scale_x = scale_y * (rng.uniform(0.8, 1.25) if rng.random() < 0.5 else 1.0)
        fit = min(1.0, width * 0.95 / (mask.width * scale_x))
        scale_x, scale_y = scale_x * fit, scale_y * fit
        resample = Image.Resampling.NEAREST if rng.random() < 0.7 else Image.Resampling.BILINEAR
    elif style == "train" and made_faces and rng.random() < made_faces:
        # a face made up for this word (`typefaces`): 40% of them drawn with capitals 6 to
        # 10 px tall and blown up (a bitmap face), the rest drawn large and scaled down (smooth)
        blocky = rng.random() < 0.4
        goal = min(band_h * 0.8, width / (0.75 * len(scene.text) + 0.5)) * 0.75
        cap = rng.choice((6, 7, 8, 9, 10)) if blocky else max(6, round(2 * goal))
        mask, spans = typefaces.glyphs(scene.text, rng, cap)
        scale_x = scale_y = min(band_h * 0.8 / mask.height, width * 0.95 / mask.width)
        if blocky:
            scale_x = scale_y = max(1.0, scale_x)
        resample = Image.Resampling.NEAREST if blocky else Image.Resampling.LANCZOS
    elif style == "train":
        # Pillow's own FreeType font (or, a `real_faces` share of the time, one of matplotlib's:
        # `fonts`), sometimes bolder, squeezed, or drawn small and blown up (blocky), so that the
        # model reads glyphs, not one rendering of them.
        face = fonts.pick(rng) if real_faces and rng.random() < real_faces else None
        px = max(8, int(min(band_h * 0.8, width / (0.75 * len(scene.text) + 0.5))))
        pixel = rng.choice((1, 1, 1, 2, 3))
        pixel = pixel if px // pixel >= 10 else 1
        stroke = 1 if rng.random() < 0.2 else 0
        em = max(6, px // pixel)
        typeface = _pillow_face(em) if face is None else fonts.font(face, em)
        mask, spans = _glyphs(scene.text, typeface, stroke)
        squeeze = rng.uniform(0.85, 1.15) if rng.random() < 0.3 else 1.0
        scale_x, scale_y = pixel * squeeze, float(pixel)
        fit = min(1.0, width * 0.95 / (mask.width * scale_x))
        scale_x, scale_y = scale_x * fit, scale_y * fit
        resample = Image.Resampling.NEAREST if pixel > 1 else Image.Resampling.BILINEAR
    else:
        # alt: the 6x11 bitmap font, drawn small and scaled up with nearest neighbour
        mask, spans = _glyphs(scene.text, _bitmap_face())
        scale = max(1.0, min(band_h * 0.8 / mask.height, width * 0.9 / mask.width))
        scale_x = scale_y = scale
        resample = Image.Resampling.NEAREST
    size = (max(1, round(mask.width * scale_x)), max(1, round(mask.height * scale_y)))
    fx = size[0] / mask.width
    if size != mask.size:
        mask = mask.resize(size, resample)
    x = int(rng.uniform(0, max(0, width - mask.width)))
    y = int(height * scene.band_top + max(0, (band_h - mask.height) * scene.text_y))
    image.paste(Image.new("RGB", mask.size, color), (x, y), mask)
    return [
        (char, (x + a * fx, y, x + b * fx, y + mask.height))
        for char, (a, b) in zip(scene.text, spans, strict=True)
    ]


def render(scene: Scene, rng: random.Random, style: Style = "train") -> Image.Image:
    """Draw `scene` as an RGB image of its size."""
    return render_labelled(scene, rng, style)[0]


def render_labelled(
    scene: Scene,
    rng: random.Random,
    style: Style = "train",
    *,
    draw_max: int | None = None,
    made_faces: float = 0.0,
    bitmap_face: float = 0.0,
    real_faces: float = 0.0,
    bitmap: bool | None = None,
    shapes: ShapeVariety = TRAINING_SHAPES,
    bitmap_wide: float | None = None,
) -> tuple[Image.Image, Labels]:
    """Draw `scene`, and say where each shape and each printed character ended up.

    `draw_max` (training): draw a scene whose longer side exceeds it at that size instead, the
    same picture made smaller, with its grain scaled so that it looks as the full-size grain does
    once both are shrunk to the model's input. A model that sees 128 px cannot tell the
    difference, and a 1,120 px scene costs 30 times less to draw and resize.

    `made_faces` (training): the share of printed words drawn in a face made up for the word
    (`typefaces`) instead of Pillow's own; `bitmap_face` (training): the share drawn in Pillow's
    6x11 bitmap face, the training's way (sizes and squeezes of its own; "alt" prints in that face
    too, drawn its own way); `real_faces` (training): the share of the rest drawn in one of the
    TrueType faces matplotlib ships (`fonts`) instead of Pillow's own, the same way. 0 draws no
    random number for any of them. `bitmap` (training): whether the bitmap face was already
    chosen for this scene (`data.sample_scene`: before its text was drawn, so that the face's
    texts can be numbers at a rate of their own); None chooses it here, a `bitmap_face` share
    of the time. `shapes` (training): how varied its shapes are (`ShapeVariety`; "alt" draws
    its own way). `bitmap_wide` (training): the bitmap face's share on a wide picture (one at
    least `WIDE` times as wide as it is tall, whose glyphs the square input squeezes narrowest)
    in place of `bitmap_face`'s; None: `bitmap_face`'s there too. With both shares above 0 it
    draws the same random numbers as without it."""
    if bitmap_wide is not None and orientation(scene) == "wide":
        bitmap_face = bitmap_wide
    fit = 1.0
    if draw_max is not None and max(scene.width, scene.height) > draw_max:
        fit = draw_max / max(scene.width, scene.height)
        scene = replace(
            scene,
            width=max(1, round(scene.width * fit)),
            height=max(1, round(scene.height * fit)),
        )
    size = (scene.width, scene.height)
    band = TEXT_BAND
    factor = 3 if style == "alt" else 1  # alt: supersample, then downscale: anti-aliased edges
    big = (scene.width * factor, scene.height * factor)
    # the mean of k x k pixels has 1/k of their spread: the grain shrinks with the picture
    image = _draw_background(scene, rng, big, grain_scale=fit)
    items = Image.new("L", big, 0)
    draw, label = ImageDraw.Draw(image), ImageDraw.Draw(items)
    boxes = _layout(scene, rng, big, band)
    shape_marks = []
    for k, (item, box) in enumerate(zip(scene.items, boxes, strict=True)):
        outline = _shape_outline(item.shape, box, rng, style, shapes)
        _fill(draw, outline, COLORS[item.color])
        _fill(label, outline, k + 1)
        shape_marks.append(outline.marks)
    if factor > 1:
        image = image.resize(size, Image.Resampling.LANCZOS)
        items = items.resize(size, Image.Resampling.NEAREST)
    chars = (
        _draw_text(image, scene, rng, style, band, made_faces, bitmap_face, real_faces, bitmap)
        if scene.text
        else []
    )
    if style == "alt":
        blurred = rng.random() < 0.3
        if blurred:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
        return image, Labels(items, chars, shape_marks, blurred)
    # train: a little blur and JPEG now and then, as real uploads have
    blurred = rng.random() < 0.1
    if blurred:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.7) * fit))
    if rng.random() < 0.2:
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=rng.randrange(50, 95))
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return image, Labels(items, chars, shape_marks, blurred)


def encode(image: Image.Image, rng: random.Random, style: Style) -> tuple[bytes, str]:
    """The bytes a client would send: PNG for "train"; JPEG, WebP or an animated GIF for "alt"."""
    buf = io.BytesIO()
    if style == "train":
        image.save(buf, "PNG")
        return buf.getvalue(), "image/png"
    kind = rng.choice(("jpeg", "webp", "gif", "png"))
    if kind == "jpeg":
        image.save(buf, "JPEG", quality=rng.randrange(55, 95))
    elif kind == "webp":
        image.save(buf, "WEBP", quality=rng.randrange(55, 95))
    elif kind == "gif":
        second = Image.new("RGB", image.size, (128, 128, 128))
        image.save(buf, "GIF", save_all=True, append_images=[second], duration=200, loop=0)
    else:
        image.save(buf, "PNG")
    return buf.getvalue(), f"image/{kind}"


# --------------------------------------------------------------------------- questions


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _article(item: Item) -> str:
    return _a(f"{item.color} {item.shape}")


def describe(scene: Scene) -> str:
    parts = [_article(i) for i in scene.items]
    shapes = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = f' The text says "{scene.text}".' if scene.text else ""
    return shapes[0].upper() + shapes[1:] + "." + text


def _count_word(n: int) -> str:
    return str(n)


def ask(scene: Scene, rng: random.Random, kind: QuestionType) -> tuple[str, str]:
    """A question of `kind` about `scene` and its exact answer ("pair" is asked with `ask_pair`)."""
    if kind == "describe":
        q = rng.choice(
            (
                "What is in this image?",
                "Describe the image.",
                "What do you see?",
                "What does this picture show?",
                "Describe this image.",
            )
        )
        return q, describe(scene)
    if kind == "count":
        q = rng.choice(
            ("How many shapes are there?", "How many shapes are in the image?", "Count the shapes.")
        )
        return q, _count_word(len(scene.items))
    if kind == "color":
        present = [i.shape for i in scene.items]
        unique = [s for s in SHAPES if present.count(s) == 1]
        absent = [s for s in SHAPES if s not in present]
        if unique and (not absent or rng.random() < 0.85):
            shape = rng.choice(unique)
            answer = next(i.color for i in scene.items if i.shape == shape).capitalize() + "."
        elif absent:
            shape = rng.choice(absent)
            answer = f"There is no {shape}."
        else:  # every shape appears twice or more: ask how many instead
            return ask(scene, rng, "count")
        q = rng.choice(
            (
                f"What color is the {shape}?",
                f"What colour is the {shape}?",
                f"Which color is the {shape}?",
            )
        )
        return q, answer
    if kind == "exists":
        pairs = {(i.color, i.shape) for i in scene.items}
        if rng.random() < 0.5:
            color, shape = rng.choice(sorted(pairs))
        else:
            while True:
                item = scene.items[rng.randrange(len(scene.items))]
                if rng.random() < 0.5:
                    color, shape = item.color, rng.choice(SHAPES)
                elif rng.random() < 0.5:
                    color, shape = rng.choice(tuple(COLORS)), item.shape
                else:
                    color, shape = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
                if (color, shape) not in pairs:
                    break
        q = rng.choice(
            (
                f"Is there {_a(color)} {shape}?",
                f"Is there {_a(color)} {shape} in the image?",
                f"Do you see {_a(color)} {shape}?",
            )
        )
        return q, "Yes." if (color, shape) in pairs else "No."
    if kind == "text":
        q = rng.choice(
            (
                "What text is in the image?",
                "Read the text.",
                "What does the text say?",
                "What is written in the image?",
            )
        )
        return q, (f'"{scene.text}"' if scene.text else "There is no text.")
    raise ValueError(f"ask_pair asks {kind!r} questions")


def ask_pair(first: Scene, second: Scene, rng: random.Random) -> tuple[str, str]:
    q = rng.choice(("What is in these images?", "Describe the images.", "What is in this image?"))
    a = describe(first)
    b = describe(second)
    answer = (
        f"The first image shows {a[0].lower()}{a[1:]} The second image shows {b[0].lower()}{b[1:]}"
    )
    return q, answer


def normalize(answer: str) -> str:
    """What exact-match scoring compares: case, surrounding space and final punctuation ignored."""
    return " ".join(answer.strip().rstrip(".").lower().split())
