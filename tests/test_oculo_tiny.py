"""The shipped default model, oculo-tiny: a plain Idefics3 checkpoint that really sees.

Its answers are checked on freshly drawn images (seeds the training never uses), in both drawing
routines, through oculo's own media code and engine; and end to end, as a newcomer meets it:
`oculo serve` with no arguments, the seed's request shape, a picture of a blue star and "GO".
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import API_KEY, free_port

from oculo.models import DEFAULT_MODEL_ID, PACKAGED, default_model_spec
from training import world
from training.data import make_example
from training.evaluate import answer, through_server_media

# Floors well under what the shipped model measures on its card (100 questions per type, held-out /
# different, run 62: describe 98 / 96%, count 100 / 99%, colour 98 / 99%, yes/no 98 / 98%, text
# 99 / 89%): a few questions per type here, and another CPU may break a near-tie in greedy decoding
# differently. Two-image descriptions (90 / 86%) have no floor; reading words on images that have
# them, and looking a shape up, have their own tests below.
FLOOR = {"describe": 0.25, "count": 0.8, "color": 0.75, "exists": 0.75, "text": 0.15}
PER_TYPE = 12


def test_the_checkpoint_is_a_plain_idefics3_folder() -> None:
    config = json.loads((PACKAGED / "config.json").read_text())
    assert config["model_type"] == "idefics3"
    weights = list(PACKAGED.glob("*.safetensors"))
    assert len(weights) == 1 and weights[0].stat().st_size < 50 * 2**20
    card = (PACKAGED / "README.md").read_text()
    assert "## Evaluation" in card and "training.train" in card

    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(PACKAGED)
    model = AutoModelForImageTextToText.from_pretrained(PACKAGED)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert type(processor).__name__ == "Idefics3Processor"


@pytest.fixture(scope="module")
def engine() -> Any:
    from oculo.engines.transformers import TransformersEngine

    spec = default_model_spec()
    engine = TransformersEngine(Path(spec.path), model_id=spec.id)
    yield engine
    asyncio.run(engine.close())


@pytest.mark.parametrize("style", ["train", "alt"])
def test_answers_about_fresh_images(engine: Any, style: world.Style) -> None:
    rng = random.Random(f"tests:{style}")
    misses: list[str] = []
    for kind in FLOOR:
        hits = 0
        for _ in range(PER_TYPE):
            example = make_example(rng, style, kind)
            images = through_server_media(example, rng, style)
            got = asyncio.run(answer(engine, example, images))
            if world.normalize(got) == world.normalize(example.answer):
                hits += 1
            else:
                misses.append(f"{kind}: {example.question!r} want {example.answer!r} got {got!r}")
        assert hits >= FLOOR[kind] * PER_TYPE, (kind, hits, misses[-5:])


def test_it_reads_printed_words_and_numbers_on_fresh_images(engine: Any) -> None:
    """On images drawn by the training routine that have a word or number printed on them, the
    shipped model reads 98.4% whole and 98.7% of the characters (its card, run 62; 96.5% of 300
    on another seed); the model shipped before run 12 read none of the numbers and a fifth of the
    words, by guessing a common word."""
    rng = random.Random("tests:reading")
    right, asked, misses = 0, 0, []
    while asked < PER_TYPE:
        example = make_example(rng, "train", "text")
        if example.scenes[0].text is None:
            continue
        asked += 1
        got = asyncio.run(answer(engine, example, through_server_media(example, rng, "train")))
        if world.normalize(got) == world.normalize(example.answer):
            right += 1
        else:
            misses.append(f"want {example.answer!r} got {got!r}")
    assert right >= 5, (right, misses)


def blue_star_go() -> str:
    scene = world.Scene((world.Item("star", "blue"),), "GO", 640, 480, "plain")
    image = world.render(scene, random.Random("tests:blue-star"))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_oculo_serve_with_no_arguments_answers_the_seed_example(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "OCULO_API_KEYS": API_KEY}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "oculo.cli", "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        models = httpx.get(base + "/v1/models", headers=headers).json()["data"]
        assert [m["id"] for m in models] == [DEFAULT_MODEL_ID]
        # the seed's curl example, but for the base URL, the key, the model and the image
        body = {
            "model": DEFAULT_MODEL_ID,
            "messages": [
                {
                    "role": "system",
                    "content": "You are a helpful assistant that can answer questions about the "
                    "image.",
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": blue_star_go()}},
                        {"type": "text", "text": "What is in this image?"},
                    ],
                },
            ],
        }
        r = httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        # The issue wants "GO" read too: the shipped model answers 'A blue star. The text says
        # "GO".' on this drawing and on all 12 drawings of the scene (`training.evaluate
        # --seed-scene`; models before run 34 misread it on one to three, "920", "90"): what it
        # must get right here is that it sees a blue star, nothing of another shape or colour,
        # and some text. No temperature in the request, as in the seed's example: oculo-tiny's
        # default is greedy.
        described, _, said = text.partition("The text says")
        shapes = re.findall(rf"\b({'|'.join(world.COLORS)}) ({'|'.join(world.SHAPES)})", described)
        assert shapes and set(shapes) == {("blue", "star")} and said, text
        assert r.json()["usage"]["prompt_tokens"] > 1601  # a 640x480 image alone counts 1,601
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_the_shipped_model_looks_the_named_shape_up() -> None:
    """Asked each shape's colour on scenes of three shapes in three colours, a model that does not
    look the shape up names one colour for all three (the model shipped before the look-up loss
    did so on 38 of 40 scenes, and got 32% right); the shipped model (run 62) gets 99.4% right and
    never names one colour for all three, and answers 98.8% of the yes/no questions right, 50.4% of
    them "Yes.", on 120 scenes (`training.evaluate --lookups 120`)."""
    from training.evaluate import _plain_scene, lookups

    for seed in range(20):
        scene = _plain_scene(random.Random(seed))
        assert len({i.shape for i in scene.items}) == len({i.color for i in scene.items}) == 3
    report = asyncio.run(lookups(PACKAGED, 10, seed=3))
    assert report["scenes"] == 10
    # each a share of 30 colour questions, of 10 scenes, or of 20 yes/no questions
    for key, questions in (
        ("colour_right", 30),
        ("one_colour_for_all_three", 10),
        ("yes_no_right", 20),
        ("said_yes", 20),
    ):
        share = report[key] * questions
        assert 0 <= report[key] <= 1 and abs(share - round(share)) < 0.02, (key, report)
    # a yes/no answer that is neither yes nor no is wrong: right answers <= those said + not said
    assert report["yes_no_right"] <= 0.5 + min(report["said_yes"], 0.5)
    # here 29 of 30 colours right (the model before the item look-up: 83% on `--lookups 40`)
    assert report["colour_right"] >= 0.75 and report["one_colour_for_all_three"] <= 0.2, report
    # and it compares the colour asked with the one it finds: here 19 of 20 right, "Yes." to 9
    # (earlier models: 18 right and "Yes." to 12; 17 and 13; 12 and 18)
    assert report["yes_no_right"] >= 0.8 and report["said_yes"] <= 0.7, report


def test_the_reading_diagnostic_measures_the_shipped_model_on_both_sets() -> None:
    """`training.evaluate --reading N`: on the training routine the shipped model (run 62) reads
    95.3% of 300 texts whole (`--reading 300`: 97.7% of the words, 89.3% of the numbers; the model
    before the slot read-outs 77%, 87% and 50% of the same); on the different set's bitmap face
    88.0% (the models before run 32, which did not train on that face beside their own: 2%).
    Here 11 of 12 and 9."""
    from training.evaluate import reading

    report = asyncio.run(reading(PACKAGED, 12, seed=0))
    assert set(report) == {"held-out", "different"}
    for summary in report.values():
        assert summary["all"]["n"] == 12
        assert summary["numbers"]["n"] + summary["words"]["n"] == 12
        assert sum(b["n"] for b in summary["by_glyph_width"].values()) == 12
        assert sum(b["n"] for b in summary["by_squeeze"].values()) == 12
        for kind in ("numbers", "words"):
            split = summary[f"{kind}_by_glyph_width"].values()
            assert sum(b["n"] for b in split) == summary[kind]["n"]
        assert summary["wrong_length"] <= summary["misread"] <= 12
    assert report["held-out"]["all"]["read"] >= 50, report
    # it reads the bitmap face (fewer than 3 of 12 would be about 3 in 10^8 likely at its 88%)
    assert report["different"]["all"]["read"] >= 25, report


def test_the_placement_diagnostic_moves_the_word_and_keeps_the_scene() -> None:
    """`training.evaluate --placement N`: the same texts printed at five heights. The shipped
    model reads them only where every training picture prints them (`--placement 100`, run 62: 97
    of the held-out set's texts centred in the top band, 4 or none at the other four heights; of
    the different set's, 86 and 3 or none)."""
    from training.evaluate import PLACEMENTS, placement

    report = asyncio.run(placement(PACKAGED, 4, seed=0))
    assert set(report) == {"held-out", "different"}
    for summary in report.values():
        assert set(summary) == set(PLACEMENTS)
        assert all(row["n"] == 4 for row in summary.values())
    assert report["held-out"]["centred"]["read"] >= 50, report


def test_the_seed_scene_and_two_image_diagnostics_measure_the_shipped_model() -> None:
    """`training.evaluate --seed-scene`: the issue's picture in 12 drawings; the shipped model
    answers 'A blue star. The text says "GO".' to all 12.
    `--pairs N`: two-image descriptions on each set, 285 of 300 right whole on the held-out set
    and 256 on the different one (`--pairs 300`, run 62), each image also described alone. Here 4
    a set: the counts must add up, and most of the seed scene must be right."""
    from training.evaluate import pairs, seed_scene

    scene = asyncio.run(seed_scene(PACKAGED))
    assert scene["drawings"] == 12 == sum(scene["answers"].values())
    assert scene["blue_star"] >= 9 and scene["reads_go"] >= 9, scene
    report = asyncio.run(pairs(PACKAGED, 4, seed=0))
    assert set(report) == {"held-out", "different"}
    for summary in report.values():
        assert summary["right"] + summary["wrong_only_in_text"] + summary["wrong_in_scene"] == 4
        assert len(summary["examples"]) == 4 - summary["right"]
        assert sum(summary["alone"].values()) == 4
        wrong_as_pair = sum(n for k, n in summary["alone"].items() if k.startswith("wrong"))
        assert wrong_as_pair == 4 - summary["right"] == sum(summary["wrong_halves"].values())


def test_the_description_diagnostic_measures_the_shipped_models_shapes() -> None:
    """`training.evaluate --scenes N`: the shapes of descriptions, their text aside; the shipped
    model (run 62) names them right in 99.2% of 600 on the training routine and 98.8% on the
    different set (`--scenes 600`), and its mistakes are shapes confused or a shape too few or
    many, or a colour. Here 11 of 12 on each."""
    from training.evaluate import scenes

    report = asyncio.run(scenes(PACKAGED, 12, seed=0))
    assert set(report) == {"held-out", "different"}
    for summary in report.values():
        assert summary["all"]["n"] == 12
        assert sum(b["n"] for b in summary["by_count"].values()) == 12
        assert sum(b["n"] for b in summary["by_smallest_side_px"].values()) == 12
        assert sum(b["n"] for b in summary["by_squeeze"].values()) == 12
        wrong = round(12 * (100 - summary["all"]["right"]) / 100)
        assert sum(summary["mistakes"].values()) == wrong
        assert summary["all"]["right"] >= 50, summary


def the_shipped_command() -> list[str]:
    """The command on the shipped model's card, as arguments to `python -m training.train`."""
    card = (PACKAGED / "README.md").read_text()
    (line,) = re.findall(r"^\.venv/bin/python -m training\.train .*$", card, re.M)
    return line.split()[3:]


def test_the_training_readme_documents_the_shipped_models_command() -> None:
    readme = (Path(__file__).parents[1] / "training" / "README.md").read_text()
    documented = re.findall(r"^\.venv/bin/python -m training\.train (.*)$", readme, re.M)
    assert documented and documented[0].split() == the_shipped_command(), documented[:1]


def has_avx2() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "avx2" in cpuinfo.read_text(errors="replace").split()


@pytest.mark.skipif(
    not has_avx2(),
    reason="runs are pinned to the AVX2 kernels of x86-64 CPUs (training.train.PINNED_MATH)",
)
def test_the_documented_command_retrains_the_shipped_model_step_for_step(tmp_path: Path) -> None:
    """Retraining from scratch with the documented command must reproduce the shipped model. A
    run computes with ATen, MKL and oneDNN held at their AVX2 code paths (MKL at its AVX-512 path
    on Intel CPUs that have it, `train.pinned_math`), so that the floats are summed in the same
    order: on AMD EPYCs with and without AVX-512 the first 50 steps log the
    very losses the shipped run logged, and whole runs wrote the same weights byte for byte. An
    Intel Xeon (Sapphire Rapids) under the same pins sums a few products in another order (the
    losses part in the ninth digit by step 50, and by the third at step 250: a whole run of the
    command on an AMD EPYC ended 7 points from the Intel-trained checkpoint on two rows), so the
    comparison allows a millionth: a change to the recipe or to the code it runs moves these
    losses by far more (an unpinned run agreed to four decimals up to step 200 and then drifted,
    ending up to 14 points apart on a row of the evaluation)."""
    argv = the_shipped_command()
    at = argv.index("--out")
    argv[at + 1] = str(tmp_path / "run")
    run = subprocess.run(
        [sys.executable, "-m", "training.train", *argv, "--stop-after", "50"],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("kernels: AVX2"), run.stdout[:200]
    ran = json.loads((tmp_path / "run" / "training_log.json").read_text())["log"]
    shipped = json.loads((PACKAGED / "training_log.json").read_text())["log"]
    assert len(ran) == 1 and ran[0]["step"] == shipped[0]["step"] == 50
    drop = ("minutes",)
    assert {k: v for k, v in ran[0].items() if k not in drop} == pytest.approx(
        {k: v for k, v in shipped[0].items() if k not in drop}, rel=1e-6, abs=1e-9
    )
