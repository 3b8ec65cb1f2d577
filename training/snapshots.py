"""Average a finished run's weights over its `--save-every` snapshots, after the fact.

`train.py --ema` keeps one average while the run trains; this weighs the snapshots a run saved
(`OUT-step100`, `OUT-step200`, ...) and its last step's own weights (`OUT-raw` beside an
`--ema` run's average, else `OUT` itself) into a new checkpoint folder, so one run can try many
averages without training again:

    .venv/bin/python -m training.snapshots --run /tmp/run64/model --from 5500 --out /tmp/uni5500
    .venv/bin/python -m training.snapshots --run /tmp/run64/model --decay 0.999 --out /tmp/ema999

`--from S` is the plain mean of every snapshot from step S on and the last step; `--decay D`
weighs the snapshot of step s by `D ** (last - s)`, an exponential moving average sampled at the
snapshots (close to `--ema D` when the snapshots are much closer than its horizon, 1 / (1 - D)
steps). The new folder is the last step's folder (tokenizer, processor, config) with the
averaged `model.safetensors`; the sums are taken in float64.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.averaging import raw_folder, snapshot_step

WEIGHTS = "model.safetensors"


def snapshots(run: Path) -> list[tuple[int, Path]]:
    """The run's `--save-every` snapshots, (step, folder), by step."""
    found = []
    for folder in run.parent.iterdir():
        step = snapshot_step(run, folder)
        if step is not None and (folder / WEIGHTS).exists():
            found.append((step, folder))
    return sorted(found)


def last_weights(run: Path) -> Path:
    """The folder holding the last step's own weights: `OUT-raw` beside an average, else `OUT`."""
    raw = raw_folder(run)
    return raw if (raw / WEIGHTS).exists() else run


def last_step(run: Path) -> int:
    """The run's step count, from the log `train.py` writes beside its checkpoint."""
    args = json.loads((run / "training_log.json").read_text())["args"]
    return int(args["steps"])


def weights_for(
    steps: list[int], last: int, start: int | None = None, decay: float | None = None
) -> list[float]:
    """Each step's share of the average (they sum to 1): uniform from `start`, or `decay` per
    step back from `last`."""
    if (start is None) == (decay is None):
        raise ValueError("give either a first step or a decay")
    if decay is not None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"a decay is between 0 and 1, not {decay}")
        raw = [decay ** (last - step) for step in steps]
    else:
        raw = [1.0 if step >= (start or 0) else 0.0 for step in steps]
    total = sum(raw)
    if total == 0.0:
        raise ValueError(f"no snapshot from step {start} on")
    return [w / total for w in raw]


def average(folders: list[Path], shares: list[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of the folders' weights, each tensor in its own dtype."""
    summed: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for folder, share in zip(folders, shares, strict=True):
        if share == 0.0:
            continue
        for name, tensor in load_file(folder / WEIGHTS).items():
            dtypes[name] = tensor.dtype
            part = tensor.double() * share
            summed[name] = summed[name] + part if name in summed else part
    return {name: tensor.to(dtypes[name]) for name, tensor in summed.items()}


def write(run: Path, out: Path, start: int | None, decay: float | None) -> str:
    """Average `run`'s snapshots into `out`; returns what was averaged, in a line."""
    last = last_step(run)
    points = [(step, folder) for step, folder in snapshots(run) if step < last]
    own = last_weights(run)
    points.append((last, own))
    shares = weights_for([step for step, _ in points], last, start, decay)
    mean = average([folder for _, folder in points], shares)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(own, out)
    save_file(mean, out / WEIGHTS, metadata={"format": "pt"})
    used = [step for (step, _), share in zip(points, shares, strict=True) if share > 0.0]
    return (
        f"{out}: {len(used)} steps from {used[0]} to {used[-1]}, the last weighing {shares[-1]:.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="the run's --out")
    parser.add_argument("--out", type=Path, required=True)
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--from", dest="start", type=int, help="plain mean from this step on")
    how.add_argument("--decay", type=float, help="exponential weights by step, as --ema")
    args = parser.parse_args(argv)
    print(write(args.run, args.out, args.start, args.decay))


if __name__ == "__main__":
    main()
