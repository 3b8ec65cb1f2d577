"""The request path before the engine, measured in-process, side by side with its floor.

A two-image body of about 700 KB (two JPEGs as base64 data URIs) goes through
  floor:   orjson.loads + pybase64 strict decode of each image + a header probe
  oculo:   parse_chat_request (pydantic from bytes) + build_prompt (data URIs, sniffing,
           header probe, pixel cap, token rule)
  decode:  decode_images (Pillow, off the event loop in the server)
Each is timed over many rounds; the report gives the median per request and the ratio to the floor.

    .venv/bin/python -m benchmarks.request_path [--rounds 300]
"""

from __future__ import annotations

import argparse
import base64
import io
import platform
import statistics
import time
from collections.abc import Callable

import orjson
import pybase64
from PIL import Image

from oculo.media import probe, sniff_format
from oculo.policy import Limits, build_prompt, decode_images
from oculo.protocol import parse_chat_request


def _jpeg(width: int, height: int, seed: int) -> bytes:
    noise = Image.effect_noise((width, height), 64 + seed)
    rgb = Image.merge("RGB", (noise, noise.rotate(90, expand=False), noise.transpose(0)))
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def make_body(model: str = "m") -> bytes:
    """Two noise JPEGs (960x720, 640x480) as base64 data URIs and a question: about 770 KB."""
    images = [_jpeg(960, 720, 0), _jpeg(640, 480, 1)]
    parts: list[dict[str, object]] = [
        {
            "type": "image_url",
            "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(img).decode()},
        }
        for img in images
    ]
    parts.append({"type": "text", "text": "What differs between these two images?"})
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You answer questions about images."},
            {"role": "user", "content": parts},
        ],
        "max_tokens": 64,
    }
    return orjson.dumps(body)


def floor(body: bytes) -> None:
    data = orjson.loads(body)
    for part in data["messages"][1]["content"]:
        if part["type"] == "image_url":
            raw = pybase64.b64decode(part["image_url"]["url"].split(",", 1)[1], validate=True)
            fmt = sniff_format(raw)
            assert fmt is not None
            probe(raw, fmt, param=None)


def oculo_path(body: bytes) -> None:
    build_prompt(parse_chat_request(body), Limits())


def with_decode(body: bytes) -> None:
    prompt = build_prompt(parse_chat_request(body), Limits())
    decode_images(prompt.images, Limits())


def timeit(fn: Callable[[bytes], None], body: bytes, rounds: int) -> float:
    for _ in range(5):
        fn(body)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(body)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    body = make_body()
    print(f"body: {len(body):,} bytes, 2 JPEG images; {platform.processor() or platform.machine()}")
    base = timeit(floor, body, args.rounds)
    ours = timeit(oculo_path, body, args.rounds)
    full = timeit(with_decode, body, max(20, args.rounds // 10))
    print("| path | median ms / request | x floor |")
    print("|---|---|---|")
    print(f"| floor: orjson + pybase64 + header probe | {base:.3f} | 1.00 |")
    print(f"| oculo: parse + policy (before decode) | {ours:.3f} | {ours / base:.2f} |")
    print(f"| oculo: parse + policy + Pillow decode | {full:.3f} | {full / base:.2f} |")


if __name__ == "__main__":
    main()
