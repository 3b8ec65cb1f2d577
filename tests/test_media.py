"""Tests for oculo.media: data URIs, sniffing, header probes, decoding, image tokens."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from oculo.errors import (
    ImageURLNotSupported,
    InvalidImage,
    OculoError,
    UnsupportedImageFormat,
)
from oculo.media import (
    MAX_IMAGE_TOKENS,
    TILE,
    TOKENS_PER_TILE,
    DataURI,
    ImageHeader,
    decode,
    describe_other_format,
    image_tokens,
    inspect_image,
    parse_data_uri,
    probe,
    sniff_format,
)

CAP = 40_000_000
PARAM = "messages[0].content[1].image_url.url"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"

# --- helpers ---------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def gradient(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A non-uniform image, so encoders do not collapse it."""
    w, h = size
    img = Image.new("RGB", size)
    img.putdata([((x * 7) % 256, (y * 5) % 256, (x + y) % 256) for y in range(h) for x in range(w)])
    return img.convert(mode)


def frames_of(n: int, size: tuple[int, int] = (40, 30)) -> list[Image.Image]:
    """``n`` visibly different frames (encoders drop duplicate frames)."""
    return [
        Image.new("RGB", size, (i * 40 % 256, 255 - i * 30 % 256, i * 90 % 256)) for i in range(n)
    ]


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_with_ihdr(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\x00\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def inspect_and_decode(data: bytes, *, detail: str = "auto") -> tuple[ImageHeader, Image.Image]:
    inspected = inspect_image(data_uri(data), param=PARAM, max_pixels=CAP)
    img = decode(inspected.data, inspected.header, max_pixels=CAP, detail=detail, param=PARAM)
    return inspected.header, img


# --- corpus ------------------------------------------------------------------------------


def _manifest() -> list[dict[str, Any]]:
    path = CORPUS / "manifest.json"
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = json.loads(path.read_text())
    return rows


MANIFEST = _manifest()
ORIENTATION_SWAPS = {5, 6, 7, 8}
REJECTIONS: dict[str, type[OculoError]] = {
    "reject: unsupported format": UnsupportedImageFormat,
    "reject: invalid image": InvalidImage,
}


@pytest.mark.skipif(not MANIFEST, reason="shared image corpus not found")
@pytest.mark.parametrize("row", MANIFEST, ids=[row["file"] for row in MANIFEST])
def test_corpus(row: dict[str, Any]) -> None:
    data = (CORPUS / "images" / row["file"]).read_bytes()
    expect: str = row["expect"]

    if expect.startswith("reject: request body"):
        # A body-size matter for the HTTP layer; the media layer just must not crash.
        with contextlib.suppress(OculoError):
            inspect_and_decode(data)
        return

    if expect == "accept":
        header, img = inspect_and_decode(data)
        assert (header.width, header.height) == (row["width"], row["height"])
        assert header.frames == row["frames"]
        assert img.mode == "RGB"
        with Image.open(io.BytesIO(data)) as raw:
            orientation = raw.getexif().get(0x0112, 1)
        expected = (row["width"], row["height"])
        if orientation in ORIENTATION_SWAPS:
            expected = expected[::-1]
        assert img.size == expected
        return

    if expect in REJECTIONS:
        with pytest.raises(REJECTIONS[expect]) as excinfo:
            inspect_and_decode(data)
        assert excinfo.type is REJECTIONS[expect]
        assert excinfo.value.param == PARAM
        return

    assert expect.startswith("either:"), expect
    try:
        _, img = inspect_and_decode(data)
    except InvalidImage:
        return
    assert img.mode == "RGB"


@pytest.mark.skipif(not MANIFEST, reason="shared image corpus not found")
def test_exif_orientation_6_is_applied() -> None:
    data = (CORPUS / "images" / "hopper_orientation_6.jpg").read_bytes()
    _, img = inspect_and_decode(data)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.getexif().get(0x0112) == 6
        upright = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
        unrotated = raw.convert("RGB")
    assert img.tobytes() == upright.tobytes()
    assert img.tobytes() != unrotated.tobytes()


@pytest.mark.skipif(not MANIFEST, reason="shared image corpus not found")
def test_junk_before_jpeg_markers_is_tolerated() -> None:
    data = (CORPUS / "images" / "junk_jpeg_header.jpg").read_bytes()
    header = probe(data, "jpeg", param=None)
    assert (header.width, header.height) == (1024, 768)


@pytest.mark.skipif(not MANIFEST, reason="shared image corpus not found")
def test_gif_bomb_is_stopped_by_the_cap_from_frame_extents() -> None:
    data = (CORPUS / "images" / "decompression_bomb.gif").read_bytes()
    with pytest.raises(InvalidImage, match="over the cap"):
        inspect_image(data_uri(data), param=PARAM, max_pixels=CAP)


# --- image tokens --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "tokens"),
    [
        (840, 560, 2402),
        (560, 840, 2402),
        (32, 32, 1601),
        (1, 1, 1601),
        (560, 560, 1601),
        (561, 560, 1604),  # 561/560 * 1601 = 1603.86 -> 1604
        (1120, 1120, 6404),
        (3000, 3000, 6404),
        (1120, 560, 3202),
        (100_000, 10, 3202),
        (700, 700, 2502),  # 1.5625 * 1601 = 2501.5625 -> 2502
    ],
)
def test_image_tokens(width: int, height: int, tokens: int) -> None:
    assert image_tokens(width, height) == tokens
    assert image_tokens(width, height, "high") == tokens


def test_image_tokens_low_detail_is_one_tile() -> None:
    assert image_tokens(3000, 3000, "low") == TOKENS_PER_TILE == 1601
    assert image_tokens(32, 32, "low") == 1601


def test_image_tokens_constants_and_exactness() -> None:
    assert (TILE, TOKENS_PER_TILE, MAX_IMAGE_TOKENS) == (560, 1601, 6404)
    from fractions import Fraction
    from math import ceil

    def exact(w: int, h: int) -> int:
        def clamp(v: Fraction) -> Fraction:
            return min(max(v, Fraction(1)), Fraction(2))

        return ceil(clamp(Fraction(h, 560)) * clamp(Fraction(w, 560)) * 1601)

    for w in range(500, 1200, 7):
        for h in (559, 560, 561, 700, 840, 1119, 1120, 1121):
            assert image_tokens(w, h) == exact(w, h)
            assert image_tokens(w, h) <= MAX_IMAGE_TOKENS


# --- data URIs -----------------------------------------------------------------------------


PNG_1x1 = encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG")


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/cat.png",
        "https://example.com/cat.png",
        "ftp://example.com/cat.png",
        "file:///etc/passwd",
        base64.b64encode(PNG_1x1).decode(),  # bare base64, no data: scheme
        "",
        " data:image/png;base64,AAAA",
    ],
)
def test_non_data_urls_are_not_supported(url: str) -> None:
    with pytest.raises(ImageURLNotSupported) as excinfo:
        parse_data_uri(url, param=PARAM)
    assert excinfo.value.param == PARAM
    assert "base64 data URIs" in excinfo.value.message
    assert excinfo.value.code == "image_url_not_supported"


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png,iVBORw0KGgo=",  # not base64
        "data:image/png;charset=utf-8,abc",
        "data:image/png;base64",  # no comma
        "data:image/png;base64,iVBORw0KGgo",  # bad padding
        "data:image/png;base64,iVBORw0KGgo==",  # too much padding
        "data:image/png;base64,iVBO Rw0KGgo=",  # whitespace
        "data:image/png;base64,iVBORw0KGgo=\n",  # trailing newline
        "data:image/png;base64,iVBORw0K*Ggo=",  # not in the alphabet
        "data:image/png;base64,iVBORw0K-_go",  # URL-safe alphabet
        "data:image/png;base64,iVBORw0KGgoé",  # non-ASCII
        "data:image/png;base64,",  # empty payload
        "data:;base64,",
    ],
)
def test_bad_data_uris_are_invalid_images(url: str) -> None:
    with pytest.raises(InvalidImage) as excinfo:
        parse_data_uri(url, param=PARAM)
    assert excinfo.value.param == PARAM
    assert excinfo.value.code == "invalid_image"


def test_errors_never_echo_base64() -> None:
    payload = base64.b64encode(PNG_1x1 * 50).decode()
    for url in (
        f"data:image/png;base64,{payload}=",
        f"data:image/png;base64,{payload[:-1]}*",
        f"data:image/png,{payload}",
        payload,
        f"http://example.com/{payload}",
    ):
        with pytest.raises(OculoError) as excinfo:
            inspect_image(url, param=PARAM, max_pixels=CAP)
        assert payload[:40] not in excinfo.value.message
        assert payload[:40] not in repr(excinfo.value.body())


def test_data_uri_parses_mime_and_payload() -> None:
    uri = parse_data_uri(data_uri(PNG_1x1), param=None)
    assert uri == DataURI(mime="image/png", data=PNG_1x1)
    assert "bytes>" in repr(uri)


@pytest.mark.parametrize(
    ("prefix", "mime"),
    [
        ("DATA:IMAGE/PNG;BASE64,", "image/png"),
        ("Data:image/png;Base64,", "image/png"),
        ("data:image/png;charset=utf-8;base64,", "image/png"),
        ("data:image/png;name=cat.png;base64,", "image/png"),
        ("data:;base64,", None),
        ("data:application/octet-stream;base64,", "application/octet-stream"),
    ],
)
def test_data_uri_header_variants(prefix: str, mime: str | None) -> None:
    uri = parse_data_uri(prefix + base64.b64encode(PNG_1x1).decode(), param=None)
    assert uri.mime == mime
    assert uri.data == PNG_1x1


def test_declared_type_is_not_trusted_jpeg_declared_png() -> None:
    jpeg = encode(gradient((20, 10)), "JPEG")
    inspected = inspect_image(data_uri(jpeg, "image/png"), param=PARAM, max_pixels=CAP)
    assert inspected.header.format == "jpeg"
    assert inspected.declared_mime == "image/png"
    img = decode(inspected.data, inspected.header, max_pixels=CAP, param=PARAM)
    assert img.size == (20, 10)
    assert "bytes>" in repr(inspected)


def test_declared_type_is_not_trusted_bmp_declared_jpeg() -> None:
    bmp = encode(gradient((20, 10)), "BMP")
    with pytest.raises(UnsupportedImageFormat, match="bmp") as excinfo:
        inspect_image(data_uri(bmp, "image/jpeg"), param=PARAM, max_pixels=CAP)
    assert excinfo.value.param == PARAM
    assert "webp, png, gif or jpeg" in excinfo.value.message


def test_unknown_bytes_are_unsupported() -> None:
    with pytest.raises(UnsupportedImageFormat) as excinfo:
        inspect_image(data_uri(b"hello, world"), param=PARAM, max_pixels=CAP)
    assert "look like" not in excinfo.value.message


# --- sniffing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 8, "png"),
        (b"\xff\xd8\xff\xe0", "jpeg"),
        (b"GIF87a....", "gif"),
        (b"GIF89a....", "gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
        (b"\x89PNG\r\n", None),
        (b"\xff\xd8", None),
        (b"GIF88a", None),
        (b"BM....", None),
        (b"", None),
    ],
)
def test_sniff_format(data: bytes, fmt: str | None) -> None:
    assert sniff_format(data) == fmt


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"BM\x00\x00", "bmp"),
        (b"II*\x00", "tiff"),
        (b"MM\x00*", "tiff"),
        (b"\x00\x00\x01\x00\x01\x00", "ico"),
        (b"qoif\x00\x00", "qoi"),
        (b"8BPS\x00\x01", "psd"),
        (b"\x00\x00\x00\x20ftypavif", "avif"),
        (b"\x00\x00\x00\x1cftypheic", "heif"),
        (b"hello", None),
    ],
)
def test_describe_other_format(data: bytes, name: str | None) -> None:
    assert describe_other_format(data) == name


# --- header probes -----------------------------------------------------------------------


def test_probe_png() -> None:
    header = probe(encode(gradient((37, 23)), "PNG"), "png", param=None)
    assert header == ImageHeader(format="png", width=37, height=23, frames=1)
    assert header.pixels == 37 * 23


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"quality": 30, "subsampling": 2}])
def test_probe_jpeg(options: dict[str, Any]) -> None:
    data = encode(gradient((57, 31)), "JPEG", **options)
    assert probe(data, "jpeg", param=None) == ImageHeader("jpeg", 57, 31, 1)


def test_probe_progressive_jpeg_uses_sof2() -> None:
    data = encode(gradient((57, 31)), "JPEG", progressive=True)
    assert b"\xff\xc2" in data
    assert probe(data, "jpeg", param=None).width == 57


def test_probe_animated_gif() -> None:
    frames = frames_of(5)
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert probe(data, "gif", param=None) == ImageHeader("gif", 40, 30, 5)
    _, img = inspect_and_decode(data)
    assert img.size == (40, 30) and img.mode == "RGB"


def test_probe_still_gif() -> None:
    data = encode(gradient((19, 11), "P"), "GIF")
    assert probe(data, "gif", param=None) == ImageHeader("gif", 19, 11, 1)


def test_probe_webp_lossy() -> None:
    data = encode(gradient((37, 23)), "WEBP", quality=80)
    assert data[12:16] == b"VP8 "
    assert probe(data, "webp", param=None) == ImageHeader("webp", 37, 23, 1)


def test_probe_webp_lossless() -> None:
    data = encode(gradient((37, 23)), "WEBP", lossless=True)
    assert data[12:16] == b"VP8L"
    assert probe(data, "webp", param=None) == ImageHeader("webp", 37, 23, 1)


def test_probe_webp_extended_still() -> None:
    translucent = gradient((37, 23), "RGBA")
    translucent.putalpha(100)
    data = encode(translucent, "WEBP", quality=80)
    assert data[12:16] == b"VP8X"
    assert probe(data, "webp", param=None) == ImageHeader("webp", 37, 23, 1)


def test_probe_webp_animated() -> None:
    frames = frames_of(4)
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50)
    assert data[12:16] == b"VP8X"
    assert probe(data, "webp", param=None) == ImageHeader("webp", 40, 30, 4)
    _, img = inspect_and_decode(data)
    assert img.size == (40, 30) and img.mode == "RGB"


def test_probe_apng() -> None:
    frames = frames_of(3, (64, 32))
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50)
    assert b"acTL" in data
    assert probe(data, "png", param=None) == ImageHeader("png", 64, 32, 3)


def test_probe_apng_with_default_image_outside_animation() -> None:
    frames = frames_of(3, (64, 32))
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], default_image=True)
    with Image.open(io.BytesIO(data)) as im:
        expected = getattr(im, "n_frames", 1)
    assert probe(data, "png", param=None).frames == expected == 3


def test_probe_rejects_mismatched_format() -> None:
    with pytest.raises(InvalidImage):
        probe(PNG_1x1, "jpeg", param="p")


def test_probe_zero_size_png() -> None:
    with pytest.raises(InvalidImage, match="0 x 5"):
        probe(png_with_ihdr(0, 5), "png", param="p")


def test_probe_jpeg_without_sof() -> None:
    data = b"\xff\xd8\xff\xe0\x00\x04ab\xff\xda\x00\x02" + b"\x00" * 20
    with pytest.raises(InvalidImage, match="SOF"):
        probe(data, "jpeg", param="p")


def test_probe_jpeg_fill_bytes_before_marker() -> None:
    data = encode(gradient((21, 13)), "JPEG")
    assert data[2:4] == b"\xff\xe0"
    app0_end = 4 + int.from_bytes(data[4:6], "big")
    padded = data[:app0_end] + b"junk\xff\xff" + data[app0_end:]  # junk, then fill bytes
    assert probe(padded, "jpeg", param=None) == ImageHeader("jpeg", 21, 13, 1)
    _, img = inspect_and_decode(padded)
    assert img.size == (21, 13)


def test_probe_gif_without_image() -> None:
    data = b"GIF89a\x10\x00\x10\x00\x00\x00\x00;"
    with pytest.raises(InvalidImage, match="no image"):
        probe(data, "gif", param="p")


def test_crafted_huge_png_is_rejected_by_the_cap_without_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = png_with_ihdr(100_000, 100_000)
    header = probe(data, "png", param=None)
    assert (header.width, header.height) == (100_000, 100_000)

    def no_pillow(*args: object, **kwargs: object) -> None:
        raise AssertionError("Pillow must not be called for an image over the cap")

    monkeypatch.setattr(Image, "open", no_pillow)
    with pytest.raises(InvalidImage, match="100000 x 100000") as excinfo:
        inspect_image(data_uri(data), param=PARAM, max_pixels=CAP)
    assert "40,000,000" in excinfo.value.message
    assert excinfo.value.param == PARAM
    with pytest.raises(InvalidImage, match="over the cap"):
        decode(data, header, max_pixels=CAP, param=PARAM)


def test_pixel_cap_is_inclusive() -> None:
    data = encode(gradient((20, 10)), "PNG")
    inspect_image(data_uri(data), param=None, max_pixels=200)
    with pytest.raises(InvalidImage, match="over the cap"):
        inspect_image(data_uri(data), param=None, max_pixels=199)


def test_pillow_bomb_limit_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(gradient((20, 10)), "PNG")
    header = probe(data, "png", param=None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(InvalidImage, match="over the cap"):
        decode(data, header, max_pixels=CAP, param=None)


def test_decode_rejects_header_that_disagrees_with_pillow() -> None:
    data = encode(gradient((20, 10)), "PNG")
    lying = ImageHeader(format="png", width=10, height=10, frames=1)
    with pytest.raises(InvalidImage, match="header says"):
        decode(data, lying, max_pixels=CAP, param=None)


# --- fuzzing -------------------------------------------------------------------------------


def _seed_images() -> dict[str, bytes]:
    frames = frames_of(3, (16, 12))
    return {
        "png": encode(gradient((16, 12)), "PNG"),
        "apng": encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "jpeg": encode(gradient((16, 12)), "JPEG"),
        "jpeg-progressive": encode(gradient((16, 12)), "JPEG", progressive=True),
        "gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "webp": encode(gradient((16, 12)), "WEBP"),
        "webp-lossless": encode(gradient((16, 12)), "WEBP", lossless=True),
        "webp-animated": encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
    }


SEEDS = _seed_images()


def _probe_or_invalid(data: bytes) -> ImageHeader | None:
    fmt = sniff_format(data)
    if fmt is None:
        return None
    try:
        return probe(data, fmt, param="p")
    except InvalidImage:
        return None


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_fuzz_probe_truncations(name: str) -> None:
    data = SEEDS[name]
    for end in range(len(data) + 1):
        _probe_or_invalid(data[:end])


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_fuzz_probe_and_decode_mutations(name: str) -> None:
    rng = random.Random(f"oculo-{name}")
    seed = SEEDS[name]
    for _ in range(300):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        header = _probe_or_invalid(bytes(data))
        if header is not None and header.pixels <= 4096:
            try:
                img = decode(bytes(data), header, max_pixels=4096, param="p")
            except InvalidImage:
                continue
            assert img.mode == "RGB"


def test_fuzz_probe_random_bytes_behind_magic() -> None:
    rng = random.Random(20240601)
    magics = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"GIF87a", b"RIFF\0\0\0\0WEBP"]
    for _ in range(4000):
        magic = rng.choice(magics)
        tail = rng.randbytes(rng.choice([0, 1, 5, 13, 30, 64, 300]))
        if magic.startswith(b"RIFF") and rng.random() < 0.5:
            tail = rng.choice([b"VP8 ", b"VP8L", b"VP8X", b"ANMF"]) + tail
        if magic.startswith(b"\x89PNG") and rng.random() < 0.5:
            tail = b"\x00\x00\x00\x0dIHDR" + tail
        _probe_or_invalid(magic + tail)


# --- decoding ------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (30, 20), (0, 255, 255, 0))  # red
    header, img = inspect_and_decode(encode(cmyk, "JPEG", quality=95))
    assert header.format == "jpeg"
    assert img.mode == "RGB" and img.size == (30, 20)
    r, g, b = img.getpixel((15, 10))  # type: ignore[misc]
    assert r > 200 and g < 60 and b < 60


def test_palette_with_alpha_becomes_rgb_on_white() -> None:
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    data = encode(pal, "PNG", transparency=0)  # index 0 (red) fully transparent
    _, img = inspect_and_decode(data)
    assert img.mode == "RGB"
    assert img.getpixel((5, 5)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_transparency_is_composited_onto_white(fmt: str) -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 128, 0, 255))
    options: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    _, img = inspect_and_decode(encode(rgba, fmt, **options))
    assert img.mode == "RGB"
    assert img.getpixel((5, 5)) == (255, 255, 255)
    assert img.getpixel((1, 1)) == (0, 128, 0)


@pytest.mark.parametrize("mode", ["L", "LA", "1", "P", "RGBA"])
def test_modes_become_rgb(mode: str) -> None:
    _, img = inspect_and_decode(encode(gradient((12, 9), mode), "PNG"))
    assert img.mode == "RGB" and img.size == (12, 9)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    grey = Image.new("I;16", (3, 1))
    for x, value in enumerate((0, 32768, 65535)):
        grey.putpixel((x, 0), value)
    _, img = inspect_and_decode(encode(grey, "PNG"))
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255,) * 3]


def test_detail_low_downsizes_to_fit_560() -> None:
    data = encode(gradient((1120, 800)), "JPEG")
    header, img = inspect_and_decode(data, detail="low")
    assert (header.width, header.height) == (1120, 800)
    assert img.size == (560, 400)
    _, full = inspect_and_decode(data, detail="high")
    assert full.size == (1120, 800)


def test_detail_low_keeps_small_images() -> None:
    _, img = inspect_and_decode(encode(gradient((300, 200)), "PNG"), detail="low")
    assert img.size == (300, 200)


def test_truncated_image_fails_in_decode() -> None:
    data = encode(gradient((64, 64)), "PNG")
    inspected = inspect_image(data_uri(data[: len(data) // 2]), param=PARAM, max_pixels=CAP)
    with pytest.raises(InvalidImage, match="could not be decoded") as excinfo:
        decode(inspected.data, inspected.header, max_pixels=CAP, param=PARAM)
    assert excinfo.value.param == PARAM
