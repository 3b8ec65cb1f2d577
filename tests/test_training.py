"""The training world and pipeline: deterministic, consistent, loadable like any checkpoint."""

from __future__ import annotations

import io
import itertools
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from oculo.testing.checkpoints import Size, build_tokenizer, idefics3_parts
from training import patches, world
from training.data import (
    MULTI_TURNS,
    TRAIN_MIX,
    Example,
    make_chat,
    make_example,
    sample_scene,
)
from training.train import EOS, ISOLATE, collate, run_estimate, split_aids, tokenizer_corpus


def test_scenes_are_reproducible_and_within_the_world() -> None:
    for seed in range(40):
        a = world.sample_scene(random.Random(seed))
        b = world.sample_scene(random.Random(seed))
        assert a == b
        assert 1 <= len(a.items) <= 3
        assert 32 <= a.width <= 1120 and 32 <= a.height <= 1120
        assert all(i.shape in world.SHAPES and i.color in world.COLORS for i in a.items)
        if a.text is not None:
            assert 2 <= len(a.text) <= 6 and a.text.isalnum() and a.text.upper() == a.text
            assert min(a.width, a.height) >= 64
        image_a = world.render(a, random.Random(seed), "train")
        image_b = world.render(b, random.Random(seed), "train")
        assert image_a.size == (a.width, a.height)
        assert image_a.tobytes() == image_b.tobytes()


def test_answers_agree_with_the_scene() -> None:
    rng = random.Random(7)
    for _ in range(300):
        scene = world.sample_scene(rng)
        q, a = world.ask(scene, rng, "count")
        assert a == str(len(scene.items))
        q, a = world.ask(scene, rng, "exists")
        asked = next((c, s) for c in world.COLORS for s in world.SHAPES if f" {c} {s}" in q)
        present = {(i.color, i.shape) for i in scene.items}
        assert a == ("Yes." if asked in present else "No.")
        q, a = world.ask(scene, rng, "text")
        assert a == (f'"{scene.text}"' if scene.text else "There is no text.")
        q, a = world.ask(scene, rng, "describe")
        assert a.count(" a ") + a.count(" an ") + 1 >= len(scene.items)
        for item in scene.items:
            assert f"{item.color} {item.shape}" in a


def test_a_large_scene_drawn_smaller_for_training_is_the_same_picture() -> None:
    import numpy as np
    from PIL import Image

    scene = world.Scene(
        (world.Item("square", "red"), world.Item("star", "blue")), "GO", 1000, 600, "noise"
    )
    full, full_labels = world.render_labelled(scene, random.Random(4))
    small, small_labels = world.render_labelled(scene, random.Random(4), draw_max=250)
    assert full.size == (1000, 600) and small.size == small_labels.items.size == (250, 150)
    # the same layout: what lies under each of the model's patches agrees
    a = patches.targets(scene, full_labels, 128, 16)
    b = patches.targets(scene, small_labels, 128, 16)
    assert (a[:2] == b[:2]).float().mean() > 0.95
    assert [c for c, _ in small_labels.chars] == ["G", "O"]

    # the grain looks the same once both are at the model's input size
    def grain(size: int, scale: float) -> float:
        background = world._draw_background(scene, random.Random(1), (size, size), scale)
        square = background.resize((128, 128), Image.Resampling.BOX)
        return float(np.asarray(square, dtype=float)[:, :, 0].std())

    assert 0.85 < grain(250, 0.25) / grain(1000, 1.0) < 1.15
    assert grain(250, 1.0) / grain(1000, 1.0) > 3  # unscaled, it would be four times as coarse
    # a scene that fits is drawn exactly as without the cap
    fits = world.Scene((world.Item("circle", "red"),), "HI", 200, 120, "noise")
    assert (
        world.render_labelled(fits, random.Random(2), draw_max=250)[0].tobytes()
        == world.render(fits, random.Random(2)).tobytes()
    )


def test_the_alt_routine_draws_differently() -> None:
    scene = world.sample_scene(random.Random(3), text_rate=1.0)
    plain = world.render(scene, random.Random(3), "train")
    alt = world.render(scene, random.Random(3), "alt")
    assert plain.size == alt.size and plain.tobytes() != alt.tobytes()
    data, mime = world.encode(alt, random.Random(0), "alt")
    assert mime in {"image/jpeg", "image/webp", "image/gif", "image/png"}
    assert len(data) > 0


def test_every_real_face_prints_every_capital_and_digit_apart() -> None:
    from PIL import Image, ImageDraw

    from training import fonts
    from training.patches import CHARS

    assert len(fonts.FACES) == 21
    for name in fonts.FACES:
        face = fonts.font(name, 24)
        drawn = set()
        for char in CHARS:
            mask = Image.new("L", (40, 40), 0)
            ImageDraw.Draw(mask).text((4, 4), char, font=face, fill=255)
            assert mask.getbbox() is not None, (name, char)  # not blank
            drawn.add(mask.tobytes())
        assert len(drawn) == len(CHARS), name  # no two characters alike (no tofu)


def test_the_training_routine_prints_in_real_faces_when_asked() -> None:
    scene = world.Scene((world.Item("star", "blue"),), "GO", 480, 320, "plain")
    plain = world.render_labelled(scene, random.Random(4))
    off = world.render_labelled(scene, random.Random(4), real_faces=0.0)
    assert plain[0].tobytes() == off[0].tobytes() and plain[1].chars == off[1].chars
    looks = set()
    for seed in range(8):
        image, drawn = world.render_labelled(scene, random.Random(seed), real_faces=1.0)
        assert [char for char, _ in drawn.chars] == ["G", "O"]
        looks.add(image.tobytes())
        assert image.tobytes() != world.render_labelled(scene, random.Random(seed))[0].tobytes()
    assert len(looks) == 8


def test_the_training_routine_prints_in_the_bitmap_face_when_asked() -> None:
    import numpy as np

    scene = world.Scene((world.Item("star", "blue"),), "GO", 480, 320, "plain")
    before, labels = world.render_labelled(scene, random.Random(4))
    off, labels_off = world.render_labelled(scene, random.Random(4), bitmap_face=0.0)
    assert before.tobytes() == off.tobytes() and labels.chars == labels_off.chars
    # the "alt" routine has its own way with that face, whatever the training asks for
    alt = world.render_labelled(scene, random.Random(4), "alt")[0]
    assert (
        alt.tobytes()
        == world.render_labelled(scene, random.Random(4), "alt", bitmap_face=1.0)[0].tobytes()
    )
    sizes = set()
    for seed in range(6):
        image, drawn = world.render_labelled(scene, random.Random(seed), bitmap_face=1.0)
        assert [char for char, _ in drawn.chars] == ["G", "O"]
        (_, (left, top, right, bottom)), _ = drawn.chars
        sizes.add(round(bottom - top))
        box = np.asarray(image.crop((int(left), int(top), int(right) + 1, int(bottom) + 1)))
        ink = np.minimum(
            np.abs(box.astype(int) - 15).sum(axis=2), np.abs(box.astype(int) - 250).sum(axis=2)
        )
        assert (ink < 60).mean() > 0.1  # the glyph is there, in the text's colour
    # and it is not the FreeType face: the same word in the same band, drawn otherwise
    assert world.render_labelled(scene, random.Random(0), bitmap_face=1.0)[0].tobytes() != (
        world.render_labelled(scene, random.Random(0))[0].tobytes()
    )
    assert len(sizes) > 2  # drawn at sizes of its own, not the one "alt" draws it at


def test_printed_words_are_spelled_a_letter_at_a_time() -> None:
    tokenizer = build_tokenizer(
        "idefics3", tokenizer_corpus(0, n=300), vocab_size=300, isolate=ISOLATE
    )
    for word in ("GO", "HELLO", "2024"):
        pieces = tokenizer.tokenize(f' The text says "{word}".')
        assert [p for p in pieces if p.isalnum() and p.upper() == p and p in word] == list(word)


@pytest.fixture(scope="module")
def small_parts() -> tuple[object, object]:
    tokenizer = build_tokenizer(
        "idefics3", tokenizer_corpus(0, n=300), vocab_size=300, isolate=ISOLATE
    )
    size = Size(image_size=32, patch_size=8, hidden=32, layers=1, heads=2, vision_hidden=32,
                vision_layers=1, vision_heads=2)  # fmt: skip
    return idefics3_parts(tokenizer, size)


def test_collate_puts_the_loss_on_the_answer_only(small_parts: tuple[object, object]) -> None:
    _, processor = small_parts
    rng = random.Random(1)
    examples = [make_example(rng, kind=k) for k in ("describe", "count", "text", "pair")]
    batch = collate(examples, processor)
    tok = processor.tokenizer  # type: ignore[attr-defined]
    for row, example in enumerate(examples):
        labelled = [t for t in batch["labels"][row].tolist() if t != -100]
        assert tok.decode(labelled) == " " + example.answer + EOS


def test_a_training_chat_asks_several_questions_and_learns_every_answer(
    small_parts: tuple[object, object],
) -> None:
    _, processor = small_parts
    rng = random.Random(3)
    chats = [make_chat(rng, "color") for _ in range(12)]
    several = [c for c in chats if c.more]
    assert several and len(several) < len(chats)  # some chats ask one question, some several
    for chat in several:
        assert 2 <= len(chat.turns()) <= MULTI_TURNS
        # a description names everything: it may only come last
        described = [a for _, a in chat.turns()[:-1] if a == world.describe(chat.scenes[0])]
        assert not described
    batch = collate(chats, processor)
    tok = processor.tokenizer  # type: ignore[attr-defined]
    for row, chat in enumerate(chats):
        labelled = [t for t in batch["labels"][row].tolist() if t != -100]
        assert tok.decode(labelled) == "".join(" " + a + EOS for _, a in chat.turns())
        # every question (and the system message) stays unlabelled
        text = tok.decode(batch["input_ids"][row].tolist())
        for question, _ in chat.turns():
            assert question in text and question not in tok.decode(labelled)


def test_make_chat_follows_the_layout_it_is_given() -> None:
    rng = random.Random(4)
    for _ in range(10):
        chat = make_chat(rng, "count", turns=3, system=True)
        assert chat.system in world.SYSTEM_PROMPTS
        assert 2 <= len(chat.turns()) <= 3  # a question drawn twice is asked once
        single = make_chat(rng, "exists", turns=1, system=False)
        assert single.system is None and not single.more


def test_training_can_print_more_text_and_more_numbers_and_evaluation_draws_as_before() -> None:
    kinds: tuple[world.QuestionType, ...] = ("count", "pair")

    def scenes(text_rate: float, number_rate: float = world.NUMBER_RATE) -> list[world.Scene]:
        return [
            scene
            for seed in range(30)
            for kind in kinds
            for scene in make_chat(
                random.Random(seed), kind, turns=2, text_rate=text_rate, number_rate=number_rate
            ).scenes
        ]

    everything = scenes(text_rate=1.0, number_rate=1.0)
    large = [s for s in everything if min(s.width, s.height) >= 64]
    assert len(large) > 30
    assert all(s.text is not None and s.text.isdigit() for s in large)
    # a scene's size and shapes are drawn before its text, so the rates change the printing, not
    # what is drawn first (every third scene: a count chat's; a pair's two follow it, the second
    # drawn after the first one's text)
    nothing = scenes(text_rate=0.0)
    assert all(s.text is None for s in nothing)
    firsts = slice(None, None, 3)
    drawn = [(s.items, s.width, s.height) for s in everything]
    assert [(s.items, s.width, s.height) for s in nothing][firsts] == drawn[firsts]
    # by default, evaluation's share of numbers
    printed = [world.sample_text(random.Random(i)) for i in range(2000)]
    assert 0.25 < sum(text.isdigit() for text in printed) / len(printed) < 0.35
    words = [world.sample_text(random.Random(i), number_rate=0.0) for i in range(200)]
    assert not any(text.isdigit() for text in words)


def test_the_bitmap_faces_texts_can_be_numbers_at_a_rate_of_their_own() -> None:
    # unset, the face is chosen as the text is drawn, and nothing more is drawn than before
    plain = [world.sample_scene(random.Random(i), text_rate=1.0) for i in range(40)]
    unset = [sample_scene(random.Random(i), 1.0, world.NUMBER_RATE, 0.32, None) for i in range(40)]
    assert unset == [(scene, None) for scene in plain]
    # set, the face is chosen first, and its texts are numbers at their own rate
    chosen = [sample_scene(random.Random(i), 1.0, 0.0, 0.5, 1.0) for i in range(200)]
    printed = [(scene.text, bitmap) for scene, bitmap in chosen if scene.text is not None]
    assert len(printed) > 100
    assert all(text.isdigit() == bitmap for text, bitmap in printed)
    assert 0.35 < sum(bitmap for _, bitmap in printed) / len(printed) < 0.65
    # and the chosen face is the one drawn: the bitmap face whatever `bitmap_face` says
    scene = world.Scene((world.Item("star", "blue"),), "GO", 480, 320, "plain")
    freetype = world.render_labelled(scene, random.Random(4), bitmap=False)[0].tobytes()
    assert freetype == world.render_labelled(scene, random.Random(4))[0].tobytes()
    bitmap = world.render_labelled(scene, random.Random(4), bitmap=True)[0].tobytes()
    assert bitmap != freetype
    assert (
        bitmap
        == world.render_labelled(scene, random.Random(4), bitmap_face=0.0, bitmap=True)[0].tobytes()
    )
    # the training's chats follow it, one image or two
    for kind in ("count", "pair"):
        numbers = [
            scene
            for seed in range(20)
            for scene in make_chat(
                random.Random(seed),
                kind,
                turns=2,
                text_rate=1.0,
                number_rate=0.0,
                bitmap_face=1.0,
                bitmap_numbers=1.0,
            ).scenes
            if min(scene.width, scene.height) >= 64
        ]
        assert len(numbers) > 10 and all(s.text is not None and s.text.isdigit() for s in numbers)


def test_training_can_print_text_at_any_height_and_draws_nothing_more_unless_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # unset, the scenes are the ones every run drew so far (no random number more)
    plain = [world.sample_scene(random.Random(i), text_rate=1.0) for i in range(40)]
    assert plain == [
        world.sample_scene(random.Random(i), text_rate=1.0, text_anywhere=0.0) for i in range(40)
    ]
    assert all((s.band_top, s.text_y) == (0.0, 0.5) for s in plain)
    # set, that share of the texts goes anywhere from the top to the bottom; no text, no place
    moved = [
        world.sample_scene(random.Random(i), text_rate=1.0, text_anywhere=0.5) for i in range(400)
    ]
    printed = [s for s in moved if s.text]
    anywhere = [s for s in printed if (s.band_top, s.text_y) != (0.0, 0.5)]
    assert 0.4 < len(anywhere) / len(printed) < 0.6
    assert all(0.0 <= s.band_top <= 1.0 - world.TEXT_BAND and 0.0 <= s.text_y <= 1.0 for s in moved)
    assert max(s.band_top for s in anywhere) > 0.6 and min(s.band_top for s in anywhere) < 0.1
    assert all((s.band_top, s.text_y) == (0.0, 0.5) for s in moved if not s.text)
    # drawn where it says: the word inside its band, the shapes clear of it
    for top, text_y in ((0.0, 0.5), (0.0, 0.0), (0.0, 1.0), (0.35, 0.5), (0.7, 0.2)):
        scene = world.Scene(
            (world.Item("star", "blue"), world.Item("circle", "red")),
            "GO",
            600,
            400,
            "plain",
            top,
            text_y,
        )
        styles: tuple[world.Style, ...] = ("train", "alt")
        for style in styles:
            _, labels = world.render_labelled(scene, random.Random(3), style)
            band = (400 * top, 400 * (top + world.TEXT_BAND))
            boxes = [box for _, box in labels.chars]
            assert all(band[0] - 1 <= y0 and y1 <= band[1] + 1 for _, y0, _, y1 in boxes)
            free = (band[1] - boxes[0][3]) - (boxes[0][1] - band[0])  # room below minus above
            assert free > 0 if text_y == 0.0 else free < 0 if text_y == 1.0 else True
            shapes = labels.items.getbbox()
            assert shapes is not None
            assert shapes[3] <= band[0] + 1 or shapes[1] >= band[1] - 1
    # the training's batches pass it on
    scenes = printed_scenes(monkeypatch, text_anywhere=1.0)
    assert scenes and all((s.band_top, s.text_y) != (0.0, 0.5) for s in scenes)
    # from the command line, and named on the card
    reaches_batches_and_card("--text-anywhere", 0.4)


def test_training_can_move_the_word_within_its_band_and_draws_nothing_more_unless_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain = [world.sample_scene(random.Random(i), text_rate=1.0) for i in range(40)]
    assert plain == [
        world.sample_scene(random.Random(i), text_rate=1.0, text_drift=0.0) for i in range(40)
    ]
    # set, that share of the texts moves up or down within the band at the top, and only there
    moved = [
        world.sample_scene(random.Random(i), text_rate=1.0, text_drift=0.5) for i in range(400)
    ]
    printed = [s for s in moved if s.text]
    drifted = [s for s in printed if s.text_y != 0.5]
    assert 0.4 < len(drifted) / len(printed) < 0.6
    assert all(s.band_top == 0.0 for s in moved)
    assert min(s.text_y for s in drifted) < 0.1 and max(s.text_y for s in drifted) > 0.9
    assert all(s.text_y == 0.5 for s in moved if not s.text)
    # beside `text_anywhere`, it shares out the texts that one left centred
    both = [
        world.sample_scene(random.Random(i), text_rate=1.0, text_anywhere=0.5, text_drift=1.0)
        for i in range(400)
    ]
    texts = [s for s in both if s.text]
    assert all((s.band_top, s.text_y) != (0.0, 0.5) for s in texts)
    assert 0.3 < sum(s.band_top == 0.0 for s in texts) / len(texts) < 0.7
    # the training's batches pass it on
    scenes = printed_scenes(monkeypatch, text_drift=1.0)
    assert scenes and all(s.band_top == 0.0 and s.text_y != 0.5 for s in scenes)
    # from the command line, and named on the card
    reaches_batches_and_card("--text-drift", 0.6)


def drawn_chats(monkeypatch: pytest.MonkeyPatch, **batches_args: object) -> list[list[Example]]:
    """The chats of each batch `training.train.Batches(None, **batches_args)` draws, uncollated."""
    import training.train as train_module

    batches: list[list[Example]] = []

    def keep(
        examples: list[Example],
        processor: object,
        columns: int,
        size: object,
        slots: bool,
        **_: int,
    ) -> dict[str, object]:
        batches.append(examples)
        return {}

    monkeypatch.setattr(train_module, "collate", keep)
    list(train_module.Batches(None, **batches_args))  # type: ignore[arg-type]
    return batches


def printed_scenes(monkeypatch: pytest.MonkeyPatch, **placement: float) -> list[world.Scene]:
    """The scenes with text in six batches of eight chats, drawn with `placement`."""
    batches = drawn_chats(
        monkeypatch, seed=0, batch_size=8, start=0, stop=6, columns=4, text_rate=1.0, **placement
    )
    return [s for chats in batches for chat in chats for s in chat.scenes if s.text]


def reaches_batches_and_card(flag: str, value: float) -> None:
    """`flag value` on the command line reaches the batches and is named on the card; 0 is not."""
    from training.train import SIZE, command_line, model_card, run_batches

    attr = flag.removeprefix("--").replace("-", "_")
    args = command_line().parse_args(["--out", "x", flag, str(value)])
    assert getattr(run_batches(args, None, SIZE, 0, 10), attr) == value
    args.steps = 10
    assert f" {flag} {value}" in model_card(1, args, 1.0, 0.5, SIZE)
    setattr(args, attr, 0.0)
    assert flag not in model_card(1, args, 1.0, 0.5, SIZE)


def test_a_batch_gives_its_chats_one_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows of a batch share their layout (one question or several, a system message or
    none), so they pad to similar lengths; across batches every layout occurs."""
    batches = drawn_chats(monkeypatch, seed=0, batch_size=8, start=0, stop=40, columns=1)
    layouts = set()
    for examples in batches:
        systems = {e.system is not None for e in examples}
        several = {bool(e.more) for e in examples}
        assert len(systems) == 1
        if {e.kind for e in examples} != {"pair"}:
            assert several == {False} or sum(bool(e.more) for e in examples) >= len(examples) // 2
        layouts.add((systems.pop(), True in several))
    assert layouts == {(False, False), (False, True), (True, False), (True, True)}


def test_max_turns_caps_the_questions_a_chat_and_is_named_on_the_card(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--max-turns N` keeps every chat to N questions or fewer where the shipped batches have
    up to MULTI_TURNS; the batch's layout draws are unchanged (the same batches are pairs, the
    same have a system message); the flag reaches the batches and the card, its default does
    not show there."""
    from training.data import MULTI_TURNS
    from training.train import SIZE, command_line, model_card, run_batches

    def questions(examples: list[Example]) -> int:
        return max(len(e.turns()) for e in examples)

    drawn = {
        most: drawn_chats(
            monkeypatch, seed=0, batch_size=4, start=0, stop=40, columns=1, max_turns=most
        )
        for most in (MULTI_TURNS, 2, 1)
    }
    assert max(questions(b) for b in drawn[MULTI_TURNS]) > 2
    assert max(questions(b) for b in drawn[2]) == 2
    assert max(questions(b) for b in drawn[1]) == 1
    layouts = {
        most: [({e.kind == "pair" for e in b}, {e.system is not None for e in b}) for b in batches]
        for most, batches in drawn.items()
    }
    assert layouts[2] == layouts[MULTI_TURNS] == layouts[1]

    args = command_line().parse_args(["--out", "x", "--max-turns", "2"])
    assert run_batches(args, None, SIZE, 0, 10).max_turns == 2
    args.steps = 10
    assert " --max-turns 2" in model_card(1, args, 1.0, 0.5, SIZE)
    args.max_turns = MULTI_TURNS
    assert "--max-turns" not in model_card(1, args, 1.0, 0.5, SIZE)
    with pytest.raises(SystemExit):
        command_line().parse_args(["--out", "x", "--max-turns", str(MULTI_TURNS + 1)])


def test_bitmap_wide_moves_the_bitmap_face_to_wide_pictures_and_is_named_on_the_card(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--bitmap-wide W` prints a wide picture's text in the bitmap face W of the time, the
    others' at `--bitmap-face`'s share; it draws the same random numbers (W equal to the share
    draws the very pictures of a run without it); it reaches the batches and the card, and is
    refused where it would mean nothing."""
    import sys

    from training import train as train_module
    from training.train import SIZE, command_line, model_card, run_batches

    faces: list[bool] = []
    bitmap = world._bitmap_face
    monkeypatch.setattr(world, "_bitmap_face", lambda: faces.append(True) or bitmap())

    def bitmap_share(width: int, height: int, wide: float | None) -> float:
        scene = world.Scene((world.Item("circle", "red"),), "GO", width, height, "plain")
        chosen = 0
        for k in range(200):
            faces.clear()
            world.render_labelled(
                scene, random.Random(k), bitmap_face=0.05, bitmap_wide=wide, draw_max=256
            )
            chosen += bool(faces)
        return chosen / 200

    assert bitmap_share(400, 200, 0.9) > 0.8  # wide: 2 to 1
    assert bitmap_share(300, 200, None) < 0.15
    assert bitmap_share(200, 200, 0.9) < 0.15  # square and tall keep --bitmap-face's share
    assert bitmap_share(200, 400, 0.9) < 0.15

    def drawn(wide: float | None) -> list[bytes]:
        rng = random.Random(3)
        chats = [
            make_chat(rng, "text", bitmap_face=0.3, text_rate=1.0, bitmap_wide=wide)
            for _ in range(12)
        ]
        return [image.tobytes() for chat in chats for image in chat.images]

    assert drawn(0.3) == drawn(None)
    assert drawn(0.9) != drawn(None)

    args = command_line().parse_args(["--out", "x", "--bitmap-face", "0.3", "--bitmap-wide", "0.6"])
    assert run_batches(args, None, SIZE, 0, 10).bitmap_wide == 0.6
    args.steps = 10
    assert " --bitmap-face 0.3 --bitmap-wide 0.6" in model_card(1, args, 1.0, 0.5, SIZE)
    args.bitmap_wide = None
    assert "--bitmap-wide" not in model_card(1, args, 1.0, 0.5, SIZE)
    for refused in (
        ["--bitmap-wide", "0.6"],  # no --bitmap-face
        ["--bitmap-face", "0.3", "--bitmap-wide", "0"],
        ["--bitmap-face", "0.3", "--bitmap-wide", "0.6", "--bitmap-number-rate", "0.5"],
    ):
        monkeypatch.setattr(sys, "argv", ["train", "--out", "x", *refused])
        with pytest.raises(SystemExit):
            train_module.main()


def test_a_trained_folder_loads_like_any_checkpoint(
    small_parts: tuple[object, object], tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config, processor = small_parts
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    batch, aids = split_aids(collate([make_example(random.Random(2), kind="pair")], processor))
    heads = patches.PatchHeads(32)
    heads.attach(model.model.vision_model)
    loss = model(**batch).loss
    seen = heads.loss(aids["patch_targets"][:, :, :16])  # this tiny tower sees 4 x 4 patches
    assert set(heads.accuracy) <= set(patches.HEADS)
    (loss + seen).backward()  # one step of the real training objective runs
    assert model.model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)  # type: ignore[attr-defined]
    loaded = AutoProcessor.from_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(again).__name__ == "Idefics3ForConditionalGeneration"
    assert loaded.tokenizer.tokenize("GO") == ["G", "O"]
    image = world.render(world.sample_scene(random.Random(5)), random.Random(5))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    assert buf.tell() > 0


def test_patch_targets_say_what_is_under_each_patch() -> None:
    scene = world.Scene(
        (world.Item("square", "red"), world.Item("star", "blue")), "GO", 512, 512, "plain"
    )
    image, labels = world.render_labelled(scene, random.Random(0))
    assert image.size == labels.items.size == (512, 512)
    assert [c for c, _ in labels.chars] == ["G", "O"]
    target = patches.targets(scene, labels, 128, 16, columns=4)
    assert target.shape == (2 + 4, 64)
    shape, color = target[0].reshape(8, 8), target[1].reshape(8, 8)
    # the character under each quarter-patch strip, laid out as the image: 8 rows of 32 strips
    char = target[2:].reshape(4, 8, 8).permute(1, 2, 0).reshape(8, 32)
    red, blue = 1 + list(world.COLORS).index("red"), 1 + list(world.COLORS).index("blue")
    square, star = 1 + world.SHAPES.index("square"), 1 + world.SHAPES.index("star")
    # left half: the square, in red; right half: the star, in blue; the top band: the word
    assert (shape[:, :4] == square).any() and not (shape[:, :4] == star).any()
    assert (shape[:, 4:] == star).any() and not (shape[:, 4:] == square).any()
    assert ((shape == square) == (color == red)).all() and (
        (shape == star) == (color == blue)
    ).all()
    assert (shape == patches.NONE).sum() > 16  # background
    g, o = 1 + patches.CHARS.index("G"), 1 + patches.CHARS.index("O")
    rows, cols = (char == g).nonzero(as_tuple=True)
    assert rows.numel() and rows.max() < 3  # the word is in the top 30 %
    assert cols.max() < (char == o).nonzero(as_tuple=True)[1].min()  # G left of O
    assert set(char.unique().tolist()) == {patches.NONE, g, o}
    # each glyph is several strips wide: finer than a patch
    assert len(set(cols.tolist())) >= 3 and len(set((char == o).nonzero()[:, 1].tolist())) >= 3


def test_character_cells_can_split_a_patch_from_top_to_bottom_too() -> None:
    """`--char-rows`: the character read-out says where in a patch a glyph sits up and down, as
    its strips say across, so a word a few pixels higher marks other cells of the same patches."""
    import torch

    from training.patches import PatchHeads

    def chars(text_y: float, rows: int) -> torch.Tensor:
        scene = world.Scene((world.Item("circle", "red"),), "GO", 512, 512, "plain", 0.0, text_y)
        _, labels = world.render_labelled(scene, random.Random(0))
        target = patches.targets(scene, labels, 128, 16, columns=4, rows=rows)
        assert target.shape == (2 + 4 * rows, 64)
        if rows == 1:
            assert torch.equal(target, patches.targets(scene, labels, 128, 16, columns=4))
        # laid out as the image: 8 * rows cells down, 32 strips across
        return target[2:].reshape(rows, 4, 8, 8).permute(2, 0, 3, 1).reshape(8 * rows, 32)

    top, bottom = chars(0.0, 2), chars(1.0, 2)
    marked = {
        name: set(c.nonzero()[:, 0].tolist()) for name, c in (("top", top), ("bottom", bottom))
    }
    # half-patch rows: the word's lower edge moves down by a cell or more, its columns do not
    assert max(marked["bottom"]) > max(marked["top"]) and min(marked["top"]) <= 1
    assert torch.equal(top.any(0), bottom.any(0))
    # a patch's cells, top half then bottom half, are the same glyphs as its whole-height strip
    # says wherever the glyph covers the patch's middle
    whole = chars(0.0, 1)
    assert set(whole.unique().tolist()) == set(top.unique().tolist())
    # the read-out learns every cell: columns x rows classifications a patch
    heads = PatchHeads(8, ("char",), columns=4, glyph_weight=1.0, rows=2)
    assert heads.heads["char"].out_features == 8 * patches.HEADS["char"]
    heads.seen = torch.randn(1, 64, 8, requires_grad=True)
    scene = world.Scene((world.Item("circle", "red"),), "GO", 512, 512, "plain")
    _, labels = world.render_labelled(scene, random.Random(0))
    heads.loss(patches.targets(scene, labels, 128, 16, columns=4, rows=2)[None]).backward()
    assert heads.heads["char"].weight.grad is not None and "char" in heads.accuracy
    reaches_batches_and_card("--char-rows", 2)


def test_slot_targets_number_the_characters_so_a_repeated_glyph_counts_twice() -> None:
    import torch

    from training.lookup import char_cells
    from training.patches import SLOTS, PatchHeads

    scene = world.Scene((world.Item("circle", "red"),), "3373", 512, 512, "plain")
    _, labels = world.render_labelled(scene, random.Random(0))
    plain = patches.targets(scene, labels, 128, 32, columns=4)
    target = patches.targets(scene, labels, 128, 32, columns=4, slots=True)
    assert target.shape == (2 + 4 + SLOTS, 16) and torch.equal(target[: 2 + 4], plain)
    slot = target[2 + 4 :]
    three, seven = 1 + patches.CHARS.index("3"), 1 + patches.CHARS.index("7")
    # row k holds the word's k-th character, under the middle of its box, and nothing else
    for k, glyph in enumerate((three, three, seven, three)):
        cells = char_cells(labels.chars[k][1], labels.items.size, 4)
        assert set(slot[k].unique().tolist()) == {patches.NONE, glyph}
        assert sorted(slot[k].nonzero()[:, 0].tolist()) == sorted(cells)
    # past the word's end: nothing, so the first empty row says how long the word is
    assert not slot[4:].any()
    # the two 3s in front cover strips that one wide 3 could; their rows tell them apart
    assert not torch.equal(slot[0], slot[1])
    # the read-out learns from those rows, as it does from the strips
    heads = PatchHeads(8, ("char", "slot"), columns=4, glyph_weight=1.0)
    heads.seen = torch.randn(1, 16, 8)
    heads.loss(target[None]).backward()
    assert heads.heads["slot"].weight.grad is not None
    assert heads.heads["slot"].out_features == SLOTS * patches.HEADS["slot"]
    assert set(heads.accuracy) == {"char", "slot"}


def test_the_tower_warm_up_trains_the_tower_and_not_the_language_model() -> None:
    import argparse

    import torch
    from transformers import AutoModelForImageTextToText

    from training.train import SIZE, warm_tower

    tokenizer = build_tokenizer(
        "idefics3", tokenizer_corpus(0, n=300), vocab_size=300, isolate=ISOLATE
    )
    # the training's own image and patch sizes (the read-outs' targets follow them), tiny widths
    size = Size(image_size=SIZE.image_size, patch_size=SIZE.patch_size, hidden=32, layers=1,
                heads=2, vision_hidden=32, vision_layers=1, vision_heads=2)  # fmt: skip
    config, processor = idefics3_parts(tokenizer, size)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    vision = model.model.vision_model
    heads = patches.PatchHeads(config.vision_config.hidden_size, columns=2)  # type: ignore[attr-defined]
    heads.attach(vision)
    token_heads = patches.PatchHeads(config.text_config.hidden_size, columns=2)  # type: ignore[attr-defined]
    token_heads.attach(model.model.connector)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = argparse.Namespace(
        seed=0,
        lr=1e-3,
        batch_size=4,
        tower_steps=3,
        char_columns=2,
        workers=0,
        draw_max=256,
        made_faces=0.0,
        bitmap_face=0.0,
        char_slots=False,
        real_faces=0.0,
        text_rate=None,
        number_rate=world.NUMBER_RATE,
        bitmap_numbers=None,
        mix=dict(TRAIN_MIX),
        text_anywhere=0.0,
        text_drift=0.0,
        char_rows=1,
        read_pairs=False,
    )
    model.train()
    warm_tower(model, processor, heads, token_heads, args)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("model.vision_model.") for n in changed)
    assert any(n.startswith("model.connector.") for n in changed)
    assert not any(n.startswith(("model.text_model.", "lm_head.")) for n in changed)
    assert set(heads.accuracy) == {"shape", "color", "char"}


def test_the_trained_models_processor_keeps_the_rows_of_a_wide_image() -> None:
    """One resize straight to the square: Idefics3's default (fit the longer side, then stretch
    the shorter one back) would leave a 1,120 x 400 picture 46 rows of detail."""
    import copy

    import numpy as np
    from PIL import Image

    from training.train import SIZE, build

    _, processor = build(0)
    stripes = np.zeros((400, 1120, 3), dtype=np.uint8)
    stripes[(np.arange(400) // 4) % 2 == 0] = 255  # 4 px stripes: 1.3 rows each at 128 px
    image = Image.fromarray(stripes)

    def row_contrast(image_processor: object) -> float:
        pixels = image_processor(images=[[image]], return_tensors="pt")["pixel_values"]  # type: ignore[operator]
        assert tuple(pixels.shape[-2:]) == (SIZE.image_size, SIZE.image_size)
        return float(pixels[0, 0, 0].mean(dim=1).std())

    twice = copy.deepcopy(processor.image_processor)
    twice.do_resize = True
    assert processor.image_processor.do_resize is False
    assert row_contrast(processor.image_processor) > 3 * row_contrast(twice)


def test_the_look_up_probe_gives_each_image_token_its_objects_words(
    small_parts: tuple[object, object],
) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    from training.probe_lookup import first_answer_right, symbols

    config, processor = small_parts
    model = AutoModelForImageTextToText.from_config(config)
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    table = model.model.text_model.get_input_embeddings().weight
    red = table[tokenizer(" red", add_special_tokens=False).input_ids].sum(0)
    star = table[tokenizer(" star", add_special_tokens=False).input_ids].sum(0)
    background = torch.full((table.shape[1],), 7.0)
    shape, color = 1 + world.SHAPES.index("star"), 1 + list(world.COLORS).index("red")
    targets = torch.tensor([[[shape, 0], [color, 0]]])  # one image, two tokens
    seen = symbols(model, tokenizer, targets, background)
    assert torch.allclose(seen[0, 0], red + star) and torch.equal(seen[0, 1], background)

    # the first answer is right only if every one of its tokens is; later answers do not count
    labels = torch.tensor([[-100, 5, 6, -100, 9], [-100, 5, 6, -100, 9]])
    logits = torch.zeros(2, 5, 10)
    logits[0, 0, 5] = logits[0, 1, 6] = logits[0, 3, 1] = 1  # row 0: the first answer right
    logits[1, 0, 5] = logits[1, 1, 2] = logits[1, 3, 9] = 1  # row 1: its second token wrong
    assert first_answer_right(logits, labels) == [True, False]


def test_colour_and_yes_no_questions_name_their_shape_and_nothing_else_does() -> None:
    from training.lookup import named_shape

    rng = random.Random(11)
    for _ in range(200):
        scene = world.sample_scene(rng)
        for kind in ("describe", "count", "text", "color", "exists"):
            question, _ = world.ask(scene, rng, kind)
            named = named_shape(question)
            if kind in ("color", "exists") and "shapes" not in question:
                assert named is not None and world.SHAPES[named - 1] in question
            else:  # (a colour question about a scene of repeated shapes becomes a count)
                assert named is None
    assert named_shape("Is there a red star in the image?") == 1 + world.SHAPES.index("star")


@pytest.fixture(scope="module")
def training_size_processor() -> object:
    """The training's processor (its image size, so 16 image tokens an image) on a small
    tokenizer."""
    from training.train import SIZE

    tokenizer = build_tokenizer(
        "idefics3", tokenizer_corpus(0, n=300), vocab_size=300, isolate=ISOLATE
    )
    config, processor = idefics3_parts(tokenizer, SIZE)
    processor.image_processor.do_resize = False  # type: ignore[attr-defined]
    return config, processor


def test_the_look_up_targets_are_the_named_shapes_image_tokens_where_the_answer_is_decided(
    training_size_processor: tuple[object, object],
) -> None:
    _, processor = training_size_processor
    tok = processor.tokenizer  # type: ignore[attr-defined]
    image_token = tok.convert_tokens_to_ids("<image>")
    rng = random.Random(5)
    chats = [make_chat(rng, k, turns=3) for k in ("color", "exists", "count")]
    chats += [make_example(rng, kind="pair"), make_chat(rng, "exists", turns=1)]
    batch = collate(chats, processor)
    query, keys, colour = batch["lookup_query"], batch["lookup_keys"], batch["lookup_colour"]
    expected = 0
    image = 0
    for chat in chats:
        if len(chat.images) == 1:
            shapes = batch["token_targets"][image, 0]
            for question, _ in chat.turns():
                named = [1 + world.SHAPES.index(w) for w in world.SHAPES if w in question]
                expected += bool(named) and bool((shapes == named[0]).any())
        image += len(chat.images)
    assert len(query) == expected > 0
    image = {row: sum(len(c.images) for c in chats[:row]) for row in range(len(chats))}
    for (row, at), mask, named in zip(query.tolist(), keys, colour.tolist(), strict=True):
        assert len(chats[row].images) == 1  # two images: no look-up target
        # the position that predicts the answer's first letter: the answer's leading space
        # ("Ġ", then "B" of " Blue."), where the colour or the yes / no is chosen
        assert batch["labels"][row, at - 1] == -100 and batch["labels"][row, at] != -100
        assert tok.decode([int(batch["input_ids"][row, at])]) == " "
        assert tok.decode([int(batch["input_ids"][row, at + 1])]).strip()
        answer_at = tok.decode(batch["input_ids"][row, : at + 1].tolist())
        question = answer_at.rsplit("User:", 1)[1]
        shape = [s for s in world.SHAPES if s in question]
        assert len(shape) == 1
        # exactly the image tokens whose label is that shape
        marked = mask.nonzero()[:, 0]
        assert bool((batch["input_ids"][row, marked] == image_token).all())
        where = (batch["input_ids"][row] == image_token).nonzero()[:, 0]
        labels = batch["token_targets"][image[row], 0]
        wanted = where[labels == 1 + world.SHAPES.index(shape[0])]
        assert marked.tolist() == wanted.tolist()
        # and the colour of that shape, unless two of them differ
        colours = {i.color for i in chats[row].scenes[0].items if i.shape == shape[0]}
        assert named == (list(world.COLORS).index(colours.pop()) if len(colours) == 1 else -100)


def test_each_shape_has_the_image_tokens_where_it_mostly_is() -> None:
    # a big square on the left, a tiny star on the right: too small to win any 32 px token
    scene = world.Scene(
        (world.Item("square", "red"), world.Item("star", "blue")), None, 256, 256, "plain"
    )
    labels = world.Labels(Image.new("L", (256, 256), 0), [])
    draw = ImageDraw.Draw(labels.items)
    draw.rectangle((10, 70, 110, 170), fill=1)
    draw.rectangle((200, 200, 207, 207), fill=2)
    cells = patches.item_cells(scene, labels, 128, 32)
    assert cells.shape == (patches.MAX_ITEMS, 16)
    assert patches.item_map(scene, labels, 128, 32).tolist().count(2) == 0
    assert cells[1].nonzero()[:, 0].tolist() == [15]  # the star still has its one token
    square = cells[0].nonzero()[:, 0].tolist()
    assert square and all(t % 4 <= 1 for t in square)  # the left half
    assert not cells[2].any()  # no third shape


def test_the_item_targets_are_each_described_shapes_image_tokens_where_it_is_named(
    training_size_processor: tuple[object, object],
) -> None:
    _, processor = training_size_processor
    tok = processor.tokenizer  # type: ignore[attr-defined]
    image_token = tok.convert_tokens_to_ids("<image>")
    rng = random.Random(9)
    chats = [make_chat(rng, "describe", turns=1) for _ in range(3)]
    chats += [make_chat(rng, "color", turns=4) for _ in range(3)]
    chats += [make_example(rng, kind="pair") for _ in range(2)]
    chats += [make_chat(rng, "count", turns=1), make_chat(rng, "text", turns=1)]
    batch = collate(chats, processor)
    query, keys = batch["item_query"], batch["item_keys"]
    colour, shape = batch["item_colour"], batch["item_shape"]
    described = [
        (row, k, j, item)
        for row, chat in enumerate(chats)
        for _, answer in chat.turns()
        if answer.startswith(("A ", "An ", "The first image"))
        for k, scene in enumerate(chat.scenes)
        for j, item in enumerate(scene.items)
    ]
    assert len(described) >= 10 and len(query) == 2 * len(described)
    for n, (row, k, j, item) in enumerate(described):
        for at_, what in ((2 * n, "colour"), (2 * n + 1, "shape")):
            r, at = query[at_].tolist()
            assert r == row
            # the position whose output predicts the word: the word is an answer's label
            word = tok.decode([int(batch["input_ids"][row, at + 1])]).strip()
            assert int(batch["labels"][row, at + 1]) != -100
            if what == "colour":
                assert item.color.startswith(word) and word
                assert colour[at_] == list(world.COLORS).index(item.color)
                assert shape[at_] == -100
            else:
                assert item.shape.startswith(word) and word
                assert shape[at_] == world.SHAPES.index(item.shape) and colour[at_] == -100
            # the image tokens of that shape, in its own image (the second for a pair's second)
            where = (batch["input_ids"][row] == image_token).nonzero()[:, 0]
            own = where[16 * k : 16 * (k + 1)]
            cells = patches.item_cells(chats[row].scenes[k], chats[row].labels[k], 128, 32)[j]
            assert keys[at_].nonzero()[:, 0].tolist() == own[cells].tolist()
    # the shapes are named left to right: each one's tokens lie right of the one before
    for n in range(len(described) - 1):
        if described[n][:2] == described[n + 1][:2]:  # the same image
            left, right = (keys[2 * m].nonzero()[:, 0].remainder(4).float() for m in (n, n + 1))
            assert right.mean() >= left.mean()


def test_a_characters_cells_are_those_under_the_middle_of_its_box() -> None:
    from training.lookup import char_cells

    # a 128 px square in 4 x 4 cells of 32 px: a glyph inside one cell marks that cell
    assert char_cells((40, 4, 56, 28), (128, 128), 4) == [1]
    # one across a cell border marks both cells its middle half overlaps
    assert char_cells((20, 4, 52, 28), (128, 128), 4) == [0, 1]
    # a sliver still marks the cell its centre is in; boxes at the edge stay on the grid
    assert char_cells((127, 0, 128, 1), (128, 128), 4) == [3]
    # other image sizes scale: the top-right quarter of a 1,000 x 500 image
    assert char_cells((760, 10, 990, 110), (1000, 500), 4) == [3]


def test_the_read_targets_are_where_each_character_of_the_word_is_printed(
    training_size_processor: tuple[object, object],
) -> None:
    from training.lookup import char_cells
    from training.train import char_ids

    _, processor = training_size_processor
    tok = processor.tokenizer  # type: ignore[attr-defined]
    image_token = tok.convert_tokens_to_ids("<image>")
    ids = char_ids(tok)
    assert set(ids) == set(patches.CHARS)  # each letter and digit is a token of its own
    rng = random.Random(11)
    chats = [make_chat(rng, k, turns=2) for k in ("text", "describe", "count", "text")]
    chats += [make_example(rng, kind="pair")]
    batch = collate(chats, processor)
    query, keys = batch["read_query"], batch["read_keys"]
    expected = sum(
        len(chat.scenes[0].text)
        for chat in chats
        if len(chat.images) == 1 and chat.scenes[0].text
        for _, answer in chat.turns()
        if f'"{chat.scenes[0].text}"' in answer
    )
    assert len(query) == len(keys) == expected > 0
    seen: dict[int, int] = {}
    for (row, at), mask in zip(query.tolist(), keys, strict=True):
        chat = chats[row]
        assert len(chat.images) == 1
        labels = chat.labels[0]
        word = chat.scenes[0].text
        # the k-th query of a run predicts the word's k-th character, a label of the answer
        k = seen.get(row, 0) % len(word)
        seen[row] = seen.get(row, 0) + 1
        assert int(batch["labels"][row, at + 1]) == ids[word[k]]
        assert int(batch["input_ids"][row, at + 1]) == ids[word[k]]
        # and looks at the image tokens where that character is printed
        where = (batch["input_ids"][row] == image_token).nonzero()[:, 0]
        cells = char_cells(labels.chars[k][1], labels.items.size, 4)
        assert mask.nonzero()[:, 0].tolist() == where[cells].tolist()


def test_two_image_descriptions_can_be_read_each_word_from_its_own_image(
    training_size_processor: tuple[object, object],
) -> None:
    """`--read-pairs`: a description of two images spells the first image's word, looking at
    the first image's tokens, then the second's at the second's; unset, pairs give none."""
    from training.lookup import char_cells
    from training.train import char_ids

    _, processor = training_size_processor
    tok = processor.tokenizer  # type: ignore[attr-defined]
    image_token = tok.convert_tokens_to_ids("<image>")
    ids = char_ids(tok)
    pairs = [
        pair
        for seed in range(200)
        if all(
            (pair := make_example(random.Random(seed), kind="pair")).labels[i].chars for i in (0, 1)
        )
    ][:3]
    assert len(pairs) == 3
    assert len(collate(pairs, processor)["read_query"]) == 0
    batch = collate(pairs, processor, read_pairs=True)
    query, keys = batch["read_query"], batch["read_keys"]
    assert len(query) == sum(len(s.text or "") for pair in pairs for s in pair.scenes)
    spelled: dict[int, str] = {}
    for (row, at), mask in zip(query.tolist(), keys, strict=True):
        pair = pairs[row]
        done = spelled.get(row, "")
        first = pair.scenes[0].text or ""
        k, j = (0, len(done)) if len(done) < len(first) else (1, len(done) - len(first))
        char, box = pair.labels[k].chars[j]
        assert int(batch["labels"][row, at + 1]) == ids[char]
        spelled[row] = done + char
        where = (batch["input_ids"][row] == image_token).nonzero()[:, 0]
        own = where[k * 16 : (k + 1) * 16]
        cells = char_cells(box, pair.labels[k].items.size, 4)
        assert mask.nonzero()[:, 0].tolist() == own[cells].tolist()
    # each row spelled its first image's word, then its second's, in the answer's order
    assert spelled == {
        r: (p.scenes[0].text or "") + (p.scenes[1].text or "") for r, p in enumerate(pairs)
    }
    assert all(
        q[1] < r[1]
        for q, r in zip(query[:-1].tolist(), query[1:].tolist(), strict=True)
        if q[0] == r[0]
    )
    # the flag reaches the batches and is named on the card
    from training.train import SIZE, command_line, model_card, run_batches

    args = command_line().parse_args(["--out", "x", "--read-pairs"])
    assert run_batches(args, None, SIZE, 0, 10).read_pairs
    args.steps = 10
    assert " --read-pairs" in model_card(1, args, 1.0, 0.5, SIZE)
    args.read_pairs = False
    assert "--read-pairs" not in model_card(1, args, 1.0, 0.5, SIZE)


def test_the_look_up_loss_is_the_attention_mass_on_the_named_shape_and_trains_that_head(
    training_size_processor: tuple[object, object],
) -> None:
    import math

    import torch
    from transformers import AutoModelForImageTextToText

    from training import lookup

    uniform = torch.full((1, 8, 8), 1 / 8)
    keys = torch.tensor([[False, True, True, False, False, False, False, False]])
    loss = lookup.attention_loss(uniform, torch.tensor([[0, 5]]), keys)
    assert loss is not None and math.isclose(float(loss), -math.log(2 / 8), rel_tol=1e-4)
    assert lookup.attention_loss(uniform, torch.zeros(0, 2, dtype=torch.long), keys[:0]) is None

    config, processor = training_size_processor
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    model.model.text_model.config._attn_implementation = "eager"
    chats = [make_chat(random.Random(k), "color", turns=2) for k in range(4)]
    batch, aids = split_aids(collate(chats, processor))
    query, keys, colour = aids["lookup_query"], aids["lookup_keys"], aids["lookup_colour"]
    out = model(**batch, output_attentions=True, output_hidden_states=True)
    looked = lookup.attention_loss(out.attentions[lookup.LAYER][:, lookup.HEAD], query, keys)
    assert looked is not None and 0 < float(looked.detach()) < 20
    looked.backward(retain_graph=True)  # the colour read-out below uses it too
    layer = model.model.text_model.layers[lookup.LAYER].self_attn
    head_dim = layer.head_dim
    assert layer.q_proj.weight.grad[:head_dim].abs().sum() > 0  # the supervised head learns
    assert layer.q_proj.weight.grad[head_dim:].abs().sum() == 0  # the others are left alone
    assert model.model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0

    # the colour read-out: from the output of the supervised head's layer, at the same positions
    model.zero_grad(set_to_none=True)
    readout = lookup.ColourReadout(model.config.text_config.hidden_size)
    named = readout.loss(out.hidden_states[lookup.LAYER + 1], query, colour)
    assert named is not None and readout.accuracy is not None and 0 <= readout.accuracy <= 1
    named.backward()
    layers = model.model.text_model.layers
    assert layers[lookup.LAYER].mlp.down_proj.weight.grad.abs().sum() > 0
    assert layers[lookup.LAYER + 1].mlp.down_proj.weight.grad is None  # a later layer: untouched
    # nothing to read where every named shape's colour is ambiguous
    ignored = torch.full_like(colour, lookup.IGNORE)
    assert readout.loss(out.hidden_states[lookup.LAYER + 1], query, ignored) is None


def test_fused_elsewhere_reads_the_look_up_layers_attention_as_the_eager_model_does(
    training_size_processor: tuple[object, object],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """`--fused-elsewhere`: only the look-up layer attends eagerly; the others use the fused
    kernel and return no weights. The look-up layer's weights, the loss and its gradients are
    the all-eager model's (to float rounding), a snapshot leaves it so, and the flag is named on
    the card and refused without a look-up loss."""
    import sys

    import torch
    from transformers import AutoModelForImageTextToText

    from training import lookup
    from training import train as train_module
    from training.train import SIZE, command_line, model_card, save

    config, processor = training_size_processor
    chats = [make_chat(random.Random(k), kind, turns=2) for k, kind in enumerate(
        ("color", "exists", "describe", "text"))]  # fmt: skip
    batch, aids = split_aids(collate(chats, processor))

    def run(fused: bool) -> tuple[Any, Any, torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config)
        text = model.model.text_model
        text.config._attn_implementation = "eager"
        if fused:
            lookup.fuse_other_layers(text)
        out = model(**batch, output_attentions=True)
        attention = lookup.looked(out.attentions, fused)
        looked = lookup.attention_loss(
            attention[:, lookup.HEAD], aids["lookup_query"], aids["lookup_keys"]
        )
        assert looked is not None
        (out.loss + looked).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return model, out, attention, grads

    _, eager_out, eager_attention, eager_grads = run(fused=False)
    model, fused_out, fused_attention, fused_grads = run(fused=True)
    layers = model.model.text_model.layers
    assert len(eager_out.attentions) == len(layers) > lookup.LAYER + 1
    assert len(fused_out.attentions) == 1  # the others return none: nothing computes them
    assert [layer.self_attn.config._attn_implementation for layer in layers] == [
        "eager" if k == lookup.LAYER else "sdpa" for k in range(len(layers))
    ]
    assert model.model.text_model.config._attn_implementation == "eager"
    torch.testing.assert_close(fused_attention, eager_attention, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused_out.loss, eager_out.loss, atol=1e-6, rtol=1e-5)
    assert fused_grads.keys() == eager_grads.keys()
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-5, rtol=1e-3, msg=name)

    save(model, processor, tmp_path / "snapshot")  # a --save-every snapshot mid-run
    assert [layer.self_attn.config._attn_implementation for layer in layers][
        lookup.LAYER
    ] == "eager"
    assert len(model(**batch, output_attentions=True).attentions) == 1

    args = command_line().parse_args(["--out", "x", "--attend-weight", "0.1", "--fused-elsewhere"])
    args.steps = 10
    card = model_card(1, args, 1.0, 0.5, SIZE)
    assert " --fused-elsewhere" in card
    assert "Only layer 2's attention is computed eagerly" in card
    args.fused_elsewhere = False
    card = model_card(1, args, 1.0, 0.5, SIZE)
    assert "--fused-elsewhere" not in card and "computed eagerly" not in card
    monkeypatch.setattr(sys, "argv", ["train", "--out", "x", "--fused-elsewhere"])
    with pytest.raises(SystemExit):
        train_module.main()


def test_reading_is_scored_apart_on_images_that_have_text() -> None:
    from training.evaluate import characters_right, reading_kind, table

    assert characters_right('"GO"', "GO") == (2, 2)
    assert characters_right('"GD"', "GO") == (1, 2)
    assert characters_right('"GOLF"', "GO") == (2, 2)  # extra letters are scored by exact match
    assert characters_right("There is no text.", "GO") == (0, 2)
    assert reading_kind("2024") == "read_numbers"
    assert reading_kind("GO") == reading_kind("R2D2") == "read_words"
    row = {k: 50.0 for k in world.QUESTION_TYPES} | {"read": 12.5, "read_chars": 40.0}
    row |= {"read_words": 20.0, "read_numbers": 0.0}
    lines = table({"accuracy": {"held-out": row, "different": row}}).splitlines()
    assert "| reading (images with text) | >= 80% | 12.5% | 12.5% |" in lines
    assert "| characters read | - | 40.0% | 40.0% |" in lines
    assert "| words read | - | 20.0% | 20.0% |" in lines
    assert "| numbers read | - | 0.0% | 0.0% |" in lines


def test_the_card_says_how_well_it_reads_typefaces_it_never_saw(tmp_path: Path) -> None:
    from training.evaluate import write_card

    row = {k: 50.0 for k in world.QUESTION_TYPES}
    report = {
        "accuracy": {"held-out": row, "different": row},
        "unseen_faces": {"read": 7.0, "read_chars": 31.5},
        "n": 100,
    }
    (tmp_path / "README.md").write_text("# a model\n\n## Evaluation\n\nold numbers\n")
    write_card(tmp_path, report, "python -m training.evaluate")
    card = (tmp_path / "README.md").read_text()
    assert "old numbers" not in card and card.count("## Evaluation") == 1
    assert "7.0% of texts read whole, 31.5% of characters" in card
    assert "never trained on" in card


def test_the_glyph_loss_adds_the_cross_entropy_of_the_strips_that_hold_a_character() -> None:
    import torch

    from training.patches import HEADS, PatchHeads

    torch.manual_seed(0)
    seen = torch.randn(2, 4, 8)
    target = torch.zeros(2, 3, 4, dtype=torch.long)  # shape, colour, one character strip
    target[0, 2, 1] = 5  # one strip holds a character, all others none
    losses = []
    for weight in (0.0, 1.0):
        heads = PatchHeads(8, ("char",), columns=1, glyph_weight=weight)
        torch.manual_seed(1)
        heads.heads["char"].reset_parameters()
        heads.seen = seen
        losses.append(heads.loss(target))
    logits = heads.heads["char"](seen).reshape(-1, HEADS["char"])
    glyph = torch.nn.functional.cross_entropy(logits[1:2], torch.tensor([5]))
    assert torch.allclose(losses[1] - losses[0], glyph)


def test_the_scale_factor_sets_how_many_image_tokens_an_image_becomes() -> None:
    from dataclasses import replace

    from training.train import SIZE, build

    for scale, tokens in ((2, 16), (1, 64)):
        model, processor = build(0, replace(SIZE, scale_factor=scale))
        assert processor.image_seq_len == tokens
        assert model.config.scale_factor == scale


def test_a_run_pins_its_kernels_by_running_again_with_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import sys

    from training import train

    calls: list[tuple[str, list[str], dict[str, str]]] = []

    def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append((path, argv, env))

    monkeypatch.setattr(os, "execve", execve)
    pinned = train.pinned_math()
    for name in pinned:
        monkeypatch.delenv(name, raising=False)
    train.pin_math(["--out", "x", "--steps", "5"])
    ((path, argv, env),) = calls
    assert path == sys.executable
    assert argv == [sys.executable, "-m", "training.train", "--out", "x", "--steps", "5"]
    assert {k: env[k] for k in pinned} == pinned
    assert env["PATH"] == os.environ["PATH"]  # the rest of the environment goes along
    for name, value in pinned.items():
        monkeypatch.setenv(name, value)
    train.pin_math(["--out", "x"])  # already pinned: no second run
    assert len(calls) == 1


def test_mkl_takes_its_avx512_path_on_intel_cpus_that_have_it_and_avx2_elsewhere() -> None:
    from training import train

    avx512 = "fpu sse avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl"

    def cpu(vendor: str, flags: str) -> str:
        # /proc/cpuinfo repeats its block per core; the first block is read
        block = f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 6\nflags\t\t: {flags}\n"
        return block + block.replace(": 0", ": 1")

    intel = train.pinned_math(cpu("GenuineIntel", avx512))
    assert intel == {**train.PINNED_MATH, "MKL_CBWR": "AVX512"}
    assert intel["ATEN_CPU_CAPABILITY"] == "avx2" and intel["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    # AMD EPYCs with and without AVX-512 stay on the one AVX2 path they agree on byte for byte
    assert train.pinned_math(cpu("AuthenticAMD", avx512)) == train.PINNED_MATH
    assert train.pinned_math(cpu("AuthenticAMD", "fpu sse avx avx2 fma")) == train.PINNED_MATH
    # an Intel CPU short of any flag MKL's AVX-512 path needs, or without AVX-512 at all
    assert train.pinned_math(cpu("GenuineIntel", avx512.replace(" avx512vl", ""))) == (
        train.PINNED_MATH
    )
    assert train.pinned_math(cpu("GenuineIntel", "fpu sse avx avx2 fma")) == train.PINNED_MATH
    assert train.pinned_math("") == train.PINNED_MATH


def test_a_snapshot_mid_run_leaves_the_model_training_on_the_eager_attention(
    small_parts: tuple[object, object], tmp_path: Path
) -> None:
    """`--save-every` once switched the live model to SDPA, and the next step's look-up loss
    found no attention weights: the run died at its first snapshot."""
    import torch
    from transformers import AutoModelForImageTextToText

    from training.train import save

    config, processor = small_parts
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    model.model.text_model.config._attn_implementation = "eager"
    model.train()
    save(model, processor, tmp_path / "snapshot")
    assert model.training
    assert model.model.text_model.config._attn_implementation == "eager"
    batch, _ = split_aids(collate([make_example(random.Random(2))], processor))
    out = model(**batch, output_attentions=True)
    assert len(out.attentions) == config.text_config.num_hidden_layers  # type: ignore[attr-defined]
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "snapshot")
    assert again.model.text_model.config._attn_implementation == "sdpa"


def card_args() -> Any:
    """A run's command line as `model_card` reads it, every option at the shipped recipe's."""
    import argparse

    return argparse.Namespace(
        steps=10, batch_size=4, lr=1e-3, seed=0, char_columns=4, token_chars=True,
        glyph_weight=1.0, tower_steps=0, draw_max=256, attend_weight=0.1, colour_weight=0.3,
        read_weight=0.1, made_faces=0.0, real_faces=0.0, char_slots=False, pin_math=True,
        init_from=None, bf16=False, warmup=200, patch_weight=1.0, threads=2,
    )  # fmt: skip


def test_the_card_gives_the_command_with_its_weight_average() -> None:
    from training.train import model_card

    args = card_args()
    args.ema = "0.999,0.9995"
    card = model_card(1000, args, 1.0, 0.5)
    assert "--ema 0.999,0.9995" in card
    assert "moving average of every step's (decay 0.999," in card
    args.ema = ""
    assert "--ema" not in model_card(1000, args, 1.0, 0.5)
    assert "moving average" not in model_card(1000, args, 1.0, 0.5)


def test_the_cosine_ends_at_the_floor_asked_for_and_the_default_is_unchanged() -> None:
    import math

    from training.train import lr_at

    # the default, as every shipped run had it: 5% of the peak at the end
    assert lr_at(99, 100, 1.0, 10) == pytest.approx(
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 89 / 90))
    )
    assert lr_at(100, 100, 2.0, 10) == pytest.approx(0.1)
    assert lr_at(100, 100, 2.0, 10, floor=0.2) == pytest.approx(0.4)
    assert lr_at(10, 100, 2.0, 10, floor=0.2) == pytest.approx(2.0)  # the peak, after warm-up
    assert lr_at(4, 100, 2.0, 10, floor=0.2) == pytest.approx(1.0)  # the warm-up is the same
    middle = lr_at(55, 100, 1.0, 10, floor=0.2)
    assert middle == pytest.approx(0.2 + 0.8 * 0.5)


def test_the_card_gives_the_command_with_its_rate_floor() -> None:
    from training.train import model_card

    args = card_args()
    args.lr_floor = 0.2
    card = model_card(1000, args, 1.0, 0.5)
    assert "--lr-floor 0.2" in card
    assert "cosine down to 0.2 of the peak" in card
    args.lr_floor = 0.05
    assert "--lr-floor" not in model_card(1000, args, 1.0, 0.5)
    assert "cosine)" in model_card(1000, args, 1.0, 0.5)


def test_a_run_can_start_from_a_checkpoints_weights(
    small_parts: tuple[object, object], tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    from training.train import start_from

    config, _ = small_parts
    torch.manual_seed(0)
    trained = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.5)
    trained.save_pretrained(tmp_path)
    torch.manual_seed(1)
    fresh = AutoModelForImageTextToText.from_config(config)
    start_from(fresh, tmp_path)
    for (name, got), want in zip(
        fresh.state_dict().items(), trained.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name


def test_a_checkpoint_trained_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    # another seed's tokenizer has as many tokens, so its weights would load without complaint
    from training.train import build, start_from

    size = Size()  # the tiny test size
    model, processor = build(0, size)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    same, same_processor = build(0, size)
    start_from(same, tmp_path, same_processor.tokenizer)
    other, other_processor = build(1, size)
    assert len(other_processor.tokenizer) == len(processor.tokenizer)
    with pytest.raises(SystemExit, match="--seed"):
        start_from(other, tmp_path, other_processor.tokenizer)


def test_a_larger_input_with_larger_patches_keeps_the_grid_and_the_image_tokens() -> None:
    """`--image-size 192 --patch-size 24`: each patch sees 1.5 times as many pixels of the
    picture, and the tower, the connector and the language model see as many patches and
    tokens as at 128 / 16; the read-outs' targets follow the size, and the card's command
    names it."""
    import argparse
    import random
    from dataclasses import replace

    import torch

    from training.data import make_example
    from training.train import SIZE, build, collate, model_card

    size = replace(SIZE, image_size=192, patch_size=24)
    model, processor = build(0, size)
    assert processor.image_seq_len == 16
    assert processor.image_processor.max_image_size == {"longest_edge": 192}
    rng = random.Random(3)
    examples = [make_example(rng, kind=kind) for kind in ("text", "color", "describe")]
    batch = collate(examples, processor, 4, size)
    assert tuple(batch["pixel_values"].shape[-2:]) == (192, 192)
    assert batch["patch_targets"].shape == (3, 2 + 4, 64)  # 8 x 8 patches of 24 px
    assert batch["token_targets"].shape == (3, 2 + 4, 16)
    # the same 8 x 8 cells as the 128 / 16 model's: the same characters under the same strips,
    # and shapes and colours but where a finer label map tips a cell's cover over the threshold
    plain = collate(examples, build(0)[1], 4)["patch_targets"]
    assert torch.equal(batch["patch_targets"][:, 2:], plain[:, 2:])
    assert (batch["patch_targets"][:, :2] == plain[:, :2]).float().mean() > 0.9
    keep = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "labels")
    out = model(**{k: batch[k] for k in keep})
    assert torch.isfinite(out.loss)
    args = argparse.Namespace(
        steps=10, batch_size=4, lr=1e-3, seed=0, char_columns=4, token_chars=True,
        glyph_weight=1.0, tower_steps=0, draw_max=384, attend_weight=0.1, colour_weight=0.3,
        read_weight=0.1, made_faces=0.0, pin_math=True, init_from=None, bf16=False, warmup=200,
        patch_weight=1.0, threads=2,
    )  # fmt: skip
    card = model_card(1, args, 1.0, 0.5, size)
    assert "--draw-max 384 " in card
    assert "--image-size 192 --patch-size 24" in card
    assert "--image-size" not in model_card(1, args, 1.0, 0.5, SIZE)


def test_a_deeper_or_wider_tower_is_built_and_named_on_the_card() -> None:
    import argparse

    from training.train import SIZE, build, command_line, model_card, model_size

    def sized(*flags: str) -> Size:
        return model_size(command_line().parse_args(["--out", "unused", *flags]))

    size = sized("--vision-layers", "6", "--vision-width", "256")
    assert (size.vision_layers, size.vision_hidden, size.vision_heads) == (6, 256, 8)
    assert sized() == SIZE
    with pytest.raises(SystemExit, match="multiple of 32"):
        sized("--vision-width", "200")
    model, _ = build(0, size)
    tower = model.model.vision_model
    assert len(tower.encoder.layers) == 6
    assert tower.config.hidden_size == 256 and tower.config.num_attention_heads == 8
    assert model.model.connector.modality_projection.proj.in_features == 256 * 4
    assert len(build(0)[0].model.vision_model.encoder.layers) == SIZE.vision_layers
    args = argparse.Namespace(
        steps=10, batch_size=4, lr=1e-3, seed=0, char_columns=4, token_chars=True,
        glyph_weight=1.0, tower_steps=0, draw_max=256, attend_weight=0.1, colour_weight=0.3,
        read_weight=0.1, made_faces=0.0, real_faces=0.3, char_slots=False, pin_math=True,
        init_from=None,
        bf16=False, warmup=200, patch_weight=1.0, threads=2,
    )  # fmt: skip
    card = model_card(1, args, 1.0, 0.5, size)
    assert "--vision-layers 6 --vision-width 256" in card and "--real-faces 0.3" in card
    assert "matplotlib" in card
    assert "--vision-layers" not in model_card(1, args, 1.0, 0.5, SIZE)
    assert "--vision-width" not in model_card(1, args, 1.0, 0.5, SIZE)


def test_a_deeper_language_model_is_built_and_named_on_the_card() -> None:

    from training.train import SIZE, build, command_line, model_card, model_size

    size = model_size(command_line().parse_args(["--out", "unused", "--text-layers", "4"]))
    assert size.layers == 4 and size.layers != SIZE.layers
    assert (size.hidden, size.vision_layers) == (SIZE.hidden, SIZE.vision_layers)
    model, _ = build(0, size)
    assert len(model.model.text_model.layers) == 4
    assert model.config.text_config.num_hidden_layers == 4
    assert len(build(0)[0].model.text_model.layers) == SIZE.layers
    args = card_args()
    assert "--text-layers 4" in model_card(1, args, 1.0, 0.5, size)
    assert "--text-layers" not in model_card(1, args, 1.0, 0.5, SIZE)


def test_a_narrower_language_model_mlp_is_built_and_named_on_the_card() -> None:
    from training.train import SIZE, build, command_line, model_card, model_size

    size = model_size(command_line().parse_args(["--out", "unused", "--text-mlp", "256"]))
    assert size.text_mlp == 256 and (size.hidden, size.layers) == (SIZE.hidden, SIZE.layers)
    model, _ = build(0, size)
    assert model.config.text_config.intermediate_size == 256
    assert all(layer.mlp.up_proj.out_features == 256 for layer in model.model.text_model.layers)
    # without the flag, every shipped run's width: twice the hidden width
    assert build(0)[0].config.text_config.intermediate_size == 2 * SIZE.hidden
    args = card_args()
    assert "--text-mlp 256" in model_card(1, args, 1.0, 0.5, size)
    assert "--text-mlp" not in model_card(1, args, 1.0, 0.5, SIZE)


def test_the_data_worker_draws_at_the_lowest_priority() -> None:
    """Batches are drawn in a worker process beside the step's two threads; at equal priority
    it stalls them, so `background` (the loader's worker_init_fn) lowers it to the lowest."""
    import multiprocessing
    import os

    from training.train import background

    def child(queue: multiprocessing.Queue[int]) -> None:
        background(0)
        queue.put(os.nice(0))

    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[int] = context.Queue()
    worker = context.Process(target=child, args=(queue,))
    worker.start()
    worker.join(timeout=30)
    assert queue.get(timeout=5) == 19
    assert os.nice(0) != 19  # the test's own process keeps its priority


def test_both_training_loops_draw_their_batches_in_background_workers() -> None:
    from training.train import Batches, background, batch_loader

    batches = Batches(None, 0, 2, 0, 1, 1)
    loader = batch_loader(batches, 1)
    assert loader.worker_init_fn is background
    assert loader.num_workers == 1 and loader.prefetch_factor == 4
    assert batch_loader(batches, 0).num_workers == 0


def test_the_reading_summary_splits_misreadings_by_kind_and_glyph_width() -> None:
    from training.evaluate import reading_summary

    rows = [
        {"printed": "373", "got": 'The text says "33".', "width": 8.0, "squeeze": 3.0},  # dropped
        {"printed": "58", "got": '"59"', "width": 12.0, "squeeze": 1.0},  # 8 read as 9
        {"printed": "GO", "got": 'The text says "GO".', "width": 20.0, "squeeze": 1.1},
        {"printed": "CAT", "got": '"CAR"', "width": 30.0, "squeeze": 1.5},  # T read as R
        {"printed": "SUN", "got": "There is no text.", "width": 18.0, "squeeze": 1.2},  # none
    ]
    for row, kind in zip(rows, ("wide", "square", "square", "tall", "wide"), strict=True):
        row["orientation"] = kind
    report = reading_summary(rows)
    assert report["all"] == {"n": 5, "read": 20.0}
    assert report["numbers"] == {"n": 2, "read": 0.0}
    assert report["words"] == {"n": 3, "read": 33.3}
    assert report["by_glyph_width"] == {
        "0-10px": {"n": 1, "read": 0.0},
        "10-16px": {"n": 1, "read": 0.0},
        "16-25px": {"n": 2, "read": 50.0},
        ">=25px": {"n": 1, "read": 0.0},
    }
    assert report["numbers_by_glyph_width"] == {
        "0-10px": {"n": 1, "read": 0.0},
        "10-16px": {"n": 1, "read": 0.0},
        "16-25px": {"n": 0, "read": None},
        ">=25px": {"n": 0, "read": None},
    }
    assert report["words_by_glyph_width"]["16-25px"] == {"n": 2, "read": 50.0}
    assert report["words_by_glyph_width"][">=25px"] == {"n": 1, "read": 0.0}
    assert report["by_squeeze"] == {
        "1-1.3": {"n": 3, "read": 33.3},
        "1.3-2": {"n": 1, "read": 0.0},
        ">=2": {"n": 1, "read": 0.0},
    }
    assert report["by_orientation"] == {
        "wide": {"n": 2, "read": 0.0},
        "square": {"n": 2, "read": 50.0},
        "tall": {"n": 1, "read": 0.0},
    }
    assert report["misread"] == 4 and report["wrong_length"] == 2
    assert report["confused"] == {"8->9": 1, "T->R": 1}
    assert reading_summary([])["all"] == {"n": 0, "read": None}


def test_the_face_diagnostic_prints_each_way_it_names_and_counts_characters_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from training import evaluate, world

    bitmap_faces = 0
    face = world._bitmap_face

    def counted() -> Any:
        nonlocal bitmap_faces
        bitmap_faces += 1
        return face()

    monkeypatch.setattr(world, "_bitmap_face", counted)
    printed_in_bitmap: dict[str, int] = {}
    for name, (style, bitmap) in evaluate.FACES.items():
        bitmap_faces = 0
        drawn = list(
            evaluate.with_text(random.Random(f"faces:{name}"), style, 4, bitmap_face=bitmap)
        )
        assert len(drawn) == 4 and all(text for _, text in drawn)
        printed_in_bitmap[name] = bitmap_faces
    # every text of the two bitmap ways in that face, none of the training face's
    assert printed_in_bitmap == {
        "training face": 0,
        "bitmap face, the training's way": 4,
        "bitmap face, the different set's way": 4,
    }

    rows = [
        {"printed": "306", "got": 'The text says "3006".', "width": 30.0, "squeeze": 1.0},
        {"printed": "GOAL", "got": '"GOAT"', "width": 20.0, "squeeze": 1.0},
        {"printed": "52", "got": '"52"', "width": 20.0, "squeeze": 1.0},
    ]
    report = evaluate.face_summary(rows)
    assert report["all"] == {"n": 3, "read": 33.3}
    # 3, 0 in place of 306 (the doubled 0 shifts the 6); G, O, A of GOAL; both of 52
    assert report["characters"] == round(100 * 7 / 9, 1)
    assert report["wrong_length"] == 1
    assert evaluate.face_summary([])["characters"] is None


def test_a_two_image_mistake_is_told_apart_by_whether_only_the_quoted_text_is_wrong() -> None:
    from training.evaluate import pair_mistake

    want = (
        'The first image shows a red circle. The text says "GO". The second image shows a blue '
        "star and a green square."
    )
    assert pair_mistake(want.upper() + "  ", want) is None  # case, spacing, final stop ignored
    assert pair_mistake(want.replace('"GO"', '"GOT"'), want) == "text"
    assert pair_mistake(want.replace("blue star", "blue triangle"), want) == "scene"
    # text said where there is none, or none said where there is: the scene, not the reading
    assert pair_mistake(want.replace(' The text says "GO".', ""), want) == "scene"
    both = want.replace('"GO"', '"GOT"').replace("red circle", "red square")
    assert pair_mistake(both, want) == "scene"


def test_a_wrong_two_image_answer_names_the_half_that_is_wrong() -> None:
    from training.evaluate import wrong_halves

    want = (
        'The first image shows a red circle. The text says "GO". The second image shows a blue '
        "star."
    )
    assert wrong_halves(want.replace("red circle", "red square"), want) == "first"
    assert wrong_halves(want.replace("blue star", "blue square"), want) == "second"
    assert wrong_halves(want.replace('"GO"', '"GOT"').replace("blue", "green"), want) == "both"
    # a text read in the first half is the first half's, though the second half ends the answer
    assert wrong_halves(want.replace('"GO"', '"GOT"'), want) == "first"
    # an answer about one image only cannot be split into halves
    assert wrong_halves('A red circle. The text says "GO".', want) == "unparsed"


def test_a_descriptions_shapes_are_scored_apart_from_its_text() -> None:
    from training.evaluate import named_items, scene_mistake

    scene = world.Scene(
        (world.Item("circle", "red"), world.Item("star", "blue")), "AN A", 200, 100, "plain"
    )
    want = world.describe(scene)
    assert named_items(want) == [("red", "circle"), ("blue", "star")]  # "AN A" is not an item
    assert scene_mistake(want.replace('"AN A"', '"A"'), scene) is None  # a misread text aside
    assert scene_mistake("A red circle.", scene) == "count"
    assert scene_mistake("A blue star and a red circle.", scene) == "order"
    assert scene_mistake("A red square and a blue star.", scene) == "shape"
    assert scene_mistake("A red circle and an orange star.", scene) == "colour"
    assert scene_mistake("A red circle and an orange triangle.", scene) == "shape and colour"


def test_the_scene_summary_splits_descriptions_by_count_size_and_squeeze() -> None:
    from training.evaluate import scene_summary

    def row(
        mistake: str | None, count: int, side: float, squeeze: float, file: str = "png"
    ) -> dict[str, object]:
        confused = ["triangle->star"] if mistake == "shape" else []
        return {
            "mistake": mistake,
            "count": count,
            "side": side,
            "squeeze": squeeze,
            "confused": confused,
            "text_presence_wrong": mistake == "count",
            "rounded": mistake == "shape",
            "proportions": False,
            "blurred": mistake == "count",
            "file": file,
        }

    rows = [row(None, 1, 40.0, 1.0), row("shape", 3, 10.0, 2.5), row("count", 3, 15.0, 1.5, "gif")]
    report = scene_summary([*rows, row(None, 2, 25.0, 1.2, "gif")])
    assert report["all"] == {"n": 4, "right": 50.0}
    assert report["by_count"][3] == {"n": 2, "right": 0.0}
    assert report["by_smallest_side_px"] == {
        "0-12": {"n": 1, "right": 0.0},
        "12-20": {"n": 1, "right": 0.0},
        "20-32": {"n": 1, "right": 100.0},
        ">=32": {"n": 1, "right": 100.0},
    }
    assert report["by_squeeze"][">=2"] == {"n": 1, "right": 0.0}
    assert report["mistakes"] == {"shape": 1, "count": 1}
    assert report["text_presence_wrong"] == 1
    assert report["shapes_confused"] == {"triangle->star": 1}
    assert report["by_file"]["gif"] == {"n": 2, "right": 50.0}
    assert report["by_file"]["webp"] == {"n": 0, "right": None}
    assert report["by_drawing"]["as the training draws"] == {"n": 3, "right": 66.7}
    assert report["by_drawing"]["a square rounded"] == {"n": 1, "right": 0.0}
    assert report["by_drawing"]["blurred"] == {"n": 1, "right": 0.0}


def test_a_drawing_says_which_shapes_the_training_routine_would_not_draw_so() -> None:
    # the marks are read off the draws the routine makes anyway (the drawings are the same, byte
    # for byte, as before they were kept), and only "alt" ever marks a shape
    marked: Counter[str] = Counter()
    squares = 0
    for k in range(300):
        for style in ("train", "alt"):
            scene = world.sample_scene(random.Random(k), text_rate=0.0)
            _, labels = world.render_labelled(scene, random.Random(k), style)
            assert len(labels.shape_marks) == len(scene.items)
            for item, marks in zip(scene.items, labels.shape_marks, strict=True):
                if style == "train":
                    assert marks == ()
                marked.update(f"{item.shape}:{m}" for m in marks)
                if "rounded" in marks:
                    assert item.shape == "square"
                squares += style == "alt" and item.shape == "square"
    # about half the different set's squares rounded; half its stretches past the training's
    assert 0.35 < marked["square:rounded"] / squares < 0.65
    for shape in world.SHAPES:
        assert marked[f"{shape}:proportions"] > 20


def test_the_smallest_shape_is_measured_at_the_models_input() -> None:
    from training.evaluate import smallest_side

    example = make_example(random.Random(3), "train", "describe")
    items = example.labels[0].items
    side = smallest_side(example, 128)
    boxes = [items.point(lambda v, k=k: 255 if v == k else 0).getbbox() for k in (1, 2, 3)]
    found = [b for b in boxes if b]
    assert len(found) == len(example.scenes[0].items)
    assert 0 < side <= 128
    # twice the input, twice the side
    assert smallest_side(example, 256) == pytest.approx(2 * side)


def test_a_description_becomes_a_row_of_the_scene_summary() -> None:
    from training.evaluate import scene_row

    rng = random.Random(5)
    example = make_example(rng, "train", "describe")
    while len(example.scenes[0].items) < 2 or example.scenes[0].text:
        example = make_example(rng, "train", "describe")
    scene = example.scenes[0]
    right = scene_row(example, example.answer, 128)
    assert right["mistake"] is None and right["confused"] == []
    assert right["count"] == len(scene.items) and not right["text_presence_wrong"]
    assert right["squeeze"] >= 1.0
    first = scene.items[0]
    other = next(s for s in world.SHAPES if s != first.shape)
    wrong = example.answer.replace(f"{first.color} {first.shape}", f"{first.color} {other}", 1)
    row = scene_row(example, wrong + ' The text says "HI".', 128)
    assert row["mistake"] == "shape" and row["confused"][0] == f"{first.shape}->{other}"
    assert row["text_presence_wrong"]
    assert not (row["rounded"] or row["proportions"])  # the training routine's drawing
    alt = make_example(random.Random(6), "alt", "describe")
    while not alt.labels[0].shape_marks[0]:
        alt = make_example(rng, "alt", "describe")
    item, marks = alt.scenes[0].items[0], alt.labels[0].shape_marks[0]
    other = next(s for s in world.SHAPES if s != item.shape)
    got = alt.answer.replace(f"{item.color} {item.shape}", f"{item.color} {other}", 1)
    row = scene_row(alt, got, 160)
    assert row["confused"][0] == f"{item.shape}->{other}" + "".join(f" ({m})" for m in marks)
    assert row["rounded"] == ("rounded" in marks) and row["proportions"] == ("proportions" in marks)


def test_a_probe_says_how_long_the_run_would_take_and_what_fits_the_hour() -> None:
    # the shipped recipe on the Intel Xeon of run 30, and on the AVX2-only AMD EPYC of run 31
    assert run_estimate(5500, 1.6) == "5500 steps would take about 57 minutes here"
    assert run_estimate(5500, 0.82) == (
        "5500 steps would take about 112 minutes here, over 60: about 2952 steps fit"
    )
    assert run_estimate(2800, 0.92, budget=45) == (
        "2800 steps would take about 51 minutes here, over 45: about 2484 steps fit"
    )


def test_the_question_mix_can_be_set_and_the_batches_and_the_card_follow_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import argparse

    from training.train import SIZE, model_card, parse_mix

    assert parse_mix("describe=0.3,pair=0.2") == {**TRAIN_MIX, "describe": 0.3, "pair": 0.2}
    for bad in ("colour=0.2", "describe=x", "pair=1.0", "describe=-0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_mix(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="single-image"):
        parse_mix("describe=0,count=0,color=0,exists=0,text=0")

    def drawn(mix: dict[world.QuestionType, float] | None) -> list[list[str]]:
        extra = {} if mix is None else {"mix": mix}
        batches = drawn_chats(
            monkeypatch, seed=0, batch_size=8, start=0, stop=60, columns=1, **extra
        )
        return [[e.kind for e in examples] for examples in batches]

    # the command line's mix is the one the run's batches are drawn with
    from training.train import command_line, run_batches

    args = command_line().parse_args(["--out", "x", "--mix", "text=0.4,pair=0.3"])
    assert run_batches(args, None, SIZE, 0, 10).mix == {**TRAIN_MIX, "text": 0.4, "pair": 0.3}
    assert (
        run_batches(command_line().parse_args(["--out", "x"]), None, SIZE, 0, 10).mix == TRAIN_MIX
    )
    # unset, the mix is the one the shipped runs were trained on: the same batches as before
    default = drawn(None)
    assert drawn(dict(TRAIN_MIX)) == default
    assert {k for b in default for k in b} == set(TRAIN_MIX)
    assert {
        k for b in drawn(parse_mix("describe=0,count=0,color=0,exists=0,pair=0")) for k in b
    } == {"text"}
    pairs = sum(b[0] == "pair" for b in drawn(parse_mix("pair=0.9")))
    assert pairs > 40 and pairs > 3 * sum(b[0] == "pair" for b in default)

    args = argparse.Namespace(
        steps=10, batch_size=4, lr=1e-3, seed=0, char_columns=4, token_chars=True,
        glyph_weight=1.0, tower_steps=0, draw_max=256, attend_weight=0.1, colour_weight=0.3,
        read_weight=0.1, made_faces=0.0, real_faces=0.0, char_slots=False, pin_math=True,
        init_from=None, bf16=False, warmup=200, patch_weight=1.0, threads=2,
        mix=parse_mix("describe=0.3,pair=0.15"),
    )  # fmt: skip
    card = model_card(1, args, 1.0, 0.5, SIZE)
    assert "--mix describe=0.3,count=0.1,color=0.17,exists=0.17,text=0.18,pair=0.15" in card
    args.mix = dict(TRAIN_MIX)
    assert "--mix" not in model_card(1, args, 1.0, 0.5, SIZE)


def test_the_shapes_variety_can_be_widened_and_the_batches_and_the_card_follow_it() -> None:

    from training.train import SIZE, command_line, model_card, run_batches

    def drawn(variety: world.ShapeVariety, k: int) -> tuple[Image.Image, world.Labels]:
        scene = world.Scene((world.Item("square", "red"),), None, 200, 200, "plain")
        return world.render_labelled(scene, random.Random(k), "train", shapes=variety)

    # unset, the shipped variety: the same drawings as before
    for k in range(20):
        a, b = drawn(world.TRAINING_SHAPES, k), drawn(world.ShapeVariety(), k)
        assert a[0].tobytes() == b[0].tobytes() and a[1].shape_marks == [()]
    # every square rounded: its box's corners are background, and it says so
    for k in range(20):
        image, labels = drawn(world.ShapeVariety(rounded=1.0), k)
        assert labels.shape_marks[0][0] == "rounded"
        x0, y0, x1, y1 = labels.items.getbbox() or (0, 0, 0, 0)
        assert labels.items.getpixel((x0, y0)) == 0 and labels.items.getpixel((x1 - 1, y1 - 1)) == 0
        assert labels.items.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == 1
        centre = image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
        assert max(abs(a - b) for a, b in zip(centre, world.COLORS["red"], strict=True)) < 16
    # a wider spread: stretched past the shipped training's proportions now and then
    past = sum(
        "proportions" in drawn(world.ShapeVariety(spread=0.35), k)[1].shape_marks[0]
        for k in range(100)
    )
    assert 40 < past < 80

    args = command_line().parse_args(["--out", "x"])
    assert run_batches(args, None, SIZE, 0, 10).shapes == world.TRAINING_SHAPES
    args = command_line().parse_args(
        ["--out", "x", "--shape-spread", "0.35", "--rounded-squares", "0.3"]
    )
    assert run_batches(args, None, SIZE, 0, 10).shapes == world.ShapeVariety(0.35, 0.3)
    args = card_args()
    assert "--shape-spread" not in model_card(1, args, 1.0, 0.5, SIZE)
    assert "rounded corners" not in model_card(1, args, 1.0, 0.5, SIZE)
    args.shape_spread, args.rounded_squares = 0.35, 0.3
    card = model_card(1, args, 1.0, 0.5, SIZE)
    assert "--shape-spread 0.35 --rounded-squares 0.3" in card
    assert "proportions vary by up to 35% either way" in card
    assert "30% of its squares have rounded corners" in card


def test_the_vision_towers_eager_attention_is_the_same_function_and_named_on_the_card(
    small_parts: tuple[object, object],
) -> None:
    """`--vision-attention eager`: two matrix products and a softmax instead of PyTorch's fused
    kernel, the same attention to rounding; a run that trained so says so on its card."""
    import torch
    from transformers import AutoModelForImageTextToText

    from training.train import SIZE, command_line, model_card

    config, processor = small_parts
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    batch = collate([make_example(random.Random(3), kind="describe")], processor)
    inputs = split_aids(batch)[0]
    with torch.no_grad():
        fused = model(**inputs).logits
        model.model.vision_model.config._attn_implementation = "eager"
        eager = model(**inputs).logits
    assert torch.allclose(fused, eager, atol=1e-4)
    args = command_line().parse_args(["--out", "x", "--steps", "10"])
    assert "--vision-attention" not in model_card(1, args, 1.0, 0.5, SIZE)
    args = command_line().parse_args(["--out", "x", "--steps", "10", "--vision-attention", "eager"])
    assert " --vision-attention eager" in model_card(1, args, 1.0, 0.5, SIZE)


def test_a_fingerprint_names_the_first_module_whose_own_arithmetic_parts_two_runs(
    small_parts: tuple[object, object],
) -> None:
    """`train.py --fingerprint`: two machines' first steps, compared module by module
    (`training.fingerprint`), to find which library sums differently on another CPU vendor."""
    import json

    import torch
    from transformers import AutoModelForImageTextToText

    from training import fingerprint

    config, processor = small_parts
    examples = [make_example(random.Random(4), kind=k) for k in ("describe", "text")]
    batch = collate(examples, processor)

    def first_step(nudge: float) -> dict[str, object]:
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config)
        with torch.no_grad():  # as another machine's matrix product might sum: a last bit off
            model.model.connector.modality_projection.proj.weight[0, 0] += nudge
        recorder = fingerprint.Recorder()
        recorder.attach(model.named_modules())
        recorder.active = True
        out = model(**split_aids(batch)[0])
        out.loss.backward()
        recorder.detach()
        grads = fingerprint.gradients(model.named_parameters())
        written = fingerprint.fingerprint(batch, recorder, out.loss, grads, "test")
        return json.loads(json.dumps(written))  # as the file is read back

    a, again, nudged = first_step(0.0), first_step(0.0), first_step(1e-6)
    assert a == again
    assert fingerprint.parting(a, again)[2:4] == [
        f"the batches are the same ({len(batch)} tensors)",
        f"every module's output is the same ({len(a['modules'])} calls)",  # type: ignore[arg-type]
    ]
    lines = fingerprint.parting(a, nudged)
    parted = [line for line in lines if line.startswith("call ")]
    assert len(parted) == 1
    assert (
        "model.connector.modality_projection.proj (Linear): the same inputs, another output"
        in (parted[0])
    )
    gradients = [line for line in lines if line.startswith("gradients: ")]
    assert len(gradients) == 1 and not gradients[0].startswith("gradients: 0 "), gradients
    redrawn = {**a, "batch": {**a["batch"], "pixel_values": "0" * 16}}  # type: ignore[dict-item]
    assert fingerprint.parting(a, redrawn)[-1] == (
        "the batches differ (pixel_values): the drawing parts them"
    )


def test_a_fingerprint_is_taken_of_a_short_run_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from training import train

    monkeypatch.setattr(sys, "argv", ["train", "--out", "x", "--fingerprint", "f.json"])
    with pytest.raises(SystemExit):
        train.main()
    for step in ("0", "4"):  # the step whose modules it digests must be one the run takes
        argv = ["train", "--out", "x", "--stop-after", "3", "--fingerprint", "f.json"]
        monkeypatch.setattr(sys, "argv", [*argv, "--fingerprint-step", step])
        with pytest.raises(SystemExit):
            train.main()


def test_a_fingerprints_trail_names_the_first_step_whose_loss_or_weights_part() -> None:
    """Runs that agree on the first step may part later (`MKL_CBWR=COMPATIBLE`: an Intel Xeon
    and an AMD EPYC the same at step 1, not at step 50): each step's loss and weights after
    its update say at which step, for `--fingerprint-step` to name the module there."""
    import torch

    from training import fingerprint

    def trail(nudge_at: int | None, what: str) -> list[dict[str, object]]:
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 2)
        steps = []
        for step in range(1, 6):
            with torch.no_grad():
                layer.weight.mul_(0.9)
                if step == nudge_at and what == "weights":
                    layer.weight[0, 0] += 1e-6
            loss = layer.weight.sum().item() + (1e-9 if step == nudge_at and what == "loss" else 0)
            weights = fingerprint.weights(layer.named_parameters())
            steps.append({"step": step, "loss": repr(loss), "weights": weights})
        return steps

    same = trail(None, "")
    assert fingerprint.trail_parting(same, trail(None, "")) == (
        "every step's loss and weights are the same (5 steps)"
    )
    assert fingerprint.trail_parting(same, trail(3, "weights")).startswith(
        "the runs part at step 3, its loss and weights (every step before it the same)"
    )
    assert fingerprint.trail_parting(same, trail(4, "loss")).startswith(
        "the runs part at step 4, its loss (every step"
    )
    a = {"cpu": "a", "batch": {}, "modules": [], "loss": "1", "gradients": {}, "trail": same}
    b = {**a, "step": 2, "trail": trail(2, "weights")}
    lines = fingerprint.parting(a, b)
    assert lines[2].startswith("the runs part at step 2")
    assert lines[3] == "a recorded step 1, b step 2: no modules"


def test_bucketed_batches_hold_the_same_chats_sorted_by_length_and_pad_less(
    small_parts: tuple[object, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train.py --bucket k`: the chats of k steps in a row, sorted by length and cut into k
    batches again; a run stopped or started inside a group draws its steps the same."""
    import training.train as train_module

    _, processor = small_parts
    reaches_batches_and_card("--bucket", 4)

    def chats(**args: int) -> dict[int, list[Example]]:
        drawn = train_module.Batches(processor, 0, 8, columns=1, draw_max=64, **args)  # type: ignore[arg-type]
        return dict(drawn.chats(processor))

    def said(batch: list[Example]) -> list[tuple[str, ...]]:
        return sorted((e.kind, e.question, *(a for _, a in e.turns())) for e in batch)

    plain, bucketed = chats(start=0, stop=8), chats(start=0, stop=8, bucket=4)
    assert list(bucketed) == list(range(8))
    for group in (range(0, 4), range(4, 8)):
        assert sorted(t for s in group for t in said(plain[s])) == sorted(
            t for s in group for t in said(bucketed[s])
        )
    assert any(said(plain[s]) != said(bucketed[s]) for s in range(8))

    def lengths(batch: list[Example]) -> list[int]:
        return [train_module.chat_length(e, processor) for e in batch]

    for group in (range(0, 4), range(4, 8)):  # a group's batches are slices of one sorted list
        spans = sorted((min(lengths(bucketed[s])), max(lengths(bucketed[s]))) for s in group)
        assert all(hi <= lo for (_, hi), (lo, _) in itertools.pairwise(spans)), spans
    padded = {
        name: sum(len(b) * max(lengths(b)) - sum(lengths(b)) for b in run.values())
        for name, run in (("plain", plain), ("bucketed", bucketed))
    }
    assert padded["bucketed"] < padded["plain"], padded
    middle = chats(start=2, stop=6, bucket=4)
    assert list(middle) == [2, 3, 4, 5]
    assert all(said(middle[s]) == said(bucketed[s]) for s in middle)
