"""Parse the ``data:`` URIs that carry images in chat requests.

Only base64 data URIs are accepted: remote URLs would make the server fetch arbitrary
addresses on a caller's behalf, so they are refused outright.  The declared media type is
kept for reference but never trusted; the bytes are sniffed later.

No error raised here quotes the payload: base64 text is never echoed back.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass

import pybase64

from oculo.errors import ImageURLNotSupported, InvalidImage

__all__ = ["DataURI", "parse_data_uri"]

# The header ("data:<mediatype>[;param=value]*;base64") is short in practice; looking for
# its comma only this far keeps a URI with no comma from being scanned to the end and
# keeps an absurd media type out of the parsed result.
_MAX_HEADER_CHARS = 1024
_SCHEME = "data:"
_BASE64_MARKER = ";base64"

_REMOTE_URL_MESSAGE = (
    "Images must be sent as base64 data URIs (data:image/png;base64,...); "
    "remote URLs are not supported."
)


@dataclass(frozen=True, slots=True)
class DataURI:
    """A decoded data URI: the declared media type (untrusted) and the payload bytes."""

    mime: str | None
    data: bytes

    def __repr__(self) -> str:  # never dump the payload into logs or tracebacks
        return f"DataURI(mime={self.mime!r}, data=<{len(self.data)} bytes>)"


def parse_data_uri(url: str, *, param: str | None) -> DataURI:
    """Decode a ``data:[<mediatype>][;params];base64,<payload>`` URI.

    Raises `ImageURLNotSupported` for anything that is not a ``data:`` URI, and
    `InvalidImage` for a data URI that is not base64, whose payload is not strict standard
    base64 (correct padding, no whitespace, no URL-safe alphabet), or that decodes to
    nothing.  ``param`` names the request field for the error.
    """
    if url[: len(_SCHEME)].lower() != _SCHEME:
        raise ImageURLNotSupported(_REMOTE_URL_MESSAGE, param=param)

    comma = url.find(",", len(_SCHEME), len(_SCHEME) + _MAX_HEADER_CHARS)
    if comma < 0:
        raise InvalidImage(
            "Malformed image data URI: expected data:<media type>;base64,<data>.",
            param=param,
        )
    header = url[len(_SCHEME) : comma]
    if not header.lower().endswith(_BASE64_MARKER):
        raise InvalidImage(
            "Image data URIs must be base64-encoded (data:image/png;base64,...).",
            param=param,
        )

    mime = header.partition(";")[0].strip().lower() or None

    try:
        # One slice of the text, then pybase64 decodes straight from it.
        data = pybase64.b64decode(url[comma + 1 :], validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidImage(
            "The image data URI does not contain valid base64 "
            "(standard alphabet, correct padding, no whitespace).",
            param=param,
        ) from None
    if not data:
        raise InvalidImage("The image data URI is empty.", param=param)
    return DataURI(mime=mime, data=data)
