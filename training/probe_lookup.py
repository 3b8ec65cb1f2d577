"""Can the language model learn look-ups at all? Train it on image tokens that are perfect.

    PYTHONPATH=. .venv/bin/python -m training.probe_lookup --steps 1800

The real model fails "What color is the triangle?" and "Is there a green square?" (it names a
colour that is present, at random). This probe separates the two halves of the model: the
vision tower is left out, and every image token the language model sees is a *symbol*: the sum
of the input embeddings of the colour word and the shape word of the object under it (" red" +
" triangle"), or a learned background vector. The chats, the template, the tokenizer and the
language model are the training's own (`training.train.build`, `collate`, `data.make_chat`).

Each fresh batch is scored before the model learns from it: for each chat, whether every token
of its first answer is predicted right (teacher-forced exact match), per question type. If the
language model cannot learn look-ups from perfect tokens, no vision tower will help it.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

import torch

from training import lookup, train, world
from training.data import Example, make_chat

KINDS: dict[world.QuestionType, float] = {
    "describe": 0.3,
    "count": 0.1,
    "color": 0.3,
    "exists": 0.3,
}


def look_up_chat(rng: random.Random, questions: int, image_first: bool = True) -> Example:
    """One image of two or three shapes and `questions` colour / yes-no questions about it
    (the first before the image unless `image_first`)."""
    scene = world.sample_scene(rng)
    while len(scene.items) < 2:
        scene = world.sample_scene(rng)
    asked: list[tuple[str, str]] = []
    for _ in range(4 * questions):
        question, answer = world.ask(scene, rng, rng.choice(("color", "exists")))
        if all(question != q for q, _ in asked):
            asked.append((question, answer))
        if len(asked) == questions:
            break
    image, labels = world.render_labelled(scene, rng, draw_max=256)
    (question, answer), *more = asked
    kind: world.QuestionType = "color" if question.startswith(("What", "Which")) else "exists"
    return Example(kind, None, question, answer, [image], image_first, [scene], [labels], more)


def symbols(
    model: Any, tokenizer: Any, token_targets: torch.Tensor, background: torch.Tensor
) -> torch.Tensor:
    """(images, tokens, hidden): embedding(colour word) + embedding(shape word) under each image
    token; `background` where no shape covers it."""
    table: torch.Tensor = model.model.text_model.get_input_embeddings().weight

    def word(w: str) -> torch.Tensor:
        ids: list[int] = tokenizer(" " + w, add_special_tokens=False).input_ids
        return table[ids].sum(0)

    shapes = torch.stack([word(s) for s in world.SHAPES])
    colors = torch.stack([word(c) for c in world.COLORS])
    shape, color = token_targets[:, 0], token_targets[:, 1]
    drawn = shapes[(shape - 1).clamp(min=0)] + colors[(color - 1).clamp(min=0)]
    return torch.where((shape > 0)[..., None], drawn, background)


def first_answer_right(logits: torch.Tensor, labels: torch.Tensor) -> list[bool]:
    """Per row: is every token of the first answer (the first run of labelled tokens) right?"""
    right = []
    predicted = logits.argmax(-1)
    for row in range(labels.shape[0]):
        where = (labels[row] != -100).nonzero()[:, 0].tolist()
        run = where[:1]
        for at in where[1:]:
            if at != run[-1] + 1:
                break
            run.append(at)
        right.append(bool(run) and all(predicted[row, at - 1] == labels[row, at] for at in run))
    return right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=train.SIZE.layers)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--clean", action="store_true", help="every scene 256 x 256 px")
    parser.add_argument(
        "--questions",
        type=int,
        default=0,
        help="instead of the training's chats: this many colour / yes-no questions about each "
        "image of two or three shapes (more look-up signal a step)",
    )
    parser.add_argument(
        "--text-first",
        action="store_true",
        help="with --questions: the first question before the image, so that the image tokens "
        "can see what is asked (one hop instead of two)",
    )
    parser.add_argument(
        "--attend-weight",
        type=float,
        default=0.0,
        help="also train one head of the language model (`training.lookup`), where an answer "
        "is decided, to look at the image tokens of the shape its question names (weight of "
        "that loss)",
    )
    parser.add_argument(
        "--colour-weight",
        type=float,
        default=0.0,
        help="also read the named shape's colour out where the answer is decided "
        "(`lookup.ColourReadout`; weight of that loss)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.clean:
        world.sample_size = lambda rng: (256, 256)  # type: ignore[assignment]
    model, processor = train.build(0, replace(train.SIZE, layers=args.layers))
    tokenizer = processor.tokenizer
    image_token = model.config.image_token_id
    if args.attend_weight:
        model.model.text_model.config._attn_implementation = "eager"  # attention weights out
    background = torch.nn.Parameter(torch.randn(train.SIZE.hidden) * 0.02)
    readout = lookup.ColourReadout(train.SIZE.hidden)
    parameters = [
        *model.model.text_model.parameters(),
        *model.lm_head.parameters(),
        *readout.parameters(),
        background,
    ]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    kinds, weights = list(KINDS), list(KINDS.values())
    scores: dict[str, list[bool]] = defaultdict(list)
    started = time.perf_counter()
    for step in range(args.steps):
        rng = random.Random(f"probe:{step}")
        for group in optimizer.param_groups:
            group["lr"] = train.lr_at(step, args.steps, args.lr, 100)
        turns = 1 if rng.random() < 0.5 else rng.randint(2, 4)
        examples = [
            look_up_chat(rng, args.questions, image_first=not args.text_first)
            if args.questions
            else make_chat(
                rng, rng.choices(kinds, weights)[0], turns=turns, system=False, draw_max=256
            )
            for _ in range(args.batch_size)
        ]
        batch = train.collate(examples, processor)
        ids = batch["input_ids"]
        embedded = model.model.text_model.get_input_embeddings()(ids)
        seen = symbols(model, tokenizer, batch["token_targets"], background)
        embedded = embedded.masked_scatter(
            (ids == image_token)[..., None], seen.reshape(-1, seen.shape[-1]).to(embedded.dtype)
        )
        out = model(
            inputs_embeds=embedded,
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            output_attentions=bool(args.attend_weight),
            output_hidden_states=bool(args.colour_weight),
        )
        loss = out.loss
        if args.colour_weight:
            named = readout.loss(
                out.hidden_states[lookup.LAYER + 1], batch["lookup_query"], batch["lookup_colour"]
            )
            if named is not None:
                loss = loss + args.colour_weight * named
        if args.attend_weight:
            looked = lookup.attention_loss(
                out.attentions[lookup.LAYER][:, lookup.HEAD],
                batch["lookup_query"],
                batch["lookup_keys"],
            )
            if looked is not None:
                loss = loss + args.attend_weight * looked
        for example, right in zip(
            examples, first_answer_right(out.logits, batch["labels"]), strict=True
        ):
            scores[example.kind].append(right)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if (step + 1) % 100 == 0:
            recent = {k: sum(v[-300:]) / len(v[-300:]) for k, v in sorted(scores.items())}
            shown = " ".join(f"{k} {v:.2f}" for k, v in recent.items())
            rate = (step + 1) / (time.perf_counter() - started)
            print(
                f"step {step + 1} loss {out.loss.item():.3f} {shown} {rate:.2f} steps/s", flush=True
            )


if __name__ == "__main__":
    main()
