"""Image input: data URIs in, checked headers and decoded RGB images out.

The request path calls `inspect_image` (cheap: parse, sniff, probe, pixel cap), bills
with `image_tokens`, and later runs `decode` in a worker thread.
"""

from oculo.media.datauri import DataURI, parse_data_uri
from oculo.media.decode import LOW_DETAIL_SIZE, check_pixel_cap, decode
from oculo.media.inspect import InspectedImage, inspect_image
from oculo.media.probe import ImageHeader, probe
from oculo.media.sniff import ImageFormat, describe_other_format, sniff_format
from oculo.media.tokens import MAX_IMAGE_TOKENS, TILE, TOKENS_PER_TILE, image_tokens

__all__ = [
    "LOW_DETAIL_SIZE",
    "MAX_IMAGE_TOKENS",
    "TILE",
    "TOKENS_PER_TILE",
    "DataURI",
    "ImageFormat",
    "ImageHeader",
    "InspectedImage",
    "check_pixel_cap",
    "decode",
    "describe_other_format",
    "image_tokens",
    "inspect_image",
    "parse_data_uri",
    "probe",
    "sniff_format",
]
