"""`oculo serve --model PATH` with no keys configured: it makes a key, prints it once, uses it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import free_port, png_uri


def test_serve_one_folder_with_a_generated_key(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "OCULO_API_KEYS"}
    env["OCULO_DATA_DIR"] = str(tmp_path / "data")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "oculo.cli",
                "serve",
                "--model",
                str(checkpoints["llava"]),
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        key = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            match = re.search(
                r"export INFERENCE_API_KEY=(sk-oculo-[A-Za-z0-9_-]+)", log.read_text()
            )
            if match:
                key = match.group(1)
                try:
                    if httpx.get(base + "/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        assert key is not None, log.read_text()
        headers = {"Authorization": f"Bearer {key}"}
        models = httpx.get(base + "/v1/models", headers=headers).json()
        assert [m["id"] for m in models["data"]] == ["llava"]
        body = {
            "model": "llava",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": png_uri()}},
                        {"type": "text", "text": "What is in this image?"},
                    ],
                }
            ],
            "max_tokens": 4,
        }
        r = httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        wrong = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert wrong.status_code == 401
        assert log.read_text().count(key) == 1  # shown once, never logged again
    finally:
        proc.terminate()
        proc.wait(timeout=15)
