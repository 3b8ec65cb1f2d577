"""Where two machines' runs part: a fingerprint of a run's first step, module by module.

Two machines of one CPU vendor train the shipped command to the same bytes; an Intel Xeon and an
AMD EPYC log the same losses to about 1e-8 at step 50 and then drift apart (training/README.md,
"Why a run did not reproduce across machines"). Their step-50 losses alone cannot say which
library sums differently. `train.py --stop-after 1 --fingerprint FILE` writes, for the first
step, a digest of every batch tensor, of every module's inputs and output in the order the
forward pass calls them, of the loss, and of every parameter's gradient; on another machine the
same command writes another file, and

    python -m training.fingerprint A.json B.json

names the first place they part: the step (each step's loss and weights after its update are
in the file's trail), the data (the drawing), or the first module whose output differs from
inputs that do not (that module's own arithmetic: a Linear is MKL's matrix product, the patch
embedding's Conv2d oneDNN's convolution, a LayerNorm or an activation ATen's kernels), or, with
the whole forward pass equal, the gradients (the backward pass). Runs that agree at the first
step but part later are followed with `--fingerprint-step K`, the modules of the step where the
trail says they part.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# the variables that choose the kernels a run computes with (`train.PINNED_MATH` and MKL's own)
KERNEL_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_DYNAMIC",
    "OMP_DYNAMIC",
    "MKL_DEBUG_CPU_TYPE",
    "OMP_NUM_THREADS",
)


def tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a module's argument or output, one level deep (a tensor, a tuple or list of
    them, or a mapping such as transformers' model outputs); anything else is left out."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def digest(values: Iterable[torch.Tensor]) -> str:
    """A short hash of the tensors' shapes, types and bytes: equal only if every bit is."""
    h = hashlib.sha256()
    for t in values:
        t = t.detach()
        h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Recorder:
    """Forward hooks that note each call of the modules given, while `active`: the module's
    name and type and a digest of its tensor inputs (positional and keyword) and its output."""

    def __init__(self) -> None:
        self.active = False
        self.calls: list[dict[str, str]] = []
        self._handles: list[Any] = []

    def attach(self, named: Iterable[tuple[str, torch.nn.Module]]) -> None:
        for name, module in named:
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name: str) -> Any:
        def note(
            module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if not self.active:
                return
            given = [t for a in (*args, *kwargs.values()) for t in tensors(a)]
            self.calls.append(
                {
                    "module": name,
                    "type": type(module).__name__,
                    "in": digest(given),
                    "out": digest(tensors(output)),
                }
            )

        return note

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def gradients(named: Iterable[tuple[str, torch.nn.Parameter]]) -> dict[str, str]:
    """A digest of each parameter's gradient ("none" where it has none)."""
    return {name: "none" if p.grad is None else digest([p.grad]) for name, p in named}


def cpu_fields(cpuinfo: str | None = None) -> dict[str, str]:
    """/proc/cpuinfo's fields for its first processor (`cpuinfo`: its text; none if unreadable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_kind(cpuinfo: str | None = None) -> str:
    """The CPU as its vendor, family and model, and whether it has AVX-512: what chooses the
    kernels' code paths."""
    fields = cpu_fields(cpuinfo)
    avx512 = "avx512f" in fields.get("flags", "").split()
    return (
        f"{fields.get('model name', 'an unknown CPU')} ({fields.get('vendor_id', '?')}, family "
        f"{fields.get('cpu family', '?')}, model {fields.get('model', '?')}, "
        f"{'with' if avx512 else 'without'} AVX-512)"
    )


def weights(named: Iterable[tuple[str, torch.nn.Parameter]]) -> str:
    """One digest of every parameter's value, in the order given (names as `gradients` takes
    them, not digested)."""
    return digest(p for _, p in named)


def fingerprint(
    batch: Mapping[str, Any],
    recorder: Recorder,
    loss: torch.Tensor,
    grads: Mapping[str, str],
    cpu: str,
    step: int = 1,
) -> dict[str, Any]:
    """Step `step`'s fingerprint (the first unless `train.py --fingerprint-step` says), as
    `train.py --fingerprint` writes it; the run adds its "trail", each step's loss and weights."""
    return {
        "step": step,
        "cpu": cpu,
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "environment": {k: os.environ[k] for k in KERNEL_VARIABLES if k in os.environ},
        "batch": {k: digest(tensors(v)) for k, v in sorted(batch.items())},
        "modules": recorder.calls,
        "loss": repr(loss.item()),
        "gradients": dict(grads),
    }


def trail_parting(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> str:
    """Where two runs' trails (each step's loss and weights after its update) part."""
    for x, y in zip(a, b, strict=False):
        parts = [what for what in ("loss", "weights") if x[what] != y[what]]
        if parts:
            what = " and ".join(parts)
            return (
                f"the runs part at step {x['step']}, its {what} (every step before it the same): "
                f"--fingerprint-step {x['step']} names the module"
            )
    return f"every step's loss and weights are the same ({min(len(a), len(b))} steps)"


def parting(a: Mapping[str, Any], b: Mapping[str, Any], most: int = 10) -> list[str]:
    """Where fingerprints `a` and `b` part, first things first, as lines to print."""
    lines = [f"{n}: {f.get('cpu')} {f.get('environment')}" for n, f in (("a", a), ("b", b))]
    if a.get("trail") and b.get("trail"):
        lines.append(trail_parting(a["trail"], b["trail"]))
    step_a, step_b = a.get("step", 1), b.get("step", 1)  # files from before the trail: step 1
    if step_a != step_b:
        lines.append(f"a recorded step {step_a}, b step {step_b}: no modules")
        return lines
    if step_a != 1:
        lines.append(f"step {step_a}:")
    keys = sorted({*a["batch"], *b["batch"]})
    batch = [k for k in keys if a["batch"].get(k) != b["batch"].get(k)]
    if batch:
        lines.append(f"the batches differ ({', '.join(batch)}): the drawing parts them")
        return lines
    lines.append(f"the batches are the same ({len(a['batch'])} tensors)")
    calls_a, calls_b = a["modules"], b["modules"]
    if [c["module"] for c in calls_a] != [c["module"] for c in calls_b]:
        lines.append("the modules are called in another order: different code, not arithmetic")
        return lines
    for k, (x, y) in enumerate(zip(calls_a, calls_b, strict=True)):
        if x["out"] == y["out"]:
            continue
        if x["in"] == y["in"]:
            lines.append(
                f"call {k} of {len(calls_a)}, {x['module']} ({x['type']}): the same inputs, "
                "another output: its own arithmetic parts them"
            )
        else:
            lines.append(
                f"call {k} of {len(calls_a)}, {x['module']} ({x['type']}): other inputs and "
                "another output (its inputs came from outside the modules recorded)"
            )
        break
    else:
        lines.append(f"every module's output is the same ({len(calls_a)} calls)")
    same = a["loss"] == b["loss"]
    lines.append(f"loss {a['loss']} / {b['loss']}" + (" (the same)" if same else ""))
    grads = [k for k in a["gradients"] if a["gradients"][k] != b["gradients"].get(k)]
    lines.append(f"gradients: {len(grads)} of {len(a['gradients'])} differ")
    lines += [f"  {name}" for name in grads[:most]]
    if len(grads) > most:
        lines.append(f"  and {len(grads) - most} more")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path, help="a fingerprint (train.py --fingerprint)")
    parser.add_argument("b", type=Path, help="another machine's, from the same command")
    args = parser.parse_args()
    for line in parting(json.loads(args.a.read_text()), json.loads(args.b.read_text())):
        print(line)


if __name__ == "__main__":
    main()
