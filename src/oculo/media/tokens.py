"""How many prompt tokens an image is billed as (see DESIGN.md, "Image tokens").

``tokens = ceil(clamp(H/560, 1, 2) * clamp(W/560, 1, 2) * 1601)``, a real-valued clamp
rounded up once.  Computed in integers so no size lands one token off through
floating-point error: with each side clamped to [560, 1120] pixels, the product is
``ceil(h * w * 1601 / 560**2)``.
"""

from __future__ import annotations

__all__ = ["MAX_IMAGE_TOKENS", "TILE", "TOKENS_PER_TILE", "image_tokens"]

TILE = 560
TOKENS_PER_TILE = 1601
MAX_IMAGE_TOKENS = 4 * TOKENS_PER_TILE  # 2 x 2 tiles: 6404


def image_tokens(width: int, height: int, detail: str = "auto") -> int:
    """Tokens billed for a ``width`` x ``height`` image; ``detail="low"`` is one tile."""
    if detail == "low":
        return TOKENS_PER_TILE
    w = min(max(width, TILE), 2 * TILE)
    h = min(max(height, TILE), 2 * TILE)
    return -(-(w * h * TOKENS_PER_TILE) // (TILE * TILE))
