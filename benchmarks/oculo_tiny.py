"""oculo-tiny's speed through the API: time to first token and tokens/s, streamed, on loopback.

    .venv/bin/python -m benchmarks.oculo_tiny [--rounds 10]

Two requests, side by side in one run against one `oculo serve` (the built-in default model):
one 560x560 image, and two 1120x1120 images (the API's maximum: 2 images of 6,404 tokens each).
Images are fresh scenes from the training world, sent as data URIs; greedy decoding.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import statistics
import time

import httpx
from PIL import Image

from benchmarks.live_server import KEY, live_server
from training import world


def image_uri(width: int, height: int, rng: random.Random, fmt: str = "PNG") -> str:
    scene = world.sample_scene(rng)
    scene = world.Scene(scene.items, scene.text, width, height, scene.background)
    image: Image.Image = world.render(scene, rng)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def measure(client: httpx.Client, uris: list[str]) -> tuple[float, float, int]:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in uris]
    content.append(
        {
            "type": "text",
            "text": "Describe the images." if len(uris) > 1 else "What is in this image?",
        }
    )
    body = {
        "model": "oculo-tiny",
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": 64,
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    if first is None:  # an answer of no visible text (an immediate end of sequence)
        return end - start, 0.0, tokens
    return first - start, (tokens - 1) / max(end - first, 1e-9), tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    rng = random.Random("benchmark")
    cases = {
        "one 560x560 PNG": lambda: [image_uri(560, 560, rng)],
        # two PNGs of noisy 1120x1120 scenes can pass the 1 MiB body limit: JPEG, as a client would
        "two 1120x1120 JPEGs": lambda: [
            image_uri(1120, 1120, rng, "JPEG"),
            image_uri(1120, 1120, rng, "JPEG"),
        ],
    }
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in cases}
    with (
        live_server() as base,
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c,
    ):
        for i in range(args.rounds + 2):
            for name, make in cases.items():
                sample = measure(c, make())
                if i >= 2:
                    results[name].append(sample)
    print(
        f"{platform.machine()}, {os.cpu_count()} cores; oculo-tiny; {args.rounds} rounds, medians"
    )
    print("| request | time to first token ms | tokens/s after the first | completion tokens |")
    print("|---|---|---|---|")
    for name, samples in results.items():
        ttft = statistics.median(s[0] for s in samples) * 1000
        rate = statistics.median(s[1] for s in samples)
        tokens = statistics.median(s[2] for s in samples)
        print(f"| {name} | {ttft:.1f} | {rate:.0f} | {tokens:.0f} |")


if __name__ == "__main__":
    main()
