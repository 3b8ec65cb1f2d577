"""Typefaces made up per word: every printable character drawn, reproducibly, where its box says."""

from __future__ import annotations

import itertools
import random

import numpy as np

from training import typefaces, world


def test_every_character_the_world_prints_has_strokes() -> None:
    printed = {char for word in world.WORDS for char in word} | set("0123456789")
    assert printed <= set(typefaces.SKELETONS)


def test_a_seed_gives_one_face_and_another_seed_another() -> None:
    first, spans = typefaces.glyphs("GAMMA", random.Random(5), 24)
    again, spans_again = typefaces.glyphs("GAMMA", random.Random(5), 24)
    other, _ = typefaces.glyphs("GAMMA", random.Random(6), 24)
    assert first.tobytes() == again.tobytes() and spans == spans_again
    assert first.tobytes() != other.tobytes()


def test_each_characters_span_holds_its_ink_left_to_right() -> None:
    for seed in range(30):
        rng = random.Random(seed)
        word = world.sample_text(rng)
        mask, spans = typefaces.glyphs(word, rng, rng.choice((6, 9, 24, 60)))
        ink = np.asarray(mask) > 0
        assert len(spans) == len(word)
        for (left, right), (next_left, _) in itertools.pairwise(spans):
            assert left < right <= next_left
        for left, right in spans:
            assert left >= 0 and right <= mask.width
            assert ink[:, int(left) : int(np.ceil(right)) + 1].any()


def test_a_face_with_capitals_a_few_pixels_tall_is_made_of_whole_pixels() -> None:
    mask, _ = typefaces.glyphs("HOTEL", random.Random(1), 7)
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert mask.height <= 7 + 2 * (2 + 7) + 1


def test_made_faces_off_draws_the_training_routine_exactly_as_before() -> None:
    scene = world.Scene((world.Item("star", "blue"),), "GO", 320, 240, "plain")
    before, labels = world.render_labelled(scene, random.Random(2))
    off, labels_off = world.render_labelled(scene, random.Random(2), made_faces=0.0)
    assert before.tobytes() == off.tobytes() and labels.chars == labels_off.chars
    made, labels_made = world.render_labelled(scene, random.Random(2), made_faces=1.0)
    assert made.tobytes() != before.tobytes()
    assert [char for char, _ in labels_made.chars] == ["G", "O"]
    for _, (left, top, right, bottom) in labels_made.chars:  # each box is where ink was put
        box = np.asarray(made.crop((int(left), int(top), int(right) + 1, int(bottom) + 1)))
        assert (np.abs(box.astype(int) - [15, 15, 15]).sum(axis=2) < 60).any() or (
            np.abs(box.astype(int) - [250, 250, 250]).sum(axis=2) < 60
        ).any()
