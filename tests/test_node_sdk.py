"""The seed's TypeScript example, run by Node with the real `openai` npm package, against oculo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import API_KEY, Server, make_image

NODE_DIR = Path(__file__).parent / "node"


def test_seed_typescript_example(server: Server, tmp_path: Path) -> None:
    installed = (NODE_DIR / "node_modules" / "openai").exists() and shutil.which("node")
    if not installed:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must install tests/node (make test runs npm ci there)")
        pytest.skip("node or tests/node/node_modules missing: run `make test`")
    image = tmp_path / "image.png"
    image.write_bytes(make_image(64, 64))
    out = subprocess.run(
        ["node", "seed_example.mjs"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "IMAGE_PATH": str(image),
            "OCULO_BASE_URL": server.v1,
            "INFERENCE_API_KEY": API_KEY,
            "OCULO_MODEL": "tiny-idefics3",
        },
    )
    assert out.returncode == 0, out.stderr
    reports = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert reports[0]["usage"]["prompt_tokens_details"]["image_tokens"] == 1601
    assert reports[0]["id"].startswith("chatcmpl-")
    assert reports[1]["streamChunks"] >= 3
    assert reports[1]["streamUsage"]["prompt_tokens_details"]["image_tokens"] == 1601
