"""Dense supervision for the vision tower while it trains: what is under each patch.

A vision tower trained from random weights through the language loss alone stays blind for a long
time: the answer's few tokens are a weak, late signal. Since the world is drawn by us, we know for
every patch of the processed image which shape (if any) covers it, in which colour, and which
printed character sits there. `PatchHeads` reads the tower's output patch by patch and is trained
to say so, beside the language loss. It is a training aid only: it is not part of the saved
checkpoint, which stays a plain Idefics3 model.

Every image reaches the tower as a `size` x `size` square (the processor stretches it, no tiling),
so a label map drawn at the image's own size maps onto the patch grid by a plain resize.
"""

from __future__ import annotations

import string
from typing import Any

import numpy as np
import torch
from PIL import Image

from training import world
from training.lookup import char_cells

CHARS = string.ascii_uppercase + string.digits
NONE = 0  # the class of a patch with no shape (or no character) on it
# A 16 px patch of the model's input holds one or two glyphs, so the character read-out names
# the glyph under each of `columns` vertical strips of the patch, left to right: which letters
# are there, and in which order (1: one character per patch). `rows` splits each strip from top to
# bottom too, so the read-out says where in the patch a glyph sits up and down as well (1: the
# whole height of the patch, as before).
COLUMNS = 1
ROWS = 1
HEADS = {
    "shape": 1 + len(world.SHAPES),
    "color": 1 + len(world.COLORS),
    "char": 1 + len(CHARS),
    "slot": 1 + len(CHARS),
}
# The "slot" read-out (optional, `targets(slots=True)`): the word's k-th character, in row k of
# the cells under the middle of its box. Strips say which glyph lies where, but not where one
# glyph ends and the next begins ("33" and one wide "3" cover the same strips); slots number
# the characters, so that spelling the k-th one out is a look-up of row k, and a word's length
# is the first row with nothing in it.
SLOTS = world.LONGEST_TEXT
COVER = 0.2  # a patch belongs to a shape when the shape covers at least this much of it


def targets(
    scene: world.Scene,
    labels: world.Labels,
    size: int,
    patch: int,
    columns: int = COLUMNS,
    slots: bool = False,
    rows: int = ROWS,
) -> torch.Tensor:
    """(2 + columns * rows [+ SLOTS], grid * grid) class indices: shape and colour under each
    patch, then the character under each of its `columns` x `rows` cells (row by row, each row
    left to right), then (`slots`) the word's k-th character in row k under the middle of its
    box."""
    grid = size // patch
    width, height = labels.items.size
    item = item_map(scene, labels, size, patch)
    shape = np.zeros(grid * grid, dtype=np.int64)
    color = np.zeros(grid * grid, dtype=np.int64)
    if scene.items:
        shapes = np.array([NONE] + [1 + world.SHAPES.index(i.shape) for i in scene.items])
        colors = np.array([NONE] + [1 + list(world.COLORS).index(i.color) for i in scene.items])
        shape, color = shapes[item], colors[item]
    # cells across the whole image: grid * rows of them down, grid * columns across
    char = np.zeros((grid * rows, grid * columns), dtype=np.int64)
    fx, fy = grid * columns / width, grid * rows / height
    rows_at, cols_at = np.arange(grid * rows) + 0.5, np.arange(grid * columns) + 0.5
    for glyph, (x0, y0, x1, y1) in labels.chars:
        if glyph not in CHARS:
            continue
        value = 1 + CHARS.index(glyph)
        across = np.flatnonzero((cols_at >= x0 * fx) & (cols_at < x1 * fx))
        down = np.flatnonzero((rows_at >= y0 * fy) & (rows_at < y1 * fy))
        # a glyph narrower than a strip (or shorter than a cell) still marks the one its
        # centre is in
        if across.size == 0:
            across = np.array([min(grid * columns - 1, int((x0 + x1) / 2 * fx))])
        if down.size == 0:
            down = np.array([min(grid * rows - 1, int((y0 + y1) / 2 * fy))])
        char[np.ix_(down, across)] = value
    # (grid, rows, grid, columns) -> (rows * columns, grid * grid): cell (i, j) of every patch,
    # in patch order
    cells = char.reshape(grid, rows, grid, columns).transpose(1, 3, 0, 2)
    strips = cells.reshape(rows * columns, -1)
    parts = [shape[None], color[None], strips]
    if slots:
        slot = np.zeros((SLOTS, grid * grid), dtype=np.int64)
        for k, (glyph, box) in enumerate(labels.chars[:SLOTS]):
            if glyph in CHARS:
                slot[k, char_cells(box, (width, height), grid)] = 1 + CHARS.index(glyph)
        parts.append(slot)
    return torch.from_numpy(np.concatenate(parts))


def _cover(labels: world.Labels, count: int, size: int, patch: int) -> np.ndarray:
    """(count, grid * grid): how much of each patch each of the scene's `count` shapes covers."""
    grid = size // patch
    items = np.asarray(labels.items.resize((size, size), Image.Resampling.NEAREST))
    # each shape's pixels in each patch, counted down the patch's rows and then across them: a
    # whole count over the patch's pixels is what `(blocks == k + 1).mean(axis=1)` gave, to the
    # bit, at half its cost (each patch's counts fit 16 bits up to 255 px patches)
    hot = (items[None] == np.arange(1, count + 1, dtype=np.uint8)[:, None, None]).view(np.uint8)
    wide = np.uint16 if patch < 256 else np.uint32
    down = hot.reshape(count, grid, patch, size).sum(axis=2, dtype=wide)
    counts = down.reshape(count, grid, grid, patch).sum(axis=3, dtype=wide)
    cover: np.ndarray = counts.reshape(count, grid * grid) / (patch * patch)
    return cover


def item_map(scene: world.Scene, labels: world.Labels, size: int, patch: int) -> np.ndarray:
    """(grid * grid,) which shape lies under each patch: 1 + its index in `scene.items` (left to
    right), or NONE where no shape covers at least `COVER` of the patch."""
    if not scene.items:
        return np.zeros((size // patch) ** 2, dtype=np.int64)
    cover = _cover(labels, len(scene.items), size, patch)
    best, share = cover.argmax(axis=0), cover.max(axis=0)
    return np.where(share >= COVER, best + 1, NONE).astype(np.int64)


MAX_ITEMS = 3  # shapes in a scene, at most


def item_cells(scene: world.Scene, labels: world.Labels, size: int, patch: int) -> torch.Tensor:
    """(MAX_ITEMS, grid * grid) bool: the patches where each shape mostly is (those it covers at
    least half as much as the one it covers most), so that even a shape too small to win a patch
    in `item_map` has its own; rows past the scene's shapes, and shapes not drawn, have none."""
    cells = np.zeros((MAX_ITEMS, (size // patch) ** 2), dtype=bool)
    if scene.items:
        cover = _cover(labels, len(scene.items), size, patch)
        most = cover.max(axis=1, keepdims=True)
        cells[: len(scene.items)] = (cover >= 0.5 * most) & (most > 0)
    return torch.from_numpy(cells)


def rows(name: str, cells: int) -> slice:
    """Which rows of `targets` a read-out learns from; `cells`: the character read-out's cells a
    patch (columns x rows)."""
    return {
        "shape": slice(0, 1),
        "color": slice(1, 2),
        "char": slice(2, 2 + cells),
        "slot": slice(2 + cells, 2 + cells + SLOTS),
    }[name]


class PatchHeads(torch.nn.Module):
    """Linear read-outs of one module's per-patch outputs; `attach` hooks them onto it.

    On the vision tower they read each patch; on the connector (after Idefics3's pixel shuffle)
    each image token, as the text model sees it: the second keeps shape and colour linearly
    readable where the language model looks for them.
    """

    def __init__(
        self,
        hidden: int,
        names: tuple[str, ...] = ("shape", "color", "char"),
        columns: int = COLUMNS,
        glyph_weight: float = 0.0,
        rows: int = ROWS,
    ) -> None:
        super().__init__()
        self.names = names
        # Most strips hold no character, so the plain cross-entropy is mostly "nothing here";
        # `glyph_weight` adds the cross-entropy over the strips that do hold one: which glyph.
        self.glyph_weight = glyph_weight
        # target rows per read-out
        self.cells = columns * rows
        self.width = {"shape": 1, "color": 1, "char": self.cells, "slot": SLOTS}
        self.heads = torch.nn.ModuleDict(
            {n: torch.nn.Linear(hidden, self.width[n] * HEADS[n]) for n in names}
        )
        self.seen: torch.Tensor | None = None
        self.accuracy: dict[str, float] = {}

    def attach(self, module: torch.nn.Module) -> None:
        """Keep `module`'s output (its last hidden state, or the tensor itself) for `loss`."""

        def keep(_module: Any, _args: Any, output: Any) -> None:
            self.seen = getattr(output, "last_hidden_state", output)

        module.register_forward_hook(keep)

    def loss(self, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the read-outs; `target` is (images, rows, patches) as `targets`
        makes it.

        Also keeps each read-out's accuracy on the patches that are not background, for the log.
        """
        if self.seen is None:
            raise RuntimeError("the hooked module has not run")
        seen = self.seen.float()
        if seen.shape[0] != target.shape[0]:
            raise RuntimeError(f"{seen.shape[0]} images seen, {target.shape[0]} labelled")
        total = seen.new_zeros(())
        for name, head in self.heads.items():
            # (images, patches, strips * classes) -> one row per patch strip
            width = self.width[name]
            logits = head(seen).reshape(seen.shape[0], seen.shape[1], width, HEADS[name])
            logits = logits.reshape(-1, HEADS[name])
            wanted = target[:, rows(name, self.cells)].transpose(1, 2).reshape(-1)
            total = total + torch.nn.functional.cross_entropy(logits, wanted)
            marked = wanted != NONE
            if marked.any():
                if name in ("char", "slot") and self.glyph_weight:
                    total = total + self.glyph_weight * torch.nn.functional.cross_entropy(
                        logits[marked], wanted[marked]
                    )
                hits = logits.argmax(-1)[marked] == wanted[marked]
                self.accuracy[name] = hits.float().mean().item()
        self.seen = None
        return total / len(self.heads)
