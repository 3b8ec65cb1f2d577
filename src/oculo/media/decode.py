"""Turn checked image bytes into the Pillow image an engine receives.

Engines get one RGB image per input: the first frame, EXIF orientation applied,
transparency flattened onto white, and at most 560 x 560 when ``detail`` is ``"low"``.
Decoding is synchronous and CPU-bound; callers run it in a worker thread.

Every way Pillow can fail on hostile bytes becomes `InvalidImage`.  Decompression bombs
are stopped before Pillow is called, from the probed header size, against both the
caller's pixel cap and Pillow's own ``Image.MAX_IMAGE_PIXELS`` (read, never changed, so
concurrent decodes share no mutable state); Pillow's size is then required to match the
header, so the probe cannot be talked past.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

from oculo.errors import InvalidImage, OculoError
from oculo.media.probe import ImageHeader
from oculo.media.sniff import ImageFormat

__all__ = ["LOW_DETAIL_SIZE", "check_pixel_cap", "decode"]

LOW_DETAIL_SIZE = 560

_PILLOW_FORMATS: dict[ImageFormat, str] = {
    "png": "PNG",
    "jpeg": "JPEG",
    "gif": "GIF",
    "webp": "WEBP",
}
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WHITE = (255, 255, 255)


def check_pixel_cap(header: ImageHeader, *, max_pixels: int, param: str | None) -> None:
    """Raise `InvalidImage` if the header's size is over ``max_pixels`` or Pillow's limit."""
    cap = max_pixels
    pillow_cap = Image.MAX_IMAGE_PIXELS
    if pillow_cap is not None:
        cap = min(cap, int(pillow_cap))
    if header.width * header.height > cap:
        raise InvalidImage(
            f"The image is {header.width} x {header.height} pixels, "
            f"over the cap of {cap:,} pixels.",
            param=param,
        )


def decode(
    data: bytes,
    header: ImageHeader,
    *,
    max_pixels: int,
    detail: str = "auto",
    param: str | None,
) -> Image.Image:
    """Decode the first frame of ``data`` (already probed as ``header``) to an RGB image."""
    check_pixel_cap(header, max_pixels=max_pixels, param=param)
    try:
        return _decode(data, header, detail, param)
    except OculoError:
        raise
    except Exception as exc:  # Pillow fails on bad input in many ways; all are the input's
        raise InvalidImage(
            f"The {header.format.upper()} image could not be decoded; it is truncated or corrupt.",
            param=param,
        ) from exc


def _decode(data: bytes, header: ImageHeader, detail: str, param: str | None) -> Image.Image:
    img = Image.open(io.BytesIO(data), formats=[_PILLOW_FORMATS[header.format]])
    try:
        if img.size != (header.width, header.height):
            raise InvalidImage(
                f"The image decodes to {img.width} x {img.height} pixels, "
                f"but its header says {header.width} x {header.height}.",
                param=param,
            )
        img.load()  # the first frame, in full: truncated or corrupt data fails here
        ImageOps.exif_transpose(img, in_place=True)
        out = _to_rgb(img)
        if detail == "low":
            out.thumbnail((LOW_DETAIL_SIZE, LOW_DETAIL_SIZE), Image.Resampling.BICUBIC)
    except BaseException:
        img.close()
        raise
    if out is not img:
        img.close()
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as RGB: alpha composited onto white, 16-bit grey scaled down, not clipped."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        return img.point(lambda v: v / 256).convert("L").convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _WHITE)
        flat.paste(rgba, mask=rgba)
        return flat
    return img.convert("RGB")
