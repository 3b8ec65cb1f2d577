"""Train oculo-tiny: an Idefics3 (SmolVLM-architecture) model, from random weights, on the world.

    .venv/bin/python -m training.train --out src/oculo/models/oculo-tiny

Everything is seeded: the tokenizer's corpus, the weights, and every batch (batch k is drawn from
`Random(seed, k)`), so the same command on the same kind of machine gives the same model. The
checkpoint is written with `save_pretrained` and loads with AutoProcessor /
AutoModelForImageTextToText unchanged, like any SmolVLM checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from oculo.engines.vector_maths import settle_vector_maths
from oculo.testing.checkpoints import Size, build_tokenizer, idefics3_parts
from training import averaging, fingerprint, lookup, optimizers, patches, pixels, state, world
from training.data import MULTI_RATE, MULTI_TURNS, SYSTEM_RATE, TRAIN_MIX, Example, make_chat

SIZE = Size(
    image_size=128,
    patch_size=16,
    hidden=256,
    layers=3,
    heads=8,
    vision_hidden=192,
    vision_layers=4,
    vision_heads=6,
    scale_factor=2,
    context_length=512,
)
VISION_HEAD = SIZE.vision_hidden // SIZE.vision_heads  # each tower head's width
BPE_VOCAB = 700
ISOLATE = "[A-Z0-9]"  # printed words and numbers are spelled a letter or digit at a time
EOS = "<end_of_utterance>"
# The kernels a run computes with, the same on every x86-64 machine with AVX2: ATen's vectorised
# kernels and MKL's and oneDNN's code paths otherwise follow the CPU (AVX-512 here, AVX2 there),
# and their float sums differ in the last bits, which a long run grows into other weights.
# MKL_DYNAMIC and OMP_DYNAMIC: Intel's conditions for MKL to sum the same way from run to run
# (the thread count fixed; one of ten short runs on an Intel Xeon parted from the others in the
# eighth digit by step 50 without them; with them the shipped run's losses are unchanged).
PINNED_MATH = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
}
# MKL's AVX-512 path asks for these (Skylake-SP and later). On an Intel Xeon that has them, MKL
# held at AVX2 made the shipped command's steps take 14-26% longer, and its losses no closer
# to the AMD-trained shipped run's (training/README.md, "The pins on an Intel Xeon").
MKL_AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def pinned_math(cpuinfo: str | None = None) -> dict[str, str]:
    """The pinned kernels for this machine (`cpuinfo`: /proc/cpuinfo's text): `PINNED_MATH`,
    but on an Intel CPU with AVX-512 MKL held at its AVX-512 path instead, one path still for
    every such CPU. AMD CPUs keep MKL at AVX2: there the pinned run was the faster (2.2 steps/s
    against 1.65 on an AMD EPYC with AVX-512), and runs with and without AVX-512 agree byte for
    byte."""
    fields = fingerprint.cpu_fields(cpuinfo)
    flags = set(fields.get("flags", "").split())
    if fields.get("vendor_id") == "GenuineIntel" and flags >= MKL_AVX512:
        return {**PINNED_MATH, "MKL_CBWR": "AVX512"}
    return dict(PINNED_MATH)


def pin_math(argv: list[str]) -> None:
    """Run again in a fresh interpreter with `pinned_math()` set, unless it is set already (the
    variables are read when torch loads, so they cannot be set after)."""
    pinned = pinned_math()
    if all(os.environ.get(k) == v for k, v in pinned.items()):
        return
    sys.stdout.flush()
    os.execve(
        sys.executable,
        [sys.executable, "-m", "training.train", *argv],
        {**os.environ, **pinned},
    )


def tokenizer_corpus(seed: int, n: int = 6000) -> str:
    """The text the tokenizer learns its merges from: the world's questions and answers."""
    rng = random.Random(seed)
    lines = list(world.SYSTEM_PROMPTS) + world.WORDS
    for _ in range(n):
        scene = world.sample_scene(rng)
        kind = rng.choice(world.QUESTION_TYPES[:-1])
        lines.extend(world.ask(scene, rng, kind))
        if rng.random() < 0.1:
            lines.extend(world.ask_pair(scene, world.sample_scene(rng), rng))
    lines.append("User: Assistant: System:")
    return "\n".join(lines)


def build(seed: int, size: Size | None = None) -> tuple[Any, Any]:
    """A fresh (model, processor) pair of `size` (the shipped `SIZE` by default) with random
    weights drawn from `seed`."""
    size = size or SIZE
    from transformers import AutoModelForImageTextToText, GenerationConfig

    tokenizer = build_tokenizer(
        "idefics3",
        tokenizer_corpus(seed),
        vocab_size=BPE_VOCAB,
        isolate=ISOLATE,
        context_length=size.context_length,
    )
    config, processor = idefics3_parts(tokenizer, size)
    # One resize, straight to the model's square: Idefics3's default first fits the longer side
    # to the square and then stretches the shorter one back up, which throws away most of the
    # rows of a wide image (a 1,120 x 400 picture kept 46 of its rows before the stretch).
    processor.image_processor.do_resize = False
    torch.manual_seed(seed)
    model: Any = AutoModelForImageTextToText.from_config(config)  # type: ignore[no-untyped-call]
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.pad_token_id,
    )
    return model, processor


def shrink(image: Image.Image, side: int = SIZE.image_size) -> Image.Image:
    """Box-filter an image much larger than the model's input (`side` px) down to about twice its
    size first: the processor's Lanczos resize of a 1,120 px image costs more than the model's
    step on it, and the result is the same to within a grey level or two."""
    factor = (
        max(1, image.width // (2 * side)),
        max(1, image.height // (2 * side)),
    )
    return image.reduce(factor) if factor != (1, 1) else image


def _answer_spans(row: list[int], answers: list[list[int]], cue: list[int]) -> list[int]:
    """Where each answer's tokens start in `row`: in order, each right after the `cue` tokens
    (the template's "Assistant:")."""
    starts, at = [], 0
    for answer in answers:
        n, m = len(cue), len(answer)
        while at + n + m <= len(row) and (
            row[at : at + n] != cue or row[at + n : at + n + m] != answer
        ):
            at += 1
        if at + n + m > len(row):
            raise RuntimeError("an answer does not tokenize the same inside the chat")
        starts.append(at + n)
        at += n + m
    return starts


def collate(
    examples: list[Example],
    processor: Any,
    columns: int = patches.COLUMNS,
    size: Size = SIZE,
    slots: bool = False,
    char_rows: int = patches.ROWS,
    read_pairs: bool = False,
) -> dict[str, torch.Tensor]:
    """Tokenize whole chats; the loss is on the answers (each with its end token) only. `size`
    is the model's: its input and patch sizes place the read-outs' targets; `slots`: the image
    tokens' targets number the printed characters too (`patches.SLOTS`); `columns` and
    `char_rows`: the character read-out's cells a patch, across and down; `read_pairs`: the
    reading look-up is asked of two-image descriptions too (`lookup.read_targets`)."""
    texts, images, answers = [], [], []
    tokenizer = processor.tokenizer
    for ex in examples:
        texts.append(processor.apply_chat_template(ex.messages(answered=True)))
        images.append([shrink(image, size.image_size) for image in ex.images])
        answers.append(
            [
                tokenizer(" " + answer + EOS, add_special_tokens=False).input_ids
                for _, answer in ex.turns()
            ]
        )
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    cue = tokenizer("Assistant:", add_special_tokens=False).input_ids
    labels = torch.full_like(batch["input_ids"], -100)
    starts: list[list[int]] = []
    for i, spans in enumerate(answers):
        row = batch["input_ids"][i].tolist()
        starts.append(_answer_spans(row, spans, cue))
        for start, answer in zip(starts[-1], spans, strict=True):
            labels[i, start : start + len(answer)] = batch["input_ids"][
                i, start : start + len(answer)
            ]
    batch["labels"] = labels
    out = dict(batch)
    drawn = [pair for ex in examples for pair in zip(ex.scenes, ex.labels, strict=True)]
    out["patch_targets"] = torch.stack(
        [
            patches.targets(scene, label, size.image_size, size.patch_size, columns, rows=char_rows)
            for scene, label in drawn
        ]
    )
    # an image token covers scale x scale patches: its grid, from the processor that made it
    side = processor.image_processor.max_image_size["longest_edge"]
    token = side // math.isqrt(processor.image_seq_len)
    out["token_targets"] = torch.stack(
        [
            patches.targets(scene, label, side, token, columns, slots, char_rows)
            for scene, label in drawn
        ]
    )
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    # where each answer is decided: its first token that is not a bare space (" Blue." is
    # "Ġ", "B", "lue", ".": the colour is chosen where "B" is predicted, not "Ġ")
    decided = [
        [start + _blank_lead(tokenizer, answer) for start, answer in zip(row, spans, strict=True)]
        for row, spans in zip(starts, answers, strict=True)
    ]
    out["lookup_query"], out["lookup_keys"], out["lookup_colour"] = lookup.targets(
        examples, batch["input_ids"], decided, out["token_targets"], image_token
    )
    out["read_query"], out["read_keys"] = lookup.read_targets(
        examples,
        batch["input_ids"],
        starts,
        answers,
        char_ids(tokenizer),
        side // token,
        image_token,
        pairs=read_pairs,
    )
    # where each shape is among the image tokens, for the look-ups of a description
    token_items = torch.stack(
        [patches.item_cells(scene, label, side, token) for scene, label in drawn]
    )
    # each token once, in order of first use (decoding every use cost 9 ms a batch)
    used = dict.fromkeys(t for spans in answers for a in spans for t in a)
    pieces = {t: tokenizer.decode([t]) for t in used}
    out["item_query"], out["item_keys"], out["item_colour"], out["item_shape"] = (
        lookup.item_targets(
            examples, batch["input_ids"], starts, answers, pieces, token_items, image_token
        )
    )
    return out


# What `collate` adds for the training aids, beside the model's own inputs and labels.
AIDS = (
    "patch_targets",
    "token_targets",
    "lookup_query",
    "lookup_keys",
    "lookup_colour",
    "read_query",
    "read_keys",
    "item_query",
    "item_keys",
    "item_colour",
    "item_shape",
)


def split_aids(
    batch: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A collated batch as (the model's inputs, the training aids' targets)."""
    aids = {k: batch[k] for k in AIDS}
    return {k: v for k, v in batch.items() if k not in aids}, aids


def _blank_lead(tokenizer: Any, answer: list[int]) -> int:
    """How many tokens an answer begins with that are only white space."""
    lead = 0
    while lead < len(answer) - 1 and not tokenizer.decode(answer[lead : lead + 1]).strip():
        lead += 1
    return lead


def char_ids(tokenizer: Any) -> dict[str, int]:
    """The token of each printed letter and digit (`ISOLATE` keeps each a token of its own)."""
    ids = {c: tokenizer.convert_tokens_to_ids(c) for c in patches.CHARS}
    return {c: i for c, i in ids.items() if i is not None and i != tokenizer.unk_token_id}


class Batches(IterableDataset[dict[str, torch.Tensor]]):
    """Batch k is drawn from Random((seed, k)): the stream does not depend on worker timing."""

    def __init__(
        self,
        processor: Any,
        seed: int | str,
        batch_size: int,
        start: int,
        stop: int,
        columns: int,
        draw_max: int | None = None,
        made_faces: float = 0.0,
        size: Size = SIZE,
        bitmap_face: float = 0.0,
        real_faces: float = 0.0,
        slots: bool = False,
        text_rate: float | None = None,
        number_rate: float = world.NUMBER_RATE,
        bitmap_numbers: float | None = None,
        mix: Mapping[world.QuestionType, float] = TRAIN_MIX,
        text_anywhere: float = 0.0,
        text_drift: float = 0.0,
        char_rows: int = patches.ROWS,
        read_pairs: bool = False,
        bucket: int = 1,
        shapes: world.ShapeVariety = world.TRAINING_SHAPES,
        late_mix: tuple[int, Mapping[world.QuestionType, float]] | None = None,
        max_turns: int = MULTI_TURNS,
        bitmap_wide: float | None = None,
    ) -> None:
        self.processor = processor
        self.max_turns = max_turns
        self.bitmap_wide = bitmap_wide
        self.late_mix = late_mix
        self.shapes = shapes
        self.bucket = bucket
        self.read_pairs = read_pairs
        self.char_rows = char_rows
        self.text_anywhere = text_anywhere
        self.text_drift = text_drift
        self.mix = mix
        self.text_rate = text_rate
        self.number_rate = number_rate
        self.bitmap_numbers = bitmap_numbers
        self.slots = slots
        self.size = size
        self.draw_max = draw_max
        self.made_faces = made_faces
        self.bitmap_face = bitmap_face
        self.real_faces = real_faces
        self.columns = columns
        self.seed = seed
        self.batch_size = batch_size
        self.start = start
        self.stop = stop

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # the same pixels as the processor's own, made cheaper (`pixels.SquarePixels`)
        processor = pixels.square_inputs(self.processor)
        for _, examples in self.chats(processor):
            yield collate(
                examples,
                processor,
                self.columns,
                self.size,
                self.slots,
                char_rows=self.char_rows,
                read_pairs=self.read_pairs,
            )

    def chats(self, processor: Any) -> Iterator[tuple[int, list[Example]]]:
        """Each step's chats, uncollated. With `bucket` k above 1, the chats of k steps in a row
        (steps gk to gk + k - 1, whatever the run's start and stop) are pooled, sorted by their
        length in tokens and cut into k batches again, in an order drawn from the group's own
        seed: the same chats, each batch of rows of about one length, so less padding."""
        if self.bucket <= 1:
            for step in range(self.start, self.stop):
                yield step, self.draw(step)
            return
        for group in range(self.start - self.start % self.bucket, self.stop, self.bucket):
            steps = range(group, group + self.bucket)
            pooled = sorted(
                (chat for step in steps for chat in self.draw(step)),
                key=lambda chat: chat_length(chat, processor),
            )
            cut = [pooled[k : k + self.batch_size] for k in range(0, len(pooled), self.batch_size)]
            random.Random(f"{self.seed}:bucket:{group}").shuffle(cut)
            for step, examples in zip(steps, cut, strict=True):
                if self.start <= step < self.stop:
                    yield step, examples

    def mix_at(self, step: int) -> Mapping[world.QuestionType, float]:
        """The question mix of step `step` (counted from 0): `--mix`, and `--late-mix`'s from
        its step on."""
        if self.late_mix is not None and step >= self.late_mix[0]:
            return self.late_mix[1]
        return self.mix

    def draw(self, step: int) -> list[Example]:
        """Step `step`'s chats, drawn from its own seed (steps counted from 0)."""
        mix = self.mix_at(step)
        singles: list[world.QuestionType] = [k for k in mix if k != "pair"]
        weights = [mix[k] for k in singles]
        rng = random.Random(f"{self.seed}:{step}")
        # Two-image examples are twice as long: batching them apart saves the padding.
        kinds: list[world.QuestionType]
        if rng.random() < mix["pair"]:
            kinds = ["pair"] * self.batch_size
        else:
            kinds = rng.choices(singles, weights=weights, k=self.batch_size)
        # One layout a batch (how many questions, whether a system message comes first):
        # rows of one length pad little, and padding is most of a mixed batch's text.
        # `--max-turns` caps the count after it is drawn, so the draws stay the shipped run's.
        turns = 1 if rng.random() >= MULTI_RATE else rng.randint(2, MULTI_TURNS)
        turns = min(turns, self.max_turns)
        system = rng.random() < SYSTEM_RATE
        return [
            make_chat(
                rng,
                kind,
                turns=turns,
                system=system,
                draw_max=self.draw_max,
                made_faces=self.made_faces,
                bitmap_face=self.bitmap_face,
                real_faces=self.real_faces,
                text_rate=self.text_rate,
                number_rate=self.number_rate,
                bitmap_numbers=self.bitmap_numbers,
                mix=mix,
                text_anywhere=self.text_anywhere,
                text_drift=self.text_drift,
                shapes=self.shapes,
                bitmap_wide=self.bitmap_wide,
            )
            for kind in kinds
        ]


def chat_length(chat: Example, processor: Any) -> int:
    """A training chat's length in tokens, as `collate` makes its row (before padding)."""
    text = processor.apply_chat_template(chat.messages(answered=True))
    images = len(chat.images) * (int(processor.image_seq_len) + 3)  # and its wrapper tokens
    tokens: list[int] = processor.tokenizer(text, add_special_tokens=False).input_ids
    return len(tokens) + images


def run_batches(
    args: argparse.Namespace,
    processor: Any,
    size: Size,
    seed: int | str,
    stop: int,
    start: int = 0,
) -> Batches:
    """Batches `start` to `stop` from `seed`, drawn as the command line `args` asks."""
    return Batches(
        processor,
        seed,
        args.batch_size,
        start,
        stop,
        args.char_columns,
        args.draw_max or None,
        args.made_faces,
        size,
        args.bitmap_face,
        args.real_faces,
        args.char_slots,
        args.text_rate,
        args.number_rate,
        args.bitmap_numbers,
        args.mix,
        args.text_anywhere,
        args.text_drift,
        args.char_rows,
        args.read_pairs,
        getattr(args, "bucket", 1),
        shape_variety(args),
        getattr(args, "late_mix", None),
        getattr(args, "max_turns", MULTI_TURNS),
        getattr(args, "bitmap_wide", None),
    )


def shape_variety(args: argparse.Namespace) -> world.ShapeVariety:
    """The shapes' variety the command line `args` asks for (`--shape-spread`,
    `--rounded-squares`)."""
    return world.ShapeVariety(
        getattr(args, "shape_spread", world.TRAIN_SPREAD), getattr(args, "rounded_squares", 0.0)
    )


def background(_worker: int) -> None:
    """A data worker's start: the lowest CPU priority. The training step keeps both cores busy
    with its threads, and a worker drawing beside them at equal priority stalls them (each
    step waits for its slowest thread); at the lowest it mostly draws in the step's
    single-threaded gaps (the step still waits for a batch now and then: 1.44 -> about 1.6
    steps/s on a 2-core AMD EPYC, training/README.md)."""
    os.nice(19)


def batch_loader(batches: Batches, workers: int) -> DataLoader[dict[str, torch.Tensor]]:
    """`batches` as the training loops read them: drawn ahead by `workers` processes at the
    lowest priority (`background`), or in the loop itself with 0."""
    return DataLoader(
        batches,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        worker_init_fn=background,
    )


def run_estimate(steps: int, rate: float, budget: float = 60.0) -> str:
    """What a probe's `rate` (steps/s) says of a run of `steps`: its minutes here and, where
    that passes `budget` minutes, how many steps fit in it (the recipe's steps count: half
    of them cost 14-38 points on the card's held-out rows, run 31 in training/README.md)."""
    minutes = steps / rate / 60
    said = f"{steps} steps would take about {minutes:.0f} minutes here"
    if minutes <= budget:
        return said
    return f"{said}, over {budget:.0f}: about {round(rate * 60 * budget)} steps fit"


def parse_mix(text: str) -> dict[world.QuestionType, float]:
    """`--mix`: "describe=0.3,text=0.22" as `TRAIN_MIX` with those kinds' weights replaced."""
    mix = dict(TRAIN_MIX)
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        kind = kind.strip()
        if kind not in mix:
            raise argparse.ArgumentTypeError(f"{kind!r} is not one of {', '.join(mix)}")
        try:
            value = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: the weight is not a number") from None
        if not 0.0 <= value < 1.0:
            raise argparse.ArgumentTypeError(f"{part!r}: a weight is at least 0 and below 1")
        mix[kind] = value  # type: ignore[index]
    if not any(v for k, v in mix.items() if k != "pair"):
        raise argparse.ArgumentTypeError("some single-image question needs a weight")
    return mix


def parse_late_mix(text: str) -> tuple[int, dict[world.QuestionType, float]]:
    """`--late-mix`: "5000:text=0.25,pair=0.3", the step it starts after and the mix (as
    `--mix` reads it, from `TRAIN_MIX`)."""
    step, colon, mix = text.partition(":")
    if not colon or not step.strip().isdigit() or int(step) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give STEP:kind=weight,... (STEP above 0)")
    return int(step), parse_mix(mix)


def mix_text(mix: Mapping[world.QuestionType, float]) -> str:
    """A question mix as `--mix` takes it."""
    return ",".join(f"{k}={v}" for k, v in mix.items())


LR_FLOOR = 0.05  # where the cosine ends, a share of the peak
LOG_EVERY = 50  # the log's stride in steps: the mean loss over each 50


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = LR_FLOOR) -> float:
    """The rate at `step`: a linear warm-up to `peak`, then a cosine down to `floor * peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (the machine a run's minutes were on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "an unknown CPU"


def args_text(args: argparse.Namespace) -> dict[str, str]:
    """The command line `args` as the log and a run's saved state keep it."""
    return {k: str(v) for k, v in vars(args).items()}


def write_log(args: argparse.Namespace, log: list[dict[str, float]], resumed: Any = None) -> None:
    """`training_log.json`: the command line, and the loss every 50 steps; for a run resumed
    from a saved state (`--resume`), also the step it went on from and that run's command line."""
    body: dict[str, Any] = {"args": args_text(args), "log": log}
    if resumed is not None:
        body["resumed"] = resumed
    (args.out / "training_log.json").write_text(json.dumps(body, indent=1))


def model_card(
    params: int, args: argparse.Namespace, minutes: float, loss: float, size: Size = SIZE
) -> str:
    pinned = getattr(args, "pin_math", True)  # a Namespace without the flag: the default
    floor = getattr(args, "lr_floor", LR_FLOOR)
    image_tokens = (size.image_size // size.patch_size) ** 2 // size.scale_factor**2
    command = (
        ".venv/bin/python -m training.train --out src/oculo/models/oculo-tiny "
        f"--steps {args.steps} --batch-size {args.batch_size} --lr {args.lr} --seed {args.seed} "
        f"--char-columns {args.char_columns} --{'' if args.token_chars else 'no-'}token-chars "
        + (f"--glyph-weight {args.glyph_weight} " if args.glyph_weight else "")
        + f"--tower-steps {args.tower_steps} --draw-max {args.draw_max} "
        f"--attend-weight {args.attend_weight}"
        + (f" --scale-factor {size.scale_factor}" if size.scale_factor != SIZE.scale_factor else "")
        + (f" --image-size {size.image_size}" if size.image_size != SIZE.image_size else "")
        + (f" --patch-size {size.patch_size}" if size.patch_size != SIZE.patch_size else "")
        + (
            f" --vision-layers {size.vision_layers}"
            if size.vision_layers != SIZE.vision_layers
            else ""
        )
        + (
            f" --vision-width {size.vision_hidden}"
            if size.vision_hidden != SIZE.vision_hidden
            else ""
        )
        + (f" --text-layers {size.layers}" if size.layers != SIZE.layers else "")
        + (f" --text-mlp {size.text_mlp}" if size.text_mlp else "")
        + (f" --colour-weight {args.colour_weight}" if args.colour_weight else "")
        + (f" --read-weight {args.read_weight}" if args.read_weight else "")
        + (" --char-slots" if getattr(args, "char_slots", False) else "")
        + (f" --made-faces {made_faces}" if (made_faces := getattr(args, "made_faces", 0)) else "")
        + (f" --item-weight {item}" if (item := getattr(args, "item_weight", 0)) else "")
        + (
            f" --item-readout-weight {kinds}"
            if (kinds := getattr(args, "item_readout_weight", 0))
            else ""
        )
        + (f" --bitmap-face {bitmap}" if (bitmap := getattr(args, "bitmap_face", 0)) else "")
        + (
            f" --bitmap-wide {wide}"
            if (wide := getattr(args, "bitmap_wide", None)) is not None
            else ""
        )
        + (f" --real-faces {real}" if (real := getattr(args, "real_faces", 0)) else "")
        + (f" --text-rate {rate}" if (rate := getattr(args, "text_rate", None)) is not None else "")
        + (
            f" --number-rate {numbers}"
            if (numbers := getattr(args, "number_rate", world.NUMBER_RATE)) != world.NUMBER_RATE
            else ""
        )
        + (
            f" --bitmap-number-rate {bitmap_numbers}"
            if (bitmap_numbers := getattr(args, "bitmap_numbers", None)) is not None
            else ""
        )
        + (
            f" --mix {mix_text(mix)}"
            if (mix := getattr(args, "mix", TRAIN_MIX)) != TRAIN_MIX
            else ""
        )
        + (
            f" --late-mix {late[0]}:{mix_text(late[1])}"
            if (late := getattr(args, "late_mix", None)) is not None
            else ""
        )
        + (
            f" --text-anywhere {anywhere}"
            if (anywhere := getattr(args, "text_anywhere", 0))
            else ""
        )
        + (f" --text-drift {drift}" if (drift := getattr(args, "text_drift", 0)) else "")
        + (
            f" --shape-spread {variety.spread}"
            if (variety := shape_variety(args)).spread != world.TRAIN_SPREAD
            else ""
        )
        + (f" --rounded-squares {variety.rounded}" if variety.rounded else "")
        + (f" --char-rows {char_rows}" if (char_rows := getattr(args, "char_rows", 1)) > 1 else "")
        + (" --read-pairs" if getattr(args, "read_pairs", False) else "")
        + (f" --bucket {bucket}" if (bucket := getattr(args, "bucket", 1)) > 1 else "")
        + (
            f" --max-turns {most}"
            if (most := getattr(args, "max_turns", MULTI_TURNS)) != MULTI_TURNS
            else ""
        )
        + (
            " --vision-attention eager"
            if getattr(args, "vision_attention", "sdpa") == "eager"
            else ""
        )
        + (" --fused-elsewhere" if getattr(args, "fused_elsewhere", False) else "")
        + ("" if pinned else " --no-pin-math")
        + (f" --init-from {init}" if (init := getattr(args, "init_from", None)) else "")
        + (f" --resume {resume}" if (resume := getattr(args, "resume", None)) else "")
        + (f" --lr-floor {floor}" if floor != LR_FLOOR else "")
        + (f" --ema {ema}" if (ema := getattr(args, "ema", "")) else "")
        + (
            f" --optimizer {kind}"
            if (kind := getattr(args, "optimizer", "adamw")) != "adamw"
            else ""
        )
        + (f" --muon-scale {muon}" if (muon := getattr(args, "muon_scale", 1.0)) != 1.0 else "")
        + (f" --muon-skip {skip}" if (skip := getattr(args, "muon_skip", "none")) != "none" else "")
    )
    kernels = (
        "the CPU's own kernels (`--no-pin-math`: another CPU may give other weights)"
        if not pinned
        else "ATen and oneDNN held at their AVX2 kernels and MKL at its AVX-512 path (an Intel "
        "CPU with AVX-512, `pinned_math`: Intel Xeons part from the AMD EPYCs' weights at the "
        "first step, in the vision tower's fused attention)"
        if os.environ.get("MKL_CBWR") == "AVX512"
        else "ATen, MKL and oneDNN held at their AVX2 kernels (`PINNED_MATH`: the same weights on "
        "AMD EPYCs with and without AVX-512; an Intel Xeon parts from them at the first step)"
    )
    look_up = (
        (
            'When a question names a shape ("What color is the triangle?", "Is there a green '
            'square?"), one attention head of the language model (layer '
            f"{lookup.LAYER + 1}, head {lookup.HEAD + 1}) is also trained, at the position that "
            "decides the answer, to look at the image tokens of that shape (weight "
            f"{args.attend_weight}; `training/lookup.py`): a nudge towards the look-up the answer "
            "needs, which the language loss alone does not teach in an hour. "
            if args.attend_weight
            else ""
        )
        + (
            "A linear read-out of the named shape's colour from the hidden state at that "
            f"position (after layer {lookup.LAYER + 1}) is trained with it (weight "
            f"{args.colour_weight}), so that the colour is there to compare with the one a "
            "yes/no question asks. "
            if args.colour_weight
            else ""
        )
        + (
            "Where an answer spells a printed word out, another head of that layer (head "
            f"{lookup.READ_HEAD + 1}) is trained, at the position that predicts each character, to "
            "look at the image tokens where that character is printed (weight "
            f"{args.read_weight}; `lookup.read_targets`)"
            + (
                ", in descriptions of two images too, each image's word from its own tokens"
                if getattr(args, "read_pairs", False)
                else ""
            )
            + ". "
            if args.read_weight
            else ""
        )
        + (
            "Where a description names a shape (its colour, then its kind), the look-up head is "
            "trained the same way to look at that shape, the k-th from the left (weight "
            f"{item}; `lookup.item_targets`)"
            + (
                f", and read-outs of its colour and kind are trained there (weight {kinds})"
                if kinds
                else ""
            )
            + ". "
            if item
            else ""
        )
        + (
            f"Only layer {lookup.LAYER + 1}'s attention is computed eagerly, to give these "
            "losses its weights; the other layers' is PyTorch's fused kernel (`--fused-elsewhere`: "
            "the same arithmetic in other roundings, 1.00-1.05 times the steps a second by "
            "machine). "
            if getattr(args, "fused_elsewhere", False)
            else ""
        )
    )
    tower = (
        f"Before the whole model, the vision tower and the connector train alone on those "
        f"read-outs for {args.tower_steps} batches (no language model, so a step costs a "
        "fraction of a whole one). "
        if args.tower_steps
        else ""
    )
    describe = 'A red circle and a blue star. The text says "GO".'
    faces = (
        ", printed in Pillow's own two faces (its FreeType one, Aileron, and its 6x11 bitmap one)"
        if bitmap
        else ""
    )
    if real:
        faces += (
            " and in the 21 TrueType faces matplotlib ships (DejaVu Sans, Sans Mono and Serif, "
            "STIX, Computer Modern)"
            if bitmap
            else ", printed in Pillow's own face (Aileron) and in the 21 TrueType faces "
            "matplotlib ships (DejaVu Sans, Sans Mono and Serif, STIX, Computer Modern)"
        )
    glyphs = (
        f" (with a second loss, weight {args.glyph_weight}, over only the strips that hold a "
        "character: most hold none, and the plain loss is mostly about that)"
        if args.glyph_weight
        else ""
    )
    shapes = ""
    if (variety := shape_variety(args)) != world.TRAINING_SHAPES:
        shapes = (
            f" Its shapes' proportions vary by up to {variety.spread:.0%} either way (the shipped"
            f" routine's default, {world.TRAIN_SPREAD:.0%}: a circle's or square's stretch, a"
            " triangle's lean, a star's inner radius and turn)"
        )
        if variety.rounded:
            low, high = world.TRAIN_ROUNDING
            shapes += (
                f", and {variety.rounded:.0%} of its squares have rounded corners (a radius of"
                f" {low * 100:.0f}-{high:.0%} of the shorter side)"
            )
        shapes += "."
    return f"""# oculo-tiny

oculo's built-in default model: a {params / 1e6:.2f}M-parameter vision-language model of the
**Idefics3 / SmolVLM architecture** (the transformers classes themselves), trained from random
weights by `training/train.py` on procedurally drawn images. It loads with `AutoProcessor` and
`AutoModelForImageTextToText` like any SmolVLM checkpoint, through the same code path that serves
real checkpoints.

## What it knows

Images of 1 to 3 flat shapes (circle, square, triangle, star) in 8 colours (red, orange, yellow,
green, blue, purple, white, black), left to right, on plain, gradient or noisy backgrounds, at any
size from 32 to 1,120 px and any aspect ratio, optionally with one short printed word (from a list
of 183 short English words) or number (2 to 4 digits) in the top part of the image{faces}. It
answers, with or without a system message:

- "What is in this image?" / "Describe the image." -> `{describe}`
- "How many shapes are there?" -> `2`
- "What color is the triangle?" -> `Green.` (or `There is no triangle.`)
- "Is there a green square?" -> `Yes.` / `No.`
- "What text is in the image?" / "Read the text." -> `"GO"` (or `There is no text.`)
- two images, "Describe the images." -> `The first image shows ... The second image shows ...`

It knows nothing else: a photograph gets an answer about shapes. Serve a real checkpoint for real
images (`oculo serve --model PATH`).

## Architecture

{size}.

The image is resized to {size.image_size}x{size.image_size} px in one step (no tiling; the
aspect ratio is not kept, and a wide image keeps all {size.image_size} of its rows), cut in
{size.patch_size} px patches, pixel-shuffled x{size.scale_factor}: {image_tokens} image tokens per
image. Byte-level BPE tokenizer ({BPE_VOCAB}
merges trained on the world's questions and answers; capital letters and digits stay single
tokens so printed words are spelled out), SmolVLM's chat template.

## Training

```
{command}
```

{args.steps} steps of {args.batch_size} examples ({args.steps * args.batch_size:,} freshly drawn
examples, none repeated; scenes larger than {args.draw_max} px are drawn at that size, the
grain scaled to match, which the model cannot tell from a full-size drawing at its input size
and costs far less), {
        "AdamW"
        if getattr(args, "optimizer", "adamw") == "adamw"
        else "Muon on the transformer layers' matrices and the connector's"
        + {
            "none": "",
            "text-attention": " but the language model's attention",
            "lookup-attention": f" but the attention of the look-up head's layer ({lookup.LAYER})",
        }[getattr(args, "muon_skip", "none")]
        + ", AdamW on the rest"
    } (peak lr {args.lr}, warm-up {args.warmup}, cosine{
        f" down to {floor:g} of the peak" if floor != LR_FLOOR else ""
    }){
        f", the weights saved an exponential moving average of every step's (decay "
        f"{averaging.parse_decays(ema)[0]:g}, `training/averaging.py`), not the last step's own"
        if (ema := getattr(args, "ema", ""))
        else ""
    },
{"bf16 autocast" if args.bf16 else "float32"}, {kernels},
{minutes:.0f} minutes on {args.threads} threads of {cpu_name()}; final training loss {loss:.4f}.
Beside the language loss on the answer, the vision tower is
supervised patch by patch (weight {args.patch_weight}): linear read-outs of its output learn which
shape and colour lies under each patch and which printed character under each of its
{args.char_columns} vertical strips{
        f" (each cut into {rows} from top to bottom)"
        if (rows := getattr(args, "char_rows", 1)) > 1
        else ""
    }{glyphs}, and read-outs of the connector's image tokens the same
for each token ({"shape, colour and characters" if args.token_chars else "shape and colour"}{
        "; and, under each printed character, which character of the word it is: the k-th one in "
        "read-out k"
        if getattr(args, "char_slots", False)
        else ""
    };
`training/patches.py`). {tower}{look_up}These are training aids, not saved: the checkpoint
is a plain Idefics3 model. {round(100 * getattr(args, "mix", TRAIN_MIX)["pair"])}% of the
training batches are two-image descriptions{
        f" to step {late[0]:,}, {round(100 * late[1]['pair'])}% after it (the last stretch's "
        "question mix, `--late-mix`)"
        if (late := getattr(args, "late_mix", None)) is not None
        else ""
    }, and half the others chats of several questions
about one image; the rows of a batch share one layout (one question or several, with or
without a system message), so that they pad to similar lengths{
        f", and the chats of {bucket} steps in a row are sorted by length and cut into batches "
        "again"
        if (bucket := getattr(args, "bucket", 1)) > 1
        else ""
    }.{shapes}
"""


def warm_tower(
    model: Any,
    processor: Any,
    heads: patches.PatchHeads,
    token_heads: patches.PatchHeads,
    args: argparse.Namespace,
    size: Size = SIZE,
) -> None:
    """Train the vision tower and the connector alone on the per-patch read-outs.

    A tower trained only beside the language model sees shapes late (its shape read-out passes
    0.9 after two thirds of a run), and until it does the language model learns from a blind
    tower. Without the language model a step costs a fraction of a full one, so a short warm-up
    gives the whole run a tower that already sees. Its batches come from their own seeds."""
    tower = [
        *model.model.vision_model.parameters(),
        *model.model.connector.parameters(),
        *heads.parameters(),
        *token_heads.parameters(),
    ]
    optimizer = torch.optim.AdamW(tower, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    loader = batch_loader(
        run_batches(args, processor, size, f"{args.seed}:tower", args.tower_steps),
        args.workers,
    )
    started = time.perf_counter()
    window: list[float] = []
    for step, batch in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.tower_steps, args.lr, min(100, args.tower_steps // 4))
        model.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"])
        loss = (heads.loss(batch["patch_targets"]) + token_heads.loss(batch["token_targets"])) / 2
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(tower, 1.0)
        optimizer.step()
        window.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == args.tower_steps:
            read = " ".join(
                f"{where}.{k} {v:.2f}"
                for where, h in (("patch", heads), ("token", token_heads))
                for k, v in h.accuracy.items()
            )
            elapsed = time.perf_counter() - started
            print(
                f"tower {step + 1}/{args.tower_steps} patches {sum(window) / len(window):.4f} "
                f"({read}) {(step + 1) / elapsed:.2f} steps/s {elapsed / 60:.1f} min",
                flush=True,
            )
            window.clear()


def start_from(model: Any, folder: Path, tokenizer: Any = None) -> None:
    """Load a checkpoint's weights into `model` (built with the same seed and size, so the
    tokenizer is the same): a few hundred steps from the shipped model show in minutes whether a
    change to the data teaches what it should, where a run from scratch takes an hour.

    With `tokenizer` (the one the run built), refuse a checkpoint whose own tokenizer differs:
    the tokenizer is trained from the run's seed, and another seed's has as many tokens, so its
    weights would load without complaint and read every token as another."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    if tokenizer is not None and (folder / "tokenizer.json").exists():
        theirs = AutoTokenizer.from_pretrained(folder)
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise SystemExit(
                f"--init-from {folder}: its tokenizer is not the one this run builds (a run's "
                "tokenizer is trained from its --seed): give the checkpoint's own --seed"
            )
    trained = AutoModelForImageTextToText.from_pretrained(folder)
    model.load_state_dict(trained.state_dict())


def save(model: Any, processor: Any, folder: Path) -> None:
    """Write the checkpoint folder; the model trains on as it was (a `--save-every` snapshot).
    The eager attention the look-up loss trains on is not written: a checkpoint loads with the
    default."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def command_line() -> argparse.ArgumentParser:
    """The training command's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2800)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument(
        "--lr-floor",
        type=float,
        default=LR_FLOOR,
        help="where the cosine ends, a share of the peak rate (higher: the last steps move the "
        "weights more, for an --ema average to smooth)",
    )
    parser.add_argument(
        "--patch-weight",
        type=float,
        default=1.0,
        help="weight of the per-patch shape/colour/character loss on the vision tower (0: off)",
    )
    parser.add_argument(
        "--char-columns",
        type=int,
        default=patches.COLUMNS,
        help="strips per patch the character read-out names a glyph for (1: one per patch; "
        "4 began to read first letters, but learned shapes more slowly)",
    )
    parser.add_argument(
        "--char-rows",
        type=int,
        default=patches.ROWS,
        help="cells from top to bottom of a patch the character read-out names a glyph for, "
        "as --char-columns does across (1: the patch's whole height): where in the patch a "
        "glyph sits up and down, which a word printed a few pixels higher or lower moves",
    )
    parser.add_argument(
        "--glyph-weight",
        type=float,
        default=0.0,
        help="weight of a second character loss over only the strips that hold a character "
        "(which glyph), beside the plain one that is mostly 'nothing here' (0: off)",
    )
    parser.add_argument(
        "--char-slots",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also read the printed word's k-th character out of the image tokens under it, "
        "for every k (`patches.SLOTS`): the characters numbered, not only placed",
    )
    parser.add_argument(
        "--token-chars",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also read printed characters out of the connector's image tokens",
    )
    parser.add_argument(
        "--tower-steps",
        type=int,
        default=0,
        help="first train the vision tower and connector alone on the per-patch read-outs for "
        "this many batches (no language model: each step costs a fraction of a full one)",
    )
    parser.add_argument(
        "--draw-max",
        type=int,
        default=None,
        help="draw scenes larger than this many px on their longer side at this size (grain "
        "scaled to match; 0: draw every scene at its full size; default: twice --image-size)",
    )
    parser.add_argument(
        "--made-faces",
        type=float,
        default=0.0,
        help="share of printed words drawn in a typeface made up for the word "
        "(`training/typefaces.py`: bitmap-like or smooth) instead of Pillow's own (0: none)",
    )
    parser.add_argument(
        "--attend-weight",
        type=float,
        default=0.0,
        help="weight of the look-up loss (`training/lookup.py`): one attention head of the "
        "language model, where a colour or yes/no answer is decided, trained to look at the "
        "image tokens of the shape the question names (0: off)",
    )
    parser.add_argument(
        "--colour-weight",
        type=float,
        default=0.0,
        help="weight of a read-out of the named shape's colour from the hidden state where a "
        "colour or yes/no answer is decided (`lookup.ColourReadout`; 0: off)",
    )
    parser.add_argument(
        "--read-weight",
        type=float,
        default=0.0,
        help="weight of the reading look-up loss (`lookup.read_targets`): another head of the "
        "same layer, where each character of a printed word is spelled in an answer, trained to "
        "look at the image tokens where that character is printed (0: off)",
    )
    parser.add_argument(
        "--read-pairs",
        action="store_true",
        help="ask the reading look-up of two-image descriptions too, each image's word from "
        "its own image tokens (unset: single images only, as the shipped run)",
    )
    parser.add_argument(
        "--item-weight",
        type=float,
        default=0.0,
        help="weight of the look-up loss on descriptions (`lookup.item_targets`): where a "
        "description names a shape's colour and kind, the look-up head is trained to look at "
        "that shape's image tokens, the k-th from the left (0: off)",
    )
    parser.add_argument(
        "--item-readout-weight",
        type=float,
        default=0.0,
        help="weight of read-outs of that shape's colour and kind from the hidden state where a "
        "description names them (0: off)",
    )
    parser.add_argument(
        "--bitmap-face",
        type=float,
        default=0.0,
        help="share of printed words drawn in Pillow's 6x11 bitmap face (the training's way: "
        "sizes and squeezes of its own) instead of its FreeType one (0: none)",
    )
    parser.add_argument(
        "--bitmap-wide",
        type=float,
        default=None,
        help=f"the bitmap face's share on wide pictures (at least {world.WIDE} times as wide as "
        "tall, whose glyphs the square input squeezes narrowest: the different set's worst read) "
        "in place of --bitmap-face's (default: --bitmap-face's there too)",
    )
    parser.add_argument(
        "--real-faces",
        type=float,
        default=0.0,
        help="share of the words printed in Pillow's FreeType face that are drawn in one of the "
        "21 TrueType faces matplotlib ships instead (`training/fonts.py`; 0: none)",
    )
    parser.add_argument(
        "--text-rate",
        type=float,
        default=None,
        help="share of the training's scenes that have a printed word or number (default: each "
        "question's own, as evaluation draws them: 40-75%%); more text is more glyphs for the "
        "tower to learn from",
    )
    parser.add_argument(
        "--number-rate",
        type=float,
        default=world.NUMBER_RATE,
        help="share of printed texts that are numbers, not words (evaluation's: %(default)s); "
        "numbers are read glyph by glyph, with no word list to guess from",
    )
    parser.add_argument(
        "--bitmap-number-rate",
        dest="bitmap_numbers",
        type=float,
        default=None,
        help="share of the texts printed in the bitmap face (--bitmap-face) that are numbers "
        "(default: --number-rate's, the face chosen as the text is drawn); the different set "
        "prints every text in that face, and its numbers are what it reads worst",
    )
    parser.add_argument(
        "--text-anywhere",
        type=float,
        default=0.0,
        help="share of the printed texts drawn at a random height (their band anywhere from the "
        "top to the bottom, the word anywhere in it, the shapes in the larger space left) "
        "instead of centred in a band at the top, where every other text is: a model that only "
        "ever sees text there reads none a few pixels higher or lower (`training.evaluate "
        "--placement`); 0 draws nothing more, so the batches stay the shipped run's",
    )
    parser.add_argument(
        "--shape-spread",
        type=float,
        default=world.TRAIN_SPREAD,
        help="how far the training routine varies a shape's proportions (a circle's or "
        "square's stretch, as a log of its sides' ratio; a triangle's lean; a star's turn, and "
        "half of it its inner radius; default %(default)s); the different set varies them "
        "twice as far",
    )
    parser.add_argument(
        "--rounded-squares",
        type=float,
        default=0.0,
        help="share of the training's squares drawn with rounded corners (a radius of 5-30%% of "
        "the shorter side); 0 draws nothing more, so the batches stay the shipped run's",
    )
    parser.add_argument(
        "--text-drift",
        type=float,
        default=0.0,
        help="share of the other printed texts drawn anywhere in the band at the top, not "
        "centred in it: a few pixels higher or lower, where a model trained on centred words "
        "reads none (`training.evaluate --placement`, the band's top and bottom); 0 draws "
        "nothing more, so the batches stay the shipped run's",
    )
    parser.add_argument(
        "--mix",
        type=parse_mix,
        default=dict(TRAIN_MIX),
        help="the question mix, as kind=weight pairs (describe=0.3,count=0.07,...): the kinds "
        f"named take these weights, the others keep theirs ({mix_text(TRAIN_MIX)}); pair is the "
        "share of batches of two-image chats, the rest weigh a single image's questions",
    )
    parser.add_argument(
        "--late-mix",
        type=parse_late_mix,
        default=None,
        help="STEP:kind=weight,...: from the step after STEP on, this question mix (read as "
        "--mix reads it) in place of --mix's; a whole run with it computes what a run resumed "
        "from --save-state STEP with that --mix computes, bit for bit",
    )
    parser.add_argument(
        "--scale-factor",
        type=int,
        default=SIZE.scale_factor,
        help="the connector's pixel shuffle: each image token covers scale x scale patches "
        f"({(SIZE.image_size // SIZE.patch_size) ** 2} patches: 2 gives 16 image tokens, 1 gives "
        "64, finer for reading and slower)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=SIZE.image_size,
        help="the model's input: every image is resized to this square (no tiling)",
    )
    parser.add_argument(
        "--patch-size",
        type=int,
        default=SIZE.patch_size,
        help="the vision tower's patches, in px of the input (--image-size 192 --patch-size 24: "
        "the same 8 x 8 patches and image tokens as 128 / 16, each patch seeing 1.5 times as "
        "many pixels of the picture)",
    )
    parser.add_argument(
        "--vision-layers",
        type=int,
        default=SIZE.vision_layers,
        help="the vision tower's depth (at the default size a layer costs about 7%% of a step)",
    )
    parser.add_argument(
        "--vision-width",
        type=int,
        default=SIZE.vision_hidden,
        help=f"the vision tower's width (its heads stay {VISION_HEAD} wide, its MLP twice the "
        "width)",
    )
    parser.add_argument(
        "--text-layers",
        type=int,
        default=SIZE.layers,
        help="the language model's depth (the look-ups stay in its second layer, "
        "lookup.LAYER; at the default size a fourth layer makes a step about a quarter longer)",
    )
    parser.add_argument(
        "--text-mlp",
        type=int,
        default=0,
        help="the language model's MLP width (0: twice its hidden width, every shipped run's; "
        "the MLPs are about three fifths of its arithmetic)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from this checkpoint's weights instead of random ones (built with the same "
        "--seed), on batches of their own: to try a change to the data in minutes",
    )
    parser.add_argument(
        "--save-state",
        default="",
        help="STEP[,STEP...]: after each of these steps (multiples of 50, the log's stride) "
        "write the run's whole state beside --out as OUT-stateSTEP, for --resume",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="go on from a state --save-state wrote (OUT-stateSTEP), at the step after it: "
        "with the same command, bit for bit the run that was not stopped; with another "
        "schedule or other data (--lr-floor, --mix, ...), that run's last stretch done otherwise",
    )
    parser.add_argument(
        "--bucket",
        type=int,
        default=1,
        help="pool the chats of this many steps in a row, sort them by length and cut them into "
        "batches again: less padding, each batch's rows of about one length (1: as drawn)",
    )
    parser.add_argument(
        "--max-turns",
        type=int,
        choices=range(1, MULTI_TURNS + 1),
        default=MULTI_TURNS,
        metavar=f"{{1..{MULTI_TURNS}}}",
        help="at most this many questions a chat about one image (a batch's count is drawn as "
        f"always, then capped): fewer long chats, fewer positions a step; {MULTI_TURNS} draws "
        "the shipped run's batches",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--probe", action="store_true", help="time 20 steps and stop")
    parser.add_argument("--save-every", type=int, default=0, help="also save snapshots")
    parser.add_argument(
        "--ema",
        default="",
        help="save an exponential moving average of the weights instead of the last step's: "
        "its decay (e.g. 0.999); several, comma-separated, save the first to --out and each "
        "further one beside it as OUT-emaD (`training/averaging.py`)",
    )
    parser.add_argument(
        "--keep-raw",
        action="store_true",
        help="with --ema: also save the last step's own weights, beside --out as OUT-raw",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="run only the first N steps and write their training_log.json, no weights "
        "(reproducibility check)",
    )
    parser.add_argument(
        "--draw-first",
        action="store_true",
        help="with --probe or --stop-after: draw every batch before the clock starts, to time "
        "the steps with the drawing free (benchmarks.training_draw --steps)",
    )
    parser.add_argument(
        "--fingerprint",
        type=Path,
        default=None,
        help="with --stop-after: write a digest of the first step, batch, every module's inputs "
        "and output, loss and gradients, to this JSON file; `python -m training.fingerprint A B` "
        "names where two machines' runs part",
    )
    parser.add_argument(
        "--fingerprint-step",
        type=int,
        default=1,
        help="with --fingerprint: the step whose modules and gradients it digests (the first "
        "by default; every step's loss and weights go into its trail)",
    )
    parser.add_argument(
        "--vision-attention",
        choices=("sdpa", "eager"),
        default="sdpa",
        help="the vision tower's attention while training: PyTorch's fused kernel (sdpa), or "
        "two matrix products and a softmax (eager), to see whether the vendors' sums part there "
        "(`--fingerprint`); a checkpoint loads with the default either way",
    )
    parser.add_argument(
        "--fused-elsewhere",
        action="store_true",
        help="with a look-up loss, the language model's attention eager (its weights returned) "
        "only in the look-up layer, PyTorch's fused kernel (sdpa) in the others",
    )
    parser.add_argument(
        "--optimizer",
        choices=optimizers.KINDS,
        default="adamw",
        help="AdamW on every weight (the shipped runs'), or Muon on the transformer layers' "
        "matrices and the connector's with AdamW on the rest, at AdamW's rate and schedule "
        "(training/optimizers.py)",
    )
    parser.add_argument(
        "--muon-scale",
        type=float,
        default=1.0,
        help="with --optimizer muon: Muon's peak rate as a multiple of --lr (its steps are "
        "scaled to AdamW's size at 1; Keller Jordan's defaults take steps about 4 times that)",
    )
    parser.add_argument(
        "--muon-skip",
        choices=list(optimizers.SKIPS),
        default="none",
        help="with --optimizer muon: layers' matrices kept on AdamW: the language model's "
        "attention (text-attention), or that of the look-up head's layer alone "
        "(lookup-attention)",
    )
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument(
        "--pin-math",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compute with the AVX2 kernels on every machine (PINNED_MATH; MKL at its AVX-512 "
        "path on Intel CPUs that have it), so that a run gives the same weights on every "
        "machine measured of one vendor with 2 threads (AMD EPYCs with and without AVX-512 "
        "agree byte for byte; an Intel Xeon parts from them at the first step; --no-pin-math: "
        "the CPU's own kernels, not reproducible across machines)",
    )
    return parser


def model_size(args: argparse.Namespace) -> Size:
    """The model's sizes as the command line `args` sets them."""
    if args.vision_width % VISION_HEAD:
        raise SystemExit(f"--vision-width must be a multiple of {VISION_HEAD}")
    return replace(
        SIZE,
        scale_factor=args.scale_factor,
        image_size=args.image_size,
        patch_size=args.patch_size,
        vision_layers=args.vision_layers,
        vision_hidden=args.vision_width,
        vision_heads=args.vision_width // VISION_HEAD,
        layers=args.text_layers,
        text_mlp=args.text_mlp,
    )


def main() -> None:
    parser = command_line()
    args = parser.parse_args()
    if args.draw_first and not (args.probe or args.stop_after):
        parser.error(
            "--draw-first holds every batch in memory, for timing: give --probe or --stop-after"
        )
    if args.fingerprint and not args.stop_after:
        parser.error("--fingerprint records the first step of a short run: give --stop-after")
    if args.fingerprint and not 1 <= args.fingerprint_step <= args.stop_after:
        parser.error("--fingerprint-step must be one of the steps --stop-after runs")
    try:
        decays = averaging.parse_decays(args.ema) if args.ema else []
    except ValueError as error:
        parser.error(str(error))
    if args.bitmap_wide is not None and not (
        0.0 < args.bitmap_wide <= 1.0 and args.bitmap_face and args.bitmap_numbers is None
    ):
        parser.error(
            "--bitmap-wide moves the bitmap face's share on wide pictures: give it above 0, with "
            "--bitmap-face above 0 and without --bitmap-number-rate"
        )
    attend = bool(args.attend_weight or args.read_weight or args.item_weight)
    if args.fused_elsewhere and not attend:
        parser.error(
            "--fused-elsewhere keeps the look-up layer's attention eager: give a look-up loss "
            "(--attend-weight, --read-weight or --item-weight); without one every layer is fused"
        )
    if args.keep_raw and not decays:
        parser.error("--keep-raw keeps the last step's weights beside an average: give --ema")
    if args.optimizer != "muon" and (args.muon_scale != 1.0 or args.muon_skip != "none"):
        parser.error("--muon-scale and --muon-skip shape Muon's steps: give --optimizer muon")
    if not 0.0 <= args.lr_floor < 1.0:
        parser.error(f"--lr-floor is a share of the peak rate, from 0 up to 1: {args.lr_floor}")
    try:
        save_steps = {int(part) for part in args.save_state.split(",") if part.strip()}
    except ValueError:
        parser.error(f"--save-state takes steps, comma-separated: {args.save_state!r}")
    if any(k <= 0 or k % LOG_EVERY for k in save_steps):
        parser.error(f"--save-state steps are multiples of {LOG_EVERY}: {args.save_state}")
    resumed: state.State | None = None
    if args.resume and (args.init_from or args.probe or args.tower_steps):
        parser.error(
            "--resume goes on from a saved state: not with --init-from, --probe or --tower-steps"
        )
    if args.pin_math:
        pin_math(sys.argv[1:])
    if args.resume:  # loaded after the pins' fresh interpreter, not before it too
        try:
            resumed = state.load(args.resume)
        except FileNotFoundError as error:
            parser.error(str(error))
        if resumed.step >= (args.stop_after or args.steps):
            parser.error(f"the state is after step {resumed.step}: nothing is left to run")
    print(f"kernels: {torch.backends.cpu.get_cpu_capability()}", flush=True)

    settle_vector_maths()
    torch.set_num_threads(args.threads)
    size = model_size(args)
    if args.draw_max is None:
        args.draw_max = 2 * size.image_size
    model, processor = build(args.seed, size)
    if args.init_from:
        start_from(model, args.init_from, processor.tokenizer)
    params = sum(p.numel() for p in model.parameters())
    print(f"oculo-tiny: {params / 1e6:.2f}M parameters, {size}", flush=True)
    steps = 20 if args.probe else args.steps
    batches = run_batches(
        args,
        processor,
        size,
        # a run that goes on from a checkpoint draws batches that checkpoint never saw
        f"{args.seed}:continued" if args.init_from else args.seed,
        args.stop_after or steps,
        start=resumed.step if resumed else 0,
    )
    # --draw-first: every batch held in memory, drawn before the clock starts (a short timed run)
    loader: Iterable[dict[str, torch.Tensor]] = (
        list(batches) if args.draw_first else batch_loader(batches, args.workers)
    )
    heads = patches.PatchHeads(
        size.vision_hidden,
        columns=args.char_columns,
        glyph_weight=args.glyph_weight,
        rows=args.char_rows,
    )
    heads.attach(model.model.vision_model)
    token_names: tuple[str, ...] = (
        ("shape", "color", "char") if args.token_chars else ("shape", "color")
    )
    if args.char_slots:
        token_names += ("slot",)
    token_heads = patches.PatchHeads(
        size.hidden,
        token_names,
        columns=args.char_columns,
        glyph_weight=args.glyph_weight,
        rows=args.char_rows,
    )
    token_heads.attach(model.model.connector)
    readout = lookup.ColourReadout(size.hidden)
    aids = [*heads.parameters(), *token_heads.parameters()]
    if args.colour_weight:
        aids += list(readout.parameters())
    # a description's shapes, read out where each is named: the colour read-out above reads
    # colours there too, and this one their kinds (made only when asked for: a module drawn
    # from torch's generator would change nothing else, but keeps old runs' numbers exact)
    kind_readout = (
        lookup.Readout(size.hidden, len(world.SHAPES)) if args.item_readout_weight else None
    )
    if kind_readout is not None:
        aids += list(kind_readout.parameters())
        if not args.colour_weight:
            aids += list(readout.parameters())
    optimizer = optimizers.build(
        args.optimizer, model, aids, args.lr, args.muon_scale, args.muon_skip
    )
    trained: dict[str, torch.nn.Module] = {
        "model": model,
        "patch_heads": heads,
        "token_heads": token_heads,
        "colour_readout": readout,
    }
    if kind_readout is not None:
        trained["kind_readout"] = kind_readout
    recorder = fingerprint.Recorder() if args.fingerprint else None
    if recorder is not None:
        recorder.attach(
            (f"{where}.{name}" if name else where, module)
            for where, whole in trained.items()
            for name, module in whole.named_modules()
        )
    recorded: dict[str, Any] | None = None
    trail: list[dict[str, Any]] = []
    # --ema: averages of the weights, kept beside the run (they change nothing of it)
    averages = [averaging.WeightAverage(model, d) for d in decays]
    digested = [  # what a fingerprint digests, gradients and weights, in one order
        (f"{where}.{name}", p)
        for where, whole in trained.items()
        for name, p in whole.named_parameters()
    ]
    if attend:  # attention weights are only returned by the eager implementation
        model.model.text_model.config._attn_implementation = "eager"
        if args.fused_elsewhere:  # only the look-up layer's weights are read: fused elsewhere
            lookup.fuse_other_layers(model.model.text_model)
    if args.vision_attention == "eager":
        model.model.vision_model.config._attn_implementation = "eager"
    model.train()
    first = 0  # the first step this process runs (0, or the step after a resumed state)
    log: list[dict[str, float]] = []
    spent = 0.0  # minutes spent before this process, by the run a state was saved from
    if resumed is not None:
        try:
            state.restore(resumed, trained, optimizer, averages)
        except ValueError as error:
            parser.error(f"--resume {args.resume}: {error}")
        first, log, spent = resumed.step, resumed.log, resumed.minutes
        print(f"resumed after step {first} from {args.resume}", flush=True)
    started = time.perf_counter() - spent * 60
    if args.tower_steps and not args.probe:
        warm_tower(model, processor, heads, token_heads, args, size)
    looping = time.perf_counter()  # the whole model's steps/s leave the warm-up out
    window: list[float] = []
    patch_window: list[float] = []
    look_window: list[float] = []
    read_window: list[float] = []
    item_window: list[float] = []
    named_colour: float | None = None
    for step, batch in enumerate(loader, start=first):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, args.warmup, args.lr_floor) * group.get(
                "scale", 1.0
            )
        inputs, aid = split_aids(batch)
        if recorder is not None:
            recorder.active = step + 1 == args.fingerprint_step
        query, keys, colour = aid["lookup_query"], aid["lookup_keys"], aid["lookup_colour"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = model(
                **inputs,
                output_attentions=attend,
                output_hidden_states=bool(args.colour_weight or kind_readout is not None),
            )
            loss = out.loss
            seen = (heads.loss(aid["patch_targets"]) + token_heads.loss(aid["token_targets"])) / 2
            total = loss + args.patch_weight * seen
            # the look-up layer's attention weights, [batch, heads, positions, positions]
            # (None without a look-up loss, which is when the branches below do not read them)
            looked_at: Any = lookup.looked(out.attentions, args.fused_elsewhere) if attend else None
            if args.attend_weight:
                attention = looked_at[:, lookup.HEAD]
                looked = lookup.attention_loss(attention, query, keys)
                if looked is not None:
                    total = total + args.attend_weight * looked
                    look_window.append(math.exp(-looked.item()))
            if args.read_weight:
                attention = looked_at[:, lookup.READ_HEAD]
                reading = lookup.attention_loss(attention, aid["read_query"], aid["read_keys"])
                if reading is not None:
                    total = total + args.read_weight * reading
                    read_window.append(math.exp(-reading.item()))
            if args.item_weight:  # the same head, on each shape a description names
                attention = looked_at[:, lookup.HEAD]
                placed = lookup.attention_loss(attention, aid["item_query"], aid["item_keys"])
                if placed is not None:
                    total = total + args.item_weight * placed
                    item_window.append(math.exp(-placed.item()))
            if args.colour_weight:
                # hidden_states[0] is the embeddings: the output of layer k is k + 1
                named = readout.loss(out.hidden_states[lookup.LAYER + 1], query, colour)
                if named is not None:
                    total = total + args.colour_weight * named
                named_colour = readout.accuracy
            if kind_readout is not None:
                hidden = out.hidden_states[lookup.LAYER + 1]
                for head, wanted in ((readout, "item_colour"), (kind_readout, "item_shape")):
                    said = head.loss(hidden, aid["item_query"], aid[wanted])
                    if said is not None:
                        total = total + args.item_readout_weight * said
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if recorder is not None and step + 1 == args.fingerprint_step:
            grads = fingerprint.gradients(digested)
            recorded = fingerprint.fingerprint(
                batch, recorder, total, grads, fingerprint.cpu_kind(), step + 1
            )
            recorder.active = False
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *aids], 1.0)
        optimizer.step()
        for average in averages:
            average.update(step)
        if recorder is not None:  # each step's loss and weights, to find the step runs part at
            weights = fingerprint.weights(digested)
            trail.append({"step": step + 1, "loss": repr(total.item()), "weights": weights})
        window.append(loss.item())
        patch_window.append(seen.item())
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - started
            mean = sum(window) / len(window)
            patch_mean = sum(patch_window) / len(patch_window)
            read = " ".join(
                f"{where}.{k} {v:.2f}"
                for where, h in (("patch", heads), ("token", token_heads))
                for k, v in h.accuracy.items()
            )
            window.clear()
            patch_window.clear()
            entry = {"step": step + 1, "loss": mean, "patch_loss": patch_mean}
            if look_window:  # the geometric mean of the attention mass on the asked shape
                entry["look"] = sum(look_window) / len(look_window)
                read += f" look {entry['look']:.2f}"
                look_window.clear()
            if read_window:  # the same, on the printed character being spelled
                entry["read"] = sum(read_window) / len(read_window)
                read += f" read {entry['read']:.2f}"
                read_window.clear()
            if item_window:  # the same, on the shape a description is naming
                entry["place"] = sum(item_window) / len(item_window)
                read += f" place {entry['place']:.2f}"
                item_window.clear()
            if kind_readout is not None and kind_readout.accuracy is not None:
                read += f" named.kind {kind_readout.accuracy:.2f}"
                entry["named_kind"] = kind_readout.accuracy
            if args.colour_weight and named_colour is not None:
                read += f" named.colour {named_colour:.2f}"
                entry["named_colour"] = named_colour
            log.append({**entry, "minutes": elapsed / 60})
            print(
                f"step {step + 1}/{steps} loss {mean:.4f} patches {patch_mean:.4f} ({read}) "
                f"{(step + 1 - first) / (time.perf_counter() - looping):.2f} steps/s "
                f"{elapsed / 60:.1f} min",
                flush=True,
            )
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
            save(model, processor, averaging.snapshot_folder(args.out, step + 1))
        if step + 1 in save_steps:
            state.save(
                state.folder(args.out, step + 1),
                step + 1,
                trained,
                optimizer,
                averages,
                log,
                (time.perf_counter() - started) / 60,
                args_text(args),
            )
    origin = {"step": first, "args": resumed.args} if resumed is not None else None
    if args.probe or args.stop_after:
        done = args.stop_after or steps
        rate = (done - first) / (time.perf_counter() - started - spent * 60)
        print(f"stopped after {done} steps: {rate:.2f} steps/s")
        if args.probe:  # it reads a little low: the first steps warm up
            print(run_estimate(args.steps, rate), flush=True)
        if args.stop_after:  # the log, to set beside a whole run's: no weights are saved
            args.out.mkdir(parents=True, exist_ok=True)
            write_log(args, log, origin)
        if args.fingerprint and recorded is not None:
            recorded["trail"] = trail
            args.fingerprint.write_text(json.dumps(recorded, indent=1) + "\n")
            print(
                f"fingerprint of step {args.fingerprint_step} and the trail of {len(trail)} "
                f"steps: {args.fingerprint}",
                flush=True,
            )
        return
    minutes = (time.perf_counter() - started) / 60
    if args.keep_raw and averages:  # the last step's own weights, beside the averages
        save(model, processor, averaging.raw_folder(args.out))
    for k, average in enumerate(averages):
        with average.applied():
            # --out holds the first decay's average; each further one a folder beside it
            where = (
                args.out
                if k == 0
                else args.out.with_name(averaging.folder_name(args.out.name, average.decay))
            )
            save(model, processor, where)
    if not averages:
        save(model, processor, args.out)
    write_log(args, log, origin)
    (args.out / "README.md").write_text(model_card(params, args, minutes, log[-1]["loss"], size))
    print(f"saved to {args.out} after {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
