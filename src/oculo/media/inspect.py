"""Check an image part on the request path: data URI, real format, header, pixel cap.

`inspect_image` does everything that is cheap (no pixels are decoded), so a request is
refused, or billed, before any expensive work; `oculo.media.decode` is the separate,
threaded step that produces pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

from oculo.errors import UnsupportedImageFormat
from oculo.media.datauri import parse_data_uri
from oculo.media.decode import check_pixel_cap
from oculo.media.probe import ImageHeader, probe
from oculo.media.sniff import describe_other_format, sniff_format

__all__ = ["InspectedImage", "inspect_image"]


@dataclass(frozen=True, slots=True)
class InspectedImage:
    """An image that passed every check short of decoding."""

    data: bytes
    header: ImageHeader
    declared_mime: str | None

    def __repr__(self) -> str:  # never dump the payload into logs or tracebacks
        return (
            f"InspectedImage(header={self.header!r}, declared_mime={self.declared_mime!r}, "
            f"data=<{len(self.data)} bytes>)"
        )


def inspect_image(url: str, *, param: str | None, max_pixels: int) -> InspectedImage:
    """Parse and check the image at ``url`` (a base64 data URI); raise an OculoError if bad.

    Raises `ImageURLNotSupported` (not a data URI), `InvalidImage` (bad data URI, broken
    header, over the pixel cap) or `UnsupportedImageFormat` (not png/jpeg/gif/webp bytes,
    whatever the declared type says), each carrying ``param``.
    """
    uri = parse_data_uri(url, param=param)
    fmt = sniff_format(uri.data)
    if fmt is None:
        other = describe_other_format(uri.data)
        looks_like = f" (they look like {other})" if other else ""
        raise UnsupportedImageFormat(
            f"The image's bytes are not webp, png, gif or jpeg{looks_like}; "
            "send one of those formats.",
            param=param,
        )
    header = probe(uri.data, fmt, param=param)
    check_pixel_cap(header, max_pixels=max_pixels, param=param)
    return InspectedImage(data=uri.data, header=header, declared_mime=uri.mime)
