"""What the HTTP API adds on top of the engine, measured side by side in one run.

A tiny Idefics3 checkpoint (random weights, built offline) answers the same one-image request
  engine:  in-process, `TransformersEngine.generate` on an already decoded image
  http:    through a live `oculo serve` on loopback (a subprocess), whole and streamed,
           with the image sent as a base64 data URI: parse, policy, decode, engine, JSON/SSE
Reported: median latency to the whole answer and to the first token, and http / engine ratios.

    .venv/bin/python -m benchmarks.http_overhead [--rounds 40] [--width 560 --height 560]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from benchmarks.live_server import KEY, live_server
from oculo.engines.base import GenerationRequest, ImageSegment, Message, SamplingParams, TextSegment
from oculo.testing.checkpoints import build_checkpoint

MAX_TOKENS = 8


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((width, height), 40).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


async def engine_times(folder: Path, image: Image.Image, rounds: int) -> tuple[float, float]:
    from oculo.engines.transformers import TransformersEngine

    engine = TransformersEngine(folder, model_id="bench")
    request = GenerationRequest(
        messages=[Message("user", (ImageSegment(0), TextSegment("What is in this image?")))],
        images=[image],
        sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
    )
    whole, first = [], []
    for i in range(rounds + 3):
        start = time.perf_counter()
        t_first = None
        async for _delta in engine.generate(request):
            t_first = t_first or time.perf_counter()
        if i >= 3:
            whole.append(time.perf_counter() - start)
            first.append((t_first or time.perf_counter()) - start)
    await engine.close()
    return statistics.median(whole) * 1000, statistics.median(first) * 1000


def http_times(base: str, uri: str, rounds: int) -> tuple[float, float]:
    body = {
        "model": "bench",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    whole, first = [], []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        for i in range(rounds + 3):
            start = time.perf_counter()
            assert c.post("/v1/chat/completions", json=body).status_code == 200
            mid = time.perf_counter()
            t_first = None
            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                for line in r.iter_lines():
                    if t_first is None and '"content":"' in line and '"content":""' not in line:
                        t_first = time.perf_counter()
            if i >= 3:
                whole.append(mid - start)
                first.append((t_first or time.perf_counter()) - mid)
    return statistics.median(whole) * 1000, statistics.median(first) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--width", type=int, default=560)
    parser.add_argument("--height", type=int, default=560)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    folder = build_checkpoint("idefics3", tmp / "idefics3")
    data = png(args.width, args.height)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    e_whole, e_first = asyncio.run(engine_times(folder, image, args.rounds))

    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    with live_server("--model", str(folder), "--model-id", "bench") as base:
        h_whole, h_first = http_times(base, uri, args.rounds)

    print(
        f"{platform.machine()}, {os.cpu_count()} cores; tiny Idefics3 (random weights), "
        f"one {args.width}x{args.height} PNG ({len(data):,} bytes), {MAX_TOKENS} tokens, "
        f"{args.rounds} rounds, medians"
    )
    print("| path | whole answer ms | first token ms |")
    print("|---|---|---|")
    print(f"| engine in-process | {e_whole:.1f} | {e_first:.1f} |")
    print(f"| HTTP API (loopback) | {h_whole:.1f} | {h_first:.1f} |")
    print(f"| ratio HTTP / engine | {h_whole / e_whole:.2f} | {h_first / e_first:.2f} |")


if __name__ == "__main__":
    main()
