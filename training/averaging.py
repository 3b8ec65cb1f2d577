"""Exponential moving averages of a model's weights while it trains (`train.py --ema`).

An average of the weights over the last stretch of a run is often a better model than the last
step's weights: the steps' noise averages out. Keeping it costs one float32 copy of the
weights per decay and one in-place `lerp` of each after every optimizer step, and it changes
nothing of the run itself: the trained weights, and so every later batch's loss, are the same
with or without it.

The decay ramps up from the run's first steps (`min(decay, (1 + step) / (10 + step))`, as in
TensorFlow's `ExponentialMovingAverage` with `num_updates`), so that the random weights the run
starts from weigh nothing by its end. The ramp also caps the decay: at step t it is at most
1 - 9 / (10 + t), 0.9986 at step 6,500, so every decay above that is the ramp all run long and
gives one and the same average (training/README.md, run 63).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def decay_at(decay: float, step: int) -> float:
    """The decay used after optimizer step `step` (0 for the first)."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """One exponential moving average of `model`'s parameters (its buffers are left as they are:
    an Idefics3 model's are fixed tables, not trained)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"an average's decay is between 0 and 1, not {decay}")
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the weights after optimizer step `step` into the average."""
        weight = 1.0 - decay_at(self.decay, step)
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], weight)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block (to save them), its own after."""
        with torch.no_grad():
            own = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, o in zip(self.params, own, strict=True):
                    p.copy_(o)


def parse_decays(text: str) -> list[float]:
    """`--ema 0.999,0.9995` -> [0.999, 0.9995]."""
    decays = [float(part) for part in text.split(",") if part.strip()]
    if not decays or any(not 0.0 < d < 1.0 for d in decays):
        raise ValueError(f"--ema takes decays between 0 and 1, comma-separated: {text!r}")
    return decays


def folder_name(name: str, decay: float) -> str:
    """Where a further average is written beside `--out`: `oculo-tiny-ema0.9995`."""
    return f"{name}-ema{decay:g}"


def raw_folder(out: Path) -> Path:
    """Where `--keep-raw` writes the last step's own weights beside `--out`: `OUT-raw`."""
    return out.with_name(f"{out.name}-raw")


def snapshot_folder(out: Path, step: int) -> Path:
    """Where `--save-every` writes the weights after step `step` beside `--out`: `OUT-stepN`."""
    return out.with_name(f"{out.name}-step{step}")


def snapshot_step(out: Path, folder: Path) -> int | None:
    """The step a `snapshot_folder(out, step)` folder holds; None for any other folder."""
    match = re.fullmatch(re.escape(out.name) + r"-step(\d+)", folder.name)
    return int(match.group(1)) if match else None
