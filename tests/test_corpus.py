"""Every file of ../shared/corpus answered over HTTP as its manifest's `expect` says."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from conftest import CORPUS, Server

MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
DECLARED = {"png": "image/png", "jpeg": "image/jpeg", "gif": "image/gif", "webp": "image/webp"}


def _expected(expect: str) -> set[tuple[int, str | None]]:
    if expect == "accept":
        return {(200, None)}
    if expect == "reject: unsupported format":
        return {(400, "unsupported_image_format")}
    if expect == "reject: invalid image":
        return {(400, "invalid_image")}
    if expect.startswith("reject: request body over 1 MB"):
        return {(413, "request_too_large")}
    if expect.startswith("either:"):
        return {(200, None), (400, "invalid_image")}
    raise AssertionError(f"unknown expectation {expect!r}")


@pytest.fixture(scope="module")
def client(server: Server) -> Any:
    with server.client() as c:
        yield c


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_corpus_file(client: httpx.Client, entry: dict[str, Any]) -> None:
    data = (CORPUS / "images" / entry["file"]).read_bytes()
    mime = DECLARED.get(entry["magic"], "image/png")  # what a client would most likely declare
    uri = f"data:{mime};base64," + base64.b64encode(data).decode()
    body = {
        "model": "tiny-idefics3",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
        "max_tokens": 2,
    }
    r = client.post("/v1/chat/completions", json=body)
    code = None if r.status_code == 200 else r.json()["error"]["code"]
    expected = _expected(entry["expect"])
    if len(r.request.content) >= 1_048_576:  # too big to send at all: the body rule comes first
        expected = {(413, "request_too_large")}
    assert (r.status_code, code) in expected, r.text[:300]
    if r.status_code == 200 and "width" in entry:
        usage = r.json()["usage"]
        w, h = entry["width"], entry["height"]
        clamp = lambda v: min(max(v / 560, 1), 2)  # noqa: E731
        assert abs(usage["prompt_tokens_details"]["image_tokens"] - clamp(w) * clamp(h) * 1601) < 1
    elif r.status_code == 400:
        assert r.json()["error"]["param"] == "messages[0].content[0].image_url.url"
