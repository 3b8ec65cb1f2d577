"""The built-in default model, `oculo-tiny`.

Its weights ship inside the package (`oculo/models/oculo-tiny/`): a small Idefics3
(SmolVLM-architecture) model trained by the project itself (`training/`), loaded through the same
code path as any real checkpoint. Its model card (README.md beside the weights) says what it knows
and how well it does it.
"""

from __future__ import annotations

from pathlib import Path

from oculo.config import ModelSpec

DEFAULT_MODEL_ID = "oculo-tiny"
PACKAGED = Path(__file__).parent / DEFAULT_MODEL_ID
DESCRIPTION = (
    "oculo-tiny: the built-in demo model, trained by the project on drawn scenes: 1-3 flat shapes "
    "(circle, square, triangle, star) in 8 colours and an optional printed word or number. It "
    "describes them, counts them, names colours, answers yes/no and reads the word; it knows "
    "nothing else. Serve a real checkpoint with `oculo serve --model PATH`."
)


def default_model_spec() -> ModelSpec:
    """The catalog entry `oculo serve` uses when no model is configured."""
    return ModelSpec(
        id=DEFAULT_MODEL_ID,
        path=str(PACKAGED),
        context_length=512,
        max_tokens=128,
        description=DESCRIPTION,
        # A model this small answers best greedily; a request's own temperature still applies.
        temperature=0.0,
    )
