"""Tell an image's format from its leading bytes, never from what the caller declared."""

from __future__ import annotations

from typing import Literal

__all__ = ["ImageFormat", "describe_other_format", "sniff_format"]

ImageFormat = Literal["png", "jpeg", "gif", "webp"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Leading bytes of formats oculo does not accept, so a rejection can say what it saw.
_OTHER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),
    (b"\x00\x00\x01\x00", "ico"),
    (b"\x00\x00\x02\x00", "cur"),
    (b"qoif", "qoi"),
    (b"8BPS", "psd"),
    (b"/* XPM */", "xpm"),
    (b"\x01\xda", "sgi"),
    (b"\xff\x0a", "jpeg xl"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jpeg xl"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg 2000"),
    (b"\xff\x4f\xff\x51", "jpeg 2000"),
    (b"%PDF-", "pdf"),
    (b"<svg", "svg"),
    (b"<?xml", "xml"),
    (b"icns", "icns"),
    (b"DDS ", "dds"),
)

# ISO base media (``ftyp`` box) major brands.
_FTYP_BRANDS = {
    b"avif": "avif",
    b"avis": "avif",
    b"heic": "heif",
    b"heix": "heif",
    b"heim": "heif",
    b"heis": "heif",
    b"hevc": "heif",
    b"hevx": "heif",
    b"mif1": "heif",
    b"msf1": "heif",
}


def sniff_format(data: bytes) -> ImageFormat | None:
    """The format of ``data`` by its magic bytes, or None if it is not png/jpeg/gif/webp."""
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    return None


def describe_other_format(data: bytes) -> str | None:
    """A best guess at an unsupported format's name (``"bmp"``, ``"avif"``, ...), or None."""
    if data[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(data[8:12])
    for magic, name in _OTHER_MAGIC:
        if data.startswith(magic):
            return name
    return None
