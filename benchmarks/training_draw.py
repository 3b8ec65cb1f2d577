"""What drawing a training batch costs, the plain way and the cheaper way, side by side.

    .venv/bin/python -m benchmarks.training_draw [--rounds 6] [--batches 20]
    .venv/bin/python -m benchmarks.training_draw --steps 60 [--rounds 2]

The shipped command's batches (training/README.md's first command), drawn in one process on one
thread by turns: `--batches` consecutive batches the plain way, the next as many the cheaper
way, `--rounds` times. The plain way is what the training drew before `training/pixels.py`:
the image processor's own pixels, each shape's patch cover as the mean of a comparison, Pillow's
built-in faces loaded for every word. Both ways' batches are hashed, tensor by tensor, and must
agree. Reports CPU milliseconds a batch (process time: the machine's other tenants move wall
time more) and their ratio.

With `--steps N`: what the drawing costs the training step. The shipped command runs `N` steps
(`--stop-after`) by turns as it trains (a worker drawing beside the step) and with every batch
drawn before its clock starts (`--draw-first`), `--rounds` times; the steps a second of each
and their ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFont

from training import patches, pixels, train, world

ROOT = Path(__file__).parents[1]


def shipped_args() -> list[str]:
    readme = (ROOT / "training" / "README.md").read_text()
    found = re.search(r"^\.venv/bin/python -m training\.train (.*)$", readme, re.M)
    assert found, "training/README.md names no command"
    return found.group(1).split()


def plain_cover(labels: world.Labels, count: int, size: int, patch: int) -> np.ndarray:
    """Each shape's cover of each patch as the mean of a comparison (the training's way before)."""
    grid = size // patch
    items = np.asarray(labels.items.resize((size, size), Image.Resampling.NEAREST))
    blocks = items.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    return np.stack([(blocks == k + 1).mean(axis=1) for k in range(count)])


Ways = tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any], Callable[..., Any]]
CHEAP: Ways = (pixels.square_inputs, patches._cover, world._bitmap_face, world._pillow_face)
PLAIN: Ways = (
    lambda processor: processor,
    plain_cover,
    ImageFont.load_default_imagefont,
    lambda size: ImageFont.load_default(size=size),
)


def use(ways: Ways) -> None:
    pixels.square_inputs, patches._cover, world._bitmap_face, world._pillow_face = ways  # type: ignore[assignment]


def steps_a_second(steps: int, *extra: str) -> float:
    """The shipped command's rate over its first `steps` steps, as its own log says it."""
    with tempfile.TemporaryDirectory() as out:
        argv = [*shipped_args(), "--out", out, "--stop-after", str(steps), *extra]
        run = subprocess.run(
            [sys.executable, "-m", "training.train", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    found = re.search(r"stopped after \d+ steps: ([0-9.]+) steps/s", run.stdout)
    assert found, run.stdout[-2000:]
    return float(found.group(1))


def compare_steps(steps: int, rounds: int) -> None:
    rates: dict[str, list[float]] = {"drawn by the worker": [], "drawn first": []}
    for _ in range(rounds):
        rates["drawn by the worker"].append(steps_a_second(steps))
        rates["drawn first"].append(steps_a_second(steps, "--draw-first"))
    print(f"machine: {train.cpu_name()}; {steps} steps a run, {rounds} runs each, by turns")
    print("| batches | steps/s, each run | mean |")
    print("|---|---|---|")
    for name, got in rates.items():
        runs = " / ".join(f"{r:.2f}" for r in got)
        print(f"| {name} | {runs} | {sum(got) / len(got):.3f} |")
    worker, first = (sum(v) / len(v) for v in rates.values())
    print(f"drawn first / by the worker: {first / worker:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=0, help="time training steps instead")
    opts = parser.parse_args()
    if opts.steps:
        compare_steps(opts.steps, opts.rounds)
        return
    args = train.command_line().parse_args([*shipped_args(), "--out", "unused"])
    torch.set_num_threads(1)
    size = train.model_size(args)
    args.draw_max = args.draw_max or 2 * size.image_size
    _, processor = train.build(args.seed, size)
    spent = {"plain": 0.0, "cheap": 0.0}
    digests: dict[str, list[str]] = {"plain": [], "cheap": []}
    for turn in range(opts.rounds):
        start = turn * opts.batches
        for name, ways in (("plain", PLAIN), ("cheap", CHEAP)):
            use(ways)
            batches = train.run_batches(args, processor, size, args.seed, start + opts.batches)
            batches.start = start
            drawn = []
            clock = time.process_time()
            for batch in batches:
                drawn.append(batch)
            spent[name] += time.process_time() - clock
            for batch in drawn:
                digest = hashlib.sha256()
                for key in sorted(batch):
                    digest.update(key.encode() + batch[key].numpy().tobytes())
                digests[name].append(digest.hexdigest())
    use(CHEAP)
    n = opts.rounds * opts.batches
    same = digests["plain"] == digests["cheap"]
    print(f"machine: {platform.processor() or platform.machine()}, {train.cpu_name()}")
    print(f"{n} batches of {args.batch_size} each way, {opts.rounds} turns of {opts.batches}")
    print("| way | CPU ms a batch |")
    print("|---|---|")
    for name in spent:
        print(f"| {name} | {spent[name] / n * 1000:.1f} |")
    print(f"cheap / plain: {spent['cheap'] / spent['plain']:.3f}; the same bytes: {same}")
    if not same:
        raise SystemExit("the two ways drew different batches")


if __name__ == "__main__":
    main()
