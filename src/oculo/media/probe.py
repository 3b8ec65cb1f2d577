"""Read an image's size and frame count from its headers, without decoding any pixels.

This runs on the request path before anything expensive happens, so it must be cheap
and it must hold up against hostile input: every structural problem (truncation, a
zero dimension, a missing frame header) becomes `InvalidImage`, and nothing else
escapes it.  The numbers it reports are the ones Pillow will decode to, which
`oculo.media.decode` verifies afterwards.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from oculo.errors import InvalidImage
from oculo.media.sniff import ImageFormat, sniff_format

__all__ = ["ImageHeader", "probe"]


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What the headers say: format, size in pixels (first frame, as decoded) and frames."""

    format: ImageFormat
    width: int
    height: int
    frames: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


class _Malformed(Exception):
    """Internal: a parser found a structural problem (the message says which)."""


def probe(data: bytes, fmt: ImageFormat, *, param: str | None) -> ImageHeader:
    """Parse the headers of ``data``, whose magic bytes say it is ``fmt``.

    Raises `InvalidImage` (with ``param``) if the headers are not well formed.
    """
    if sniff_format(data) != fmt:
        raise InvalidImage(f"The image's bytes are not {fmt}.", param=param)
    try:
        width, height, frames = _PARSERS[fmt](data)
    except _Malformed as exc:
        raise InvalidImage(f"Invalid {_NAMES[fmt]} image: {exc}.", param=param) from None
    except (struct.error, IndexError):
        raise InvalidImage(
            f"Invalid {_NAMES[fmt]} image: its header is truncated.", param=param
        ) from None
    if width <= 0 or height <= 0:
        raise InvalidImage(
            f"Invalid {_NAMES[fmt]} image: it is {width} x {height} pixels.", param=param
        )
    return ImageHeader(format=fmt, width=width, height=height, frames=max(frames, 1))


# --- PNG -----------------------------------------------------------------------------

_PNG_MAX_DIMENSION = 2**31 - 1


def _png(data: bytes) -> tuple[int, int, int]:
    """IHDR size; frame count from acTL (APNG), following Pillow's reading of it."""
    if len(data) < 33:
        raise _Malformed("its header is truncated")
    length, kind, width, height = struct.unpack_from(">I4sII", data, 8)
    if kind != b"IHDR" or length != 13:
        raise _Malformed("it does not start with an IHDR chunk")
    if width > _PNG_MAX_DIMENSION or height > _PNG_MAX_DIMENSION:
        raise _Malformed("its IHDR size is out of range")
    return width, height, _png_frames(data, 33)


def _png_frames(data: bytes, pos: int) -> int:
    """Walk the chunks before the image data, looking for acTL and fcTL."""
    n = len(data)
    num_frames: int | None = None
    seen_actl = seen_fctl = False
    while pos + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"acTL":
            if seen_actl or length < 8 or pos + 12 > n:
                num_frames = None  # Pillow: "Invalid APNG", falls back to the still image
            else:
                count = struct.unpack_from(">I", data, pos + 8)[0]
                num_frames = count if 0 < count <= 0x80000000 else None
            seen_actl = True
        elif kind == b"fcTL":
            seen_fctl = True
        pos += 12 + length
    if num_frames is None:
        return 1
    # An IDAT with no fcTL before it is a default image outside the animation.
    return num_frames if seen_fctl else num_frames + 1


# --- JPEG ----------------------------------------------------------------------------

# SOFn markers carrying the frame size (not DHT C4, JPG C8, DAC CC).
_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
# Markers without a length field, as Pillow reads them: TEM, JPG, RSTn, SOI, JPGn.
_JPEG_STANDALONE = frozenset({0x01, 0xC8, *range(0xD0, 0xD9), *range(0xF0, 0xFE)})
_JPEG_EOI, _JPEG_SOS = 0xD9, 0xDA


def _jpeg(data: bytes) -> tuple[int, int, int]:
    """Walk the marker segments to the first SOFn, skipping junk and fill bytes."""
    n = len(data)
    pos = 2  # after SOI
    while True:
        ff = data.find(b"\xff", pos)  # anything before the next 0xFF is junk
        if ff < 0:
            raise _Malformed("it has no frame header (SOF marker)")
        pos = ff + 1
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise _Malformed("it has no frame header (SOF marker)")
        marker = data[pos]
        pos += 1
        if marker == 0x00 or marker in _JPEG_STANDALONE:  # 0x00: an escaped 0xFF
            continue
        if marker in (_JPEG_EOI, _JPEG_SOS):
            raise _Malformed("it has no frame header (SOF marker) before its image data")
        if marker in _JPEG_SOF:
            if pos + 8 > n:
                raise _Malformed("its frame header is truncated")
            height, width = struct.unpack_from(">HH", data, pos + 3)
            if height == 0:
                raise _Malformed("its frame header gives no height")
            return width, height, 1
        if marker < 0xC0:
            raise _Malformed(f"it has an unknown marker 0xFF{marker:02X}")
        if pos + 2 > n:
            raise _Malformed("a marker segment is truncated")
        length = struct.unpack_from(">H", data, pos)[0]
        if length < 2:
            raise _Malformed("a marker segment has a bad length")
        pos += length


# --- GIF -----------------------------------------------------------------------------


def _gif(data: bytes) -> tuple[int, int, int]:
    """Logical screen, grown to frame 0's extent as Pillow does; count image descriptors."""
    if len(data) < 13:
        raise _Malformed("its header is truncated")
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    pos = 13
    if flags & 0x80:
        pos += 3 << ((flags & 7) + 1)  # global color table
    n = len(data)
    frames = 0
    while pos < n:
        tag = data[pos]
        pos += 1
        if tag == 0x2C:  # image descriptor
            if pos + 9 > n:
                break
            left, top, w, h, local = struct.unpack_from("<HHHHB", data, pos)
            if frames == 0:
                width, height = max(width, left + w), max(height, top + h)
            frames += 1
            pos += 9
            if local & 0x80:
                pos += 3 << ((local & 7) + 1)  # local color table
            pos = _skip_sub_blocks(data, pos + 1)  # +1: LZW minimum code size
        elif tag == 0x21:  # extension: label, then sub-blocks
            pos = _skip_sub_blocks(data, pos + 1)
        elif tag == 0x3B:  # trailer
            break
        # Any other byte is skipped, as Pillow does.
    if frames == 0:
        raise _Malformed("it contains no image")
    return width, height, frames


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    """The offset after a chain of data sub-blocks ending in a zero-length block."""
    n = len(data)
    while pos < n:
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos
    return n


# --- WebP ----------------------------------------------------------------------------


def _webp(data: bytes) -> tuple[int, int, int]:
    """Size from the VP8 / VP8L / VP8X chunk; ANMF chunks counted when animated."""
    if len(data) < 30:
        raise _Malformed("its header is truncated")
    kind, size = struct.unpack_from("<4sI", data, 12)
    if kind == b"VP8 ":
        if data[20] & 1:
            raise _Malformed("its first frame is not a key frame")
        if data[23:26] != b"\x9d\x01\x2a":
            raise _Malformed("its VP8 frame header is damaged")
        w, h = struct.unpack_from("<HH", data, 26)
        return w & 0x3FFF, h & 0x3FFF, 1
    if kind == b"VP8L":
        signature, bits = struct.unpack_from("<BI", data, 20)
        if signature != 0x2F or bits >> 29:
            raise _Malformed("its VP8L header is damaged")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 1
    if kind == b"VP8X":
        flags = data[20]
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        frames = _webp_anmf_count(data, 20 + size + (size & 1)) if flags & 0x02 else 1
        return w, h, frames
    raise _Malformed("it has no VP8, VP8L or VP8X chunk")


def _webp_anmf_count(data: bytes, pos: int) -> int:
    n = len(data)
    frames = 0
    while pos + 8 <= n:
        kind, size = struct.unpack_from("<4sI", data, pos)
        if kind == b"ANMF":
            frames += 1
        pos += 8 + size + (size & 1)
    if frames == 0:
        raise _Malformed("it is marked animated but has no frames")
    return frames


_PARSERS: dict[ImageFormat, Callable[[bytes], tuple[int, int, int]]] = {
    "png": _png,
    "jpeg": _jpeg,
    "gif": _gif,
    "webp": _webp,
}
_NAMES: dict[ImageFormat, str] = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "webp": "WebP"}
