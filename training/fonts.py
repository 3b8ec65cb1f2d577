"""Real typefaces to print words in: the TrueType faces that matplotlib ships.

Pillow has one face of its own (Aileron) and one bitmap face (6x11), which the evaluation's other
routine prints in. A model trained on one face reads that face; reading a face it has never seen
takes many faces in training. matplotlib's wheel carries 21 faces with every capital and digit,
under free licences: DejaVu Sans, Sans Mono and Serif (each regular, bold, oblique and bold
oblique), STIX General (four) and five of Knuth's Computer Modern (roman, bold, sans, italic,
typewriter): sans and serif, proportional and monospaced, light and heavy, upright and slanted.
"""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path

from PIL import ImageFont

FACES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmti10.ttf",
    "cmtt10.ttf",
)


@cache
def folder() -> Path:
    """Where matplotlib keeps its TrueType files."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@cache
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """Face `name` (one of FACES) at `size` px."""
    return ImageFont.truetype(str(folder() / name), size)


def pick(rng: random.Random) -> str:
    """One of the faces, drawn uniformly."""
    return rng.choice(FACES)
