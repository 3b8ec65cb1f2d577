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

    `starts[row]` are the positions where the row's answers begin (one per turn, in order);
    `token_targets` is (images, rows, tokens) as `patches.targets` makes it, its first row the
    shape under each image token, images in the order the examples hold them.

    Returns `query` (n, 2): the row, and the position whose output predicts the answer's first
    token (the one before it); and `keys` (n, positions): the image tokens of the named shape in
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


class ColourReadout(torch.nn.Module):
    """A linear read-out of the named shape's colour from the hidden state where the answer is
    decided, after the supervised head's layer: for "Is there a green square?" the model must
    compare the square's colour with the one asked, and this keeps the looked-up colour there to
    compare. A training aid: not saved."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(hidden, len(world.COLORS))
        self.accuracy: float | None = None

    def loss(
        self, hidden_states: torch.Tensor, query: torch.Tensor, colour: torch.Tensor
    ) -> torch.Tensor | None:
        """Cross-entropy of the read-out at each `query` position of `hidden_states` (rows,
        positions, hidden: the output of layer `LAYER`); None when nothing asks."""
        keep = colour != IGNORE
        if not bool(keep.any()):
            return None
        seen = hidden_states[query[keep, 0], query[keep, 1]].float()
        logits = self.head(seen)
        self.accuracy = (logits.argmax(-1) == colour[keep]).float().mean().item()
        return torch.nn.functional.cross_entropy(logits, colour[keep])
