"""The optimizer a run trains with (`train.py --optimizer`).

`adamw`, the default and every shipped run's: AdamW on every weight. `muon`: Muon (Newton-Schulz
orthogonalised momentum: `torch.optim.Muon`'s arithmetic, but in float32, where torch's casts to
bfloat16, which CPUs without it compute some twenty times slower) on the matrices inside the
transformer layers and the connector's projection, AdamW on the rest (embeddings, the patch
convolution, the language model's head, norms, biases and the read-out heads), as Muon is meant
to be used. Muon's steps are scaled to AdamW's size (Moonshot's rule, torch's
`adjust_lr_fn="match_rms_adamw"`), so both take the same peak rate, weight decay and schedule.
Measured (training/README.md, runs 71-75): Muon runs the loss ahead of AdamW a step, but the
look-up that colour and yes/no questions need formed in two of its four whole runs, so no
shipped run uses it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from training import lookup

KINDS = ("adamw", "muon")
# `--muon-skip`: matrices of the layers that stay on AdamW under `--optimizer muon`, tried for
# the look-up head (`training/lookup.py`). Measured (training/README.md, runs 72-73): neither
# split helped; the language model's attention gives Muon its lead, and layer 1 alone on AdamW
# never learned the look-up.
SKIPS: dict[str, re.Pattern[str] | None] = {
    "none": None,
    "text-attention": re.compile(r"text_model\.layers\.\d+\.self_attn\."),
    "lookup-attention": re.compile(rf"text_model\.layers\.{lookup.LAYER}\.self_attn\."),
}
BETAS = (0.9, 0.98)
WEIGHT_DECAY = 0.01
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (Keller Jordan's)


class Optimizer(Protocol):
    """What a training step and a saved state need of an optimizer."""

    @property
    def param_groups(self) -> list[dict[str, Any]]: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class Together:
    """Several optimizers over disjoint parameters, stepped as one; their state dicts by name."""

    def __init__(self, parts: dict[str, torch.optim.Optimizer]) -> None:
        self.parts = parts

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts.values() for group in part.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for part in self.parts.values():
            part.step()

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != set(self.parts):
            raise ValueError(
                f"a state of the optimizers {sorted(state_dict)}, not {sorted(self.parts)}"
            )
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])


def orthogonalised(update: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """`update` with its singular values pushed towards 1: torch.optim.Muon's quintic
    Newton-Schulz iteration and coefficients, in float32."""
    a, b, c = NS_COEFFICIENTS
    tall = update.size(0) > update.size(1)
    x = update.T if tall else update
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for matrices, as `torch.optim.Muon(..., adjust_lr_fn="match_rms_adamw")` computes it
    (Nesterov momentum, decoupled weight decay, each step scaled by 0.2 * sqrt(max(rows,
    columns)) to AdamW's size), but orthogonalised in float32."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        weight_decay: float = WEIGHT_DECAY,
        momentum: float = 0.95,
        scale: float = 1.0,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "scale": scale}
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.ndim != 2:
                    raise ValueError("Muon trains matrices only")
                state = self.state[param]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buf = state["momentum_buffer"]
                buf.lerp_(param.grad, 1 - momentum)
                update = orthogonalised(param.grad.lerp(buf, momentum))
                param.mul_(1 - lr * decay)
                param.add_(update, alpha=-lr * 0.2 * math.sqrt(max(param.shape)))


def for_muon(name: str, parameter: torch.Tensor, skip: str = "none") -> bool:
    """Whether Muon trains this weight of the model: a matrix inside a transformer layer, or the
    connector's projection (not embeddings, the language model's head, norms or biases), unless
    `skip` (a key of `SKIPS`) keeps it on AdamW."""
    if skip not in SKIPS:
        raise ValueError(f"unknown --muon-skip {skip!r}: one of {', '.join(SKIPS)}")
    kept = SKIPS[skip]
    return (
        parameter.ndim == 2
        and (".layers." in name or "modality_projection" in name)
        and not (kept is not None and kept.search(name))
    )


def build(
    kind: str,
    model: torch.nn.Module,
    aids: Iterable[torch.nn.Parameter],
    lr: float,
    muon_scale: float = 1.0,
    muon_skip: str = "none",
) -> Optimizer:
    """The optimizer `kind` over the model's weights and the read-out heads' (`aids`); with
    `muon`, Muon's peak rate is `muon_scale` times AdamW's (each group's `scale`, which the
    schedule multiplies its rate by), and the matrices `muon_skip` names stay on AdamW."""
    aids = list(aids)
    if kind == "adamw":  # the parameters in the order every shipped run gave them
        return torch.optim.AdamW(
            [*model.parameters(), *aids], lr=lr, weight_decay=WEIGHT_DECAY, betas=BETAS
        )
    if kind != "muon":
        raise ValueError(f"unknown optimizer {kind!r}: one of {', '.join(KINDS)}")
    matrices = [p for n, p in model.named_parameters() if for_muon(n, p, muon_skip)]
    rest = [p for n, p in model.named_parameters() if not for_muon(n, p, muon_skip)] + aids
    return Together(
        {
            "muon": Muon(matrices, lr=lr * muon_scale, scale=muon_scale),
            "adamw": torch.optim.AdamW(rest, lr=lr, weight_decay=WEIGHT_DECAY, betas=BETAS),
        }
    )
