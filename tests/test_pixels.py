"""The training's cheaper drawing gives the very bytes the slower one gave (`training.pixels`,
`patches._cover`): a run's batches, and so its weights, do not change."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.training_draw import plain_cover
from training import patches, pixels, world
from training.data import make_chat, make_example
from training.train import SIZE, Batches, build, collate

# the shipped model's input: 160 px, 8 px patches, pixel-shuffled by 5
SHIPPED = replace(SIZE, image_size=160, patch_size=8, scale_factor=5)


@pytest.fixture(scope="module")
def processor() -> Any:
    return build(0, SHIPPED)[1]


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, key
            # bit for bit: the float32 pixels compared as their bytes
            bits = torch.int32 if x.dtype == torch.float32 else x.dtype
            assert torch.equal(x.view(bits), y.view(bits)), key
        else:
            assert x == y, key


def test_the_cheaper_pixels_are_the_processors_own_to_the_bit(processor: Any) -> None:
    rng = random.Random(3)
    images = [
        [Image.new("RGB", (32, 20), (200, 10, 30))],
        [make_example(rng, draw_max=256).images[0], make_example(rng, draw_max=256).images[0]],
        [Image.effect_noise((1120, 400), 60).convert("RGB")],
        [Image.linear_gradient("L").convert("RGB").resize((90, 256))],
    ]
    fast = pixels.SquarePixels(processor.image_processor)
    for kwargs in ({"return_tensors": "pt", "return_row_col_info": True}, {}):
        ours = fast(images, **kwargs)
        theirs = processor.image_processor(images, **kwargs)
        assert set(ours) == set(theirs)
        for key in ("pixel_values", "pixel_attention_mask"):
            x, y = np.asarray(ours[key]), np.asarray(theirs[key])
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes(), key
        # the second row has two images, the others one: the rest is padding, masked out
        assert np.asarray(ours["pixel_attention_mask"])[0, 1].sum() == 0
        assert np.asarray(ours["pixel_attention_mask"])[1, 1].all()
        if kwargs:
            assert ours["rows"] == theirs["rows"] and ours["cols"] == theirs["cols"]


def test_what_the_cheaper_pixels_do_not_reproduce_goes_to_the_processor(processor: Any) -> None:
    fast = pixels.SquarePixels(processor.image_processor)
    grey = [[Image.new("L", (50, 70), 90)]]  # not RGB: the processor converts it its own way
    assert torch.equal(
        fast(grey, return_tensors="pt")["pixel_values"],
        processor.image_processor(grey, return_tensors="pt")["pixel_values"],
    )
    split = replace_attr(processor.image_processor, do_image_splitting=True)
    with pytest.raises(ValueError, match="do_image_splitting"):
        pixels.SquarePixels(split)
    # a processor it cannot stand in for is used as it is
    other = replace_attr(processor, image_processor=split)
    assert pixels.square_inputs(other) is other
    assert pixels.square_inputs(None) is None


def replace_attr(inner: Any, **changes: Any) -> Any:
    import copy

    changed = copy.copy(inner)
    for k, v in changes.items():
        setattr(changed, k, v)
    return changed


def test_a_batch_collated_with_the_cheaper_pixels_is_the_same_batch(processor: Any) -> None:
    rng = random.Random(5)
    # single images, a pair beside them (the rows pad to two images), several turns
    examples = [make_chat(rng, k, draw_max=256, bitmap_face=0.32, text_rate=0.97)
                for k in ("describe", "pair", "text", "color", "count")]  # fmt: skip
    plain = collate(examples, processor, 4, SHIPPED, True)
    cheap = collate(examples, pixels.square_inputs(processor), 4, SHIPPED, True)
    _same(plain, cheap)
    # the copy shares everything but the image processor
    fast = pixels.square_inputs(processor)
    assert fast.tokenizer is processor.tokenizer
    assert isinstance(fast.image_processor, pixels.SquarePixels)
    assert not isinstance(processor.image_processor, pixels.SquarePixels)


def test_the_training_batches_are_drawn_with_the_cheaper_pixels_and_are_unchanged(
    processor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def batches() -> list[dict[str, torch.Tensor]]:
        return list(Batches(processor, 0, 6, 0, 3, 4, 256, size=SHIPPED, bitmap_face=0.32,
                            slots=True, text_rate=0.97))  # fmt: skip

    cheap = batches()
    monkeypatch.setattr(pixels, "square_inputs", lambda p: p)
    plain = batches()
    assert len(cheap) == len(plain) == 3
    for a, b in zip(cheap, plain, strict=True):
        _same(a, b)


def test_a_shapes_cover_of_each_patch_is_its_pixels_mean_to_the_bit() -> None:
    rng = random.Random(7)
    checked = 0
    for _ in range(60):
        example = make_example(rng, draw_max=256)
        for scene, labels in zip(example.scenes, example.labels, strict=True):
            for size, patch in ((160, 8), (160, 40), (128, 16), (128, 32), (96, 32)):
                for count in range(1, len(scene.items) + 1):
                    ours = patches._cover(labels, count, size, patch)
                    plain = plain_cover(labels, count, size, patch)
                    assert ours.dtype == plain.dtype and ours.shape == plain.shape
                    assert ours.tobytes() == plain.tobytes()
                    checked += 1
    assert checked > 200
    # a shape that covers all of some patches and part of others
    items = Image.new("L", (160, 160), 0)
    items.paste(1, (0, 0, 12, 160))
    cover = patches._cover(world.Labels(items, []), 1, 160, 8)
    grid = cover.reshape(20, 20)
    assert (grid[:, 0] == 1.0).all() and (grid[:, 1] == 0.5).all() and (grid[:, 2:] == 0).all()


def test_a_timed_run_can_draw_its_batches_first_and_computes_the_same(tmp_path: Path) -> None:
    """`--draw-first` (benchmarks.training_draw --steps): every batch drawn before the clock
    starts, so that the steps are timed with the drawing free; the run itself is the same."""
    root = Path(__file__).parents[1]
    small = ["--batch-size", "2", "--image-size", "32", "--patch-size", "8", "--scale-factor",
             "2", "--vision-layers", "1", "--vision-width", "32", "--text-layers", "1",
             "--steps", "100", "--stop-after", "50", "--workers", "0"]  # fmt: skip

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "training.train", *small, "--out", str(out), *extra],
            cwd=root, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    plain, first = run(tmp_path / "plain"), run(tmp_path / "first", "--draw-first")
    assert plain.returncode == first.returncode == 0, first.stderr[-2000:]
    logs = [json.loads((tmp_path / n / "training_log.json").read_text())["log"]
            for n in ("plain", "first")]  # fmt: skip
    assert [{k: v for k, v in e.items() if k != "minutes"} for e in logs[0]] == [
        {k: v for k, v in e.items() if k != "minutes"} for e in logs[1]
    ]
    # a whole run would hold every batch in memory: refused
    whole = subprocess.run(
        [sys.executable, "-m", "training.train", "--out", str(tmp_path / "w"), "--draw-first"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert whole.returncode == 2 and "--stop-after" in whole.stderr
