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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where to look, for every answer to a question that names a shape present in its image.

    `starts[row]` are the positions where the row's answers begin (one per turn, in order);
    `token_targets` is (images, rows, tokens) as `patches.targets` makes it, its first row the
    shape under each image token, images in the order the examples hold them.

    Returns `query` (n, 2): the row, and the position whose output predicts the answer's first
    token (the one before it); and `keys` (n, positions): the image tokens of the named shape in
    that row. Questions about two images, or about a shape the image lacks (or shows too small to
    cover an image token), give none."""
    queries: list[tuple[int, int]] = []
    keys: list[torch.Tensor] = []
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
    if not queries:
        return torch.zeros(0, 2, dtype=torch.long), torch.zeros(
            0, input_ids.shape[1], dtype=torch.bool
        )
    return torch.tensor(queries, dtype=torch.long), torch.stack(keys)


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
