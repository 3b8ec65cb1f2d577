"""Typefaces drawn on the spot: every capital and digit a skeleton of strokes, styled anew per word.

Pillow's own face (Aileron) is one way to print a word; a model that only ever sees it learns that
one rendering, and reads a face it has never seen hardly at all (Pillow's 6x11 bitmap face, the
evaluation's other routine: 4% of words). `glyphs` prints a word in a face made up for it from
the strokes of each character (lines and arcs on a unit box): random width, spacing, stroke weight,
slant, serifs, round or square ends, each stroke nudged and each glyph scaled a little. Drawn with
capitals a few pixels tall, the strokes are whole pixels, and the word looks like a bitmap face;
drawn large and scaled down, like a smooth one. So the model sees the same letters in endless faces
and has to learn what makes an "A" an "A".
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

Point = tuple[float, float]
Stroke = list[Point]


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 0) -> Stroke:
    """Points along an ellipse's arc from angle `a0` to `a1` (degrees; 0 right, 90 down)."""
    n = n or max(4, int(abs(a1 - a0) / 15))
    return [
        (
            cx + rx * math.cos(math.radians(a0 + (a1 - a0) * i / n)),
            cy + ry * math.sin(math.radians(a0 + (a1 - a0) * i / n)),
        )
        for i in range(n + 1)
    ]


def _ring(cx: float, cy: float, rx: float, ry: float) -> Stroke:
    return _arc(cx, cy, rx, ry, -90, 270, 24)


# x from 0 (left) to 1 (right), y from 0 (the capitals' top) to 1 (the baseline)
SKELETONS: dict[str, list[Stroke]] = {
    "A": [[(0, 1), (0.5, 0), (1, 1)], [(0.22, 0.62), (0.78, 0.62)]],
    "B": [
        [(0, 0), (0, 1)],
        [(0, 0), (0.6, 0), *_arc(0.6, 0.25, 0.32, 0.25, -90, 90), (0, 0.5)],
        [(0, 0.5), (0.65, 0.5), *_arc(0.65, 0.75, 0.35, 0.25, -90, 90), (0, 1)],
    ],
    "C": [_arc(0.55, 0.5, 0.5, 0.5, -40, -320)],
    "D": [[(0, 0), (0, 1)], [(0, 0), (0.4, 0), *_arc(0.4, 0.5, 0.6, 0.5, -90, 90), (0, 1)]],
    "E": [[(1, 0), (0, 0), (0, 1), (1, 1)], [(0, 0.5), (0.8, 0.5)]],
    "F": [[(1, 0), (0, 0), (0, 1)], [(0, 0.5), (0.8, 0.5)]],
    "G": [[*_arc(0.52, 0.5, 0.5, 0.5, -40, -360), (1.02, 1)], [(1.02, 0.55), (0.55, 0.55)]],
    "H": [[(0, 0), (0, 1)], [(1, 0), (1, 1)], [(0, 0.5), (1, 0.5)]],
    "I": [[(0.5, 0), (0.5, 1)]],
    "J": [[(1, 0), *_arc(0.5, 0.68, 0.5, 0.32, 0, 180)]],
    "K": [[(0, 0), (0, 1)], [(1, 0), (0, 0.62)], [(0.32, 0.42), (1, 1)]],
    "L": [[(0, 0), (0, 1), (1, 1)]],
    "M": [[(0, 1), (0, 0), (0.5, 0.65), (1, 0), (1, 1)]],
    "N": [[(0, 1), (0, 0), (1, 1), (1, 0)]],
    "O": [_ring(0.5, 0.5, 0.5, 0.5)],
    "P": [[(0, 1), (0, 0), (0.6, 0), *_arc(0.6, 0.27, 0.4, 0.27, -90, 90), (0, 0.54)]],
    "Q": [_ring(0.5, 0.5, 0.5, 0.5), [(0.6, 0.7), (1.02, 1.05)]],
    "R": [
        [(0, 1), (0, 0), (0.6, 0), *_arc(0.6, 0.27, 0.4, 0.27, -90, 90), (0, 0.54)],
        [(0.45, 0.54), (1, 1)],
    ],
    "S": [[*_arc(0.5, 0.25, 0.46, 0.25, -25, -270), *_arc(0.5, 0.75, 0.48, 0.25, -90, 155)]],
    "T": [[(0, 0), (1, 0)], [(0.5, 0), (0.5, 1)]],
    "U": [[(0, 0), *_arc(0.5, 0.65, 0.5, 0.35, 180, 0), (1, 0)]],
    "V": [[(0, 0), (0.5, 1), (1, 0)]],
    "W": [[(0, 0), (0.25, 1), (0.5, 0.35), (0.75, 1), (1, 0)]],
    "X": [[(0, 0), (1, 1)], [(1, 0), (0, 1)]],
    "Y": [[(0, 0), (0.5, 0.5), (1, 0)], [(0.5, 0.5), (0.5, 1)]],
    "Z": [[(0, 0), (1, 0), (0, 1), (1, 1)]],
    "0": [_ring(0.5, 0.5, 0.5, 0.5)],
    "1": [[(0.15, 0.25), (0.6, 0), (0.6, 1)]],
    "2": [[*_arc(0.5, 0.3, 0.47, 0.3, -165, 30), (0, 1), (1, 1)]],
    "3": [[*_arc(0.5, 0.27, 0.43, 0.27, -150, 90), *_arc(0.5, 0.73, 0.48, 0.27, -90, 150)]],
    "4": [[(0.75, 1), (0.75, 0), (0, 0.68), (1, 0.68)]],
    "5": [[(0.92, 0), (0.12, 0), (0.08, 0.45), *_arc(0.5, 0.68, 0.46, 0.32, -135, 150)]],
    "6": [[*_arc(0.55, 0.5, 0.45, 0.5, -50, -180), (0.06, 0.7)], _ring(0.5, 0.7, 0.44, 0.3)],
    "7": [[(0, 0), (1, 0), (0.35, 1)]],
    "8": [_ring(0.5, 0.25, 0.4, 0.25), _ring(0.5, 0.73, 0.47, 0.27)],
    "9": [_ring(0.5, 0.3, 0.44, 0.3), [(0.94, 0.3), *_arc(0.45, 0.5, 0.49, 0.5, 0, 130)]],
}
# how wide a glyph is against the face's usual width
WIDTHS = {"I": 0.15, "1": 0.55, "J": 0.8, "M": 1.15, "W": 1.3}
# the characters whose stroke ends on the top or the baseline get serifs in a serif face
SERIFED = set("IT1HKLEFNMUVWXYZ")


def glyphs(
    text: str, rng: random.Random, cap: float
) -> tuple[Image.Image, list[tuple[float, float]]]:
    """`text` (capitals and digits) as an "L" mask in a face made up for it, capitals `cap` px
    tall, and each character's left and right edge in the mask."""
    width = rng.uniform(0.45, 0.85) * cap
    gap = rng.uniform(0.12, 0.4) * cap
    stroke = max(1, round(rng.uniform(0.07, 0.2) * cap))
    slant = rng.uniform(-0.15, 0.25) if rng.random() < 0.3 else 0.0
    serif = rng.random() < 0.3
    round_ends = rng.random() < 0.5
    jitter = rng.uniform(0.0, 0.06)
    strokes: dict[str, list[Stroke]] = {}
    for char in sorted(set(text)):  # each glyph scaled a little, each stroke moved as a whole
        sx, sy = rng.uniform(1 - jitter, 1 + jitter), rng.uniform(1 - jitter, 1)
        strokes[char] = []
        for line in SKELETONS[char]:
            dx, dy = rng.gauss(0, jitter / 2), rng.gauss(0, jitter / 2)
            strokes[char].append([(x * sx + dx, y * sy + dy + (1 - sy)) for x, y in line])
    pad = stroke + 2
    advances = [width * WIDTHS.get(char, 1.0) for char in text]
    lean = abs(slant) * cap
    total = sum(advances) + gap * (len(text) - 1) + lean
    mask = Image.new("L", (int(total + 2 * pad) + 1, int(cap + 2 * pad) + 1), 0)
    draw = ImageDraw.Draw(mask)
    spans = []
    left = pad + (lean if slant > 0 else 0.0)
    for char, advance in zip(text, advances, strict=True):
        for line in strokes[char]:
            # a slanted face leans each point by its height above the baseline
            points = [(left + x * advance - slant * y * cap, pad + y * cap) for x, y in line]
            draw.line(points, fill=255, width=stroke, joint="curve")
            if round_ends and stroke > 2:
                r = stroke / 2
                for px, py in (points[0], points[-1]):
                    draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
            if serif and char in SERIFED:
                half = max(1.0, width * 0.18)
                for px, py in (points[0], points[-1]):
                    if abs(py - pad) < 1 or abs(py - pad - cap) < 1:
                        draw.line(
                            [(px - half, py), (px + half, py)], fill=255, width=stroke // 2 + 1
                        )
        spans.append((left, left + advance))
        left += advance + gap
    return mask, spans
