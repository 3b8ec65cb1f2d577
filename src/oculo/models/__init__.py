"""The built-in default model, `oculo-tiny`.

Its trained weights ship inside the package (`oculo/models/oculo-tiny/`). Until a trained
checkpoint is packaged, the default is an untrained Idefics3 (SmolVLM-architecture) checkpoint
with random weights, built once into the user's cache: it exercises the real loading and
generation path end to end, but its answers are noise, and /v1/models says so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from oculo.config import ModelSpec

log = logging.getLogger("oculo.models")

DEFAULT_MODEL_ID = "oculo-tiny"
PACKAGED = Path(__file__).parent / DEFAULT_MODEL_ID


def cache_dir() -> Path:
    base = os.environ.get("OCULO_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "oculo"


def default_model_spec() -> ModelSpec:
    """The catalog entry `oculo serve` uses when no model is configured."""
    if (PACKAGED / "config.json").exists():
        return ModelSpec(
            id=DEFAULT_MODEL_ID,
            path=str(PACKAGED),
            description="oculo-tiny: the built-in model trained by the project (see its card).",
        )
    folder = cache_dir() / "untrained-placeholder"
    if not (folder / "config.json").exists():
        from oculo.testing.checkpoints import build_checkpoint

        log.warning("building an untrained placeholder checkpoint in %s", folder)
        build_checkpoint("idefics3", folder, seed=0)
    return ModelSpec(
        id=DEFAULT_MODEL_ID,
        path=str(folder),
        description=(
            "Untrained placeholder (random weights, Idefics3 architecture): the trained "
            "oculo-tiny is not packaged yet, so answers are noise. Serve a real checkpoint "
            "with `oculo serve --model PATH`."
        ),
    )
