"""A run's whole state after a step, to go on from it (`train.py --save-state S --resume DIR`).

A checkpoint folder (`save_pretrained`) holds the model's weights only: the auxiliary read-out
heads that train beside it are not saved, nor AdamW's moments, nor the weight averages. A run
started from such a folder (`--init-from`) is a new run, and a continuation made that way damaged
the weights (run 65's, training/README.md). This file holds everything a step of `train.py`
reads and changes: every trained module's weights (the model and its read-out heads), the
optimizer's state, each `--ema` average, the torch generator, the log so far and the minutes
spent. The batches need nothing saved: batch k is drawn from its own seed (`train.Batches`).

So a run resumed from the state after step S, with the same command, computes what the
uninterrupted run computes from step S + 1 on, bit for bit (`tests/test_training.py`); and one
resumed with another schedule or other data from step S on (`--lr-floor`, `--mix`, ...) differs
from it only from step S + 1: a run's last stretch tried several ways for the cost of that
stretch alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training import averaging, optimizers

FILE = "state.pt"


def folder(out: Path, step: int) -> Path:
    """Where `--save-state` writes the state after step `step` beside `--out`: `OUT-stateN`."""
    return out.with_name(f"{out.name}-state{step}")


@dataclass
class State:
    """What `save` wrote: the step it was taken after and what the run had then."""

    step: int
    modules: dict[str, dict[str, torch.Tensor]]
    optimizer: dict[str, Any]
    averages: list[tuple[float, list[torch.Tensor]]]
    generator: torch.Tensor
    log: list[dict[str, float]]
    minutes: float
    args: dict[str, str]


def save(
    where: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer: optimizers.Optimizer,
    averages: list[averaging.WeightAverage],
    log: list[dict[str, float]],
    minutes: float,
    args: dict[str, str],
) -> None:
    """Write the run's state after `step` (counted from 1) to the folder `where`."""
    where.mkdir(parents=True, exist_ok=True)
    body = {
        "step": step,
        "modules": {name: module.state_dict() for name, module in modules.items()},
        "optimizer": optimizer.state_dict(),
        "averages": [(a.decay, a.shadow) for a in averages],
        "generator": torch.get_rng_state(),
        "log": log,
        "minutes": minutes,
        "args": args,
    }
    partial = where / (FILE + ".partial")
    torch.save(body, partial)
    partial.replace(where / FILE)  # a state is whole or absent, never half written


def load(where: Path) -> State:
    """The state `save` wrote to the folder `where`."""
    path = where / FILE
    if not path.is_file():
        raise FileNotFoundError(f"no run state in {where} (written by train.py --save-state)")
    body = torch.load(path, weights_only=True)
    return State(
        step=int(body["step"]),
        modules=body["modules"],
        optimizer=body["optimizer"],
        averages=[(float(d), list(s)) for d, s in body["averages"]],
        generator=body["generator"],
        log=list(body["log"]),
        minutes=float(body["minutes"]),
        args=dict(body["args"]),
    )


def restore(
    state: State,
    modules: dict[str, torch.nn.Module],
    optimizer: optimizers.Optimizer,
    averages: list[averaging.WeightAverage],
) -> None:
    """Put `state` back into a run built the same way: each module's weights (strictly: the same
    modules, the same shapes), the optimizer's moments and step counts, each average and the
    torch generator. Raises ValueError where the run is not built as the state's was."""
    if set(modules) != set(state.modules):
        raise ValueError(
            f"the state trained {sorted(state.modules)}, this run {sorted(modules)}: "
            "resume with the read-out options the state's run had"
        )
    for name, module in modules.items():
        try:
            module.load_state_dict(state.modules[name], strict=True)
        except RuntimeError as error:  # a shape or a name that differs
            raise ValueError(f"{name}: the state's weights do not fit this run: {error}") from None
    try:
        optimizer.load_state_dict(state.optimizer)
    except (ValueError, KeyError) as error:
        raise ValueError(f"the optimizer's state does not fit this run: {error}") from None
    decays = [decay for decay, _ in state.averages]
    if decays != [a.decay for a in averages]:
        raise ValueError(f"the state kept the averages {decays}: resume with the same --ema")
    with torch.no_grad():
        for average, (_, shadow) in zip(averages, state.averages, strict=True):
            for mine, saved in zip(average.shadow, shadow, strict=True):
                mine.copy_(saved)
    torch.set_rng_state(state.generator)
