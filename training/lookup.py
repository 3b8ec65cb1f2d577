"""Supervising look-ups: where one attention head should look when a question names a shape.

"What color is the triangle?" and "Is there a green square?" need the language model to find
the named shape among the image tokens and read it. Trained on the answer alone, the small
language model does not learn that circuit in the steps an hour allows, even from perfect image
tokens (`training/probe_lookup.py`); pulled gently towards it, it does (colour 0.81 against 0.63
in 3,000 probe steps). Since the world is drawn by us, we know which image tokens show the named
shape: this module marks them, and `attention_loss` asks one head of the language model, at the
position that decides the answer, to put its weight there.

A training aid like the per-patch read-outs: it changes no weight's shape and no module, so the
checkpoint stays a plain Idefics3 model.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import torch

from training import world
from training.data import Example

LAYER = 1  # the language model's second layer: the first can gather the question's words
HEAD = 0
IGNORE = -100


def named_shape(question: str) -> int | None:
    """1 + the index in `world.SHAPES` of the one shape a question names (colour and yes/no
    questions do; descriptions, counts and reading do not), else None."""
    words = question.lower().rstrip("?.").replace("?", " ").split()
    named = [w for w in words if w in world.SHAPES]
    return 1 + world.SHAPES.index(named[0]) if len(named) == 1 else None


def targets(
    examples: list[Example],
    input_ids: torch.Tensor,
    starts: list[list[int]],
    token_targets: torch.Tensor,
    image_token: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where to look, for every answer to a question that names a shape present in its image.

    `starts[row]` are the positions where the row's answers are decided (one per turn, in
    order): each answer's first token that is not white space;
    `token_targets` is (images, rows, tokens) as `patches.targets` makes it, its first row the
    shape under each image token, images in the order the examples hold them.

    Returns `query` (n, 2): the row, and the position whose output predicts that token (the
    one before it); and `keys` (n, positions): the image tokens of the named shape in
    that row; and `colour` (n,): the index in `world.COLORS` of the named shape's colour, or -100
    (ignored) where two shapes of that kind differ in colour. Questions about two images, or about
    a shape the image lacks (or shows too small to cover an image token), give none."""
    queries: list[tuple[int, int]] = []
    keys: list[torch.Tensor] = []
    colours: list[int] = []
    names = list(world.COLORS)
    image = 0
    for row, example in enumerate(examples):
        first, count = image, len(example.images)
        image += count
        if count != 1:
            continue
        where = (input_ids[row] == image_token).nonzero()[:, 0]
        shapes = token_targets[first, 0]
        if len(where) != len(shapes):
            raise RuntimeError(f"row {row}: {len(where)} image tokens, {len(shapes)} labelled")
        for (question, _), start in zip(example.turns(), starts[row], strict=True):
            shape = named_shape(question)
            if shape is None or not bool((shapes == shape).any()):
                continue
            mask = torch.zeros(input_ids.shape[1], dtype=torch.bool)
            mask[where[shapes == shape]] = True
            queries.append((row, start - 1))
            keys.append(mask)
            kinds = {i.color for i in example.scenes[0].items if i.shape == world.SHAPES[shape - 1]}
            colours.append(names.index(kinds.pop()) if len(kinds) == 1 else IGNORE)
    if not queries:
        return (
            torch.zeros(0, 2, dtype=torch.long),
            torch.zeros(0, input_ids.shape[1], dtype=torch.bool),
            torch.zeros(0, dtype=torch.long),
        )
    return (
        torch.tensor(queries, dtype=torch.long),
        torch.stack(keys),
        torch.tensor(colours, dtype=torch.long),
    )


def attention_loss(
    attention: torch.Tensor, query: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor | None:
    """Mean -log of the attention mass one head puts on `keys` at each `query` position.

    `attention` is (rows, positions, positions): one layer's one head. None when nothing asks."""
    if not len(query):
        return None
    weights = attention[query[:, 0], query[:, 1]]  # (n, positions)
    mass = (weights * keys.to(weights.dtype)).sum(-1)
    return -torch.log(mass + 1e-6).mean()


class Readout(torch.nn.Module):
    """A linear read-out of one property of the looked-up shape (its colour, or its kind) from
    the hidden state where an answer names it, after the supervised head's layer. A training
    aid: not saved."""

    def __init__(self, hidden: int, classes: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(hidden, classes)
        self.accuracy: float | None = None

    def loss(
        self, hidden_states: torch.Tensor, query: torch.Tensor, wanted: torch.Tensor
    ) -> torch.Tensor | None:
        """Cross-entropy of the read-out at each `query` position of `hidden_states` (rows,
        positions, hidden: the output of layer `LAYER`) whose `wanted` class is not IGNORE;
        None when none is."""
        keep = wanted != IGNORE
        if not bool(keep.any()):
            return None
        seen = hidden_states[query[keep, 0], query[keep, 1]].float()
        logits = self.head(seen)
        self.accuracy = (logits.argmax(-1) == wanted[keep]).float().mean().item()
        return torch.nn.functional.cross_entropy(logits, wanted[keep])


class ColourReadout(Readout):
    """A linear read-out of the named shape's colour from the hidden state where the answer is
    decided, after the supervised head's layer: for "Is there a green square?" the model must
    compare the square's colour with the one asked, and this keeps the looked-up colour there to
    compare. A training aid: not saved."""

    def __init__(self, hidden: int) -> None:
        super().__init__(hidden, len(world.COLORS))


_MENTION = re.compile(
    r"\b[Aa]n? ({}) ({})\b".format("|".join(world.COLORS), "|".join(world.SHAPES))
)


def _token_at(pieces: list[str], char: int) -> int:
    """The index of the token whose text covers character `char` of the joined `pieces`."""
    end = 0
    for index, piece in enumerate(pieces):
        end += len(piece)
        if char < end:
            return index
    raise ValueError(f"character {char} is past the end")


def item_targets(
    examples: list[Example],
    input_ids: torch.Tensor,
    starts: list[list[int]],
    answers: list[list[list[int]]],
    pieces: dict[int, str],
    token_items: torch.Tensor,
    image_token: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where to look while describing, for every answer that names the shapes one by one.

    A description names its image's shapes left to right ("A red circle and a blue star."; for
    two images, the first image's and then the second's), and decides each twice: where its
    colour word is chosen and where its kind is. At both positions (the one whose output
    predicts the word's first token) the look-up head should look at the image tokens of that
    very shape, the k-th from the left: `targets`' head and look-up, by place instead of by name.

    `answers[row][turn]` are the token ids of a turn's answer, which begins at
    `starts[row][turn]`; `pieces` the text of each token id; `token_items` is (images, shapes,
    tokens), where each shape of each image is among its image tokens (`patches.item_cells`),
    images in the order the examples hold them. Returns `query` (n, 2) and `keys` (n,
    positions) as `targets` makes them, and the `colour` (index in `world.COLORS`, at colour
    words) and `shape` (index in `world.SHAPES`, at shape words) to read out there, IGNORE for
    the other. Answers that do not describe, and shapes not drawn at all, give none."""
    queries: list[tuple[int, int]] = []
    keys: list[torch.Tensor] = []
    colours: list[int] = []
    shapes: list[int] = []
    names = list(world.COLORS)
    per_image = token_items.shape[2]
    image = 0
    for row, example in enumerate(examples):
        first, count = image, len(example.images)
        image += count
        where = (input_ids[row] == image_token).nonzero()[:, 0]
        if len(where) != count * per_image:
            raise RuntimeError(f"row {row}: {len(where)} image tokens, {count} x {per_image}")
        # the shapes a description names, in the order it names them
        items = [
            (k, j, i) for k, scene in enumerate(example.scenes) for j, i in enumerate(scene.items)
        ]
        for answer, start in zip(answers[row], starts[row], strict=True):
            texts = [pieces[token] for token in answer]
            mentions = list(_MENTION.finditer("".join(texts)))
            if len(mentions) != len(items):  # not a description (none: counts, colours, text)
                continue
            for mention, (k, j, item) in zip(mentions, items, strict=True):
                if (mention.group(1), mention.group(2)) != (item.color, item.shape):
                    raise RuntimeError(f"row {row}: {mention.group(0)!r} is not {item}")
                mask = torch.zeros(input_ids.shape[1], dtype=torch.bool)
                own = where[k * per_image : (k + 1) * per_image]
                mask[own[token_items[first + k, j]]] = True
                if not bool(mask.any()):
                    continue
                for group, colour, shape in (
                    (1, names.index(item.color), IGNORE),
                    (2, IGNORE, world.SHAPES.index(item.shape)),
                ):
                    queries.append((row, start + _token_at(texts, mention.start(group)) - 1))
                    keys.append(mask)
                    colours.append(colour)
                    shapes.append(shape)
    if not queries:
        empty = torch.zeros(0, dtype=torch.long)
        return (
            torch.zeros(0, 2, dtype=torch.long),
            torch.zeros(0, input_ids.shape[1], dtype=torch.bool),
            empty,
            empty.clone(),
        )
    return (
        torch.tensor(queries, dtype=torch.long),
        torch.stack(keys),
        torch.tensor(colours, dtype=torch.long),
        torch.tensor(shapes, dtype=torch.long),
    )


READ_HEAD = 1  # the same layer's next head: where the next printed character is


def char_cells(
    box: tuple[float, float, float, float], size: tuple[int, int], grid: int
) -> list[int]:
    """The image tokens (row-major, `grid` x `grid`) that show the middle of a character's box
    (x0, y0, x1, y1, in the coordinates of an image of `size`): the cells that overlap its middle
    half, at least the one its centre is in."""
    width, height = size
    x0, y0, x1, y1 = box
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 4, (y1 - y0) / 4

    def span(lo: float, hi: float, extent: int) -> range:
        first = max(0, min(grid - 1, int(lo * grid / extent)))
        last = max(first, min(grid - 1, math.ceil(hi * grid / extent) - 1))
        return range(first, last + 1)

    return [
        r * grid + c for r in span(cy - hh, cy + hh, height) for c in span(cx - hw, cx + hw, width)
    ]


def read_targets(
    examples: list[Example],
    input_ids: torch.Tensor,
    starts: list[list[int]],
    answers: list[list[list[int]]],
    char_ids: dict[str, int],
    grid: int,
    image_token: int,
    pairs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where to look while spelling a printed word out, for every answer that spells one.

    `answers[row][turn]` are the token ids of that turn's answer, which begins at
    `starts[row][turn]`; `char_ids` the token of each letter and digit (each is one token).
    For the k-th character of the word, the position whose output predicts it (the one before)
    should look at the image tokens where the word's k-th character is printed: `query` (n, 2)
    and `keys` (n, positions), as `targets` makes them. Images with no word and answers that do
    not spell it (counts, colours, "There is no text.") give none; two-image questions give none
    unless `pairs`: then a description of both spells the first image's word (from its image
    tokens) and, after it, the second's (from the second image's)."""
    queries: list[tuple[int, int]] = []
    keys: list[torch.Tensor] = []
    for row, example in enumerate(examples):
        count = len(example.images)
        if count != 1 and not pairs:
            continue
        # each image's word as tokens; None where it has none, or a character with no token
        spelled = [[char_ids.get(char) for char, _ in labels.chars] for labels in example.labels]
        words = [w if w and None not in w else None for w in spelled]
        if all(word is None for word in words):
            continue
        where = (input_ids[row] == image_token).nonzero()[:, 0]
        if len(where) != count * grid * grid:
            raise RuntimeError(f"row {row}: {len(where)} image tokens, {count} x grid {grid}")
        for answer, start in zip(answers[row], starts[row], strict=True):
            after = 0
            for k, (word, labels) in enumerate(zip(words, example.labels, strict=True)):
                if word is None:
                    continue
                # one image: the word where it last occurs (as before pairs were read); a pair:
                # each image's word after the one before it, so the first image's comes first
                at = _find(answer, word) if count == 1 else _find_from(answer, word, after)
                if at is None:
                    continue
                after = at + len(word)
                own = where[k * grid * grid : (k + 1) * grid * grid]
                for j, (_, box) in enumerate(labels.chars):
                    mask = torch.zeros(input_ids.shape[1], dtype=torch.bool)
                    mask[own[char_cells(box, labels.items.size, grid)]] = True
                    queries.append((row, start + at + j - 1))
                    keys.append(mask)
    if not queries:
        return torch.zeros(0, 2, dtype=torch.long), torch.zeros(
            0, input_ids.shape[1], dtype=torch.bool
        )
    return torch.tensor(queries, dtype=torch.long), torch.stack(keys)


def _find_from(tokens: list[int], word: list[int | None], after: int) -> int | None:
    """Where `word` first occurs in `tokens` at or after `after`, if it does."""
    n = len(word)
    for at in range(after, len(tokens) - n + 1):
        if tokens[at : at + n] == word:
            return at
    return None


def _find(tokens: list[int], word: list[int | None]) -> int | None:
    """Where `word` last occurs in `tokens`, if it does."""
    n = len(word)
    for at in range(len(tokens) - n, -1, -1):
        if tokens[at : at + n] == word:
            return at
    return None


def fuse_other_layers(text_model: Any) -> None:
    """Every language-model layer but `LAYER` attends with PyTorch's fused kernel (sdpa).

    The look-up losses read one layer's attention weights, which only the eager implementation
    returns; the others need not pay for an attention matrix that nothing reads. Each such layer
    gets a copy of the config that names sdpa (the model's own, and so its causal mask, stays
    eager: sdpa takes that additive mask as it is).
    """
    fused = copy.copy(text_model.config)
    fused._attn_implementation = "sdpa"
    for k, layer in enumerate(text_model.layers):
        if k != LAYER:
            layer.self_attn.config = fused


def looked(attentions: tuple[torch.Tensor, ...], fused: bool) -> torch.Tensor:
    """The look-up layer's attention weights from a forward pass's `attentions`.

    transformers collects the weights the layers return and leaves out a fused layer's (None):
    with `fuse_other_layers` the look-up layer's are the only ones there.
    """
    return attentions[0 if fused else LAYER]
